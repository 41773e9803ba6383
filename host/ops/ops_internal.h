/* ops_internal.h: the two back ends behind include/loupe/ops.h.
 *
 * host/ops/ops.c validates arguments and dispatches on lp_ctx.device to one of these.
 * cpu_* (host/ops/cpu/) are the readable fp32 references; cuda_* (kernels/) take
 * the same arguments plus the context (dtype, stream, cuBLAS handle). A build without
 * CUDA links kernels/cuda_stub.c, where every cuda_* returns LP_ERR_NO_CUDA. */
#ifndef LOUPE_OPS_INTERNAL_H
#define LOUPE_OPS_INTERNAL_H

#include "core/device.h"
#include "loupe/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

/* CPU references: all buffers F32 on the host. */
void cpu_embed(float *out, const int32_t *tok, const float *wte, int N, int D);
void cpu_pos_embed(float *out, const float *wpe, int B, int T, int D);
void cpu_add(float *out, const float *a, const float *b, size_t n);
void cpu_ln_scale(float *scale, const float *x, int N, int D, float eps);
void cpu_ln_apply(float *out, const float *x, const float *scale, const float *w, const float *b,
                     int N, int D);
void cpu_affine(float *out, const float *x, const float *w, const float *b, int N, int D);
void cpu_matmul(float *out, const float *x, const float *w, const float *bias, int N, int K, int M,
                   int w_trans);
void cpu_gelu(float *out, const float *x, size_t n);
/* The attention ops take the caller's lp_attn_cfg, never NULL (the dispatch passes a zeroed
 * one for NULL); a scale of 0 still means 1/sqrt(dh), resolved where it is used. */
/* The first key that a query at position t sees: t - window + 1, or 0 without a window. */
static inline int attn_first_key(const lp_attn_cfg *cfg, int t) {
    return cfg->window > 0 && t >= cfg->window ? t - cfg->window + 1 : 0;
}
void cpu_attention(float *z, const float *q, const float *k, const float *v, int B, int T, int H,
                      int Hkv, int dh, const lp_attn_cfg *cfg);
/* The row-at-a-time form of cpu_attention (no scratch), also its fallback; the first
 * without options. */
void cpu_attention_rows(float *z, const float *q, const float *k, const float *v, int B, int T, int H,
                           int Hkv, int dh);
void cpu_attention_rows_cfg(float *z, const float *q, const float *k, const float *v, int B, int T, int H,
                               int Hkv, int dh, const lp_attn_cfg *cfg);
void cpu_attn_scores(float *scores, const float *q, const float *k, int B, int T, int H, int Hkv,
                        int dh, const lp_attn_cfg *cfg);
void cpu_softmax_rows(float *out, const float *x, size_t rows, int cols);
void cpu_attn_apply(float *z, const float *pattern, const float *v, int B, int T, int H, int Hkv,
                       int dh);
void cpu_rms_scale(float *scale, const float *x, int N, int D, float eps);
void cpu_rms_apply(float *out, const float *x, const float *scale, const float *w, int N, int D);
void cpu_rope(float *out, const float *x, const float *cos_t, const float *sin_t, int B, int T, int H,
                 int dh, int pos0);
void cpu_silu_mul(float *out, const float *gate, const float *up, size_t n);
void cpu_attention_cached(float *z, const float *q, const float *kc, const float *vc, int B, int Tq,
                             int Tcap, int pos0, int H, int Hkv, int dh, const lp_attn_cfg *cfg);
/* Gemma family (host/ops/cpu/gemma.c) */
void cpu_gelu_mul(float *out, const float *gate, const float *up, size_t n);
void cpu_softcap(float *out, const float *x, float cap, size_t n);
void cpu_scale(float *out, const float *x, float s, size_t n);
/* ggml block dequantization (host/cpu/dequant.c): n elements of `type` to F32. */
void cpu_dequant(float *dst, const void *src, int type, int64_t n);
void cpu_cross_entropy(float *losses, const float *logits, const int32_t *targets, int N, int V);
void cpu_edit_apply(float *act, lp_view v, lp_edit_kind kind, const float *src, float coef,
                       const uint8_t *pos_mask, const uint8_t *head_mask);
void cpu_gather_pos(float *dst, const float *act, lp_view v, const int32_t *pos, int npos);
void cpu_diff_dot_rows(float *out, const float *a, const float *b, const float *g, size_t rows, size_t per);

/* CUDA back end (the .cu files in kernels/). Activation pointers are c->dtype on c's device.
 * The context's own half (streams, memory, copies) is core/device.h. */

lp_status cuda_embed(lp_ctx *c, void *out, const int32_t *tok, const void *wte, int N, int D);
lp_status cuda_pos_embed(lp_ctx *c, void *out, const void *wpe, int B, int T, int D);
lp_status cuda_add(lp_ctx *c, void *out, const void *a, const void *b, size_t n);
/* n random weights base + rng_init_weight (host/core/rng.h) into dst in c's dtype, generated on
 * the device from the LCG state `state`, bit for bit the host's values (kernels/init.cu). */
lp_status cuda_init_weights(lp_ctx *c, void *dst, size_t n, uint64_t state, float base);
lp_status cuda_ln_scale(lp_ctx *c, void *scale, const void *x, int N, int D, float eps);
lp_status cuda_ln_apply(lp_ctx *c, void *out, const void *x, const void *scale, const void *w,
                           const void *b, int N, int D);
lp_status cuda_affine(lp_ctx *c, void *out, const void *x, const void *w, const void *b, int N,
                         int D);
lp_status cuda_matmul(lp_ctx *c, void *out, const void *x, const void *w, const void *bias, int N,
                         int K, int M, int w_trans);
lp_status cuda_gelu(lp_ctx *c, void *out, const void *x, size_t n);
lp_status cuda_matmul_gelu(lp_ctx *c, void *post, void *pre, const void *x, const void *w, const void *bias, int N,
                              int K, int M, int w_trans);
lp_status cuda_attention(lp_ctx *c, void *z, const void *q, const void *k, const void *v, int B,
                            int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg);
lp_status cuda_attn_scores(lp_ctx *c, void *scores, const void *q, const void *k, int B, int T,
                              int H, int Hkv, int dh, const lp_attn_cfg *cfg);
lp_status cuda_softmax_rows(lp_ctx *c, void *out, const void *x, size_t rows, int cols);
lp_status cuda_attn_apply(lp_ctx *c, void *z, const void *pattern, const void *v, int B, int T,
                             int H, int Hkv, int dh);
lp_status cuda_rms_scale(lp_ctx *c, void *scale, const void *x, int N, int D, float eps);
lp_status cuda_rms_apply(lp_ctx *c, void *out, const void *x, const void *scale, const void *w, int N,
                            int D);
lp_status cuda_rope(lp_ctx *c, void *out, const void *x, const float *cos_t, const float *sin_t, int B,
                       int T, int H, int dh, int pos0);
lp_status cuda_silu_mul(lp_ctx *c, void *out, const void *gate, const void *up, size_t n);
lp_status cuda_attention_cached(lp_ctx *c, void *z, const void *q, const void *kc, const void *vc,
                                   int B, int Tq, int Tcap, int pos0, int H, int Hkv, int dh,
                                   const lp_attn_cfg *cfg);
/* kernels/attention_flash.cu: the fused attention on tensor cores, which cuda_attention and
 * cuda_attention_backward use when cuda_flash_fits (BF16, dh a multiple of 16 up to 256,
 * buffers 16-byte aligned); the backward reads the row stats stashed by attention_backward.cu. */
int cuda_flash_fits(const lp_ctx *c, int B, int T, int H, int dh, const void *const *bufs, int nbufs);
lp_status cuda_flash_attention(lp_ctx *c, void *z, const void *q, const void *k, const void *v, int B, int T,
                                  int H, int Hkv, int dh, const lp_attn_cfg *cfg);
lp_status cuda_flash_attention_backward(lp_ctx *c, void *dq, void *dk, void *dv, const unsigned char *stash,
                                           size_t stride, const void *dz, const void *q, const void *k, const void *v,
                                           int B, int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg);
/* kernels/gemma.cu */
lp_status cuda_gelu_mul(lp_ctx *c, void *out, const void *gate, const void *up, size_t n);
lp_status cuda_softcap(lp_ctx *c, void *out, const void *x, float cap, size_t n);
lp_status cuda_scale(lp_ctx *c, void *out, const void *x, float s, size_t n);
lp_status cuda_gelu_mul_backward(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate,
                                    const void *up, size_t n);
lp_status cuda_softcap_backward(lp_ctx *c, void *dx, const void *dy, const void *y, float cap, size_t n);
/* kernels/dequant.cu: n elements of ggml `type` to dst_dtype (F32, BF16 or F16). */
lp_status cuda_dequant(lp_ctx *c, void *dst, lp_dtype dst_dtype, const void *src, int type, int64_t n);
lp_status cuda_cross_entropy_ld(lp_ctx *c, float *losses, const void *logits, const int32_t *targets, int N, int V, int ld);
lp_status cuda_cross_entropy(lp_ctx *c, float *losses, const void *logits, const int32_t *targets,
                                int N, int V);
lp_status cuda_edit_apply(lp_ctx *c, void *act, lp_view v, lp_edit_kind kind, const void *src,
                             float coef, const uint8_t *pos_mask, const uint8_t *head_mask);
lp_status cuda_gather_pos(lp_ctx *c, void *dst, const void *act, lp_view v, const int32_t *pos,
                             int npos);
lp_status cuda_diff_dot_rows(lp_ctx *c, float *out, const void *a, const void *b, const void *g, size_t rows, size_t per);

/* ==== SAE ops ====================================================================
 * The back ends of include/loupe/sae_ops.h (dispatch: host/ops/sae_ops.c; CPU references:
 * host/cpu/sae.c; CUDA: kernels/sae.cu). Every float buffer is F32 whatever c->dtype,
 * indices are int32, fire counts int64. Arguments were checked by the dispatch. */
void cpu_matmul_at(float *out, const float *a, const float *b, int N, int K, int M, float beta);
void cpu_col_sum(float *out, const float *x, int N, int M, float beta);
void cpu_sae_topk(int32_t *idx, float *val, const float *pre, int N, int S, int K);
float cpu_sae_kth_largest(const float *pre, size_t n, size_t count);
void cpu_sae_radix_hist(int64_t *hist, const float *pre, size_t n, uint32_t prefix, uint32_t mask, int shift);
int cpu_sae_radix_pick(const int64_t *hist, int64_t *rank, uint32_t *prefix, uint32_t *mask, int shift);
void cpu_sae_decode_sparse(float *out, const int32_t *idx, const float *val, const float *W,
                              const float *bias, int N, int K, int D);
void cpu_sae_decode_sparse_grad(float *dval, float *dW, const float *dout, const int32_t *idx,
                                   const float *val, const float *W, int N, int K, int D);
void cpu_sae_encode_sparse_grad(float *dW_enc, float *db_enc, const float *x, const int32_t *idx,
                                   const float *dpre, int N, int K, int D, int S);
void cpu_sae_relu(float *f, const float *pre, size_t n);
void cpu_sae_jumprelu(float *f, const float *pre, const float *theta, int N, int S);
void cpu_sae_relu_grad(float *dpre, const float *df, const float *pre, size_t n);
lp_status cpu_sae_l1_relu_grad(float *dpre, float *db, float *fsum, const float *df, const float *pre, const float *w,
                               int N, int S);
void cpu_sae_jumprelu_grad(float *dpre, float *dtheta, const float *df, const float *pre,
                              const float *theta, float eps, float l0_coef, int N, int S);
void cpu_adam_step(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                      float b2, float eps, int t);
void cpu_rows_unit_norm(float *W, int S, int D);
void cpu_rows_remove_parallel(float *dW, const float *W, int S, int D);
void cpu_rows_norm(float *out, const float *W, int S, int D);
void cpu_sae_recon_sums(double sums[4], const float *x, const float *x_hat, int N, int D);
void cpu_sae_fire_counts(int64_t *counts, const int32_t *idx, const float *val, const float *f,
                            int N, int K, int S);

lp_status cuda_matmul_at(lp_ctx *c, float *out, const float *a, const float *b, int N, int K, int M,
                            float beta);
lp_status cuda_col_sum(lp_ctx *c, float *out, const float *x, int N, int M, float beta);
lp_status cuda_sae_topk(lp_ctx *c, int32_t *idx, float *val, const float *pre, int N, int S, int K);
lp_status cuda_sae_kth_largest(lp_ctx *c, float *t, const float *pre, size_t n, size_t count);
lp_status cuda_sae_radix_hist(lp_ctx *c, int64_t *hist, const float *pre, size_t n, uint32_t prefix, uint32_t mask, int shift);
lp_status cuda_sae_decode_sparse(lp_ctx *c, float *out, const int32_t *idx, const float *val,
                                    const float *W, const float *bias, int N, int K, int D);
lp_status cuda_sae_decode_sparse_grad(lp_ctx *c, float *dval, float *dW, const float *dout,
                                         const int32_t *idx, const float *val, const float *W, int N,
                                         int K, int D);
lp_status cuda_sae_encode_sparse_grad(lp_ctx *c, float *dW_enc, float *db_enc, const float *x,
                                         const int32_t *idx, const float *dpre, int N, int K, int D,
                                         int S);
lp_status cuda_sae_relu(lp_ctx *c, float *f, const float *pre, size_t n);
lp_status cuda_sae_jumprelu(lp_ctx *c, float *f, const float *pre, const float *theta, int N, int S);
lp_status cuda_sae_relu_grad(lp_ctx *c, float *dpre, const float *df, const float *pre, size_t n);
lp_status cuda_sae_l1_relu_grad(lp_ctx *c, float *dpre, float *db, float *fsum, const float *df, const float *pre,
                                const float *w, int N, int S);
lp_status cuda_sae_jumprelu_grad(lp_ctx *c, float *dpre, float *dtheta, const float *df,
                                    const float *pre, const float *theta, float eps, float l0_coef,
                                    int N, int S);
lp_status cuda_adam_step(lp_ctx *c, float *p, const float *g, float *m, float *v, size_t n, float lr,
                            float b1, float b2, float eps, int t);
lp_status cuda_rows_unit_norm(lp_ctx *c, float *W, int S, int D);
lp_status cuda_rows_remove_parallel(lp_ctx *c, float *dW, const float *W, int S, int D);
lp_status cuda_rows_norm(lp_ctx *c, float *out, const float *W, int S, int D);
lp_status cuda_sae_recon_sums(lp_ctx *c, double sums[4], const float *x, const float *x_hat, int N,
                                 int D);
lp_status cuda_sae_fire_counts(lp_ctx *c, int64_t *counts, const int32_t *idx, const float *val,
                                  const float *f, int N, int K, int S);
/* lp_sae_scale and lp_sae_encode_sparse_input_grad (include/loupe/sae_ops.h) */
void cpu_sae_scale(float *x, float alpha, size_t n);
void cpu_sae_encode_sparse_input_grad(float *dx, const float *dpre, const int32_t *idx, const float *W_enc,
                                         int N, int K, int D, int S);
lp_status cuda_sae_scale(lp_ctx *c, float *x, float alpha, size_t n);
lp_status cuda_sae_encode_sparse_input_grad(lp_ctx *c, float *dx, const float *dpre, const int32_t *idx,
                                               const float *W_enc, int N, int K, int D, int S);
/* lp_sae_topk_among, the latent lists, the list-based encoder gradient and the bf16
 * encoder GEMM (include/loupe/sae_ops.h): CPU twins in host/ops/cpu/sae_sparse.c, CUDA in
 * kernels/sae_lists.cu, kernels/sae_select.cu and kernels/matmul.cu. */
/* One row of cpu_sae_topk (host/ops/cpu/sae.c). */
void cpu_sae_topk_row(int32_t *idx, float *val, const float *row, int S, int K);
/* also lp_sae_topk_among_counted's twin: with n_cand < K a row's last K - n_cand entries are
 * padding of value 0 */
lp_status cpu_sae_topk_among(int32_t *idx, float *val, const float *pre, const int32_t *cand, int n_cand, int N, int S,
                             int K);
void cpu_sae_latent_lists(int32_t *lists, const int32_t *idx, int N, int K, int S);
void cpu_sae_encode_sparse_grad_lists(float *dW_enc, float *db_enc, const float *x, const int32_t *lists,
                                      const float *dpre, int N, int K, int D, int S);
void cpu_sae_to_bf16(uint16_t *dst, const float *src, size_t n);
/* host/ops/cpu/sae.c: cpu_sae_decode_sparse_grad with the caller's lists */
void cpu_sae_decode_sparse_grad_lists(float *dval, float *dW, const float *dout, const int32_t *idx, const int32_t *lists,
                                      const float *val, const float *W, int N, int K, int D, int S);
lp_status cpu_sae_matmul_bf16(float *out, const uint16_t *x, const uint16_t *w, const float *bias, int N, int K, int M);
lp_status cuda_sae_topk_among(lp_ctx *c, int32_t *idx, float *val, const float *pre, const int32_t *cand, int n_cand,
                              int N, int S, int K);
lp_status cuda_sae_latent_lists(lp_ctx *c, int32_t *lists, const int32_t *idx, int N, int K, int S);
lp_status cuda_sae_encode_sparse_grad_lists(lp_ctx *c, float *dW_enc, float *db_enc, const float *x,
                                            const int32_t *lists, const float *dpre, int N, int K, int D, int S);
lp_status cuda_sae_to_bf16(lp_ctx *c, uint16_t *dst, const float *src, size_t n);
lp_status cuda_sae_decode_sparse_grad_lists(lp_ctx *c, float *dval, float *dW, const float *dout, const int32_t *idx,
                                            const int32_t *lists, const float *val, const float *W, int N, int K, int D,
                                            int S);
lp_status cuda_sae_matmul_bf16(lp_ctx *c, float *out, const uint16_t *x, const uint16_t *w, const float *bias, int N,
                               int K, int M);
/* host/ops/cpu/parallel.c: fn over [0, n) split into contiguous ranges of at least
 * min_per_thread indices, one per thread (as many threads as OpenBLAS uses). */
int cpu_threads(void);
void cpu_parallel_for(size_t n, size_t min_per_thread, void (*fn)(void *arg, size_t i0, size_t i1), void *arg);
/* ==== end of SAE ops ==== */

/* ==== backward ops ===============================================================
 * The back ends of ops.h's "backward ops (attribution gradients)" (dispatch: host/ops/ops.c;
 * CPU references: host/cpu/backward.c; CUDA: kernels/backward.cu). Same dtype rules as
 * the forward ops; arguments were checked by the dispatch. */
void cpu_ln_backward(float *dx, const float *dy, const float *x, const float *scale, const float *w, int N,
                        int D);
void cpu_norm_scale_grad(float *dscale, const float *dy, const float *x, const float *scale, const float *w, int N, int D,
                            int center);
lp_status cuda_norm_scale_grad(lp_ctx *c, void *dscale, const void *dy, const void *x, const void *scale, const void *w,
                                  int N, int D, int center);
void cpu_rms_backward(float *dx, const float *dy, const float *x, const float *scale, const float *w, int N,
                         int D);
void cpu_gelu_backward(float *dx, const float *dy, const float *x, size_t n);
void cpu_silu_mul_backward(float *dgate, float *dup, const float *dy, const float *gate, const float *up,
                              size_t n);
void cpu_rope_backward(float *dx, const float *dy, const float *cos_t, const float *sin_t, int B, int T,
                          int H, int dh, int pos0);
void cpu_gelu_mul_backward(float *dgate, float *dup, const float *dy, const float *gate, const float *up,
                              size_t n);
void cpu_softcap_backward(float *dx, const float *dy, const float *y, float cap, size_t n);
void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dz, const float *q, const float *k,
                               const float *v, int B, int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg);
void cpu_attn_apply_backward(float *dpattern, float *dv, const float *dz, const float *pattern, const float *v,
                                int B, int T, int H, int Hkv, int dh);
void cpu_softmax_rows_backward(float *dx, const float *dy, const float *y, size_t rows, int cols);
void cpu_attn_scores_backward(float *dq, float *dk, const float *dscores, const float *scores, const float *q,
                                 const float *k, int B, int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg);
/* A query suffix over all keys (attention_suffix.c; the fused backward in backward.c, of
 * which cpu_attention_backward is pos0 = 0). Those returning int give 0 when their scratch
 * cannot be had. */
int cpu_attention_suffix(float *z, const float *q, const float *k, const float *v, int B, int Tq, int pos0, int H, int Hkv,
                         int dh, const lp_attn_cfg *cfg);
void cpu_attn_scores_suffix(float *scores, const float *q, const float *k, int B, int Tq, int pos0, int H, int Hkv, int dh,
                            const lp_attn_cfg *cfg);
void cpu_attn_apply_suffix(float *z, const float *pattern, const float *v, int B, int Tq, int pos0, int H, int Hkv, int dh);
void cpu_attention_backward_suffix(float *dq, float *dk, float *dv, const float *dz, const float *q, const float *k,
                                   const float *v, int B, int Tq, int pos0, int H, int Hkv, int dh, const lp_attn_cfg *cfg);
int cpu_attn_apply_backward_suffix(float *dpattern, float *dv, const float *dz, const float *pattern, const float *v, int B,
                                   int Tq, int pos0, int H, int Hkv, int dh);
int cpu_attn_scores_backward_suffix(float *dq, float *dk, const float *dscores, const float *scores, const float *q,
                                    const float *k, int B, int Tq, int pos0, int H, int Hkv, int dh, const lp_attn_cfg *cfg);
void cpu_xent_backward(float *dlogits, const float *logits, const int32_t *targets, const float *scale, int N,
                          int V);

lp_status cuda_ln_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale,
                              const void *w, int N, int D);
lp_status cuda_rms_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale,
                               const void *w, int N, int D);
lp_status cuda_gelu_backward(lp_ctx *c, void *dx, const void *dy, const void *x, size_t n);
lp_status cuda_silu_mul_backward(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate,
                                    const void *up, size_t n);
lp_status cuda_rope_backward(lp_ctx *c, void *dx, const void *dy, const float *cos_t, const float *sin_t,
                                int B, int T, int H, int dh, int pos0);
lp_status cuda_attention_backward(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q,
                                     const void *k, const void *v, int B, int T, int H, int Hkv, int dh,
                                     const lp_attn_cfg *cfg);
/* Queries at positions pos0 .. of rows of pos0 + Tq keys (ops.h's suffix ops); dk, dv of the suffix's keys. */
lp_status cuda_attention_backward_suffix(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q,
                                         const void *k, const void *v, int B, int Tq, int pos0, int H, int Hkv, int dh,
                                         const lp_attn_cfg *cfg);
lp_status cuda_attn_apply_backward(lp_ctx *c, void *dpattern, void *dv, const void *dz, const void *pattern,
                                      const void *v, int B, int T, int H, int Hkv, int dh);
lp_status cuda_softmax_rows_backward(lp_ctx *c, void *dx, const void *dy, const void *y, size_t rows,
                                        int cols);
lp_status cuda_attn_scores_backward(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *scores,
                                       const void *q, const void *k, int B, int T, int H, int Hkv, int dh,
                                       const lp_attn_cfg *cfg);
lp_status cuda_xent_backward_ld(lp_ctx *c, void *dlogits, const void *logits, const int32_t *targets, const float *scale,
                                int N, int V, int ld);
lp_status cuda_xent_backward(lp_ctx *c, void *dlogits, const void *logits, const int32_t *targets,
                                const float *scale, int N, int V);
/* ==== end of backward ops ==== */

#ifdef __cplusplus
}
#endif
#endif
