// matmul.cu: out[N,M] = x[N,K] @ W (+ bias[M]) through cuBLAS, fp32 accumulation in
// both dtypes (CUBLAS_COMPUTE_32F; never TF32, so fp32 results track the CPU closely).
//
// cuBLAS is column-major. A row-major [R,C] buffer is the column-major [C,R] matrix, its
// transpose, so we compute out^T[M,N] = W^T x^T:
//   w_trans = 0: W is row-major [K,M] = column-major [M,K] = W^T  -> op N, lda = M
//   w_trans = 1: W is row-major [M,K] = column-major [K,M]       -> op T, lda = K
//   x row-major [N,K] = column-major [K,N] = x^T                  -> op N, ldb = K
//   out row-major [N,M] = column-major [M,N]                      -> ldc = M
// Bias: out is first filled with bias broadcast over rows and the GEMM runs with beta = 1.
// The bias is already in the activation dtype, so the prefill is exact, and cuBLAS
// forms x@W + bias in fp32 and rounds once, like an epilogue would.
#include "common.cuh"

lp_status lp_cuda_matmul(lp_ctx *c, void *out, const void *x, const void *w, const void *bias, int N,
                         int K, int M, int w_trans) {
    LP_CUDA_REQUIRE_CTX(c, "lp_cuda_matmul");
    LP_CUDA_REQUIRE(N >= 0 && K >= 0 && M >= 0, "lp_cuda_matmul: negative size N=%d K=%d M=%d", N,
                    K, M);
    LP_CUDA_REQUIRE(w_trans == 0 || w_trans == 1, "lp_cuda_matmul: w_trans must be 0 or 1, got %d",
                    w_trans);
    if ((size_t)N * M == 0) return LP_OK;
    LP_CUDA_REQUIRE(out != NULL, "lp_cuda_matmul: NULL output");
    LP_CUDA_REQUIRE(K == 0 || (x && w), "lp_cuda_matmul: NULL x or W");
    LP_CUDA_REQUIRE(c->blas != NULL, "lp_cuda_matmul: context has no cuBLAS handle");
    const bool bf16 = c->dtype == LP_BF16;

    if (bias) {
        lp_status st = bf16 ? lp_tile<__nv_bfloat16>(c, out, bias, (size_t)N * M, M)
                            : lp_tile<float>(c, out, bias, (size_t)N * M, M);
        if (st != LP_OK) return st;
    }
    if (K == 0) { // an empty sum: out = bias, or 0
        if (!bias)
            LP_CUDA_CHECK(cudaMemsetAsync(out, 0, (size_t)N * M * (bf16 ? 2 : 4), lp_stream(c)));
        return LP_OK;
    }

    const cudaDataType_t ty = bf16 ? CUDA_R_16BF : CUDA_R_32F;
    const float alpha = 1.0f, beta = bias ? 1.0f : 0.0f;
    cublasHandle_t h = (cublasHandle_t)c->blas; // bound to c->stream by lp_cuda_ctx_init
    LP_CUBLAS_CHECK(cublasGemmEx(h, w_trans ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N,
                                 M, N, K, &alpha,
                                 w, ty, w_trans ? K : M,
                                 x, ty, K, &beta,
                                 out, ty, M,
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return LP_OK;
}
