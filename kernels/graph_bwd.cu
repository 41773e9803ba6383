// graph_bwd.cu: the device pieces of the replacement model's backward (host/ops/graph_ops.h):
// row-major fp32 GEMMs on cuBLAS (the value path, the skips, the patterns' scores), and the
// small kernels around them: the causal softmax of the frozen patterns, the frozen norms'
// backward, the injection of a row block's directions, and the contractions that turn the
// gradient at a layer's MLP output into graph edges (features, errors, tokens).
// Everything is fp32 with fp32 accumulation: the CPU twin is host/model/frozen_bwd.c and
// host/attrib/graph_rows.c.
#include "common.cuh"
#include "ops/graph_ops.h"

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
extern "C" lp_status cuda_fz_gemm(lp_ctx *c, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                                  long long sA, const float *B, int ldb, long long sB, float beta, float *C, int ldc,
                                  long long sC, int batch) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_fz_gemm");
    LP_CUDA_REQUIRE(M >= 0 && N >= 0 && K >= 0 && batch >= 0, "cuda_fz_gemm: negative size");
    if (M == 0 || N == 0 || batch == 0) return LP_OK;
    cublasHandle_t h = (cublasHandle_t)c->blas;
    const cublasOperation_t oa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (batch == 1)
        LP_CUBLAS_CHECK(cublasGemmEx(h, ob, oa, N, M, K, &alpha, B, CUDA_R_32F, ldb, A, CUDA_R_32F, lda, &beta, C, CUDA_R_32F,
                                     ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    else
        LP_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, ob, oa, N, M, K, &alpha, B, CUDA_R_32F, ldb, sB, A, CUDA_R_32F, lda, sA,
                                                   &beta, C, CUDA_R_32F, ldc, sC, batch, CUBLAS_COMPUTE_32F,
                                                   CUBLAS_GEMM_DEFAULT));
    return LP_OK;
}

// One block per row: soft-cap, max, exponentials, sum (fp32, max-subtracted), then zeros
// outside the keys the query sees (past it, or before its window). Each thread keeps the
// same keys through the cap, max and exponential loops.
__global__ void fz_softmax_kernel(float *P, int Tm, int win, float cap) {
    LP_SHARED(float, sh, [32]);
    float *p = P + (size_t)blockIdx.x * Tm;
    const int q = blockIdx.x % Tm;
    const int lo = win > 0 && q - win + 1 > 0 ? q - win + 1 : 0;
    float mx = -INFINITY;
    for (int j = lo + threadIdx.x; j <= q; j += blockDim.x) {
        if (cap > 0.0f) p[j] = cap * tanhf(p[j] / cap);
        mx = fmaxf(mx, p[j]);
    }
    mx = block_max(mx, sh);
    float s = 0.0f;
    for (int j = lo + threadIdx.x; j <= q; j += blockDim.x) {
        const float e = expf(p[j] - mx);
        p[j] = e;
        s += e;
    }
    s = block_sum(s, sh);
    const float inv = 1.0f / s;
    for (int j = threadIdx.x; j < Tm; j += blockDim.x) p[j] = j >= lo && j <= q ? p[j] * inv : 0.0f;
}

extern "C" lp_status cuda_fz_causal_softmax(lp_ctx *c, float *P, int rows, int Tm, int win, float cap) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_fz_causal_softmax");
    if (rows <= 0 || Tm <= 0) return LP_OK;
    LP_LAUNCH((unsigned)rows, 128, 0, cuda_stream_of(c), fz_softmax_kernel)(P, Tm, win, cap);
    LP_LAUNCH_CHECK("fz_softmax_kernel");
    return LP_OK;
}

// One block per (r, t) row; the centring mean in double, as the CPU twin.
__global__ void fz_norm_back_kernel(float *dst, const float *g, const float *w, const float *s, int Tm, int D, int centre) {
    LP_SHARED(double, sh, [32]);
    const size_t row = blockIdx.x;
    const float inv_s = 1.0f / s[row % Tm];
    const float *gi = g + row * D;
    float *di = dst + row * D;
    double mu = 0.0;
    if (centre) {
        double part = 0.0;
        for (int i = threadIdx.x; i < D; i += blockDim.x) part += (double)gi[i] * (w ? w[i] : 1.0f) * inv_s;
        mu = block_sum_d(part, sh) / D;
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) di[i] += (float)((double)gi[i] * (w ? w[i] : 1.0f) * inv_s - mu);
}

extern "C" lp_status cuda_fz_norm_back_add(lp_ctx *c, float *dst, const float *g, const float *w, const float *s, int R,
                                           int Tm, int D, int centre) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_fz_norm_back_add");
    if (R <= 0 || Tm <= 0) return LP_OK;
    LP_LAUNCH((unsigned)((size_t)R * Tm), 128, 0, cuda_stream_of(c), fz_norm_back_kernel)(dst, g, w, s, Tm, D, centre);
    LP_LAUNCH_CHECK("fz_norm_back_kernel");
    return LP_OK;
}

__global__ void fz_inject_kernel(float *g, int L, int Tm, int D, const int *layer, const int *pos, const float *vec) {
    const int r = blockIdx.x;
    if (layer[r] != L) return;
    float *gi = g + ((size_t)r * Tm + pos[r]) * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) gi[i] += vec[(size_t)r * D + i];
}

extern "C" lp_status cuda_fz_inject(lp_ctx *c, float *g, int L, int R, int Tm, int D, const int *layer, const int *pos,
                                    const float *vec) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_fz_inject");
    if (R <= 0) return LP_OK;
    LP_LAUNCH((unsigned)R, 128, 0, cuda_stream_of(c), fz_inject_kernel)(g, L, Tm, D, layer, pos, vec);
    LP_LAUNCH_CHECK("fz_inject_kernel");
    return LP_OK;
}

// One warp per (r, t).
__global__ void fz_row_dots_kernel(float *out, long long ldo, const float *G, const float *E, int R, int Tm, int D) {
    const size_t w = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    const bool live = w < (size_t)R * Tm; // the whole warp agrees, so the shuffle stays converged
    const int r = live ? (int)(w / Tm) : 0, t = live ? (int)(w % Tm) : 0;
    float s = 0.0f;
    if (live)
        for (int i = lane; i < D; i += 32) s += G[((size_t)r * Tm + t) * D + i] * E[(size_t)t * D + i];
    s = warp_sum(s);
    if (live && lane == 0) out[(size_t)r * ldo + t] = s;
}

extern "C" lp_status cuda_fz_row_dots(lp_ctx *c, float *out, long long ldo, const float *G, const float *E, int R, int Tm,
                                      int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_fz_row_dots");
    if (R <= 0 || Tm <= 0) return LP_OK;
    LP_LAUNCH(ceil_div_u((size_t)R * Tm, 8), 256, 0, cuda_stream_of(c), fz_row_dots_kernel)(out, ldo, G, E, R, Tm, D);
    LP_LAUNCH_CHECK("fz_row_dots_kernel");
    return LP_OK;
}

// A 32 x 32 tile of (rows, features) per step, block (32, 8): one position's features
// against 32 rows of G at that position, D in chunks of 32 through shared memory; the
// decoder rows are gathered by feature index. Each thread keeps 4 rows of one feature.
#define FZ_TILE 32
__global__ void fz_feature_dots_kernel(float *out, long long ldo, const float *G, int R, int Tm, int D, const int *pstart,
                                       const int *feat, const float *act, const float *W) {
    LP_SHARED(float, Gs, [FZ_TILE][FZ_TILE + 1]);
    LP_SHARED(float, Ws, [FZ_TILE][FZ_TILE + 1]);
    const int t = blockIdx.x, r0 = blockIdx.y * FZ_TILE, tx = threadIdx.x, ty = threadIdx.y;
    const int j0 = pstart[t], j1 = pstart[t + 1];
    for (int f0 = j0; f0 < j1; f0 += FZ_TILE) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int k0 = 0; k0 < D; k0 += FZ_TILE) {
            for (int i = ty; i < FZ_TILE; i += 8) {
                const int r = r0 + i, k = k0 + tx, f = f0 + i;
                Gs[i][tx] = r < R && k < D ? G[((size_t)r * Tm + t) * D + k] : 0.0f;
                Ws[i][tx] = f < j1 && k < D ? W[(size_t)feat[f] * D + k] : 0.0f;
            }
            __syncthreads();
            for (int kk = 0; kk < FZ_TILE; kk++) {
                const float wv = Ws[tx][kk];
#pragma unroll
                for (int q = 0; q < 4; q++) acc[q] += Gs[ty + 8 * q][kk] * wv;
            }
            __syncthreads();
        }
        const int f = f0 + tx;
        if (f < j1)
            for (int q = 0; q < 4; q++) {
                const int r = r0 + ty + 8 * q;
                if (r < R) out[(size_t)r * ldo + f] += act[f] * acc[q];
            }
    }
}

extern "C" lp_status cuda_fz_feature_dots(lp_ctx *c, float *out, long long ldo, const float *G, int R, int Tm, int D,
                                          const int *pstart, const int *feat, const float *act, const float *W) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_fz_feature_dots");
    if (R <= 0 || Tm <= 0) return LP_OK;
    LP_LAUNCH(dim3((unsigned)Tm, ceil_div_u((size_t)R, FZ_TILE)), dim3(32, 8), 0, cuda_stream_of(c),
              fz_feature_dots_kernel)(out, ldo, G, R, Tm, D, pstart, feat, act, W);
    LP_LAUNCH_CHECK("fz_feature_dots_kernel");
    return LP_OK;
}

extern "C" lp_status cuda_fz_mem_info(lp_ctx *c, size_t *free_b, size_t *total_b) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_fz_mem_info");
    LP_CUDA_CHECK(cudaMemGetInfo(free_b, total_b));
    return LP_OK;
}
