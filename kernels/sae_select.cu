// sae_select.cu: the selections of include/loupe/sae_ops.h on the GPU: top-K per row (also
// over a list of candidate latents: AuxK's dead ones) and the K-th largest of a batch (the BatchTopK threshold). Every buffer is float; the CPU
// twins are in host/cpu/sae.c, whose comments and host/ops/sae_ops.c's state the contracts
// (selection order, ties, edge cases).
//
//  - topk: one block per row. A radix select over the 32-bit order keys (8-bit digits,
//    at most 4 histogram passes, stopping early once the threshold's digit bin holds
//    exactly the entries still needed) finds the key of the K-th largest value; one more
//    pass gathers, in index order, the entries above it and the lowest-index entries
//    equal to it; a bitonic sort of those K (key, ~index) pairs in shared memory gives the
//    descending order with ties by lower index. The row's keys are staged in shared
//    memory when they fit (d_sae = 24576: 96 KiB), else re-read from global memory each
//    pass. O(S) per row; K <= 2048 (sorted in shared memory).
//  - kth_largest: the same radix select over the positive entries of the whole batch:
//    4 passes of a grid-wide histogram (per-block shared histograms, added to a global
//    one) each followed by a one-warp kernel that picks the digit, all on the stream;
//  - kth_largest keeps its few words of scratch in module-level device variables (no
//    allocation per call): two calls must not run concurrently on one device from
//    different streams.
#include "sae_common.cuh"
#include "ops/sae_track_internal.h"

static const unsigned kBlock = 256;    // threads of the batch-wide histogram kernel
static const int kTopkMaxK = 2048;     // host/ops/sae_ops.c: LP_SAE_TOPK_MAX_K_CUDA

// ---- radix select ------------------------------------------------------------------------

// The order key of host/cpu/sae.c: unsigned order of keys = float order.
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k ^ 0x80000000u) : ~k);
}

// Adds 1 to hist[digit] for every lane whose digit is >= 0. Lanes with the same digit add
// together (one shared atomic per distinct digit of the warp): activations crowd into a
// few high digits, where per-lane atomics would serialize. Every lane must call it.
__device__ __forceinline__ void hist_add_warp(unsigned *hist, int digit) {
    const unsigned peers = __match_any_sync(LP_FULL_MASK, digit);
    if (digit >= 0 && (int)(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
}

// One radix step, by one full warp: hist[256] counts the candidates by digit; the wanted
// element is the krem-th largest candidate (1-based). Every lane gets the digit holding it
// (or -1 if fewer than krem candidates), the number of candidates in higher digits, and
// the total. Lane l sums digits 255-8l down to 248-8l; a scan over lanes finds the lane.
template <typename C> struct radix_pick_t { int digit; C above, total; };

template <typename C>
__device__ radix_pick_t<C> radix_pick(const C *hist, C krem) {
    const int lane = threadIdx.x & 31;
    C s = 0;
#pragma unroll
    for (int q = 0; q < 8; q++) s += hist[255 - 8 * lane - q];
    C incl = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const C y = __shfl_up_sync(LP_FULL_MASK, incl, o);
        if (lane >= o) incl += y;
    }
    const C excl = incl - s;
    radix_pick_t<C> r;
    r.total = __shfl_sync(LP_FULL_MASK, incl, 31);
    const unsigned who = __ballot_sync(LP_FULL_MASK, excl < krem && krem <= incl);
    if (who == 0) { r.digit = -1; r.above = 0; return r; }
    const int src = __ffs(who) - 1;
    int d = 0;
    C above = 0;
    if (lane == src) {
        d = 255 - 8 * lane;
        above = excl;
        while (above + hist[d] < krem) above += hist[d--];
    }
    r.digit = __shfl_sync(LP_FULL_MASK, d, src);
    r.above = __shfl_sync(LP_FULL_MASK, above, src);
    return r;
}

// ---- top-K per row -----------------------------------------------------------------------

__device__ __forceinline__ unsigned long long topk_pack(uint32_t key, int i) {
    return ((unsigned long long)key << 32) | (uint32_t)~(uint32_t)i; // larger: higher key, then lower i
}

// With the candidates' number n in device memory: the row's length min(n_cand, n), *K cut
// to it, and the row's entries from there to the old *K padded (value 0, latents spread).
__device__ __forceinline__ int counted_row(int32_t *idx, float *val, int S, int *K, int n_cand, const double *n_dev) {
    const int n = (int)*n_dev, L = n < n_cand ? n : n_cand, Kout = *K;
    *K = Kout < L ? Kout : L;
    for (int j = *K + (int)threadIdx.x; j < Kout; j += blockDim.x) {
        const size_t e = (size_t)blockIdx.x * Kout + j;
        idx[e] = (int32_t)(e % (size_t)S);
        val[e] = 0.0f;
    }
    return L;
}

// Bitonic sort of the P (a power of two) pairs in shared memory, descending; called by
// every thread of the block.
__device__ __forceinline__ void bitonic_sort_desc(unsigned long long *sel, int P) {
    for (int size = 2; size <= P; size <<= 1)
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < P; i += blockDim.x) {
                const int j = i ^ stride;
                if (j > i) {
                    const unsigned long long a = sel[i], b = sel[j];
                    const bool desc = (i & size) == 0;
                    if (desc ? a < b : a > b) { sel[i] = b; sel[j] = a; }
                }
            }
            __syncthreads();
        }
}

// One block per row of pre [N,S]; blockDim.x a multiple of 32. Dynamic shared memory:
// P (key, index) pairs (P = K rounded up to a power of two), then the row's S keys when
// kRowInSmem.
// With cand (strictly increasing latents), the row is pre[n, cand[0..n_cand)] and the
// indices written are the latents: ties still go to the lower latent. With n_dev (the
// candidates' number in device memory, at most n_cand) the row takes min(K, *n_dev) and
// pads the rest of its K entries (include/loupe/sae_track.h).
template <bool kRowInSmem>
__global__ void topk_kernel(int32_t *idx, float *val, const float *pre, int S, int K, int P, const int32_t *cand,
                            int n_cand, const double *n_dev) {
    LP_DYNAMIC_SHARED(unsigned long long, topk_smem);
    unsigned long long *sel = topk_smem;
    uint32_t *keys = (uint32_t *)(topk_smem + P);
    LP_SHARED(unsigned, hist, [256]);
    LP_SHARED(unsigned, wsum, [2][32]);
    LP_SHARED(uint32_t, s_prefix);
    LP_SHARED(uint32_t, s_mask);
    LP_SHARED(unsigned, s_krem);
    LP_SHARED(int, s_done);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const float *row = pre + (size_t)blockIdx.x * S;
    const int Kout = K, L = n_dev ? counted_row(idx, val, S, &K, cand ? n_cand : S, n_dev) : cand ? n_cand : S;
    if (K == 0) return; // only with n_dev: nothing to select (block-uniform, before any barrier)
#define TOPK_AT(i) (cand ? row[cand[i]] : row[i])
    if (kRowInSmem)
        for (int i = tid; i < L; i += blockDim.x) keys[i] = order_key(TOPK_AT(i));

    // Radix select: after the loop the wanted key is the krem-th largest among the keys
    // that match prefix on mask, and every key above that prefix is in the top K.
    uint32_t prefix = 0, mask = 0;
    unsigned krem = (unsigned)K;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads(); // also publishes the staged keys on the first pass
        for (int base = 0; base < L; base += blockDim.x) { // block-uniform trip count
            const int i = base + tid;
            int digit = -1;
            if (i < L) {
                const uint32_t k = kRowInSmem ? keys[i] : order_key(TOPK_AT(i));
                if ((k & mask) == prefix) digit = (int)((k >> shift) & 255);
            }
            hist_add_warp(hist, digit);
        }
        __syncthreads();
        if (warp == 0) {
            const radix_pick_t<unsigned> r = radix_pick<unsigned>(hist, krem); // krem <= candidates
            if (lane == 0) {
                s_prefix = prefix | ((uint32_t)r.digit << shift);
                s_mask = mask | (0xFFu << shift);
                s_krem = krem - r.above;
                s_done = hist[r.digit] == krem - r.above; // the whole bin is taken
            }
        }
        __syncthreads();
        prefix = s_prefix;
        mask = s_mask;
        krem = s_krem;
        if (s_done) break;
    }

    // Gather in index order: keys above the prefix (exactly K - krem of them) and the
    // first krem keys equal to it. Block-wide ranks from ballots and per-warp totals.
    const unsigned ngt = (unsigned)K - krem, below = (1u << lane) - 1u;
    unsigned cnt_gt = 0, cnt_eq = 0;
    for (int base = 0; base < L; base += blockDim.x) {
        const int i = base + tid;
        uint32_t k = 0;
        bool gt = false, eq = false;
        if (i < L) {
            k = kRowInSmem ? keys[i] : order_key(TOPK_AT(i));
            gt = (k & mask) > prefix;
            eq = (k & mask) == prefix;
        }
        const unsigned bg = __ballot_sync(LP_FULL_MASK, gt), be = __ballot_sync(LP_FULL_MASK, eq);
        if (lane == 0) {
            wsum[0][warp] = __popc(bg);
            wsum[1][warp] = __popc(be);
        }
        __syncthreads();
        unsigned off_g = cnt_gt + __popc(bg & below), off_e = cnt_eq + __popc(be & below);
        unsigned tot_g = 0, tot_e = 0;
        for (int w = 0; w < nwarps; w++) {
            const unsigned g = wsum[0][w], e = wsum[1][w];
            if (w < warp) off_g += g, off_e += e;
            tot_g += g;
            tot_e += e;
        }
        if (gt) sel[off_g] = topk_pack(k, cand ? cand[i] : i);
        if (eq && off_e < krem) sel[ngt + off_e] = topk_pack(k, cand ? cand[i] : i);
        cnt_gt += tot_g;
        cnt_eq += tot_e;
        __syncthreads(); // wsum is rewritten by the next chunk
        if (cnt_gt == ngt && cnt_eq >= krem) break; // block-uniform
    }
    for (int j = K + tid; j < P; j += blockDim.x) sel[j] = 0ull; // ranks below every real pair
    __syncthreads();

    bitonic_sort_desc(sel, P);

    const size_t out0 = (size_t)blockIdx.x * Kout;
    for (int j = tid; j < K; j += blockDim.x) {
        const unsigned long long p = sel[j];
        idx[out0 + j] = (int32_t)~(uint32_t)p;
        val[out0 + j] = relu_f(key_value((uint32_t)(p >> 32)));
    }
#undef TOPK_AT
}

// Shared memory and block size for rows of L candidates, then the launch.
static lp_status topk_launch(lp_ctx *c, int32_t *idx, float *val, const float *pre, const int32_t *cand, int L,
                             int N, int S, int K, const double *n_dev = NULL) {
    int P = 1;
    while (P < K) P <<= 1;
    int optin = 0;
    LP_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c->cuda_device));
    const size_t sel_bytes = (size_t)P * sizeof(unsigned long long), row_bytes = (size_t)L * sizeof(uint32_t);
    const size_t static_bytes = 2048; // hist, wsum and the scalars, rounded up
    const bool in_smem = sel_bytes + row_bytes + static_bytes <= (size_t)optin;
    const size_t dyn = sel_bytes + (in_smem ? row_bytes : 0);
    int block = (L + 31) / 32 * 32;
    if (block > 512) block = 512;
    if (block < 32) block = 32;
    if (in_smem) {
        if (dyn > 48 * 1024)
            LP_CUDA_CHECK(cudaFuncSetAttribute(topk_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dyn));
        LP_LAUNCH((unsigned)N, block, dyn, cuda_stream_of(c), topk_kernel<true>)(idx, val, pre, S, K, P, cand, L, n_dev);
    } else {
        LP_LAUNCH((unsigned)N, block, dyn, cuda_stream_of(c), topk_kernel<false>)(idx, val, pre, S, K, P, cand, L, n_dev);
    }
    LP_LAUNCH_CHECK("topk_kernel");
    return LP_OK;
}

lp_status cuda_sae_topk(lp_ctx *c, int32_t *idx, float *val, const float *pre, int N, int S, int K) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_topk");
    LP_CUDA_REQUIRE(N > 0 && S > 0 && K >= 1 && K <= S && idx && val && pre,
                    "cuda_sae_topk: bad arguments (N=%d S=%d K=%d)", N, S, K);
    LP_CUDA_REQUIRE(K <= kTopkMaxK, "cuda_sae_topk: k=%d exceeds %d", K, kTopkMaxK);
    return topk_launch(c, idx, val, pre, NULL, S, N, S, K);
}

// AuxK: the same selection over the dead latents' columns, read in place (no [N,S] copy).
lp_status cuda_sae_topk_among(lp_ctx *c, int32_t *idx, float *val, const float *pre, const int32_t *cand, int n_cand,
                              int N, int S, int K) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_topk_among");
    LP_CUDA_REQUIRE(N > 0 && S > 0 && n_cand >= 1 && n_cand <= S && K >= 1 && K <= n_cand && idx && val && pre && cand,
                    "cuda_sae_topk_among: bad arguments (N=%d S=%d n_cand=%d K=%d)", N, S, n_cand, K);
    LP_CUDA_REQUIRE(K <= kTopkMaxK, "cuda_sae_topk_among: k=%d exceeds %d", K, kTopkMaxK);
    return topk_launch(c, idx, val, pre, cand, n_cand, N, S, K);
}

// The same with the candidates' number read on the device (include/loupe/sae_track.h).
lp_status cuda_sae_topk_among_counted(lp_ctx *c, int32_t *idx, float *val, const float *pre, const int32_t *cand,
                                      const double *n_cand, int N, int S, int K) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_topk_among_counted");
    LP_CUDA_REQUIRE(N > 0 && S > 0 && K >= 1 && K <= S && idx && val && pre && cand && n_cand,
                    "cuda_sae_topk_among_counted: bad arguments (N=%d S=%d K=%d)", N, S, K);
    LP_CUDA_REQUIRE(K <= kTopkMaxK, "cuda_sae_topk_among_counted: k=%d exceeds %d", K, kTopkMaxK);
    return topk_launch(c, idx, val, pre, cand, S, N, S, K, n_cand);
}

// ---- the BatchTopK threshold -------------------------------------------------------------
// Radix select of the (count+1)-th largest positive entry over the positive floats' bit
// patterns (their unsigned order is their float order). State lives on the device so the
// four passes need no host round trip.

struct kth_state {
    unsigned long long krem; // rank, from the top, among the candidates still in play
    uint32_t prefix, mask;
    float result;
    int done;
};
__device__ unsigned long long g_kth_hist[256];
__device__ kth_state g_kth;

__global__ void kth_init_kernel(unsigned long long rank) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) g_kth_hist[i] = 0;
    if (threadIdx.x == 0) {
        g_kth.krem = rank;
        g_kth.prefix = g_kth.mask = 0;
        g_kth.result = 0.0f;
        g_kth.done = 0;
    }
}

// One histogram pass of the grid: the positive entries under prefix, by the byte at shift,
// into out[256] (per-block shared histograms, added with atomics).
__device__ void radix_hist_pass(const float *pre, size_t n, int shift, uint32_t prefix, uint32_t mask,
                                unsigned long long *out) {
    LP_SHARED(unsigned, hist, [256]);
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t base = (size_t)blockIdx.x * blockDim.x; base < n; base += stride) { // block-uniform
        const size_t i = base + threadIdx.x;
        int digit = -1;
        if (i < n) {
            const float v = pre[i];
            if (v > 0.0f) {
                const uint32_t u = __float_as_uint(v);
                if ((u & mask) == prefix) digit = (int)((u >> shift) & 255);
            }
        }
        hist_add_warp(hist, digit);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        if (hist[i]) atomicAdd(&out[i], (unsigned long long)hist[i]);
}

__global__ void kth_hist_kernel(const float *pre, size_t n, int shift) {
    if (g_kth.done) return; // the same for every thread of the grid
    radix_hist_pass(pre, n, shift, g_kth.prefix, g_kth.mask, g_kth_hist);
}

__global__ void radix_hist_kernel(const float *pre, size_t n, int shift, uint32_t prefix, uint32_t mask,
                                  unsigned long long *out) {
    radix_hist_pass(pre, n, shift, prefix, mask, out);
}

// One warp: picks this pass's digit and clears the histogram for the next pass.
__global__ void kth_select_kernel(int shift) {
    if (g_kth.done) return;
    const unsigned long long krem = g_kth.krem;
    const uint32_t prefix = g_kth.prefix, mask = g_kth.mask;
    const radix_pick_t<unsigned long long> r = radix_pick<unsigned long long>(g_kth_hist, krem);
    if (threadIdx.x == 0) {
        if (r.digit < 0) { // fewer than count+1 positive entries (only possible on the first pass)
            g_kth.result = 0.0f;
            g_kth.done = 1;
        } else {
            const uint32_t p = prefix | ((uint32_t)r.digit << shift);
            g_kth.prefix = p;
            g_kth.mask = mask | (0xFFu << shift);
            g_kth.krem = krem - r.above;
            if (shift == 0) {
                g_kth.result = __uint_as_float(p);
                g_kth.done = 1;
            }
        }
    }
    for (int i = threadIdx.x; i < 256; i += 32) g_kth_hist[i] = 0; // radix_pick's reads are done
}

// The four passes, queued: the result in g_kth.result.
static lp_status kth_launch(lp_ctx *c, const float *pre, size_t n, size_t count) {
    int sms = 0;
    lp_status st = sm_count(c, &sms);
    if (st != LP_OK) return st;
    size_t grid = (n + kBlock - 1) / kBlock, cap = (size_t)sms * 8;
    if (grid > cap) grid = cap;
    cudaStream_t s = cuda_stream_of(c);
    LP_LAUNCH(1, 256, 0, s, kth_init_kernel)((unsigned long long)count + 1);
    LP_LAUNCH_CHECK("kth_init_kernel");
    for (int shift = 24; shift >= 0; shift -= 8) {
        LP_LAUNCH((unsigned)grid, kBlock, 0, s, kth_hist_kernel)(pre, n, shift);
        LP_LAUNCH_CHECK("kth_hist_kernel");
        LP_LAUNCH(1, 32, 0, s, kth_select_kernel)(shift);
        LP_LAUNCH_CHECK("kth_select_kernel");
    }
    return LP_OK;
}

lp_status cuda_sae_radix_hist(lp_ctx *c, int64_t *hist, const float *pre, size_t n, uint32_t prefix, uint32_t mask, int shift) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_radix_hist");
    LP_CUDA_REQUIRE(hist && (n == 0 || pre), "cuda_sae_radix_hist: bad arguments (n=%zu)", n);
    cudaStream_t s = cuda_stream_of(c);
    LP_CUDA_CHECK(cudaMemsetAsync(hist, 0, 256 * sizeof(int64_t), s));
    if (n == 0) return LP_OK;
    int sms = 0;
    lp_status st = sm_count(c, &sms);
    if (st != LP_OK) return st;
    size_t grid = (n + kBlock - 1) / kBlock, cap = (size_t)sms * 8;
    if (grid > cap) grid = cap;
    LP_LAUNCH((unsigned)grid, kBlock, 0, s, radix_hist_kernel)(pre, n, shift, prefix, mask, (unsigned long long *)hist);
    LP_LAUNCH_CHECK("radix_hist_kernel");
    return LP_OK;
}

lp_status cuda_sae_kth_largest(lp_ctx *c, float *t, const float *pre, size_t n, size_t count) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_kth_largest");
    LP_CUDA_REQUIRE(t && pre && count < n, "cuda_sae_kth_largest: bad arguments (n=%zu count=%zu)", n, count);
    lp_status st = kth_launch(c, pre, n, count);
    if (st != LP_OK) return st;
    cudaStream_t s = cuda_stream_of(c);
    kth_state h;
    LP_CUDA_CHECK(cudaMemcpyFromSymbolAsync(&h, g_kth, sizeof h, 0, cudaMemcpyDeviceToHost, s));
    LP_CUDA_CHECK(cudaStreamSynchronize(s));
    *t = h.result;
    return LP_OK;
}

// The threshold left on the device (include/loupe/sae_track.h): *t and thr[0..S).
__global__ void kth_fill_kernel(float *thr, double *t, int S) {
    const float v = g_kth.result;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < S; i += gridDim.x * blockDim.x) thr[i] = v;
    if (blockIdx.x == 0 && threadIdx.x == 0) *t = v;
}

lp_status cuda_sae_batch_threshold(lp_ctx *c, float *thr, double *t, const float *pre, size_t n, size_t count, int S) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_batch_threshold");
    LP_CUDA_REQUIRE(thr && t && pre && count < n && S > 0, "cuda_sae_batch_threshold: bad arguments (n=%zu count=%zu)", n, count);
    lp_status st = kth_launch(c, pre, n, count);
    if (st != LP_OK) return st;
    LP_LAUNCH(grid_1d((size_t)S, kBlock), kBlock, 0, cuda_stream_of(c), kth_fill_kernel)(thr, t, S);
    LP_LAUNCH_CHECK("kth_fill_kernel");
    return LP_OK;
}
