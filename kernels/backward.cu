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
//    The price of no atomics: the two dot products of each (query, key) pair are formed in
//    all three kernels (an atomic version forms them twice).
//    The stats (8 bytes per query row) live in the dq buffer until kernel 3 reads a row's
//    pair and overwrites the row with its dq, so the op allocates nothing (dq must not alias
//    an input; host/ops.c checks). Only a head dim whose dq row is shorter than 8 bytes
//    (dh = 1 in F32, dh < 4 in BF16) takes a temporary device buffer, allocated and freed
//    in the call (cudaMalloc / cudaFree synchronise: toy shapes only).
//  - Attention, three-step form: dpattern and dq as query-row kernels (lane per key for the
//    dot products, lane per dim for the sums), dv and dk as key-row kernels summing over
//    the group's heads and the queries; again deterministic, no atomics.
// Warps of a block take neighbouring rows of one (b, head), so they share K/V (or Q/dZ)
// rows through L1, and the longest rows are scheduled first.
#include "common.cuh"

static const unsigned kBlock = 256; // element-wise kernels
static const int kWarps = 4;        // rows (warps) per block of the row kernels
static const int kMaxDh = 256;      // 8 values per lane

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
        mu = lp_block_sum(s, sh) / (float)D;
    }
    float sg = 0.0f, sgx = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float xh = ((lp_to_f(xr[d]) - x0) - mu) * inv;
        const float g = lp_to_f(dyr[d]) * (w ? lp_to_f(w[d]) : 1.0f);
        sg += g;
        sgx = fmaf(g, xh, sgx);
    }
    const float mg = kCenter ? lp_block_sum(sg, sh) / (float)D : 0.0f;
    const float mgx = lp_block_sum(sgx, sh) / (float)D;
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
        mu = lp_block_sum(s, sh) / (float)D;
    }
    double acc = 0.0;
    for (int d = threadIdx.x; d < D; d += blockDim.x)
        acc += (double)(lp_to_f(dyr[d]) * (w ? lp_to_f(w[d]) : 1.0f)) * (((lp_to_f(xr[d]) - x0) - mu) * inv);
    const double total = lp_block_sum_d(acc, shd);
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
        dot = lp_warp_sum(dot);
        for (int j = lane; j < cols; j += 32) {
            const float yj = lp_to_f(yr[j]);
            dxr[j] = lp_from_f<T>(yj != 0.0f ? yj * (lp_to_f(dyr[j]) - dot) : 0.0f);
        }
    }
}

// ---- cross-entropy ----

// (m, s) = running max and sum of exp(x - m), as loss.cu.
__device__ __forceinline__ void lse_push(float &m, float &s, float x) {
    if (x == -INFINITY) return;
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else {
        s += expf(x - m);
    }
}
__device__ __forceinline__ void lse_merge(float &m, float &s, float m2, float s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) { m = m2; s = s2; return; }
    const float mm = fmaxf(m, m2);
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// dlogits[n,:] = scale[n] (softmax(logits[n,:]) - onehot(target[n])); zeros where target < 0,
// NaN where target >= V (a token the host could not check). One block per row.
template <typename T>
__global__ void xent_backward_kernel(T *dl, const T *logits, const int32_t *targets, const float *scale, int V) {
    LP_SHARED(float, sm, [32]);
    LP_SHARED(float, ss, [32]);
    const size_t row = blockIdx.x;
    const int tgt = targets[row]; // the same in every thread: the block branches together
    T *o = dl + row * V;
    if (tgt < 0 || tgt >= V) {
        for (int j = threadIdx.x; j < V; j += blockDim.x) o[j] = lp_from_f<T>(tgt < 0 ? 0.0f : NAN);
        return;
    }
    const T *xr = logits + row * V;
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
                                      const T *v, int B, int T_, int H, int Hkv, int dh, float scale) {
    LP_DYNAMIC_SHARED(float, smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *qs = smem + warp * 2 * dh, *dzs = qs + dh;
    const long long rows = (long long)B * H * T_;
    const int group = H / Hkv;
    const size_t kv_stride = (size_t)Hkv * dh;

    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows; row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, T_, H, true);
        const int tq = r.t;
        const size_t qrow = ((size_t)r.b * T_ + tq) * H + r.h, qoff = qrow * dh;
        __syncwarp(); // the previous row's readers of qs, dzs are done
        for (int d = lane; d < dh; d += 32) qs[d] = lp_to_f(q[qoff + d]), dzs[d] = lp_to_f(dz[qoff + d]);
        __syncwarp();
        const size_t kv0 = ((size_t)r.b * T_ * Hkv + r.h / group) * dh;
        const T *kb = k + kv0, *vb = v + kv0;
        float m = -INFINITY, l = 0.0f, dacc = 0.0f;
        for (int j0 = 0; j0 <= tq; j0 += 32) {
            const int j = j0 + lane;
            const bool live = j <= tq;
            float s = -INFINITY, dp = 0.0f;
            if (live) {
                s = dot_sg(qs, kb + (size_t)j * kv_stride, dh) * scale;
                dp = dot_sg(dzs, vb + (size_t)j * kv_stride, dh);
            }
            // Lane 0's key is live, so m_new is finite; on the first chunk corr = exp(-inf) = 0.
            const float m_new = fmaxf(m, lp_warp_max(s));
            const float corr = expf(m - m_new);
            const float e = live ? expf(s - m_new) : 0.0f;
            l = l * corr + lp_warp_sum(e);
            dacc = dacc * corr + lp_warp_sum(e * dp);
            m = m_new;
        }
        if (lane == 0) stats_put(stash, stride, qrow, row_stats{m + logf(l), dacc / l}); // l >= 1
    }
}

// ---- attention, fused: 2. per (b, kv head g, key j): dk_j, dv_j over the group's heads ----
//   dk_j = sum_{h, t >= j} ds_{t,j} q_t / sqrt(dh),  dv_j = sum_{h, t >= j} p_{t,j} dz_t
// Lane per query for the dot products, lane per dim for the sums.
template <typename T, int DPL>
__global__ void attn_bwd_dkv_kernel(T *dk, T *dv, const unsigned char *stash, size_t stride, const T *dz,
                                    const T *q, const T *k, const T *v, int B, int T_, int H, int Hkv, int dh,
                                    float scale) {
    LP_DYNAMIC_SHARED(float, smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *ks = smem + warp * 2 * dh, *vs = ks + dh;
    const long long rows = (long long)B * Hkv * T_;
    const int group = H / Hkv;
    const size_t q_stride = (size_t)H * dh; // between consecutive queries of one head

    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows; row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, T_, Hkv, false); // early keys (the most queries) first
        const int key = r.t;
        const size_t kvoff = (((size_t)r.b * T_ + key) * Hkv + r.h) * dh;
        __syncwarp();
        for (int d = lane; d < dh; d += 32) ks[d] = lp_to_f(k[kvoff + d]), vs[d] = lp_to_f(v[kvoff + d]);
        __syncwarp();
        float ak[DPL], av[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) ak[i] = av[i] = 0.0f;
        for (int h = r.h * group; h < (r.h + 1) * group; h++) {
            const size_t q0 = ((size_t)r.b * T_ * H + h) * dh; // query 0 of head h
            for (int t0 = key; t0 < T_; t0 += 32) {
                const int t = t0 + lane;
                float p = 0.0f, ds = 0.0f;
                if (t < T_) {
                    const row_stats st = stats_get(stash, stride, ((size_t)r.b * T_ + t) * H + h);
                    const float s = dot_sg(ks, q + q0 + (size_t)t * q_stride, dh) * scale;
                    p = expf(s - st.lse);
                    ds = p * (dot_sg(vs, dz + q0 + (size_t)t * q_stride, dh) - st.dsum);
                }
                const int cnt = min(32, T_ - t0); // the same in every lane
#pragma unroll 4
                for (int jj = 0; jj < cnt; jj++) {
                    const float pj = __shfl_sync(LP_FULL_MASK, p, jj), dsj = __shfl_sync(LP_FULL_MASK, ds, jj);
                    const T *qr = q + q0 + (size_t)(t0 + jj) * q_stride, *dzr = dz + q0 + (size_t)(t0 + jj) * q_stride;
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
            if (d < dh) dk[kvoff + d] = lp_from_f<T>(ak[i] * scale), dv[kvoff + d] = lp_from_f<T>(av[i]);
        }
    }
}

// ---- attention, fused: 3. per query row: dq = sum_j ds_j k_j / sqrt(dh) ----
// The row's stats are read (from dq's own row when dq is the stash) before any lane writes dq.
template <typename T, int DPL>
__global__ void attn_bwd_dq_kernel(T *dq, const unsigned char *stash, size_t stride, const T *dz, const T *q,
                                   const T *k, const T *v, int B, int T_, int H, int Hkv, int dh, float scale) {
    LP_DYNAMIC_SHARED(float, smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *qs = smem + warp * 2 * dh, *dzs = qs + dh;
    const long long rows = (long long)B * H * T_;
    const int group = H / Hkv;
    const size_t kv_stride = (size_t)Hkv * dh;

    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows; row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, T_, H, true);
        const int tq = r.t;
        const size_t qrow = ((size_t)r.b * T_ + tq) * H + r.h, qoff = qrow * dh;
        const row_stats st = stats_get(stash, stride, qrow);
        __syncwarp(); // every lane holds the stats; the previous row's readers of qs, dzs are done
        for (int d = lane; d < dh; d += 32) qs[d] = lp_to_f(q[qoff + d]), dzs[d] = lp_to_f(dz[qoff + d]);
        __syncwarp();
        const size_t kv0 = ((size_t)r.b * T_ * Hkv + r.h / group) * dh;
        const T *kb = k + kv0, *vb = v + kv0;
        float acc[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
        for (int j0 = 0; j0 <= tq; j0 += 32) {
            const int j = j0 + lane;
            float ds = 0.0f;
            if (j <= tq) {
                const float s = dot_sg(qs, kb + (size_t)j * kv_stride, dh) * scale;
                const float p = expf(s - st.lse);
                ds = p * (dot_sg(dzs, vb + (size_t)j * kv_stride, dh) - st.dsum);
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
            if (d < dh) dq[qoff + d] = lp_from_f<T>(acc[i] * scale);
        }
    }
}

// ---- attention, three-step form ----

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

// dq[b,t,h,:] = sum_{j<=t} dscores[b,h,t,j] k[b,j,g,:] / sqrt(dh): a warp per query row, lane per
// key for the weights (entries j > t are never read), lane per dim for the sum.
template <typename T, int DPL>
__global__ void attn_scores_bwd_dq_kernel(T *dq, const T *dscores, const T *k, int B, int T_, int H, int Hkv,
                                          int dh, float scale) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long rows = (long long)B * H * T_;
    const int group = H / Hkv;
    const size_t kv_stride = (size_t)Hkv * dh;
    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows; row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, T_, H, false);
        const int tq = r.t;
        const T *gr = dscores + (size_t)row * T_; // row == (b*H + h)*T + t
        const T *kb = k + ((size_t)r.b * T_ * Hkv + r.h / group) * dh;
        float acc[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
        for (int j0 = 0; j0 <= tq; j0 += 32) {
            const int j = j0 + lane;
            const float gj = j <= tq ? lp_to_f(gr[j]) : 0.0f;
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
            if (d < dh) dq[off + d] = lp_from_f<T>(acc[i] * scale);
        }
    }
}

// dk[b,j,g,:] = sum over the group's heads h and t >= j of dscores[b,h,t,j] q[b,t,h,:] / sqrt(dh).
template <typename T, int DPL>
__global__ void attn_scores_bwd_dk_kernel(T *dk, const T *dscores, const T *q, int B, int T_, int H, int Hkv,
                                          int dh, float scale) {
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
            const T *gcol = dscores + ((size_t)r.b * H + h) * T_ * T_ + key; // dscores[b,h,0,key]
            const T *q0 = q + ((size_t)r.b * T_ * H + h) * dh;
            for (int t0 = key; t0 < T_; t0 += 32) {
                const int t = t0 + lane;
                const float gt = t < T_ ? lp_to_f(gcol[(size_t)t * T_]) : 0.0f;
                const int cnt = min(32, T_ - t0);
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
            if (d < dh) dk[off + d] = lp_from_f<T>(acc[i] * scale);
        }
    }
}

// ---- launchers ----

// Blocks for `rows` warp-rows; the kernels loop if the grid had to be capped.
static unsigned row_grid(long long rows) {
    long long g = (rows + kWarps - 1) / kWarps;
    if (g < 1) g = 1;
    if (g > 0x7fffffffLL) g = 0x7fffffffLL;
    return (unsigned)g;
}

template <typename T, bool kCenter>
static lp_status norm_backward_launch(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale,
                                      const void *w, int N, int D) {
    LP_LAUNCH((unsigned)N, norm_block(D), 0, lp_stream(c), norm_backward_kernel<T, kCenter>)(
        (T *)dx, (const T *)dy, (const T *)x, (const T *)scale, (const T *)w, D);
    LP_LAUNCH_CHECK("norm_backward_kernel");
    return LP_OK;
}

template <typename T>
static lp_status gelu_backward_launch(lp_ctx *c, void *dx, const void *dy, const void *x, size_t n) {
    LP_LAUNCH(lp_grid_1d(n, kBlock), kBlock, 0, lp_stream(c), gelu_backward_kernel<T>)((T *)dx, (const T *)dy,
                                                                                (const T *)x, n);
    LP_LAUNCH_CHECK("gelu_backward_kernel");
    return LP_OK;
}

template <typename T>
static lp_status silu_mul_backward_launch(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate,
                                          const void *up, size_t n) {
    LP_LAUNCH(lp_grid_1d(n, kBlock), kBlock, 0, lp_stream(c), silu_mul_backward_kernel<T>)(
        (T *)dgate, (T *)dup, (const T *)dy, (const T *)gate, (const T *)up, n);
    LP_LAUNCH_CHECK("silu_mul_backward_kernel");
    return LP_OK;
}

template <typename T>
static lp_status rope_backward_launch(lp_ctx *c, void *dx, const void *dy, const float *cos_t, const float *sin_t,
                                      int B, int T_, int H, int dh, int pos0) {
    const size_t pairs = (size_t)B * T_ * H * (dh / 2);
    LP_LAUNCH(lp_grid_1d(pairs, kBlock), kBlock, 0, lp_stream(c), rope_backward_kernel<T>)(
        (T *)dx, (const T *)dy, cos_t, sin_t, T_, H, dh, pos0, pairs);
    LP_LAUNCH_CHECK("rope_backward_kernel");
    return LP_OK;
}

template <typename T>
static lp_status softmax_rows_backward_launch(lp_ctx *c, void *dx, const void *dy, const void *y, size_t rows,
                                              int cols) {
    LP_LAUNCH(row_grid((long long)rows), kWarps * 32, 0, lp_stream(c), softmax_rows_backward_kernel<T>)(
        (T *)dx, (const T *)dy, (const T *)y, rows, cols);
    LP_LAUNCH_CHECK("softmax_rows_backward_kernel");
    return LP_OK;
}

template <typename T>
static lp_status xent_backward_launch(lp_ctx *c, void *dl, const void *logits, const int32_t *targets,
                                      const float *scale, int N, int V) {
    const unsigned block = V >= 512 ? 512u : (unsigned)((V + 31) / 32 * 32);
    LP_LAUNCH((unsigned)N, block, 0, lp_stream(c), xent_backward_kernel<T>)((T *)dl, (const T *)logits, targets, scale, V);
    LP_LAUNCH_CHECK("xent_backward_kernel");
    return LP_OK;
}

// The three kernels of the fused attention backward, on one stash of per-row stats.
template <typename T, int DPL>
static lp_status attention_backward_launch(lp_ctx *c, void *dq, void *dk, void *dv, unsigned char *stash,
                                           size_t stride, const void *dz, const void *q, const void *k,
                                           const void *v, int B, int T_, int H, int Hkv, int dh) {
    const float scale = 1.0f / sqrtf((float)dh);
    const size_t smem = (size_t)kWarps * 2 * dh * sizeof(float);
    const long long qrows = (long long)B * H * T_, krows = (long long)B * Hkv * T_;
    LP_LAUNCH(row_grid(qrows), kWarps * 32, smem, lp_stream(c), attn_bwd_stats_kernel<T>)(
        stash, stride, (const T *)dz, (const T *)q, (const T *)k, (const T *)v, B, T_, H, Hkv, dh, scale);
    LP_LAUNCH_CHECK("attn_bwd_stats_kernel");
    LP_LAUNCH(row_grid(krows), kWarps * 32, smem, lp_stream(c), attn_bwd_dkv_kernel<T, DPL>)(
        (T *)dk, (T *)dv, stash, stride, (const T *)dz, (const T *)q, (const T *)k, (const T *)v, B, T_, H, Hkv, dh,
        scale);
    LP_LAUNCH_CHECK("attn_bwd_dkv_kernel");
    LP_LAUNCH(row_grid(qrows), kWarps * 32, smem, lp_stream(c), attn_bwd_dq_kernel<T, DPL>)(
        (T *)dq, stash, stride, (const T *)dz, (const T *)q, (const T *)k, (const T *)v, B, T_, H, Hkv, dh, scale);
    LP_LAUNCH_CHECK("attn_bwd_dq_kernel");
    return LP_OK;
}

template <typename T>
static lp_status attention_backward_dispatch(lp_ctx *c, void *dq, void *dk, void *dv, unsigned char *stash,
                                             size_t stride, const void *dz, const void *q, const void *k,
                                             const void *v, int B, int T_, int H, int Hkv, int dh) {
#define LP_BWD_LAUNCH(DPL) \
    attention_backward_launch<T, DPL>(c, dq, dk, dv, stash, stride, dz, q, k, v, B, T_, H, Hkv, dh)
    if (dh <= 32) return LP_BWD_LAUNCH(1);
    if (dh <= 64) return LP_BWD_LAUNCH(2);
    if (dh <= 128) return LP_BWD_LAUNCH(4);
    return LP_BWD_LAUNCH(8);
#undef LP_BWD_LAUNCH
}

template <typename T, int DPL>
static lp_status attn_apply_backward_launch(lp_ctx *c, void *dpattern, void *dv, const void *dz,
                                            const void *pattern, const void *v, int B, int T_, int H, int Hkv,
                                            int dh) {
    const long long qrows = (long long)B * H * T_, krows = (long long)B * Hkv * T_;
    LP_LAUNCH(row_grid(qrows), kWarps * 32, (size_t)kWarps * dh * sizeof(float),
                                  lp_stream(c), attn_apply_bwd_dp_kernel<T>)((T *)dpattern, (const T *)dz, (const T *)v, B, T_, H, Hkv, dh);
    LP_LAUNCH_CHECK("attn_apply_bwd_dp_kernel");
    LP_LAUNCH(row_grid(krows), kWarps * 32, 0, lp_stream(c), attn_apply_bwd_dv_kernel<T, DPL>)(
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
static lp_status attn_scores_backward_launch(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *q,
                                             const void *k, int B, int T_, int H, int Hkv, int dh) {
    const float scale = 1.0f / sqrtf((float)dh);
    const long long qrows = (long long)B * H * T_, krows = (long long)B * Hkv * T_;
    LP_LAUNCH(row_grid(qrows), kWarps * 32, 0, lp_stream(c), attn_scores_bwd_dq_kernel<T, DPL>)(
        (T *)dq, (const T *)dscores, (const T *)k, B, T_, H, Hkv, dh, scale);
    LP_LAUNCH_CHECK("attn_scores_bwd_dq_kernel");
    LP_LAUNCH(row_grid(krows), kWarps * 32, 0, lp_stream(c), attn_scores_bwd_dk_kernel<T, DPL>)(
        (T *)dk, (const T *)dscores, (const T *)q, B, T_, H, Hkv, dh, scale);
    LP_LAUNCH_CHECK("attn_scores_bwd_dk_kernel");
    return LP_OK;
}

template <typename T>
static lp_status attn_scores_backward_dispatch(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *q,
                                               const void *k, int B, int T_, int H, int Hkv, int dh) {
    if (dh <= 32) return attn_scores_backward_launch<T, 1>(c, dq, dk, dscores, q, k, B, T_, H, Hkv, dh);
    if (dh <= 64) return attn_scores_backward_launch<T, 2>(c, dq, dk, dscores, q, k, B, T_, H, Hkv, dh);
    if (dh <= 128) return attn_scores_backward_launch<T, 4>(c, dq, dk, dscores, q, k, B, T_, H, Hkv, dh);
    return attn_scores_backward_launch<T, 8>(c, dq, dk, dscores, q, k, B, T_, H, Hkv, dh);
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

lp_status lp_cuda_ln_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale,
                              const void *w, int N, int D) {
    return norm_backward_entry(c, "lp_cuda_ln_backward", true, dx, dy, x, scale, w, N, D);
}

lp_status lp_cuda_rms_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale,
                               const void *w, int N, int D) {
    return norm_backward_entry(c, "lp_cuda_rms_backward", false, dx, dy, x, scale, w, N, D);
}

lp_status lp_cuda_gelu_backward(lp_ctx *c, void *dx, const void *dy, const void *x, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "lp_cuda_gelu_backward");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(dx && dy && x, "lp_cuda_gelu_backward: NULL buffer");
    return c->dtype == LP_BF16 ? gelu_backward_launch<__nv_bfloat16>(c, dx, dy, x, n)
                               : gelu_backward_launch<float>(c, dx, dy, x, n);
}

lp_status lp_cuda_silu_mul_backward(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate,
                                    const void *up, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "lp_cuda_silu_mul_backward");
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(dgate && dup && dy && gate && up, "lp_cuda_silu_mul_backward: NULL buffer");
    return c->dtype == LP_BF16 ? silu_mul_backward_launch<__nv_bfloat16>(c, dgate, dup, dy, gate, up, n)
                               : silu_mul_backward_launch<float>(c, dgate, dup, dy, gate, up, n);
}

lp_status lp_cuda_rope_backward(lp_ctx *c, void *dx, const void *dy, const float *cos_t, const float *sin_t,
                                int B, int T, int H, int dh, int pos0) {
    const char *op = "lp_cuda_rope_backward";
    LP_CUDA_REQUIRE_CTX(c, op);
    LP_CUDA_REQUIRE(B >= 0 && T >= 0 && H >= 1, "%s: bad size B=%d T=%d H=%d", op, B, T, H);
    LP_CUDA_REQUIRE(dh >= 2 && dh % 2 == 0, "%s: head dim %d is not a positive even number", op, dh);
    LP_CUDA_REQUIRE(pos0 >= 0, "%s: negative pos0 %d", op, pos0);
    if ((size_t)B * T * H == 0) return LP_OK;
    LP_CUDA_REQUIRE(dx && dy && cos_t && sin_t, "%s: NULL buffer", op);
    return c->dtype == LP_BF16 ? rope_backward_launch<__nv_bfloat16>(c, dx, dy, cos_t, sin_t, B, T, H, dh, pos0)
                               : rope_backward_launch<float>(c, dx, dy, cos_t, sin_t, B, T, H, dh, pos0);
}

lp_status lp_cuda_attention_backward(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q,
                                     const void *k, const void *v, int B, int T, int H, int Hkv, int dh) {
    const char *op = "lp_cuda_attention_backward";
    LP_CUDA_REQUIRE_CTX(c, op);
    LP_CHECK(check_attn_shape(op, B, T, H, Hkv, dh));
    if ((long long)B * T == 0) return LP_OK;
    LP_CUDA_REQUIRE(dq && dk && dv && dz && q && k && v, "%s: NULL buffer", op);
    const size_t row_bytes = (size_t)dh * lp_dtype_size(c->dtype);
    unsigned char *stash = (unsigned char *)dq, *scratch = NULL;
    size_t stride = row_bytes;
    if (row_bytes < 2 * sizeof(float)) { // dq rows too short to hold the stats (dh = 1 F32, dh < 4 BF16)
        stride = 2 * sizeof(float);
        LP_CHECK(lp_cuda_alloc(c, (size_t)B * T * H * stride, (void **)&scratch));
        stash = scratch;
    }
    lp_status st = c->dtype == LP_BF16
                       ? attention_backward_dispatch<__nv_bfloat16>(c, dq, dk, dv, stash, stride, dz, q, k, v, B, T,
                                                                    H, Hkv, dh)
                       : attention_backward_dispatch<float>(c, dq, dk, dv, stash, stride, dz, q, k, v, B, T, H, Hkv,
                                                            dh);
    if (scratch) { // the kernels must be done with it before it is freed
        cudaError_t e = cudaStreamSynchronize(lp_stream(c));
        lp_cuda_release(c, scratch);
        if (e != cudaSuccess && st == LP_OK) {
            (void)cudaGetLastError();
            st = lp_set_error(LP_ERR_CUDA, __FILE__, __LINE__, "CUDA error %s: %s in %s", cudaGetErrorName(e),
                              cudaGetErrorString(e), op);
        }
    }
    return st;
}

lp_status lp_cuda_attn_apply_backward(lp_ctx *c, void *dpattern, void *dv, const void *dz, const void *pattern,
                                      const void *v, int B, int T, int H, int Hkv, int dh) {
    const char *op = "lp_cuda_attn_apply_backward";
    LP_CUDA_REQUIRE_CTX(c, op);
    LP_CHECK(check_attn_shape(op, B, T, H, Hkv, dh));
    if ((long long)B * T == 0) return LP_OK;
    LP_CUDA_REQUIRE(dpattern && dv && dz && pattern && v, "%s: NULL buffer", op);
    return c->dtype == LP_BF16
               ? attn_apply_backward_dispatch<__nv_bfloat16>(c, dpattern, dv, dz, pattern, v, B, T, H, Hkv, dh)
               : attn_apply_backward_dispatch<float>(c, dpattern, dv, dz, pattern, v, B, T, H, Hkv, dh);
}

lp_status lp_cuda_softmax_rows_backward(lp_ctx *c, void *dx, const void *dy, const void *y, size_t rows,
                                        int cols) {
    LP_CUDA_REQUIRE_CTX(c, "lp_cuda_softmax_rows_backward");
    LP_CUDA_REQUIRE(cols >= 0, "lp_cuda_softmax_rows_backward: negative cols %d", cols);
    if (rows == 0 || cols == 0) return LP_OK;
    LP_CUDA_REQUIRE(dx && dy && y, "lp_cuda_softmax_rows_backward: NULL buffer");
    return c->dtype == LP_BF16 ? softmax_rows_backward_launch<__nv_bfloat16>(c, dx, dy, y, rows, cols)
                               : softmax_rows_backward_launch<float>(c, dx, dy, y, rows, cols);
}

lp_status lp_cuda_attn_scores_backward(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *q,
                                       const void *k, int B, int T, int H, int Hkv, int dh) {
    const char *op = "lp_cuda_attn_scores_backward";
    LP_CUDA_REQUIRE_CTX(c, op);
    LP_CHECK(check_attn_shape(op, B, T, H, Hkv, dh));
    if ((long long)B * T == 0) return LP_OK;
    LP_CUDA_REQUIRE(dq && dk && dscores && q && k, "%s: NULL buffer", op);
    return c->dtype == LP_BF16
               ? attn_scores_backward_dispatch<__nv_bfloat16>(c, dq, dk, dscores, q, k, B, T, H, Hkv, dh)
               : attn_scores_backward_dispatch<float>(c, dq, dk, dscores, q, k, B, T, H, Hkv, dh);
}

lp_status lp_cuda_xent_backward(lp_ctx *c, void *dlogits, const void *logits, const int32_t *targets,
                                const float *scale, int N, int V) {
    LP_CUDA_REQUIRE_CTX(c, "lp_cuda_xent_backward");
    LP_CUDA_REQUIRE(N >= 0 && V >= 1, "lp_cuda_xent_backward: bad size N=%d V=%d (V must be >= 1)", N, V);
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(dlogits && logits && targets && scale, "lp_cuda_xent_backward: NULL buffer");
    return c->dtype == LP_BF16 ? xent_backward_launch<__nv_bfloat16>(c, dlogits, logits, targets, scale, N, V)
                               : xent_backward_launch<float>(c, dlogits, logits, targets, scale, N, V);
}

template <typename T>
static lp_status norm_scale_grad_launch(lp_ctx *c, void *dscale, const void *dy, const void *x, const void *scale, const void *w,
                                        int N, int D, int center) {
    if (center)
        LP_LAUNCH((unsigned)N, norm_block(D), 0, lp_stream(c), norm_scale_grad_kernel<T, true>)((T *)dscale, (const T *)dy, (const T *)x, (const T *)scale,
                                                                     (const T *)w, D);
    else
        LP_LAUNCH((unsigned)N, norm_block(D), 0, lp_stream(c), norm_scale_grad_kernel<T, false>)((T *)dscale, (const T *)dy, (const T *)x, (const T *)scale,
                                                                      (const T *)w, D);
    LP_LAUNCH_CHECK("norm_scale_grad_kernel");
    return LP_OK;
}

lp_status lp_cuda_norm_scale_grad(lp_ctx *c, void *dscale, const void *dy, const void *x, const void *scale, const void *w,
                                  int N, int D, int center) {
    LP_CUDA_REQUIRE_CTX(c, "lp_cuda_norm_scale_grad");
    if (N == 0) return LP_OK;
    LP_CUDA_REQUIRE(dscale && dy && x && scale && D > 0, "lp_cuda_norm_scale_grad: bad arguments");
    return c->dtype == LP_BF16 ? norm_scale_grad_launch<__nv_bfloat16>(c, dscale, dy, x, scale, w, N, D, center)
                               : norm_scale_grad_launch<float>(c, dscale, dy, x, scale, w, N, D, center);
}
