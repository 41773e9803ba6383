/* tape.c: what the forward keeps for the backward (the tape: one allocation carved per
 * layer) and the accessor the blocks write through: layer_acts_of gives layer L's buffers,
 * the tape's slices where the backward will read them and the forward's own buffers
 * elsewhere, so a forward never moves a pointer in and out of the model. */
#include <stdlib.h>
#include <string.h>

#include "model/model_internal.h"

/* The forward's own buffers, shared by every layer that nobody keeps. */
static layer_acts scratch(const lp_model *m) {
    const mdl_acts *a = &m->a;
    layer_acts la = {
        .ln1_scale = a->ln_scale, .ln2_scale = a->ln_scale, .ln1_out = a->ln_out, .ln2_out = a->ln_out,
        .q = a->q, .k = a->k, .v = a->v, .q_pre = a->q_pre, .k_pre = a->k_pre, .qn_scale = a->qk_scale, .kn_scale = a->qk_scale,
        .scores = a->scores, .pattern = a->pattern, .z = a->z, .attn_pre = a->branch, .mlp_branch = a->branch,
        .ln1p_scale = a->ln_scale, .ln2p_scale = a->ln_scale, .mlp_pre = a->mlp_pre, .mlp_lin = a->mlp_lin, .mlp_post = a->mlp_post,
    };
    return la;
}

layer_acts layer_acts_of(const lp_model *m, int L) {
    layer_acts la = scratch(m);
    if (!m->tp.on || L > m->tp.top || !m->tp.layer) return la;
    const layer_acts *t = &m->tp.layer[L];
    /* every slice the tape keeps replaces the shared buffer (void ** walk over the struct) */
    void **dst = (void **)&la;
    void *const *src = (void *const *)t;
    for (size_t i = 0; i < sizeof la / sizeof(void *); i++)
        if (src[i]) dst[i] = src[i];
    la.resid_pre = la.resid_mid = NULL; /* the forward reads the residual stream itself */
    return la;
}

lp_status tape_resid(lp_model *m, int L, int mid) {
    if (!m->tp.on || L > m->tp.top) return LP_OK;
    layer_acts *t = &m->tp.layer[L];
    size_t bytes = (size_t)m->res.B * m->res.T * m->cfg.d_model * act_elem_bytes(m);
    return lp_ctx_copy(&m->ctx, mid ? t->resid_mid : t->resid_pre, m->a.resid, bytes);
}

size_t tape_layout(lp_model *m, int B, int T, int carve) {
    const lp_config *c = &m->cfg;
    size_t N = (size_t)B * T, D = c->d_model, F = c->d_mlp, es = act_elem_bytes(m), off = 0, H = c->n_heads, Hkv = c->n_kv_heads;
    size_t qD = H * c->d_head, kvD = Hkv * c->d_head, mat = (size_t)B * H * T * attn_keys(m, T) * es;
    int gated = c->mlp != LP_MLP_GELU, post = c->post_norms, qkn = c->qk_norm;
#define SLICE(field, bytes)                                                    \
    do {                                                                       \
        size_t b_ = (bytes);                                                   \
        if (carve) t->field = b_ ? (char *)m->tp.mem + off : NULL;             \
        off += (b_ + 255) / 256 * 256;                                         \
    } while (0)
    for (int L = 0; L <= c->n_layers; L++) {
        layer_acts *t = &m->tp.layer[L];
        if (carve) memset(t, 0, sizeof *t);
        if (L > m->tp.top) continue; /* beyond what the metric reaches: nothing kept */
        SLICE(resid_pre, N * D * es);
        SLICE(ln1_scale, N * es);
        if (L == c->n_layers) break; /* the final norm: its input and scale */
        int mats = grad_wanted(m, HK_SCORES, L) || grad_wanted(m, HK_PATTERN, L);
        int pw = param_layer_wanted(m, L);
        SLICE(q, N * qD * es);
        SLICE(k, N * kvD * es);
        SLICE(v, N * kvD * es);
        SLICE(q_pre, qkn ? N * qD * es : 0);
        SLICE(k_pre, qkn ? N * kvD * es : 0);
        SLICE(qn_scale, qkn ? N * H * es : 0);
        SLICE(kn_scale, qkn ? N * Hkv * es : 0);
        SLICE(scores, mats ? mat : 0);
        SLICE(pattern, mats ? mat : 0);
        SLICE(attn_pre, post ? N * D * es : 0);
        SLICE(ln1p_scale, post ? N * es : 0);
        SLICE(resid_mid, N * D * es);
        SLICE(ln2_scale, N * es);
        SLICE(mlp_pre, N * F * es);
        SLICE(mlp_lin, gated ? N * F * es : 0);
        SLICE(mlp_branch, post ? N * D * es : 0);
        SLICE(ln2p_scale, post ? N * es : 0);
        /* the linear layers' inputs, kept only where a weight's gradient is wanted */
        SLICE(ln1_out, pw ? N * D * es : 0);
        SLICE(z, pw ? N * qD * es : 0);
        SLICE(ln2_out, pw ? N * D * es : 0);
        SLICE(mlp_post, pw ? N * F * es : 0);
    }
#undef SLICE
    return off;
}
