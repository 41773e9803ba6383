// elementwise.cu: the memory-bound ops of ops.h: token and position embedding, residual
// add, GELU and the LayerNorm affine. Each is a grid-stride loop over the output in fp32
// with one rounding on the store. lp_add and lp_affine allow out to alias an input, so no
// pointer here is __restrict__ (each thread reads an element before it writes it).
#include "common.cuh"

static const unsigned kBlock = 256;

// out[N,D] = wte[tok[n], :] (a copy: exact in either dtype)
template <typename T>
__global__ void embed_kernel(T *out, const int32_t *tok, const T *wte, int N, int D) {
    const size_t total = (size_t)N * D;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t n = i / D, d = i % D;
        out[i] = wte[(size_t)tok[n] * D + d];
    }
}

template <typename T>
__global__ void add_kernel(T *out, const T *a, const T *b, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        lp_store(out, i, lp_load(a, i) + lp_load(b, i));
}

// GPT-2's gelu_new, in fp32 with the accurate tanhf (no fast-math in this build).
template <typename T>
__global__ void gelu_kernel(T *out, const T *x, size_t n) {
    const float k = 0.7978845608028654f; // sqrt(2/pi)
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float v = lp_load(x, i);
        lp_store(out, i, 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v))));
    }
}

// out[N,D] = x * w[D] (+ b[D])
template <typename T>
__global__ void affine_kernel(T *out, const T *x, const T *w, const T *b, int N, int D) {
    const size_t total = (size_t)N * D;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t d = i % D;
        float v = lp_load(x, i) * lp_load(w, d);
        if (b) v += lp_load(b, d);
        lp_store(out, i, v);
    }
}

// ---- launchers ----

template <typename T>
static lp_status embed_launch(lp_ctx *c, void *out, const int32_t *tok, const void *wte, int N,
                              int D) {
    const size_t total = (size_t)N * D;
    LP_LAUNCH(grid_1d(total, kBlock), kBlock, 0, cuda_stream_of(c), embed_kernel<T>)(
        (T *)out, tok, (const T *)wte, N, D);
    LP_LAUNCH_CHECK("embed_kernel");
    return LP_OK;
}

template <typename T>
static lp_status add_launch(lp_ctx *c, void *out, const void *a, const void *b, size_t n) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), add_kernel<T>)((T *)out, (const T *)a,
                                                                     (const T *)b, n);
    LP_LAUNCH_CHECK("add_kernel");
    return LP_OK;
}

template <typename T>
static lp_status gelu_launch(lp_ctx *c, void *out, const void *x, size_t n) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), gelu_kernel<T>)((T *)out, (const T *)x, n);
    LP_LAUNCH_CHECK("gelu_kernel");
    return LP_OK;
}

template <typename T>
static lp_status affine_launch(lp_ctx *c, void *out, const void *x, const void *w, const void *b,
                               int N, int D) {
    const size_t total = (size_t)N * D;
    LP_LAUNCH(grid_1d(total, kBlock), kBlock, 0, cuda_stream_of(c), affine_kernel<T>)(
        (T *)out, (const T *)x, (const T *)w, (const T *)b, N, D);
    LP_LAUNCH_CHECK("affine_kernel");
    return LP_OK;
}

// ---- entry points ----

lp_status cuda_embed(lp_ctx *c, void *out, const int32_t *tok, const void *wte, int N, int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_embed");
    LP_CUDA_REQUIRE(N >= 0 && D >= 0, "cuda_embed: negative size N=%d D=%d", N, D);
    if ((size_t)N * D == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && tok && wte, "cuda_embed: NULL buffer");
    return c->dtype == LP_BF16 ? embed_launch<__nv_bfloat16>(c, out, tok, wte, N, D)
                               : embed_launch<float>(c, out, tok, wte, N, D);
}

lp_status cuda_pos_embed(lp_ctx *c, void *out, const void *wpe, int B, int T, int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_pos_embed");
    LP_CUDA_REQUIRE(B >= 0 && T >= 0 && D >= 0, "cuda_pos_embed: negative size B=%d T=%d D=%d",
                    B, T, D);
    if ((size_t)B * T * D == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && wpe, "cuda_pos_embed: NULL buffer");
    // out[B,T,D] = wpe[t, :] for every b
    const size_t total = (size_t)B * T * D, period = (size_t)T * D;
    return c->dtype == LP_BF16 ? tile_rows<__nv_bfloat16>(c, out, wpe, total, period)
                               : tile_rows<float>(c, out, wpe, total, period);
}

lp_status cuda_add(lp_ctx *c, void *out, const void *a, const void *b, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_add");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && a && b, "cuda_add: NULL buffer");
    return c->dtype == LP_BF16 ? add_launch<__nv_bfloat16>(c, out, a, b, n)
                               : add_launch<float>(c, out, a, b, n);
}

lp_status cuda_gelu(lp_ctx *c, void *out, const void *x, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_gelu");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && x, "cuda_gelu: NULL buffer");
    return c->dtype == LP_BF16 ? gelu_launch<__nv_bfloat16>(c, out, x, n)
                               : gelu_launch<float>(c, out, x, n);
}

lp_status cuda_affine(lp_ctx *c, void *out, const void *x, const void *w, const void *b, int N,
                         int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_affine");
    LP_CUDA_REQUIRE(N >= 0 && D >= 0, "cuda_affine: negative size N=%d D=%d", N, D);
    if ((size_t)N * D == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && x && w, "cuda_affine: NULL buffer (out, x and w are required)");
    return c->dtype == LP_BF16 ? affine_launch<__nv_bfloat16>(c, out, x, w, b, N, D)
                               : affine_launch<float>(c, out, x, w, b, N, D);
}
