// cublas.cpp: the cuBLAS calls of cublas_v2.h on OpenBLAS, with cuBLAS's argument checks
// plus bounds checks of every operand against the emulator's allocation table.
#include "cublas_v2.h"
#include "cublasLt.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>

#include <functional>
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
    // A and B of one type; C of that type, or fp32 under 16-bit A and B (cuBLAS's
    // "16BF/16F in, 32F out" combinations)
    if (At != Bt || (At != Ct && !(Ct == CUDA_R_32F && (At == CUDA_R_16BF || At == CUDA_R_16F))))
        return invalid("mixed operand types (not emulated)", At, Ct);
    if (At != CUDA_R_32F && At != CUDA_R_16BF && At != CUDA_R_16F) return invalid("operand type", At, 0);
    if (compute == CUBLAS_COMPUTE_16F || (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC &&
                                          compute != CUBLAS_COMPUTE_32F_FAST_16BF && compute != CUBLAS_COMPUTE_32F_FAST_16F &&
                                          compute != CUBLAS_COMPUTE_32F_FAST_TF32))
        return invalid("compute type (only the fp32 ones are emulated)", compute, 0);
    return CUBLAS_STATUS_SUCCESS;
}

// One GEMM after the checks: C = alpha op(A) op(B) + beta C in fp32, rounded once on the store.
static void gemm_one(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const void *A,
                     int lda, const void *B, int ldb, float beta, void *C, int ldc, cudaDataType_t t,
                     cudaDataType_t ct, const std::function<void(float *)> &epilogue = nullptr) {
    const int ra = ta == CUBLAS_OP_N ? m : k, ca = ta == CUBLAS_OP_N ? k : m;
    const int rb = tb == CUBLAS_OP_N ? k : n, cb = tb == CUBLAS_OP_N ? n : k;
    check_operand(A, t, ra, ca, lda, "cublasGemmEx A");
    check_operand(B, t, rb, cb, ldb, "cublasGemmEx B");
    check_operand(C, ct, m, n, ldc, "cublasGemmEx C");
    std::vector<float> a = widen(A, t, ra, ca, lda), b = widen(B, t, rb, cb, ldb);
    std::vector<float> c((size_t)m * n, 0.0f);
    if (beta != 0.0f) c = widen(C, ct, m, n, ldc); // beta == 0: C is not read (NaN there stays out)
    if (k > 0)
        cblas_sgemm(CblasColMajor, ta == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
                    tb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, alpha, a.data(), ra > 1 ? ra : 1,
                    b.data(), rb > 1 ? rb : 1, beta, c.data(), m > 1 ? m : 1);
    else
        for (float &v : c) v *= beta;
    if (epilogue) epilogue(c.data()); // cuBLASLt's, on the fp32 result (m x n, dense)
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) store(C, ct, (size_t)j * ldc + i, c[(size_t)j * m + i]);
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
    gemm_one(ta, tb, m, n, k, *(const float *)alpha, A, lda, B, ldb, *(const float *)beta, C, ldc, Atype, Ctype);
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
    const size_t es = type_size(Atype), ecs = type_size(Ctype);
    for (int i = 0; i < batch; i++)
        gemm_one(ta, tb, m, n, k, *(const float *)alpha, (const char *)A + i * sA * es, lda,
                 (const char *)B + i * sB * es, ldb, *(const float *)beta, (char *)C + i * sC * ecs, ldc, Atype, Ctype);
    return CUBLAS_STATUS_SUCCESS;
}

// ---- cuBLASLt (cublasLt.h) ----

struct lp_emu_lt { int device; };
struct lp_emu_lt_desc {
    cublasComputeType_t compute;
    cublasOperation_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
    int epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    const void *bias = nullptr, *aux_set = nullptr;
    void *aux = nullptr;
    int64_t aux_ld = 0;
    int bias_type = -1; // -1: D's type
};
struct lp_emu_lt_layout { cudaDataType_t type; uint64_t rows, cols; int64_t ld; };

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    int dev = 0;
    cudaGetDevice(&dev);
    *h = new lp_emu_lt{dev};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) { delete h; return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute, cudaDataType_t scale) {
    if (!d || scale != CUDA_R_32F) return CUBLAS_STATUS_INVALID_VALUE;
    *d = new lp_emu_lt_desc();
    (*d)->compute = compute;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) { delete d; return CUBLAS_STATUS_SUCCESS; }

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t size) {
    if (!d || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    int32_t i32 = 0;
    if (size == 4) memcpy(&i32, buf, 4);
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: if (size != 4) return CUBLAS_STATUS_INVALID_VALUE; d->ta = (cublasOperation_t)i32; break;
    case CUBLASLT_MATMUL_DESC_TRANSB: if (size != 4) return CUBLAS_STATUS_INVALID_VALUE; d->tb = (cublasOperation_t)i32; break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE: if (size != 4) return CUBLAS_STATUS_INVALID_VALUE; d->epilogue = i32; break;
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: if (size != 4) return CUBLAS_STATUS_INVALID_VALUE; d->bias_type = i32; break;
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
        if (size != sizeof(void *)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->bias, buf, sizeof(void *));
        break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER:
        if (size != sizeof(void *)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->aux, buf, sizeof(void *));
        break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD:
        if (size != 8) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->aux_ld, buf, 8);
        break;
    default: return CUBLAS_STATUS_INVALID_VALUE;
    }
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t type, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
    if (!l || ld < (int64_t)(rows > 1 ? rows : 1)) return CUBLAS_STATUS_INVALID_VALUE;
    *l = new lp_emu_lt_layout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) { delete l; return CUBLAS_STATUS_SUCCESS; }

static float gelu_tanh(float x) {
    const float s = 0.7978845608028654f, a = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(s * (x + a * x * x * x)));
}

static cublasStatus_t lt_invalid(const char *why) {
    fprintf(stderr, "loupe CUDA emulator: cublasLtMatmul: %s\n", why);
    return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t Ad, const void *B, cublasLtMatrixLayout_t Bd, const void *beta,
                              const void *C, cublasLtMatrixLayout_t Cd, void *D, cublasLtMatrixLayout_t Dd,
                              const cublasLtMatmulAlgo_t *algo, void *ws, size_t ws_size, cudaStream_t stream) {
    (void)algo, (void)ws, (void)ws_size, (void)stream;
    if (!h || !d) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!Ad || !Bd || !Cd || !Dd || !alpha || !beta) return lt_invalid("NULL layout, alpha or beta");
    const int m = (int)Dd->rows, n = (int)Dd->cols;
    const int k = (int)(d->ta == CUBLAS_OP_N ? Ad->cols : Ad->rows);
    if ((int)(d->ta == CUBLAS_OP_N ? Ad->rows : Ad->cols) != m) return lt_invalid("op(A) rows differ from D's");
    if ((int)(d->tb == CUBLAS_OP_N ? Bd->rows : Bd->cols) != k) return lt_invalid("op(B) rows differ from op(A) columns");
    if ((int)(d->tb == CUBLAS_OP_N ? Bd->cols : Bd->rows) != n) return lt_invalid("op(B) columns differ from D's");
    if (Cd->rows != Dd->rows || Cd->cols != Dd->cols || Cd->type != Dd->type) return lt_invalid("C and D layouts differ");
    if (C != D && *(const float *)beta != 0.0f) return lt_invalid("C != D with beta != 0 (not emulated)");
    if (Cd->ld != Dd->ld) return lt_invalid("C and D leading dimensions differ (not emulated)");
    lp_emu_blas as_blas{h->device, nullptr}; // the same checks as cublasGemmEx
    cublasStatus_t s = gemm_checks(&as_blas, d->ta, d->tb, m, n, k, Ad->type, (int)Ad->ld, Bd->type, (int)Bd->ld,
                                   Dd->type, (int)Dd->ld, d->compute);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    const int ep = d->epilogue;
    if (ep != CUBLASLT_EPILOGUE_DEFAULT && ep != CUBLASLT_EPILOGUE_BIAS && ep != CUBLASLT_EPILOGUE_GELU &&
        ep != CUBLASLT_EPILOGUE_GELU_AUX && ep != CUBLASLT_EPILOGUE_GELU_BIAS && ep != CUBLASLT_EPILOGUE_GELU_AUX_BIAS)
        return lt_invalid("epilogue not emulated");
    const bool has_bias = ep & CUBLASLT_EPILOGUE_BIAS, has_gelu = ep & CUBLASLT_EPILOGUE_GELU, has_aux = ep & 128;
    const cudaDataType_t bt = d->bias_type < 0 ? Dd->type : (cudaDataType_t)d->bias_type;
    if (has_bias && !d->bias) return lt_invalid("a bias epilogue without CUBLASLT_MATMUL_DESC_BIAS_POINTER");
    if (has_aux && !d->aux) return lt_invalid("an AUX epilogue without CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER");
    if (has_aux && d->aux_ld < m) return lt_invalid("CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD below the rows of D");
    if (has_aux && (d->aux_ld % 8 || (uintptr_t)d->aux % 16)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    if (has_bias) lp_emu::check_device_range(d->bias, (size_t)m * type_size(bt), "cublasLtMatmul bias");
    if (has_aux) check_operand(d->aux, Dd->type, m, n, (int)d->aux_ld, "cublasLtMatmul aux");
    std::function<void(float *)> epilogue;
    if (has_bias || has_gelu)
        epilogue = [&](float *c) {
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) {
                    float &v = c[(size_t)j * m + i];
                    if (has_bias) v += load(d->bias, bt, i);
                    if (has_aux) store(d->aux, Dd->type, (size_t)j * d->aux_ld + i, v);
                    if (has_gelu) v = gelu_tanh(v);
                }
        };
    gemm_one(d->ta, d->tb, m, n, k, *(const float *)alpha, A, (int)Ad->ld, B, (int)Bd->ld, *(const float *)beta, D,
             (int)Dd->ld, Ad->type, Dd->type, epilogue);
    return CUBLAS_STATUS_SUCCESS;
}
