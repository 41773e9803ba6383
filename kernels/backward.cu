// backward.cu: the backward ops of ops.h ("backward ops (attribution gradients)") on the GPU.
// The CPU twins, with the derivation of each formula, are in host/cpu/backward.c.
//
// Activations are float or bf16 (c->dtype), math is fp32, every output is rounded once on
// the store; the RoPE tables and the loss scale are F32 whatever the dtype.
//
//  - LayerNorm / RMSNorm: one block per row, two block sums (mean(g), mean(g * xh)) and a
//    second pass that writes dx. LayerNorm derives the mean exactly as layernorm.cu does
//    (a sum shifted by the row's first element), so xh matches the forward's.
//  - GELU, SwiGLU, RoPE: element-wise grid-stride loops (RoPE: one thread per pair). GELU's
//    and SiLU's derivatives are written with sigmoids, which keep their digits in the tails.
//  - softmax rows and the cross-entropy gradient: a warp per row (softmax) or a block per
//    row with an online (max, sum) pair (cross-entropy, as loss.cu).
//  - Attention: attention_backward.cu.
#include "common.cuh"

static const unsigned kBlock = 256; // element-wise kernels
static const int kWarps = 4;        // rows (warps) per block of the row kernels

// ---- LayerNorm / RMSNorm ----

// dx[N,D] for y = xh * w [+ b], xh = (x - mean) / scale (kCenter) or x / scale (RMSNorm):
//   dx = (g - [mean(g)] - xh * mean(g * xh)) / scale,  g = dy * w.
// One block per row. Every sum is complete before the first write (the block sums end in
// barriers) and each thread rereads its own elements, so dx may alias dy or x.
template <typename T, bool kCenter>
__global__ void norm_backward_kernel(T *dx, const T *dy, const T *x, const T *scale, const T *w, int D) {
    LP_SHARED(float, sh, [32]);
    const size_t row = blockIdx.x;
    const T *xr = x + row * D, *dyr = dy + row * D;
    T *dxr = dx + row * D;
    const float inv = 1.0f / lp_to_f(scale[row]);
    float x0 = 0.0f, mu = 0.0f; // xh = ((x - x0) - mu) * inv
    if (kCenter) {
        x0 = lp_to_f(xr[0]);
        float s = 0.0f;
        for (int d = threadIdx.x; d < D; d += blockDim.x) s += lp_to_f(xr[d]) - x0;
        mu = block_sum(s, sh) / (float)D;
    }
    float sg = 0.0f, sgx = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float xh = ((lp_to_f(xr[d]) - x0) - mu) * inv;
        const float g = lp_to_f(dyr[d]) * (w ? lp_to_f(w[d]) : 1.0f);
        sg += g;
        sgx = fmaf(g, xh, sgx);
    }
    const float mg = kCenter ? block_sum(sg, sh) / (float)D : 0.0f;
    const float mgx = block_sum(sgx, sh) / (float)D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float xh = ((lp_to_f(xr[d]) - x0) - mu) * inv;
        const float g = lp_to_f(dyr[d]) * (w ? lp_to_f(w[d]) : 1.0f);
        dxr[d] = lp_from_f<T>((g - mg - xh * mgx) * inv);
    }
}

static unsigned norm_block(int D) { return D <= 32 ? 32 : D <= 128 ? 128 : 256; }

// dscale[row] = -(1/scale) sum_d dy w xh (the gradient at hook_scale, x held fixed). One block per row.
// The sum is a single number that may cancel: in fp32 its error relative to the result is
// unbounded (D = 1600 gave 6e-5), so it is accumulated in double, like the CPU twin.
template <typename T, bool kCenter>
__global__ void norm_scale_grad_kernel(T *dscale, const T *dy, const T *x, const T *scale, const T *w, int D) {
    LP_SHARED(float, sh, [32]);
    LP_SHARED(double, shd, [32]);
    const size_t row = blockIdx.x;
    const T *xr = x + row * D, *dyr = dy + row * D;
    const float inv = 1.0f / lp_to_f(scale[row]);
    float x0 = 0.0f, mu = 0.0f;
    if (kCenter) {
        x0 = lp_to_f(xr[0]);
        float s = 0.0f;
        for (int d = threadIdx.x; d < D; d += blockDim.x) s += lp_to_f(xr[d]) - x0;
        mu = block_sum(s, sh) / (float)D;
    }
    double acc = 0.0;
    for (int d = threadIdx.x; d < D; d += blockDim.x)
        acc += (double)(lp_to_f(dyr[d]) * (w ? lp_to_f(w[d]) : 1.0f)) * (((lp_to_f(xr[d]) - x0) - mu) * inv);
    const double total = block_sum_d(acc, shd);
    if (threadIdx.x == 0) dscale[row] = lp_from_f<T>((float)(-total * inv));
}

// ---- element-wise ----

// dx = dy * gelu'(x) for the tanh form, written with sig(z) = 1 / (1 + exp(-z)) as
//   gelu'(x) = sig(2u) (1 + 2 x sig(-2u) s (1 + 3 a x^2)),  u = s (x + a x^3),
// which equals 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) s (1 + 3 a x^2) but keeps its digits
// in the tails, where 1 + tanh(u) rounds to 0 or 2^-23 in fp32. dx may alias dy.
template <typename T>
__global__ void gelu_backward_kernel(T *dx, const T *dy, const T *x, size_t n) {
    const float s = 0.7978845608028654f, a = 0.044715f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = lp_load(x, i), u = s * (v + a * v * v * v);
        const float sp = 1.0f / (1.0f + expf(-2.0f * u)), sm = 1.0f / (1.0f + expf(2.0f * u));
        lp_store(dx, i, lp_load(dy, i) * sp * (1.0f + 2.0f * v * sm * s * (1.0f + 3.0f * a * v * v)));
    }
}

// y = silu(g) u: dgate = dy u sig(g) (1 + g sig(-g)), dup = dy g sig(g); sig(-g) rather than
// 1 - sig(g), which cancels for large g.
template <typename T>
__global__ void silu_mul_backward_kernel(T *dgate, T *dup, const T *dy, const T *gate, const T *up, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = lp_load(gate, i), u = lp_load(up, i), d = lp_load(dy, i);
        const float sp = 1.0f / (1.0f + expf(-g)), sm = 1.0f / (1.0f + expf(g));
        lp_store(dgate, i, d * u * sp * (1.0f + g * sm));
        lp_store(dup, i, d * g * sp);
    }
}

// The transpose of the forward rotation: dx1 = dy1 c + dy2 s, dx2 = dy2 c - dy1 s. One thread
// per pair, both halves read before either is written: dx may alias dy.
template <typename T>
__global__ void rope_backward_kernel(T *dx, const T *dy, const float *cos_t, const float *sin_t, int T_, int H,
                                     int dh, int pos0, size_t pairs) {
    const int half = dh / 2;
    for (size_t p = (size_t)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)(p % half);
        const size_t bth = p / half; // (b*T + t)*H + h
        const int t = (int)((bth / H) % T_);
        const size_t off = bth * dh + i;
        const size_t tab = (size_t)(pos0 + t) * half + i;
        const float c = cos_t[tab], s = sin_t[tab];
        const float g1 = lp_to_f(dy[off]), g2 = lp_to_f(dy[off + half]);
        dx[off] = lp_from_f<T>(g1 * c + g2 * s);
        dx[off + half] = lp_from_f<T>(g2 * c - g1 * s);
    }
}

// ---- softmax rows ----

// dx = y (dy - sum_j dy_j y_j), a warp per row. Entries with y = 0 (masked keys) give 0 and
// stay out of the sum. Each lane reads dy_j and y_j before writing dx_j: dx may alias dy.
template <typename T>
__global__ void softmax_rows_backward_kernel(T *dx, const T *dy, const T *y, size_t rows, int cols) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (size_t row = (size_t)blockIdx.x * kWarps + warp; row < rows; row += (size_t)gridDim.x * kWarps) {
        const T *dyr = dy + row * cols, *yr = y + row * cols;
        T *dxr = dx + row * cols;
        float dot = 0.0f;
        for (int j = lane; j < cols; j += 32) {
            const float yj = lp_to_f(yr[j]);
            if (yj != 0.0f) dot = fmaf(lp_to_f(dyr[j]), yj, dot);
        }
        dot = warp_sum(dot);
        for (int j = lane; j < cols; j += 32) {
            const float yj = lp_to_f(yr[j]);
            dxr[j] = lp_from_f<T>(yj != 0.0f ? yj * (lp_to_f(dyr[j]) - dot) : 0.0f);
        }
    }
}

// ---- cross-entropy ----

// dlogits[n,:] = scale[n] (softmax(logits[n,:]) - onehot(target[n])); zeros where target < 0,
// NaN where target >= V (a token the host could not check). One block per row.
template <typename T>
__global__ void xent_backward_kernel(T *dl, const T *logits, const int32_t *targets, const float *scale, int V, int ld) {
    LP_SHARED(float, sm, [32]);
    LP_SHARED(float, ss, [32]);
    const size_t row = blockIdx.x;
    const int tgt = targets[row]; // the same in every thread: the block branches together
    T *o = dl + row * (size_t)ld;
    // a padded row's tail [V, ld) gets zero: no gradient flows through the padding's columns
    for (int j = V + threadIdx.x; j < ld; j += blockDim.x) o[j] = lp_from_f<T>(0.0f);
    if (tgt < 0 || tgt >= V) {
        for (int j = threadIdx.x; j < V; j += blockDim.x) o[j] = lp_from_f<T>(tgt < 0 ? 0.0f : NAN);
        return;
    }
    const T *xr = logits + row * (size_t)ld;
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) lse_push(m, s, lp_to_f(xr[j]));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(LP_FULL_MASK, m, off), s2 = __shfl_xor_sync(LP_FULL_MASK, s, off);
        lse_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) { sm[wid] = m; ss[wid] = s; }
    __syncthreads();
    if (wid == 0) {
        m = lane < nw ? sm[lane] : -INFINITY;
        s = lane < nw ? ss[lane] : 0.0f;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float m2 = __shfl_xor_sync(LP_FULL_MASK, m, off), s2 = __shfl_xor_sync(LP_FULL_MASK, s, off);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) { sm[0] = m; ss[0] = s; }
    }
    __syncthreads();
    m = sm[0];
    const float inv = 1.0f / ss[0], sc = scale[row];
    for (int j = threadIdx.x; j < V; j += blockDim.x)
        o[j] = lp_from_f<T>(sc * (expf(lp_to_f(xr[j]) - m) * inv - (j == tgt ? 1.0f : 0.0f)));
}

// ---- launchers ----

template <typename T, bool kCenter>
static lp_status norm_backward_launch(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale,
                                      const void *w, int N, int D) {
    LP_LAUNCH((unsigned)N, norm_block(D), 0, cuda_stream_of(c), norm_backward_kernel<T, kCenter>)(
        (T *)dx, (const T *)dy, (const T *)x, (const T *)scale, (const T *)w, D);
    LP_LAUNCH_CHECK("norm_backward_kernel");
    return LP_OK;
}

template <typename T>
static lp_status gelu_backward_launch(lp_ctx *c, void *dx, const void *dy, const void *x, size_t n) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), gelu_backward_kernel<T>)((T *)dx, (const T *)dy,
                                                                                (const T *)x, n);
    LP_LAUNCH_CHECK("gelu_backward_kernel");
    return LP_OK;
}

template <typename T>
static lp_status silu_mul_backward_launch(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate,
                                          const void *up, size_t n) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), silu_mul_backward_kernel<T>)(
        (T *)dgate, (T *)dup, (const T *)dy, (const T *)gate, (const T *)up, n);
    LP_LAUNCH_CHECK("silu_mul_backward_kernel");
    return LP_OK;
}

template <typename T>
static lp_status rope_backward_launch(lp_ctx *c, void *dx, const void *dy, const float *cos_t, const float *sin_t,
                                      int B, int T_, int H, int dh, int pos0) {
    const size_t pairs = (size_t)B * T_ * H * (dh / 2);
    LP_LAUNCH(grid_1d(pairs, kBlock), kBlock, 0, cuda_stream_of(c), rope_backward_kernel<T>)(
        (T *)dx, (const T *)dy, cos_t, sin_t, T_, H, dh, pos0, pairs);
    LP_LAUNCH_CHECK("rope_backward_kernel");
    return LP_OK;
}

template <typename T>
static lp_status softmax_rows_backward_launch(lp_ctx *c, void *dx, const void *dy, const void *y, size_t rows,
                                              int cols) {
    LP_LAUNCH(grid_rows((long long)rows, kWarps), kWarps * 32, 0, cuda_stream_of(c), softmax_rows_backward_kernel<T>)(
        (T *)dx, (const T *)dy, (const T *)y, rows, cols);
    LP_LAUNCH_CHECK("softmax_rows_backward_kernel");
    return LP_OK;
}

template <typename T>
static lp_status xent_backward_launch(lp_ctx *c, void *dl, const void *logits, const int32_t *targets,
                                      const float *scale, int N, int V, int ld) {
    const unsigned block = V >= 512 ? 512u : (unsigned)((V + 31) / 32 * 32);
    LP_LAUNCH((unsigned)N, block, 0, cuda_stream_of(c), xent_backward_kernel<T>)((T *)dl, (const T *)logits, targets, scale, V, ld);
    LP_LAUNCH_CHECK("xent_backward_kernel");
    return LP_OK;
}

// ---- entry points ----

static lp_status norm_backward_entry(lp_ctx *c, const char *op, bool center, void *dx, const void *dy,
                                     const void *x, const void *scale, const void *w, int N, int D) {
    LP_CUDA_REQUIRE_CTX(c, op);
    LP_CUDA_REQUIRE(N >= 0 && D > 0, "%s: bad size N=%d D=%d (D must be >= 1)", op, N, D);
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(dx && dy && x && scale, "%s: NULL buffer", op);
    if (c->dtype == LP_BF16)
        return center ? norm_backward_launch<__nv_bfloat16, true>(c, dx, dy, x, scale, w, N, D)
                      : norm_backward_launch<__nv_bfloat16, false>(c, dx, dy, x, scale, w, N, D);
    return center ? norm_backward_launch<float, true>(c, dx, dy, x, scale, w, N, D)
                  : norm_backward_launch<float, false>(c, dx, dy, x, scale, w, N, D);
}

lp_status cuda_ln_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale,
                              const void *w, int N, int D) {
    return norm_backward_entry(c, "cuda_ln_backward", true, dx, dy, x, scale, w, N, D);
}

lp_status cuda_rms_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale,
                               const void *w, int N, int D) {
    return norm_backward_entry(c, "cuda_rms_backward", false, dx, dy, x, scale, w, N, D);
}

lp_status cuda_gelu_backward(lp_ctx *c, void *dx, const void *dy, const void *x, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_gelu_backward");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(dx && dy && x, "cuda_gelu_backward: NULL buffer");
    return c->dtype == LP_BF16 ? gelu_backward_launch<__nv_bfloat16>(c, dx, dy, x, n)
                               : gelu_backward_launch<float>(c, dx, dy, x, n);
}

lp_status cuda_silu_mul_backward(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate,
                                    const void *up, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_silu_mul_backward");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(dgate && dup && dy && gate && up, "cuda_silu_mul_backward: NULL buffer");
    return c->dtype == LP_BF16 ? silu_mul_backward_launch<__nv_bfloat16>(c, dgate, dup, dy, gate, up, n)
                               : silu_mul_backward_launch<float>(c, dgate, dup, dy, gate, up, n);
}

lp_status cuda_rope_backward(lp_ctx *c, void *dx, const void *dy, const float *cos_t, const float *sin_t,
                                int B, int T, int H, int dh, int pos0) {
    const char *op = "cuda_rope_backward";
    LP_CUDA_REQUIRE_CTX(c, op);
    LP_CUDA_REQUIRE(B >= 0 && T >= 0 && H >= 1, "%s: bad size B=%d T=%d H=%d", op, B, T, H);
    LP_CUDA_REQUIRE(dh >= 2 && dh % 2 == 0, "%s: head dim %d is not a positive even number", op, dh);
    LP_CUDA_REQUIRE(pos0 >= 0, "%s: negative pos0 %d", op, pos0);
    if ((size_t)B * T * H == 0) return LP_OK;
    LP_CUDA_REQUIRE(dx && dy && cos_t && sin_t, "%s: NULL buffer", op);
    return c->dtype == LP_BF16 ? rope_backward_launch<__nv_bfloat16>(c, dx, dy, cos_t, sin_t, B, T, H, dh, pos0)
                               : rope_backward_launch<float>(c, dx, dy, cos_t, sin_t, B, T, H, dh, pos0);
}

lp_status cuda_softmax_rows_backward(lp_ctx *c, void *dx, const void *dy, const void *y, size_t rows,
                                        int cols) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_softmax_rows_backward");
    LP_CUDA_REQUIRE(cols >= 0, "cuda_softmax_rows_backward: negative cols %d", cols);
    if (rows == 0 || cols == 0) return LP_OK;
    LP_CUDA_REQUIRE(dx && dy && y, "cuda_softmax_rows_backward: NULL buffer");
    return c->dtype == LP_BF16 ? softmax_rows_backward_launch<__nv_bfloat16>(c, dx, dy, y, rows, cols)
                               : softmax_rows_backward_launch<float>(c, dx, dy, y, rows, cols);
}

lp_status cuda_xent_backward(lp_ctx *c, void *dlogits, const void *logits, const int32_t *targets,
                                const float *scale, int N, int V) {
    return cuda_xent_backward_ld(c, dlogits, logits, targets, scale, N, V, V);
}

// Rows ld apart (ld >= V: the padded unembedding's logits); the columns [V, ld) get zero.
lp_status cuda_xent_backward_ld(lp_ctx *c, void *dlogits, const void *logits, const int32_t *targets,
                                const float *scale, int N, int V, int ld) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_xent_backward");
    LP_CUDA_REQUIRE(N >= 0 && V >= 1 && ld >= V, "cuda_xent_backward: bad size N=%d V=%d ld=%d (V must be >= 1)", N, V, ld);
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(dlogits && logits && targets && scale, "cuda_xent_backward: NULL buffer");
    return c->dtype == LP_BF16 ? xent_backward_launch<__nv_bfloat16>(c, dlogits, logits, targets, scale, N, V, ld)
                               : xent_backward_launch<float>(c, dlogits, logits, targets, scale, N, V, ld);
}

template <typename T>
static lp_status norm_scale_grad_launch(lp_ctx *c, void *dscale, const void *dy, const void *x, const void *scale, const void *w,
                                        int N, int D, int center) {
    if (center)
        LP_LAUNCH((unsigned)N, norm_block(D), 0, cuda_stream_of(c), norm_scale_grad_kernel<T, true>)((T *)dscale, (const T *)dy, (const T *)x, (const T *)scale,
                                                                     (const T *)w, D);
    else
        LP_LAUNCH((unsigned)N, norm_block(D), 0, cuda_stream_of(c), norm_scale_grad_kernel<T, false>)((T *)dscale, (const T *)dy, (const T *)x, (const T *)scale,
                                                                      (const T *)w, D);
    LP_LAUNCH_CHECK("norm_scale_grad_kernel");
    return LP_OK;
}

lp_status cuda_norm_scale_grad(lp_ctx *c, void *dscale, const void *dy, const void *x, const void *scale, const void *w,
                                  int N, int D, int center) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_norm_scale_grad");
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(dscale && dy && x && scale && D > 0, "cuda_norm_scale_grad: bad arguments");
    return c->dtype == LP_BF16 ? norm_scale_grad_launch<__nv_bfloat16>(c, dscale, dy, x, scale, w, N, D, center)
                               : norm_scale_grad_launch<float>(c, dscale, dy, x, scale, w, N, D, center);
}
