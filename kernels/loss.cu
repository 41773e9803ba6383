// loss.cu: per-token cross-entropy, losses[n] = logsumexp(logits[n,:]) - logits[n, target[n]]
// (0 where target < 0), for the loss and the per-token losses the CLI reports.
//
// One block per row and a single pass over the logits: each thread keeps a running
// (max, sum of exp(x - max)) pair over its strided slice, and the pairs are merged across
// the block in shared memory. No scratch memory; fp32 throughout, whatever the logit dtype.
#include "common.cuh"

static const unsigned kBlock = 512;

template <typename T>
__global__ void cross_entropy_kernel(float *losses, const T *logits, const int32_t *targets, int V, int ld) {
    LP_SHARED(float, sm, [32]);
    LP_SHARED(float, ss, [32]);
    const size_t row = blockIdx.x;
    const int tgt = targets[row];
    if (tgt < 0) { // whole block leaves together: tgt is the same for every thread
        if (threadIdx.x == 0) losses[row] = 0.0f;
        return;
    }
    const T *xr = logits + row * (size_t)ld; // ld >= V: a padded row's tail is never read
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) lse_push(m, s, lp_to_f(xr[j]));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(LP_FULL_MASK, m, o);
        const float s2 = __shfl_xor_sync(LP_FULL_MASK, s, o);
        lse_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) { sm[wid] = m; ss[wid] = s; }
    __syncthreads();
    if (wid == 0) {
        m = lane < nw ? sm[lane] : -INFINITY;
        s = lane < nw ? ss[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(LP_FULL_MASK, m, o);
            const float s2 = __shfl_xor_sync(LP_FULL_MASK, s, o);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            // An out-of-range target (the host could not check device tokens) gives NaN,
            // which every consumer notices, rather than a read past the row.
            // (m - x_t) first: both are near the top of the range, so it is nearly exact.
            losses[row] = tgt < V ? (m - lp_to_f(xr[tgt])) + logf(s) : NAN;
        }
    }
}

template <typename T>
static lp_status cross_entropy_launch(lp_ctx *c, float *losses, const void *logits,
                                      const int32_t *targets, int N, int V, int ld) {
    // Small vocabularies (tests, toy models) do not need 512 threads per row.
    const unsigned block = V >= (int)kBlock ? kBlock : (unsigned)((V + 31) / 32 * 32);
    LP_LAUNCH((unsigned)N, block, 0, cuda_stream_of(c), cross_entropy_kernel<T>)(losses, (const T *)logits,
                                                                     targets, V, ld);
    LP_LAUNCH_CHECK("cross_entropy_kernel");
    return LP_OK;
}

// Rows ld apart of which the first V columns are the vocabulary (the unembedding padded to a
// multiple of 64 computes ld = Vp columns; the padding's never enter the sum).
lp_status cuda_cross_entropy_ld(lp_ctx *c, float *losses, const void *logits, const int32_t *targets,
                                int N, int V, int ld) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_cross_entropy");
    LP_CUDA_REQUIRE(N >= 0 && V >= 1 && ld >= V, "cuda_cross_entropy: bad size N=%d V=%d ld=%d (V must be >= 1)",
                    N, V, ld);
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(losses && logits && targets, "cuda_cross_entropy: NULL buffer");
    return c->dtype == LP_BF16
               ? cross_entropy_launch<__nv_bfloat16>(c, losses, logits, targets, N, V, ld)
               : cross_entropy_launch<float>(c, losses, logits, targets, N, V, ld);
}

lp_status cuda_cross_entropy(lp_ctx *c, float *losses, const void *logits, const int32_t *targets,
                                int N, int V) {
    return cuda_cross_entropy_ld(c, losses, logits, targets, N, V, V);
}
