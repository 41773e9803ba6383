// gemma.cu: the Gemma-family element-wise ops of ops.h and their backward ops: the GeGLU
// product gelu_tanh(gate) * up, Gemma 2's soft-cap cap * tanh(x / cap), and a scalar scale.
// The CPU twins are host/ops/cpu/gemma.c and backward.c. Grid-stride loops in fp32 with one
// rounding on the store; each thread reads an element before it writes it, so outputs may
// alias inputs (no __restrict__).
#include "common.cuh"

static const unsigned kBlock = 256;

// gelu_tanh(g) * u, gelu_tanh written as elementwise.cu's gelu_kernel (accurate tanhf).
template <typename T>
__global__ void gelu_mul_kernel(T *out, const T *gate, const T *up, size_t n) {
    const float k = 0.7978845608028654f; // sqrt(2/pi)
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = lp_load(gate, i), u = lp_load(up, i);
        lp_store(out, i, 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g))) * u);
    }
}

template <typename T>
__global__ void softcap_kernel(T *out, const T *x, float cap, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        lp_store(out, i, cap * tanhf(lp_load(x, i) / cap));
}

template <typename T>
__global__ void scale_kernel(T *out, const T *x, float s, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        lp_store(out, i, lp_load(x, i) * s);
}

// y = gelu(g) u: dgate = dy u gelu'(g), dup = dy gelu(g), both in the sigmoid form of
// backward.cu's gelu_backward_kernel (gelu(g) = g sig(2v), v = s (g + a g^3)), which keeps
// its digits in the tails where 1 + tanh(v) rounds to 0.
template <typename T>
__global__ void gelu_mul_backward_kernel(T *dgate, T *dup, const T *dy, const T *gate, const T *up, size_t n) {
    const float s = 0.7978845608028654f, a = 0.044715f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = lp_load(gate, i), u = lp_load(up, i), d = lp_load(dy, i);
        const float v = s * (g + a * g * g * g);
        const float sp = 1.0f / (1.0f + expf(-2.0f * v)), sm = 1.0f / (1.0f + expf(2.0f * v));
        lp_store(dgate, i, d * u * sp * (1.0f + 2.0f * g * sm * s * (1.0f + 3.0f * a * g * g)));
        lp_store(dup, i, d * g * sp);
    }
}

// dx = dy (1 - (y / cap)^2) from the capped output y.
template <typename T>
__global__ void softcap_backward_kernel(T *dx, const T *dy, const T *y, float cap, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float r = lp_load(y, i) / cap;
        lp_store(dx, i, lp_load(dy, i) * (1.0f - r * r));
    }
}

// ---- launchers ----

template <typename T>
static lp_status gelu_mul_launch(lp_ctx *c, void *out, const void *gate, const void *up, size_t n) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), gelu_mul_kernel<T>)((T *)out, (const T *)gate,
                                                                                 (const T *)up, n);
    LP_LAUNCH_CHECK("gelu_mul_kernel");
    return LP_OK;
}

template <typename T>
static lp_status softcap_launch(lp_ctx *c, void *out, const void *x, float cap, size_t n) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), softcap_kernel<T>)((T *)out, (const T *)x, cap, n);
    LP_LAUNCH_CHECK("softcap_kernel");
    return LP_OK;
}

template <typename T>
static lp_status scale_launch(lp_ctx *c, void *out, const void *x, float s, size_t n) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), scale_kernel<T>)((T *)out, (const T *)x, s, n);
    LP_LAUNCH_CHECK("scale_kernel");
    return LP_OK;
}

template <typename T>
static lp_status gelu_mul_backward_launch(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate,
                                          const void *up, size_t n) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), gelu_mul_backward_kernel<T>)(
        (T *)dgate, (T *)dup, (const T *)dy, (const T *)gate, (const T *)up, n);
    LP_LAUNCH_CHECK("gelu_mul_backward_kernel");
    return LP_OK;
}

template <typename T>
static lp_status softcap_backward_launch(lp_ctx *c, void *dx, const void *dy, const void *y, float cap, size_t n) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), softcap_backward_kernel<T>)((T *)dx, (const T *)dy,
                                                                                         (const T *)y, cap, n);
    LP_LAUNCH_CHECK("softcap_backward_kernel");
    return LP_OK;
}

// ---- entry points ----

lp_status cuda_gelu_mul(lp_ctx *c, void *out, const void *gate, const void *up, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_gelu_mul");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && gate && up, "cuda_gelu_mul: NULL buffer");
    return c->dtype == LP_BF16 ? gelu_mul_launch<__nv_bfloat16>(c, out, gate, up, n)
                               : gelu_mul_launch<float>(c, out, gate, up, n);
}

lp_status cuda_softcap(lp_ctx *c, void *out, const void *x, float cap, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_softcap");
    LP_CUDA_REQUIRE(cap > 0.0f, "cuda_softcap: cap %g is not positive", (double)cap);
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && x, "cuda_softcap: NULL buffer");
    return c->dtype == LP_BF16 ? softcap_launch<__nv_bfloat16>(c, out, x, cap, n)
                               : softcap_launch<float>(c, out, x, cap, n);
}

lp_status cuda_scale(lp_ctx *c, void *out, const void *x, float s, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_scale");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && x, "cuda_scale: NULL buffer");
    return c->dtype == LP_BF16 ? scale_launch<__nv_bfloat16>(c, out, x, s, n) : scale_launch<float>(c, out, x, s, n);
}

lp_status cuda_gelu_mul_backward(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate,
                                    const void *up, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_gelu_mul_backward");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(dgate && dup && dy && gate && up, "cuda_gelu_mul_backward: NULL buffer");
    return c->dtype == LP_BF16 ? gelu_mul_backward_launch<__nv_bfloat16>(c, dgate, dup, dy, gate, up, n)
                               : gelu_mul_backward_launch<float>(c, dgate, dup, dy, gate, up, n);
}

lp_status cuda_softcap_backward(lp_ctx *c, void *dx, const void *dy, const void *y, float cap, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_softcap_backward");
    LP_CUDA_REQUIRE(cap > 0.0f, "cuda_softcap_backward: cap %g is not positive", (double)cap);
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(dx && dy && y, "cuda_softcap_backward: NULL buffer");
    return c->dtype == LP_BF16 ? softcap_backward_launch<__nv_bfloat16>(c, dx, dy, y, cap, n)
                               : softcap_backward_launch<float>(c, dx, dy, y, cap, n);
}
