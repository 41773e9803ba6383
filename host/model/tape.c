/* tape.c: what the forward keeps for the backward (the tape: one allocation carved per
 * layer), and the backward steps the architectures share: linear layers, the attention core
 * and the norms, with their gradient sites. */
#include <stdlib.h>
#include <string.h>

#include "loupe/ops.h"
#include "model/model_internal.h"

size_t lp_tape_layout(lp_model *m, int B, int T, int carve) {
    const lp_config *c = &m->cfg;
    size_t N = (size_t)B * T, D = c->d_model, F = c->d_mlp, es = lp_act_size(m), off = 0;
    size_t qD = (size_t)c->n_heads * c->d_head, kvD = (size_t)c->n_kv_heads * c->d_head, mat = (size_t)B * c->n_heads * T * T * es;
    int llama = c->arch == LP_ARCH_LLAMA;
#define SLICE(field, bytes)                                                    \
    do {                                                                       \
        size_t b_ = (bytes);                                                   \
        if (carve) t->field = b_ ? (char *)m->tape_mem + off : NULL;           \
        off += (b_ + 255) / 256 * 256;                                         \
    } while (0)
    for (int L = 0; L <= c->n_layers; L++) {
        tape_layer *t = &m->tape[L];
        if (L > m->tape_top) { /* beyond what the metric reaches: nothing kept */
            if (carve) memset(t, 0, sizeof *t);
            continue;
        }
        if (L == c->n_layers) { /* the final norm: its input and scale */
            SLICE(resid_pre, N * D * es);
            SLICE(ln1_scale, N * es);
            break;
        }
        int mats = lp_grad_wanted(m, HK_SCORES, L) || lp_grad_wanted(m, HK_PATTERN, L);
        SLICE(resid_pre, N * D * es);
        SLICE(ln1_scale, N * es);
        SLICE(q, N * qD * es);
        SLICE(k, N * kvD * es);
        SLICE(v, N * kvD * es);
        SLICE(scores, mats ? mat : 0);
        SLICE(pattern, mats ? mat : 0);
        SLICE(resid_mid, N * D * es);
        SLICE(ln2_scale, N * es);
        SLICE(mlp_pre, N * F * es);
        SLICE(mlp_lin, llama ? N * F * es : 0);
        int pw = lp_param_layer_wanted(m, L);
        SLICE(ln1_out, pw ? N * D * es : 0);
        SLICE(z, pw ? N * qD * es : 0);
        SLICE(ln2_out, pw ? N * D * es : 0);
        SLICE(mlp_post, pw ? N * F * es : 0);
    }
#undef SLICE
    return off;
}

/* Layers above tape_top (run only because a hook asked for them) use the ordinary buffers. */
static void untaped(lp_model *m) {
    m->q = m->base_q, m->k = m->base_k, m->v = m->base_v, m->scores = m->base_scores, m->pattern = m->base_pattern;
    m->mlp_pre = m->base_mlp_pre, m->mlp_lin = m->base_mlp_lin, m->ln_scale = m->base_ln_scale;
    m->ln_out = m->base_ln_out, m->z = m->base_z, m->mlp_post = m->base_mlp_post;
}

lp_status lp_tape_layer(lp_model *m, int L) {
    if (L > m->tape_top) return untaped(m), LP_OK;
    tape_layer *t = &m->tape[L];
    size_t bytes = (size_t)m->B * m->T * m->cfg.d_model * lp_act_size(m);
    LP_CHECK(lp_ctx_copy(&m->ctx, t->resid_pre, m->resid, bytes));
    m->ln_scale = t->ln1_scale, m->q = t->q, m->k = t->k, m->v = t->v, m->mlp_pre = t->mlp_pre;
    if (t->mlp_lin) m->mlp_lin = t->mlp_lin;
    m->scores = t->scores ? t->scores : m->base_scores;
    m->pattern = t->pattern ? t->pattern : m->base_pattern;
    m->ln_out = t->ln1_out ? t->ln1_out : m->base_ln_out;
    m->z = t->z ? t->z : m->base_z;
    m->mlp_post = t->mlp_post ? t->mlp_post : m->base_mlp_post;
    return LP_OK;
}

lp_status lp_tape_mid(lp_model *m, int L) {
    if (L > m->tape_top) return untaped(m), LP_OK;
    tape_layer *t = &m->tape[L];
    size_t bytes = (size_t)m->B * m->T * m->cfg.d_model * lp_act_size(m);
    LP_CHECK(lp_ctx_copy(&m->ctx, t->resid_mid, m->resid, bytes));
    m->ln_scale = t->ln2_scale;
    m->ln_out = t->ln2_out ? t->ln2_out : m->base_ln_out;
    return LP_OK;
}

lp_status lp_tape_final(lp_model *m) {
    if (m->cfg.n_layers > m->tape_top) return untaped(m), LP_OK;
    tape_layer *t = &m->tape[m->cfg.n_layers];
    size_t bytes = (size_t)m->B * m->T * m->cfg.d_model * lp_act_size(m);
    LP_CHECK(lp_ctx_copy(&m->ctx, t->resid_pre, m->resid, bytes));
    m->ln_scale = t->ln1_scale;
    m->ln_out = m->base_ln_out; /* the metric reads the final norm's output there */
    return LP_OK;
}

void lp_tape_restore(lp_model *m) {
    m->taping = 0;
    untaped(m);
}

/* ---- backward steps shared by the architectures ---- */

lp_status lp_bw_linear(lp_ctx *c, void *dx, const void *dy, const void *W, int N, int K, int M, int w_trans) {
    /* out = x W: dx = dy W^T, i.e. W used as [M,K] transposed; out = x W^T: dx = dy W */
    return lp_matmul(c, dx, dy, W, NULL, N, M, K, w_trans ? 0 : 1);
}

lp_status lp_attn_core_backward(lp_model *m, bw_bufs *g, const tape_layer *t, int L, int B, int T) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int H = cf->n_heads, Hkv = cf->n_kv_heads, dh = cf->d_head;
    if (!lp_grad_wanted(m, HK_PATTERN, L) && !lp_grad_wanted(m, HK_SCORES, L))
        return lp_attention_backward(c, g->dq, g->dk, g->dv, g->dz, t->q, t->k, t->v, B, T, H, Hkv, dh);
    /* the three steps, stopping at the pattern and the scores */
    LP_CHECK(lp_attn_apply_backward(c, g->dpat, g->dv, g->dz, t->pattern, t->v, B, T, H, Hkv, dh));
    GSITE(HK_PATTERN, L, g->dpat);
    LP_CHECK(lp_softmax_rows_backward(c, g->dsc, g->dpat, t->pattern, (size_t)B * H * T, T));
    GSITE(HK_SCORES, L, g->dsc);
    return lp_attn_scores_backward(c, g->dq, g->dk, g->dsc, t->q, t->k, B, T, H, Hkv, dh);
}

/* The norm's backward taken apart at its scale s (needed where the scale is edited or a
 * direction enters there): dy is the gradient at the normalized value (the weight applied
 * already) and g->dscale, after its site, the gradient at the scale. Then
 *   dx = d/dx [dy . (x - mean x) / s] with s held at its (edited) value   (the normalized path)
 *      + dscale * ds0/dx,  ds0/dx = (x - mean x) / (D s0)  (RMSNorm: x / (D s0))
 * with s0 the scale the norm computed from x before any edit (an edit that replaced the
 * scale leaves dscale zero there; a steer keeps ds/dx = ds0/dx). */
static lp_status norm_backward_through_scale(lp_model *m, bw_bufs *g, void *dx, const void *dy, const void *x, const void *scale,
                                             int k_scale, int L, int N) {
    lp_ctx *c = &m->ctx;
    int D = m->cfg.d_model, rms = m->cfg.arch == LP_ARCH_LLAMA;
    const void *s0 = scale;
    if (m->hooks[lp_hook_id(m, k_scale, L)].edits) {
        LP_CHECK(rms ? lp_rms_scale(c, g->nsc, x, N, D, m->cfg.ln_eps) : lp_ln_scale(c, g->nsc, x, N, D, m->cfg.ln_eps));
        s0 = g->nsc;
    }
    /* dscale[n] / D along each row (a rank-one product), times (x - mean) / s0 */
    LP_CHECK(lp_matmul(c, g->nrm, g->dscale, g->invd, NULL, N, 1, D, 0));
    LP_CHECK(rms ? lp_rms_apply(c, dx, x, s0, NULL, N, D) : lp_ln_apply(c, dx, x, s0, NULL, NULL, N, D));
    LP_CHECK(lp_affine(c, dx, dx, g->nrm, NULL, 1, N * D));
    /* the normalized path: dy / s, centred for LayerNorm */
    LP_CHECK(rms ? lp_rms_apply(c, g->nrm, dy, scale, NULL, N, D) : lp_ln_apply(c, g->nrm, dy, scale, NULL, NULL, N, D));
    return lp_add(c, dx, dx, g->nrm, (size_t)N * D);
}

lp_status lp_norm_backward_site(lp_model *m, bw_bufs *g, void *dx, void *dy, const void *x, const void *scale, const void *w,
                                int k_scale, int k_norm, int L, int N) {
    lp_ctx *c = &m->ctx;
    int D = m->cfg.d_model, rms = m->cfg.arch == LP_ARCH_LLAMA, id_s = lp_hook_id(m, k_scale, L);
    int through_scale = id_s >= 0 && m->taping && (m->hooks[id_s].edits || lp_grad_enters(m, k_scale, L));
    /* going backward the normalized value comes before the scale: its site (and any edit's
     * Jacobian there) acts on what reaches the scale too. Its gradient is dy * w. */
    if (lp_grad_wanted(m, k_norm, L) || through_scale) {
        LP_CHECK(lp_affine(c, dy, dy, w, NULL, N, D));
        LP_CHECK(lp_grad_site(m, k_norm, L, dy));
        w = NULL;
    }
    if (lp_grad_wanted(m, k_scale, L)) { /* the scale as its own node */
        LP_CHECK(lp_norm_scale_grad(c, g->dscale, dy, x, scale, w, N, D, !rms));
        LP_CHECK(lp_grad_site(m, k_scale, L, g->dscale));
    }
    if (through_scale) return norm_backward_through_scale(m, g, dx, dy, x, scale, k_scale, L, N);
    return rms ? lp_rms_backward(c, dx, dy, x, scale, w, N, D) : lp_ln_backward(c, dx, dy, x, scale, w, N, D);
}
