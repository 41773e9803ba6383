// cublasLt.h (emulated): the cuBLASLt calls loupe makes (kernels/matmul.cu), on the emulated
// GEMM of cublas.cpp: D = alpha op(A) op(B) + beta C in fp32, then the epilogue as cuBLASLt
// documents it: + bias (a vector over the rows of D, in D's type unless
// CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE says otherwise), the value before GELU written to the
// auxiliary buffer (GELU_AUX), GELU in its tanh form; one rounding to D's type at the end (and
// one for the auxiliary value). Checked as cuBLASLt checks: the layouts must match op(A), op(B),
// C and D; a bias or auxiliary epilogue without its pointer, or an auxiliary ld below the rows,
// is CUBLAS_STATUS_INVALID_VALUE; an auxiliary buffer whose ld is not a multiple of 8 or
// whose pointer is not 16-byte aligned is CUBLAS_STATUS_NOT_SUPPORTED (the caller must have a
// fallback); every operand must lie inside one device allocation.
#pragma once
#include "cublas_v2.h"

typedef struct lp_emu_lt *cublasLtHandle_t;
typedef struct lp_emu_lt_desc *cublasLtMatmulDesc_t;
typedef struct lp_emu_lt_layout *cublasLtMatrixLayout_t;
typedef struct cublasLtMatmulAlgo_t { uint64_t data[8]; } cublasLtMatmulAlgo_t;

typedef enum {
    CUBLASLT_MATMUL_DESC_TRANSA = 3,
    CUBLASLT_MATMUL_DESC_TRANSB = 4,
    CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
    CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER = 11,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD = 12,
    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26,
} cublasLtMatmulDescAttributes_t;

typedef enum {
    CUBLASLT_EPILOGUE_DEFAULT = 1,
    CUBLASLT_EPILOGUE_BIAS = 4,
    CUBLASLT_EPILOGUE_GELU = 32,
    CUBLASLT_EPILOGUE_GELU_AUX = 32 | 128,
    CUBLASLT_EPILOGUE_GELU_BIAS = 32 | 4,
    CUBLASLT_EPILOGUE_GELU_AUX_BIAS = 32 | 128 | 4,
} cublasLtEpilogue_t;

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h);
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h);
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute, cudaDataType_t scale);
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d);
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t size);
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t type, uint64_t rows, uint64_t cols,
                                          int64_t ld);
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l);
cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t Adesc, const void *B, cublasLtMatrixLayout_t Bdesc,
                              const void *beta, const void *C, cublasLtMatrixLayout_t Cdesc, void *D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t *algo, void *workspace,
                              size_t workspaceSize, cudaStream_t stream);
