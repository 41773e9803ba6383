/* host/analysis/: analyses above model/, store/ and sae/: the logit lens and direct logit
 * attribution (lens*.c), linear probes (probe*.c), feature dashboards (dashboard*.c).
 *
 * lens.c: the logit lens and direct logit attribution of one prompt at one position (lens.h).
 * One forward captures the residual stream's parts at the position; everything after it is
 * a few vectors of d_model, computed on the host in double, except the lens's unembedding
 * ([2L+1, d_model] x [d_model, d_vocab], one OpenBLAS GEMM in F32). */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "analysis/lens_internal.h"
#include "model/model_internal.h"

/* Host F32 view of weight `name`: the model's own on a CPU F32 model, else a copy.
 * *w = NULL when the model has no such weight (a bias it does not have). */
static lp_status weight(lp_lens_ctx *lx, const char *name, float **w) {
    lp_model *m = lx->m;
    *w = NULL;
    int idx = -1;
    for (int i = 0; i < m->w.n && idx < 0; i++)
        if (strcmp(m->w.params[i].name, name) == 0) idx = i;
    if (idx < 0 || !param_ptr(m, idx)) return LP_OK;
    const param *p = &m->w.params[idx];
    size_t n = (size_t)p->shape[0] * (p->ndim == 2 ? (size_t)p->shape[1] : 1);
    lp_ctx *c = &m->ctx;
    if (c->device == LP_CPU && c->dtype == LP_F32) {
        *w = param_ptr(m, idx);
        return LP_OK;
    }
    float *h = malloc(n * sizeof *h);
    void *raw = c->dtype == LP_F32 ? (void *)h : malloc(n * act_elem_bytes(m));
    lp_status st = h && raw ? LP_OK : LP_ERR(LP_ERR_OOM, "lens: out of memory for %s", name);
    if (st == LP_OK) st = lp_ctx_to_host(c, raw, param_ptr(m, idx), n * act_elem_bytes(m));
    if (st == LP_OK && raw != h) st = lp_convert_host(h, LP_F32, raw, c->dtype, n);
    if (raw != h) free(raw);
    if (st != LP_OK) {
        free(h);
        return st;
    }
    lx->owned[lx->n_owned++] = h;
    *w = h;
    return LP_OK;
}

lp_status lp_lens_open(lp_lens_ctx **out, lp_model *m) {
    *out = NULL;
    const lp_config *c = &m->cfg;
    /* the lens reads heads through W_O and the logits as ln_final(x) W_U: a post-norm or a
     * final soft-cap (Gemma) breaks both */
    if (c->post_norms || c->final_softcap > 0)
        LP_FAIL(LP_ERR_ARG, "lens: %s normalizes each block's output (post-norms)%s; the lens's decomposition does not hold there",
                c->name, c->final_softcap > 0 ? " and soft-caps its logits" : "");
    lp_lens_ctx *lx = calloc(1, sizeof *lx);
    if (!lx) LP_FAIL(LP_ERR_OOM, "lens: out of memory");
    lx->m = m;
    lx->layer_norm = c->norm == LP_NORM_LAYER, lx->wo_trans = m->w.trans;
    lx->W_O = calloc(c->n_layers, sizeof *lx->W_O);
    lx->b_O = calloc(c->n_layers, sizeof *lx->b_O);
    lx->owned = calloc(2 * (size_t)c->n_layers + 3, sizeof *lx->owned);
    lp_status st = lx->W_O && lx->b_O && lx->owned ? LP_OK : LP_ERR(LP_ERR_OOM, "lens: out of memory");
    if (st == LP_OK) st = weight(lx, m->w.params[m->w.unembed].name, &lx->W_U);
    if (st == LP_OK) st = weight(lx, "ln_final.w", &lx->lnw);
    if (st == LP_OK && lx->layer_norm) st = weight(lx, "ln_final.b", &lx->lnb);
    char nm[96];
    for (int l = 0; st == LP_OK && l < c->n_layers; l++) {
        snprintf(nm, sizeof nm, "blocks.%d.attn.W_O", l);
        st = weight(lx, nm, &lx->W_O[l]);
        if (st == LP_OK && !lx->W_O[l]) st = LP_ERR(LP_ERR_INTERNAL, "lens: the model has no %s", nm);
        snprintf(nm, sizeof nm, "blocks.%d.attn.b_O", l);
        if (st == LP_OK) st = weight(lx, nm, &lx->b_O[l]);
    }
    if (st == LP_OK && (!lx->W_U || !lx->lnw)) st = LP_ERR(LP_ERR_INTERNAL, "lens: the model has no unembedding or final norm");
    if (st != LP_OK) {
        lp_lens_close(lx);
        return st;
    }
    *out = lx;
    return LP_OK;
}

void lp_lens_close(lp_lens_ctx *lx) {
    if (!lx) return;
    for (int i = 0; i < lx->n_owned; i++) free(lx->owned[i]);
    free(lx->owned), free(lx->W_O), free(lx->b_O);
    free(lx);
}

/* ---- what one forward captures at the position ---- */

typedef lens_acts acts;

static lp_status capture_at(lp_model *m, int pos, int has_pos_embed) {
    static const char *const globs[] = {"hook_embed", "blocks.*.hook_resid_pre", "blocks.*.hook_resid_mid", "blocks.*.hook_attn_out",
                                        "blocks.*.hook_mlp_out", "blocks.*.attn.hook_z", "ln_final.hook_scale"};
    for (size_t i = 0; i < sizeof globs / sizeof *globs; i++) LP_CHECK(lp_hook_capture(m, globs[i], &pos, 1, NULL));
    if (has_pos_embed) LP_CHECK(lp_hook_capture(m, "hook_pos_embed", &pos, 1, NULL));
    char nm[64];
    snprintf(nm, sizeof nm, "blocks.%d.hook_resid_post", m->cfg.n_layers - 1);
    return lp_hook_capture(m, nm, &pos, 1, NULL);
}

static lp_status read_layers(lp_model *m, const char *kind, float *dst, size_t per) {
    char nm[96];
    for (int l = 0; l < m->cfg.n_layers; l++) {
        snprintf(nm, sizeof nm, "blocks.%d.%s", l, kind);
        LP_CHECK(lp_capture_read_f32(m, nm, dst + (size_t)l * per, per));
    }
    return LP_OK;
}

static lp_status read_acts(lp_model *m, int has_pos_embed, acts *a) {
    size_t D = m->cfg.d_model, L = m->cfg.n_layers, qD = (size_t)m->cfg.n_heads * m->cfg.d_head;
    char nm[64];
    LP_CHECK(lp_capture_read_f32(m, "hook_embed", a->embed, D));
    if (has_pos_embed) LP_CHECK(lp_capture_read_f32(m, "hook_pos_embed", a->pos_embed, D));
    snprintf(nm, sizeof nm, "blocks.%zu.hook_resid_post", L - 1);
    LP_CHECK(lp_capture_read_f32(m, nm, a->final, D));
    LP_CHECK(lp_capture_read_f32(m, "ln_final.hook_scale", &a->scale, 1));
    LP_CHECK(read_layers(m, "hook_resid_pre", a->pre, D));
    LP_CHECK(read_layers(m, "hook_resid_mid", a->mid, D));
    LP_CHECK(read_layers(m, "hook_attn_out", a->attn, D));
    LP_CHECK(read_layers(m, "hook_mlp_out", a->mlp, D));
    return read_layers(m, "attn.hook_z", a->z, qD);
}

/* ---- the final norm ---- */

/* The cached mode: centred (LayerNorm) and divided by the run's scale. */
static void norm_cached(const lp_lens_ctx *lx, const float *x, double scale, double *y, int D) {
    double mu = 0;
    if (lx->layer_norm) {
        for (int d = 0; d < D; d++) mu += x[d];
        mu /= D;
    }
    for (int d = 0; d < D; d++) y[d] = (x[d] - mu) / scale;
}

/* The recomputed mode: LayerNormPre or RMSNormPre of x alone. */
static void norm_recomputed(const lp_lens_ctx *lx, const float *x, double *y, int D) {
    double mu = 0, ss = 0;
    if (lx->layer_norm) {
        for (int d = 0; d < D; d++) mu += x[d];
        mu /= D;
    }
    for (int d = 0; d < D; d++) ss += (x[d] - mu) * (x[d] - mu);
    double s = sqrt(ss / D + lx->m->cfg.ln_eps);
    for (int d = 0; d < D; d++) y[d] = (x[d] - mu) / s;
}

static void normalise(const lp_lens_ctx *lx, int mode, const float *x, double scale, double *y, int D) {
    if (mode == LP_LENS_CACHED) norm_cached(lx, x, scale, y, D);
    else norm_recomputed(lx, x, y, D);
}

static double dot(const double *a, const double *b, int D) {
    double s = 0;
    for (int d = 0; d < D; d++) s += a[d] * b[d];
    return s;
}

/* ---- results ---- */

void lp_lens_free(lp_lens *r) {
    for (int k = 0; k < LP_LENS_MODES; k++) {
        free(r->lens_metric[k]), free(r->lens_prob[k]), free(r->lens_rank[k]), free(r->top_ids[k]), free(r->top_prob[k]);
        free(r->lens_logits[k]), free(r->comp[k]), free(r->head[k]), free(r->bias[k]);
    }
    free(r->resid), free(r->comp_ln), free(r->head_ln), free(r->stack_have);
    memset(r, 0, sizeof *r);
}

static lp_status alloc_result(lp_lens *r, int keep_logits) {
    size_t S = r->n_stack, K = r->top_k, D = r->d_model, LH = (size_t)r->n_layers * r->n_heads;
    int ok = 1;
#define ALLOC(p, n) ok &= ((p) = calloc((size_t)(n) + 1, sizeof *(p))) != NULL /* + 1: never a zero-size calloc */
    for (int k = 0; k < LP_LENS_MODES; k++) {
        ALLOC(r->lens_metric[k], S), ALLOC(r->lens_prob[k], S), ALLOC(r->lens_rank[k], S);
        ALLOC(r->top_ids[k], S * K), ALLOC(r->top_prob[k], S * K);
        if (keep_logits) ALLOC(r->lens_logits[k], S * r->d_vocab);
        ALLOC(r->comp[k], (size_t)r->n_comp), ALLOC(r->head[k], LH), ALLOC(r->bias[k], (size_t)r->n_layers);
    }
    ALLOC(r->resid, S * D), ALLOC(r->comp_ln, (size_t)r->n_comp * D), ALLOC(r->head_ln, LH * D), ALLOC(r->stack_have, S);
#undef ALLOC
    if (!ok) LP_FAIL(LP_ERR_OOM, "lens: out of memory");
    return LP_OK;
}

/* Indices of the k largest of x[0..n), by falling value (ties: the lower index first). */
static int by_value_desc(const void *a, const void *b, void *xs) {
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    float x = ((const float *)xs)[i], y = ((const float *)xs)[j];
    return x > y ? -1 : x < y ? 1 : (i > j) - (i < j);
}
static lp_status top_k(const float *x, int n, int k, int32_t *ids) {
    if (k == 0) return LP_OK;
    if (k <= 32) { /* insertion into a short sorted list */
        int have = 0;
        for (int i = 0; i < n; i++) {
            if (have == k && !(x[i] > x[ids[k - 1]])) continue;
            int j = have < k ? have++ : k - 1;
            for (; j > 0 && x[i] > x[ids[j - 1]]; j--) ids[j] = ids[j - 1];
            ids[j] = i;
        }
        return LP_OK;
    }
    int32_t *all = malloc((size_t)n * sizeof *all);
    if (!all) LP_FAIL(LP_ERR_OOM, "lens: out of memory");
    for (int i = 0; i < n; i++) all[i] = i;
    qsort_r(all, n, sizeof *all, by_value_desc, (void *)x);
    memcpy(ids, all, (size_t)k * sizeof *ids);
    free(all);
    return LP_OK;
}

/* ---- the logit lens ---- */

/* Entry i of the accumulated residual stream: 0_pre, 0_mid, 1_pre, ..., final_post. */
static const float *stack_entry(const lp_lens *r, const acts *a, int i) {
    if (i == r->n_stack - 1) return a->final;
    return (i % 2 ? a->mid : a->pre) + (size_t)(i / 2) * r->d_model;
}

/* One row of lens logits: the metric, the answer's probability and rank, the top tokens. */
static lp_status lens_row(lp_lens *r, int mode, int i, const float *row) {
    int V = r->d_vocab, K = r->top_k;
    double mx = row[0], z = 0;
    for (int v = 1; v < V; v++) mx = row[v] > mx ? row[v] : mx;
    for (int v = 0; v < V; v++) z += exp(row[v] - mx);
    int rank = 0;
    for (int v = 0; v < V; v++) rank += row[v] > row[r->answer];
    r->lens_metric[mode][i] = row[r->answer] - (r->wrong >= 0 ? row[r->wrong] : 0.0f);
    r->lens_prob[mode][i] = (float)(exp(row[r->answer] - mx) / z);
    r->lens_rank[mode][i] = rank;
    int32_t *ids = r->top_ids[mode] + (size_t)i * K;
    LP_CHECK(top_k(row, V, K, ids));
    for (int k = 0; k < K; k++) r->top_prob[mode][(size_t)i * K + k] = (float)(exp(row[ids[k]] - mx) / z);
    return LP_OK;
}

/* A lens row the input could not give: NaN, rank and top ids -1. */
static void lens_row_missing(lp_lens *r, int mode, int i, float *logits) {
    r->lens_metric[mode][i] = r->lens_prob[mode][i] = NAN;
    r->lens_rank[mode][i] = -1;
    for (int k = 0; k < r->top_k; k++) r->top_ids[mode][(size_t)i * r->top_k + k] = -1, r->top_prob[mode][(size_t)i * r->top_k + k] = NAN;
    for (int v = 0; v < r->d_vocab; v++) logits[v] = NAN;
}

/* Whether lens entry i can be read in this mode. */
static int entry_ok(const acts *a, int mode, int i) {
    return (mode == LP_LENS_RECOMPUTED || a->have_scale) && (!a->stack_have || a->stack_have[i]);
}

/* x normalised in this mode, through the final norm's weight and bias, into Y [D] (F32). */
static void through_norm(const lp_lens_ctx *lx, int mode, const float *x, double scale, double *y, float *Y, int D) {
    normalise(lx, mode, x, scale, y, D);
    for (int d = 0; d < D; d++) Y[d] = (float)(y[d] * lx->lnw[d] + (lx->lnb ? lx->lnb[d] : 0.0));
}

lp_status lens_final_logits(const lp_lens_ctx *lx, const lens_acts *a, float *logits) {
    int D = lx->m->cfg.d_model, mode = a->have_scale ? LP_LENS_CACHED : LP_LENS_RECOMPUTED;
    double *y = malloc((size_t)D * sizeof *y);
    float *Y = malloc((size_t)D * sizeof *Y);
    if (!y || !Y) {
        free(y), free(Y);
        LP_FAIL(LP_ERR_OOM, "lens: out of memory");
    }
    through_norm(lx, mode, a->final, a->scale, y, Y, D);
    cblas_sgemv(CblasRowMajor, CblasNoTrans, lx->m->cfg.d_vocab, D, 1.0f, lx->W_U, D, Y, 1, 0.0f, logits, 1);
    free(y), free(Y);
    return LP_OK;
}

/* Each entry normalised, through the final norm's weight and bias, then W_U. */
static lp_status logit_lens(const lp_lens_ctx *lx, const acts *a, lp_lens *r) {
    int D = r->d_model, V = r->d_vocab, S = r->n_stack;
    float *Y = malloc((size_t)S * D * sizeof *Y), *logits = malloc((size_t)S * V * sizeof *logits);
    double *y = malloc((size_t)D * sizeof *y);
    lp_status st = Y && logits && y ? LP_OK : LP_ERR(LP_ERR_OOM, "lens: out of memory");
    for (int i = 0; st == LP_OK && i < S; i++) {
        r->stack_have[i] = !a->stack_have || a->stack_have[i];
        if (r->stack_have[i]) memcpy(r->resid + (size_t)i * D, stack_entry(r, a, i), (size_t)D * sizeof(float));
        else
            for (int d = 0; d < D; d++) r->resid[(size_t)i * D + d] = NAN;
    }
    for (int mode = 0; st == LP_OK && mode < LP_LENS_MODES; mode++) {
        for (int i = 0; i < S; i++) {
            if (entry_ok(a, mode, i)) through_norm(lx, mode, stack_entry(r, a, i), a->scale, y, Y + (size_t)i * D, D);
            else memset(Y + (size_t)i * D, 0, (size_t)D * sizeof *Y);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, S, V, D, 1.0f, Y, D, lx->W_U, D, 0.0f, logits, V);
        for (int i = 0; st == LP_OK && i < S; i++) {
            if (entry_ok(a, mode, i)) st = lens_row(r, mode, i, logits + (size_t)i * V);
            else lens_row_missing(r, mode, i, logits + (size_t)i * V);
        }
        if (r->lens_logits[mode]) memcpy(r->lens_logits[mode], logits, (size_t)S * V * sizeof *logits);
    }
    free(Y), free(logits), free(y);
    return st;
}

/* ---- direct logit attribution ---- */

/* Head h's output at the position: z_h W_O[h] ([d_head] x [d_head, d_model]). */
static void head_result(const lp_lens_ctx *lx, const acts *a, int l, int h, float *out) {
    const lp_config *c = &lx->m->cfg;
    int D = c->d_model, dh = c->d_head, qD = c->n_heads * dh;
    const float *z = a->z + (size_t)l * qD + (size_t)h * dh, *W = lx->W_O[l];
    for (int d = 0; d < D; d++) {
        double s = 0;
        for (int e = 0; e < dh; e++) s += (double)z[e] * (lx->wo_trans ? W[(size_t)d * qD + h * dh + e] : W[(size_t)(h * dh + e) * D + d]);
        out[d] = (float)s;
    }
}

/* Attributions of n vectors vec[n, D] in both modes; the cached-mode normalised vectors
 * into ln[n, D] when wanted. */
static void attribute(const lp_lens_ctx *lx, const acts *a, int have, const double *dir, const float *vec, int n, float *attr[LP_LENS_MODES],
                      float *ln, double *y, int D) {
    for (int mode = 0; mode < LP_LENS_MODES; mode++)
        for (int i = 0; i < n; i++) {
            int ok = have && (mode == LP_LENS_RECOMPUTED || a->have_scale);
            if (ok) normalise(lx, mode, vec + (size_t)i * D, a->scale, y, D);
            attr[mode][i] = ok ? (float)dot(y, dir, D) : NAN;
            if (ln && mode == LP_LENS_CACHED)
                for (int d = 0; d < D; d++) ln[(size_t)i * D + d] = ok ? (float)y[d] : NAN;
        }
}

/* The stacks: decompose_resid's components, the heads, the b_O of each layer. */
static void build_stacks(const lp_lens_ctx *lx, const acts *a, const lp_lens *r, float *comp, float *heads, float *bias) {
    size_t D = r->d_model, k = 0;
    if (a->have_comp) {
        memcpy(comp + D * k++, a->embed, D * sizeof(float));
        if (r->has_pos_embed) memcpy(comp + D * k++, a->pos_embed, D * sizeof(float));
    }
    for (int l = 0; l < r->n_layers; l++) {
        if (a->have_comp) {
            memcpy(comp + D * k++, a->attn + D * l, D * sizeof(float));
            memcpy(comp + D * k++, a->mlp + D * l, D * sizeof(float));
        }
        for (int h = 0; a->have_heads && h < r->n_heads; h++) head_result(lx, a, l, h, heads + D * ((size_t)l * r->n_heads + h));
        for (size_t d = 0; d < D; d++) bias[D * l + d] = lx->b_O[l] ? lx->b_O[l][d] : 0.0f;
    }
}

static lp_status attribution(const lp_lens_ctx *lx, const acts *a, lp_lens *r) {
    int D = r->d_model, L = r->n_layers, LH = L * r->n_heads, n_embed = r->has_pos_embed ? 2 : 1;
    double *dir = malloc((size_t)D * sizeof *dir), *y = malloc((size_t)D * sizeof *y);
    float *comp = malloc((size_t)r->n_comp * D * sizeof *comp), *heads = malloc((size_t)LH * D * sizeof *heads);
    float *bias = malloc((size_t)L * D * sizeof *bias);
    if (!dir || !y || !comp || !heads || !bias) {
        free(dir), free(y), free(comp), free(heads), free(bias);
        LP_FAIL(LP_ERR_OOM, "lens: out of memory");
    }
    const float *ua = lx->W_U + (size_t)r->answer * D, *uw = r->wrong >= 0 ? lx->W_U + (size_t)r->wrong * D : NULL;
    r->unembed_bias = 0;
    for (int d = 0; d < D; d++) {
        double u = (double)ua[d] - (uw ? uw[d] : 0.0);
        dir[d] = lx->lnw[d] * u;
        if (lx->lnb) r->unembed_bias += lx->lnb[d] * u;
    }
    build_stacks(lx, a, r, comp, heads, bias);
    attribute(lx, a, a->have_comp, dir, comp, r->n_comp, r->comp, r->comp_ln, y, D);
    attribute(lx, a, a->have_heads, dir, heads, LH, r->head, r->head_ln, y, D);
    attribute(lx, a, a->have_heads, dir, bias, L, r->bias, NULL, y, D);
    /* the two identities of the cached mode */
    double s_comp = r->unembed_bias, s_head = r->unembed_bias;
    for (int i = 0; i < r->n_comp; i++) s_comp += r->comp[LP_LENS_CACHED][i];
    for (int i = 0; i < n_embed; i++) s_head += r->comp[LP_LENS_CACHED][i];
    for (int l = 0; l < L; l++) s_head += r->comp[LP_LENS_CACHED][n_embed + 2 * l + 1] + r->bias[LP_LENS_CACHED][l];
    for (int i = 0; i < LH; i++) s_head += r->head[LP_LENS_CACHED][i];
    r->comp_sum_err = fabs(s_comp - r->metric);
    r->head_sum_err = fabs(s_head - r->metric);
    free(dir), free(y), free(comp), free(heads), free(bias);
    return LP_OK;
}

/* ---- one prompt ---- */

static lp_status check_opts(const lp_config *c, const int32_t *tokens, int T, const lp_lens_opts *o) {
    if (T < 1 || T > c->n_ctx) LP_FAIL(LP_ERR_ARG, "lens: the prompt is %d tokens; it must be 1 to the model's context of %d", T, c->n_ctx);
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= c->d_vocab) LP_FAIL(LP_ERR_ARG, "lens: tokens[%d] = %d is not in [0, %d)", t, tokens[t], c->d_vocab);
    if (o->pos < -1 || o->pos >= T) LP_FAIL(LP_ERR_ARG, "lens: position %d is outside the prompt of %d tokens", o->pos, T);
    if (o->answer < -1 || o->answer >= c->d_vocab) LP_FAIL(LP_ERR_ARG, "lens: answer %d is not a token id in [0, %d)", o->answer, c->d_vocab);
    if (o->wrong < -1 || o->wrong >= c->d_vocab) LP_FAIL(LP_ERR_ARG, "lens: wrong answer %d is not a token id in [0, %d)", o->wrong, c->d_vocab);
    if (o->top_k < 0 || o->top_k > c->d_vocab) LP_FAIL(LP_ERR_ARG, "lens: top_k %d is not in [0, %d]", o->top_k, c->d_vocab);
    return LP_OK;
}

/* The forward and its captures at the position; the model's hooks are cleared around it. */
static lp_status run_forward(lp_model *m, const int32_t *tokens, int T, const lp_lens *r, acts *a) {
    lp_hooks_clear(m);
    lp_status st = capture_at(m, r->pos, r->has_pos_embed);
    if (st == LP_OK) st = lp_model_forward(m, tokens, 1, T, LP_WANT_LOGITS);
    if (st == LP_OK) st = read_acts(m, r->has_pos_embed, a);
    lp_hooks_clear(m);
    return st;
}

void lens_header(const lp_lens_ctx *lx, int T, const lp_lens_opts *o, lp_lens *r) {
    const lp_config *c = &lx->m->cfg;
    *r = (lp_lens){.n_layers = c->n_layers, .n_heads = c->n_heads, .d_model = c->d_model, .d_vocab = c->d_vocab, .T = T,
                   .pos = o->pos < 0 ? T - 1 : o->pos, .top_k = o->top_k, .answer = o->answer, .wrong = o->wrong,
                   .answer_given = o->answer >= 0, .n_stack = 2 * c->n_layers + 1,
                   .has_pos_embed = lp_hook_find(lx->m, "hook_pos_embed") >= 0};
    r->n_comp = (r->has_pos_embed ? 2 : 1) + 2 * c->n_layers;
}

lp_status lens_acts_alloc(const lp_lens_ctx *lx, lens_acts *a) {
    const lp_config *c = &lx->m->cfg;
    size_t D = c->d_model, L = c->n_layers, qD = (size_t)c->n_heads * c->d_head;
    float *buf = calloc((3 + 4 * L) * D + L * qD, sizeof *buf);
    if (!buf) LP_FAIL(LP_ERR_OOM, "lens: out of memory");
    *a = (lens_acts){.embed = buf, .pos_embed = buf + D, .final = buf + 2 * D, .pre = buf + 3 * D, .have_scale = 1, .have_comp = 1, .have_heads = 1};
    a->mid = a->pre + L * D, a->attn = a->mid + L * D, a->mlp = a->attn + L * D, a->z = a->mlp + L * D;
    return LP_OK;
}

void lens_pick(lp_lens *r, const float *row) {
    if (r->answer < 0) /* the run's own top token */
        for (int v = r->answer = 0; v < r->d_vocab; v++) r->answer = row[v] > row[r->answer] ? v : r->answer;
    r->metric = (double)row[r->answer] - (r->wrong >= 0 ? row[r->wrong] : 0.0);
}

lp_status lens_compute(const lp_lens_ctx *lx, const lens_acts *a, int keep_logits, lp_lens *r) {
    r->have_scale = a->have_scale, r->have_comp = a->have_comp, r->have_heads = a->have_heads;
    lp_status st = alloc_result(r, keep_logits);
    if (st == LP_OK) st = logit_lens(lx, a, r);
    if (st == LP_OK) st = attribution(lx, a, r);
    if (st == LP_OK && (!a->have_comp || !a->have_scale)) r->comp_sum_err = NAN;
    if (st == LP_OK && (!a->have_comp || !a->have_heads || !a->have_scale)) r->head_sum_err = NAN;
    return st;
}

lp_status lp_lens_run(lp_lens_ctx *lx, const int32_t *tokens, int T, const lp_lens_opts *o, lp_lens *r) {
    memset(r, 0, sizeof *r);
    lp_model *m = lx->m;
    LP_CHECK(check_opts(&m->cfg, tokens, T, o));
    lens_header(lx, T, o, r);
    acts a;
    LP_CHECK(lens_acts_alloc(lx, &a));
    lp_status st = run_forward(m, tokens, T, r, &a);
    if (st == LP_OK) lens_pick(r, lp_model_logits(m) + (size_t)r->pos * m->cfg.d_vocab);
    if (st == LP_OK) st = lens_compute(lx, &a, o->keep_logits, r);
    free(a.embed);
    if (st != LP_OK) lp_lens_free(r);
    return st;
}

/* ---- labels ---- */

const char *lp_lens_stack_label(const lp_lens *r, int i, char *buf, size_t n) {
    if (i == r->n_stack - 1) snprintf(buf, n, "final_post");
    else snprintf(buf, n, "%d_%s", i / 2, i % 2 ? "mid" : "pre");
    return buf;
}

const char *lp_lens_comp_label(const lp_lens *r, int i, char *buf, size_t n) {
    int n_embed = r->has_pos_embed ? 2 : 1;
    if (i < n_embed) snprintf(buf, n, "%s", i ? "pos_embed" : "embed");
    else snprintf(buf, n, "%d_%s", (i - n_embed) / 2, (i - n_embed) % 2 ? "mlp_out" : "attn_out");
    return buf;
}

const char *lp_lens_head_label(const lp_lens *r, int i, char *buf, size_t n) {
    snprintf(buf, n, "L%dH%d", i / r->n_heads, i % r->n_heads);
    return buf;
}
