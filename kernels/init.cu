// init.cu: random model weights generated on the device (cuda_init_weights), so that
// the weights of a benchmark model (a Llama-3-8B shape: 8e9 values) never pass through the
// host. The values are those of host/core/rng.h's rng_init_weight, bit for bit: value j of a
// tensor comes from the LCG state j + 1 steps after the tensor's starting state, which a
// thread reaches by jumping ahead (composing the affine step x -> a x + c in O(log j)),
// then it steps through its own run of consecutive values.
#include "common.cuh"

static const unsigned kBlock = 256;
static const size_t kRun = 64; // consecutive values per thread

static const unsigned long long kA = 6364136223846793005ull, kC = 1442695040888963407ull;

// The LCG state k steps after s (mod 2^64).
__device__ __forceinline__ unsigned long long lcg_jump(unsigned long long s, unsigned long long k) {
    unsigned long long A = 1, C = 0, a = kA, c = kC;
    while (k) {
        if (k & 1) { A *= a; C = C * a + c; }
        c = c * a + c;
        a *= a;
        k >>= 1;
    }
    return A * s + C;
}

template <typename T>
__global__ void init_weights_kernel(T *dst, size_t n, unsigned long long s0, float base) {
    const size_t runs = (n + kRun - 1) / kRun;
    for (size_t r = (size_t)blockIdx.x * blockDim.x + threadIdx.x; r < runs; r += (size_t)gridDim.x * blockDim.x) {
        const size_t j0 = r * kRun, j1 = j0 + kRun < n ? j0 + kRun : n;
        unsigned long long s = lcg_jump(s0, j0);
        for (size_t j = j0; j < j1; j++) {
            s = s * kA + kC;
            // __fmul_rn / __fsub_rn / __fadd_rn: no FMA, so the float ops round as on the host
            const float w = __fmul_rn(__fsub_rn(__fdiv_rn((float)(s >> 40), 16777216.0f), 0.5f), 0.0693f);
            lp_store(dst, j, __fadd_rn(base, w));
        }
    }
}

lp_status cuda_init_weights(lp_ctx *c, void *dst, size_t n, uint64_t state, float base) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_init_weights");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(dst != NULL, "cuda_init_weights: NULL destination for %zu values", n);
    const unsigned grid = grid_1d((n + kRun - 1) / kRun, kBlock);
    if (c->dtype == LP_BF16)
        LP_LAUNCH(grid, kBlock, 0, cuda_stream_of(c), init_weights_kernel<__nv_bfloat16>)((__nv_bfloat16 *)dst, n, state, base);
    else
        LP_LAUNCH(grid, kBlock, 0, cuda_stream_of(c), init_weights_kernel<float>)((float *)dst, n, state, base);
    LP_LAUNCH_CHECK("init_weights_kernel");
    return LP_OK;
}
