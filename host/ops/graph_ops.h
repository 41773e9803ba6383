/* graph_ops.h: the device pieces of the replacement model's backward (kernels/graph_bwd.cu),
 * which host/model/frozen_dev.c and host/attrib/graph_dev.c put together. Every buffer is
 * F32 on the CUDA context's device and row-major; every call is queued on the context's
 * compute stream. A build without CUDA links kernels/cuda_stub.c: LP_ERR_NO_CUDA. */
#ifndef LOUPE_OPS_GRAPH_OPS_H
#define LOUPE_OPS_GRAPH_OPS_H

#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* C[M, N] = alpha op(A) op(B) + beta C (ta/tb: 1 transposes), fp32 in and out (no TF32),
 * repeated over batch with element strides sA, sB, sC (batch 1: one GEMM). */
lp_status cuda_fz_gemm(lp_ctx *c, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, long long sA,
                       const float *B, int ldb, long long sB, float beta, float *C, int ldc, long long sC, int batch);
/* Causal softmax in place over rows of P [rows, Tm]: row i holds the scores of query
 * q = i % Tm; keys past the query, and with win > 0 those at or before q - win, get 0;
 * cap > 0 soft-caps the scores first (cap * tanh(x / cap), Gemma 2). */
lp_status cuda_fz_causal_softmax(lp_ctx *c, float *P, int rows, int Tm, int win, float cap);
/* dst[r, t] += g[r, t] * w / s[t] (w NULL: 1), centred over D when centre (LayerNorm), for
 * R x Tm rows. */
lp_status cuda_fz_norm_back_add(lp_ctx *c, float *dst, const float *g, const float *w, const float *s, int R, int Tm, int D,
                                int centre);
/* g[r, pos[r]] += vec[r] for the rows whose layer[r] == L (layer, pos: R ints on the device). */
lp_status cuda_fz_inject(lp_ctx *c, float *g, int L, int R, int Tm, int D, const int *layer, const int *pos, const float *vec);
/* out[r * ldo + t] = G[r, t] . E[t] for r < R, t < Tm. */
lp_status cuda_fz_row_dots(lp_ctx *c, float *out, long long ldo, const float *G, const float *E, int R, int Tm, int D);
/* One source layer's features against G: out[r * ldo + j] = act[j] * G[r, p(j)] . W[feat[j]]
 * for the features j of positions t < Tm, where pstart [Tm + 1] gives the first j of each
 * position (features sorted by position). W [S, D]: the decoder rows at the target layer. */
lp_status cuda_fz_feature_dots(lp_ctx *c, float *out, long long ldo, const float *G, int R, int Tm, int D, const int *pstart,
                               const int *feat, const float *act, const float *W);
/* Free and total bytes of the context's device. */
lp_status cuda_fz_mem_info(lp_ctx *c, size_t *free_b, size_t *total_b);

#ifdef __cplusplus
}
#endif
#endif
