/* frozen.h: the backward of the local replacement model, the linear map attribution graphs
 * are made of (circuit-tracer's ReplacementModel):
 *   - attention patterns and every norm's scale are frozen at their values on the prompt
 *     (the backward treats them as constants: a norm passes g * w / scale, centred for a
 *     LayerNorm, and attention passes gradient through its values and output only);
 *   - each MLP is cut: only a transcoder's linear skip (if any) carries gradient from the
 *     MLP's output back to its input;
 * so the gradient at every residual site is linear in what is injected.
 *
 *   lp_frozen *f;
 *   lp_frozen_new(&f, m, tokens, T);          // one forward, keeps what the backward needs
 *   lp_frozen_backward(f, R, layer, pos, vec, skip, sink, user);
 *
 * Row r of a backward injects vec[r] (d_model) at position pos[r] of layer layer[r]'s MLP
 * input (the second norm's output, after its weight; or before it, sites.input_normalized),
 * or of the final norm's output when layer[r] = n_layers (a logit direction: the soft-capped
 * logits are never differentiated through their cap, as circuit-tracer). The sink then sees,
 * from the top layer down, the gradient at each layer's MLP output (L, G [R, Tm, d_model]:
 * hook_mlp_out, after a post-norm; or sites.output_before_post_norm, the MLP's own output,
 * the post-norm's input) and last at the embedding (L = -1), where Tm = 1 + the largest
 * pos[r] (causal attention carries nothing to later positions); layers above every
 * injection (whose gradient is zero) are not shown.
 * Gemma 2 and 3 (circuit-tracer's handling): the post-attention and post-MLP norms are
 * frozen like the others; the attention soft-cap, the sliding windows and the q/k norms live
 * inside the frozen patterns; the embeddings (lp_frozen_embed) carry the embedding scale;
 * the logits (lp_frozen_logits) the final soft-cap. F32 models (CPU, or CUDA: the forward
 * runs there and what it keeps is copied to the host) without biased projections. The
 * device backward (graph.device = cuda) covers the same, Gemma's features and sites
 * included. */
#ifndef LOUPE_FROZEN_H
#define LOUPE_FROZEN_H

#include "loupe/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lp_frozen lp_frozen;
typedef lp_status (*lp_frozen_sink)(int L, const float *G, int R, int Tm, void *user);

typedef struct lp_frozen_sites {
    int input_normalized;       /* the transcoders read ln2.hook_normalized (before the norm's
                                 * weight), not mlp.hook_in */
    int output_before_post_norm; /* they write the MLP's own output (mlp.hook_out), which a
                                 * post-norm (Gemma) follows; 0: hook_mlp_out */
} lp_frozen_sites;

lp_status lp_frozen_new(lp_frozen **out, lp_model *m, const int32_t *tokens, int T);
/* The same with the transcoders' read and write sites (NULL: mlp.hook_in, hook_mlp_out). */
lp_status lp_frozen_new_sites(lp_frozen **out, lp_model *m, const int32_t *tokens, int T, const lp_frozen_sites *s);
void lp_frozen_free(lp_frozen *f);
/* What the forward saw, host F32: the MLP's input and output at the sites of
 * layer L [T, d_model]; the (soft-capped) logits at the last position [d_vocab]; the unembedding
 * [d_vocab, d_model]; the token embeddings of the prompt [T, d_model], times the embedding scale. */
const float *lp_frozen_mlp_in(const lp_frozen *f, int L);
const float *lp_frozen_mlp_out(const lp_frozen *f, int L);
const float *lp_frozen_logits(const lp_frozen *f);
const float *lp_frozen_unembed(const lp_frozen *f);
const float *lp_frozen_embed(const lp_frozen *f);
/* skip: NULL, or per layer NULL or the skip W_skip [d_model, d_model] in circuit-tracer's
 * orientation [out, in] (skip = x W_skip^T). */
lp_status lp_frozen_backward(lp_frozen *f, int R, const int *layer, const int *pos, const float *vec,
                             const float *const *skip, lp_frozen_sink sink, void *user);
/* Host bytes lp_frozen_new keeps for T tokens, and a backward of R rows needs besides. */
size_t lp_frozen_bytes(const lp_config *c, int T);
size_t lp_frozen_backward_bytes(const lp_config *c, int T, int R);
/* Computes every layer's attention pattern once and keeps it, so that backward passes no
 * longer recompute them (the frozen patterns of T tokens, lp_frozen_pattern_bytes bytes;
 * a prefix's pattern is the top-left block of the whole prompt's). Results equal the
 * recomputed ones to float rounding. */
lp_status lp_frozen_cache_patterns(lp_frozen *f);
size_t lp_frozen_pattern_bytes(const lp_config *c, int T);

#ifdef __cplusplus
}
#endif
#endif
