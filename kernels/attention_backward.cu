// attention_backward.cu: the attention backward ops of ops.h on the GPU (the others are in
// backward.cu). The CPU twins, with the derivation of each formula, are in
// host/cpu/backward.c. Activations are float or bf16 (c->dtype), math is fp32, every output
// is rounded once on the store.
//
//  - Attention, fused: no atomics and no [T,T] matrix, three kernels:
//      1. stats (a warp per (b, h, query) row, as the forward kernel): one pass over the
//         row's keys with an online softmax gives lse = log sum_j exp(s_j) and
//         D = sum_j p_j (dz . v_j);
//      2. dk, dv (a warp per (b, kv head, key) row): walks the queries t >= key of every
//         head of the group, lane per query, recomputing p = exp(s - lse_t) and
//         ds = p (dz_t . v - D_t) from the stats, and accumulates dk, dv in registers
//         (lane per dim): each key's sum is formed by one warp in a fixed order, so the
//         result is deterministic, and BF16 needs no fp32 accumulation buffer: the sums
//         stay in fp32 registers until the one rounded store;
//      3. dq (a warp per query row, like 1): ds for each key again, dq = sum ds k / sqrt(dh).
//    With a query suffix (queries at positions pos0 .., all Tk = pos0 + Tq keys given), the
//    same kernels over the suffix's query rows and the suffix's keys (rows pos0 .. of k, v).
//    The price of no atomics: the two dot products of each (query, key) pair are formed in
//    all three kernels (an atomic version forms them twice).
//    The stats (8 bytes per query row) live in the dq buffer until kernel 3 reads a row's
//    pair and overwrites the row with its dq, so the op allocates nothing (dq must not alias
//    an input; host/ops/ops.c checks). Only a head dim whose dq row is shorter than 8 bytes
//    (dh = 1 in F32, dh < 4 in BF16) takes a temporary device buffer, allocated and freed
//    in the call (cudaMalloc / cudaFree synchronise: toy shapes only).
//  - Attention, three-step form: dpattern and dq as query-row kernels (lane per key for the
//    dot products, lane per dim for the sums), dv and dk as key-row kernels summing over
//    the group's heads and the queries; again deterministic, no atomics.
// Warps of a block take neighbouring rows of one (b, head), so they share K/V (or Q/dZ)
// rows through L1, and the longest rows are scheduled first.
// The options of lp_attn_cfg (lp_attn_opts, common.cuh): every kernel visits only the keys
// of a query's window (or the queries that see a key), and with a soft-cap s = cap tanh(r /
// cap) of the scaled score r, ds becomes dr = ds (1 - (s / cap)^2) before it meets k or q.
#include "common.cuh"

static const int kWarps = 4;        // rows (warps) per block of the row kernels
static const int kMaxDh = 256;      // 8 values per lane

// ---- attention: shared pieces ----

// a . b over dh with a in shared memory (broadcast) and b a row in global memory.
template <typename T>
__device__ __forceinline__ float dot_sg(const float *a, const T *b, int dh) {
    float s = 0.0f;
    for (int d = 0; d < dh; d++) s = fmaf(a[d], lp_to_f(b[d]), s);
    return s;
}

// A row index of the [B, heads, T] row space as (b, head, t); reverse_t counts t from the end.
struct row_idx { int b, h, t; };
__device__ __forceinline__ row_idx decode_row(long long row, int T_, int heads, bool reverse_t) {
    row_idx r;
    const int tt = (int)(row % T_);
    const long long bh = row / T_;
    r.t = reverse_t ? T_ - 1 - tt : tt;
    r.h = (int)(bh % heads);
    r.b = (int)(bh / heads);
    return r;
}

// The softmax statistics of one query row, stored as four 16-bit halves at the start of a
// row of the stash (the dq buffer: rows 2-byte aligned in BF16) or of the scratch buffer.
struct row_stats { float lse, dsum; };
__device__ __forceinline__ void stats_put(unsigned char *base, size_t stride, size_t row, row_stats st) {
    unsigned short *p = (unsigned short *)(base + row * stride);
    const unsigned a = __float_as_uint(st.lse), b = __float_as_uint(st.dsum);
    p[0] = (unsigned short)(a & 0xffffu), p[1] = (unsigned short)(a >> 16);
    p[2] = (unsigned short)(b & 0xffffu), p[3] = (unsigned short)(b >> 16);
}
__device__ __forceinline__ row_stats stats_get(const unsigned char *base, size_t stride, size_t row) {
    const unsigned short *p = (const unsigned short *)(base + row * stride);
    row_stats st;
    st.lse = __uint_as_float((unsigned)p[0] | ((unsigned)p[1] << 16));
    st.dsum = __uint_as_float((unsigned)p[2] | ((unsigned)p[3] << 16));
    return st;
}

// ---- attention, fused: 1. per query row, lse and D = sum_j p_j (dz . v_j) ----
template <typename T>
__global__ void attn_bwd_stats_kernel(unsigned char *stash, size_t stride, const T *dz, const T *q, const T *k,
                                      const T *v, int B, int Tq, int Tk, int pos0, int H, int Hkv, int dh,
                                      lp_attn_opts o) {
    LP_DYNAMIC_SHARED(float, smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *qs = smem + warp * 2 * dh, *dzs = qs + dh;
    const long long rows = (long long)B * H * Tq;
    const int group = H / Hkv;
    const size_t kv_stride = (size_t)Hkv * dh;

    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows; row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, Tq, H, true);
        const int tq = pos0 + r.t; // the query's absolute position
        const size_t qrow = ((size_t)r.b * Tq + r.t) * H + r.h, qoff = qrow * dh;
        __syncwarp(); // the previous row's readers of qs, dzs are done
        for (int d = lane; d < dh; d += 32) qs[d] = lp_to_f(q[qoff + d]), dzs[d] = lp_to_f(dz[qoff + d]);
        __syncwarp();
        const size_t kv0 = ((size_t)r.b * Tk * Hkv + r.h / group) * dh;
        const T *kb = k + kv0, *vb = v + kv0;
        float m = -INFINITY, l = 0.0f, dacc = 0.0f;
        for (int j0 = attn_first(tq, o.window); j0 <= tq; j0 += 32) {
            const int j = j0 + lane;
            const bool live = j <= tq;
            float s = -INFINITY, dp = 0.0f;
            if (live) {
                s = attn_score(dot_sg(qs, kb + (size_t)j * kv_stride, dh), o);
                dp = dot_sg(dzs, vb + (size_t)j * kv_stride, dh);
            }
            // Lane 0's key is live, so m_new is finite; on the first chunk corr = exp(-inf) = 0.
            const float m_new = fmaxf(m, warp_max(s));
            const float corr = expf(m - m_new);
            const float e = live ? expf(s - m_new) : 0.0f;
            l = l * corr + warp_sum(e);
            dacc = dacc * corr + warp_sum(e * dp);
            m = m_new;
        }
        if (lane == 0) stats_put(stash, stride, qrow, row_stats{m + logf(l), dacc / l}); // l >= 1
    }
}

// ---- attention, fused: 2. per (b, kv head g, key j): dk_j, dv_j over the group's heads ----
//   dk_j = scale sum_{h, t sees j} dr_{t,j} q_t,  dv_j = sum_{h, t sees j} p_{t,j} dz_t
// Lane per query for the dot products, lane per dim for the sums.
template <typename T, int DPL>
__global__ void attn_bwd_dkv_kernel(T *dk, T *dv, const unsigned char *stash, size_t stride, const T *dz,
                                    const T *q, const T *k, const T *v, int B, int Tq, int Tk, int pos0, int H,
                                    int Hkv, int dh, lp_attn_opts o) {
    LP_DYNAMIC_SHARED(float, smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *ks = smem + warp * 2 * dh, *vs = ks + dh;
    const long long rows = (long long)B * Hkv * Tq; // the suffix's keys (all of them when pos0 = 0)
    const int group = H / Hkv;
    const size_t q_stride = (size_t)H * dh; // between consecutive queries of one head

    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows; row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, Tq, Hkv, false); // early keys (the most queries) first
        // absolute positions: queries key .. t_end-1 see the key; query t is row t - pos0
        const int key = pos0 + r.t, t_end = attn_query_end(key, Tk, o.window);
        const size_t kvin = (((size_t)r.b * Tk + key) * Hkv + r.h) * dh, kvoff = (((size_t)r.b * Tq + r.t) * Hkv + r.h) * dh;
        __syncwarp();
        for (int d = lane; d < dh; d += 32) ks[d] = lp_to_f(k[kvin + d]), vs[d] = lp_to_f(v[kvin + d]);
        __syncwarp();
        float ak[DPL], av[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) ak[i] = av[i] = 0.0f;
        for (int h = r.h * group; h < (r.h + 1) * group; h++) {
            const size_t q0 = ((size_t)r.b * Tq * H + h) * dh; // query row 0 (position pos0) of head h
            for (int t0 = key; t0 < t_end; t0 += 32) {
                const int t = t0 + lane;
                float p = 0.0f, ds = 0.0f;
                if (t < t_end) {
                    const row_stats st = stats_get(stash, stride, ((size_t)r.b * Tq + t - pos0) * H + h);
                    const float s = attn_score(dot_sg(ks, q + q0 + (size_t)(t - pos0) * q_stride, dh), o);
                    p = expf(s - st.lse);
                    ds = p * (dot_sg(vs, dz + q0 + (size_t)(t - pos0) * q_stride, dh) - st.dsum);
                    if (o.cap > 0.0f) ds *= 1.0f - (s / o.cap) * (s / o.cap);
                }
                const int cnt = min(32, t_end - t0); // the same in every lane
#pragma unroll 4
                for (int jj = 0; jj < cnt; jj++) {
                    const float pj = __shfl_sync(LP_FULL_MASK, p, jj), dsj = __shfl_sync(LP_FULL_MASK, ds, jj);
                    const size_t at = q0 + (size_t)(t0 + jj - pos0) * q_stride;
                    const T *qr = q + at, *dzr = dz + at;
#pragma unroll
                    for (int i = 0; i < DPL; i++) {
                        const int d = lane + 32 * i;
                        if (d < dh) {
                            ak[i] = fmaf(dsj, lp_to_f(qr[d]), ak[i]);
                            av[i] = fmaf(pj, lp_to_f(dzr[d]), av[i]);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < dh) dk[kvoff + d] = lp_from_f<T>(ak[i] * o.scale), dv[kvoff + d] = lp_from_f<T>(av[i]);
        }
    }
}

// ---- attention, fused: 3. per query row: dq = scale sum_j dr_j k_j ----
// The row's stats are read (from dq's own row when dq is the stash) before any lane writes dq.
template <typename T, int DPL>
__global__ void attn_bwd_dq_kernel(T *dq, const unsigned char *stash, size_t stride, const T *dz, const T *q,
                                   const T *k, const T *v, int B, int Tq, int Tk, int pos0, int H, int Hkv, int dh,
                                   lp_attn_opts o) {
    LP_DYNAMIC_SHARED(float, smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *qs = smem + warp * 2 * dh, *dzs = qs + dh;
    const long long rows = (long long)B * H * Tq;
    const int group = H / Hkv;
    const size_t kv_stride = (size_t)Hkv * dh;

    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows; row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, Tq, H, true);
        const int tq = pos0 + r.t; // the query's absolute position
        const size_t qrow = ((size_t)r.b * Tq + r.t) * H + r.h, qoff = qrow * dh;
        const row_stats st = stats_get(stash, stride, qrow);
        __syncwarp(); // every lane holds the stats; the previous row's readers of qs, dzs are done
        for (int d = lane; d < dh; d += 32) qs[d] = lp_to_f(q[qoff + d]), dzs[d] = lp_to_f(dz[qoff + d]);
        __syncwarp();
        const size_t kv0 = ((size_t)r.b * Tk * Hkv + r.h / group) * dh;
        const T *kb = k + kv0, *vb = v + kv0;
        float acc[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
        for (int j0 = attn_first(tq, o.window); j0 <= tq; j0 += 32) {
            const int j = j0 + lane;
            float ds = 0.0f;
            if (j <= tq) {
                const float s = attn_score(dot_sg(qs, kb + (size_t)j * kv_stride, dh), o);
                const float p = expf(s - st.lse);
                ds = p * (dot_sg(dzs, vb + (size_t)j * kv_stride, dh) - st.dsum);
                if (o.cap > 0.0f) ds *= 1.0f - (s / o.cap) * (s / o.cap);
            }
            const int cnt = min(32, tq - j0 + 1);
#pragma unroll 4
            for (int jj = 0; jj < cnt; jj++) {
                const float dsj = __shfl_sync(LP_FULL_MASK, ds, jj);
                const T *kr = kb + (size_t)(j0 + jj) * kv_stride;
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    const int d = lane + 32 * i;
                    if (d < dh) acc[i] = fmaf(dsj, lp_to_f(kr[d]), acc[i]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < dh) dq[qoff + d] = lp_from_f<T>(acc[i] * o.scale);
        }
    }
}

// ---- attention, three-step form ----

// dscores[i] as a derivative of the raw score (scale q.k): times the cap's 1 - (s / cap)^2,
// s the saved score.
template <typename T>
__device__ __forceinline__ float raw_grad(const T *dscores, const T *scores, float cap, size_t i) {
    const float g = lp_to_f(dscores[i]);
    if (cap <= 0.0f) return g;
    const float r = lp_to_f(scores[i]) / cap;
    return g * (1.0f - r * r);
}

// dpattern[b,h,t,j] = dz[b,t,h,:] . v[b,j,g,:] for every (t, j): a warp per (b, h, t) row,
// lane per key.
template <typename T>
__global__ void attn_apply_bwd_dp_kernel(T *dpattern, const T *dz, const T *v, int B, int T_, int H, int Hkv,
                                         int dh) {
    LP_DYNAMIC_SHARED(float, smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *dzs = smem + warp * dh;
    const long long rows = (long long)B * H * T_;
    const int group = H / Hkv;
    const size_t kv_stride = (size_t)Hkv * dh;
    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows; row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, T_, H, false);
        const size_t zoff = (((size_t)r.b * T_ + r.t) * H + r.h) * dh;
        __syncwarp();
        for (int d = lane; d < dh; d += 32) dzs[d] = lp_to_f(dz[zoff + d]);
        __syncwarp();
        const T *vb = v + ((size_t)r.b * T_ * Hkv + r.h / group) * dh;
        T *out = dpattern + (size_t)row * T_; // row == (b*H + h)*T + t
        for (int j = lane; j < T_; j += 32) out[j] = lp_from_f<T>(dot_sg(dzs, vb + (size_t)j * kv_stride, dh));
    }
}

// dv[b,j,g,:] = sum over the group's heads h and all queries t of pattern[b,h,t,j] dz[b,t,h,:]
// (an edited pattern may weigh keys after the query). Lane per query for the weights, lane
// per dim for the sum; chunks of 32 queries whose weights are all zero are skipped.
template <typename T, int DPL>
__global__ void attn_apply_bwd_dv_kernel(T *dv, const T *dz, const T *pattern, int B, int T_, int H, int Hkv,
                                         int dh) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long rows = (long long)B * Hkv * T_;
    const int group = H / Hkv;
    const size_t q_stride = (size_t)H * dh;
    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows; row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, T_, Hkv, false);
        const int key = r.t;
        float acc[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
        for (int h = r.h * group; h < (r.h + 1) * group; h++) {
            const T *pcol = pattern + ((size_t)r.b * H + h) * T_ * T_ + key; // pattern[b,h,0,key]
            const T *dz0 = dz + ((size_t)r.b * T_ * H + h) * dh;
            for (int t0 = 0; t0 < T_; t0 += 32) {
                const int t = t0 + lane;
                const float p = t < T_ ? lp_to_f(pcol[(size_t)t * T_]) : 0.0f;
                if (!__any_sync(LP_FULL_MASK, p != 0.0f)) continue;
                const int cnt = min(32, T_ - t0);
#pragma unroll 4
                for (int jj = 0; jj < cnt; jj++) {
                    const float pj = __shfl_sync(LP_FULL_MASK, p, jj);
                    const T *dzr = dz0 + (size_t)(t0 + jj) * q_stride;
#pragma unroll
                    for (int i = 0; i < DPL; i++) {
                        const int d = lane + 32 * i;
                        if (d < dh) acc[i] = fmaf(pj, lp_to_f(dzr[d]), acc[i]);
                    }
                }
            }
        }
        const size_t off = (((size_t)r.b * T_ + key) * Hkv + r.h) * dh;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < dh) dv[off + d] = lp_from_f<T>(acc[i]);
        }
    }
}

// dq[b,t,h,:] = scale sum_{first<=j<=t} dr[b,h,t,j] k[b,j,g,:]: a warp per query row, lane per
// key for the weights (entries outside the window are never read), lane per dim for the sum.
template <typename T, int DPL>
__global__ void attn_scores_bwd_dq_kernel(T *dq, const T *dscores, const T *scores, const T *k, int B, int T_, int H,
                                          int Hkv, int dh, lp_attn_opts o) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long rows = (long long)B * H * T_;
    const int group = H / Hkv;
    const size_t kv_stride = (size_t)Hkv * dh;
    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows; row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, T_, H, false);
        const int tq = r.t;
        const size_t gr = (size_t)row * T_; // row == (b*H + h)*T + t
        const T *kb = k + ((size_t)r.b * T_ * Hkv + r.h / group) * dh;
        float acc[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
        for (int j0 = attn_first(tq, o.window); j0 <= tq; j0 += 32) {
            const int j = j0 + lane;
            const float gj = j <= tq ? raw_grad(dscores, scores, o.cap, gr + j) : 0.0f;
            const int cnt = min(32, tq - j0 + 1);
#pragma unroll 4
            for (int jj = 0; jj < cnt; jj++) {
                const float w = __shfl_sync(LP_FULL_MASK, gj, jj);
                const T *kr = kb + (size_t)(j0 + jj) * kv_stride;
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    const int d = lane + 32 * i;
                    if (d < dh) acc[i] = fmaf(w, lp_to_f(kr[d]), acc[i]);
                }
            }
        }
        const size_t off = (((size_t)r.b * T_ + tq) * H + r.h) * dh;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < dh) dq[off + d] = lp_from_f<T>(acc[i] * o.scale);
        }
    }
}

// dk[b,j,g,:] = scale sum over the group's heads h and the queries t that see j of dr[b,h,t,j] q[b,t,h,:].
template <typename T, int DPL>
__global__ void attn_scores_bwd_dk_kernel(T *dk, const T *dscores, const T *scores, const T *q, int B, int T_, int H,
                                          int Hkv, int dh, lp_attn_opts o) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long rows = (long long)B * Hkv * T_;
    const int group = H / Hkv;
    const size_t q_stride = (size_t)H * dh;
    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows; row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, T_, Hkv, false);
        const int key = r.t, t_end = attn_query_end(key, T_, o.window);
        float acc[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
        for (int h = r.h * group; h < (r.h + 1) * group; h++) {
            const size_t gcol = ((size_t)r.b * H + h) * T_ * T_ + key; // [b,h,0,key]
            const T *q0 = q + ((size_t)r.b * T_ * H + h) * dh;
            for (int t0 = key; t0 < t_end; t0 += 32) {
                const int t = t0 + lane;
                const float gt = t < t_end ? raw_grad(dscores, scores, o.cap, gcol + (size_t)t * T_) : 0.0f;
                const int cnt = min(32, t_end - t0);
#pragma unroll 4
                for (int jj = 0; jj < cnt; jj++) {
                    const float w = __shfl_sync(LP_FULL_MASK, gt, jj);
                    const T *qr = q0 + (size_t)(t0 + jj) * q_stride;
#pragma unroll
                    for (int i = 0; i < DPL; i++) {
                        const int d = lane + 32 * i;
                        if (d < dh) acc[i] = fmaf(w, lp_to_f(qr[d]), acc[i]);
                    }
                }
            }
        }
        const size_t off = (((size_t)r.b * T_ + key) * Hkv + r.h) * dh;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < dh) dk[off + d] = lp_from_f<T>(acc[i] * o.scale);
        }
    }
}

// ---- launchers ----

// The three kernels of the fused attention backward, on one stash of per-row stats.
// Queries at positions pos0 .. pos0+Tq-1 of rows of Tk = pos0 + Tq keys (pos0 = 0: the square op).
template <typename T, int DPL>
static lp_status attention_backward_launch(lp_ctx *c, void *dq, void *dk, void *dv, unsigned char *stash,
                                           size_t stride, const void *dz, const void *q, const void *k,
                                           const void *v, int B, int Tq, int pos0, int H, int Hkv, int dh,
                                           lp_attn_opts o) {
    const size_t smem = (size_t)kWarps * 2 * dh * sizeof(float);
    const long long qrows = (long long)B * H * Tq, krows = (long long)B * Hkv * Tq;
    const int Tk = pos0 + Tq;
    LP_LAUNCH(grid_rows(qrows, kWarps), kWarps * 32, smem, cuda_stream_of(c), attn_bwd_stats_kernel<T>)(
        stash, stride, (const T *)dz, (const T *)q, (const T *)k, (const T *)v, B, Tq, Tk, pos0, H, Hkv, dh, o);
    LP_LAUNCH_CHECK("attn_bwd_stats_kernel");
    LP_LAUNCH(grid_rows(krows, kWarps), kWarps * 32, smem, cuda_stream_of(c), attn_bwd_dkv_kernel<T, DPL>)(
        (T *)dk, (T *)dv, stash, stride, (const T *)dz, (const T *)q, (const T *)k, (const T *)v, B, Tq, Tk, pos0, H,
        Hkv, dh, o);
    LP_LAUNCH_CHECK("attn_bwd_dkv_kernel");
    LP_LAUNCH(grid_rows(qrows, kWarps), kWarps * 32, smem, cuda_stream_of(c), attn_bwd_dq_kernel<T, DPL>)(
        (T *)dq, stash, stride, (const T *)dz, (const T *)q, (const T *)k, (const T *)v, B, Tq, Tk, pos0, H, Hkv, dh,
        o);
    LP_LAUNCH_CHECK("attn_bwd_dq_kernel");
    return LP_OK;
}

template <typename T>
static lp_status attention_backward_dispatch(lp_ctx *c, void *dq, void *dk, void *dv, unsigned char *stash,
                                             size_t stride, const void *dz, const void *q, const void *k,
                                             const void *v, int B, int Tq, int pos0, int H, int Hkv, int dh,
                                             lp_attn_opts o) {
#define LP_BWD_LAUNCH(DPL) \
    attention_backward_launch<T, DPL>(c, dq, dk, dv, stash, stride, dz, q, k, v, B, Tq, pos0, H, Hkv, dh, o)
    if (dh <= 32) return LP_BWD_LAUNCH(1);
    if (dh <= 64) return LP_BWD_LAUNCH(2);
    if (dh <= 128) return LP_BWD_LAUNCH(4);
    return LP_BWD_LAUNCH(8);
#undef LP_BWD_LAUNCH
}

// BF16 on tensor cores (attention_flash.cu) after the same stats kernel: lse and D per row.
static lp_status flash_backward(lp_ctx *c, void *dq, void *dk, void *dv, unsigned char *stash, size_t stride,
                                const void *dz, const void *q, const void *k, const void *v, int B, int T_, int H,
                                int Hkv, int dh, const lp_attn_cfg *cfg) {
    typedef __nv_bfloat16 bf;
    const lp_attn_opts o = attn_opts_of(cfg, dh);
    const long long qrows = (long long)B * H * T_;
    const size_t smem = (size_t)kWarps * 2 * dh * sizeof(float);
    LP_LAUNCH(grid_rows(qrows, kWarps), kWarps * 32, smem, cuda_stream_of(c), attn_bwd_stats_kernel<bf>)(
        stash, stride, (const bf *)dz, (const bf *)q, (const bf *)k, (const bf *)v, B, T_, T_, 0, H, Hkv, dh, o);
    LP_LAUNCH_CHECK("attn_bwd_stats_kernel");
    return cuda_flash_attention_backward(c, dq, dk, dv, stash, stride, dz, q, k, v, B, T_, H, Hkv, dh, cfg);
}

template <typename T, int DPL>
static lp_status attn_apply_backward_launch(lp_ctx *c, void *dpattern, void *dv, const void *dz,
                                            const void *pattern, const void *v, int B, int T_, int H, int Hkv,
                                            int dh) {
    const long long qrows = (long long)B * H * T_, krows = (long long)B * Hkv * T_;
    LP_LAUNCH(grid_rows(qrows, kWarps), kWarps * 32, (size_t)kWarps * dh * sizeof(float),
                                  cuda_stream_of(c), attn_apply_bwd_dp_kernel<T>)((T *)dpattern, (const T *)dz, (const T *)v, B, T_, H, Hkv, dh);
    LP_LAUNCH_CHECK("attn_apply_bwd_dp_kernel");
    LP_LAUNCH(grid_rows(krows, kWarps), kWarps * 32, 0, cuda_stream_of(c), attn_apply_bwd_dv_kernel<T, DPL>)(
        (T *)dv, (const T *)dz, (const T *)pattern, B, T_, H, Hkv, dh);
    LP_LAUNCH_CHECK("attn_apply_bwd_dv_kernel");
    return LP_OK;
}

template <typename T>
static lp_status attn_apply_backward_dispatch(lp_ctx *c, void *dpattern, void *dv, const void *dz,
                                              const void *pattern, const void *v, int B, int T_, int H, int Hkv,
                                              int dh) {
    if (dh <= 32) return attn_apply_backward_launch<T, 1>(c, dpattern, dv, dz, pattern, v, B, T_, H, Hkv, dh);
    if (dh <= 64) return attn_apply_backward_launch<T, 2>(c, dpattern, dv, dz, pattern, v, B, T_, H, Hkv, dh);
    if (dh <= 128) return attn_apply_backward_launch<T, 4>(c, dpattern, dv, dz, pattern, v, B, T_, H, Hkv, dh);
    return attn_apply_backward_launch<T, 8>(c, dpattern, dv, dz, pattern, v, B, T_, H, Hkv, dh);
}

template <typename T, int DPL>
static lp_status attn_scores_backward_launch(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *scores,
                                             const void *q, const void *k, int B, int T_, int H, int Hkv, int dh,
                                             lp_attn_opts o) {
    const long long qrows = (long long)B * H * T_, krows = (long long)B * Hkv * T_;
    LP_LAUNCH(grid_rows(qrows, kWarps), kWarps * 32, 0, cuda_stream_of(c), attn_scores_bwd_dq_kernel<T, DPL>)(
        (T *)dq, (const T *)dscores, (const T *)scores, (const T *)k, B, T_, H, Hkv, dh, o);
    LP_LAUNCH_CHECK("attn_scores_bwd_dq_kernel");
    LP_LAUNCH(grid_rows(krows, kWarps), kWarps * 32, 0, cuda_stream_of(c), attn_scores_bwd_dk_kernel<T, DPL>)(
        (T *)dk, (const T *)dscores, (const T *)scores, (const T *)q, B, T_, H, Hkv, dh, o);
    LP_LAUNCH_CHECK("attn_scores_bwd_dk_kernel");
    return LP_OK;
}

template <typename T>
static lp_status attn_scores_backward_dispatch(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *scores,
                                               const void *q, const void *k, int B, int T_, int H, int Hkv, int dh,
                                               lp_attn_opts o) {
#define LP_SBWD_LAUNCH(DPL) attn_scores_backward_launch<T, DPL>(c, dq, dk, dscores, scores, q, k, B, T_, H, Hkv, dh, o)
    if (dh <= 32) return LP_SBWD_LAUNCH(1);
    if (dh <= 64) return LP_SBWD_LAUNCH(2);
    if (dh <= 128) return LP_SBWD_LAUNCH(4);
    return LP_SBWD_LAUNCH(8);
#undef LP_SBWD_LAUNCH
}

// Shape checks shared by the attention entry points.
static lp_status check_attn_shape(const char *op, int B, int T_, int H, int Hkv, int dh) {
    LP_CUDA_REQUIRE(B >= 0 && T_ >= 0, "%s: negative size B=%d T=%d", op, B, T_);
    LP_CUDA_REQUIRE(H >= 1 && Hkv >= 1 && H % Hkv == 0, "%s: H=%d must be a positive multiple of Hkv=%d", op, H,
                    Hkv);
    LP_CUDA_REQUIRE(dh >= 1 && dh <= kMaxDh, "%s: head dim %d outside 1..%d", op, dh, kMaxDh);
    return LP_OK;
}

// ---- entry points ----

// The fused backward of queries pos0 .. pos0+Tq-1 over Tk = pos0 + Tq keys (pos0 = 0: the
// square attention, which may take the BF16 tensor-core path).
static lp_status attention_backward_rows(lp_ctx *c, const char *op, void *dq, void *dk, void *dv, const void *dz,
                                         const void *q, const void *k, const void *v, int B, int Tq, int pos0, int H,
                                         int Hkv, int dh, const lp_attn_cfg *cfg) {
    LP_CUDA_REQUIRE_CTX(c, op);
    LP_CHECK(check_attn_shape(op, B, Tq, H, Hkv, dh));
    LP_CUDA_REQUIRE(pos0 >= 0, "%s: negative pos0 %d", op, pos0);
    if ((long long)B * Tq == 0) return LP_OK;
    LP_CUDA_REQUIRE(dq && dk && dv && dz && q && k && v, "%s: NULL buffer", op);
    const size_t row_bytes = (size_t)dh * lp_dtype_size(c->dtype);
    unsigned char *stash = (unsigned char *)dq, *scratch = NULL;
    size_t stride = row_bytes;
    if (row_bytes < 2 * sizeof(float)) { // dq rows too short to hold the stats (dh = 1 F32, dh < 4 BF16)
        stride = 2 * sizeof(float);
        LP_CHECK(cuda_alloc(c, (size_t)B * Tq * H * stride, (void **)&scratch));
        stash = scratch;
    }
    const void *bufs[7] = {dq, dk, dv, dz, q, k, v};
    if (!scratch && pos0 == 0 && cuda_flash_fits(c, B, Tq, H, dh, bufs, 7))
        return flash_backward(c, dq, dk, dv, stash, stride, dz, q, k, v, B, Tq, H, Hkv, dh, cfg);
    const lp_attn_opts o = attn_opts_of(cfg, dh);
    lp_status st = c->dtype == LP_BF16
                       ? attention_backward_dispatch<__nv_bfloat16>(c, dq, dk, dv, stash, stride, dz, q, k, v, B, Tq,
                                                                    pos0, H, Hkv, dh, o)
                       : attention_backward_dispatch<float>(c, dq, dk, dv, stash, stride, dz, q, k, v, B, Tq, pos0, H,
                                                            Hkv, dh, o);
    if (scratch) { // the kernels must be done with it before it is freed
        cudaError_t e = cudaStreamSynchronize(cuda_stream_of(c));
        cuda_release(c, scratch);
        if (e != cudaSuccess && st == LP_OK) {
            (void)cudaGetLastError();
            st = LP_ERR(LP_ERR_CUDA, "CUDA error %s: %s in %s", cudaGetErrorName(e),
                              cudaGetErrorString(e), op);
        }
    }
    return st;
}

lp_status cuda_attention_backward(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q,
                                     const void *k, const void *v, int B, int T, int H, int Hkv, int dh,
                                     const lp_attn_cfg *cfg) {
    return attention_backward_rows(c, "cuda_attention_backward", dq, dk, dv, dz, q, k, v, B, T, 0, H, Hkv, dh, cfg);
}

lp_status cuda_attention_backward_suffix(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q,
                                         const void *k, const void *v, int B, int Tq, int pos0, int H, int Hkv, int dh,
                                         const lp_attn_cfg *cfg) {
    return attention_backward_rows(c, "cuda_attention_backward_suffix", dq, dk, dv, dz, q, k, v, B, Tq, pos0, H, Hkv,
                                   dh, cfg);
}

lp_status cuda_attn_apply_backward(lp_ctx *c, void *dpattern, void *dv, const void *dz, const void *pattern,
                                      const void *v, int B, int T, int H, int Hkv, int dh) {
    const char *op = "cuda_attn_apply_backward";
    LP_CUDA_REQUIRE_CTX(c, op);
    LP_CHECK(check_attn_shape(op, B, T, H, Hkv, dh));
    if ((long long)B * T == 0) return LP_OK;
    LP_CUDA_REQUIRE(dpattern && dv && dz && pattern && v, "%s: NULL buffer", op);
    return c->dtype == LP_BF16
               ? attn_apply_backward_dispatch<__nv_bfloat16>(c, dpattern, dv, dz, pattern, v, B, T, H, Hkv, dh)
               : attn_apply_backward_dispatch<float>(c, dpattern, dv, dz, pattern, v, B, T, H, Hkv, dh);
}

lp_status cuda_attn_scores_backward(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *scores,
                                       const void *q, const void *k, int B, int T, int H, int Hkv, int dh,
                                       const lp_attn_cfg *cfg) {
    const char *op = "cuda_attn_scores_backward";
    LP_CUDA_REQUIRE_CTX(c, op);
    LP_CHECK(check_attn_shape(op, B, T, H, Hkv, dh));
    if ((long long)B * T == 0) return LP_OK;
    const lp_attn_opts o = attn_opts_of(cfg, dh);
    LP_CUDA_REQUIRE(dq && dk && dscores && q && k && (scores || o.cap <= 0.0f), "%s: NULL buffer", op);
    return c->dtype == LP_BF16
               ? attn_scores_backward_dispatch<__nv_bfloat16>(c, dq, dk, dscores, scores, q, k, B, T, H, Hkv, dh, o)
               : attn_scores_backward_dispatch<float>(c, dq, dk, dscores, scores, q, k, B, T, H, Hkv, dh, o);
}
