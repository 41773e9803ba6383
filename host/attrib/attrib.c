/* host/attrib/: attribution, above model/ and sae/: attribution patching and exact patching
 * over the node grid (attrib.c), SAE latents as nodes (attrib_sae.c), path patching and edge
 * attribution (paths.c, eap.c). Built on captures, edits and the model's backward.
 *
 * attrib.c: attribution patching (gradient x activation difference, optionally with
 * integrated gradients) and exact activation patching over the node grid of attrib.h,
 * and the correlations that compare them. Built on edits (hooks.h), the backward
 * (host/model/grad.c, metric.c) and the node sums it forms at its hook sites
 * (host/model/hooks.c, score.h); integrated gradients average kept gradients and sum on the host. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "model/score.h"

static const char *const g_kind[LP_NODE_KINDS] = {
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "attn.hook_z",    "attn.hook_q",    "attn.hook_k",     "attn.hook_v",   "attn.hook_pattern",
};

const char *lp_node_kind_name(int k) { return k >= 0 && k < LP_NODE_KINDS ? g_kind[k] : "?"; }
int lp_node_kind_parse(const char *name) {
    for (int k = 0; k < LP_NODE_KINDS; k++)
        if (strcmp(name, g_kind[k]) == 0) return k;
    return -1;
}

static int wanted(const lp_attrib_opts *o, int k) { return !o->kinds || (o->kinds >> k & 1u); }
static int per_head(int k) { return k >= LP_NODE_Z && k <= LP_NODE_V; }

/* Scores shape of kind k for T positions. */
static void node_shape(const lp_model *m, int k, int T, lp_node_scores *s) {
    const lp_config *c = lp_model_config(m);
    s->shape[0] = c->n_layers;
    if (k == LP_NODE_PATTERN) s->ndim = 2, s->shape[1] = c->n_heads;
    else if (per_head(k)) s->ndim = 3, s->shape[1] = T, s->shape[2] = (k == LP_NODE_K || k == LP_NODE_V) ? c->n_kv_heads : c->n_heads;
    else s->ndim = 2, s->shape[1] = T;
}

static size_t node_count(const lp_node_scores *s) { return (size_t)s->shape[0] * s->shape[1] * (s->ndim == 3 ? s->shape[2] : 1); }

void lp_pair_result_free(lp_pair_result *r) {
    for (int k = 0; k < LP_NODE_KINDS; k++) free(r->s[k].v), r->s[k].v = NULL;
}

void lp_node_name(const lp_model *m, int k, const lp_node_scores *s, int64_t i, char *buf, size_t n) {
    (void)m;
    if (k == LP_NODE_PATTERN) {
        snprintf(buf, n, "blocks.%lld.%s[head=%lld]", (long long)(i / s->shape[1]), g_kind[k], (long long)(i % s->shape[1]));
    } else if (s->ndim == 3) {
        int64_t H = s->shape[2], T = s->shape[1];
        snprintf(buf, n, "blocks.%lld.%s[pos=%lld,head=%lld]", (long long)(i / (T * H)), g_kind[k], (long long)(i / H % T), (long long)(i % H));
    } else {
        snprintf(buf, n, "blocks.%lld.%s[pos=%lld]", (long long)(i / s->shape[1]), g_kind[k], (long long)(i % s->shape[1]));
    }
}

/* Registers the grid's hooks as captures; returns the glob list for gradients. */
static lp_status capture_grid(lp_model *m, const lp_attrib_opts *o, char *list, size_t n) {
    list[0] = 0;
    size_t used = 0;
    for (int k = 0; k < LP_NODE_KINDS; k++) {
        if (!wanted(o, k)) continue;
        char pat[96];
        snprintf(pat, sizeof pat, "blocks.*.%s", g_kind[k]);
        LP_CHECK(lp_hook_capture(m, pat, NULL, 0, NULL));
        used += snprintf(list + used, n - used, "%s%s", used ? "," : "", pat);
    }
    return LP_OK;
}

/* The captured activation (F32 copy) of kind k at layer L, shaped as the hook. */
static lp_status grab(lp_model *m, int k, int L, float **out, size_t *n) {
    char name[128];
    snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
    lp_tensor t;
    LP_CHECK(lp_capture_get(m, name, &t));
    *n = (size_t)lp_shape_numel(t.shape, t.ndim);
    if (!(*out = malloc(*n * sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory");
    return lp_capture_read_f32(m, name, *out, *n);
}

/* The layer whose hooks a metric's gradient starts from: a direction metric's hook's (its
 * backward reaches no hook of a layer above), else past the last block. */
static int metric_layer(const lp_model *m, const lp_metric *mt) {
    int L, n = lp_model_config(m)->n_layers;
    if (mt->kind != LP_METRIC_DIRECTION || !mt->hook) return n;
    if (sscanf(mt->hook, "blocks.%d.", &L) == 1) return L;
    return strncmp(mt->hook, "hook_", 5) == 0 ? 0 : n; /* the embeddings; else ln_final, unembed */
}

/* The gradient of kind k at layer L from the last lp_model_grad, read in place (the model
 * keeps it in F32 on the host until the next lp_model_grad): NULL above the layer where the
 * metric enters (the metric does not depend on those nodes: zero). */
static lp_status grad_view(lp_model *m, const lp_metric *mt, int k, int L, float **out) {
    char name[128];
    snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
    *out = NULL;
    if (L > metric_layer(m, mt)) return LP_OK;
    lp_tensor g;
    LP_CHECK(lp_grad_get(m, name, &g));
    *out = g.data;
    return LP_OK;
}

/* Attribution runs its own forwards and clears the hooks around them: edits registered by
 * the caller would be dropped without a word, so they are refused. */
static lp_status no_user_edits(const lp_model *m, const char *what) {
    for (int id = 0; id < lp_hook_count(m); id++)
        if (lp_hook_is_edited(m, id))
            LP_FAIL(LP_ERR_ARG, "%s: %s has an edit registered; attribution runs its own forwards and would discard it "
                    "(lp_hooks_clear first)", what, lp_hook_name(m, id));
    return LP_OK;
}

/* Node sums of (clean - corrupted) * grad for row b of [B, ...] hook tensors into scores
 * (layer L); grad NULL: zero. */
static void node_sums(int k, int L, int b, int B, int T, const float *clean, const float *corr, const float *grad, size_t numel,
                      lp_node_scores *s) {
    size_t per_row = numel / B, o0 = b * per_row;
    int64_t groups = k == LP_NODE_PATTERN ? s->shape[1] : (int64_t)T * (s->ndim == 3 ? s->shape[2] : 1);
    size_t per = per_row / groups; /* a head's [T,T] pattern, or a (position, head)'s values */
    float *out = s->v + (size_t)L * groups;
    if (!grad) {
        for (int64_t j = 0; j < groups; j++) out[j] = 0;
        return;
    }
    const float *c = clean + o0, *x = corr + o0, *g = grad + o0;
    for (int64_t j = 0; j < groups; j++) {
        double acc = 0;
        for (size_t i = j * per; i < (j + 1) * per; i++) acc += ((double)c[i] - x[i]) * g[i];
        out[j] = (float)acc;
    }
}

/* Per (kind, layer) host arrays of one run: copies it owns, or views of the model's capture
 * and gradient buffers (valid until the next forward or lp_hooks_clear). */
typedef struct grid { float **v; size_t *n; int nL, views; } grid;

static lp_status grid_new(grid *g, int nL) {
    g->nL = nL, g->views = 0;
    g->v = calloc((size_t)LP_NODE_KINDS * nL, sizeof(float *));
    g->n = calloc((size_t)LP_NODE_KINDS * nL, sizeof(size_t));
    if (!g->v || !g->n) LP_FAIL(LP_ERR_OOM, "out of memory");
    return LP_OK;
}

static void grid_free(grid *g) {
    for (int i = 0; !g->views && g->v && i < LP_NODE_KINDS * g->nL; i++) free(g->v[i]);
    free(g->v), free(g->n);
}

/* The captured activations of the grid (copies, or with `view` the capture buffers themselves
 * where they hold F32 on the host), and optionally views of their gradients. */
static lp_status grid_grab(lp_model *m, const lp_metric *mt, const lp_attrib_opts *o, grid *act, grid *grad, int view) {
    int nL = act->nL;
    char name[128];
    view = view && lp_model_ctx(m)->device == LP_CPU && lp_model_ctx(m)->dtype == LP_F32;
    act->views = view;
    if (grad) grad->views = 1;
    for (int k = 0; k < LP_NODE_KINDS; k++)
        for (int L = 0; wanted(o, k) && L < nL; L++) {
            int i = k * nL + L;
            if (view) {
                lp_tensor t;
                snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
                LP_CHECK(lp_capture_get(m, name, &t));
                act->v[i] = t.data, act->n[i] = (size_t)lp_shape_numel(t.shape, t.ndim);
            } else {
                LP_CHECK(grab(m, k, L, &act->v[i], &act->n[i]));
            }
            if (grad) {
                LP_CHECK(grad_view(m, mt, k, L, &grad->v[i]));
                grad->n[i] = act->n[i];
            }
        }
    return LP_OK;
}

/* The scores of each pair: per node, the sum of (clean - corrupted) * gradient. */
static lp_status pair_scores(lp_model *m, const lp_attrib_opts *o, int B, int T, const grid *ac, const grid *ax, const grid *gr,
                             const double *mc, const double *mx, lp_pair_result *res) {
    int nL = lp_model_config(m)->n_layers;
    for (int b = 0; b < B; b++) {
        res[b].metric_clean = mc[b], res[b].metric_corrupted = mx[b];
        for (int k = 0; k < LP_NODE_KINDS; k++) {
            if (!wanted(o, k)) continue;
            lp_node_scores *s = &res[b].s[k];
            node_shape(m, k, T, s);
            if (!(s->v = calloc(node_count(s), sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory");
            for (int L = 0; L < nL; L++) {
                int i = k * nL + L;
                node_sums(k, L, b, B, T, ac->v[i], ax->v[i], gr->v[i], ax->n[i], s);
            }
        }
    }
    return LP_OK;
}

static lp_status atp_ig(lp_model *m, const int32_t *clean, const int32_t *corrupted, int B, int T, const lp_metric *mt,
                        const lp_attrib_opts *o, lp_pair_result *res) {
    const lp_config *cf = lp_model_config(m);
    int nL = cf->n_layers, ig = o->ig_steps > 0, at_clean = o->grad_at_clean && !ig;
    size_t ne = (size_t)B * T * cf->d_model;
    char list[1024];
    grid ac = {0}, ax = {0}, gr = {0};
    double *mc = malloc(B * sizeof(double)), *mx = malloc(B * sizeof(double));
    float *emb_c = ig ? malloc(ne * sizeof(float)) : NULL, *emb_x = ig ? malloc(ne * sizeof(float)) : NULL;
    lp_status st = mc && mx && (!ig || (emb_c && emb_x)) ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = grid_new(&ac, nL);
    if (st == LP_OK) st = grid_new(&ax, nL);
    if (st == LP_OK) st = grid_new(&gr, nL);
    /* one clean and one corrupted run capture the grid (and, for integrated gradients, the
     * input embeddings); the gradient comes from whichever run it is taken at */
    lp_hooks_clear(m);
    if (st == LP_OK) st = capture_grid(m, o, list, sizeof list);
    if (st == LP_OK && ig) st = lp_hook_capture(m, "hook_embed", NULL, 0, NULL);
    if (st == LP_OK) st = at_clean ? lp_model_grad(m, clean, B, T, mt, list, mc) : lp_model_metric(m, clean, B, T, mt, mc);
    /* the clean run's captures are copied (the corrupted run overwrites them); the last run's
     * are read in place unless integrated gradients run more forwards; gradients are read in
     * place (the model keeps them until the next lp_model_grad) */
    if (st == LP_OK) st = grid_grab(m, mt, o, &ac, at_clean ? &gr : NULL, 0);
    if (st == LP_OK && ig) st = lp_capture_read_f32(m, "hook_embed", emb_c, ne);
    if (st == LP_OK) st = at_clean || ig ? lp_model_metric(m, corrupted, B, T, mt, mx) : lp_model_grad(m, corrupted, B, T, mt, list, mx);
    if (st == LP_OK) st = grid_grab(m, mt, o, &ax, at_clean || ig ? NULL : &gr, !ig);
    if (st == LP_OK && ig) st = lp_capture_read_f32(m, "hook_embed", emb_x, ne);
    /* integrated gradients: the corrupted prompt with its embedding moved alpha of the way to
     * the clean one, alpha at the midpoints of `steps` intervals, ig_batch steps per forward
     * (their B rows each side by side); the gradients averaged */
    int steps = o->ig_steps, per = o->ig_batch > 0 && o->ig_batch < steps ? o->ig_batch : steps;
    int32_t *rows = NULL, *rans = NULL, *rwr = NULL, *rpos = NULL;
    double *rmet = NULL;
    float *emb = NULL;
    if (st == LP_OK && ig) {
        rows = malloc((size_t)per * B * T * sizeof(int32_t)), rmet = malloc((size_t)per * B * sizeof(double));
        rans = malloc((size_t)per * B * sizeof(int32_t)), rwr = malloc((size_t)per * B * sizeof(int32_t));
        rpos = malloc((size_t)per * B * sizeof(int32_t)), emb = malloc((size_t)per * ne * sizeof(float));
        if (!rows || !rmet || !rans || !rwr || !rpos || !emb) st = LP_ERR(LP_ERR_OOM, "out of memory");
        for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++)
            for (int L = 0; st == LP_OK && wanted(o, k) && L < nL; L++) {
                int i = k * nL + L;
                gr.n[i] = ax.n[i];
                if (!(gr.v[i] = calloc(gr.n[i], sizeof(float)))) st = LP_ERR(LP_ERR_OOM, "out of memory");
            }
    }
    for (int s0 = 0; st == LP_OK && ig && s0 < steps; s0 += per) {
        int sc = steps - s0 < per ? steps - s0 : per;
        for (int j = 0; j < sc; j++) {
            double alpha = (s0 + j + 0.5) / steps;
            for (size_t i = 0; i < ne; i++) emb[(size_t)j * ne + i] = (float)(emb_x[i] + alpha * (emb_c[i] - emb_x[i]));
            memcpy(rows + (size_t)j * B * T, corrupted, (size_t)B * T * sizeof(int32_t));
            for (int b = 0; b < B; b++) {
                rans[j * B + b] = mt->answer ? mt->answer[b] : 0, rwr[j * B + b] = mt->wrong ? mt->wrong[b] : 0;
                rpos[j * B + b] = mt->pos ? mt->pos[b] : T - 1;
            }
        }
        lp_metric rm = *mt;
        rm.answer = mt->answer ? rans : NULL, rm.wrong = mt->wrong ? rwr : NULL, rm.pos = rpos;
        lp_hooks_clear(m);
        lp_edit_spec e = {.kind = LP_EDIT_PATCH, .src = emb, .src_len = (size_t)sc * ne};
        st = lp_hook_edit(m, "hook_embed", &e);
        if (st == LP_OK) st = lp_model_grad(m, rows, sc * B, T, &rm, list, rmet);
        for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++)
            for (int L = 0; st == LP_OK && wanted(o, k) && L < nL && L <= metric_layer(m, mt); L++) {
                int i = k * nL + L;
                char name[128];
                lp_tensor g;
                snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
                st = lp_grad_get(m, name, &g);
                for (int j = 0; st == LP_OK && j < sc; j++) /* step j's B rows sit at rows j*B .. j*B+B-1 */
                    for (size_t q = 0; q < gr.n[i]; q++) gr.v[i][q] += ((const float *)g.data)[(size_t)j * gr.n[i] + q] / steps;
            }
    }
    free(rows), free(rmet), free(rans), free(rwr), free(rpos), free(emb), free(emb_c), free(emb_x);
    if (st == LP_OK) st = pair_scores(m, o, B, T, &ac, &ax, &gr, mc, mx, res);
    grid_free(&ac), grid_free(&ax), grid_free(&gr);
    free(mc), free(mx);
    return st;
}

/* Values per node of kind k for T positions: a head's [T, T] pattern, a (position, head)'s
 * values, or a position's. */
static size_t node_per(const lp_model *m, int k, int T) {
    const lp_config *c = lp_model_config(m);
    if (k == LP_NODE_PATTERN) return (size_t)T * T;
    if (per_head(k)) return (size_t)c->d_head;
    return (size_t)c->d_model;
}

/* The fused scores of the last scored backward into each pair's result: hook (k, L) holds
 * [B, groups] sums of (reference - current) * gradient; `sign` -1 when the reference was the
 * corrupted run (the gradient taken at the clean one). With a shared prefix of p0 positions
 * the backward scored positions p0 .. alone: the nodes before them score exactly 0 (their
 * activations are the same in both runs). */
static lp_status fused_results(lp_model *m, const lp_attrib_opts *o, int B, int T, int p0, float sign, lp_pair_result *res) {
    int nL = lp_model_config(m)->n_layers;
    LP_CHECK(score_fetch(m));
    for (int k = 0; k < LP_NODE_KINDS; k++) {
        if (!wanted(o, k)) continue;
        for (int b = 0; b < B; b++) {
            lp_node_scores *s = &res[b].s[k];
            node_shape(m, k, T, s);
            if (!(s->v = calloc(node_count(s), sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory");
        }
        size_t groups = node_count(&res[0].s[k]) / nL, skip = 0; /* a row's nodes; those before p0 */
        if (k != LP_NODE_PATTERN) skip = groups / T * p0;
        for (int L = 0; L < nL; L++) {
            char name[128];
            size_t n = 0, gs = groups - skip; /* the nodes scored per row */
            snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
            const float *v = score_values(m, name, &n);
            if (!v || n != gs * B) LP_FAIL(LP_ERR_SHAPE, "%s: %zu node scores, expected %zu", name, n, gs * B);
            for (int b = 0; b < B; b++)
                for (size_t j = 0; j < gs; j++) res[b].s[k].v[L * groups + skip + j] = sign * v[b * gs + j];
        }
    }
    return LP_OK;
}

/* The first position at which some pair's prompts differ (T: none does). */
static int first_difference(const int32_t *clean, const int32_t *corrupted, int B, int T) {
    int p0 = T;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < p0; t++)
            if (clean[(size_t)b * T + t] != corrupted[(size_t)b * T + t]) {
                p0 = t;
                break;
            }
    return p0;
}

/* Whether the scored run can start at p0, the prompts' first difference, and give the full
 * run's scores (prefix sharing, score.h). Otherwise the full path runs, because: p0 = 0
 * leaves nothing to share (p0 = T, identical prompts, is left to it too); a mean-loss metric
 * reads every position and a direction metric sums over all of them, and a logit metric
 * read before p0 would need the prefix's logits; the model cannot (score_prefix_possible:
 * tensor parallelism, or the GPU with pattern nodes, whose three-step suffix attention exists
 * on the CPU only); or the caller did not ask for it. Integrated gradients never share (their runs move the
 * embeddings of every position). */
static int can_share(lp_model *m, const lp_metric *mt, const lp_attrib_opts *o, int B, int T, int p0) {
    if (!o->prefix_share || p0 <= 0 || p0 >= T || !score_prefix_possible(m, wanted(o, LP_NODE_PATTERN))) return 0;
    if (mt->kind != LP_METRIC_LOGIT_DIFF && mt->kind != LP_METRIC_LOGPROB) return 0;
    for (int b = 0; b < B; b++)
        if ((mt->pos ? mt->pos[b] : T - 1) < p0) return 0;
    return 1;
}

/* Marks the grid for scoring; `per` of a pattern node: its rows of queries times T keys. */
static lp_status mark_grid(lp_model *m, const lp_attrib_opts *o, int T, int rows) {
    int nL = lp_model_config(m)->n_layers;
    for (int k = 0; k < LP_NODE_KINDS; k++)
        for (int L = 0; wanted(o, k) && L < nL; L++) {
            char name[128];
            snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
            LP_CHECK(score_mark(m, name, k == LP_NODE_PATTERN ? (size_t)rows * T : node_per(m, k, T)));
        }
    return LP_OK;
}

/* The scored run's tokens and metric: with a shared prefix (p0 > 0) the positions p0 .. of
 * each row, and the metric's positions less p0. */
static lp_status scored_inputs(const int32_t *tok, int B, int T, int p0, const lp_metric *mt, int32_t **stok, int32_t **spos,
                               lp_metric *sm) {
    *sm = *mt;
    *stok = *spos = NULL;
    if (p0 == 0) return LP_OK;
    int Ts = T - p0;
    *stok = malloc((size_t)B * Ts * sizeof(int32_t)), *spos = malloc(B * sizeof(int32_t));
    if (!*stok || !*spos) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (int b = 0; b < B; b++) {
        memcpy(*stok + (size_t)b * Ts, tok + (size_t)b * T + p0, Ts * sizeof(int32_t));
        (*spos)[b] = (mt->pos ? mt->pos[b] : T - 1) - p0;
    }
    sm->pos = *spos;
    return LP_OK;
}

/* Attribution patching without integrated gradients: one forward keeps the grid's
 * activations of the run the gradient is not taken at (the reference), one taped forward of
 * the other and its backward, in which every grid hook's node sums are formed where its
 * gradient is produced (score.h): no gradient is kept or copied, and the scores of all pairs
 * leave the device in one copy. Where the prompts share a prefix (can_share), the taped
 * forward and the backward run only the positions after it. */
static lp_status atp_fused(lp_model *m, const int32_t *clean, const int32_t *corrupted, int B, int T, const lp_metric *mt,
                           const lp_attrib_opts *o, lp_pair_result *res) {
    int at_clean = o->grad_at_clean, p0 = first_difference(clean, corrupted, B, T);
    if (!can_share(m, mt, o, B, T, p0)) p0 = 0;
    const int32_t *ref = at_clean ? corrupted : clean, *run = at_clean ? clean : corrupted;
    double *mc = malloc(B * sizeof(double)), *mx = malloc(B * sizeof(double));
    int32_t *stok = NULL, *spos = NULL;
    lp_metric sm;
    lp_status st = mc && mx ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    lp_hooks_clear(m);
    if (st == LP_OK) st = scored_inputs(run, B, T, p0, mt, &stok, &spos, &sm);
    if (st == LP_OK) st = mark_grid(m, o, T, T);
    if (st == LP_OK && p0) st = score_prefix_keep(m, p0, B, T);
    if (st == LP_OK) st = score_phase(m, SCORE_KEEP_REF, B, T);
    if (st == LP_OK) st = lp_model_metric(m, ref, B, T, mt, at_clean ? mx : mc);
    if (st == LP_OK && p0) st = score_prefix_run(m);
    if (st == LP_OK && p0) st = mark_grid(m, o, T, T - p0);
    if (st == LP_OK) st = score_phase(m, SCORE_RUN, B, T - p0);
    if (st == LP_OK) st = lp_model_grad(m, p0 ? stok : run, B, T - p0, &sm, NULL, at_clean ? mc : mx);
    if (st == LP_OK) st = fused_results(m, o, B, T, p0, at_clean ? -1.0f : 1.0f, res);
    for (int b = 0; st == LP_OK && b < B; b++) res[b].metric_clean = mc[b], res[b].metric_corrupted = mx[b];
    score_end(m);
    free(mc), free(mx), free(stok), free(spos);
    return st;
}

lp_status lp_attrib_atp(lp_model *m, const int32_t *clean, const int32_t *corrupted, int B, int T, const lp_metric *mt,
                        const lp_attrib_opts *o, lp_pair_result *res) {
    for (int b = 0; b < B; b++) memset(&res[b], 0, sizeof res[b]);
    LP_CHECK(no_user_edits(m, "attribution patching"));
    lp_status st = o->ig_steps > 0 ? atp_ig(m, clean, corrupted, B, T, mt, o, res) : atp_fused(m, clean, corrupted, B, T, mt, o, res);
    lp_hooks_clear(m);
    if (st != LP_OK)
        for (int b = 0; b < B; b++) lp_pair_result_free(&res[b]);
    return st;
}

/* ---- exact patching ---- */

/* Exact patching of one hook (k, L): P copies of the corrupted prompt at a time, row r with
 * node j0 + r's values clean. The rows are assembled on the device from the kept clean
 * (ref) and corrupted (cur) activations, and the hook patched from there: nothing is
 * uploaded per batch. */
static lp_status exact_hook(lp_model *m, int k, int L, int T, const void *ref, const void *cur, void *src, int P,
                            const int32_t *rows, const lp_metric *pm, double mx, double *met, lp_node_scores *s) {
    lp_ctx *c = lp_model_ctx(m);
    const lp_config *cf = lp_model_config(m);
    size_t es = lp_dtype_size(c->dtype), per_layer = node_count(s) / cf->n_layers;
    size_t per = node_per(m, k, T), n = per_layer * per; /* one row's activation */
    char name[128];
    snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
    for (size_t j0 = 0; j0 < per_layer; j0 += P) {
        int nb = (int)(per_layer - j0 < (size_t)P ? per_layer - j0 : (size_t)P);
        for (int r = 0; r < nb; r++) { /* row r: corrupted, with node j0 + r clean (nodes in memory order) */
            char *d = (char *)src + (size_t)r * n * es;
            size_t at = (j0 + r) * per * es;
            LP_CHECK(lp_ctx_copy(c, d, cur, n * es));
            LP_CHECK(lp_ctx_copy(c, d + at, (const char *)ref + at, per * es));
        }
        lp_hooks_clear(m);
        LP_CHECK(score_patch(m, name, src, (size_t)nb * n));
        LP_CHECK(lp_model_metric(m, rows, nb, T, pm, met));
        for (int r = 0; r < nb; r++) s->v[L * per_layer + j0 + r] = (float)(met[r] - mx);
    }
    return LP_OK;
}

lp_status lp_attrib_exact(lp_model *m, const int32_t *clean, const int32_t *corrupted, int T, const lp_metric *mt,
                          const lp_attrib_opts *o, lp_pair_result *res) {
    const lp_config *cf = lp_model_config(m);
    int nL = cf->n_layers, P = o->patch_batch > 0 ? o->patch_batch : 16;
    memset(res, 0, sizeof *res);
    double mc = 0, mx = 0;
    LP_CHECK(no_user_edits(m, "exact patching"));
    lp_hooks_clear(m);
    /* both runs' activations of the whole grid, kept on the device */
    lp_status st = LP_OK;
    size_t nmax = 0;
    for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++)
        for (int L = 0; st == LP_OK && wanted(o, k) && L < nL; L++) {
            char name[128];
            snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
            st = score_mark(m, name, node_per(m, k, T));
            lp_node_scores sh;
            node_shape(m, k, T, &sh);
            size_t n = node_count(&sh) / nL * node_per(m, k, T);
            nmax = n > nmax ? n : nmax;
        }
    if (st == LP_OK) st = score_phase(m, SCORE_KEEP_REF, 1, T);
    if (st == LP_OK) st = lp_model_metric(m, clean, 1, T, mt, &mc);
    if (st == LP_OK) st = score_phase(m, SCORE_KEEP_CUR, 1, T);
    if (st == LP_OK) st = lp_model_metric(m, corrupted, 1, T, mt, &mx);
    if (st == LP_OK) st = score_phase(m, SCORE_OFF, 1, T);
    res->metric_clean = mc, res->metric_corrupted = mx;
    /* P copies of the corrupted prompt, each with one node of one hook patched */
    int32_t *rows = malloc((size_t)P * T * sizeof(int32_t));
    double *met = malloc(P * sizeof(double));
    int32_t *ans = malloc(P * sizeof(int32_t)), *wr = malloc(P * sizeof(int32_t)), *pos = malloc(P * sizeof(int32_t));
    void *src = NULL;
    if (st == LP_OK && (!rows || !met || !ans || !wr || !pos)) st = LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = lp_ctx_alloc(lp_model_ctx(m), (size_t)P * nmax * lp_dtype_size(lp_model_ctx(m)->dtype), &src);
    for (int r = 0; st == LP_OK && r < P; r++) {
        memcpy(rows + (size_t)r * T, corrupted, T * sizeof(int32_t));
        ans[r] = mt->answer ? mt->answer[0] : 0, wr[r] = mt->wrong ? mt->wrong[0] : 0, pos[r] = mt->pos ? mt->pos[0] : T - 1;
    }
    lp_metric pm = *mt;
    pm.answer = mt->answer ? ans : NULL, pm.wrong = mt->wrong ? wr : NULL, pm.pos = pos;
    for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++) {
        if (!wanted(o, k)) continue;
        lp_node_scores *s = &res->s[k];
        node_shape(m, k, T, s);
        if (!(s->v = calloc(node_count(s), sizeof(float)))) st = LP_ERR(LP_ERR_OOM, "out of memory");
        for (int L = 0; st == LP_OK && L < nL; L++) {
            char name[128];
            void *ref, *cur;
            snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
            score_buffers(m, name, &ref, &cur);
            st = exact_hook(m, k, L, T, ref, cur, src, P, rows, &pm, mx, met, s);
        }
    }
    lp_hooks_clear(m);
    score_end(m);
    lp_ctx_release(lp_model_ctx(m), src);
    free(rows), free(met), free(ans), free(wr), free(pos);
    if (st != LP_OK) lp_pair_result_free(res);
    return st;
}

/* ---- agreement ---- */

double lp_pearson(const float *a, const float *b, size_t n) {
    double ma = 0, mb = 0, sab = 0, saa = 0, sbb = 0;
    for (size_t i = 0; i < n; i++) ma += a[i], mb += b[i];
    ma /= n, mb /= n;
    for (size_t i = 0; i < n; i++) sab += (a[i] - ma) * (b[i] - mb), saa += (a[i] - ma) * (a[i] - ma), sbb += (b[i] - mb) * (b[i] - mb);
    return saa > 0 && sbb > 0 ? sab / sqrt(saa * sbb) : 0;
}

static const float *g_sort_key;
static int by_key(const void *x, const void *y) {
    float a = g_sort_key[*(const size_t *)x], b = g_sort_key[*(const size_t *)y];
    return a < b ? -1 : a > b;
}

/* Average ranks (ties share their mean rank). */
static float *ranks(const float *v, size_t n) {
    size_t *ix = malloc(n * sizeof(size_t));
    float *r = malloc(n * sizeof(float));
    if (!ix || !r) {
        free(ix), free(r);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) ix[i] = i;
    g_sort_key = v;
    qsort(ix, n, sizeof *ix, by_key);
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j + 1 < n && v[ix[j + 1]] == v[ix[i]]) j++;
        for (size_t k = i; k <= j; k++) r[ix[k]] = (float)((i + j) / 2.0);
        i = j + 1;
    }
    free(ix);
    return r;
}

double lp_spearman(const float *a, const float *b, size_t n) {
    float *ra = ranks(a, n), *rb = ranks(b, n);
    double r = ra && rb ? lp_pearson(ra, rb, n) : NAN;
    free(ra), free(rb);
    return r;
}
