// llama.cu: the Llama-family ops of ops.h: RMSNorm as TransformerLens splits it
// (cuda_rms_scale writes scale[n] = sqrt(mean(x^2) + eps), hook_scale; cuda_rms_apply
// writes x / scale [* w], hook_normalized then the weight), rotary position embedding in
// the rotate-half form and the SwiGLU product silu(gate) * up. (Attention against a KV
// cache is the fused kernel of attention.cu.) The CPU twins are in host/cpu/llama.c.
//
// All math is fp32 with one rounding on the store; activations are float or bf16 (c->dtype),
// the RoPE tables are always F32. RMSNorm needs no shifted sum (unlike LayerNorm): there is
// no mean to subtract, so summing x^2 loses nothing to cancellation.
//
#include "common.cuh"

static const unsigned kBlock = 256;  // element-wise kernels

// ---- RMSNorm ----

// scale[N] = sqrt(mean(x^2) + eps); x is [N,D]. One block per row.
template <typename T>
__global__ void rms_scale_kernel(T *scale, const T *x, int D, float eps) {
    LP_SHARED(float, sh, [32]);
    const T *xr = x + (size_t)blockIdx.x * D;
    float ss = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float v = lp_to_f(xr[d]);
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss, sh);
    if (threadIdx.x == 0) scale[blockIdx.x] = lp_from_f<T>(sqrtf(ss / (float)D + eps));
}

// out[N,D] = x / scale [* w]. One block per row; each element is read before the same
// thread writes it, so out may alias x.
template <typename T>
__global__ void rms_apply_kernel(T *out, const T *x, const T *scale, const T *w, int D) {
    const size_t row = blockIdx.x;
    const T *xr = x + row * D;
    T *outr = out + row * D;
    const float sc = lp_to_f(scale[row]);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = lp_to_f(xr[d]) / sc;
        if (w) v *= lp_to_f(w[d]);
        outr[d] = lp_from_f<T>(v);
    }
}

static unsigned rms_block(int D) { return D <= 32 ? 32 : D <= 128 ? 128 : 256; }

// ---- RoPE ----

// One thread per rotated pair (b, t, h, i < dh/2). The thread reads x[i] and x[i + dh/2]
// before writing either, and no other thread touches that pair, so out may alias x.
template <typename T>
__global__ void rope_kernel(T *out, const T *x, const float *cos_t, const float *sin_t, int T_,
                            int H, int dh, int pos0, size_t pairs) {
    const int half = dh / 2;
    for (size_t p = (size_t)blockIdx.x * blockDim.x + threadIdx.x; p < pairs;
         p += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)(p % half);
        const size_t bth = p / half; // (b*T + t)*H + h
        const int t = (int)((bth / H) % T_);
        const size_t off = bth * dh + i;
        const size_t tab = (size_t)(pos0 + t) * half + i;
        const float c = cos_t[tab], s = sin_t[tab];
        const float x1 = lp_to_f(x[off]), x2 = lp_to_f(x[off + half]);
        out[off] = lp_from_f<T>(x1 * c - x2 * s);
        out[off + half] = lp_from_f<T>(x2 * c + x1 * s);
    }
}

// ---- SwiGLU ----

// out[i] = gate[i] / (1 + exp(-gate[i])) * up[i]; out may alias gate or up.
template <typename T>
__global__ void silu_mul_kernel(T *out, const T *gate, const T *up, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float g = lp_load(gate, i);
        lp_store(out, i, g / (1.0f + expf(-g)) * lp_load(up, i));
    }
}

// ---- launchers ----

template <typename T>
static lp_status rms_scale_launch(lp_ctx *c, void *scale, const void *x, int N, int D, float eps) {
    LP_LAUNCH((unsigned)N, rms_block(D), 0, cuda_stream_of(c), rms_scale_kernel<T>)((T *)scale, (const T *)x,
                                                                        D, eps);
    LP_LAUNCH_CHECK("rms_scale_kernel");
    return LP_OK;
}

template <typename T>
static lp_status rms_apply_launch(lp_ctx *c, void *out, const void *x, const void *scale,
                                  const void *w, int N, int D) {
    LP_LAUNCH((unsigned)N, rms_block(D), 0, cuda_stream_of(c), rms_apply_kernel<T>)(
        (T *)out, (const T *)x, (const T *)scale, (const T *)w, D);
    LP_LAUNCH_CHECK("rms_apply_kernel");
    return LP_OK;
}

template <typename T>
static lp_status rope_launch(lp_ctx *c, void *out, const void *x, const float *cos_t,
                             const float *sin_t, int B, int T_, int H, int dh, int pos0) {
    const size_t pairs = (size_t)B * T_ * H * (dh / 2);
    LP_LAUNCH(grid_1d(pairs, kBlock), kBlock, 0, cuda_stream_of(c), rope_kernel<T>)(
        (T *)out, (const T *)x, cos_t, sin_t, T_, H, dh, pos0, pairs);
    LP_LAUNCH_CHECK("rope_kernel");
    return LP_OK;
}

template <typename T>
static lp_status silu_mul_launch(lp_ctx *c, void *out, const void *gate, const void *up,
                                 size_t n) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), silu_mul_kernel<T>)(
        (T *)out, (const T *)gate, (const T *)up, n);
    LP_LAUNCH_CHECK("silu_mul_kernel");
    return LP_OK;
}



// ---- entry points ----

lp_status cuda_rms_scale(lp_ctx *c, void *scale, const void *x, int N, int D, float eps) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_rms_scale");
    LP_CUDA_REQUIRE(N >= 0 && D > 0, "cuda_rms_scale: bad size N=%d D=%d (D must be >= 1)", N, D);
    LP_CUDA_REQUIRE(eps >= 0.0f, "cuda_rms_scale: eps %g is negative", (double)eps);
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(scale && x, "cuda_rms_scale: NULL buffer");
    return c->dtype == LP_BF16 ? rms_scale_launch<__nv_bfloat16>(c, scale, x, N, D, eps)
                               : rms_scale_launch<float>(c, scale, x, N, D, eps);
}

lp_status cuda_rms_apply(lp_ctx *c, void *out, const void *x, const void *scale, const void *w, int N,
                            int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_rms_apply");
    LP_CUDA_REQUIRE(N >= 0 && D > 0, "cuda_rms_apply: bad size N=%d D=%d (D must be >= 1)", N, D);
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && x && scale, "cuda_rms_apply: NULL buffer");
    return c->dtype == LP_BF16 ? rms_apply_launch<__nv_bfloat16>(c, out, x, scale, w, N, D)
                               : rms_apply_launch<float>(c, out, x, scale, w, N, D);
}

lp_status cuda_rope(lp_ctx *c, void *out, const void *x, const float *cos_t, const float *sin_t, int B,
                       int T, int H, int dh, int pos0) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_rope");
    LP_CUDA_REQUIRE(B >= 0 && T >= 0 && H >= 1, "cuda_rope: bad size B=%d T=%d H=%d", B, T, H);
    LP_CUDA_REQUIRE(dh >= 2 && dh % 2 == 0, "cuda_rope: head dim %d is not a positive even number",
                    dh);
    LP_CUDA_REQUIRE(pos0 >= 0, "cuda_rope: negative pos0 %d", pos0);
    if ((size_t)B * T * H == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && x && cos_t && sin_t, "cuda_rope: NULL buffer");
    return c->dtype == LP_BF16
               ? rope_launch<__nv_bfloat16>(c, out, x, cos_t, sin_t, B, T, H, dh, pos0)
               : rope_launch<float>(c, out, x, cos_t, sin_t, B, T, H, dh, pos0);
}

lp_status cuda_silu_mul(lp_ctx *c, void *out, const void *gate, const void *up, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_silu_mul");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && gate && up, "cuda_silu_mul: NULL buffer");
    return c->dtype == LP_BF16 ? silu_mul_launch<__nv_bfloat16>(c, out, gate, up, n)
                               : silu_mul_launch<float>(c, out, gate, up, n);
}


