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
 * input (the second norm's output, after its weight), or of the final norm's output when
 * layer[r] = n_layers (a logit direction). The sink then sees, from the top layer down, the
 * gradient at each layer's MLP output (L, G [R, Tm, d_model]) and last at the embedding
 * (L = -1), where Tm = 1 + the largest pos[r] (causal attention carries nothing to later
 * positions); layers above every injection (whose gradient is zero) are not shown.
 * F32 models (CPU or CUDA) of every family but those with post-norms (Gemma); soft-capped or
 * windowed attention is refused. */
#ifndef LOUPE_FROZEN_H
#define LOUPE_FROZEN_H

#include "loupe/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lp_frozen lp_frozen;
typedef lp_status (*lp_frozen_sink)(int L, const float *G, int R, int Tm, void *user);

lp_status lp_frozen_new(lp_frozen **out, lp_model *m, const int32_t *tokens, int T);
void lp_frozen_free(lp_frozen *f);
/* What the forward saw, host F32: the MLP's input (after the norm's weight) and output of
 * layer L [T, d_model]; the logits at the last position [d_vocab]; the unembedding
 * [d_vocab, d_model]; the token embeddings of the prompt [T, d_model]. */
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

#ifdef __cplusplus
}
#endif
#endif
