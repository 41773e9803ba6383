/* blocks.c: the norm site, the embeddings, the MLP block, the final norm and the
 * unembedding, each forward beside its backward (blocks.h; the attention block is attend.c). */
#include <string.h>

#include "loupe/dist.h"
#include "loupe/ops.h"
#include "model/blocks.h"

static int rms(const lp_model *m) { return m->cfg.norm == LP_NORM_RMS; }

lp_status blk_linear(lp_model *m, void *out, const void *x, int L, int r, int rb, int N, int K, int M) {
    return lp_matmul(&m->ctx, out, x, layer_weight(m, L, r), rb >= 0 ? layer_weight(m, L, rb) : NULL, N, K, M, m->w.trans);
}

lp_status blk_linear_dx(lp_model *m, void *dx, const void *dy, int L, int r, int N, int K, int M) {
    return lp_matmul(&m->ctx, dx, dy, layer_weight(m, L, r), NULL, N, M, K, m->w.trans ? 0 : 1);
}

/* ---- norms ---- */

lp_status blk_norm(lp_model *m, void *out, void *scale, const void *x, const void *w, const void *b, int rows, int width,
                      int k_scale, int k_norm, int L) {
    lp_ctx *c = &m->ctx;
    int r = rms(m);
    LP_CHECK(r ? lp_rms_scale(c, scale, x, rows, width, m->cfg.ln_eps) : lp_ln_scale(c, scale, x, rows, width, m->cfg.ln_eps));
    SITE(k_scale, L, scale);
    int id = hook_id(m, k_norm, L);
    if (hook_active(m, id)) { /* the normalized value exists only while someone hooks it */
        void *nrm = m->a.ln_norm;
        LP_CHECK(r ? lp_rms_apply(c, nrm, x, scale, NULL, rows, width) : lp_ln_apply(c, nrm, x, scale, NULL, NULL, rows, width));
        LP_CHECK(hook_site(m, id, nrm));
        return lp_affine(c, out, nrm, w, b, rows, width);
    }
    return r ? lp_rms_apply(c, out, x, scale, w, rows, width) : lp_ln_apply(c, out, x, scale, w, b, rows, width);
}

/* The norm's backward taken apart at its scale s (needed where the scale is edited or a
 * direction enters there): dy is the gradient at the normalized value (the weight applied
 * already) and g->dscale, after its site, the gradient at the scale. Then
 *   dx = d/dx [dy . (x - mean x) / s] with s held at its (edited) value   (the normalized path)
 *      + dscale * ds0/dx,  ds0/dx = (x - mean x) / (D s0)  (RMSNorm: x / (D s0))
 * with s0 the scale the norm computed from x before any edit (an edit that replaced the
 * scale leaves dscale zero there; a steer keeps ds/dx = ds0/dx). */
static lp_status norm_through_scale(lp_model *m, bw_bufs *g, void *dx, const void *dy, const void *x, const void *scale,
                                    int rows, int width, int k_scale, int L) {
    lp_ctx *c = &m->ctx;
    int r = rms(m);
    const void *s0 = scale;
    if (m->hooks[hook_id(m, k_scale, L)].edits) {
        LP_CHECK(r ? lp_rms_scale(c, g->nsc, x, rows, width, m->cfg.ln_eps) : lp_ln_scale(c, g->nsc, x, rows, width, m->cfg.ln_eps));
        s0 = g->nsc;
    }
    /* dscale[n] / width along each row (a rank-one product), times (x - mean) / s0 */
    LP_CHECK(lp_matmul(c, g->nrm, g->dscale, width == m->cfg.d_model ? g->invd : g->invdh, NULL, rows, 1, width, 0));
    LP_CHECK(r ? lp_rms_apply(c, dx, x, s0, NULL, rows, width) : lp_ln_apply(c, dx, x, s0, NULL, NULL, rows, width));
    LP_CHECK(lp_affine(c, dx, dx, g->nrm, NULL, 1, rows * width));
    /* the normalized path: dy / s, centred for LayerNorm */
    LP_CHECK(r ? lp_rms_apply(c, g->nrm, dy, scale, NULL, rows, width) : lp_ln_apply(c, g->nrm, dy, scale, NULL, NULL, rows, width));
    return lp_add(c, dx, dx, g->nrm, (size_t)rows * width);
}

lp_status blk_norm_backward(lp_model *m, bw_bufs *g, void *dx, void *dy, const void *x, const void *scale, const void *w,
                               int rows, int width, int k_scale, int k_norm, int L) {
    lp_ctx *c = &m->ctx;
    int r = rms(m), id_s = hook_id(m, k_scale, L);
    int through_scale = id_s >= 0 && m->tp.on && (m->hooks[id_s].edits || grad_enters(m, k_scale, L));
    /* going backward the normalized value comes before the scale: its site (and any edit's
     * Jacobian there) acts on what reaches the scale too. Its gradient is dy * w. */
    if (grad_wanted(m, k_norm, L) || through_scale) {
        LP_CHECK(lp_affine(c, dy, dy, w, NULL, rows, width));
        GSITE(k_norm, L, dy);
        w = NULL;
    }
    if (grad_wanted(m, k_scale, L)) { /* the scale as its own node */
        LP_CHECK(lp_norm_scale_grad(c, g->dscale, dy, x, scale, w, rows, width, !r));
        GSITE(k_scale, L, g->dscale);
    }
    if (through_scale) return norm_through_scale(m, g, dx, dy, x, scale, rows, width, k_scale, L);
    return r ? lp_rms_backward(c, dx, dy, x, scale, w, rows, width) : lp_ln_backward(c, dx, dy, x, scale, w, rows, width);
}

/* ---- embeddings ---- */

lp_status blk_embed(lp_model *m, int B, int T) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int N = B * T, D = cf->d_model;
    LP_CHECK(lp_embed(c, m->a.resid, m->a.tok, param_ptr(m, m->w.embed), N, D));
    if (cf->embed_scale > 0) LP_CHECK(lp_scale(c, m->a.resid, m->a.resid, cf->embed_scale, (size_t)N * D));
    SITE(HK_EMBED, 0, m->a.resid);
    if (cf->pos != LP_POS_LEARNED) return LP_OK;
    /* generating (batch 1): positions start at the cache's fill; a shared prefix's suffix at p0 */
    int pos0 = pos_base(m);
    LP_CHECK(lp_pos_embed(c, m->a.pos_buf, (const char *)param_ptr(m, m->w.pos_embed) + (size_t)pos0 * D * act_elem_bytes(m), B, T, D));
    SITE(HK_POS_EMBED, 0, m->a.pos_buf);
    return lp_add(c, m->a.resid, m->a.resid, m->a.pos_buf, (size_t)N * D);
}

lp_status blk_embed_backward(lp_model *m, bw_bufs *g) {
    /* resid_pre of layer 0 = embed (+ pos_embed): each receives it */
    GSITE(HK_EMBED, 0, g->dresid);
    if (m->cfg.pos == LP_POS_LEARNED) GSITE(HK_POS_EMBED, 0, g->dresid);
    return LP_OK;
}

/* ---- the MLP block ---- */

/* The block's output (before its post-norm, if any) into the residual stream, through the
 * post-norm and hook_mlp_out / hook_attn_out. */
lp_status blk_branch_out(lp_model *m, void *branch, void *scale, int wpost, int k_scale, int k_norm, int k_out, int L, int N) {
    int D = m->cfg.d_model;
    void *out = k_out == HK_ATTN_OUT ? m->a.attn_out : m->a.mlp_out;
    if (m->cfg.post_norms) LP_CHECK(blk_norm(m, out, scale, branch, layer_weight(m, L, wpost), NULL, N, D, k_scale, k_norm, L));
    SITE(k_out, L, out);
    return lp_add(&m->ctx, m->a.resid, m->a.resid, out, (size_t)N * D);
}

/* The MLP's output before its post-norm (if any): what its down projection writes. */
static void *mlp_branch(lp_model *m, const layer_acts *la) { return m->cfg.post_norms ? la->mlp_branch : m->a.mlp_out; }

lp_status blk_mlp_start(lp_model *m, int L, int N, lp_dist_req **req) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int D = cf->d_model, F = m->par.F; /* this rank's neurons */
    layer_acts la = layer_acts_of(m, L);
    TAPE(L, 1);
    LP_CHECK(blk_norm(m, la.ln2_out, la.ln2_scale, m->a.resid, layer_weight(m, L, W_LN2), layer_weight(m, L, W_LN2_B), N, D, HK_LN2_SCALE,
                         HK_LN2_NORM, L));
    SITE(HK_MLP_IN, L, la.ln2_out);
    if (cf->mlp == LP_MLP_GELU && !hook_active(m, hook_id(m, HK_MLP_PRE, L))) {
        /* nothing reads or edits hook_pre: GELU in the GEMM's epilogue, pre kept for the backward */
        LP_CHECK(lp_matmul_gelu(c, la.mlp_post, la.mlp_pre, la.ln2_out, layer_weight(m, L, W_IN), layer_weight(m, L, W_BIN), N, D, F,
                                m->w.trans));
    } else if (cf->mlp == LP_MLP_GELU) {
        LP_CHECK(blk_linear(m, la.mlp_pre, la.ln2_out, L, W_IN, W_BIN, N, D, F));
        SITE(HK_MLP_PRE, L, la.mlp_pre);
        LP_CHECK(lp_gelu(c, la.mlp_post, la.mlp_pre, (size_t)N * F));
    } else {
        LP_CHECK(blk_linear(m, la.mlp_pre, la.ln2_out, L, W_GATE, -1, N, D, F));
        SITE(HK_MLP_PRE, L, la.mlp_pre);
        LP_CHECK(blk_linear(m, la.mlp_lin, la.ln2_out, L, W_IN, -1, N, D, F));
        SITE(HK_MLP_PRE_LINEAR, L, la.mlp_lin);
        LP_CHECK(cf->mlp == LP_MLP_SWIGLU ? lp_silu_mul(c, la.mlp_post, la.mlp_pre, la.mlp_lin, (size_t)N * F)
                                          : lp_gelu_mul(c, la.mlp_post, la.mlp_pre, la.mlp_lin, (size_t)N * F));
    }
    SITE(HK_MLP_POST, L, la.mlp_post);
    return tp_linear_start(m, mlp_branch(m, &la), la.mlp_post, L, W_OUT, W_BOUT, N, F, D, req);
}

lp_status blk_mlp_finish(lp_model *m, int L, int N, lp_dist_req *req) {
    layer_acts la = layer_acts_of(m, L);
    void *branch = mlp_branch(m, &la);
    LP_CHECK(tp_linear_finish(m, branch, L, W_BOUT, N, m->cfg.d_model, req));
    return blk_branch_out(m, branch, la.ln2p_scale, W_LN2P, HK_LN2P_SCALE, HK_LN2P_NORM, HK_MLP_OUT, L, N);
}

lp_status blk_mlp(lp_model *m, int L, int N) {
    LP_CHECK(blk_mlp_start(m, L, N, NULL));
    return blk_mlp_finish(m, L, N, NULL);
}

/* The gradient at a block's output (g->dresid) into dbr, the gradient before its post-norm:
 * on its own copy, so that a direction injected at hook_mlp_out stays on its branch. */
lp_status blk_branch_out_backward(lp_model *m, bw_bufs *g, const void *branch, const void *scale, int wpost, int k_scale,
                                     int k_norm, int k_out, int L, int N, void **dbr) {
    int D = m->cfg.d_model;
    LP_CHECK(lp_ctx_copy(&m->ctx, g->dtmp, g->dresid, (size_t)N * D * act_elem_bytes(m)));
    GSITE(k_out, L, g->dtmp);
    *dbr = g->dtmp;
    if (!m->cfg.post_norms) return LP_OK;
    *dbr = g->dbr;
    return blk_norm_backward(m, g, g->dbr, g->dtmp, branch, scale, layer_weight(m, L, wpost), N, D, k_scale, k_norm, L);
}

#define PGRAD(r, x, dy, K, M) LP_CHECK(param_grad(m, layer_weight_idx(m, L, (r)), (x), (dy), N, (K), (M)))

lp_status blk_mlp_backward(lp_model *m, bw_bufs *g, int L, int N) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int D = cf->d_model, F = m->par.F;
    const layer_acts *t = &m->tp.layer[L];
    void *dy;
    LP_CHECK(blk_branch_out_backward(m, g, t->mlp_branch, t->ln2p_scale, W_LN2P, HK_LN2P_SCALE, HK_LN2P_NORM, HK_MLP_OUT, L, N, &dy));
    PGRAD(W_OUT, t->mlp_post, dy, F, D);
    LP_CHECK(blk_linear_dx(m, g->dc, dy, L, W_OUT, N, F, D));
    GSITE(HK_MLP_POST, L, g->dc);
    if (cf->mlp == LP_MLP_GELU) {
        LP_CHECK(lp_gelu_backward(c, g->da, g->dc, t->mlp_pre, (size_t)N * F));
        GSITE(HK_MLP_PRE, L, g->da);
        PGRAD(W_IN, t->ln2_out, g->da, D, F);
        LP_CHECK(blk_linear_dx(m, g->dln, g->da, L, W_IN, N, D, F));
    } else {
        LP_CHECK(cf->mlp == LP_MLP_SWIGLU ? lp_silu_mul_backward(c, g->da, g->db, g->dc, t->mlp_pre, t->mlp_lin, (size_t)N * F)
                                          : lp_gelu_mul_backward(c, g->da, g->db, g->dc, t->mlp_pre, t->mlp_lin, (size_t)N * F));
        GSITE(HK_MLP_PRE, L, g->da);
        GSITE(HK_MLP_PRE_LINEAR, L, g->db);
        PGRAD(W_GATE, t->ln2_out, g->da, D, F);
        PGRAD(W_IN, t->ln2_out, g->db, D, F);
        LP_CHECK(blk_linear_dx(m, g->dln, g->da, L, W_GATE, N, D, F));
        LP_CHECK(blk_linear_dx(m, g->dtmp, g->db, L, W_IN, N, D, F));
        LP_CHECK(lp_add(c, g->dln, g->dln, g->dtmp, (size_t)N * D));
    }
    LP_CHECK(lp_dist_allreduce_sum_dev(m->par.dist, LP_DIST_TP, c, g->dln, (size_t)N * D)); /* as in the attention */
    GSITE(HK_MLP_IN, L, g->dln);
    LP_CHECK(blk_norm_backward(m, g, g->dtmp, g->dln, t->resid_mid, t->ln2_scale, layer_weight(m, L, W_LN2), N, D, HK_LN2_SCALE,
                                  HK_LN2_NORM, L));
    return lp_add(c, g->dresid, g->dresid, g->dtmp, (size_t)N * D);
}

/* ---- the final norm and the unembedding ---- */

lp_status blk_final(lp_model *m, int N, int want) {
    int Lf = m->cfg.n_layers;
    TAPE(Lf, 0);
    layer_acts la = layer_acts_of(m, Lf);
    LP_CHECK(blk_norm(m, m->a.ln_out, la.ln1_scale, m->a.resid, param_ptr(m, m->w.lnf_w), param_ptr(m, m->w.lnf_b), N,
                         m->cfg.d_model, HK_LNF_SCALE, HK_LNF_NORM, Lf));
    return model_unembed(m, N, want);
}

lp_status blk_final_backward(lp_model *m, bw_bufs *g, int N) {
    int Lf = m->cfg.n_layers;
    const layer_acts *t = &m->tp.layer[Lf];
    return blk_norm_backward(m, g, g->dresid, g->dln, t->resid_pre, t->ln1_scale, param_ptr(m, m->w.lnf_w), N, m->cfg.d_model,
                                HK_LNF_SCALE, HK_LNF_NORM, Lf);
}

/* Logits of rows [r0, r0 + rows) into the logits buffer, the losses and the host copy. */
/* Tensor parallelism: this rank's vocabulary slice of the chunk's logits; gathered whole into
 * the logits buffer only when they are wanted or hooked (*whole), else the losses straight
 * from the slices. */
static lp_status logits_chunk_tp(lp_model *m, const char *x, int r0, int rows, int want, int out_id, int *whole) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    void *mine = m->a.tp_logits;
    LP_CHECK(lp_matmul(c, mine, x, tp_unembed_w(m), NULL, rows, cf->d_model, m->par.V, 1));
    *whole = (want & LP_WANT_LOGITS) || out_id >= 0;
    if (*whole) return tp_gather_logits(m, m->a.logits, mine, rows);
    if (!(want & LP_WANT_LOSS)) return LP_OK;
    if (cf->final_softcap > 0) LP_CHECK(lp_softcap(c, mine, mine, cf->final_softcap, (size_t)rows * m->par.V));
    return tp_xent(m, mine, r0, rows);
}

static lp_status logits_chunk(lp_model *m, int r0, int rows, int want, int out_id) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    size_t es = act_elem_bytes(m), n = (size_t)rows * cf->d_vocab;
    const char *x = (const char *)m->a.ln_out + (size_t)r0 * cf->d_model * es;
    if (m->par.tp > 1) {
        int whole;
        LP_CHECK(logits_chunk_tp(m, x, r0, rows, want, out_id, &whole));
        if (!whole) return LP_OK;
    } else {
        LP_CHECK(lp_matmul(c, m->a.logits, x, param_ptr(m, m->w.unembed), NULL, rows, cf->d_model, cf->d_vocab, 1));
    }
    if (out_id >= 0) LP_CHECK(hook_site(m, out_id, m->a.logits));
    /* Gemma 2 caps the logits after TransformerLens's hook_out: the model's output is capped */
    if (cf->final_softcap > 0) LP_CHECK(lp_softcap(c, m->a.logits, m->a.logits, cf->final_softcap, n));
    if (want & LP_WANT_LOSS) LP_CHECK(lp_cross_entropy(c, m->a.loss + r0, m->a.logits, m->a.tgt + r0, rows, cf->d_vocab));
    if (!(want & LP_WANT_LOGITS)) return LP_OK;
    float *dst = m->res.logits + (size_t)r0 * cf->d_vocab;
    if (c->device == LP_CPU) {
        memcpy(dst, m->a.logits, n * sizeof(float));
        return LP_OK;
    }
    LP_CHECK(lp_ctx_to_host(c, m->a.logit_stage, m->a.logits, n * es));
    return lp_convert_host(dst, LP_F32, m->a.logit_stage, c->dtype, n);
}

lp_status model_unembed(lp_model *m, int N, int want) {
    int Lf = m->cfg.n_layers;
    SITE(HK_UNEMBED_IN, Lf, m->a.ln_out);
    /* while generating only an edit of the logits makes them all (the step needs the last row) */
    int out_id = hook_id(m, HK_UNEMBED_OUT, Lf);
    int out = m->kv.generating ? out_id >= 0 && m->hooks[out_id].edits : hook_active(m, out_id);
    if (!(want & (LP_WANT_LOSS | LP_WANT_LOGITS)) && !out) return LP_OK;
    if (out && m->a.logit_rows < N)
        LP_FAIL(LP_ERR_INTERNAL, "unembed.hook_out: the logits buffer holds %d rows, the batch has %d", m->a.logit_rows, N);
    /* the GPU's loss alone: the padded unembedding, in chunks that stay in L2 (vocab.c) */
    int pad = out || (want & LP_WANT_LOGITS) ? 0 : vocab_pad_rows(m, (size_t)m->a.logit_rows * m->cfg.d_vocab);
    if (pad > 0) return vocab_pad_loss(m, N, pad);
    /* in row chunks so that B x T x V logits never exist at once, unless unembed.hook_out is
     * hooked (then logit_rows covers the batch: one chunk, which the hook sees and edits
     * before the losses are taken from it) */
    for (int r0 = 0; r0 < N; r0 += m->a.logit_rows)
        LP_CHECK(logits_chunk(m, r0, N - r0 < m->a.logit_rows ? N - r0 : m->a.logit_rows, want, out ? out_id : -1));
    return LP_OK;
}

int blk_last_layer(const lp_model *m, int want) {
    int n = m->cfg.n_layers;
    if ((want & (LP_WANT_LOSS | LP_WANT_LOGITS | LP_WANT_FINAL_NORM)) || m->kv.pos0 >= 0) return n;
    int last = hooks_last_layer(m);
    if (m->tp.on && m->tp.top > last) last = m->tp.top; /* the backward needs layers up to tape top only */
    return last;
}
