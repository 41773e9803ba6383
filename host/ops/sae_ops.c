/* sae_ops.c: the one dispatch point for the SAE ops of include/loupe/sae_ops.h.
 * Checks arguments once, then calls the CPU reference (host/cpu/sae.c) or the CUDA
 * kernel (kernels/sae.cu) by the context's device. Every float buffer is F32 whatever
 * the context's activation dtype (SAE training keeps F32 master weights).
 *
 * What the header leaves open, decided here (both back ends implement exactly this):
 *  - Order. Selection compares values by their float order with -0 just below +0 (the
 *    order of the sign-flipped bit patterns; a NaN with the sign bit clear ranks above
 *    +inf, one with it set below -inf). relu(v) is v > 0 ? v : +0, so NaN and -0 give +0.
 *  - lp_sae_topk: K <= S. On CUDA also K <= LP_SAE_TOPK_MAX_K_CUDA (2048).
 *  - lp_sae_kth_largest: with r = relu(pre) sorted in descending order r_1 >= r_2 >= ...,
 *    t = r_(count+1), and t = 0 when count >= n or fewer than count+1 entries are
 *    positive. So exactly `count` entries are > t unless r_count == r_(count+1) (a tie
 *    at the boundary: then all tied entries are <= t and fewer than count exceed it);
 *    count = 0 gives the largest value (nothing exceeds it); n = 0 gives 0. The
 *    SAELens-style threshold "smallest kept activation" (r_count) is
 *    lp_sae_kth_largest(count - 1).
 *  - Sparse ops: every idx must lie in [0, S) (not checked: S is not passed, and on
 *    the GPU the indices are device memory); entries with val = 0 are still read and
 *    written (they add zero). lp_sae_fire_counts alone ignores indices outside [0, S).
 *  - lp_sae_fire_counts counts entries, so a latent listed twice for one token (never
 *    the case for lp_sae_topk's output) counts twice. Dense: fired means f > 0.
 *  - lp_sae_recon_sums: a token with ||x|| = 0 or ||x_hat|| = 0 adds 0 to sums[2]; one
 *    with ||x|| = 0 adds 0 to sums[3].
 *  - In place: relu and jumprelu allow f == pre; their gradients allow dpre == df.
 *  - N = 0 is allowed everywhere: lp_matmul_at and lp_col_sum then leave beta * out.
 */
#include <math.h>
#include <stdint.h>

#include "loupe/sae_ops.h"
#include "ops/ops_internal.h"

#define NEED(cond, ...)                                                                       \
    do {                                                                                      \
        if (!(cond)) LP_FAIL(LP_ERR_ARG, __VA_ARGS__);                                        \
    } while (0)
#define CPU(c) ((c)->device == LP_CPU)
#define LP_SAE_TOPK_MAX_K_CUDA 2048 /* kernels/sae.cu sorts the K chosen in shared memory */

lp_status lp_matmul_at(lp_ctx *c, float *out, const float *a, const float *b, int N, int K, int M, float beta) {
    NEED(c && N >= 0 && K > 0 && M > 0 && out && (N == 0 || (a && b)),
         "matmul_at: bad arguments (N=%d K=%d M=%d)", N, K, M);
    NEED(beta == 0.0f || beta == 1.0f, "matmul_at: beta must be 0 or 1, got %g", (double)beta);
    if (N == 0) return beta == 0.0f ? lp_ctx_memset0(c, out, (size_t)K * M * sizeof(float)) : LP_OK;
    if (CPU(c)) { cpu_matmul_at(out, a, b, N, K, M, beta); return LP_OK; }
    return cuda_matmul_at(c, out, a, b, N, K, M, beta);
}

lp_status lp_col_sum(lp_ctx *c, float *out, const float *x, int N, int M, float beta) {
    NEED(c && N >= 0 && M > 0 && out && (N == 0 || x), "col_sum: bad arguments (N=%d M=%d)", N, M);
    NEED(beta == 0.0f || beta == 1.0f, "col_sum: beta must be 0 or 1, got %g", (double)beta);
    if (N == 0) return beta == 0.0f ? lp_ctx_memset0(c, out, (size_t)M * sizeof(float)) : LP_OK;
    if (CPU(c)) { cpu_col_sum(out, x, N, M, beta); return LP_OK; }
    return cuda_col_sum(c, out, x, N, M, beta);
}

lp_status lp_sae_topk(lp_ctx *c, int32_t *idx, float *val, const float *pre, int N, int S, int K) {
    NEED(c && N >= 0 && S > 0 && idx && val && pre, "sae_topk: bad arguments (N=%d S=%d K=%d)", N, S, K);
    NEED(K >= 1 && K <= S, "sae_topk: k=%d must be in 1 .. d_sae=%d", K, S);
    if (N == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_topk(idx, val, pre, N, S, K); return LP_OK; }
    NEED(K <= LP_SAE_TOPK_MAX_K_CUDA, "sae_topk: k=%d exceeds the CUDA limit of %d", K, LP_SAE_TOPK_MAX_K_CUDA);
    return cuda_sae_topk(c, idx, val, pre, N, S, K);
}

lp_status lp_sae_topk_among(lp_ctx *c, int32_t *idx, float *val, const float *pre, const int32_t *cand, int n_cand,
                            int N, int S, int K) {
    NEED(c && N >= 0 && S > 0 && idx && val && pre && cand && n_cand >= 1 && n_cand <= S,
         "sae_topk_among: bad arguments (N=%d S=%d n_cand=%d)", N, S, n_cand);
    NEED(K >= 1 && K <= n_cand, "sae_topk_among: k=%d must be in 1 .. %d candidates", K, n_cand);
    if (N == 0) return LP_OK;
    if (CPU(c)) {
        for (int i = 0; i < n_cand; i++) /* host memory: the contract is checked here */
            NEED(cand[i] >= 0 && cand[i] < S && (i == 0 || cand[i] > cand[i - 1]),
                 "sae_topk_among: candidate %d (latent %d) is out of [0, %d) or out of increasing order", i, cand[i], S);
        return cpu_sae_topk_among(idx, val, pre, cand, n_cand, N, S, K);
    }
    NEED(K <= LP_SAE_TOPK_MAX_K_CUDA, "sae_topk_among: k=%d exceeds the CUDA limit of %d", K, LP_SAE_TOPK_MAX_K_CUDA);
    return cuda_sae_topk_among(c, idx, val, pre, cand, n_cand, N, S, K);
}

lp_status lp_sae_kth_largest(lp_ctx *c, float *t, const float *pre, size_t n, size_t count) {
    NEED(c && t && (n == 0 || pre), "sae_kth_largest: bad arguments (n=%zu)", n);
    if (count >= n) { *t = 0.0f; return LP_OK; }
    c->n_d2h++; /* a host result */
    if (CPU(c)) { *t = cpu_sae_kth_largest(pre, n, count); return LP_OK; }
    return cuda_sae_kth_largest(c, t, pre, n, count);
}

lp_status lp_sae_radix_hist(lp_ctx *c, int64_t *hist, const float *pre, size_t n, uint32_t prefix, uint32_t mask, int shift) {
    NEED(c && hist && (n == 0 || pre) && shift >= 0 && shift <= 24 && shift % 8 == 0 &&
             mask == (shift == 24 ? 0u : 0xFFFFFFFFu << (shift + 8)) && (prefix & ~mask) == 0,
         "sae_radix_hist: bad arguments (n=%zu shift=%d mask=%08x prefix=%08x)", n, shift, mask, prefix);
    if (CPU(c)) { cpu_sae_radix_hist(hist, pre, n, prefix, mask, shift); return LP_OK; }
    return cuda_sae_radix_hist(c, hist, pre, n, prefix, mask, shift);
}

int lp_sae_radix_pick(const int64_t *hist, int64_t *rank, uint32_t *prefix, uint32_t *mask, int shift) {
    if (!hist || !rank || !prefix || !mask || shift < 0 || shift > 24 || shift % 8 || *rank < 1) return 0;
    return cpu_sae_radix_pick(hist, rank, prefix, mask, shift);
}

lp_status lp_sae_decode_sparse(lp_ctx *c, float *out, const int32_t *idx, const float *val, const float *W,
                               const float *bias, int N, int K, int D) {
    NEED(c && N >= 0 && K >= 1 && D > 0 && out && idx && val && W,
         "sae_decode_sparse: bad arguments (N=%d K=%d D=%d)", N, K, D);
    if (N == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_decode_sparse(out, idx, val, W, bias, N, K, D); return LP_OK; }
    return cuda_sae_decode_sparse(c, out, idx, val, W, bias, N, K, D);
}

lp_status lp_sae_decode_sparse_grad(lp_ctx *c, float *dval, float *dW, const float *dout, const int32_t *idx,
                                    const float *val, const float *W, int N, int K, int D) {
    NEED(c && N >= 0 && K >= 1 && D > 0 && dval && dW && dout && idx && val && W,
         "sae_decode_sparse_grad: bad arguments (N=%d K=%d D=%d)", N, K, D);
    if (N == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_decode_sparse_grad(dval, dW, dout, idx, val, W, N, K, D); return LP_OK; }
    return cuda_sae_decode_sparse_grad(c, dval, dW, dout, idx, val, W, N, K, D);
}

lp_status lp_sae_encode_sparse_grad(lp_ctx *c, float *dW_enc, float *db_enc, const float *x, const int32_t *idx,
                                    const float *dpre, int N, int K, int D, int S) {
    NEED(c && N >= 0 && K >= 1 && D > 0 && S > 0 && dW_enc && db_enc && x && idx && dpre,
         "sae_encode_sparse_grad: bad arguments (N=%d K=%d D=%d S=%d)", N, K, D, S);
    if (N == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_encode_sparse_grad(dW_enc, db_enc, x, idx, dpre, N, K, D, S); return LP_OK; }
    return cuda_sae_encode_sparse_grad(c, dW_enc, db_enc, x, idx, dpre, N, K, D, S);
}

size_t lp_sae_latent_lists_len(int N, int K, int S) { return 2 * (size_t)S + 1 + (size_t)N * K; }

lp_status lp_sae_latent_lists(lp_ctx *c, int32_t *lists, const int32_t *idx, int N, int K, int S) {
    NEED(c && lists && idx && N >= 0 && K >= 1 && S > 0 && (size_t)N * K <= INT32_MAX,
         "sae_latent_lists: bad arguments (N=%d K=%d S=%d)", N, K, S);
    if (CPU(c)) { cpu_sae_latent_lists(lists, idx, N, K, S); return LP_OK; }
    return cuda_sae_latent_lists(c, lists, idx, N, K, S);
}

lp_status lp_sae_encode_sparse_grad_lists(lp_ctx *c, float *dW_enc, float *db_enc, const float *x, const int32_t *lists,
                                          const float *dpre, int N, int K, int D, int S) {
    NEED(c && N >= 0 && K >= 1 && D > 0 && S > 0 && dW_enc && db_enc && x && lists && dpre,
         "sae_encode_sparse_grad_lists: bad arguments (N=%d K=%d D=%d S=%d)", N, K, D, S);
    if (N == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_encode_sparse_grad_lists(dW_enc, db_enc, x, lists, dpre, N, K, D, S); return LP_OK; }
    return cuda_sae_encode_sparse_grad_lists(c, dW_enc, db_enc, x, lists, dpre, N, K, D, S);
}

lp_status lp_sae_decode_sparse_grad_lists(lp_ctx *c, float *dval, float *dW, const float *dout, const int32_t *idx,
                                          const int32_t *lists, const float *val, const float *W, int N, int K, int D,
                                          int S) {
    NEED(c && N >= 0 && K >= 1 && D > 0 && S > 0 && dval && dW && dout && idx && lists && val && W,
         "sae_decode_sparse_grad_lists: bad arguments (N=%d K=%d D=%d S=%d)", N, K, D, S);
    if (N == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_decode_sparse_grad_lists(dval, dW, dout, idx, lists, val, W, N, K, D, S); return LP_OK; }
    return cuda_sae_decode_sparse_grad_lists(c, dval, dW, dout, idx, lists, val, W, N, K, D, S);
}

lp_status lp_sae_to_bf16(lp_ctx *c, uint16_t *dst, const float *src, size_t n) {
    NEED(c && dst && src, "sae_to_bf16: null buffer");
    if (n == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_to_bf16(dst, src, n); return LP_OK; }
    return cuda_sae_to_bf16(c, dst, src, n);
}

lp_status lp_sae_matmul_bf16(lp_ctx *c, float *out, const uint16_t *x, const uint16_t *w, const float *bias, int N,
                             int K, int M) {
    NEED(c && N >= 0 && K > 0 && M > 0 && out && (N == 0 || (x && w)), "sae_matmul_bf16: bad arguments (N=%d K=%d M=%d)",
         N, K, M);
    if (N == 0) return LP_OK;
    if (CPU(c)) return cpu_sae_matmul_bf16(out, x, w, bias, N, K, M);
    return cuda_sae_matmul_bf16(c, out, x, w, bias, N, K, M);
}

lp_status lp_sae_encode_sparse_input_grad(lp_ctx *c, float *dx, const float *dpre, const int32_t *idx,
                                          const float *W_enc, int N, int K, int D, int S) {
    NEED(c && N >= 0 && K >= 1 && D > 0 && S > 0 && dx && dpre && idx && W_enc,
         "sae_encode_sparse_input_grad: bad arguments (N=%d K=%d D=%d S=%d)", N, K, D, S);
    if (N == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_encode_sparse_input_grad(dx, dpre, idx, W_enc, N, K, D, S); return LP_OK; }
    return cuda_sae_encode_sparse_input_grad(c, dx, dpre, idx, W_enc, N, K, D, S);
}

lp_status lp_sae_scale(lp_ctx *c, float *x, float alpha, size_t n) {
    NEED(c && x, "sae_scale: null buffer");
    if (n == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_scale(x, alpha, n); return LP_OK; }
    return cuda_sae_scale(c, x, alpha, n);
}

lp_status lp_sae_relu(lp_ctx *c, float *f, const float *pre, size_t n) {
    NEED(c && f && pre, "sae_relu: null buffer");
    if (n == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_relu(f, pre, n); return LP_OK; }
    return cuda_sae_relu(c, f, pre, n);
}

lp_status lp_sae_jumprelu(lp_ctx *c, float *f, const float *pre, const float *theta, int N, int S) {
    NEED(c && N >= 0 && S > 0 && f && pre && theta, "sae_jumprelu: bad arguments (N=%d S=%d)", N, S);
    if (N == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_jumprelu(f, pre, theta, N, S); return LP_OK; }
    return cuda_sae_jumprelu(c, f, pre, theta, N, S);
}

lp_status lp_sae_relu_grad(lp_ctx *c, float *dpre, const float *df, const float *pre, size_t n) {
    NEED(c && dpre && df && pre, "sae_relu_grad: null buffer");
    if (n == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_relu_grad(dpre, df, pre, n); return LP_OK; }
    return cuda_sae_relu_grad(c, dpre, df, pre, n);
}

lp_status lp_sae_l1_relu_grad(lp_ctx *c, float *dpre, float *db, float *fsum, const float *df, const float *pre,
                              const float *w, int N, int S) {
    NEED(c && N >= 0 && S > 0 && dpre && db && fsum && df && pre && w, "sae_l1_relu_grad: bad arguments (N=%d S=%d)", N, S);
    if (N == 0) return lp_ctx_memset0(c, fsum, (size_t)S * sizeof(float));
    if (CPU(c)) return cpu_sae_l1_relu_grad(dpre, db, fsum, df, pre, w, N, S);
    return cuda_sae_l1_relu_grad(c, dpre, db, fsum, df, pre, w, N, S);
}

lp_status lp_sae_jumprelu_grad(lp_ctx *c, float *dpre, float *dtheta, const float *df, const float *pre,
                               const float *theta, float eps, float l0_coef, int N, int S) {
    NEED(c && N >= 0 && S > 0 && dpre && dtheta && df && pre && theta,
         "sae_jumprelu_grad: bad arguments (N=%d S=%d)", N, S);
    NEED(eps > 0 && isfinite(eps) && isfinite(l0_coef), "sae_jumprelu_grad: bandwidth %g must be > 0 (l0_coef %g)",
         (double)eps, (double)l0_coef);
    if (N == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_jumprelu_grad(dpre, dtheta, df, pre, theta, eps, l0_coef, N, S); return LP_OK; }
    return cuda_sae_jumprelu_grad(c, dpre, dtheta, df, pre, theta, eps, l0_coef, N, S);
}

lp_status lp_adam_step(lp_ctx *c, float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                       float b2, float eps, int t) {
    NEED(c && p && g && m && v, "adam_step: null buffer");
    NEED(t >= 1 && b1 >= 0 && b1 < 1 && b2 >= 0 && b2 < 1 && eps >= 0 && isfinite(lr),
         "adam_step: bad hyperparameters (t=%d lr=%g b1=%g b2=%g eps=%g; t >= 1, 0 <= b1, b2 < 1)", t, (double)lr,
         (double)b1, (double)b2, (double)eps);
    if (n == 0) return LP_OK;
    if (CPU(c)) { cpu_adam_step(p, g, m, v, n, lr, b1, b2, eps, t); return LP_OK; }
    return cuda_adam_step(c, p, g, m, v, n, lr, b1, b2, eps, t);
}

lp_status lp_rows_unit_norm(lp_ctx *c, float *W, int S, int D) {
    NEED(c && S >= 0 && D > 0 && W, "rows_unit_norm: bad arguments (S=%d D=%d)", S, D);
    if (S == 0) return LP_OK;
    if (CPU(c)) { cpu_rows_unit_norm(W, S, D); return LP_OK; }
    return cuda_rows_unit_norm(c, W, S, D);
}

lp_status lp_rows_remove_parallel(lp_ctx *c, float *dW, const float *W, int S, int D) {
    NEED(c && S >= 0 && D > 0 && dW && W, "rows_remove_parallel: bad arguments (S=%d D=%d)", S, D);
    if (S == 0) return LP_OK;
    if (CPU(c)) { cpu_rows_remove_parallel(dW, W, S, D); return LP_OK; }
    return cuda_rows_remove_parallel(c, dW, W, S, D);
}

lp_status lp_rows_norm(lp_ctx *c, float *out, const float *W, int S, int D) {
    NEED(c && S >= 0 && D > 0 && out && W, "rows_norm: bad arguments (S=%d D=%d)", S, D);
    if (S == 0) return LP_OK;
    if (CPU(c)) { cpu_rows_norm(out, W, S, D); return LP_OK; }
    return cuda_rows_norm(c, out, W, S, D);
}

lp_status lp_sae_recon_sums(lp_ctx *c, double sums[4], const float *x, const float *x_hat, int N, int D) {
    NEED(c && sums && N >= 0 && D > 0 && (N == 0 || (x && x_hat)), "sae_recon_sums: bad arguments (N=%d D=%d)", N, D);
    if (N == 0) {
        for (int i = 0; i < 4; i++) sums[i] = 0;
        return LP_OK;
    }
    c->n_d2h++; /* a host result */
    if (CPU(c)) { cpu_sae_recon_sums(sums, x, x_hat, N, D); return LP_OK; }
    return cuda_sae_recon_sums(c, sums, x, x_hat, N, D);
}

lp_status lp_sae_fire_counts(lp_ctx *c, int64_t *counts, const int32_t *idx, const float *val, const float *f, int N,
                             int K, int S) {
    NEED(c && counts && N >= 0 && S > 0, "sae_fire_counts: bad arguments (N=%d S=%d)", N, S);
    NEED(idx ? (val && K >= 1) : f != NULL, "sae_fire_counts: give idx and val (with K >= 1), or f");
    if (N == 0) return LP_OK;
    if (CPU(c)) { cpu_sae_fire_counts(counts, idx, val, f, N, K, S); return LP_OK; }
    return cuda_sae_fire_counts(c, counts, idx, val, f, N, K, S);
}
