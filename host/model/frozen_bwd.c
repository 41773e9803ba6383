/* frozen_bwd.c: the batched backward of the local replacement model (frozen.h). */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/frozen_internal.h"

/* g * w / scale per position (w NULL: 1; LayerNorm: centred after), added into dst. */
static void norm_back_add(const lp_config *c, float *dst, const float *g, const float *w, const float *s, int R, int Tm) {
    int D = c->d_model;
    for (int r = 0; r < R; r++)
        for (int t = 0; t < Tm; t++) {
            const float *gi = g + ((size_t)r * Tm + t) * D;
            float *di = dst + ((size_t)r * Tm + t) * D;
            double mu = 0;
            if (c->norm == LP_NORM_LAYER) {
                for (int i = 0; i < D; i++) mu += (double)gi[i] * (w ? w[i] : 1.0f) / s[t];
                mu /= D;
            }
            for (int i = 0; i < D; i++) di[i] += (float)((double)gi[i] * (w ? w[i] : 1.0f) / s[t] - mu);
        }
}

/* A post-norm's backward (RMS, Gemma), into dst: g * w / scale. */
static void post_norm_back(const lp_config *c, float *dst, const float *g, const float *w, const float *s, int R, int Tm) {
    int D = c->d_model;
    for (int r = 0; r < R; r++)
        for (int t = 0; t < Tm; t++)
            for (int i = 0; i < D; i++) {
                size_t k = ((size_t)r * Tm + t) * D + i;
                dst[k] = (float)((double)g[k] * w[i] / s[t]);
            }
}

/* Rows [i0, i1) of one head's pattern, each over the keys it sees: the masked softmax of the
 * scores sgemm left there, soft-capped (Gemma 2); max and exponent in float, the sum in
 * double. Entries outside the causal window are zeroed. */
static void softmax_rows(float *P, int Tm, int ld, int i0, int i1, int win, float capv) {
    for (int i = i0; i < i1; i++) {
        float *p = P + (size_t)i * ld;
        int lo = win > 0 && i - win + 1 > 0 ? i - win + 1 : 0; /* keys i - win < j <= i */
        float mx = -INFINITY;
        double sum = 0;
        for (int j = lo; j <= i; j++) {
            if (capv > 0) p[j] = capv * tanhf(p[j] / capv);
            if (p[j] > mx) mx = p[j];
        }
        for (int j = lo; j <= i; j++) sum += (p[j] = expf(p[j] - mx));
        float inv = (float)(1.0 / sum);
        for (int j = lo; j <= i; j++) p[j] *= inv;
        memset(p, 0, (size_t)lo * sizeof(float));
        memset(p + i + 1, 0, (size_t)(Tm - i - 1) * sizeof(float));
    }
}

/* The causal softmax pattern of every head of layer L over the first Tm positions into P,
 * [H, ld, ld] (Tm <= ld): scaled scores, soft-capped (Gemma 2), inside the layer's window if local.
 * The scores come from sgemm (Q_h K_g^T per head, g its key/value group) a block of query
 * rows at a time, each over only the keys its rows can see, so the masked half of the
 * square is neither multiplied nor exponentiated. */
#define PAT_ROWS 128
static void patterns(const lp_frozen *f, const fz_layer *y, int L, int Tm, float *Pall, int ld) {
    const lp_config *c = &f->c;
    int win = lp_config_local(c, L) ? c->sliding_window : 0;
    int H = c->n_heads, dh = c->d_head, rep = c->n_heads / c->n_kv_heads;
    int qd = H * dh, kvd = c->n_kv_heads * dh;
    float sc = (float)(c->attn_scale > 0 ? c->attn_scale : 1.0 / sqrt((double)dh));
    for (int h = 0; h < H; h++) {
        float *P = Pall + (size_t)h * ld * ld;
        const float *q = y->q + (size_t)h * dh, *k = y->k + (size_t)(h / rep) * dh;
        for (int i0 = 0; i0 < Tm; i0 += PAT_ROWS) {
            int i1 = i0 + PAT_ROWS < Tm ? i0 + PAT_ROWS : Tm;
            int j0 = win > 0 && i0 - win + 1 > 0 ? i0 - win + 1 : 0; /* the block's first visible key */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, i1 - i0, i1 - j0, dh, sc, q + (size_t)i0 * qd, qd,
                        k + (size_t)j0 * kvd, kvd, 0.0f, P + (size_t)i0 * ld + j0, ld);
            softmax_rows(P, Tm, ld, i0, i1, win, c->attn_softcap);
        }
    }
}

/* One row's value-path gradient for head h: gv[j] += sum_i P[i, j] gz[i] over the Tr
 * positions the row reaches (its G is zero past its own position: the backward only flows
 * to earlier tokens), a block of query rows at a time, each over only the keys those rows
 * see (the pattern is zero above its diagonal and outside the window). */
static void value_back(const float *P, int ld, const float *gz, int qd, float *gv, int kvd, int dh, int Tr, int win) {
    for (int i0 = 0; i0 < Tr; i0 += PAT_ROWS) {
        int i1 = i0 + PAT_ROWS < Tr ? i0 + PAT_ROWS : Tr;
        int j0 = win > 0 && i0 - win + 1 > 0 ? i0 - win + 1 : 0;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, i1 - j0, dh, i1 - i0, 1.0f, P + (size_t)i0 * ld + j0, ld,
                    gz + (size_t)i0 * qd, qd, 1.0f, gv + (size_t)j0 * kvd, kvd);
    }
}

/* gh = the gradient at the attention's input (the first norm's output) from G at its output,
 * through W_O, the frozen pattern and W_V. */
static void attn_back(const lp_frozen *f, const fz_layer *y, int L, const float *G, float *gz, float *gv, float *gh, int R, int Tm,
                      const int *pos) {
    const lp_config *c = &f->c;
    int D = c->d_model, H = c->n_heads, dh = c->d_head, rep = c->n_heads / c->n_kv_heads;
    int qd = H * dh, kvd = c->n_kv_heads * dh, N = R * Tm, win = lp_config_local(c, L) ? c->sliding_window : 0;
    /* trans: W_O [D, qd] (out = z W_O^T), W_V [kvd, D] (v = x W_V^T); else the transposes */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, f->trans ? CblasNoTrans : CblasTrans, N, qd, D, 1.0f, G, D, y->W_O,
                f->trans ? qd : D, 0.0f, gz, qd);
    memset(gv, 0, (size_t)N * kvd * sizeof(float));
    const float *P = y->pat; /* cached: [H, T, T], the prefix a top-left block */
    int ld = f->T;
    if (!P) patterns(f, y, L, Tm, f->pattern, Tm), P = f->pattern, ld = Tm;
    for (int r = 0; r < R; r++)
        for (int h = 0; h < H; h++)
            value_back(P + (size_t)h * ld * ld, ld, gz + (size_t)r * Tm * qd + (size_t)h * dh, qd,
                       gv + (size_t)r * Tm * kvd + (size_t)(h / rep) * dh, kvd, dh, pos[r] + 1, win);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, f->trans ? CblasNoTrans : CblasTrans, N, D, kvd, 1.0f, gv, kvd, y->W_V,
                f->trans ? D : kvd, 0.0f, gh, D);
}

static void inject(const lp_frozen *f, float *g, int L, int R, int Tm, const int *layer, const int *pos, const float *vec) {
    int D = f->c.d_model;
    for (int r = 0; r < R; r++)
        if (layer[r] == L)
            for (int i = 0; i < D; i++) g[((size_t)r * Tm + pos[r]) * D + i] += vec[(size_t)r * D + i];
}

size_t lp_frozen_pattern_bytes(const lp_config *c, int T) {
    return (size_t)c->n_layers * c->n_heads * T * T * sizeof(float);
}

lp_status lp_frozen_cache_patterns(lp_frozen *f) {
    size_t n = (size_t)f->c.n_heads * f->T * f->T;
    for (int L = 0; L < f->c.n_layers; L++) {
        fz_layer *y = &f->lay[L];
        if (y->pat) continue;
        float *p = malloc(n * sizeof(float));
        if (!p) LP_FAIL(LP_ERR_OOM, "out of memory for layer %d's cached attention patterns (%zu bytes)", L, n * sizeof(float));
        patterns(f, y, L, f->T, p, f->T);
        y->pat = p;
    }
    return LP_OK;
}

lp_status lp_frozen_backward(lp_frozen *f, int R, const int *layer, const int *pos, const float *vec,
                             const float *const *skip, lp_frozen_sink sink, void *user) {
    const lp_config *c = &f->c;
    int D = c->d_model, NL = c->n_layers, Tm = 0, Lmax = -1;
    for (int r = 0; r < R; r++) {
        if (layer[r] < 0 || layer[r] > NL || pos[r] < 0 || pos[r] >= f->T)
            LP_FAIL(LP_ERR_ARG, "row %d: (layer %d, pos %d) is outside the model's %d layers and %d tokens", r, layer[r], pos[r], NL, f->T);
        if (pos[r] + 1 > Tm) Tm = pos[r] + 1;
        if (layer[r] > Lmax) Lmax = layer[r];
    }
    if (R < 1) return LP_OK;
    size_t n = (size_t)R * Tm, qd = (size_t)c->n_heads * c->d_head, wide = qd > (size_t)D ? qd : (size_t)D;
    float *G = calloc(n * D, sizeof(float)), *g2 = malloc(n * D * sizeof(float));
    float *gz = malloc(n * wide * sizeof(float)), *gv = malloc(n * wide * sizeof(float));
    /* the gradient past a post-norm (Gemma): at the MLP's own output, or the attention's */
    float *gp = c->post_norms ? malloc(n * D * sizeof(float)) : NULL;
    lp_status st = G && g2 && gz && gv && (gp || !c->post_norms) ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory for a backward of %d rows", R);
    if (st == LP_OK && Lmax == NL) { /* logit directions at the final norm's output */
        memset(g2, 0, n * D * sizeof(float));
        inject(f, g2, NL, R, Tm, layer, pos, vec);
        norm_back_add(c, G, g2, f->lnf_w, f->lnf_s, R, Tm);
    }
    for (int L = (Lmax < NL ? Lmax : NL - 1); L >= 0 && st == LP_OK; L--) {
        const fz_layer *y = &f->lay[L];
        const float *Go = G; /* the gradient at the transcoders' output site */
        if (c->post_norms && f->sites.output_before_post_norm) {
            post_norm_back(c, gp, G, y->ln2p_w, y->ln2p_s, R, Tm);
            Go = gp;
        }
        if (L < Lmax) st = sink(L, Go, R, Tm, user);
        if (st != LP_OK) break;
        /* the MLP's input: through the skip (if any) and what is injected there */
        if (L < Lmax && skip && skip[L])
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, D, D, 1.0f, Go, D, skip[L], D, 0.0f, g2, D);
        else
            memset(g2, 0, n * D * sizeof(float));
        inject(f, g2, L, R, Tm, layer, pos, vec);
        norm_back_add(c, G, g2, f->sites.input_normalized ? NULL : y->ln2_w, y->ln2_s, R, Tm);
        if (c->post_norms) post_norm_back(c, gp, G, y->ln1p_w, y->ln1p_s, R, Tm);
        attn_back(f, y, L, c->post_norms ? gp : G, gz, gv, g2, R, Tm, pos);
        norm_back_add(c, G, g2, y->ln1_w, y->ln1_s, R, Tm);
    }
    if (st == LP_OK) st = sink(-1, G, R, Tm, user);
    free(G), free(g2), free(gz), free(gv), free(gp);
    return st;
}
