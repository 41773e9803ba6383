// llama.cu: the Llama-family ops of ops.h: RMSNorm as TransformerLens splits it
// (lp_cuda_rms_scale writes scale[n] = sqrt(mean(x^2) + eps), hook_scale; lp_cuda_rms_apply
// writes x / scale [* w], hook_normalized then the weight), rotary position embedding in
// the rotate-half form, the SwiGLU product silu(gate) * up, and attention against a KV
// cache for generation. The CPU twins are in host/cpu/llama.c.
//
// All math is fp32 with one rounding on the store; activations are float or bf16 (c->dtype),
// the RoPE tables are always F32. RMSNorm needs no shifted sum (unlike LayerNorm): there is
// no mean to subtract, so summing x^2 loses nothing to cancellation.
//
// lp_cuda_attention_cached is the fused kernel of attention.cu (one warp per (b, head,
// query) row, online softmax over chunks of 32 keys, dh <= 256) with the query's absolute
// position pos0 + i deciding how many cached keys it reads and the caches strided by Tcap.
// A row's arithmetic does not depend on Tq or on which launch it is in, so decoding token
// by token gives bit for bit the rows of one pass over the whole prompt.
#include "common.cuh"

static const unsigned kBlock = 256;  // element-wise kernels
static const int kCachedWarps = 4;   // rows (warps) per block of the cached attention
static const int kCachedMaxDh = 256; // 8 values per lane

// ---- RMSNorm ----

// scale[N] = sqrt(mean(x^2) + eps); x is [N,D]. One block per row.
template <typename T>
__global__ void rms_scale_kernel(T *scale, const T *x, int D, float eps) {
    __shared__ float sh[32];
    const T *xr = x + (size_t)blockIdx.x * D;
    float ss = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float v = lp_to_f(xr[d]);
        ss = fmaf(v, v, ss);
    }
    ss = lp_block_sum(ss, sh);
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

// ---- attention against a KV cache ----

// q.k over dh with q in shared memory (broadcast) and k a row of the cache.
template <typename T>
__device__ __forceinline__ float cached_dot_qk(const float *qs, const T *kr, int dh) {
    float s = 0.0f;
    for (int d = 0; d < dh; d++) s = fmaf(qs[d], lp_to_f(kr[d]), s);
    return s;
}

// z[b,i,h,:] = softmax_j(q[b,i,h,:] . kc[b,j,h/group,:] / sqrt(dh)) vc[b,j,h/group,:] over
// j = 0 .. pos0 + i. Rows run query-last-first so the longest start first.
template <typename T, int DPL>
__global__ void
attention_cached_kernel(T *z, const T *q, const T *kc, const T *vc, int B, int Tq, int Tcap,
                        int pos0, int H, int Hkv, int dh, float scale) {
    extern __shared__ float smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *qs = smem + warp * dh;
    const long long rows = (long long)B * H * Tq;
    const int group = H / Hkv;
    const size_t kv_stride = (size_t)Hkv * dh; // between consecutive cached positions

    for (long long row = (long long)blockIdx.x * kCachedWarps + warp; row < rows;
         row += (long long)gridDim.x * kCachedWarps) {
        const int i = Tq - 1 - (int)(row % Tq);
        const long long bh = row / Tq;
        const int h = (int)(bh % H), b = (int)(bh / H);
        const int last = pos0 + i; // the last key this query sees
        const size_t qoff = (((size_t)b * Tq + i) * H + h) * dh;
        __syncwarp(); // the previous row's readers of qs are done
        for (int d = lane; d < dh; d += 32) qs[d] = lp_to_f(q[qoff + d]);
        __syncwarp();

        const size_t kv0 = ((size_t)b * Tcap * Hkv + h / group) * dh; // position 0 of this kv head
        const T *kb = kc + kv0;
        const T *vb = vc + kv0;
        float m = -INFINITY, l = 0.0f, acc[DPL];
#pragma unroll
        for (int k = 0; k < DPL; k++) acc[k] = 0.0f;

        for (int j0 = 0; j0 <= last; j0 += 32) {
            const int j = j0 + lane;
            const bool live = j <= last; // positions after `last` may hold anything: never read
            const float s = live ? cached_dot_qk(qs, kb + (size_t)j * kv_stride, dh) * scale
                                 : -INFINITY;
            // Lane 0's key is always live, so m_new is finite; on the first chunk m = -inf
            // and corr = exp(-inf) = 0.
            const float m_new = fmaxf(m, lp_warp_max(s));
            const float corr = expf(m - m_new);
            const float p = live ? expf(s - m_new) : 0.0f;
            l = l * corr + lp_warp_sum(p);
#pragma unroll
            for (int k = 0; k < DPL; k++) acc[k] *= corr;
            const int cnt = min(32, last - j0 + 1); // the same in every lane
#pragma unroll 4
            for (int jj = 0; jj < cnt; jj++) {
                const float pj = __shfl_sync(LP_FULL_MASK, p, jj);
                const T *vr = vb + (size_t)(j0 + jj) * kv_stride;
#pragma unroll
                for (int k = 0; k < DPL; k++) {
                    const int d = lane + 32 * k;
                    if (d < dh) acc[k] = fmaf(pj, lp_to_f(vr[d]), acc[k]);
                }
            }
            m = m_new;
        }
        const float inv = 1.0f / l; // l >= 1: the max key contributes exp(0)
#pragma unroll
        for (int k = 0; k < DPL; k++) {
            const int d = lane + 32 * k;
            if (d < dh) z[qoff + d] = lp_from_f<T>(acc[k] * inv);
        }
    }
}

// ---- launchers ----

template <typename T>
static lp_status rms_scale_launch(lp_ctx *c, void *scale, const void *x, int N, int D, float eps) {
    rms_scale_kernel<T><<<(unsigned)N, rms_block(D), 0, lp_stream(c)>>>((T *)scale, (const T *)x,
                                                                        D, eps);
    LP_LAUNCH_CHECK("rms_scale_kernel");
    return LP_OK;
}

template <typename T>
static lp_status rms_apply_launch(lp_ctx *c, void *out, const void *x, const void *scale,
                                  const void *w, int N, int D) {
    rms_apply_kernel<T><<<(unsigned)N, rms_block(D), 0, lp_stream(c)>>>(
        (T *)out, (const T *)x, (const T *)scale, (const T *)w, D);
    LP_LAUNCH_CHECK("rms_apply_kernel");
    return LP_OK;
}

template <typename T>
static lp_status rope_launch(lp_ctx *c, void *out, const void *x, const float *cos_t,
                             const float *sin_t, int B, int T_, int H, int dh, int pos0) {
    const size_t pairs = (size_t)B * T_ * H * (dh / 2);
    rope_kernel<T><<<lp_grid_1d(pairs, kBlock), kBlock, 0, lp_stream(c)>>>(
        (T *)out, (const T *)x, cos_t, sin_t, T_, H, dh, pos0, pairs);
    LP_LAUNCH_CHECK("rope_kernel");
    return LP_OK;
}

template <typename T>
static lp_status silu_mul_launch(lp_ctx *c, void *out, const void *gate, const void *up,
                                 size_t n) {
    silu_mul_kernel<T><<<lp_grid_1d(n, kBlock), kBlock, 0, lp_stream(c)>>>(
        (T *)out, (const T *)gate, (const T *)up, n);
    LP_LAUNCH_CHECK("silu_mul_kernel");
    return LP_OK;
}

// Blocks for `rows` warp-rows; the kernel loops if the grid had to be capped.
static unsigned cached_row_grid(long long rows) {
    long long g = (rows + kCachedWarps - 1) / kCachedWarps;
    if (g < 1) g = 1;
    if (g > 0x7fffffffLL) g = 0x7fffffffLL;
    return (unsigned)g;
}

template <typename T, int DPL>
static lp_status attention_cached_launch(lp_ctx *c, void *z, const void *q, const void *kc,
                                         const void *vc, int B, int Tq, int Tcap, int pos0, int H,
                                         int Hkv, int dh) {
    const long long rows = (long long)B * H * Tq;
    const size_t smem = (size_t)kCachedWarps * dh * sizeof(float);
    attention_cached_kernel<T, DPL><<<cached_row_grid(rows), kCachedWarps * 32, smem,
                                      lp_stream(c)>>>(
        (T *)z, (const T *)q, (const T *)kc, (const T *)vc, B, Tq, Tcap, pos0, H, Hkv, dh,
        1.0f / sqrtf((float)dh));
    LP_LAUNCH_CHECK("attention_cached_kernel");
    return LP_OK;
}

template <typename T>
static lp_status attention_cached_dispatch(lp_ctx *c, void *z, const void *q, const void *kc,
                                           const void *vc, int B, int Tq, int Tcap, int pos0,
                                           int H, int Hkv, int dh) {
#define LP_CACHED_LAUNCH(DPL) \
    attention_cached_launch<T, DPL>(c, z, q, kc, vc, B, Tq, Tcap, pos0, H, Hkv, dh)
    if (dh <= 32) return LP_CACHED_LAUNCH(1);
    if (dh <= 64) return LP_CACHED_LAUNCH(2);
    if (dh <= 128) return LP_CACHED_LAUNCH(4);
    return LP_CACHED_LAUNCH(8);
#undef LP_CACHED_LAUNCH
}

// ---- entry points ----

lp_status lp_cuda_rms_scale(lp_ctx *c, void *scale, const void *x, int N, int D, float eps) {
    LP_CUDA_REQUIRE_CTX(c, "lp_cuda_rms_scale");
    LP_CUDA_REQUIRE(N >= 0 && D > 0, "lp_cuda_rms_scale: bad size N=%d D=%d (D must be >= 1)", N, D);
    LP_CUDA_REQUIRE(eps >= 0.0f, "lp_cuda_rms_scale: eps %g is negative", (double)eps);
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(scale && x, "lp_cuda_rms_scale: NULL buffer");
    return c->dtype == LP_BF16 ? rms_scale_launch<__nv_bfloat16>(c, scale, x, N, D, eps)
                               : rms_scale_launch<float>(c, scale, x, N, D, eps);
}

lp_status lp_cuda_rms_apply(lp_ctx *c, void *out, const void *x, const void *scale, const void *w, int N,
                            int D) {
    LP_CUDA_REQUIRE_CTX(c, "lp_cuda_rms_apply");
    LP_CUDA_REQUIRE(N >= 0 && D > 0, "lp_cuda_rms_apply: bad size N=%d D=%d (D must be >= 1)", N, D);
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && x && scale, "lp_cuda_rms_apply: NULL buffer");
    return c->dtype == LP_BF16 ? rms_apply_launch<__nv_bfloat16>(c, out, x, scale, w, N, D)
                               : rms_apply_launch<float>(c, out, x, scale, w, N, D);
}

lp_status lp_cuda_rope(lp_ctx *c, void *out, const void *x, const float *cos_t, const float *sin_t, int B,
                       int T, int H, int dh, int pos0) {
    LP_CUDA_REQUIRE_CTX(c, "lp_cuda_rope");
    LP_CUDA_REQUIRE(B >= 0 && T >= 0 && H >= 1, "lp_cuda_rope: bad size B=%d T=%d H=%d", B, T, H);
    LP_CUDA_REQUIRE(dh >= 2 && dh % 2 == 0, "lp_cuda_rope: head dim %d is not a positive even number",
                    dh);
    LP_CUDA_REQUIRE(pos0 >= 0, "lp_cuda_rope: negative pos0 %d", pos0);
    if ((size_t)B * T * H == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && x && cos_t && sin_t, "lp_cuda_rope: NULL buffer");
    return c->dtype == LP_BF16
               ? rope_launch<__nv_bfloat16>(c, out, x, cos_t, sin_t, B, T, H, dh, pos0)
               : rope_launch<float>(c, out, x, cos_t, sin_t, B, T, H, dh, pos0);
}

lp_status lp_cuda_silu_mul(lp_ctx *c, void *out, const void *gate, const void *up, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "lp_cuda_silu_mul");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && gate && up, "lp_cuda_silu_mul: NULL buffer");
    return c->dtype == LP_BF16 ? silu_mul_launch<__nv_bfloat16>(c, out, gate, up, n)
                               : silu_mul_launch<float>(c, out, gate, up, n);
}

lp_status lp_cuda_attention_cached(lp_ctx *c, void *z, const void *q, const void *kc, const void *vc,
                                   int B, int Tq, int Tcap, int pos0, int H, int Hkv, int dh) {
    const char *op = "lp_cuda_attention_cached";
    LP_CUDA_REQUIRE_CTX(c, op);
    LP_CUDA_REQUIRE(B >= 0 && Tq >= 0 && Tcap >= 0 && pos0 >= 0,
                    "%s: negative size B=%d Tq=%d Tcap=%d pos0=%d", op, B, Tq, Tcap, pos0);
    LP_CUDA_REQUIRE((long long)pos0 + Tq <= Tcap, "%s: positions %d .. %lld do not fit a cache of %d",
                    op, pos0, (long long)pos0 + Tq - 1, Tcap);
    LP_CUDA_REQUIRE(H >= 1 && Hkv >= 1 && H % Hkv == 0,
                    "%s: H=%d must be a positive multiple of Hkv=%d", op, H, Hkv);
    LP_CUDA_REQUIRE(dh >= 1 && dh <= kCachedMaxDh, "%s: head dim %d outside 1..%d", op, dh,
                    kCachedMaxDh);
    if ((long long)B * Tq == 0) return LP_OK;
    LP_CUDA_REQUIRE(z && q && kc && vc, "%s: NULL buffer", op);
    if (c->dtype == LP_BF16)
        return attention_cached_dispatch<__nv_bfloat16>(c, z, q, kc, vc, B, Tq, Tcap, pos0, H,
                                                        Hkv, dh);
    return attention_cached_dispatch<float>(c, z, q, kc, vc, B, Tq, Tcap, pos0, H, Hkv, dh);
}
