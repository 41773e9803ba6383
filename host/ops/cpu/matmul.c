/* matmul.c: CPU GEMM through OpenBLAS (row-major sgemm), bias broadcast first so the
 * GEMM accumulates onto it with beta = 1. */
#include <cblas.h>
#include <string.h>

#include "ops/ops_internal.h"

void cpu_matmul(float *out, const float *x, const float *w, const float *bias, int N, int K, int M,
                   int w_trans) {
    // out is (N,M); x is (N,K); w is (K,M), or (M,K) when w_trans; bias is (M,) or NULL
    if (bias)
        for (int n = 0; n < N; n++) memcpy(out + (size_t)n * M, bias, M * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, w_trans ? CblasTrans : CblasNoTrans, N, M, K, 1.0f, x, K,
                w, w_trans ? K : M, bias ? 1.0f : 0.0f, out, M);
}
