// matmul.cu: out[N,M] = x[N,K] @ W (+ bias[M]) through cuBLAS, fp32 accumulation in
// both dtypes (CUBLAS_COMPUTE_32F; never TF32, so fp32 results track the CPU closely).
//
// cuBLAS is column-major. A row-major [R,C] buffer is the column-major [C,R] matrix, its
// transpose, so we compute out^T[M,N] = W^T x^T:
//   w_trans = 0: W is row-major [K,M] = column-major [M,K] = W^T  -> op N, lda = M
//   w_trans = 1: W is row-major [M,K] = column-major [K,M]       -> op T, lda = K
//   x row-major [N,K] = column-major [K,N] = x^T                  -> op N, ldb = K
//   out row-major [N,M] = column-major [M,N]                      -> ldc = M
// Bias: cuBLASLt's bias epilogue (a vector over the rows of out^T, in the activation dtype)
// adds it to the fp32 sum before the one rounding. Where cuBLASLt has no algorithm for the
// shape, out is first filled with bias broadcast over rows and cublasGemmEx runs with beta = 1:
// the same fp32 sum and rounding. cuda_matmul_gelu (GPT-2's MLP in BF16) adds GELU to the
// epilogue and keeps the pre-activation in its auxiliary output.
#include "common.cuh"

#include <cublasLt.h>

#include <mutex>

// One cuBLASLt handle per device for the process: a handle keeps no stream or call state.
static cublasLtHandle_t lt_handle(int dev) {
    static cublasLtHandle_t h[64];
    static std::mutex mu;
    std::lock_guard<std::mutex> lk(mu);
    if (dev < 0 || dev >= 64) return NULL;
    if (!h[dev] && cublasLtCreate(&h[dev]) != CUBLAS_STATUS_SUCCESS) h[dev] = NULL;
    return h[dev];
}

// out^T[M,N] = op(W) x^T with a cuBLASLt epilogue (bias; GELU with the pre-activation to aux,
// ld M), in the layouts of cublasGemmEx below. CUBLAS_STATUS_NOT_SUPPORTED: no algorithm
// (the caller falls back); K > 0. x and W are of type ab, out (and bias, aux) of type cd.
static cublasStatus_t lt_matmul_t(lp_ctx *c, void *out, void *aux, const void *x, const void *w, const void *bias,
                                  int N, int K, int M, int w_trans, cublasLtEpilogue_t ep, cudaDataType_t ab,
                                  cudaDataType_t cd) {
    cublasLtHandle_t lt = lt_handle(c->cuda_device);
    if (!lt) return CUBLAS_STATUS_NOT_INITIALIZED;
    const cublasOperation_t ta = w_trans ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
    const int64_t aux_ld = M;
    const float alpha = 1.0f, beta = 0.0f;
    cublasLtMatmulDesc_t d = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    cublasStatus_t s = cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep);
    if (s == CUBLAS_STATUS_SUCCESS && bias)
        s = cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    if (s == CUBLAS_STATUS_SUCCESS && aux) {
        s = cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof aux);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof aux_ld);
    }
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutCreate(&la, ab, w_trans ? K : M, w_trans ? M : K, w_trans ? K : M);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutCreate(&lb, ab, K, N, K);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatrixLayoutCreate(&lc, cd, M, N, M);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmul(lt, d, &alpha, w, la, x, lb, &beta, out, lc, out, lc, NULL, NULL, 0, cuda_stream_of(c));
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (d) cublasLtMatmulDescDestroy(d);
    return s;
}

// In the context's dtype.
static cublasStatus_t lt_matmul(lp_ctx *c, void *out, void *aux, const void *x, const void *w, const void *bias,
                                int N, int K, int M, int w_trans, cublasLtEpilogue_t ep) {
    const cudaDataType_t ty = c->dtype == LP_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    return lt_matmul_t(c, out, aux, x, w, bias, N, K, M, w_trans, ep, ty, ty);
}

lp_status cuda_matmul(lp_ctx *c, void *out, const void *x, const void *w, const void *bias, int N,
                         int K, int M, int w_trans) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_matmul");
    LP_CUDA_REQUIRE(N >= 0 && K >= 0 && M >= 0, "cuda_matmul: negative size N=%d K=%d M=%d", N,
                    K, M);
    LP_CUDA_REQUIRE(w_trans == 0 || w_trans == 1, "cuda_matmul: w_trans must be 0 or 1, got %d",
                    w_trans);
    if ((size_t)N * M == 0) return LP_OK;
    LP_CUDA_REQUIRE(out != NULL, "cuda_matmul: NULL output");
    LP_CUDA_REQUIRE(K == 0 || (x && w), "cuda_matmul: NULL x or W");
    LP_CUDA_REQUIRE(c->blas != NULL, "cuda_matmul: context has no cuBLAS handle");
    const bool bf16 = c->dtype == LP_BF16;

    if (bias && K > 0) {
        const cublasStatus_t s = lt_matmul(c, out, NULL, x, w, bias, N, K, M, w_trans, CUBLASLT_EPILOGUE_BIAS);
        if (s == CUBLAS_STATUS_SUCCESS) return LP_OK;
        if (s != CUBLAS_STATUS_NOT_SUPPORTED) LP_CUBLAS_CHECK(s);
        (void)cudaGetLastError();
    }
    if (bias) {
        lp_status st = bf16 ? tile_rows<__nv_bfloat16>(c, out, bias, (size_t)N * M, M)
                            : tile_rows<float>(c, out, bias, (size_t)N * M, M);
        if (st != LP_OK) return st;
    }
    if (K == 0) { // an empty sum: out = bias, or 0
        if (!bias)
            LP_CUDA_CHECK(cudaMemsetAsync(out, 0, (size_t)N * M * (bf16 ? 2 : 4), cuda_stream_of(c)));
        return LP_OK;
    }

    const cudaDataType_t ty = bf16 ? CUDA_R_16BF : CUDA_R_32F;
    const float alpha = 1.0f, beta = bias ? 1.0f : 0.0f;
    cublasHandle_t h = (cublasHandle_t)c->blas; // bound to c->stream by cuda_ctx_init
    LP_CUBLAS_CHECK(cublasGemmEx(h, w_trans ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N,
                                 M, N, K, &alpha,
                                 w, ty, w_trans ? K : M,
                                 x, ty, K, &beta,
                                 out, ty, M,
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return LP_OK;
}

// post = gelu(pre), pre = x @ W + bias: one GEMM with the GELU_AUX(_BIAS) epilogue in BF16
// (GELU of the fp32 sum, rounded once; pre rounded once); otherwise, and where cuBLASLt has no
// algorithm, the GEMM then cuda_gelu of the rounded pre-activation, as the CPU does.
lp_status cuda_matmul_gelu(lp_ctx *c, void *post, void *pre, const void *x, const void *w, const void *bias, int N,
                              int K, int M, int w_trans) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_matmul_gelu");
    LP_CUDA_REQUIRE(N >= 0 && K > 0 && M > 0 && post && pre && x && w && post != pre,
                    "cuda_matmul_gelu: bad arguments (N=%d K=%d M=%d)", N, K, M);
    if (N == 0) return LP_OK;
    if (c->dtype == LP_BF16) {
        const cublasStatus_t s = lt_matmul(c, post, pre, x, w, bias, N, K, M, w_trans,
                                           bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX);
        if (s == CUBLAS_STATUS_SUCCESS) return LP_OK;
        if (s != CUBLAS_STATUS_NOT_SUPPORTED) LP_CUBLAS_CHECK(s);
        (void)cudaGetLastError();
    }
    LP_CHECK(cuda_matmul(c, pre, x, w, bias, N, K, M, w_trans));
    return cuda_gelu(c, post, pre, (size_t)N * M);
}

// The SAE's pre-activation on a bf16 copy of the encoder: bf16 x [N,K] and w [K,M], fp32
// accumulation, an fp32 out [N,M] with the fp32 bias added by the cuBLASLt epilogue (no
// prefilled output). Where cuBLASLt has no algorithm: the bias tiled into out, then
// cublasGemmEx with bf16 inputs, fp32 output and beta = 1 (the same fp32 sum).
lp_status cuda_sae_matmul_bf16(lp_ctx *c, float *out, const uint16_t *x, const uint16_t *w, const float *bias, int N,
                               int K, int M) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_matmul_bf16");
    LP_CUDA_REQUIRE(N > 0 && K > 0 && M > 0 && out && x && w, "cuda_sae_matmul_bf16: bad arguments (N=%d K=%d M=%d)", N,
                    K, M);
    LP_CUDA_REQUIRE(c->blas != NULL, "cuda_sae_matmul_bf16: context has no cuBLAS handle");
    const cublasStatus_t s = lt_matmul_t(c, out, NULL, x, w, bias, N, K, M, 0,
                                         bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT, CUDA_R_16BF,
                                         CUDA_R_32F);
    if (s == CUBLAS_STATUS_SUCCESS) return LP_OK;
    if (s != CUBLAS_STATUS_NOT_SUPPORTED) LP_CUBLAS_CHECK(s);
    (void)cudaGetLastError();
    if (bias) LP_CHECK(tile_rows<float>(c, out, bias, (size_t)N * M, M));
    const float alpha = 1.0f, beta = bias ? 1.0f : 0.0f;
    LP_CUBLAS_CHECK(cublasGemmEx((cublasHandle_t)c->blas, CUBLAS_OP_N, CUBLAS_OP_N, M, N, K, &alpha, w, CUDA_R_16BF, M, x,
                                 CUDA_R_16BF, K, &beta, out, CUDA_R_32F, M, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return LP_OK;
}
