/* frozen.c: the local replacement model's backward (frozen.h). One forward captures what the
 * linear backward needs (norm scales, rotated q and k for the patterns, the MLPs' inputs and
 * outputs); the backward then runs R injected rows at once on the host with BLAS: per layer
 * the attention's value path under the recomputed (frozen) pattern and the frozen norms. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/frozen_internal.h"

size_t lp_frozen_bytes(const lp_config *c, int T) {
    size_t D = c->d_model, qd = (size_t)c->n_heads * c->d_head, kvd = (size_t)c->n_kv_heads * c->d_head;
    size_t per = 5 * D + 2 * kvd * D + qd * D + 4 * (size_t)T + (size_t)T * (qd + kvd) + 2 * (size_t)T * D;
    return 4 * (c->n_layers * per + D + T + (size_t)c->d_vocab * (D + 1) + (size_t)T * D +
                (size_t)c->n_heads * T * T);
}

size_t lp_frozen_backward_bytes(const lp_config *c, int T, int R) {
    size_t qd = (size_t)c->n_heads * c->d_head, D = c->d_model;
    return 4 * (size_t)R * T * ((c->post_norms ? 3 : 2) * D + 2 * (qd > D ? qd : D));
}

static lp_status check_model(const lp_model *m) {
    const lp_config *c = &m->cfg;
    if (m->ctx.dtype != LP_F32) /* a CUDA model's forward runs there; what it keeps is copied to the host */
        LP_FAIL(LP_ERR_ARG, "model: the replacement model needs an F32 model (model.dtype = f32)");
    if (c->linear_bias || c->qkv_bias) LP_FAIL(LP_ERR_ARG, "model: %s: biased projections are not supported here", c->name);
    return LP_OK;
}

static float *grab(lp_model *m, int idx, lp_status *st) {
    if (*st != LP_OK) return NULL;
    const param *p = &m->w.params[idx];
    size_t n = (size_t)p->shape[0] * (p->ndim == 2 ? (size_t)p->shape[1] : 1);
    float *d = malloc(n * sizeof(float));
    if (!d) *st = LP_ERR(LP_ERR_OOM, "out of memory for %s", p->name);
    else *st = param_to_f32(m, idx, d);
    return d;
}

static float *cap(lp_model *m, const char *fmt, int L, size_t n, lp_status *st) {
    if (*st != LP_OK) return NULL;
    char name[96];
    snprintf(name, sizeof name, fmt, L);
    float *d = malloc(n * sizeof(float));
    if (!d) *st = LP_ERR(LP_ERR_OOM, "out of memory for %s", name);
    else *st = lp_capture_read_f32(m, name, d, n);
    return d;
}

/* The norm's output after its weight (w NULL: before it), from its input and captured scale
 * (LayerNorm centres). */
static void norm_out(const lp_config *c, float *y, const float *x, const float *s, const float *w, const float *b, int T) {
    int D = c->d_model;
    for (int t = 0; t < T; t++) {
        double mu = 0;
        if (c->norm == LP_NORM_LAYER)
            for (int i = 0; i < D; i++) mu += x[(size_t)t * D + i];
        mu /= D;
        for (int i = 0; i < D; i++)
            y[(size_t)t * D + i] = (float)((x[(size_t)t * D + i] - mu) / s[t]) * (w ? w[i] : 1.0f) + (b ? b[i] : 0.0f);
    }
}

static lp_status capture_all(lp_model *m, const int32_t *tokens, int T) {
    int last = T - 1, rot = lp_hook_find(m, "blocks.0.attn.hook_rot_q") >= 0, post = m->cfg.post_norms;
    const char *names[] = {"blocks.*.ln1.hook_scale", "blocks.*.ln2.hook_scale", "blocks.*.hook_resid_mid",
                           "blocks.*.hook_mlp_out", rot ? "blocks.*.attn.hook_rot_q" : "blocks.*.attn.hook_q",
                           rot ? "blocks.*.attn.hook_rot_k" : "blocks.*.attn.hook_k", "ln_final.hook_scale",
                           "blocks.*.ln1_post.hook_scale", "blocks.*.ln2_post.hook_scale", "blocks.*.ln2_post.hook_normalized"};
    size_t n = sizeof names / sizeof *names - (post ? 0 : 3);
    lp_hooks_clear(m);
    for (size_t i = 0; i < n; i++) LP_CHECK(lp_hook_capture(m, names[i], NULL, 0, NULL));
    char top[64];
    snprintf(top, sizeof top, "blocks.%d.hook_resid_post", m->cfg.n_layers - 1);
    LP_CHECK(lp_hook_capture(m, top, &last, 1, NULL));
    return lp_model_forward(m, tokens, 1, T, 0);
}

/* Layer L's MLP output at the transcoders' write site: hook_mlp_out, or before a post-norm
 * the norm's input, its normalised value times its scale. */
static float *mlp_output(const lp_frozen *f, lp_model *m, int L, lp_status *st) {
    size_t D = f->c.d_model, T = f->T;
    if (!f->c.post_norms || !f->sites.output_before_post_norm) return cap(m, "blocks.%d.hook_mlp_out", L, T * D, st);
    float *y = cap(m, "blocks.%d.ln2_post.hook_normalized", L, T * D, st);
    for (size_t t = 0; y && *st == LP_OK && t < T; t++)
        for (size_t i = 0; i < D; i++) y[t * D + i] *= f->lay[L].ln2p_s[t];
    return y;
}

static lp_status fill(lp_frozen *f, lp_model *m, int T) {
    const lp_config *c = &f->c;
    size_t D = c->d_model, qd = (size_t)c->n_heads * c->d_head, kvd = (size_t)c->n_kv_heads * c->d_head;
    int rot = lp_hook_find(m, "blocks.0.attn.hook_rot_q") >= 0;
    lp_status st = LP_OK;
    for (int L = 0; L < c->n_layers && st == LP_OK; L++) {
        fz_layer *y = &f->lay[L];
        y->ln1_w = grab(m, layer_weight_idx(m, L, W_LN1), &st);
        y->ln2_w = grab(m, layer_weight_idx(m, L, W_LN2), &st);
        y->ln2_b = m->w.params[layer_weight_idx(m, L, W_LN2_B)].shape[0] ? grab(m, layer_weight_idx(m, L, W_LN2_B), &st) : NULL;
        y->W_V = grab(m, layer_weight_idx(m, L, W_V), &st);
        y->W_O = grab(m, layer_weight_idx(m, L, W_O), &st);
        y->ln1_s = cap(m, "blocks.%d.ln1.hook_scale", L, T, &st);
        y->ln2_s = cap(m, "blocks.%d.ln2.hook_scale", L, T, &st);
        y->q = cap(m, rot ? "blocks.%d.attn.hook_rot_q" : "blocks.%d.attn.hook_q", L, T * qd, &st);
        y->k = cap(m, rot ? "blocks.%d.attn.hook_rot_k" : "blocks.%d.attn.hook_k", L, T * kvd, &st);
        if (c->post_norms) {
            y->ln1p_w = grab(m, layer_weight_idx(m, L, W_LN1P), &st);
            y->ln2p_w = grab(m, layer_weight_idx(m, L, W_LN2P), &st);
            y->ln1p_s = cap(m, "blocks.%d.ln1_post.hook_scale", L, T, &st);
            y->ln2p_s = cap(m, "blocks.%d.ln2_post.hook_scale", L, T, &st);
        }
        y->mlp_out = mlp_output(f, m, L, &st);
        float *mid = cap(m, "blocks.%d.hook_resid_mid", L, T * D, &st);
        y->mlp_in = st == LP_OK ? malloc((size_t)T * D * sizeof(float)) : NULL;
        if (st == LP_OK && !y->mlp_in) st = LP_ERR(LP_ERR_OOM, "out of memory for the MLP inputs");
        if (st == LP_OK && f->sites.input_normalized) norm_out(c, y->mlp_in, mid, y->ln2_s, NULL, NULL, T);
        else if (st == LP_OK) norm_out(c, y->mlp_in, mid, y->ln2_s, y->ln2_w, y->ln2_b, T);
        free(mid);
    }
    LP_CHECK(st);
    f->lnf_w = grab(m, m->w.lnf_w, &st);
    f->lnf_s = cap(m, "ln_final.hook_scale", 0, T, &st);
    f->W_U = grab(m, m->w.unembed, &st);
    char top[64];
    snprintf(top, sizeof top, "blocks.%d.hook_resid_post", c->n_layers - 1);
    float *xr = cap(m, top, 0, D, &st);
    f->embed = malloc((size_t)T * D * sizeof(float));
    f->logits = malloc((size_t)c->d_vocab * sizeof(float));
    float *fo = malloc(D * sizeof(float));
    if (st == LP_OK && (!f->embed || !f->logits || !fo)) st = LP_ERR(LP_ERR_OOM, "out of memory for the logits");
    if (st == LP_OK) {
        norm_out(c, fo, xr, f->lnf_s + T - 1, f->lnf_w, NULL, 1);
        if (m->w.lnf_b >= 0) {
            float *b = grab(m, m->w.lnf_b, &st);
            for (size_t i = 0; b && i < D; i++) fo[i] += b[i];
            free(b);
        }
        cblas_sgemv(CblasRowMajor, CblasNoTrans, c->d_vocab, (int)D, 1.0f, f->W_U, (int)D, fo, 1, 0.0f, f->logits, 1);
        if (c->final_softcap > 0) /* the logits the targets are chosen from are the model's, capped */
            for (int v = 0; v < c->d_vocab; v++) f->logits[v] = c->final_softcap * tanhf(f->logits[v] / c->final_softcap);
    }
    free(xr);
    free(fo);
    return st;
}

/* The prompt's embeddings as the residual stream gets them: rows times the scale. Tied
 * models take them from the unembedding already on the host; others read only the T rows
 * (never the whole [V, D] matrix a second time). */
static lp_status embed_rows(lp_frozen *f, lp_model *m, const int32_t *tokens) {
    size_t D = f->c.d_model;
    float scale = f->c.embed_scale > 0 ? f->c.embed_scale : 1.0f;
    const char *E = param_ptr(m, m->w.embed); /* F32 (check_model) */
    for (int t = 0; t < f->T; t++) {
        float *row = f->embed + (size_t)t * D;
        if (m->w.embed == m->w.unembed) memcpy(row, f->W_U + (size_t)tokens[t] * D, D * sizeof(float));
        else LP_CHECK(lp_ctx_to_host(&m->ctx, row, E + (size_t)tokens[t] * D * sizeof(float), D * sizeof(float)));
        for (size_t i = 0; i < D; i++) row[i] *= scale;
    }
    return LP_OK;
}

lp_status lp_frozen_new(lp_frozen **out, lp_model *m, const int32_t *tokens, int T) {
    return lp_frozen_new_sites(out, m, tokens, T, NULL);
}

lp_status lp_frozen_new_sites(lp_frozen **out, lp_model *m, const int32_t *tokens, int T, const lp_frozen_sites *s) {
    *out = NULL;
    LP_CHECK(check_model(m));
    if (T < 1 || T > m->cfg.n_ctx) LP_FAIL(LP_ERR_ARG, "tokens: %d tokens (the model takes 1..%d)", T, m->cfg.n_ctx);
    lp_frozen *f = calloc(1, sizeof *f);
    if (!f) LP_FAIL(LP_ERR_OOM, "out of memory for the replacement model");
    f->c = m->cfg;
    f->T = T;
    if (s) f->sites = *s;
    f->trans = m->w.trans;
    f->lay = calloc(m->cfg.n_layers, sizeof *f->lay);
    f->pattern = malloc((size_t)m->cfg.n_heads * T * T * sizeof(float));
    lp_status st = f->lay && f->pattern ? capture_all(m, tokens, T) : LP_ERR(LP_ERR_OOM, "out of memory for the replacement model");
    if (st == LP_OK) st = fill(f, m, T);
    if (st == LP_OK) st = embed_rows(f, m, tokens);
    lp_hooks_clear(m);
    if (st != LP_OK) {
        lp_frozen_free(f);
        return st;
    }
    *out = f;
    return LP_OK;
}

void lp_frozen_free(lp_frozen *f) {
    if (!f) return;
    for (int L = 0; f->lay && L < f->c.n_layers; L++) {
        fz_layer *y = &f->lay[L];
        free(y->ln1_w), free(y->ln2_w), free(y->ln2_b), free(y->W_V), free(y->W_O), free(y->ln1_s), free(y->ln2_s);
        free(y->q), free(y->k), free(y->mlp_in), free(y->mlp_out);
        free(y->ln1p_w), free(y->ln2p_w), free(y->ln1p_s), free(y->ln2p_s), free(y->pat);
    }
    free(f->lay), free(f->lnf_w), free(f->lnf_s), free(f->W_U), free(f->embed), free(f->logits), free(f->pattern);
    free(f);
}

const float *lp_frozen_mlp_in(const lp_frozen *f, int L) { return f->lay[L].mlp_in; }
const float *lp_frozen_mlp_out(const lp_frozen *f, int L) { return f->lay[L].mlp_out; }
const float *lp_frozen_logits(const lp_frozen *f) { return f->logits; }
const float *lp_frozen_unembed(const lp_frozen *f) { return f->W_U; }
const float *lp_frozen_embed(const lp_frozen *f) { return f->embed; }
