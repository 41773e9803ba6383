/* attend.c: the attention block, forward beside backward: the norm, q/k/v, the q/k norms
 * (Gemma 3), the rotary (local or global tables), the attention itself (fused, or in three
 * steps when a hook or gradient wants the scores or the pattern, against the KV cache
 * while generating, or over a shared prefix's kept keys and values (prefix.c); with the
 * scale, soft-cap and sliding window of the config), the output
 * projection and the post-norm (Gemma). */
#include "loupe/dist.h"
#include "loupe/ops.h"
#include "model/blocks.h"

static lp_attn_cfg attn_cfg(const lp_model *m, int L) {
    const lp_config *c = &m->cfg;
    lp_attn_cfg a = {.scale = c->attn_scale, .softcap = c->attn_softcap, .window = lp_config_local(c, L) ? c->sliding_window : 0};
    return a;
}

/* Layer L's rotary tables: Gemma 3's local layers have their own base. */
static void rope_of(const lp_model *m, int L, const float **cs, const float **sn) {
    int local = m->rope.cos_local && lp_config_local(&m->cfg, L);
    *cs = local ? m->rope.cos_local : m->rope.cos;
    *sn = local ? m->rope.sin_local : m->rope.sin;
}

/* Whether the attention goes in three steps (a hook or gradient wants the scores or pattern). */
static int three_steps(const lp_model *m, int L) {
    return hook_active(m, hook_id(m, HK_SCORES, L)) || hook_active(m, hook_id(m, HK_PATTERN, L)) ||
           grad_wanted(m, HK_SCORES, L) || grad_wanted(m, HK_PATTERN, L);
}

/* Prefix sharing (mdl_pfx): the reference run keeps its k and v whole; the suffix run writes
 * its own into the kept rows' positions p0 .. and attends over all of them. */
static lp_status attend_shared(lp_model *m, const layer_acts *la, int L, int B, int T, const lp_attn_cfg *ac) {
    lp_ctx *c = &m->ctx;
    int H = m->par.H, Hkv = m->par.Hkv, dh = m->cfg.d_head, p0 = m->pfx.p0, Tk = m->pfx.T;
    size_t row = (size_t)Hkv * dh * act_elem_bytes(m);
    char *kc = pfx_kv(m, L, 0), *vc = pfx_kv(m, L, 1);
    if (B != m->pfx.B || (m->pfx.keep ? T != Tk : p0 + T != Tk))
        LP_FAIL(LP_ERR_INTERNAL, "prefix sharing: a forward of %d x %d, the kept prefix is %d of %d x %d", B, T, p0, m->pfx.B, Tk);
    if (m->pfx.keep) {
        LP_CHECK(lp_ctx_copy(c, kc, la->k, (size_t)B * T * row));
        return lp_ctx_copy(c, vc, la->v, (size_t)B * T * row);
    }
    for (int b = 0; b < B; b++) {
        LP_CHECK(lp_ctx_copy(c, kc + ((size_t)b * Tk + p0) * row, (const char *)la->k + (size_t)b * T * row, T * row));
        LP_CHECK(lp_ctx_copy(c, vc + ((size_t)b * Tk + p0) * row, (const char *)la->v + (size_t)b * T * row, T * row));
    }
    if (!three_steps(m, L)) return lp_attention_suffix(c, la->z, la->q, kc, vc, B, T, p0, H, Hkv, dh, ac);
    LP_CHECK(lp_attn_scores_suffix(c, la->scores, la->q, kc, B, T, p0, H, Hkv, dh, ac));
    SITE(HK_SCORES, L, la->scores);
    LP_CHECK(lp_softmax_rows(c, la->pattern, la->scores, (size_t)B * H * T, Tk));
    SITE(HK_PATTERN, L, la->pattern);
    return lp_attn_apply_suffix(c, la->z, la->pattern, vc, B, T, p0, H, Hkv, dh);
}

/* z from q, k, v (rotated already) of layer L. */
static lp_status attend(lp_model *m, const layer_acts *la, int L, int B, int T) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int H = m->par.H, Hkv = m->par.Hkv, dh = cf->d_head; /* this rank's heads */
    lp_attn_cfg ac = attn_cfg(m, L);
    if (m->pfx.on) return attend_shared(m, la, L, B, T, &ac);
    if (m->pfx.keep) LP_CHECK(attend_shared(m, la, L, B, T, &ac));
    if (m->kv.pos0 >= 0) { /* batch 1: append this step's keys and values to the cache and attend over it */
        int pos0 = m->kv.pos0;
        size_t row = (size_t)Hkv * dh * act_elem_bytes(m), plane = (size_t)m->kv.cap * row;
        char *kc = (char *)m->kv.mem + 2 * (size_t)L * plane, *vc = kc + plane;
        LP_CHECK(lp_ctx_copy(c, kc + pos0 * row, la->k, T * row));
        LP_CHECK(lp_ctx_copy(c, vc + pos0 * row, la->v, T * row));
        /* the prompt (nothing cached before it) takes the blocked fused kernel */
        if (pos0 == 0) return lp_attention_cfg(c, la->z, la->q, la->k, la->v, 1, T, H, Hkv, dh, &ac);
        return lp_attention_cached_cfg(c, la->z, la->q, kc, vc, 1, T, m->kv.cap, pos0, H, Hkv, dh, &ac);
    }
    if (!three_steps(m, L)) return lp_attention_cfg(c, la->z, la->q, la->k, la->v, B, T, H, Hkv, dh, &ac);
    LP_CHECK(lp_attn_scores_cfg(c, la->scores, la->q, la->k, B, T, H, Hkv, dh, &ac));
    SITE(HK_SCORES, L, la->scores);
    LP_CHECK(lp_softmax_rows(c, la->pattern, la->scores, (size_t)B * H * T, T));
    SITE(HK_PATTERN, L, la->pattern);
    return lp_attn_apply(c, la->z, la->pattern, la->v, B, T, H, Hkv, dh);
}

/* q, k, v of layer L from the norm's output, through the q/k norms and the rotary. */
static lp_status project(lp_model *m, const layer_acts *la, int L, int B, int T) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int N = B * T, D = cf->d_model, H = m->par.H, Hkv = m->par.Hkv, dh = cf->d_head;
    void *q = cf->qk_norm ? la->q_pre : la->q, *k = cf->qk_norm ? la->k_pre : la->k;
    LP_CHECK(blk_linear(m, q, la->ln1_out, L, W_Q, W_BQ, N, D, H * dh));
    LP_CHECK(blk_linear(m, k, la->ln1_out, L, W_K, W_BK, N, D, Hkv * dh));
    LP_CHECK(blk_linear(m, la->v, la->ln1_out, L, W_V, W_BV, N, D, Hkv * dh));
    SITE(HK_Q, L, q);
    SITE(HK_K, L, k);
    SITE(HK_V, L, la->v);
    if (cf->qk_norm) {
        LP_CHECK(blk_norm(m, la->q, la->qn_scale, q, layer_weight(m, L, W_QN), NULL, N * H, dh, HK_QN_SCALE, HK_QN_NORM, L));
        LP_CHECK(blk_norm(m, la->k, la->kn_scale, k, layer_weight(m, L, W_KN), NULL, N * Hkv, dh, HK_KN_SCALE, HK_KN_NORM, L));
    }
    if (cf->pos != LP_POS_ROTARY) return LP_OK;
    int pos0 = pos_base(m);
    if (pos0 + T > m->rope.n) LP_FAIL(LP_ERR_ARG, "forward: positions past the rotary tables");
    const float *cs, *sn;
    rope_of(m, L, &cs, &sn);
    LP_CHECK(lp_rope(c, la->q, la->q, cs, sn, B, T, H, dh, pos0));
    SITE(HK_ROT_Q, L, la->q);
    LP_CHECK(lp_rope(c, la->k, la->k, cs, sn, B, T, Hkv, dh, pos0));
    SITE(HK_ROT_K, L, la->k);
    return LP_OK;
}

/* The block's output before its post-norm (if any): what the output projection writes. */
static void *attn_branch(lp_model *m, const layer_acts *la) { return m->cfg.post_norms ? la->attn_pre : m->a.attn_out; }

lp_status blk_attn_start(lp_model *m, int L, int B, int T, lp_dist_req **req) {
    const lp_config *cf = &m->cfg;
    int N = B * T, D = cf->d_model, qD = m->par.H * cf->d_head;
    layer_acts la = layer_acts_of(m, L);
    TAPE(L, 0);
    LP_CHECK(blk_norm(m, la.ln1_out, la.ln1_scale, m->a.resid, layer_weight(m, L, W_LN1), layer_weight(m, L, W_LN1_B), N, D, HK_LN1_SCALE,
                         HK_LN1_NORM, L));
    LP_CHECK(project(m, &la, L, B, T));
    LP_CHECK(attend(m, &la, L, B, T));
    SITE(HK_Z, L, la.z);
    return tp_linear_start(m, attn_branch(m, &la), la.z, L, W_O, W_BO, N, qD, D, req);
}

lp_status blk_attn_finish(lp_model *m, int L, int N, lp_dist_req *req) {
    layer_acts la = layer_acts_of(m, L);
    void *branch = attn_branch(m, &la);
    LP_CHECK(tp_linear_finish(m, branch, L, W_BO, N, m->cfg.d_model, req));
    return blk_branch_out(m, branch, la.ln1p_scale, W_LN1P, HK_LN1P_SCALE, HK_LN1P_NORM, HK_ATTN_OUT, L, N);
}

lp_status blk_attn(lp_model *m, int L, int B, int T) {
    LP_CHECK(blk_attn_start(m, L, B, T, NULL));
    return blk_attn_finish(m, L, B * T, NULL);
}

/* ---- backward ---- */

/* The suffix run's attention backward (mdl_pfx): over the kept k and v (the prefix's and the
 * suffix's own), dq of the suffix's queries and dk, dv of its keys alone. */
static lp_status core_backward_shared(lp_model *m, bw_bufs *g, const layer_acts *t, int L, int B, int T,
                                      const lp_attn_cfg *ac) {
    lp_ctx *c = &m->ctx;
    int H = m->par.H, Hkv = m->par.Hkv, dh = m->cfg.d_head, p0 = m->pfx.p0;
    const void *kc = pfx_kv(m, L, 0), *vc = pfx_kv(m, L, 1);
    if (!grad_wanted(m, HK_PATTERN, L) && !grad_wanted(m, HK_SCORES, L))
        return lp_attention_backward_suffix(c, g->dq, g->dk, g->dv, g->dz, t->q, kc, vc, B, T, p0, H, Hkv, dh, ac);
    LP_CHECK(lp_attn_apply_backward_suffix(c, g->dpat, g->dv, g->dz, t->pattern, vc, B, T, p0, H, Hkv, dh));
    GSITE(HK_PATTERN, L, g->dpat);
    LP_CHECK(lp_softmax_rows_backward(c, g->dsc, g->dpat, t->pattern, (size_t)B * H * T, p0 + T));
    GSITE(HK_SCORES, L, g->dsc);
    return lp_attn_scores_backward_suffix(c, g->dq, g->dk, g->dsc, t->scores, t->q, kc, B, T, p0, H, Hkv, dh, ac);
}

/* dq, dk, dv from g->dz through layer L's attention (the fused backward, or the three steps
 * with gradient sites at the pattern and the scores when they are wanted). */
static lp_status core_backward(lp_model *m, bw_bufs *g, const layer_acts *t, int L, int B, int T) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int H = m->par.H, Hkv = m->par.Hkv, dh = cf->d_head;
    lp_attn_cfg ac = attn_cfg(m, L);
    if (m->pfx.on) return core_backward_shared(m, g, t, L, B, T, &ac);
    if (!grad_wanted(m, HK_PATTERN, L) && !grad_wanted(m, HK_SCORES, L))
        return lp_attention_backward_cfg(c, g->dq, g->dk, g->dv, g->dz, t->q, t->k, t->v, B, T, H, Hkv, dh, &ac);
    LP_CHECK(lp_attn_apply_backward(c, g->dpat, g->dv, g->dz, t->pattern, t->v, B, T, H, Hkv, dh));
    GSITE(HK_PATTERN, L, g->dpat);
    LP_CHECK(lp_softmax_rows_backward(c, g->dsc, g->dpat, t->pattern, (size_t)B * H * T, T));
    GSITE(HK_SCORES, L, g->dsc);
    return lp_attn_scores_backward_cfg(c, g->dq, g->dk, g->dsc, t->scores, t->q, t->k, B, T, H, Hkv, dh, &ac);
}

/* dq and dk back through the rotary and the q/k norms to the projections' outputs. */
static lp_status project_backward(lp_model *m, bw_bufs *g, const layer_acts *t, int L, int B, int T) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int N = B * T, H = m->par.H, Hkv = m->par.Hkv, dh = cf->d_head;
    size_t es = act_elem_bytes(m);
    if (cf->pos == LP_POS_ROTARY) { /* q and k were rotated in place */
        const float *cs, *sn;
        rope_of(m, L, &cs, &sn);
        GSITE(HK_ROT_Q, L, g->dq);
        GSITE(HK_ROT_K, L, g->dk);
        LP_CHECK(lp_rope_backward(c, g->dq, g->dq, cs, sn, B, T, H, dh, pos_base(m)));
        LP_CHECK(lp_rope_backward(c, g->dk, g->dk, cs, sn, B, T, Hkv, dh, pos_base(m)));
    }
    if (!cf->qk_norm) return LP_OK;
    LP_CHECK(blk_norm_backward(m, g, g->dtmp, g->dq, t->q_pre, t->qn_scale, layer_weight(m, L, W_QN), N * H, dh, HK_QN_SCALE, HK_QN_NORM, L));
    LP_CHECK(lp_ctx_copy(c, g->dq, g->dtmp, (size_t)N * H * dh * es));
    LP_CHECK(blk_norm_backward(m, g, g->dtmp, g->dk, t->k_pre, t->kn_scale, layer_weight(m, L, W_KN), N * Hkv, dh, HK_KN_SCALE, HK_KN_NORM, L));
    return lp_ctx_copy(c, g->dk, g->dtmp, (size_t)N * Hkv * dh * es);
}

#define PGRAD(r, x, dy, K, M) LP_CHECK(param_grad(m, layer_weight_idx(m, L, (r)), (x), (dy), N, (K), (M)))

lp_status blk_attn_backward(lp_model *m, bw_bufs *g, int L, int B, int T) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int N = B * T, D = cf->d_model, qD = m->par.H * cf->d_head, kvD = m->par.Hkv * cf->d_head;
    const layer_acts *t = &m->tp.layer[L];
    void *dy;
    LP_CHECK(blk_branch_out_backward(m, g, t->attn_pre, t->ln1p_scale, W_LN1P, HK_LN1P_SCALE, HK_LN1P_NORM, HK_ATTN_OUT, L, N, &dy));
    PGRAD(W_O, t->z, dy, qD, D);
    LP_CHECK(blk_linear_dx(m, g->dz, dy, L, W_O, N, qD, D));
    GSITE(HK_Z, L, g->dz);
    LP_CHECK(core_backward(m, g, t, L, B, T));
    LP_CHECK(project_backward(m, g, t, L, B, T));
    GSITE(HK_Q, L, g->dq);
    GSITE(HK_K, L, g->dk);
    GSITE(HK_V, L, g->dv);
    PGRAD(W_Q, t->ln1_out, g->dq, D, qD);
    PGRAD(W_K, t->ln1_out, g->dk, D, kvD);
    PGRAD(W_V, t->ln1_out, g->dv, D, kvD);
    LP_CHECK(blk_linear_dx(m, g->dln, g->dq, L, W_Q, N, D, qD));
    LP_CHECK(blk_linear_dx(m, g->dtmp, g->dk, L, W_K, N, D, kvD));
    LP_CHECK(lp_add(c, g->dln, g->dln, g->dtmp, (size_t)N * D));
    LP_CHECK(blk_linear_dx(m, g->dtmp, g->dv, L, W_V, N, D, kvD));
    LP_CHECK(lp_add(c, g->dln, g->dln, g->dtmp, (size_t)N * D));
    /* the column-split projections' input is replicated: its gradient is the sum over ranks */
    LP_CHECK(lp_dist_allreduce_sum_dev(m->par.dist, LP_DIST_TP, c, g->dln, (size_t)N * D));
    LP_CHECK(blk_norm_backward(m, g, g->dtmp, g->dln, t->resid_pre, t->ln1_scale, layer_weight(m, L, W_LN1), N, D, HK_LN1_SCALE,
                                  HK_LN1_NORM, L));
    return lp_add(c, g->dresid, g->dresid, g->dtmp, (size_t)N * D);
}
