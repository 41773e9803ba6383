/* ops.h: every numeric op the engine uses, behind one dispatch point.
 *
 * Each op runs on the context's device: the CPU reference lives in host/cpu/, the
 * CUDA kernel in kernels/. Buffers marked "act" hold values of the context's dtype
 * (F32 on the CPU, F32 or BF16 on CUDA) and live on the context's device; token and
 * index buffers are int32 on that device; losses are always F32.
 * Shapes are given in comments as [rows, cols] with the last dimension contiguous.
 * Every op accumulates in fp32 (the CPU reference may use wider accumulators). */
#ifndef LOUPE_OPS_H
#define LOUPE_OPS_H

#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[N,D] = wte[tok[n], :]; tokens were range-checked on the host. */
lp_status lp_embed(lp_ctx *c, void *out, const int32_t *tok, const void *wte, int N, int D);
/* out[B,T,D] = wpe[t, :] for every b. */
lp_status lp_pos_embed(lp_ctx *c, void *out, const void *wpe, int B, int T, int D);
/* out[i] = a[i] + b[i]; out may alias a or b. */
lp_status lp_add(lp_ctx *c, void *out, const void *a, const void *b, size_t n);

/* LayerNorm in TransformerLens's pieces:
 *   scale[N]   = sqrt(mean_d((x - mean_d x)^2) + eps)          (hook_scale)
 *   out[N,D]   = (x - mean_d x) / scale  [* w[D] + b[D]]          (hook_normalized, then affine)
 * With w == NULL and b == NULL lp_ln_apply writes the normalized value only. */
lp_status lp_ln_scale(lp_ctx *c, void *scale, const void *x, int N, int D, float eps);
lp_status lp_ln_apply(lp_ctx *c, void *out, const void *x, const void *scale,
                      const void *w, const void *b, int N, int D);
/* out[N,D] = x * w[D] + b[D] (b may be NULL). out may alias x. */
lp_status lp_affine(lp_ctx *c, void *out, const void *x, const void *w, const void *b, int N, int D);

/* out[N,M] = x[N,K] @ W + bias[M]. W is [K,M] (w_trans = 0, the GPT-2 Conv1D layout)
 * or [M,K] (w_trans = 1, the nn.Linear layout and a tied unembedding). bias may be NULL. */
lp_status lp_matmul(lp_ctx *c, void *out, const void *x, const void *w, const void *bias,
                    int N, int K, int M, int w_trans);

/* GELU, tanh form (GPT-2's "gelu_new"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). */
lp_status lp_gelu(lp_ctx *c, void *out, const void *x, size_t n);

/* pre[N,M] = x @ W + bias (as lp_matmul) and post = gelu(pre), in one GEMM where the device
 * allows (a cuBLASLt epilogue in BF16: GELU of the fp32 sum, so post may differ from
 * lp_gelu(pre) by one bf16 rounding); pre and post are distinct buffers. */
lp_status lp_matmul_gelu(lp_ctx *c, void *post, void *pre, const void *x, const void *w, const void *bias, int N, int K,
                         int M, int w_trans);

/* Causal attention. q is [B,T,H,dh]; k and v are [B,T,Hkv,dh] with H % Hkv == 0
 * (query head h reads kv head h / (H/Hkv)); softmax scale is 1/sqrt(dh); dh <= 256.
 * lp_attention is fused: it never materialises the [T,T] score matrix.
 * The three-step form exists for the hooks hook_attn_scores and hook_pattern:
 *   scores[B,H,T,T] = q.k / sqrt(dh), -inf where key > query
 *   pattern = softmax over the last axis (exp(-inf) = 0)
 *   z[B,T,H,dh] = pattern @ v */
lp_status lp_attention(lp_ctx *c, void *z, const void *q, const void *k, const void *v,
                       int B, int T, int H, int Hkv, int dh);
lp_status lp_attn_scores(lp_ctx *c, void *scores, const void *q, const void *k,
                         int B, int T, int H, int Hkv, int dh);
lp_status lp_softmax_rows(lp_ctx *c, void *out, const void *x, size_t rows, int cols);
lp_status lp_attn_apply(lp_ctx *c, void *z, const void *pattern, const void *v,
                        int B, int T, int H, int Hkv, int dh);

/* Attention options (Gemma 2 / Gemma 3). A NULL cfg, or a zeroed one, is the causal
 * attention above; every attention op with a cfg argument reads it the same way:
 *   scale    multiplier of q.k; 0: 1/sqrt(dh)
 *   softcap  > 0: s = softcap * tanh(s / softcap), after the scale and before the mask
 *   window   > 0: query i sees keys j with i - window < j <= i (Hugging Face's sliding_window,
 *            in absolute positions for lp_attention_cached_cfg); 0: every key j <= i
 * Masked keys score exactly -inf and get probability exp(-inf) = 0; the diagonal is always
 * visible, so no row is fully masked. lp_attn_scores_cfg writes what TransformerLens's
 * hook_attn_scores holds: scale * q.k, softcapped, -inf where masked. */
typedef struct lp_attn_cfg {
    float scale;
    float softcap;
    int window;
} lp_attn_cfg;
lp_status lp_attention_cfg(lp_ctx *c, void *z, const void *q, const void *k, const void *v,
                           int B, int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg);
lp_status lp_attn_scores_cfg(lp_ctx *c, void *scores, const void *q, const void *k,
                             int B, int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg);

/* ---- Llama family ----
 * RMSNorm in TransformerLens's pieces (RMSNormPre, then the weight):
 *   scale[N] = sqrt(mean_d(x^2) + eps)                            (hook_scale)
 *   out[N,D] = x / scale [* w[D]]                                 (hook_normalized, then weight)
 * With w == NULL lp_rms_apply writes the normalized value only. */
lp_status lp_rms_scale(lp_ctx *c, void *scale, const void *x, int N, int D, float eps);
lp_status lp_rms_apply(lp_ctx *c, void *out, const void *x, const void *scale, const void *w, int N, int D);

/* Rotary position embedding, rotate-half form (Hugging Face Llama/Qwen2/Mistral):
 * x is [B,T,H,dh]; token t sits at position pos0 + t; i < dh/2 pairs x[i] with x[i + dh/2]:
 *   out[i]        = x[i] cos(a) - x[i + dh/2] sin(a)
 *   out[i + dh/2] = x[i + dh/2] cos(a) + x[i] sin(a),    a = p * inv_freq[i]
 * cos_t and sin_t are F32 tables [n_pos, dh/2] on the device holding cos/sin(p * inv_freq[i])
 * (built once on the host in double, with any rope scaling applied to inv_freq).
 * pos0 + T <= n_pos. out may alias x. */
lp_status lp_rope(lp_ctx *c, void *out, const void *x, const float *cos_t, const float *sin_t,
                  int B, int T, int H, int dh, int pos0);

/* SwiGLU: out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)). out may alias either. */
lp_status lp_silu_mul(lp_ctx *c, void *out, const void *gate, const void *up, size_t n);

/* Attention against a KV cache (generation). q is [B,Tq,H,dh] for the tokens at positions
 * pos0 .. pos0+Tq-1; kc and vc are [B,Tcap,Hkv,dh] caches whose first pos0+Tq positions are
 * filled. Query i attends keys 0 .. pos0+i. z is [B,Tq,H,dh]. Same GQA rule and scale as
 * lp_attention; with pos0 = 0 and Tcap = Tq it equals lp_attention. */
lp_status lp_attention_cached(lp_ctx *c, void *z, const void *q, const void *kc, const void *vc,
                              int B, int Tq, int Tcap, int pos0, int H, int Hkv, int dh);
/* The same with attention options (query i sits at absolute position pos0 + i, and the
 * window counts absolute positions); with pos0 = 0 and Tcap = Tq it equals lp_attention_cfg. */
lp_status lp_attention_cached_cfg(lp_ctx *c, void *z, const void *q, const void *kc, const void *vc,
                                  int B, int Tq, int Tcap, int pos0, int H, int Hkv, int dh,
                                  const lp_attn_cfg *cfg);

/* ---- a query suffix over all keys (attribution patching's shared prefix) ----
 * Queries at absolute positions pos0 .. pos0+Tq-1 of rows of Tk = pos0 + Tq keys, all given:
 * q, z, dq, dz [B,Tq,H,dh]; k, v [B,Tk,Hkv,dh]; scores, pattern and their gradients
 * [B,H,Tq,Tk]; masks, window and soft-cap as lp_attn_cfg, in absolute positions. The backward
 * ops write dk and dv [B,Tq,Hkv,dh] of the suffix's keys only (positions pos0 ..): the prefix's
 * keys are constants to the suffix. With pos0 = 0 each is its square op. lp_attention_suffix
 * is lp_attention_cached_cfg with Tcap = Tk on the GPU; lp_attention_backward_suffix runs on
 * both; the three-step ones are CPU only (LP_ERR_ARG on the GPU). */
lp_status lp_attention_suffix(lp_ctx *c, void *z, const void *q, const void *k, const void *v, int B, int Tq, int pos0,
                              int H, int Hkv, int dh, const lp_attn_cfg *cfg);
lp_status lp_attn_scores_suffix(lp_ctx *c, void *scores, const void *q, const void *k, int B, int Tq, int pos0, int H,
                                int Hkv, int dh, const lp_attn_cfg *cfg);
lp_status lp_attn_apply_suffix(lp_ctx *c, void *z, const void *pattern, const void *v, int B, int Tq, int pos0, int H,
                               int Hkv, int dh);
lp_status lp_attention_backward_suffix(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q, const void *k,
                                       const void *v, int B, int Tq, int pos0, int H, int Hkv, int dh, const lp_attn_cfg *cfg);
lp_status lp_attn_apply_backward_suffix(lp_ctx *c, void *dpattern, void *dv, const void *dz, const void *pattern,
                                        const void *v, int B, int Tq, int pos0, int H, int Hkv, int dh);
lp_status lp_attn_scores_backward_suffix(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *scores,
                                         const void *q, const void *k, int B, int Tq, int pos0, int H, int Hkv, int dh,
                                         const lp_attn_cfg *cfg);

/* ---- Gemma family ----
 * GeGLU (gelu_pytorch_tanh): out[i] = gelu_tanh(gate[i]) * up[i], gelu_tanh as lp_gelu.
 * out may alias either input. */
lp_status lp_gelu_mul(lp_ctx *c, void *out, const void *gate, const void *up, size_t n);
/* Soft-capping (Gemma 2's final logits): out = cap * tanh(x / cap), cap > 0. out may alias x. */
lp_status lp_softcap(lp_ctx *c, void *out, const void *x, float cap, size_t n);
/* out = x * s (the embedding times sqrt(d_model)), in the activation dtype. out may alias x. */
lp_status lp_scale(lp_ctx *c, void *out, const void *x, float s, size_t n);

/* losses[n] = logsumexp(logits[n,:]) - logits[n, target[n]]; target[n] < 0 gives 0.
 * logits is act [N,V]; losses is F32 on the context's device. */
lp_status lp_cross_entropy(lp_ctx *c, float *losses, const void *logits, const int32_t *targets,
                           int N, int V);
/* The same over rows ld >= V apart, of which only the first V columns are read (the logits of
 * an unembedding padded to a multiple of 64 columns). */
lp_status lp_cross_entropy_ld(lp_ctx *c, float *losses, const void *logits, const int32_t *targets,
                              int N, int V, int ld);

/* ---- backward ops (attribution gradients) ----
 * Each takes the upstream gradient dy of the forward op's output and the forward's saved
 * inputs, and writes the gradient of its inputs (same dtype and device rules as the forward
 * ops). Outputs are written, not accumulated, unless the comment says "+=". */

/* LayerNorm (pieces as lp_ln_scale / lp_ln_apply with weight w, bias b), given the saved
 * input x and scale: dx = d/dx of sum(dy * ((x - mean)/scale * w + b)); w may be NULL
 * (normalized value only). */
lp_status lp_ln_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale, const void *w, int N, int D);
/* RMSNorm: dx for y = x / scale * w (w may be NULL), scale = sqrt(mean(x^2) + eps). */
lp_status lp_rms_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale, const void *w, int N, int D);
/* The gradient at the norm's hook_scale (the scale as a node of its own, x held fixed):
 *   dscale[n] = -(1 / scale[n]) sum_d dy[n,d] w[d] xh[n,d],  xh = (x - mean) / scale
 * (center = 1, LayerNorm) or x / scale (center = 0, RMSNorm); w may be NULL. */
lp_status lp_norm_scale_grad(lp_ctx *c, void *dscale, const void *dy, const void *x, const void *scale, const void *w, int N,
                             int D, int center);
/* dx = dy * gelu_tanh'(x); dx may alias dy. */
lp_status lp_gelu_backward(lp_ctx *c, void *dx, const void *dy, const void *x, size_t n);
/* y = silu(gate) * up: dgate = dy * up * silu'(gate), dup = dy * silu(gate). */
lp_status lp_silu_mul_backward(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate, const void *up, size_t n);
/* y = gelu_tanh(gate) * up: dgate = dy * up * gelu_tanh'(gate), dup = dy * gelu_tanh(gate). */
lp_status lp_gelu_mul_backward(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate, const void *up,
                               size_t n);
/* y = cap * tanh(x / cap), from the capped output y: dx = dy * (1 - (y / cap)^2). dx may alias dy. */
lp_status lp_softcap_backward(lp_ctx *c, void *dx, const void *dy, const void *y, float cap, size_t n);
/* RoPE is a rotation: its backward rotates dy by the opposite angle (same tables). dx may alias dy. */
lp_status lp_rope_backward(lp_ctx *c, void *dx, const void *dy, const float *cos_t, const float *sin_t, int B, int T, int H,
                           int dh, int pos0);
/* Fused causal attention (as lp_attention): dq [B,T,H,dh], dk and dv [B,T,Hkv,dh] (summed over
 * the query heads of each kv group) from dz [B,T,H,dh] and the saved q, k, v. */
lp_status lp_attention_backward(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q, const void *k,
                                const void *v, int B, int T, int H, int Hkv, int dh);
/* The same for lp_attention_cfg (cfg as there; NULL = lp_attention_backward). */
lp_status lp_attention_backward_cfg(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q,
                                    const void *k, const void *v, int B, int T, int H, int Hkv, int dh,
                                    const lp_attn_cfg *cfg);
/* The three-step form, for gradients at hook_attn_scores and hook_pattern:
 *   lp_attn_apply:  dpattern[B,H,T,T] = dz . v ; dv = pattern^T dz (summed over the group)
 *   lp_softmax_rows: dx = y * (dy - sum_j dy_j y_j) for y = softmax(x) (rows, cols)
 *   lp_attn_scores:  dq = dscores k / sqrt(dh); dk = dscores^T q / sqrt(dh) (summed over the group);
 *                    masked entries (key > query) of dscores are ignored */
lp_status lp_attn_apply_backward(lp_ctx *c, void *dpattern, void *dv, const void *dz, const void *pattern, const void *v,
                                 int B, int T, int H, int Hkv, int dh);
lp_status lp_softmax_rows_backward(lp_ctx *c, void *dx, const void *dy, const void *y, size_t rows, int cols);
lp_status lp_attn_scores_backward(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *q, const void *k, int B,
                                  int T, int H, int Hkv, int dh);
/* The same for lp_attn_scores_cfg, with r = scale * q.k the raw score and s = softcap * tanh(r /
 * softcap) the saved scores (lp_attn_scores_cfg's output, read only when softcap > 0; may be
 * NULL otherwise): dr = dscores * (1 - (s / softcap)^2); dq = dr k * scale; dk = dr^T q * scale.
 * Entries outside the causal window of dscores (and of scores) are ignored. */
lp_status lp_attn_scores_backward_cfg(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *scores,
                                      const void *q, const void *k, int B, int T, int H, int Hkv, int dh,
                                      const lp_attn_cfg *cfg);
/* dlogits[n,:] = scale[n] * (softmax(logits[n,:]) - onehot(target[n])); rows with target < 0
 * are zero. scale is F32 on the device [N]. (The gradient of the next-token loss.) */
lp_status lp_xent_backward(lp_ctx *c, void *dlogits, const void *logits, const int32_t *targets, const float *scale, int N,
                           int V);
/* The same over rows ld >= V apart; the columns [V, ld) of dlogits get zero. */
lp_status lp_xent_backward_ld(lp_ctx *c, void *dlogits, const void *logits, const int32_t *targets, const float *scale,
                              int N, int V, int ld);

/* ---- hook views: how edits and position-limited captures address an activation ----
 * Every hook activation is viewed as four axes [B, X1, X2, E] with E contiguous:
 *   [B,T,D]        -> head_outer = 0, P = T, H = 1,  E = D
 *   [B,T,H,dh]     -> head_outer = 0, P = T, H = H,  E = dh   (memory order b,p,h,e)
 *   [B,H,Tq,Tk]    -> head_outer = 1, P = Tq, H = H, E = Tk   (memory order b,h,p,e)
 * "Position" always means the query/token position P. */
typedef struct lp_view {
    int B, P, H, E;
    int head_outer;
} lp_view;

typedef enum lp_edit_kind {
    LP_EDIT_ZERO = 0, /* act = 0 */
    LP_EDIT_SET,      /* act[b,p,h,e] = src[h,e]          (mean ablation; src is per-token [H,E]) */
    LP_EDIT_ADD,      /* act[b,p,h,e] += coef * src[h,e]  (steering) */
    LP_EDIT_PATCH,    /* act[b,p,h,e] = src[b,p,h,e]      (src has the full view shape and layout) */
} lp_edit_kind;

/* Applies the edit where pos_mask[p] and head_mask[h] are non-zero (NULL = all).
 * src is act dtype on the device; the masks are uint8 on the device. */
lp_status lp_edit_apply(lp_ctx *c, void *act, lp_view v, lp_edit_kind kind, const void *src,
                        float coef, const uint8_t *pos_mask, const uint8_t *head_mask);
/* dst = act restricted to positions pos[0..npos) along P, same layout otherwise:
 * [B,npos,H,E] (or [B,H,npos,E] when head_outer). pos is int32 on the device. */
lp_status lp_gather_pos(lp_ctx *c, void *dst, const void *act, lp_view v, const int32_t *pos, int npos);
/* out[r] = sum over i < per of (a[r*per + i] - b[r*per + i]) * g[r*per + i], for r < rows:
 * per-node sums of an activation difference times a gradient (attribution patching's node
 * scores, formed where the backward produces the gradient). a, b, g in the act dtype on the
 * device; out F32 on the device. Accumulated in double, rounded once. */
lp_status lp_diff_dot_rows(lp_ctx *c, float *out, const void *a, const void *b, const void *g, size_t rows, size_t per);

#ifdef __cplusplus
}
#endif
#endif
