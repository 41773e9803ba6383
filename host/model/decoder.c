/* decoder.c: the decoder every family loupe has is (blocks.h): the forward and backward
 * scripts of blocks and hook sites the architecture tables name; and, under tensor
 * parallelism, the same forward with the batch in micro-batches run interleaved, so that
 * one micro-batch's all-reduces travel while another computes. */
#include "loupe/dist.h"
#include "model/blocks.h"

#define MAX_PARTS LP_DIST_MAX_STARTED /* one started all-reduce per part at a time */

int lp_model_tp_parts(int B, int parts, int *seqs) {
    if (parts == 0 && B % 4 == 0 && B >= 4) {
        seqs[0] = seqs[2] = B / 4, seqs[1] = B / 2;
        return 3;
    }
    int k = parts == 0 ? 2 : parts;
    if (k <= 1 || k > MAX_PARTS || B % k) return seqs[0] = B, 1;
    for (int j = 0; j < k; j++) seqs[j] = B / k;
    return k;
}

/* The micro-batches this forward interleaves (1: none, the plain schedule): only a plain
 * one (nothing captured, edited or scored, no tape for a backward, no KV cache) of a split
 * model. Anything that watches a layer sees it whole, in the plain schedule. */
static int parts_of(const lp_model *m, int B, int last, int *seqs) {
    const mdl_tp *p = &m->par;
    if (p->tp <= 1 || last < 0 || m->tp.on || m->kv.pos0 >= 0 || m->kv.generating || hooks_last_layer(m) >= 0)
        return seqs[0] = B, 1;
    return lp_model_tp_parts(B, p->parts, seqs);
}

/* A part's view of the model, its b sequences from s0 on: the same weights, hooks, context and
 * slices, with the activation buffers the blocks use moved to the part's rows (each is
 * [B, T, width] row-major, so whole sequences are an offset). The blocks run on it
 * unchanged: in a forward without hooks, tape or cache nothing they do writes the model
 * outside those buffers. Buffers only a hook reads (the normalized value, the scores and
 * pattern) are left out of the view. */
static void part_view(lp_model *pv, const lp_model *m, int s0, int b, int T) {
    const lp_config *c = &m->cfg;
    size_t r0 = (size_t)s0 * T, es = act_elem_bytes(m), D = c->d_model, F = m->par.F;
    size_t qD = (size_t)m->par.H * c->d_head, kvD = (size_t)m->par.Hkv * c->d_head;
    *pv = *m;
    mdl_acts *a = &pv->a;
#define AT(f, width) a->f = a->f ? (char *)a->f + r0 * (width) * es : NULL
    AT(resid, D), AT(ln_out, D), AT(attn_out, D), AT(mlp_out, D), AT(branch, D), AT(pos_buf, D), AT(ln_scale, 1);
    AT(q, qD), AT(q_pre, qD), AT(z, qD), AT(qk_scale, m->par.H); /* the q/k norms' scales: H per row, then Hkv */
    AT(k, kvD), AT(v, kvD), AT(k_pre, kvD);
    AT(mlp_pre, F), AT(mlp_lin, F), AT(mlp_post, F);
#undef AT
    a->ln_norm = a->scores = a->pattern = NULL;
    pv->res.B = b;
}

/* Block s of one part (s = 2L: layer L's attention, 2L + 1: its MLP): the end of the
 * part's previous block (its sum waited for, added to the residual stream), then this
 * block up to its own sum, started (*req). */
static lp_status step(lp_model *p, int s, int b, int T, lp_dist_req **req) {
    int L = s / 2, n = b * T;
    lp_dist_req *prev = *req;
    *req = NULL;
    if (s % 2 == 0) {
        if (L > 0) LP_CHECK(blk_mlp_finish(p, L - 1, n, prev));
        return blk_attn_start(p, L, b, T, req);
    }
    LP_CHECK(blk_attn_finish(p, L, n, prev));
    return blk_mlp_start(p, L, n, req);
}

/* Layers 0..last, every block run part after part (k parts, seqs[j] sequences each): part
 * j's sum travels while the parts after it compute the same block and the parts before it
 * the next one, and part j waits for it only when its own next block needs it. Per layer:
 * 2 k all-reduces, B T d values in all (the plain schedule: 2 of B T d). */
static lp_status layers_interleaved(lp_model *m, const int *seqs, int k, int T, int last) {
    lp_model part[MAX_PARTS];
    lp_dist_req *req[MAX_PARTS] = {0};
    for (int j = 0, s0 = 0; j < k; s0 += seqs[j++]) part_view(&part[j], m, s0, seqs[j], T);
    lp_status st = LP_OK;
    for (int s = 0; st == LP_OK && s < 2 * (last + 1); s++)
        for (int j = 0; st == LP_OK && j < k; j++) st = step(&part[j], s, seqs[j], T, &req[j]);
    for (int j = 0; st == LP_OK && j < k; j++) {
        lp_dist_req *r = req[j];
        req[j] = NULL;
        st = blk_mlp_finish(&part[j], last, seqs[j] * T, r);
    }
    /* after a failure no started sum outlives the forward (each wait is bounded) */
    for (int j = 0; j < k; j++) (void)lp_dist_wait(m->par.dist, req[j]);
    return st;
}

lp_status decoder_forward(lp_model *m, int B, int T, int want) {
    int N = B * T, last = blk_last_layer(m, want), top = last < m->cfg.n_layers ? last : m->cfg.n_layers - 1;
    LP_CHECK(blk_embed(m, B, T));
    int seqs[MAX_PARTS];
    m->par.parts_run = parts_of(m, B, top, seqs);
    if (m->par.parts_run > 1) {
        LP_CHECK(layers_interleaved(m, seqs, m->par.parts_run, T, top)); /* no hook sites: nobody listens */
    } else {
        for (int L = 0; L <= top; L++) {
            SITE(HK_RESID_PRE, L, m->a.resid);
            LP_CHECK(blk_attn(m, L, B, T));
            SITE(HK_RESID_MID, L, m->a.resid);
            LP_CHECK(blk_mlp(m, L, N));
            SITE(HK_RESID_POST, L, m->a.resid);
        }
    }
    return last < m->cfg.n_layers ? LP_OK : blk_final(m, N, want);
}

lp_status decoder_backward(lp_model *m, bw_bufs *g, int B, int T, int top) {
    int N = B * T;
    if (top == m->cfg.n_layers) {
        LP_CHECK(blk_final_backward(m, g, N));
        top--;
    }
    for (int L = top; L >= 0; L--) {
        GSITE(HK_RESID_POST, L, g->dresid);
        LP_CHECK(blk_mlp_backward(m, g, L, N));
        GSITE(HK_RESID_MID, L, g->dresid);
        LP_CHECK(blk_attn_backward(m, g, L, B, T));
        GSITE(HK_RESID_PRE, L, g->dresid);
    }
    return blk_embed_backward(m, g);
}
