// dequant.cu: the ggml block formats (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K, Q6_K)
// to F32, BF16 or F16 on the GPU, for loading GGUF weights. The layouts and formulas are
// those of the CPU reference, host/cpu/dequant.c, which documents them.
//
// One thread per output element, in a grid-stride loop: consecutive threads write
// consecutive outputs (coalesced stores) and read neighbouring bytes of the same block
// (its scales come from cache). Each element costs a few integer operations and one or two
// fp32 multiplies, done with the _rn intrinsics so that nvcc cannot fuse them into an FMA:
// the F32 output is then bit-identical to the CPU's, and the BF16/F16 outputs too (one
// round-to-nearest-even of the same fp32 value). Bytes are read one at a time, so the
// source needs no alignment.
#include <cuda_fp16.h>

#include "common.cuh"
#include "loupe/gguf.h"

namespace {

const unsigned kBlock = 256;

__device__ __forceinline__ float half_at(const uint8_t *p) {
    return __half2float(__ushort_as_half((unsigned short)(p[0] | p[1] << 8)));
}

// The 6-bit scale and min of sub-block s of a Q4_K / Q5_K block (12 packed bytes).
__device__ __forceinline__ void k_scale_min(const uint8_t *q, int s, int *sc, int *m) {
    if (s < 4) {
        *sc = q[s] & 63;
        *m = q[s + 4] & 63;
    } else {
        *sc = (q[s + 4] & 0xF) | (q[s - 4] >> 6) << 4;
        *m = (q[s + 4] >> 4) | (q[s] >> 6) << 4;
    }
}

// Element i of a tensor of ggml type TYPE starting at x.
template <int TYPE> __device__ __forceinline__ float dq(const uint8_t *x, size_t i);

template <> __device__ __forceinline__ float dq<LP_GGML_F32>(const uint8_t *x, size_t i) {
    const uint8_t *p = x + 4 * i;
    return __uint_as_float((unsigned)p[0] | (unsigned)p[1] << 8 | (unsigned)p[2] << 16 | (unsigned)p[3] << 24);
}
template <> __device__ __forceinline__ float dq<LP_GGML_F16>(const uint8_t *x, size_t i) {
    return half_at(x + 2 * i);
}
template <> __device__ __forceinline__ float dq<LP_GGML_BF16>(const uint8_t *x, size_t i) {
    const uint8_t *p = x + 2 * i;
    return __uint_as_float(((unsigned)p[0] | (unsigned)p[1] << 8) << 16);
}
template <> __device__ __forceinline__ float dq<LP_GGML_Q8_0>(const uint8_t *x, size_t i) {
    const uint8_t *b = x + (i / 32) * 34;
    return __fmul_rn(half_at(b), (float)(int8_t)b[2 + i % 32]);
}
template <> __device__ __forceinline__ float dq<LP_GGML_Q4_0>(const uint8_t *x, size_t i) {
    const uint8_t *b = x + (i / 32) * 18;
    const int j = (int)(i % 32);
    const int q = (b[2 + j % 16] >> (4 * (j / 16))) & 0xF;
    return __fmul_rn(half_at(b), (float)(q - 8));
}
template <> __device__ __forceinline__ float dq<LP_GGML_Q4_1>(const uint8_t *x, size_t i) {
    const uint8_t *b = x + (i / 32) * 20;
    const int j = (int)(i % 32);
    const int q = (b[4 + j % 16] >> (4 * (j / 16))) & 0xF;
    return __fadd_rn(__fmul_rn(half_at(b), (float)q), half_at(b + 2));
}
template <> __device__ __forceinline__ float dq<LP_GGML_Q5_0>(const uint8_t *x, size_t i) {
    const uint8_t *b = x + (i / 32) * 22;
    const int j = (int)(i % 32);
    const int q = ((b[6 + j % 16] >> (4 * (j / 16))) & 0xF) | ((b[2 + j / 8] >> (j % 8)) & 1) << 4;
    return __fmul_rn(half_at(b), (float)(q - 16));
}
template <> __device__ __forceinline__ float dq<LP_GGML_Q4_K>(const uint8_t *x, size_t i) {
    const uint8_t *b = x + (i / 256) * 144;
    const int j = (int)(i % 256), s = j / 32, l = j % 32;
    int sc, m;
    k_scale_min(b + 4, s, &sc, &m);
    const int q = (b[16 + 32 * (s / 2) + l] >> (4 * (s & 1))) & 0xF;
    const float ds = __fmul_rn(half_at(b), (float)sc), dm = __fmul_rn(half_at(b + 2), (float)m);
    return __fsub_rn(__fmul_rn(ds, (float)q), dm);
}
template <> __device__ __forceinline__ float dq<LP_GGML_Q5_K>(const uint8_t *x, size_t i) {
    const uint8_t *b = x + (i / 256) * 176;
    const int j = (int)(i % 256), s = j / 32, l = j % 32;
    int sc, m;
    k_scale_min(b + 4, s, &sc, &m);
    const int q = ((b[48 + 32 * (s / 2) + l] >> (4 * (s & 1))) & 0xF) | ((b[16 + l] >> s) & 1) << 4;
    const float ds = __fmul_rn(half_at(b), (float)sc), dm = __fmul_rn(half_at(b + 2), (float)m);
    return __fsub_rn(__fmul_rn(ds, (float)q), dm);
}
template <> __device__ __forceinline__ float dq<LP_GGML_Q6_K>(const uint8_t *x, size_t i) {
    const uint8_t *b = x + (i / 256) * 210;
    const int e = (int)(i % 256), h = e / 128, k = (e % 128) / 32, l = e % 32;
    const int lo = (b[64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 0xF;
    const int hi = (b[128 + 32 * h + l] >> (2 * k)) & 3;
    const float ds = __fmul_rn(half_at(b + 208), (float)(int8_t)b[192 + e / 16]);
    return __fmul_rn(ds, (float)((lo | hi << 4) - 32));
}

template <typename T> __device__ __forceinline__ T to_out(float v);
template <> __device__ __forceinline__ float to_out<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half to_out<__half>(float v) { return __float2half_rn(v); }

template <int TYPE, typename T>
__global__ void dequant_kernel(T *__restrict__ y, const uint8_t *__restrict__ x, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = to_out<T>(dq<TYPE>(x, i));
}

template <int TYPE, typename T>
lp_status launch(lp_ctx *c, void *dst, const void *src, size_t n) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), dequant_kernel<TYPE, T>)((T *)dst, (const uint8_t *)src, n);
    LP_LAUNCH_CHECK("dequant_kernel");
    return LP_OK;
}

template <typename T>
lp_status dispatch(lp_ctx *c, void *dst, const void *src, int type, size_t n) {
    switch (type) {
    case LP_GGML_F32: return launch<LP_GGML_F32, T>(c, dst, src, n);
    case LP_GGML_F16: return launch<LP_GGML_F16, T>(c, dst, src, n);
    case LP_GGML_BF16: return launch<LP_GGML_BF16, T>(c, dst, src, n);
    case LP_GGML_Q8_0: return launch<LP_GGML_Q8_0, T>(c, dst, src, n);
    case LP_GGML_Q4_0: return launch<LP_GGML_Q4_0, T>(c, dst, src, n);
    case LP_GGML_Q4_1: return launch<LP_GGML_Q4_1, T>(c, dst, src, n);
    case LP_GGML_Q5_0: return launch<LP_GGML_Q5_0, T>(c, dst, src, n);
    case LP_GGML_Q4_K: return launch<LP_GGML_Q4_K, T>(c, dst, src, n);
    case LP_GGML_Q5_K: return launch<LP_GGML_Q5_K, T>(c, dst, src, n);
    case LP_GGML_Q6_K: return launch<LP_GGML_Q6_K, T>(c, dst, src, n);
    }
    return LP_ERR(LP_ERR_ARG, "dequant: ggml type %s (%d) cannot be dequantized",
                        lp_ggml_type_name(type), type);
}

} // namespace

extern "C" lp_status cuda_dequant(lp_ctx *c, void *dst, lp_dtype dst_dtype, const void *src, int type,
                                     int64_t n) {
    LP_CUDA_REQUIRE_CTX(c, "dequant");
    LP_CUDA_REQUIRE(dst && src && n >= 0, "dequant: bad arguments (n=%lld)", (long long)n);
    LP_CUDA_REQUIRE(lp_ggml_supported(type) && n % lp_ggml_block_elems(type) == 0,
                    "dequant: %lld elements of ggml type %s is not a whole number of supported blocks",
                    (long long)n, lp_ggml_type_name(type));
    if (n == 0) return LP_OK;
    switch (dst_dtype) {
    case LP_F32: return dispatch<float>(c, dst, src, type, (size_t)n);
    case LP_BF16: return dispatch<__nv_bfloat16>(c, dst, src, type, (size_t)n);
    case LP_F16: return dispatch<__half>(c, dst, src, type, (size_t)n);
    default: break;
    }
    return LP_ERR(LP_ERR_ARG, "dequant: cannot write %s (F32, BF16 or F16)",
                        lp_dtype_name(dst_dtype));
}
