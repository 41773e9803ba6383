// sae_lists.cu: latent-major SAE gradients on the GPU (include/loupe/sae_ops.h): the lists
// of a batch's (token, latent) entries sorted by latent, the encoder gradient reduced from
// them latent by latent without atomics on the weights, and the bf16 copy of a buffer.
// CPU twins: host/ops/cpu/sae_sparse.c.
//
//  - lists: an integer histogram of the latents, its prefix sums (one block), the entries
//    placed by a per-latent cursor (atomics: any order), then each latent's entries sorted
//    back into token order in shared memory, so every later sum runs in token order and
//    gives the same bits on every run.
//  - encoder gradient: a block owns a tile of 32 latents and 128 input dimensions; each
//    thread sums, for one d, its latents' terms x[n,d] dpre[n,j] (rows read coalesced
//    across the block), the tile goes through shared memory, and a warp then adds 32
//    consecutive latents of one row of dW_enc [D,S]: coalesced, one writer per weight.
//    Tiles whose latents no token chose end at once.
//  - decoder gradient: a block per latent and 128 columns adds its entries' val * dout
//    rows, in token order, to its row of dW_dec; dval, a dot per entry, needs no list.
#include "common.cuh"

static const int kTileS = 32;   // latents per block of the encoder gradient
static const int kTileD = 128;  // input dimensions per block (its threads)
static const int kScanThreads = 1024;

// start[1 + s] += number of entries of latent s (start zeroed before).
__global__ void lists_count_kernel(int32_t *start, const int32_t *idx, size_t NK) {
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < NK; e += (size_t)gridDim.x * blockDim.x)
        atomicAdd(&start[idx[e] + 1], 1);
}

// In place prefix sums of start[1..S] (one block), then fill[s] = start[s].
__global__ void lists_scan_kernel(int32_t *start, int32_t *fill, int S) {
    LP_SHARED(int32_t, part, [kScanThreads]);
    const int t = threadIdx.x, per = (S + kScanThreads - 1) / kScanThreads;
    const int b = t * per, e = min(b + per, S);
    int32_t sum = 0;
    for (int i = b; i < e; i++) sum += start[i + 1];
    part[t] = sum;
    __syncthreads();
    if (t == 0)
        for (int i = 1; i < kScanThreads; i++) part[i] += part[i - 1];
    __syncthreads();
    int32_t run = t ? part[t - 1] : 0;
    for (int i = b; i < e; i++) {
        run += start[i + 1];
        start[i + 1] = run;
    }
    __syncthreads();
    for (int i = t; i < S; i += kScanThreads) fill[i] = start[i];
}

__global__ void lists_place_kernel(int32_t *ent, int32_t *fill, const int32_t *idx, size_t NK) {
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < NK; e += (size_t)gridDim.x * blockDim.x)
        ent[atomicAdd(&fill[idx[e]], 1)] = (int32_t)e;
}

// Each latent's entries into token order (entry numbers increase with the token): one
// block per latent, its entries sorted in shared memory by a bitonic network of P (a power
// of two >= the batch's tokens: a latent holds at most one entry per token) slots padded
// with INT32_MAX. Latents with one entry or none leave at once. Only for batches above
// kSortMaxP tokens (P = 0) does one thread insertion-sort the list in global memory.
static const int kSortMaxP = 8192;

__global__ void lists_order_kernel(int32_t *ent, const int32_t *start, int P) {
    LP_DYNAMIC_SHARED(int32_t, v);
    const int32_t b = start[blockIdx.x], n = start[blockIdx.x + 1] - b;
    if (n <= 1) return; // block-uniform
    if (P == 0) {
        if (threadIdx.x == 0)
            for (int32_t i = b + 1; i < b + n; i++) {
                const int32_t x = ent[i];
                int32_t j = i - 1;
                while (j >= b && ent[j] > x) {
                    ent[j + 1] = ent[j];
                    j--;
                }
                ent[j + 1] = x;
            }
        return;
    }
    int Q = 2; // the network's width: n rounded up to a power of two (block-uniform)
    while (Q < n) Q <<= 1;
    for (int i = threadIdx.x; i < Q; i += blockDim.x) v[i] = i < n ? ent[b + i] : INT32_MAX;
    __syncthreads();
    for (int size = 2; size <= Q; size <<= 1)
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < Q; i += blockDim.x) {
                const int j = i ^ stride;
                if (j > i) {
                    const int32_t x = v[i], y = v[j];
                    const bool up = (i & size) == 0;
                    if (up ? x > y : x < y) {
                        v[i] = y;
                        v[j] = x;
                    }
                }
            }
            __syncthreads();
        }
    for (int i = threadIdx.x; i < n; i += blockDim.x) ent[b + i] = v[i];
}

lp_status cuda_sae_latent_lists(lp_ctx *c, int32_t *lists, const int32_t *idx, int N, int K, int S) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_latent_lists");
    LP_CUDA_REQUIRE(lists && idx && N >= 0 && K >= 1 && S > 0, "cuda_sae_latent_lists: bad arguments (N=%d K=%d S=%d)", N,
                    K, S);
    const size_t NK = (size_t)N * K;
    int32_t *start = lists, *fill = lists + S + 1, *ent = lists + 2 * (size_t)S + 1;
    cudaStream_t st = cuda_stream_of(c);
    LP_CUDA_CHECK(cudaMemsetAsync(start, 0, ((size_t)S + 1) * sizeof(int32_t), st));
    if (NK) {
        LP_LAUNCH(grid_1d(NK, 256), 256, 0, st, lists_count_kernel)(start, idx, NK);
        LP_LAUNCH_CHECK("lists_count_kernel");
    }
    LP_LAUNCH(1, kScanThreads, 0, st, lists_scan_kernel)(start, fill, S);
    LP_LAUNCH_CHECK("lists_scan_kernel");
    if (!NK) return LP_OK;
    LP_LAUNCH(grid_1d(NK, 256), 256, 0, st, lists_place_kernel)(ent, fill, idx, NK);
    LP_LAUNCH_CHECK("lists_place_kernel");
    int P = 2;
    while (P < N) P <<= 1;
    if (P > kSortMaxP) P = 0; // larger batches: the insertion sort in global memory
    LP_LAUNCH((unsigned)S, 128, (size_t)P * sizeof(int32_t), st, lists_order_kernel)(ent, start, P);
    LP_LAUNCH_CHECK("lists_order_kernel");
    return LP_OK;
}

// grid (ceil(S / kTileS), ceil(D / kTileD)), kTileD threads.
__global__ void encode_grad_lists_kernel(float *dW, float *db, const float *x, const int32_t *start,
                                         const int32_t *ent, const float *dpre, int K, int D, int S) {
    LP_SHARED(float, tile, [kTileS][kTileD + 1]);
    const int s0 = blockIdx.x * kTileS, d0 = blockIdx.y * kTileD, t = threadIdx.x;
    const int ns = min(kTileS, S - s0), nd = min(kTileD, D - d0);
    if (start[s0] == start[s0 + ns]) return; // no token chose a latent of the tile (block-uniform)
    const int d = d0 + t;
    for (int q = 0; q < ns; q++) {
        float acc = 0.0f;
        if (t < nd)
            for (int32_t r = start[s0 + q]; r < start[s0 + q + 1]; r++) {
                const int32_t e = ent[r];
                acc += x[(size_t)(e / K) * D + d] * dpre[e];
            }
        tile[q][t] = acc;
    }
    if (blockIdx.y == 0 && t < ns) {
        float acc = db[s0 + t];
        for (int32_t r = start[s0 + t]; r < start[s0 + t + 1]; r++) acc += dpre[ent[r]];
        db[s0 + t] = acc;
    }
    __syncthreads();
    for (int i = t; i < kTileS * kTileD; i += kTileD) { // a warp: 32 latents of one row
        const int q = i % kTileS, dl = i / kTileS;
        if (q < ns && dl < nd) dW[(size_t)(d0 + dl) * S + s0 + q] += tile[q][dl];
    }
}

lp_status cuda_sae_encode_sparse_grad_lists(lp_ctx *c, float *dW_enc, float *db_enc, const float *x,
                                            const int32_t *lists, const float *dpre, int N, int K, int D, int S) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_encode_sparse_grad_lists");
    LP_CUDA_REQUIRE(N > 0 && K >= 1 && D > 0 && S > 0 && dW_enc && db_enc && x && lists && dpre,
                    "cuda_sae_encode_sparse_grad_lists: bad arguments (N=%d K=%d D=%d S=%d)", N, K, D, S);
    const dim3 grid((unsigned)((S + kTileS - 1) / kTileS), (unsigned)((D + kTileD - 1) / kTileD));
    LP_LAUNCH(grid, kTileD, 0, cuda_stream_of(c), encode_grad_lists_kernel)(dW_enc, db_enc, x, lists,
                                                                           lists + 2 * (size_t)S + 1, dpre, K, D, S);
    LP_LAUNCH_CHECK("encode_grad_lists_kernel");
    return LP_OK;
}

// dval[e] = dout[n,:] . W[idx[e],:]: a warp per entry (as decode_sparse_grad_kernel, with
// no weight writes). One block per token.
__global__ void dval_kernel(float *dval, const float *dout, const int32_t *idx, const float *W, int K, int D) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const size_t n = blockIdx.x;
    const float *g = dout + n * D;
    for (int j = warp; j < K; j += nwarps) { // warp-uniform
        const size_t e = n * K + j;
        const float *w = W + (size_t)idx[e] * D;
        float dot = 0.0f;
        for (int d = lane; d < D; d += 32) dot = fmaf(g[d], w[d], dot);
        dot = warp_sum(dot);
        if (lane == 0) dval[e] = dot;
    }
}

// dW[s,:] += sum over latent s's entries, in token order, of val[e] dout[n,:]: grid
// (S, ceil(D / blockDim.x)), a block per latent and slice of columns (a latent most tokens
// chose spreads over D / blockDim.x blocks), a thread per column (rows of dout read
// coalesced), one writer per weight. Latents no token chose leave at once, rows unwritten.
__global__ void decode_grad_lists_kernel(float *dW, const float *dout, const int32_t *start, const int32_t *ent,
                                         const float *val, int K, int D) {
    const int s = blockIdx.x, d = blockIdx.y * blockDim.x + threadIdx.x;
    const int32_t r0 = start[s], r1 = start[s + 1];
    if (r0 == r1 || d >= D) return;
    float acc = dW[(size_t)s * D + d];
    for (int32_t r = r0; r < r1; r++) {
        const int32_t e = ent[r];
        acc += val[e] * dout[(size_t)(e / K) * D + d];
    }
    dW[(size_t)s * D + d] = acc;
}

lp_status cuda_sae_decode_sparse_grad_lists(lp_ctx *c, float *dval, float *dW, const float *dout, const int32_t *idx,
                                            const int32_t *lists, const float *val, const float *W, int N, int K, int D,
                                            int S) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_decode_sparse_grad_lists");
    LP_CUDA_REQUIRE(N > 0 && K >= 1 && D > 0 && S > 0 && dval && dW && dout && idx && lists && val && W,
                    "cuda_sae_decode_sparse_grad_lists: bad arguments (N=%d K=%d D=%d S=%d)", N, K, D, S);
    const unsigned warps = K >= 8 ? 8 : (unsigned)K;
    LP_LAUNCH((unsigned)N, 32 * warps, 0, cuda_stream_of(c), dval_kernel)(dval, dout, idx, W, K, D);
    LP_LAUNCH_CHECK("dval_kernel");
    const unsigned threads = D >= 128 ? 128 : (unsigned)((D + 31) / 32 * 32);
    const dim3 grid((unsigned)S, (unsigned)((D + (int)threads - 1) / (int)threads));
    LP_LAUNCH(grid, threads, 0, cuda_stream_of(c), decode_grad_lists_kernel)(dW, dout, lists,
                                                                                  lists + 2 * (size_t)S + 1, val, K, D);
    LP_LAUNCH_CHECK("decode_grad_lists_kernel");
    return LP_OK;
}

__global__ void to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

lp_status cuda_sae_to_bf16(lp_ctx *c, uint16_t *dst, const float *src, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_to_bf16");
    LP_CUDA_REQUIRE(dst && src, "cuda_sae_to_bf16: null buffer");
    LP_LAUNCH(grid_1d(n, 256), 256, 0, cuda_stream_of(c), to_bf16_kernel)((__nv_bfloat16 *)dst, src, n);
    LP_LAUNCH_CHECK("to_bf16_kernel");
    return LP_OK;
}
