/* sae_ops.h: the numeric pieces of SAE training and inference, each with a CPU
 * reference (host/cpu/sae.c) and a CUDA kernel (kernels/sae.cu), dispatched on the
 * context's device (host/ops/sae_ops.c). Every buffer is F32 on the context's device unless
 * it says otherwise; index buffers are int32. Shapes: N tokens, D = d_in (or d_out),
 * S = d_sae, K = k. Gradients are checked against finite differences in the tests. */
#ifndef LOUPE_SAE_OPS_H
#define LOUPE_SAE_OPS_H

#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* out[K,M] = beta * out + a^T b for a [N,K], b [N,M] (weight gradients). beta is 0 or 1. */
lp_status lp_matmul_at(lp_ctx *c, float *out, const float *a, const float *b, int N, int K, int M, float beta);
/* out[M] = beta * out + sum over rows of x[N,M]. */
lp_status lp_col_sum(lp_ctx *c, float *out, const float *x, int N, int M, float beta);

/* Per row: the K largest values of pre[N,S] (ties: the lower index first), as
 * idx[N,K] (int32) and val[N,K] = relu(value), in descending order. */
lp_status lp_sae_topk(lp_ctx *c, int32_t *idx, float *val, const float *pre, int N, int S, int K);
/* lp_sae_topk restricted to the candidate latents cand[n_cand] (int32, strictly
 * increasing, each in [0, S)): per row, the K largest of pre[n, cand[.]] (ties: the lower
 * latent first) as latent indices idx[N,K] and val[N,K] = relu(value), best first.
 * 1 <= K <= n_cand. AuxK's selection over the dead latents, read straight from pre. */
lp_status lp_sae_topk_among(lp_ctx *c, int32_t *idx, float *val, const float *pre, const int32_t *cand, int n_cand,
                            int N, int S, int K);
/* The value t such that exactly `count` entries of relu(pre[N,S]) are > t when there are
 * at least that many positive entries (else 0): the BatchTopK threshold. Host scalar out. */
lp_status lp_sae_kth_largest(lp_ctx *c, float *t, const float *pre, size_t n, size_t count);
/* One pass of lp_sae_kth_largest's radix selection, for a selection over data that lies in
 * pieces (a batch split over data-parallel ranks: the histograms add): hist[256] (int64 on
 * c's device, written) counts the positive entries v of pre[n] whose bit pattern u has
 * (u & mask) == prefix, by the byte (u >> shift) & 255. shift is 24, 16, 8 or 0 and mask
 * covers exactly the bytes above shift. */
lp_status lp_sae_radix_hist(lp_ctx *c, int64_t *hist, const float *pre, size_t n, uint32_t prefix, uint32_t mask, int shift);
/* The selection step after a pass (host memory): with *rank the wanted entry's rank from the
 * top among those under *prefix (1: the largest), picks the byte at shift whose bin holds it
 * from the summed hist[256], adds it to *prefix and *mask and makes *rank its rank within
 * that bin. 0 (nothing changed) when the bins hold fewer than *rank entries (then
 * lp_sae_kth_largest's answer is 0), and for a shift other than 24, 16, 8, 0 or a rank
 * below 1. Start with *rank = count + 1, *prefix = *mask = 0 and
 * shift 24; after shift 0 the answer's bit pattern is *prefix. */
int lp_sae_radix_pick(const int64_t *hist, int64_t *rank, uint32_t *prefix, uint32_t *mask, int shift);

/* out[N,D] = bias[D] + sum_j val[n,j] * W[idx[n,j], :] for W [S,D] (bias may be NULL).
 * Only the K active rows of W are read. */
lp_status lp_sae_decode_sparse(lp_ctx *c, float *out, const int32_t *idx, const float *val, const float *W,
                               const float *bias, int N, int K, int D);
/* The backward of lp_sae_decode_sparse for dout [N,D]:
 *   dval[n,j] = dout[n,:] . W[idx[n,j],:]               (written)
 *   dW[idx[n,j],:] += val[n,j] * dout[n,:]               (accumulated; rows never touched
 *                                                          are not written at all) */
lp_status lp_sae_decode_sparse_grad(lp_ctx *c, float *dval, float *dW, const float *dout, const int32_t *idx,
                                    const float *val, const float *W, int N, int K, int D);
/* The encoder rows of the active latents only: dpre_sparse[n,j] is the gradient of the
 * pre-activation of latent idx[n,j]; dW_enc[:, idx] += x[n,:]^T dpre[n,j] and
 * db_enc[idx] += dpre[n,j] (accumulated). W_enc is [D,S]. */
lp_status lp_sae_encode_sparse_grad(lp_ctx *c, float *dW_enc, float *db_enc, const float *x, const int32_t *idx,
                                    const float *dpre, int N, int K, int D, int S);

/* Latent-major lists of the entries of idx[N,K] (each in [0, S)), in the int32 buffer
 * lists of lp_sae_latent_lists_len(N, K, S) entries: lists[0..S] are the starts (latent s
 * owns ent[start[s] .. start[s+1])), ent = lists + 2S + 1 holds the entries e = n*K + j by
 * latent and, within a latent, in token order; the S words between are scratch. */
size_t lp_sae_latent_lists_len(int N, int K, int S);
lp_status lp_sae_latent_lists(lp_ctx *c, int32_t *lists, const int32_t *idx, int N, int K, int S);
/* lp_sae_encode_sparse_grad from the lists of the same idx: each column of dW_enc and each
 * db_enc entry takes its latent's terms in token order from one thread (no atomics; the
 * same result on every run). */
lp_status lp_sae_encode_sparse_grad_lists(lp_ctx *c, float *dW_enc, float *db_enc, const float *x, const int32_t *lists,
                                          const float *dpre, int N, int K, int D, int S);
/* lp_sae_decode_sparse_grad with the lists of the same idx (lp_sae_latent_lists, S latents):
 * dval as there; each row of dW [S,D] takes its latent's terms in token order from one
 * thread (no atomics; the same result on every run). Rows no token chose are not written. */
lp_status lp_sae_decode_sparse_grad_lists(lp_ctx *c, float *dval, float *dW, const float *dout, const int32_t *idx,
                                          const int32_t *lists, const float *val, const float *W, int N, int K, int D,
                                          int S);

/* bf16 (uint16 bit patterns) copies: dst[i] = src[i] rounded to nearest even. */
lp_status lp_sae_to_bf16(lp_ctx *c, uint16_t *dst, const float *src, size_t n);
/* out[N,M] (F32) = x[N,K] @ w[K,M] + bias[M] (F32, may be NULL) for bf16 x and w: products
 * of the bf16 values summed in fp32, the bias added to the fp32 sum (on CUDA a cuBLASLt bias
 * epilogue), one F32 result. The pre-activation GEMM on a bf16 copy of the encoder. */
lp_status lp_sae_matmul_bf16(lp_ctx *c, float *out, const uint16_t *x, const uint16_t *w, const float *bias, int N,
                             int K, int M);

/* The input gradient through the active encoder columns (for x_in = x - b_dec):
 *   dx[n,d] = sum_j dpre[n,j] * W_enc[d, idx[n,j]]          (written) */
lp_status lp_sae_encode_sparse_input_grad(lp_ctx *c, float *dx, const float *dpre, const int32_t *idx, const float *W_enc,
                                          int N, int K, int D, int S);
/* x *= alpha, in place. */
lp_status lp_sae_scale(lp_ctx *c, float *x, float alpha, size_t n);

/* Dense activations, in place allowed:
 *   relu:     f = max(pre, 0)
 *   jumprelu: f = pre * (pre > theta[s]) */
lp_status lp_sae_relu(lp_ctx *c, float *f, const float *pre, size_t n);
lp_status lp_sae_jumprelu(lp_ctx *c, float *f, const float *pre, const float *theta, int N, int S);
/* Backward of the activations for df [N,S]:
 *   relu:     dpre = df * (pre > 0)
 *   jumprelu: dpre = df * (pre > theta); and with the rectangle-kernel straight-through
 *             estimator of bandwidth eps (Rajamanoharan et al. 2024), for the threshold:
 *             dtheta[s] += sum_n [ -(theta/eps) * K((pre - theta)/eps) * df[n,s]
 *                                   + l0_coef * -(1/eps) * K((pre - theta)/eps) ]
 *             with K(u) = 1 if |u| < 1/2 else 0 (l0_coef already divided by N). */
lp_status lp_sae_relu_grad(lp_ctx *c, float *dpre, const float *df, const float *pre, size_t n);
lp_status lp_sae_jumprelu_grad(lp_ctx *c, float *dpre, float *dtheta, const float *df, const float *pre,
                               const float *theta, float eps, float l0_coef, int N, int S);
/* The standard SAE's backward through its ReLU and its L1 penalty weighted per latent by
 * w [S] (l1 / N times the decoder row norm), in one pass over df, pre [N,S]:
 *   dpre[n,s] = pre[n,s] > 0 ? df[n,s] + w[s] : 0     (dpre may alias df)
 *   db[s]    += sum_n dpre[n,s]                          (the b_enc gradient)
 *   fsum[s]   = sum_n max(pre[n,s], 0)                   (the penalty's column sums) */
lp_status lp_sae_l1_relu_grad(lp_ctx *c, float *dpre, float *db, float *fsum, const float *df, const float *pre,
                              const float *w, int N, int S);

/* Adam (Kingma & Ba), fused, bias-corrected at step t >= 1:
 *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
 *   p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) */
lp_status lp_adam_step(lp_ctx *c, float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                       float b2, float eps, int t);
/* W [S,D]: every row scaled to unit L2 norm (zero rows left alone). */
lp_status lp_rows_unit_norm(lp_ctx *c, float *W, int S, int D);
/* dW [S,D]: removes from each row its component parallel to the (unit) row of W. */
lp_status lp_rows_remove_parallel(lp_ctx *c, float *dW, const float *W, int S, int D);
/* out[S] = L2 norm of each row of W [S,D]. */
lp_status lp_rows_norm(lp_ctx *c, float *out, const float *W, int S, int D);

/* Metrics over a batch, reduced on the device, results on the host (double):
 *   sums[0] = sum (x_hat - x)^2, sums[1] = sum (x - mean_n x)^2 (per-dim mean over the
 *   batch), sums[2] = sum over tokens of cos(x_hat, x), sums[3] = sum of ||x_hat|| / ||x||
 * for x, x_hat [N,D]. */
lp_status lp_sae_recon_sums(lp_ctx *c, double sums[4], const float *x, const float *x_hat, int N, int D);
/* counts[s] += number of tokens where latent s fired, from sparse (idx [N,K] with val > 0)
 * or dense (f [N,S], idx NULL) activations; counts is int64 on the device. */
lp_status lp_sae_fire_counts(lp_ctx *c, int64_t *counts, const int32_t *idx, const float *val, const float *f, int N,
                             int K, int S);

#ifdef __cplusplus
}
#endif
#endif
