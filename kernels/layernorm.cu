// layernorm.cu: LayerNorm as TransformerLens splits it (ops.h): cuda_ln_scale writes
// scale[n] = sqrt(var + eps) (hook_scale), cuda_ln_apply writes (x - mean) / scale
// [* w + b] (hook_normalized, then the affine), so a hook can edit scale in between.
//
// One block per row, fp32 accumulation, two passes over the row. The first pass sums
// x - x0 (x0 = the row's first element) rather than x: for a row with a large mean,
// summing x directly and forming (x - mean) loses ~|mean| * 2^-24 per element, while the
// shifted sum keeps the error relative to the spread of the row (|x0 - mean| is at most
// sqrt(D) standard deviations). Both kernels derive the mean by the same code, so the
// normalized value agrees with the scale written earlier.
#include "common.cuh"

// Per row: mu = mean(x) - x0. Every thread of the block gets it.
template <typename T>
__device__ __forceinline__ float row_shifted_mean(const T *xr, int D, float x0, float *sh) {
    float s = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) s += lp_to_f(xr[d]) - x0;
    return block_sum(s, sh) / (float)D;
}

// scale[N] = sqrt(mean((x - mean)^2) + eps); x is [N,D]
template <typename T>
__global__ void ln_scale_kernel(T *scale, const T *x, int D, float eps) {
    LP_SHARED(float, sh, [32]);
    const T *xr = x + (size_t)blockIdx.x * D;
    const float x0 = lp_to_f(xr[0]);
    const float mu = row_shifted_mean(xr, D, x0, sh);
    float v = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float t = (lp_to_f(xr[d]) - x0) - mu;
        v = fmaf(t, t, v);
    }
    v = block_sum(v, sh) / (float)D;
    if (threadIdx.x == 0) scale[blockIdx.x] = lp_from_f<T>(sqrtf(v + eps));
}

// out[N,D] = (x - mean) / scale [* w] [+ b]. Each element is read before it is written
// by the same thread, so out may alias x.
template <typename T>
__global__ void ln_apply_kernel(T *out, const T *x, const T *scale, const T *w, const T *b, int D) {
    LP_SHARED(float, sh, [32]);
    const size_t row = blockIdx.x;
    const T *xr = x + row * D;
    T *outr = out + row * D;
    const float x0 = lp_to_f(xr[0]);
    const float mu = row_shifted_mean(xr, D, x0, sh);
    const float sc = lp_to_f(scale[row]);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = ((lp_to_f(xr[d]) - x0) - mu) / sc;
        if (w) v *= lp_to_f(w[d]);
        if (b) v += lp_to_f(b[d]);
        outr[d] = lp_from_f<T>(v);
    }
}

// Threads per row: enough to cover typical D (768 ... 1600) in a few strides.
static unsigned ln_block(int D) { return D <= 32 ? 32 : D <= 128 ? 128 : 256; }

template <typename T>
static lp_status ln_scale_launch(lp_ctx *c, void *scale, const void *x, int N, int D, float eps) {
    LP_LAUNCH((unsigned)N, ln_block(D), 0, cuda_stream_of(c), ln_scale_kernel<T>)((T *)scale, (const T *)x, D,
                                                                      eps);
    LP_LAUNCH_CHECK("ln_scale_kernel");
    return LP_OK;
}

template <typename T>
static lp_status ln_apply_launch(lp_ctx *c, void *out, const void *x, const void *scale,
                                 const void *w, const void *b, int N, int D) {
    LP_LAUNCH((unsigned)N, ln_block(D), 0, cuda_stream_of(c), ln_apply_kernel<T>)(
        (T *)out, (const T *)x, (const T *)scale, (const T *)w, (const T *)b, D);
    LP_LAUNCH_CHECK("ln_apply_kernel");
    return LP_OK;
}

lp_status cuda_ln_scale(lp_ctx *c, void *scale, const void *x, int N, int D, float eps) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_ln_scale");
    LP_CUDA_REQUIRE(N >= 0 && D > 0, "cuda_ln_scale: bad size N=%d D=%d (D must be >= 1)", N, D);
    LP_CUDA_REQUIRE(eps >= 0.0f, "cuda_ln_scale: eps %g is negative", (double)eps);
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(scale && x, "cuda_ln_scale: NULL buffer");
    return c->dtype == LP_BF16 ? ln_scale_launch<__nv_bfloat16>(c, scale, x, N, D, eps)
                               : ln_scale_launch<float>(c, scale, x, N, D, eps);
}

lp_status cuda_ln_apply(lp_ctx *c, void *out, const void *x, const void *scale, const void *w,
                           const void *b, int N, int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_ln_apply");
    LP_CUDA_REQUIRE(N >= 0 && D > 0, "cuda_ln_apply: bad size N=%d D=%d (D must be >= 1)", N, D);
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && x && scale, "cuda_ln_apply: NULL buffer");
    return c->dtype == LP_BF16 ? ln_apply_launch<__nv_bfloat16>(c, out, x, scale, w, b, N, D)
                               : ln_apply_launch<float>(c, out, x, scale, w, b, N, D);
}
