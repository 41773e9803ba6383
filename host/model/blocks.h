/* blocks.h: the pieces every architecture is written in, each forward beside its backward
 * (blocks.c: norms, the embedding, the MLP, the unembedding; attend.c: the attention block).
 * They read how the architecture differs from m->cfg (norm kind, position kind, MLP kind,
 * post-norms, q/k norms, soft-caps, windows) and their weights by role (W_*), call the hook
 * sites of every TransformerLens point they pass, and write into layer_acts_of(m, L), so
 * that the tape keeps what the backward needs without anyone swapping pointers.
 *
 * Forward blocks take the residual stream m->a.resid and add their output to it; backward
 * blocks take g->dresid (the gradient at the block's output on the residual) and add the
 * gradient of their input to it. */
#ifndef LOUPE_MODEL_BLOCKS_H
#define LOUPE_MODEL_BLOCKS_H

#include "model/model_internal.h"

/* out [N, M] = x [N, K] W (+ b) for layer L's weight of role r (and bias role rb, or -1), in
 * the model's layout; and dx [N, K] = dy [N, M] W^T. */
lp_status blk_linear(lp_model *m, void *out, const void *x, int L, int r, int rb, int N, int K, int M);
lp_status blk_linear_dx(lp_model *m, void *dx, const void *dy, int L, int r, int N, int K, int M);

/* A norm of `rows` rows of `width` (LayerNorm or RMSNorm as m->cfg.norm says; RMSNorm for the
 * q/k norms and post-norms, which exist only in RMSNorm models) of x into out, with the
 * scale into `scale` and the hook_scale / hook_normalized sites (k_scale, k_norm) of layer L.
 * w and b may be NULL. */
lp_status blk_norm(lp_model *m, void *out, void *scale, const void *x, const void *w, const void *b, int rows, int width,
                      int k_scale, int k_norm, int L);
/* Its backward from dy at the output (dy may be overwritten), with the two gradient sites,
 * given the saved input x and scale; dx is written. */
lp_status blk_norm_backward(lp_model *m, bw_bufs *g, void *dx, void *dy, const void *x, const void *scale, const void *w,
                               int rows, int width, int k_scale, int k_norm, int L);

/* The embedding (times cfg.embed_scale) and, for learned positions, the position embedding,
 * into the residual stream, with hook_embed and hook_pos_embed. */
lp_status blk_embed(lp_model *m, int B, int T);
/* The gradient at the residual stream's start into the embeddings' sites. */
lp_status blk_embed_backward(lp_model *m, bw_bufs *g);

/* The attention block of layer L (norm, q/k/v, q/k norms, rotary, attention, output
 * projection, post-norm) added to the residual stream; and its backward. */
lp_status blk_attn(lp_model *m, int L, int B, int T);
lp_status blk_attn_backward(lp_model *m, bw_bufs *g, int L, int B, int T);

/* The MLP block of layer L (norm, the MLP variant of cfg.mlp, post-norm); and its backward. */
lp_status blk_mlp(lp_model *m, int L, int N);
lp_status blk_mlp_backward(lp_model *m, bw_bufs *g, int L, int N);

/* Each block in two steps around the all-reduce of its row-split projection (blk_attn and
 * blk_mlp are the start with req NULL, then the finish): the start runs the block up to
 * this rank's partial output and starts its sum over the TP group (*req; tp_linear_start),
 * the finish waits for it, adds the bias, runs the post-norm and the output site and adds
 * the block's output to the residual stream. Work queued in between overlaps the sum. */
lp_status blk_attn_start(lp_model *m, int L, int B, int T, struct lp_dist_req **req);
lp_status blk_attn_finish(lp_model *m, int L, int N, struct lp_dist_req *req);
lp_status blk_mlp_start(lp_model *m, int L, int N, struct lp_dist_req **req);
lp_status blk_mlp_finish(lp_model *m, int L, int N, struct lp_dist_req *req);

/* A block's output `branch` (before its post-norm, if the model has them) through the
 * post-norm (weight role wpost, its scale into `scale`, hooks k_scale / k_norm) and the output
 * site k_out (hook_attn_out / hook_mlp_out) into the residual stream. The backward takes
 * g->dresid on its own copy (so that a direction injected at the output stays on its
 * branch) to *dbr, the gradient at `branch`. */
lp_status blk_branch_out(lp_model *m, void *branch, void *scale, int wpost, int k_scale, int k_norm, int k_out, int L, int N);
lp_status blk_branch_out_backward(lp_model *m, bw_bufs *g, const void *branch, const void *scale, int wpost, int k_scale,
                                     int k_norm, int k_out, int L, int N, void **dbr);

/* The final norm into m->a.ln_out, then model_unembed; and the backward of the final norm
 * from g->dln into g->dresid. */
lp_status blk_final(lp_model *m, int N, int want);
lp_status blk_final_backward(lp_model *m, bw_bufs *g, int N);

/* The rotary tables for positions [0, n_pos) (rope.c), global and local. */
lp_status rope_tables_grow(lp_model *m, int n_pos);
void rope_free(lp_model *m);

/* The decoder every family is (GPT-2, the Llama family, Gemma 2 and 3 differ only in config
 * fields the blocks read): embed; per layer the attention and MLP blocks between the
 * resid_pre, resid_mid and resid_post sites; the final norm and the unembedding. The
 * backward is the same script read upwards. An architecture that differs in its order of
 * blocks writes its own script and names it in its table. */
lp_status decoder_forward(lp_model *m, int B, int T, int want);
lp_status decoder_backward(lp_model *m, bw_bufs *g, int B, int T, int top);

/* The last layer a forward must run: all of them when it wants logits, losses or the final
 * norm, or generates; else the last one a hook touches (or the tape reaches). */
int blk_last_layer(const lp_model *m, int want);

#endif
