/* attrib.c: attribution patching (gradient x activation difference, optionally with
 * integrated gradients) and exact activation patching over the node grid of attrib.h,
 * and the correlations that compare them. Built on captures, edits (hooks.h) and the
 * backward (backward.c); the per-node sums run on the host. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/attrib.h"
#include "loupe/hooks.h"

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
    *out = malloc(*n * sizeof(float));
    if (!*out) LP_FAIL(LP_ERR_OOM, "out of memory");
    return lp_convert_host(*out, LP_F32, t.data, t.dtype, *n);
}

/* Node sums of diff * grad for row b of a [B, ...] hook tensor into scores (layer L). */
static void node_sums(int k, int L, int b, int B, int T, const float *diff, const float *grad, size_t numel, lp_node_scores *s) {
    size_t per_row = numel / B;
    const float *d = diff + b * per_row, *g = grad + b * per_row;
    if (k == LP_NODE_PATTERN) { /* [H, T, T] per row */
        int64_t H = s->shape[1];
        size_t per_head_n = per_row / H;
        for (int64_t h = 0; h < H; h++) {
            double acc = 0;
            for (size_t i = 0; i < per_head_n; i++) acc += (double)d[h * per_head_n + i] * g[h * per_head_n + i];
            s->v[L * H + h] = (float)acc;
        }
        return;
    }
    int64_t H = s->ndim == 3 ? s->shape[2] : 1;
    size_t per_node = per_row / ((size_t)T * H);
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            double acc = 0;
            size_t o = ((size_t)t * H + h) * per_node;
            for (size_t i = 0; i < per_node; i++) acc += (double)d[o + i] * g[o + i];
            s->v[((size_t)L * T + t) * H + h] = (float)acc;
        }
}

lp_status lp_attrib_atp(lp_model *m, const int32_t *clean, const int32_t *corrupted, int B, int T, const lp_metric *mt,
                        const lp_attrib_opts *o, lp_pair_result *res) {
    const lp_config *cf = lp_model_config(m);
    int nL = cf->n_layers;
    char list[1024];
    double *mc = malloc(B * sizeof(double)), *mx = malloc(B * sizeof(double));
    float **act_clean = calloc((size_t)LP_NODE_KINDS * nL, sizeof(float *));
    size_t *nn = calloc((size_t)LP_NODE_KINDS * nL, sizeof(size_t));
    lp_status st = mc && mx && act_clean && nn ? LP_OK : lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
    for (int b = 0; b < B; b++) memset(&res[b], 0, sizeof res[b]);
    lp_hooks_clear(m);
    if (st == LP_OK) st = capture_grid(m, o, list, sizeof list);
    /* the clean run: activations (and, for grad_at_clean, gradients) */
    if (st == LP_OK) st = o->grad_at_clean ? lp_model_grad(m, clean, B, T, mt, list, mc) : lp_model_metric(m, clean, B, T, mt, mc);
    float **grad_clean = o->grad_at_clean ? calloc((size_t)LP_NODE_KINDS * nL, sizeof(float *)) : NULL;
    for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++)
        for (int L = 0; st == LP_OK && wanted(o, k) && L < nL; L++) {
            st = grab(m, k, L, &act_clean[k * nL + L], &nn[k * nL + L]);
            if (st == LP_OK && grad_clean) {
                char name[128];
                lp_tensor g;
                snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
                st = lp_grad_get(m, name, &g);
                if (st == LP_OK && (grad_clean[k * nL + L] = malloc(nn[k * nL + L] * sizeof(float))))
                    memcpy(grad_clean[k * nL + L], g.data, nn[k * nL + L] * sizeof(float));
            }
        }
    /* the corrupted run: activations and gradients; integrated gradients average over the path */
    float **gsum = calloc((size_t)LP_NODE_KINDS * nL, sizeof(float *));
    float **act_corr = calloc((size_t)LP_NODE_KINDS * nL, sizeof(float *));
    int steps = o->ig_steps > 0 ? o->ig_steps : 1;
    float *emb_c = NULL, *emb_x = NULL, *emb = NULL;
    if (st == LP_OK && o->ig_steps > 0) { /* the input embeddings of both runs */
        lp_hooks_clear(m);
        size_t ne = (size_t)B * T * cf->d_model;
        emb_c = malloc(ne * sizeof(float)), emb_x = malloc(ne * sizeof(float)), emb = malloc(ne * sizeof(float));
        if (!emb_c || !emb_x || !emb) st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
        if (st == LP_OK) st = lp_hook_capture(m, "hook_embed", NULL, 0, NULL);
        if (st == LP_OK) st = lp_model_forward(m, clean, B, T, 0);
        if (st == LP_OK) st = lp_capture_read_f32(m, "hook_embed", emb_c, ne);
        if (st == LP_OK) st = lp_model_forward(m, corrupted, B, T, 0);
        if (st == LP_OK) st = lp_capture_read_f32(m, "hook_embed", emb_x, ne);
        lp_hooks_clear(m);
        if (st == LP_OK) st = capture_grid(m, o, list, sizeof list);
    }
    if (st == LP_OK && o->ig_steps <= 0) { /* one corrupted run: its activations and (unless at clean) its gradients */
        st = o->grad_at_clean ? lp_model_metric(m, corrupted, B, T, mt, mx) : lp_model_grad(m, corrupted, B, T, mt, list, mx);
        for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++)
            for (int L = 0; st == LP_OK && wanted(o, k) && L < nL; L++) {
                size_t n = nn[k * nL + L];
                st = grab(m, k, L, &act_corr[k * nL + L], &n);
                if (st != LP_OK || o->grad_at_clean) continue;
                char name[128];
                lp_tensor g;
                snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
                st = lp_grad_get(m, name, &g);
                if (st == LP_OK && !(gsum[k * nL + L] = malloc(n * sizeof(float)))) st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
                if (st == LP_OK) memcpy(gsum[k * nL + L], g.data, n * sizeof(float));
            }
    }
    /* integrated gradients: the corrupted prompt with its embedding moved alpha of the way to
     * the clean one, alpha at the midpoints of `steps` intervals, ig_batch steps per forward
     * (their B rows each side by side); the gradients averaged */
    int per = o->ig_batch > 0 ? o->ig_batch : steps;
    if (per > steps) per = steps;
    size_t ne1 = (size_t)B * T * cf->d_model;
    int32_t *rows = NULL, *rans = NULL, *rwr = NULL, *rpos = NULL;
    double *rmet = NULL;
    if (st == LP_OK && o->ig_steps > 0) {
        rows = malloc((size_t)per * B * T * sizeof(int32_t)), rmet = malloc((size_t)per * B * sizeof(double));
        rans = malloc((size_t)per * B * sizeof(int32_t)), rwr = malloc((size_t)per * B * sizeof(int32_t)), rpos = malloc((size_t)per * B * sizeof(int32_t));
        float *big = realloc(emb, (size_t)per * ne1 * sizeof(float));
        if (big) emb = big;
        if (!rows || !rmet || !rans || !rwr || !rpos || !big) st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
    }
    for (int s0 = 0; st == LP_OK && o->ig_steps > 0 && s0 < steps; s0 += per) {
        int sc = steps - s0 < per ? steps - s0 : per, R = sc * B;
        for (int j = 0; j < sc; j++) {
            double alpha = (s0 + j + 0.5) / steps;
            for (size_t i = 0; i < ne1; i++) emb[(size_t)j * ne1 + i] = (float)(emb_x[i] + alpha * (emb_c[i] - emb_x[i]));
            memcpy(rows + (size_t)j * B * T, corrupted, (size_t)B * T * sizeof(int32_t));
            for (int b = 0; b < B; b++) {
                rans[j * B + b] = mt->answer ? mt->answer[b] : 0, rwr[j * B + b] = mt->wrong ? mt->wrong[b] : 0;
                rpos[j * B + b] = mt->pos ? mt->pos[b] : T - 1;
            }
        }
        lp_metric rm = *mt;
        rm.answer = mt->answer ? rans : NULL, rm.wrong = mt->wrong ? rwr : NULL, rm.pos = rpos;
        lp_hooks_clear(m);
        lp_edit_spec e = {.kind = LP_EDIT_PATCH, .src = emb, .src_len = (size_t)sc * ne1};
        st = lp_hook_edit(m, "hook_embed", &e);
        if (st == LP_OK) st = lp_model_grad(m, rows, R, T, &rm, list, rmet);
        for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++)
            for (int L = 0; st == LP_OK && wanted(o, k) && L < nL; L++) {
                size_t n = nn[k * nL + L]; /* B rows */
                char name[128];
                lp_tensor g;
                snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
                st = lp_grad_get(m, name, &g);
                if (st == LP_OK && !gsum[k * nL + L] && !(gsum[k * nL + L] = calloc(n, sizeof(float))))
                    st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
                for (int j = 0; st == LP_OK && j < sc; j++) /* step j's B rows sit at rows j*B .. j*B+B-1 */
                    for (size_t i = 0; i < n; i++) gsum[k * nL + L][i] += ((const float *)g.data)[(size_t)j * n + i] / steps;
            }
    }
    free(rows), free(rmet), free(rans), free(rwr), free(rpos);
    if (st == LP_OK && o->ig_steps > 0) { /* the corrupted activations themselves, without the embedding moved */
        lp_hooks_clear(m);
        st = capture_grid(m, o, list, sizeof list);
        if (st == LP_OK) st = lp_model_metric(m, corrupted, B, T, mt, mx);
        for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++)
            for (int L = 0; st == LP_OK && wanted(o, k) && L < nL; L++) st = grab(m, k, L, &act_corr[k * nL + L], &nn[k * nL + L]);
    }
    /* scores: sum over each node of (clean - corrupted) * gradient */
    for (int b = 0; st == LP_OK && b < B; b++) {
        res[b].metric_clean = mc[b], res[b].metric_corrupted = mx[b];
        for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++) {
            if (!wanted(o, k)) continue;
            lp_node_scores *s = &res[b].s[k];
            node_shape(m, k, T, s);
            if (!(s->v = calloc(node_count(s), sizeof(float)))) st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
            for (int L = 0; st == LP_OK && L < nL; L++) {
                size_t n = nn[k * nL + L];
                float *diff = malloc(n * sizeof(float));
                if (!diff) {
                    st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
                    break;
                }
                for (size_t i = 0; i < n; i++) diff[i] = act_clean[k * nL + L][i] - act_corr[k * nL + L][i];
                node_sums(k, L, b, B, T, diff, grad_clean && o->ig_steps <= 0 ? grad_clean[k * nL + L] : gsum[k * nL + L], n, s);
                free(diff);
            }
        }
    }
    for (int i = 0; i < LP_NODE_KINDS * nL; i++) {
        if (act_clean) free(act_clean[i]);
        if (act_corr) free(act_corr[i]);
        if (gsum) free(gsum[i]);
        if (grad_clean) free(grad_clean[i]);
    }
    free(act_clean), free(act_corr), free(gsum), free(grad_clean), free(nn), free(mc), free(mx);
    free(emb_c), free(emb_x), free(emb);
    lp_hooks_clear(m);
    if (st != LP_OK)
        for (int b = 0; b < B; b++) lp_pair_result_free(&res[b]);
    return st;
}

/* ---- exact patching ---- */

lp_status lp_attrib_exact(lp_model *m, const int32_t *clean, const int32_t *corrupted, int T, const lp_metric *mt,
                          const lp_attrib_opts *o, lp_pair_result *res) {
    const lp_config *cf = lp_model_config(m);
    int nL = cf->n_layers, P = o->patch_batch > 0 ? o->patch_batch : 16;
    char list[1024];
    memset(res, 0, sizeof *res);
    double mc, mx;
    /* both runs' activations of the whole grid */
    lp_hooks_clear(m);
    LP_CHECK(capture_grid(m, o, list, sizeof list));
    float **ac = calloc((size_t)LP_NODE_KINDS * nL, sizeof(float *)), **ax = calloc((size_t)LP_NODE_KINDS * nL, sizeof(float *));
    size_t *nn = calloc((size_t)LP_NODE_KINDS * nL, sizeof(size_t));
    lp_status st = ac && ax && nn ? LP_OK : lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
    if (st == LP_OK) st = lp_model_metric(m, clean, 1, T, mt, &mc);
    for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++)
        for (int L = 0; st == LP_OK && wanted(o, k) && L < nL; L++) st = grab(m, k, L, &ac[k * nL + L], &nn[k * nL + L]);
    if (st == LP_OK) st = lp_model_metric(m, corrupted, 1, T, mt, &mx);
    for (int k = 0; st == LP_OK && k < LP_NODE_KINDS; k++)
        for (int L = 0; st == LP_OK && wanted(o, k) && L < nL; L++) st = grab(m, k, L, &ax[k * nL + L], &nn[k * nL + L]);
    lp_hooks_clear(m);
    res->metric_clean = mc, res->metric_corrupted = mx;
    /* P copies of the corrupted prompt, each with one node of one hook patched */
    int32_t *rows = malloc((size_t)P * T * sizeof(int32_t));
    double *met = malloc(P * sizeof(double));
    int32_t *ans = malloc(P * sizeof(int32_t)), *wr = malloc(P * sizeof(int32_t)), *pos = malloc(P * sizeof(int32_t));
    if (st == LP_OK && (!rows || !met || !ans || !wr || !pos)) st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
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
        if (!(s->v = calloc(node_count(s), sizeof(float)))) {
            st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
            break;
        }
        size_t per_layer = node_count(s) / nL;
        for (int L = 0; st == LP_OK && L < nL; L++) {
            size_t n = nn[k * nL + L]; /* one row's activation */
            const float *c1 = ac[k * nL + L], *x1 = ax[k * nL + L];
            float *src = malloc((size_t)P * n * sizeof(float));
            if (!src) {
                st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
                break;
            }
            char name[128];
            snprintf(name, sizeof name, "blocks.%d.%s", L, g_kind[k]);
            for (size_t j0 = 0; st == LP_OK && j0 < per_layer; j0 += P) {
                int nb = (int)(per_layer - j0 < (size_t)P ? per_layer - j0 : (size_t)P);
                for (int r = 0; r < nb; r++) { /* row r: corrupted, with node j0 + r clean */
                    float *d = src + (size_t)r * n;
                    memcpy(d, x1, n * sizeof(float));
                    size_t j = j0 + r;
                    if (k == LP_NODE_PATTERN) { /* head j: its [T, T] block */
                        size_t blk = n / s->shape[1];
                        memcpy(d + j * blk, c1 + j * blk, blk * sizeof(float));
                    } else {
                        int64_t H = s->ndim == 3 ? s->shape[2] : 1;
                        size_t per_node = n / ((size_t)T * H);
                        memcpy(d + j * per_node, c1 + j * per_node, per_node * sizeof(float)); /* node j = (t, h) in memory order */
                    }
                }
                lp_hooks_clear(m);
                lp_edit_spec e = {.kind = LP_EDIT_PATCH, .src = src, .src_len = (size_t)nb * n};
                st = lp_hook_edit(m, name, &e);
                if (st == LP_OK) st = lp_model_metric(m, rows, nb, T, &pm, met);
                for (int r = 0; st == LP_OK && r < nb; r++) s->v[L * per_layer + j0 + r] = (float)(met[r] - mx);
            }
            free(src);
        }
    }
    lp_hooks_clear(m);
    for (int i = 0; i < LP_NODE_KINDS * nL; i++) {
        if (ac) free(ac[i]);
        if (ax) free(ax[i]);
    }
    free(ac), free(ax), free(nn), free(rows), free(met), free(ans), free(wr), free(pos);
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
