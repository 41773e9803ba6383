/* frozen_dev.c: the replacement model's backward on a CUDA device (frozen_dev.h). The
 * frozen model (norm weights and scales, W_V, W_O, rotated q and k) and the scratch of one
 * row block live in one device allocation, carved by layout() so that the bytes the plan
 * states are the bytes allocated. Per layer and block: the patterns' scores by one strided
 * GEMM per key/value head group and a causal softmax, the value path by one GEMM batched
 * over the rows per head, the norms' backward and the injections by small kernels. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/frozen_dev.h"
#include "model/frozen_internal.h"
#include "ops/graph_ops.h"

typedef struct fz_dev_layer {
    float *ln1_w, *ln2_w, *ln1_s, *ln2_s, *W_V, *W_O, *q, *k;
    float *ln1p_w, *ln2p_w, *ln1p_s, *ln2p_s; /* the post-norms (Gemma); NULL without */
} fz_dev_layer;

struct fz_dev {
    lp_ctx *c;
    const lp_frozen *f;
    int R;
    void *mem;
    fz_dev_layer *lay;
    float *lnf_w, *lnf_s;
    float *G, *g2, *gz, *gv, *P, *vec; /* one block: [R, T, D] x2, [R, T, wide] x2, [H, T, T], [R, D] */
    float *gp;                        /* [R, T, D] past a post-norm (Gemma); NULL without */
    int *layer, *pos;                 /* [R] */
};

/* Carves n floats (256-byte aligned) from *at; with base NULL it only counts. */
static float *carve(char *base, size_t *at, size_t n) {
    float *p = base ? (float *)(base + *at) : NULL;
    *at += (n * sizeof(float) + 255) / 256 * 256;
    return p;
}

/* The one layout: fills d's pointers when base is set; returns the bytes. */
static size_t layout(const lp_config *c, int T, int R, char *base, fz_dev *d) {
    size_t D = c->d_model, qd = (size_t)c->n_heads * c->d_head, kvd = (size_t)c->n_kv_heads * c->d_head, at = 0;
    size_t wide = qd > D ? qd : D, n = (size_t)R * T;
    fz_dev_layer scratch;
    for (int L = 0; L < c->n_layers; L++) {
        fz_dev_layer *y = d ? &d->lay[L] : &scratch;
        y->ln1_w = carve(base, &at, D), y->ln2_w = carve(base, &at, D);
        y->ln1_s = carve(base, &at, T), y->ln2_s = carve(base, &at, T);
        y->W_V = carve(base, &at, kvd * D), y->W_O = carve(base, &at, qd * D);
        y->q = carve(base, &at, (size_t)T * qd), y->k = carve(base, &at, (size_t)T * kvd);
        y->ln1p_w = y->ln2p_w = y->ln1p_s = y->ln2p_s = NULL;
        if (c->post_norms) {
            y->ln1p_w = carve(base, &at, D), y->ln2p_w = carve(base, &at, D);
            y->ln1p_s = carve(base, &at, T), y->ln2p_s = carve(base, &at, T);
        }
    }
    fz_dev tmp;
    fz_dev *e = d ? d : &tmp;
    e->lnf_w = carve(base, &at, D), e->lnf_s = carve(base, &at, T);
    e->G = carve(base, &at, n * D), e->g2 = carve(base, &at, n * D);
    e->gz = carve(base, &at, n * wide), e->gv = carve(base, &at, n * wide);
    e->P = carve(base, &at, (size_t)c->n_heads * T * T);
    e->vec = carve(base, &at, (size_t)R * D);
    e->layer = (int *)carve(base, &at, R), e->pos = (int *)carve(base, &at, R);
    e->gp = c->post_norms ? carve(base, &at, n * D) : NULL;
    return at;
}

size_t fz_dev_bytes(const lp_config *c, int T, int R) { return layout(c, T, R, NULL, NULL); }

static lp_status upload(fz_dev *d) {
    const lp_frozen *f = d->f;
    const lp_config *c = &f->c;
    size_t D = c->d_model, qd = (size_t)c->n_heads * c->d_head, kvd = (size_t)c->n_kv_heads * c->d_head, T = f->T;
    for (int L = 0; L < c->n_layers; L++) {
        const fz_layer *h = &f->lay[L];
        fz_dev_layer *y = &d->lay[L];
        LP_CHECK(lp_ctx_to_device(d->c, y->ln1_w, h->ln1_w, D * 4));
        LP_CHECK(lp_ctx_to_device(d->c, y->ln2_w, h->ln2_w, D * 4));
        LP_CHECK(lp_ctx_to_device(d->c, y->ln1_s, h->ln1_s, T * 4));
        LP_CHECK(lp_ctx_to_device(d->c, y->ln2_s, h->ln2_s, T * 4));
        LP_CHECK(lp_ctx_to_device(d->c, y->W_V, h->W_V, kvd * D * 4));
        LP_CHECK(lp_ctx_to_device(d->c, y->W_O, h->W_O, qd * D * 4));
        LP_CHECK(lp_ctx_to_device(d->c, y->q, h->q, T * qd * 4));
        LP_CHECK(lp_ctx_to_device(d->c, y->k, h->k, T * kvd * 4));
        if (c->post_norms) {
            LP_CHECK(lp_ctx_to_device(d->c, y->ln1p_w, h->ln1p_w, D * 4));
            LP_CHECK(lp_ctx_to_device(d->c, y->ln2p_w, h->ln2p_w, D * 4));
            LP_CHECK(lp_ctx_to_device(d->c, y->ln1p_s, h->ln1p_s, T * 4));
            LP_CHECK(lp_ctx_to_device(d->c, y->ln2p_s, h->ln2p_s, T * 4));
        }
    }
    LP_CHECK(lp_ctx_to_device(d->c, d->lnf_w, f->lnf_w, D * 4));
    return lp_ctx_to_device(d->c, d->lnf_s, f->lnf_s, T * 4);
}

lp_status fz_dev_new(fz_dev **out, const lp_frozen *f, lp_ctx *c, int R) {
    *out = NULL;
    if (c->device != LP_CUDA || c->dtype != LP_F32) LP_FAIL(LP_ERR_ARG, "graph.device: the device backward needs a CUDA F32 context");
    if (R < 1) LP_FAIL(LP_ERR_ARG, "graph.batch: %d rows per block (at least 1)", R);
    fz_dev *d = calloc(1, sizeof *d);
    if (!d || !(d->lay = calloc(f->c.n_layers, sizeof *d->lay))) {
        free(d);
        LP_FAIL(LP_ERR_OOM, "out of memory for the device replacement model");
    }
    d->c = c, d->f = f, d->R = R;
    size_t bytes = layout(&f->c, f->T, R, NULL, NULL);
    lp_status st = lp_ctx_alloc(c, bytes, &d->mem);
    if (st == LP_OK) {
        layout(&f->c, f->T, R, d->mem, d);
        st = upload(d);
    }
    if (st != LP_OK) {
        fz_dev_free(d);
        return st;
    }
    *out = d;
    return LP_OK;
}

void fz_dev_free(fz_dev *d) {
    if (!d) return;
    if (d->mem) lp_ctx_release(d->c, d->mem);
    free(d->lay);
    free(d);
}

/* The gradient at the attention's input (g2) from Gin at its output: W_O, the frozen
 * patterns of the first Tm positions (soft-capped, windowed on local layers), W_V; as
 * frozen_bwd.c's attn_back. The q/k norms are inside the stored q and k. */
static lp_status attn_back(fz_dev *d, const fz_dev_layer *y, int L, const float *Gin, int R, int Tm) {
    const lp_config *c = &d->f->c;
    int D = c->d_model, H = c->n_heads, dh = c->d_head, Hkv = c->n_kv_heads, rep = H / Hkv, tr = d->f->trans;
    int qd = H * dh, kvd = Hkv * dh, N = R * Tm;
    float sc = (float)(c->attn_scale > 0 ? c->attn_scale : 1.0 / sqrt((double)dh));
    size_t TT = (size_t)Tm * Tm;
    LP_CHECK(cuda_fz_gemm(d->c, 0, !tr, N, qd, D, 1.0f, Gin, D, 0, y->W_O, tr ? qd : D, 0, 0.0f, d->gz, qd, 0, 1));
    for (int g = 0; g < Hkv; g++) /* the scores of the rep heads reading key/value head g */
        LP_CHECK(cuda_fz_gemm(d->c, 0, 1, Tm, Tm, dh, sc, y->q + (size_t)g * rep * dh, qd, dh, y->k + (size_t)g * dh, kvd, 0, 0.0f,
                              d->P + (size_t)g * rep * TT, Tm, (long long)TT, rep));
    LP_CHECK(cuda_fz_causal_softmax(d->c, d->P, H * Tm, Tm, lp_config_local(c, L) ? c->sliding_window : 0, c->attn_softcap));
    LP_CHECK(lp_ctx_memset0(d->c, d->gv, (size_t)N * kvd * 4));
    for (int h = 0; h < H; h++) /* gv[r, :, h / rep] += P_h^T gz[r, :, h], batched over the rows */
        LP_CHECK(cuda_fz_gemm(d->c, 1, 0, Tm, dh, Tm, 1.0f, d->P + (size_t)h * TT, Tm, 0, d->gz + (size_t)h * dh, qd,
                              (long long)Tm * qd, 1.0f, d->gv + (size_t)(h / rep) * dh, kvd, (long long)Tm * kvd, R));
    return cuda_fz_gemm(d->c, 0, !tr, N, D, kvd, 1.0f, d->gv, kvd, 0, y->W_V, tr ? D : kvd, 0, 0.0f, d->g2, D, 0, 1);
}

/* gp = G * w / scale: a post-norm's backward (RMS, Gemma), as frozen_bwd.c's post_norm_back. */
static lp_status post_norm_back(fz_dev *d, const float *w, const float *s, int R, int Tm) {
    LP_CHECK(lp_ctx_memset0(d->c, d->gp, (size_t)R * Tm * d->f->c.d_model * 4));
    return cuda_fz_norm_back_add(d->c, d->gp, d->G, w, s, R, Tm, d->f->c.d_model, 0);
}

lp_status fz_dev_backward(fz_dev *d, int R, const int *layer, const int *pos, const float *vec, const float *const *skip,
                          fz_dev_sink sink, void *user) {
    const lp_frozen *f = d->f;
    const lp_config *c = &f->c;
    int D = c->d_model, NL = c->n_layers, Tm = 0, Lmax = -1, centre = c->norm == LP_NORM_LAYER;
    if (R > d->R) LP_FAIL(LP_ERR_ARG, "graph: a block of %d rows on a device backward sized for %d", R, d->R);
    for (int r = 0; r < R; r++) {
        if (layer[r] < 0 || layer[r] > NL || pos[r] < 0 || pos[r] >= f->T)
            LP_FAIL(LP_ERR_ARG, "row %d: (layer %d, pos %d) is outside the model's %d layers and %d tokens", r, layer[r], pos[r], NL, f->T);
        if (pos[r] + 1 > Tm) Tm = pos[r] + 1;
        if (layer[r] > Lmax) Lmax = layer[r];
    }
    if (R < 1) return LP_OK;
    size_t n = (size_t)R * Tm;
    LP_CHECK(lp_ctx_to_device(d->c, d->layer, layer, (size_t)R * sizeof(int)));
    LP_CHECK(lp_ctx_to_device(d->c, d->pos, pos, (size_t)R * sizeof(int)));
    LP_CHECK(lp_ctx_to_device(d->c, d->vec, vec, (size_t)R * D * 4));
    LP_CHECK(lp_ctx_memset0(d->c, d->G, n * D * 4));
    if (Lmax == NL) { /* logit directions at the final norm's output */
        LP_CHECK(lp_ctx_memset0(d->c, d->g2, n * D * 4));
        LP_CHECK(cuda_fz_inject(d->c, d->g2, NL, R, Tm, D, d->layer, d->pos, d->vec));
        LP_CHECK(cuda_fz_norm_back_add(d->c, d->G, d->g2, d->lnf_w, d->lnf_s, R, Tm, D, centre));
    }
    for (int L = (Lmax < NL ? Lmax : NL - 1); L >= 0; L--) {
        const fz_dev_layer *y = &d->lay[L];
        const float *Go = d->G; /* the gradient at the transcoders' output site */
        if (c->post_norms && f->sites.output_before_post_norm) {
            LP_CHECK(post_norm_back(d, y->ln2p_w, y->ln2p_s, R, Tm));
            Go = d->gp;
        }
        if (L < Lmax) LP_CHECK(sink(L, Go, R, Tm, user));
        if (L < Lmax && skip && skip[L])
            LP_CHECK(cuda_fz_gemm(d->c, 0, 0, (int)n, D, D, 1.0f, Go, D, 0, skip[L], D, 0, 0.0f, d->g2, D, 0, 1));
        else
            LP_CHECK(lp_ctx_memset0(d->c, d->g2, n * D * 4));
        LP_CHECK(cuda_fz_inject(d->c, d->g2, L, R, Tm, D, d->layer, d->pos, d->vec));
        LP_CHECK(cuda_fz_norm_back_add(d->c, d->G, d->g2, f->sites.input_normalized ? NULL : y->ln2_w, y->ln2_s, R, Tm, D, centre));
        if (c->post_norms) LP_CHECK(post_norm_back(d, y->ln1p_w, y->ln1p_s, R, Tm));
        LP_CHECK(attn_back(d, y, L, c->post_norms ? d->gp : d->G, R, Tm));
        LP_CHECK(cuda_fz_norm_back_add(d->c, d->G, d->g2, y->ln1_w, y->ln1_s, R, Tm, D, centre));
    }
    return sink(-1, d->G, R, Tm, user);
}
