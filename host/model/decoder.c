/* decoder.c: the decoder every family loupe has is (blocks.h): the forward and backward
 * scripts of blocks and hook sites the architecture tables name. */
#include "model/blocks.h"

lp_status decoder_forward(lp_model *m, int B, int T, int want) {
    int N = B * T, last = blk_last_layer(m, want);
    LP_CHECK(blk_embed(m, B, T));
    for (int L = 0; L < m->cfg.n_layers && L <= last; L++) {
        SITE(HK_RESID_PRE, L, m->a.resid);
        LP_CHECK(blk_attn(m, L, B, T));
        SITE(HK_RESID_MID, L, m->a.resid);
        LP_CHECK(blk_mlp(m, L, N));
        SITE(HK_RESID_POST, L, m->a.resid);
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
