/* clt.c: transcoder sets (per-layer and cross-layer, see clt.h): names, the config check,
 * the one allocation, the feature vectors, encode and decode through the dispatched ops
 * (so they run on the CPU and on CUDA alike). Files: clt_files.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/clt.h"
#include "loupe/ops.h"
#include "loupe/sae_ops.h"

static const char *const g_kind[] = {"per_layer", "cross_layer"};
static const char *const g_act[] = {"relu", "jumprelu", "topk"};

const char *lp_clt_kind_name(lp_clt_kind k) { return (unsigned)k < 2 ? g_kind[k] : "unknown"; }
const char *lp_clt_act_name(lp_clt_act a) { return (unsigned)a < 3 ? g_act[a] : "unknown"; }

int lp_clt_kind_parse(const char *s) {
    if (!s) return -1;
    if (!strcmp(s, "per_layer") || !strcmp(s, "transcoder_set") || !strcmp(s, "plt")) return LP_CLT_PER_LAYER;
    if (!strcmp(s, "cross_layer") || !strcmp(s, "cross_layer_transcoder") || !strcmp(s, "clt")) return LP_CLT_CROSS_LAYER;
    return -1;
}

int lp_clt_act_parse(const char *s) {
    if (!s) return -1;
    if (!strcmp(s, "jump_relu")) return LP_CLT_JUMPRELU; /* circuit-tracer's spelling */
    for (int i = 0; i < 3; i++)
        if (!strcmp(s, g_act[i])) return i;
    return -1;
}

static int str_ok(const char *s, size_t n) { return memchr(s, 0, n) != NULL; }

lp_status lp_clt_cfg_check(const lp_clt_cfg *c) {
    if (!c) LP_FAIL(LP_ERR_ARG, "transcoder config: NULL");
    if ((unsigned)c->kind > LP_CLT_CROSS_LAYER) LP_FAIL(LP_ERR_ARG, "transcoder config: kind %d unknown", (int)c->kind);
    if ((unsigned)c->act > LP_CLT_TOPK) LP_FAIL(LP_ERR_ARG, "transcoder config: activation %d unknown", (int)c->act);
    if (c->n_layers <= 0 || c->n_layers > 4096)
        LP_FAIL(LP_ERR_ARG, "transcoder config: n_layers = %d, must be in 1..4096", c->n_layers);
    if (c->d_model <= 0) LP_FAIL(LP_ERR_ARG, "transcoder config: d_model = %d, must be > 0", c->d_model);
    if (c->d_sae <= 0) LP_FAIL(LP_ERR_ARG, "transcoder config: d_sae = %d, must be > 0", c->d_sae);
    if (c->act == LP_CLT_TOPK && (c->k <= 0 || c->k > c->d_sae))
        LP_FAIL(LP_ERR_ARG, "transcoder config: k = %d, must be in 1..d_sae (%d) for topk", c->k, c->d_sae);
    if (c->skip != 0 && c->skip != 1) LP_FAIL(LP_ERR_ARG, "transcoder config: skip = %d, must be 0 or 1", c->skip);
    if (!str_ok(c->input_hook, sizeof c->input_hook) || !c->input_hook[0])
        LP_FAIL(LP_ERR_ARG, "transcoder config: feature_input_hook is empty or too long");
    if (!str_ok(c->output_hook, sizeof c->output_hook) || !c->output_hook[0])
        LP_FAIL(LP_ERR_ARG, "transcoder config: feature_output_hook is empty or too long");
    if (!str_ok(c->model_name, sizeof c->model_name) || !str_ok(c->scan, sizeof c->scan))
        LP_FAIL(LP_ERR_ARG, "transcoder config: model_name or scan is not NUL-terminated");
    /* the whole allocation in floats must fit comfortably (the CLT decoder is L(L+1)/2 S D) */
    double L = c->n_layers, D = c->d_model, S = c->d_sae;
    double outs = c->kind == LP_CLT_CROSS_LAYER ? L * (L + 1) / 2 : L;
    double n = L * (S * D + 2 * S + D + (c->skip ? D * D : 0)) + outs * S * D;
    if (n * sizeof(float) >= 0x1p60 || S * D >= 0x1p62)
        LP_FAIL(LP_ERR_ARG, "transcoder config: %g parameters do not fit in memory", n);
    return LP_OK;
}

int lp_clt_n_out(const lp_clt *t, int l) {
    if (!t || l < 0 || l >= t->cfg.n_layers) return 0;
    return t->cfg.kind == LP_CLT_CROSS_LAYER ? t->cfg.n_layers - l : 1;
}

lp_status lp_clt_alloc(lp_clt **out, const lp_clt_cfg *cfg, lp_ctx *c) {
    *out = NULL;
    LP_CHECK(lp_clt_cfg_check(cfg));
    lp_clt *t = calloc(1, sizeof *t);
    if (t) t->layer = calloc((size_t)cfg->n_layers, sizeof *t->layer);
    if (!t || !t->layer) {
        if (t) free(t);
        LP_FAIL(LP_ERR_OOM, "out of memory for a transcoder set");
    }
    t->cfg = *cfg, t->device = c->device;
    size_t D = cfg->d_model, S = cfg->d_sae, n = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        size_t no = (size_t)lp_clt_n_out(t, l);
        t->layer[l].n_out = (int)no;
        n += S * D + S + no * S * D + D + (cfg->act == LP_CLT_JUMPRELU ? S : 0) + (cfg->skip ? D * D : 0);
    }
    t->n_floats = n;
    lp_status st = lp_ctx_alloc(c, n * sizeof(float), &t->mem);
    if (st == LP_OK) st = lp_ctx_memset0(c, t->mem, n * sizeof(float));
    if (st != LP_OK) {
        free(t->layer), free(t);
        return st;
    }
    float *p = t->mem;
    for (int l = 0; l < cfg->n_layers; l++) {
        lp_clt_layer *y = &t->layer[l];
        y->W_enc = p, p += S * D;
        y->b_enc = p, p += S;
        y->W_dec = p, p += (size_t)y->n_out * S * D;
        y->b_dec = p, p += D;
        if (cfg->act == LP_CLT_JUMPRELU) y->threshold = p, p += S;
        if (cfg->skip) y->W_skip = p, p += D * D;
    }
    *out = t;
    return LP_OK;
}

void lp_clt_free(lp_clt *t, lp_ctx *c) {
    if (!t) return;
    if (t->mem) lp_ctx_release(c, t->mem);
    if (t->scratch) lp_ctx_release(c, t->scratch);
    free(t->layer);
    free(t);
}

const float *lp_clt_enc_vec(const lp_clt *t, int l, int f) {
    if (!t || l < 0 || l >= t->cfg.n_layers || f < 0 || f >= t->cfg.d_sae) return NULL;
    return t->layer[l].W_enc + (size_t)f * t->cfg.d_model;
}

const float *lp_clt_dec_vec(const lp_clt *t, int l, int f, int j) {
    if (!t || l < 0 || l >= t->cfg.n_layers || f < 0 || f >= t->cfg.d_sae) return NULL;
    int k = j - l;
    if (k < 0 || k >= t->layer[l].n_out) return NULL;
    return t->layer[l].W_dec + ((size_t)k * t->cfg.d_sae + f) * t->cfg.d_model;
}

/* TopK of each row of pre [N, S]: the k largest kept as they are (circuit-tracer's TopK,
 * x * gate, applies no relu: a chosen negative value stays), the rest zeroed, in place.
 * lp_sae_topk gives the indices; there is no scatter op, so each row is rebuilt on the host
 * from its own pre-activations. */
static lp_status topk_dense(lp_clt *t, lp_ctx *c, float *f, int N) {
    int S = t->cfg.d_sae, K = t->cfg.k;
    size_t nk = (size_t)N * K;
    void *dev = NULL;
    int32_t *hidx = malloc(nk * sizeof *hidx);
    float *hpre = malloc((size_t)S * sizeof *hpre), *hrow = malloc((size_t)S * sizeof *hrow);
    lp_status st = hidx && hpre && hrow ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory for topk");
    if (st == LP_OK) st = lp_ctx_alloc(c, nk * 8, &dev);
    int32_t *didx = dev;
    float *dval = dev ? (float *)(didx + nk) : NULL;
    if (st == LP_OK) st = lp_sae_topk(c, didx, dval, f, N, S, K);
    if (st == LP_OK) st = lp_ctx_to_host(c, hidx, didx, nk * 4);
    for (int n = 0; st == LP_OK && n < N; n++) {
        st = lp_ctx_to_host(c, hpre, f + (size_t)n * S, (size_t)S * 4);
        memset(hrow, 0, (size_t)S * sizeof *hrow);
        for (int j = 0; j < K; j++) hrow[hidx[(size_t)n * K + j]] = hpre[hidx[(size_t)n * K + j]];
        if (st == LP_OK) st = lp_ctx_to_device(c, f + (size_t)n * S, hrow, (size_t)S * 4);
    }
    if (dev) lp_ctx_release(c, dev);
    free(hidx), free(hpre), free(hrow);
    return st;
}

lp_status lp_clt_encode(lp_clt *t, lp_ctx *c, int l, const float *x, int N, float *f, int pre_only) {
    if (!t || l < 0 || l >= t->cfg.n_layers || N < 0) LP_FAIL(LP_ERR_ARG, "transcoder encode: layer %d or N %d out of range", l, N);
    if (c->device != t->device) LP_FAIL(LP_ERR_ARG, "transcoder encode: the context's device is not the transcoder's");
    if (N == 0) return LP_OK;
    const lp_clt_layer *y = &t->layer[l];
    int D = t->cfg.d_model, S = t->cfg.d_sae;
    LP_CHECK(lp_matmul(c, f, x, y->W_enc, y->b_enc, N, D, S, 1));
    if (pre_only) return LP_OK;
    switch (t->cfg.act) {
    case LP_CLT_RELU: return lp_sae_relu(c, f, f, (size_t)N * S);
    case LP_CLT_JUMPRELU: return lp_sae_jumprelu(c, f, f, y->threshold, N, S);
    case LP_CLT_TOPK: return topk_dense(t, c, f, N);
    }
    return LP_OK;
}

static lp_status scratch(lp_clt *t, lp_ctx *c, size_t bytes, float **out) {
    if (t->scratch_bytes < bytes) {
        if (t->scratch) lp_ctx_release(c, t->scratch);
        t->scratch = NULL, t->scratch_bytes = 0;
        LP_CHECK(lp_ctx_alloc(c, bytes, &t->scratch));
        t->scratch_bytes = bytes;
    }
    *out = t->scratch;
    return LP_OK;
}

lp_status lp_clt_decode(lp_clt *t, lp_ctx *c, int j, const float *const *f, const float *x_j, int N, float *out) {
    if (!t || j < 0 || j >= t->cfg.n_layers || N < 0) LP_FAIL(LP_ERR_ARG, "transcoder decode: layer %d or N %d out of range", j, N);
    if (c->device != t->device) LP_FAIL(LP_ERR_ARG, "transcoder decode: the context's device is not the transcoder's");
    if (t->cfg.skip && !x_j) LP_FAIL(LP_ERR_ARG, "transcoder decode: layer %d has a skip connection but no input was given", j);
    if (N == 0) return LP_OK;
    int D = t->cfg.d_model, S = t->cfg.d_sae;
    size_t nd = (size_t)N * D;
    float *tmp;
    LP_CHECK(scratch(t, c, nd * sizeof(float), &tmp));
    /* out = b_dec_j: zero, then 0 * b_dec + b_dec */
    LP_CHECK(lp_ctx_memset0(c, out, nd * sizeof(float)));
    LP_CHECK(lp_affine(c, out, out, t->layer[j].b_dec, t->layer[j].b_dec, N, D));
    int l0 = t->cfg.kind == LP_CLT_CROSS_LAYER ? 0 : j;
    for (int l = l0; l <= j; l++) {
        if (!f || !f[l]) continue;
        const float *W = t->layer[l].W_dec + (size_t)(j - l) * S * D;
        LP_CHECK(lp_matmul(c, tmp, f[l], W, NULL, N, S, D, 0));
        LP_CHECK(lp_add(c, out, out, tmp, nd));
    }
    if (t->cfg.skip) {
        LP_CHECK(lp_matmul(c, tmp, x_j, t->layer[j].W_skip, NULL, N, D, D, 1));
        LP_CHECK(lp_add(c, out, out, tmp, nd));
    }
    return LP_OK;
}

lp_status lp_clt_hook_name(const lp_clt *t, int l, int which, char *buf, size_t n) {
    if (!t || !buf || l < 0 || l >= t->cfg.n_layers) LP_FAIL(LP_ERR_ARG, "transcoder hook: layer %d out of range", l);
    const char *h = which ? t->cfg.output_hook : t->cfg.input_hook;
    if (!strcmp(h, "mlp.hook_out")) h = "hook_mlp_out";
    int k = snprintf(buf, n, "blocks.%d.%s", l, h);
    if (k < 0 || (size_t)k >= n) LP_FAIL(LP_ERR_ARG, "transcoder hook: the name of layer %d's hook is too long", l);
    return LP_OK;
}
