// sae_track.cu: the training bookkeeping of include/loupe/sae_track.h on the GPU, queued on
// the compute stream with the step so that nothing waits for it; the host reads the block
// at log steps. CPU twins: host/ops/cpu/sae_track.c.
//  - dead_update: one block walks the latents in chunks of its width, updating each
//    counter and appending the dead ones to the list in increasing order (a block-wide
//    rank from ballots and per-warp counts); the firing sum and the largest counter in
//    int64, reduced in shared memory. int64 throughout: equal to the CPU's.
//  - l1_term: one block, double partial sums in a fixed tree: the order differs from the
//    CPU's running sum only in the last bits of a double.
//  - track_step: one thread runs the scalar arithmetic the CPU twin runs (the same source,
//    host/ops/sae_track_internal.h).
#define TRK_HD __host__ __device__ static inline
#include "common.cuh"
#include "ops/sae_track_internal.h"

static const int kTrkBlock = 512;
static const int kL1Block = 256;

__global__ void dead_update_kernel(int64_t *since, int32_t *cand, double *trk, const int64_t *counts, int S,
                                   long long tokens, long long window) {
    LP_SHARED(unsigned, wcnt, [kTrkBlock / 32]);
    LP_SHARED(long long, s_fired, [kTrkBlock]);
    LP_SHARED(long long, s_most, [kTrkBlock]);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    long long fired = 0, most = 0;
    unsigned base = 0; // dead latents listed so far (the same in every thread)
    for (int s0 = 0; s0 < S; s0 += blockDim.x) {
        const int s = s0 + tid;
        bool dead = false;
        if (s < S) {
            const long long c = counts[s], v = c ? 0 : since[s] + tokens;
            since[s] = v;
            fired += c;
            if (v > most) most = v;
            dead = v >= window;
        }
        const unsigned b = __ballot_sync(LP_FULL_MASK, dead);
        if (lane == 0) wcnt[warp] = __popc(b);
        __syncthreads();
        unsigned off = base + __popc(b & ((1u << lane) - 1u)), tot = 0;
        for (int w = 0; w < nw; w++) {
            if (w < warp) off += wcnt[w];
            tot += wcnt[w];
        }
        if (dead && cand) cand[off] = s;
        base += tot;
        __syncthreads(); // wcnt is rewritten by the next chunk
    }
    s_fired[tid] = fired;
    s_most[tid] = most;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (tid < h) {
            s_fired[tid] += s_fired[tid + h];
            if (s_most[tid + h] > s_most[tid]) s_most[tid] = s_most[tid + h];
        }
        __syncthreads();
    }
    if (tid == 0) {
        trk[LP_TRK_N_DEAD] = (double)base;
        trk[LP_TRK_MAX_SINCE] = (double)s_most[0];
        trk[LP_TRK_FIRED] = (double)s_fired[0];
    }
}

__global__ void l1_term_kernel(double *trk, const float *colsum, const float *norms, int S) {
    LP_SHARED(double, part, [kL1Block]);
    const int tid = threadIdx.x;
    double v = 0;
    for (int s = tid; s < S; s += blockDim.x) v += (double)colsum[s] * norms[s];
    part[tid] = v;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (tid < h) part[tid] += part[tid + h];
        __syncthreads();
    }
    if (tid == 0) trk[LP_TRK_L1DOT] = part[0];
}

__global__ void track_step_kernel(double *trk, lp_sae_track_step_args a) {
    if (threadIdx.x == 0 && blockIdx.x == 0) trk_step(trk, a);
}

lp_status cuda_sae_dead_update(lp_ctx *c, int64_t *since, int32_t *cand, double *trk, const int64_t *counts, int S,
                               int64_t tokens, int64_t window) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_dead_update");
    LP_CUDA_REQUIRE(since && trk && counts && S > 0, "cuda_sae_dead_update: bad arguments (S=%d)", S);
    LP_LAUNCH(1, kTrkBlock, 0, cuda_stream_of(c), dead_update_kernel)(since, cand, trk, counts, S, (long long)tokens,
                                                                      (long long)window);
    LP_LAUNCH_CHECK("dead_update_kernel");
    return LP_OK;
}

lp_status cuda_sae_l1_term(lp_ctx *c, double *trk, const float *colsum, const float *norms, int S) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_l1_term");
    LP_CUDA_REQUIRE(trk && colsum && norms && S > 0, "cuda_sae_l1_term: bad arguments (S=%d)", S);
    LP_LAUNCH(1, kL1Block, 0, cuda_stream_of(c), l1_term_kernel)(trk, colsum, norms, S);
    LP_LAUNCH_CHECK("l1_term_kernel");
    return LP_OK;
}

lp_status cuda_sae_track_step(lp_ctx *c, double *trk, const lp_sae_track_step_args *a) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_track_step");
    LP_CUDA_REQUIRE(trk && a, "cuda_sae_track_step: bad arguments");
    LP_LAUNCH(1, 32, 0, cuda_stream_of(c), track_step_kernel)(trk, *a);
    LP_LAUNCH_CHECK("track_step_kernel");
    return LP_OK;
}
