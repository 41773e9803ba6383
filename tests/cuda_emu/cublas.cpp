// cublas.cpp: the cuBLAS calls of cublas_v2.h on OpenBLAS, with cuBLAS's argument checks
// plus bounds checks of every operand against the emulator's allocation table.
#include "cublas_v2.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>

#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace lp_emu {
void check_device_range(const void *p, size_t n, const char *what);
}

struct lp_emu_blas {
    int device;
    cudaStream_t stream;
};

cublasStatus_t cublasCreate(cublasHandle_t *h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    int dev = 0;
    cudaGetDevice(&dev);
    *h = new lp_emu_blas{dev, nullptr};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode) {
    (void)mode;
    return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

const char *cublasGetStatusName(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}
const char *cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    default: return "cuBLAS error";
    }
}

static size_t type_size(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

static float load(const void *p, cudaDataType_t t, size_t i) {
    if (t == CUDA_R_32F) return ((const float *)p)[i];
    if (t == CUDA_R_16BF) return __bfloat162float(((const __nv_bfloat16 *)p)[i]);
    return __half2float(((const __half *)p)[i]);
}
static void store(void *p, cudaDataType_t t, size_t i, float v) {
    if (t == CUDA_R_32F) ((float *)p)[i] = v;
    else if (t == CUDA_R_16BF) ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v);
    else ((__half *)p)[i] = __float2half_rn(v);
}

static cublasStatus_t invalid(const char *why, long long a, long long b) {
    fprintf(stderr, "loupe CUDA emulator: cublasGemmEx: %s (%lld, %lld)\n", why, a, b);
    return CUBLAS_STATUS_INVALID_VALUE;
}

// rows x cols column-major with leading dimension ld, widened to a dense fp32 copy.
static std::vector<float> widen(const void *p, cudaDataType_t t, int rows, int cols, int ld) {
    std::vector<float> out((size_t)rows * cols);
    for (int j = 0; j < cols; j++)
        for (int i = 0; i < rows; i++) out[(size_t)j * rows + i] = load(p, t, (size_t)j * ld + i);
    return out;
}

// Bounds of a rows x cols operand with leading dimension ld (the last element it touches).
static void check_operand(const void *p, cudaDataType_t t, int rows, int cols, int ld, const char *what) {
    if (rows == 0 || cols == 0) return;
    const size_t n = ((size_t)(cols - 1) * ld + rows) * type_size(t);
    lp_emu::check_device_range(p, n, what);
}

static cublasStatus_t gemm_checks(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  cudaDataType_t At, int lda, cudaDataType_t Bt, int ldb, cudaDataType_t Ct, int ldc,
                                  cublasComputeType_t compute) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    int dev = 0;
    cudaGetDevice(&dev);
    if (dev != h->device) {
        fprintf(stderr, "loupe CUDA emulator: cuBLAS handle of device %d used while device %d is current\n", h->device, dev);
        abort();
    }
    if ((ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) || (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T))
        return invalid("transa / transb", ta, tb);
    if (m < 0 || n < 0 || k < 0) return invalid("negative m, n or k", m < 0 ? m : n, k);
    const int ra = ta == CUBLAS_OP_N ? m : k, rb = tb == CUBLAS_OP_N ? k : n;
    if (lda < (ra > 1 ? ra : 1)) return invalid("lda below the rows of op(A)'s storage", lda, ra);
    if (ldb < (rb > 1 ? rb : 1)) return invalid("ldb below the rows of op(B)'s storage", ldb, rb);
    if (ldc < (m > 1 ? m : 1)) return invalid("ldc below m", ldc, m);
    if (At != Bt || At != Ct) return invalid("mixed operand types (not emulated)", At, Ct);
    if (At != CUDA_R_32F && At != CUDA_R_16BF && At != CUDA_R_16F) return invalid("operand type", At, 0);
    if (compute == CUBLAS_COMPUTE_16F || (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC &&
                                          compute != CUBLAS_COMPUTE_32F_FAST_16BF && compute != CUBLAS_COMPUTE_32F_FAST_16F &&
                                          compute != CUBLAS_COMPUTE_32F_FAST_TF32))
        return invalid("compute type (only the fp32 ones are emulated)", compute, 0);
    return CUBLAS_STATUS_SUCCESS;
}

// One GEMM after the checks: C = alpha op(A) op(B) + beta C in fp32, rounded once on the store.
static void gemm_one(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const void *A,
                     int lda, const void *B, int ldb, float beta, void *C, int ldc, cudaDataType_t t) {
    const int ra = ta == CUBLAS_OP_N ? m : k, ca = ta == CUBLAS_OP_N ? k : m;
    const int rb = tb == CUBLAS_OP_N ? k : n, cb = tb == CUBLAS_OP_N ? n : k;
    check_operand(A, t, ra, ca, lda, "cublasGemmEx A");
    check_operand(B, t, rb, cb, ldb, "cublasGemmEx B");
    check_operand(C, t, m, n, ldc, "cublasGemmEx C");
    std::vector<float> a = widen(A, t, ra, ca, lda), b = widen(B, t, rb, cb, ldb);
    std::vector<float> c((size_t)m * n, 0.0f);
    if (beta != 0.0f) c = widen(C, t, m, n, ldc); // beta == 0: C is not read (NaN there stays out)
    if (k > 0)
        cblas_sgemm(CblasColMajor, ta == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
                    tb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, alpha, a.data(), ra > 1 ? ra : 1,
                    b.data(), rb > 1 ? rb : 1, beta, c.data(), m > 1 ? m : 1);
    else
        for (float &v : c) v *= beta;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) store(C, t, (size_t)j * ldc + i, c[(size_t)j * m + i]);
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType_t Atype, int lda, const void *B,
                            cudaDataType_t Btype, int ldb, const void *beta, void *C, cudaDataType_t Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo) {
    (void)algo;
    cublasStatus_t s = gemm_checks(h, ta, tb, m, n, k, Atype, lda, Btype, ldb, Ctype, ldc, compute);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    if (!alpha || !beta) return invalid("NULL alpha or beta", 0, 0);
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    gemm_one(ta, tb, m, n, k, *(const float *)alpha, A, lda, B, ldb, *(const float *)beta, C, ldc, Ctype);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                          int k, const void *alpha, const void *A, cudaDataType_t Atype, int lda,
                                          long long sA, const void *B, cudaDataType_t Btype, int ldb, long long sB,
                                          const void *beta, void *C, cudaDataType_t Ctype, int ldc, long long sC,
                                          int batch, cublasComputeType_t compute, cublasGemmAlgo_t algo) {
    (void)algo;
    cublasStatus_t s = gemm_checks(h, ta, tb, m, n, k, Atype, lda, Btype, ldb, Ctype, ldc, compute);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    if (batch < 0) return invalid("negative batch count", batch, 0);
    if (!alpha || !beta) return invalid("NULL alpha or beta", 0, 0);
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    const size_t es = type_size(Atype);
    for (int i = 0; i < batch; i++)
        gemm_one(ta, tb, m, n, k, *(const float *)alpha, (const char *)A + i * sA * es, lda,
                 (const char *)B + i * sB * es, ldb, *(const float *)beta, (char *)C + i * sC * es, ldc, Ctype);
    return CUBLAS_STATUS_SUCCESS;
}
