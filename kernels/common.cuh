// common.cuh: what every CUDA file of loupe shares: the check macros that turn a failed
// CUDA or cuBLAS call (or kernel launch) into an lp_status with the failing expression,
// file and line; dtype-generic loads and stores (activations are float or bf16, math is
// always fp32); grid sizing; and warp / block reductions.
//
// Only kernels/*.cu include this. Their exported lp_cuda_* entry points are declared in
// host/ops/ops_internal.h (extern "C") and validate their arguments before launching on the
// context's compute stream.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "loupe/status.h"
#include "loupe/tensor.h"
#include "ops/ops_internal.h"

// ---- error checks ----------------------------------------------------------------------
// On failure we also call cudaGetLastError(): the runtime remembers the last error of any
// call, and a non-sticky error that we already reported must not resurface later as the
// "launch failure" of an unrelated kernel.

#define LP_CUDA_CHECK(expr)                                                                 \
    do {                                                                                    \
        cudaError_t lp_e_ = (expr);                                                         \
        if (lp_e_ != cudaSuccess) {                                                         \
            (void)cudaGetLastError();                                                       \
            return LP_ERR(LP_ERR_CUDA, "CUDA error %s: %s in %s", \
                                cudaGetErrorName(lp_e_), cudaGetErrorString(lp_e_), #expr); \
        }                                                                                   \
    } while (0)

// For functions with one cleanup label: records the error in `st` and jumps to `label`.
#define LP_CUDA_TRY(st, label, expr)                                                        \
    do {                                                                                    \
        cudaError_t lp_e_ = (expr);                                                         \
        if (lp_e_ != cudaSuccess) {                                                         \
            (void)cudaGetLastError();                                                       \
            (st) = LP_ERR(LP_ERR_CUDA, "CUDA error %s: %s in %s", \
                                cudaGetErrorName(lp_e_), cudaGetErrorString(lp_e_), #expr); \
            goto label;                                                                     \
        }                                                                                   \
    } while (0)

#define LP_CUBLAS_CHECK(expr)                                                               \
    do {                                                                                    \
        cublasStatus_t lp_b_ = (expr);                                                      \
        if (lp_b_ != CUBLAS_STATUS_SUCCESS) {                                               \
            (void)cudaGetLastError();                                                       \
            return LP_ERR(LP_ERR_CUDA, "cuBLAS error %s: %s in %s", \
                                cublasGetStatusName(lp_b_), cublasGetStatusString(lp_b_),   \
                                #expr);                                                     \
        }                                                                                   \
    } while (0)

#define LP_CUBLAS_TRY(st, label, expr)                                                      \
    do {                                                                                    \
        cublasStatus_t lp_b_ = (expr);                                                      \
        if (lp_b_ != CUBLAS_STATUS_SUCCESS) {                                               \
            (void)cudaGetLastError();                                                       \
            (st) = LP_ERR(LP_ERR_CUDA, "cuBLAS error %s: %s in %s", \
                                cublasGetStatusName(lp_b_), cublasGetStatusString(lp_b_),   \
                                #expr);                                                     \
            goto label;                                                                     \
        }                                                                                   \
    } while (0)

// After every <<<...>>>: a bad launch configuration is only reported through the
// runtime's last-error slot. (Faults inside the kernel surface at the next sync.)
#define LP_LAUNCH_CHECK(kernel_name)                                                        \
    do {                                                                                    \
        cudaError_t lp_e_ = cudaGetLastError();                                             \
        if (lp_e_ != cudaSuccess)                                                           \
            return LP_ERR(LP_ERR_CUDA, \
                                "CUDA error %s: %s in launch of %s", cudaGetErrorName(lp_e_), \
                                cudaGetErrorString(lp_e_), kernel_name);                    \
    } while (0)

// Argument checks shared by every op entry point, then the context's device made current:
// the runtime's current device belongs to the host thread, and one thread may hold contexts
// on several devices (each op runs on its context's device, not on the last one initialised).
#define LP_CUDA_REQUIRE_CTX(c, op)                                                          \
    do {                                                                                    \
        if ((c) == NULL || (c)->device != LP_CUDA)                                          \
            return LP_ERR(LP_ERR_ARG, \
                                "%s: context is not a CUDA context", (op));                 \
        if ((c)->dtype != LP_F32 && (c)->dtype != LP_BF16)                                  \
            return LP_ERR(LP_ERR_ARG, \
                                "%s: activation dtype %s is not supported on CUDA "         \
                                "(F32 or BF16)", (op), lp_dtype_name((c)->dtype));           \
        LP_CUDA_CHECK(cudaSetDevice((c)->cuda_device));                                     \
    } while (0)

// Fails with LP_ERR_ARG and a printf-style message (which should name the op) unless cond.
#define LP_CUDA_REQUIRE(cond, ...)                                                          \
    do {                                                                                    \
        if (!(cond)) return LP_ERR(LP_ERR_ARG, __VA_ARGS__);      \
    } while (0)

static inline cudaStream_t cuda_stream_of(const lp_ctx *c) { return (cudaStream_t)c->stream; }

// ---- launches and shared memory ----------------------------------------------------------
// Every launch and every shared-memory declaration goes through these three macros, so the
// same sources also build as C++ against the CPU emulator of tests/cuda_emu/ (whose
// cuda_runtime.h defines LOUPE_CUDA_EMU and its own versions of them):
//   LP_LAUNCH(grid, block, smem, stream, kernel<targs>)(args...)  is  kernel<<<...>>>(args...)
//   LP_SHARED(T, name, [dims])                                    is  __shared__ T name[dims]
//   LP_DYNAMIC_SHARED(T, name)                                    is  extern __shared__ T name[]
// The kernel comes last because its template arguments may contain commas.
#ifndef LOUPE_CUDA_EMU
#define LP_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define LP_SHARED(T, name, ...) __shared__ T name __VA_ARGS__
#define LP_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// ---- dtype-generic loads and stores ----------------------------------------------------
// Activations are float or __nv_bfloat16 in memory; every kernel computes in fp32 and
// rounds once on the store (round to nearest even, like lp_f32_to_bf16 on the host).

template <typename T> __device__ __forceinline__ float lp_to_f(T v);
template <> __device__ __forceinline__ float lp_to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float lp_to_f<__nv_bfloat16>(__nv_bfloat16 v) {
    return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T lp_from_f(float v);
template <> __device__ __forceinline__ float lp_from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 lp_from_f<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

template <typename T> __device__ __forceinline__ float lp_load(const T *p, size_t i) {
    return lp_to_f<T>(p[i]);
}
template <typename T> __device__ __forceinline__ void lp_store(T *p, size_t i, float v) {
    p[i] = lp_from_f<T>(v);
}

// ---- grid sizing -----------------------------------------------------------------------
// Element-wise kernels use grid-stride loops, so the grid only needs to fill the GPU; the
// cap keeps the block count far below the 2^31-1 limit for any n.
static inline unsigned grid_1d(size_t n, unsigned block) {
    const size_t cap = 65536;
    size_t g = (n + block - 1) / block;
    if (g < 1) g = 1;
    if (g > cap) g = cap;
    return (unsigned)g;
}

// out[i] = src[i % period] for i < total: a block repeated along the rows. It is both the
// position embedding (wpe[T,D] over the batch) and the bias prefill of matmul (bias[M] over rows).
template <typename T>
__global__ void tile_kernel(T *out, const T *src, size_t total, size_t period) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        out[i] = src[i % period];
}

template <typename T>
static lp_status tile_rows(lp_ctx *c, void *out, const void *src, size_t total, size_t period) {
    LP_LAUNCH(grid_1d(total, 256), 256, 0, cuda_stream_of(c), tile_kernel<T>)((T *)out, (const T *)src,
                                                                       total, period);
    LP_LAUNCH_CHECK("tile_kernel");
    return LP_OK;
}

static inline unsigned ceil_div_u(size_t n, unsigned d) { return (unsigned)((n + d - 1) / d); }

// ---- attention options (lp_attn_cfg) as the kernels take them (attention*.cu) ----
// scale resolved (1/sqrt(dh) for 0, in float as it always was), cap 0 for none, window 0 for
// every earlier key.
struct lp_attn_opts {
    float scale, cap;
    int window;
};
static inline lp_attn_opts attn_opts_of(const lp_attn_cfg *cfg, int dh) {
    lp_attn_opts o;
    o.scale = cfg && cfg->scale > 0 ? cfg->scale : 1.0f / sqrtf((float)dh);
    o.cap = cfg ? cfg->softcap : 0.0f;
    o.window = cfg ? cfg->window : 0;
    return o;
}
// The score of a raw dot product: scaled, then soft-capped (Gemma 2).
__device__ __forceinline__ float attn_score(float dot, const lp_attn_opts &o) {
    const float s = dot * o.scale;
    return o.cap > 0.0f ? o.cap * tanhf(s / o.cap) : s;
}
// The first key a query at position t sees (the window's start, or 0).
__device__ __forceinline__ int attn_first(int t, int window) {
    return window > 0 && t >= window ? t - window + 1 : 0;
}
// One past the last query that sees key j, of T queries: j + window (capped at T), or T.
__device__ __forceinline__ int attn_query_end(int j, int T_, int window) {
    return window > 0 && T_ - j > window ? j + window : T_;
}

// ---- online log-sum-exp: (m, s) = running max and sum of exp(x - m) (loss.cu, backward.cu) ----
// Adds exp(x - m) to the pair (m, s), moving the max when x exceeds it.
__device__ __forceinline__ void lse_push(float &m, float &s, float x) {
    if (x == -INFINITY) return; // contributes exp(-inf) = 0; keeps -inf - -inf out
    if (x > m) {
        s = s * expf(m - x) + 1.0f; // m = -inf on the first element: s = 0 * 0 + 1
        m = x;
    } else {
        s += expf(x - m);
    }
}

// Merges (m2, s2) into (m, s). A pair with m = -inf is empty (s = 0).
__device__ __forceinline__ void lse_merge(float &m, float &s, float m2, float s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) { m = m2; s = s2; return; }
    const float mm = fmaxf(m, m2);
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// ---- row kernels ----
// Blocks for `rows` rows at rows_per_block a block (the row kernels: a warp a row); the
// kernels loop if the grid had to be capped.
static inline unsigned grid_rows(long long rows, int rows_per_block) {
    long long g = (rows + rows_per_block - 1) / rows_per_block;
    if (g < 1) g = 1;
    if (g > 0x7fffffffLL) g = 0x7fffffffLL;
    return (unsigned)g;
}

// ---- reductions ------------------------------------------------------------------------
#define LP_FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LP_FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(LP_FULL_MASK, v, o));
    return v;
}

// Block-wide sum / max; every thread gets the result. blockDim.x must be a multiple of 32
// (at most 1024) and every thread of the block must call it. `sh` is 32 floats of shared
// memory; the leading barrier lets consecutive calls reuse it.
__device__ __forceinline__ float block_sum(float v, float *sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}
// The same in double, for sums that may cancel (sh: 32 doubles).
__device__ __forceinline__ double block_sum_d(double v, double *sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LP_FULL_MASK, v, o);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LP_FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float block_max(float v, float *sh) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    return warp_max(v);
}
