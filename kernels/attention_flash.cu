// attention_flash.cu: causal self-attention forward and backward on tensor cores (WMMA,
// 16x16x16 bf16 operands, fp32 accumulation) for BF16 contexts, tiled as flash attention:
// no [T, T] matrix in memory, K/V (and Q/dZ) tiles staged in shared memory with 16-byte
// loads, an online softmax over key tiles. attention.cu and attention_backward.cu call it
// for the fused ops when cuda_flash_fits() holds (BF16, head dim a multiple of 16 up to
// 256, 16-byte aligned buffers) and keep their row kernels for everything else (F32 stays
// on those exact kernels).
//
// Tiles: a block has NW warps (4, or 2 for head dims above 128 so the tiles fit in shared
// memory) and works on TL = 16 NW rows; each warp owns 16 of them. Per warp, a product of
// two tiles is WMMA fragments through shared memory: scores S (fp32) are stored, masked and
// exponentiated row by row (two lanes a row), and the probabilities (or score gradients)
// rounded to bf16 for the next product, as flash attention does on every GPU. The fp32
// accumulators of the output rows (O, dQ, dK, dV) live in shared memory: WMMA's mapping of
// elements to lanes is unspecified, so rows are rescaled there, not in fragments.
//
// Forward, a block per (query tile, b, h): for each key tile from the first key of the
// tile's window to its diagonal: S = Q K^T, online softmax (running max m and sum l per
// row), O = O corr + P V; z = O / l.
// Backward (the stats of attention_backward.cu first: lse and D = dz . z per query row,
// stashed in the dq buffer), deterministic and without atomics, like the row kernels:
//   dK, dV: a block per (key tile, b, kv head) walks the group's heads and the query tiles
//     that see its keys: S^T = K Q^T, dP^T = V dZ^T, P = exp(S - lse), dS = P (dP - D)
//     (times the soft-cap's derivative and the scale), dV += P^T dZ, dK += dS^T Q;
//   dQ: a block per (query tile, b, h) walks its key tiles: dQ += dS K.
#include "common.cuh"

#include <mma.h>

using namespace nvcuda;

namespace {

typedef __nv_bfloat16 bf16;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> frag_b;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> frag_bt; // B = X^T read from X's rows
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_c;

// Shared-memory geometry of a block: leading dimensions padded (against bank conflicts) by
// amounts that keep every 16-row tile 32-byte aligned, as WMMA requires.
struct geom {
    int tl, ldh, lds, ldp, ldo;
    __host__ __device__ geom(int nw, int dh) : tl(16 * nw), ldh(dh + 8), lds(16 * nw + 4), ldp(16 * nw + 8), ldo(dh + 4) {}
};

// Rows r0 .. r0+n-1 of a bf16 matrix with row stride `stride` into shared rows of ld
// elements, 16 bytes a load; rows at or past `limit` become zeros (a tile past T then
// contributes exactly nothing, where garbage times a zero weight could still be NaN).
__device__ __forceinline__ void stage_rows(bf16 *dst, int ld, const bf16 *src, size_t stride, int r0, int n,
                                           int limit, int dh) {
    const int chunks = dh / 8;
    for (int i = threadIdx.x; i < n * chunks; i += blockDim.x) {
        const int r = i / chunks, c = (i % chunks) * 8;
        uint4 w;
        w.x = w.y = w.z = w.w = 0u;
        if (r0 + r < limit) w = *(const uint4 *)(src + (size_t)(r0 + r) * stride + c);
        *(uint4 *)(dst + (size_t)r * ld + c) = w;
    }
}

// 16 fp32 rows of a warp (ld floats apart), times scale[row], to bf16 rows of a matrix with
// row stride `stride`, 16 bytes a store; rows at or past `limit` are not written.
__device__ __forceinline__ void store_rows(bf16 *dst, size_t stride, int r0, int limit, const float *src, int ld,
                                           const float *scale, int dh) {
    const int lane = threadIdx.x & 31, chunks = dh / 8;
    for (int i = lane; i < 16 * chunks; i += 32) {
        const int r = i / chunks, c = (i % chunks) * 8;
        if (r0 + r >= limit) continue;
        const float *s = src + (size_t)r * ld + c;
        const float f = scale ? scale[r] : 1.0f;
        unsigned w[4];
        for (int e = 0; e < 4; e++)
            w[e] = (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(s[2 * e] * f)) |
                   (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(s[2 * e + 1] * f)) << 16;
        uint4 u;
        u.x = w[0], u.y = w[1], u.z = w[2], u.w = w[3];
        *(uint4 *)(dst + (size_t)(r0 + r) * stride + c) = u;
    }
}

// out (16 x ncols fp32, ldo) = A (16 x dh rows at a) times B^T (B: ncols x dh rows at b).
__device__ __forceinline__ void mm_abt(float *out, int ldo, const bf16 *a, int lda, const bf16 *b, int ldb, int ncols,
                                       int dh) {
    for (int n = 0; n < ncols; n += 16) {
        frag_c acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int k = 0; k < dh; k += 16) {
            frag_a fa;
            frag_bt fb;
            wmma::load_matrix_sync(fa, a + k, lda);
            wmma::load_matrix_sync(fb, b + (size_t)n * ldb + k, ldb);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(out + n, acc, ldo, wmma::mem_row_major);
    }
}

// acc (16 x dh fp32, ldc) += A (16 x kdim at a) times B (kdim x dh at b).
__device__ __forceinline__ void mm_acc(float *acc_s, int ldc, const bf16 *a, int lda, const bf16 *b, int ldb, int kdim,
                                       int dh) {
    for (int n = 0; n < dh; n += 16) {
        frag_c acc;
        wmma::load_matrix_sync(acc, acc_s + n, ldc, wmma::mem_row_major);
        for (int k = 0; k < kdim; k += 16) {
            frag_a fa;
            frag_b fb;
            wmma::load_matrix_sync(fa, a + k, lda);
            wmma::load_matrix_sync(fb, b + (size_t)k * ldb + n, ldb);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(acc_s + n, acc, ldc, wmma::mem_row_major);
    }
}

// Whether query t sees key j (both < T).
__device__ __forceinline__ bool sees(int t, int j, int T_, int window) {
    return t < T_ && j <= t && j >= attn_first(t, window);
}

// ---- forward: a block per (query tile, b*H + h) ----
template <int NW>
__global__ void __launch_bounds__(NW * 32)
flash_fwd_kernel(bf16 *z, const bf16 *q, const bf16 *k, const bf16 *v, int T_, int H, int Hkv, int dh, lp_attn_opts o) {
    LP_DYNAMIC_SHARED(uint4, smem);
    const geom G(NW, dh);
    const int TL = G.tl;
    bf16 *Qs = (bf16 *)smem, *Ks = Qs + TL * G.ldh, *Vs = Ks + TL * G.ldh;
    float *Ss = (float *)(Vs + TL * G.ldh);
    bf16 *Ps = (bf16 *)(Ss + TL * G.lds);
    float *Os = (float *)(Ps + TL * G.ldp), *Ls = Os + TL * G.ldo;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * TL; // the longest rows first
    const int b = blockIdx.y / H, h = blockIdx.y % H, g = h / (H / Hkv);
    const size_t qstride = (size_t)H * dh, kstride = (size_t)Hkv * dh;
    const bf16 *qb = q + ((size_t)b * T_ * H + h) * dh;
    const bf16 *kb = k + ((size_t)b * T_ * Hkv + g) * dh, *vb = v + ((size_t)b * T_ * Hkv + g) * dh;
    float *Sw = Ss + warp * 16 * G.lds, *Ow = Os + warp * 16 * G.ldo;
    bf16 *Pw = Ps + warp * 16 * G.ldp;
    const int tw0 = q0 + warp * 16, t = tw0 + r;

    stage_rows(Qs, G.ldh, qb, qstride, q0, TL, T_, dh);
    for (int i = lane; i < 16 * G.ldo; i += 32) Ow[i] = 0.0f;
    float m = -INFINITY, l = 0.0f; // of row r (both lanes of the pair hold them)
    const int last = min(T_ - 1, q0 + TL - 1);
    for (int j0 = attn_first(q0, o.window) / TL * TL; j0 <= last; j0 += TL) {
        __syncthreads(); // the previous tile's readers are done (and Qs is staged)
        stage_rows(Ks, G.ldh, kb, kstride, j0, TL, T_, dh);
        stage_rows(Vs, G.ldh, vb, kstride, j0, TL, T_, dh);
        __syncthreads();
        // A warp whose 16 queries see no key of this tile skips it (warp-uniform).
        if (tw0 >= T_ || j0 > tw0 + 15 || j0 + TL - 1 < attn_first(tw0, o.window)) continue;
        mm_abt(Sw, G.lds, Qs + warp * 16 * G.ldh, G.ldh, Ks, G.ldh, TL, dh);
        __syncwarp();
        float *srow = Sw + r * G.lds;
        bf16 *prow = Pw + r * G.ldp;
        const int c0 = half * (TL / 2), c1 = c0 + TL / 2;
        float mt = -INFINITY;
        for (int c = c0; c < c1; c++) {
            const int j = j0 + c;
            const float s = sees(t, j, T_, o.window) ? attn_score(srow[c], o) : -INFINITY;
            srow[c] = s;
            mt = fmaxf(mt, s);
        }
        mt = fmaxf(mt, __shfl_xor_sync(LP_FULL_MASK, mt, 1));
        const float m_new = fmaxf(m, mt);
        // A row that has seen no key yet keeps O = 0 and l = 0 (no exp of -inf - -inf).
        const float corr = m_new == -INFINITY ? 1.0f : expf(m - m_new);
        float ps = 0.0f;
        for (int c = c0; c < c1; c++) {
            const float p = m_new == -INFINITY ? 0.0f : expf(srow[c] - m_new);
            prow[c] = __float2bfloat16_rn(p);
            ps += p;
        }
        ps += __shfl_xor_sync(LP_FULL_MASK, ps, 1);
        l = l * corr + ps;
        m = m_new;
        float *orow = Ow + r * G.ldo;
        for (int d = half; d < dh; d += 2) orow[d] *= corr;
        __syncwarp();
        mm_acc(Ow, G.ldo, Pw, G.ldp, Vs, G.ldh, TL, dh);
    }
    if (half == 0) Ls[warp * 16 + r] = l > 0.0f ? 1.0f / l : 0.0f; // l >= 1 for every row < T
    __syncwarp();
    store_rows(z + ((size_t)b * T_ * H + h) * dh, qstride, tw0, T_, Ow, G.ldo, Ls + warp * 16, dh);
}

// ---- backward: the softmax stats of a query row, as attention_backward.cu stashes them ----
struct row_stats { float lse, dsum; };
__device__ __forceinline__ row_stats stats_read(const unsigned char *base, size_t stride, size_t row) {
    const unsigned short *p = (const unsigned short *)(base + row * stride);
    row_stats st;
    st.lse = __uint_as_float((unsigned)p[0] | ((unsigned)p[1] << 16));
    st.dsum = __uint_as_float((unsigned)p[2] | ((unsigned)p[3] << 16));
    return st;
}

// The gradient of a raw dot product from p and dp: ds = p (dp - D), through the soft-cap
// (1 - (s / cap)^2) and the scale; s is the capped score.
__device__ __forceinline__ float dot_grad(float p, float dp, float dsum, float s, const lp_attn_opts &o) {
    float ds = p * (dp - dsum);
    if (o.cap > 0.0f) ds *= 1.0f - (s / o.cap) * (s / o.cap);
    return ds * o.scale;
}

// ---- backward, dK and dV: a block per (key tile, b*Hkv + g) ----
template <int NW>
__global__ void __launch_bounds__(NW * 32)
flash_bwd_dkv_kernel(bf16 *dk, bf16 *dv, const unsigned char *stash, size_t sstride, const bf16 *dz, const bf16 *q,
                     const bf16 *k, const bf16 *v, int T_, int H, int Hkv, int dh, lp_attn_opts o) {
    LP_DYNAMIC_SHARED(uint4, smem);
    const geom G(NW, dh);
    const int TL = G.tl;
    bf16 *Ks = (bf16 *)smem, *Vs = Ks + TL * G.ldh, *Qs = Vs + TL * G.ldh, *Zs = Qs + TL * G.ldh;
    float *dKs = (float *)(Zs + TL * G.ldh), *dVs = dKs + TL * G.ldo, *Ss = dVs + TL * G.ldo,
          *dPs = Ss + TL * G.lds;
    bf16 *Ps = (bf16 *)(dPs + TL * G.lds), *dSs = Ps + TL * G.ldp;
    float *lse = (float *)(dSs + TL * G.ldp), *dsum = lse + TL;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
    const int k0 = blockIdx.x * TL, b = blockIdx.y / Hkv, g = blockIdx.y % Hkv, group = H / Hkv;
    const size_t qstride = (size_t)H * dh, kstride = (size_t)Hkv * dh;
    const size_t kv0 = ((size_t)b * T_ * Hkv + g) * dh;
    const int kw0 = k0 + warp * 16, j = kw0 + r;
    float *Sw = Ss + warp * 16 * G.lds, *dPw = dPs + warp * 16 * G.lds;
    float *dKw = dKs + warp * 16 * G.ldo, *dVw = dVs + warp * 16 * G.ldo;
    bf16 *Pw = Ps + warp * 16 * G.ldp, *dSw = dSs + warp * 16 * G.ldp;

    stage_rows(Ks, G.ldh, k + kv0, kstride, k0, TL, T_, dh);
    stage_rows(Vs, G.ldh, v + kv0, kstride, k0, TL, T_, dh);
    for (int i = lane; i < 16 * G.ldo; i += 32) dKw[i] = 0.0f, dVw[i] = 0.0f;
    const int q_end = attn_query_end(min(k0 + TL, T_) - 1, T_, o.window); // past the last query seeing the tile
    const int w_end = kw0 < T_ ? attn_query_end(min(kw0 + 15, T_ - 1), T_, o.window) : 0;
    for (int hh = 0; hh < group; hh++) {
        const int h = g * group + hh;
        const size_t q0off = ((size_t)b * T_ * H + h) * dh;
        for (int i0 = k0; i0 < q_end; i0 += TL) {
            __syncthreads(); // the previous tile's readers are done
            stage_rows(Qs, G.ldh, q + q0off, qstride, i0, TL, T_, dh);
            stage_rows(Zs, G.ldh, dz + q0off, qstride, i0, TL, T_, dh);
            for (int i = threadIdx.x; i < TL; i += blockDim.x) {
                const row_stats st = i0 + i < T_ ? stats_read(stash, sstride, ((size_t)b * T_ + i0 + i) * H + h)
                                                 : row_stats{0.0f, 0.0f};
                lse[i] = st.lse, dsum[i] = st.dsum;
            }
            __syncthreads();
            if (kw0 >= T_ || i0 + TL - 1 < kw0 || i0 >= w_end) continue; // warp-uniform
            mm_abt(Sw, G.lds, Ks + warp * 16 * G.ldh, G.ldh, Qs, G.ldh, TL, dh);  // S^T
            mm_abt(dPw, G.lds, Vs + warp * 16 * G.ldh, G.ldh, Zs, G.ldh, TL, dh); // dP^T
            __syncwarp();
            for (int c = half * (TL / 2); c < (half + 1) * (TL / 2); c++) {
                const int t = i0 + c;
                float p = 0.0f, dd = 0.0f;
                if (j < T_ && sees(t, j, T_, o.window)) {
                    const float s = attn_score(Sw[r * G.lds + c], o);
                    p = expf(s - lse[c]);
                    dd = dot_grad(p, dPw[r * G.lds + c], dsum[c], s, o);
                }
                Pw[r * G.ldp + c] = __float2bfloat16_rn(p);
                dSw[r * G.ldp + c] = __float2bfloat16_rn(dd);
            }
            __syncwarp();
            mm_acc(dVw, G.ldo, Pw, G.ldp, Zs, G.ldh, TL, dh);
            mm_acc(dKw, G.ldo, dSw, G.ldp, Qs, G.ldh, TL, dh);
        }
    }
    __syncwarp();
    store_rows(dk + kv0, kstride, kw0, T_, dKw, G.ldo, nullptr, dh);
    store_rows(dv + kv0, kstride, kw0, T_, dVw, G.ldo, nullptr, dh);
}

// ---- backward, dQ: a block per (query tile, b*H + h); its rows of the stash are read
// before any of them is overwritten by dq ----
template <int NW>
__global__ void __launch_bounds__(NW * 32)
flash_bwd_dq_kernel(bf16 *dq, const unsigned char *stash, size_t sstride, const bf16 *dz, const bf16 *q,
                    const bf16 *k, const bf16 *v, int T_, int H, int Hkv, int dh, lp_attn_opts o) {
    LP_DYNAMIC_SHARED(uint4, smem);
    const geom G(NW, dh);
    const int TL = G.tl;
    bf16 *Qs = (bf16 *)smem, *Zs = Qs + TL * G.ldh, *Ks = Zs + TL * G.ldh, *Vs = Ks + TL * G.ldh;
    float *dQs = (float *)(Vs + TL * G.ldh), *Ss = dQs + TL * G.ldo, *dPs = Ss + TL * G.lds;
    bf16 *dSs = (bf16 *)(dPs + TL * G.lds);
    float *lse = (float *)(dSs + TL * G.ldp), *dsum = lse + TL;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, half = lane & 1;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * TL; // the longest rows first
    const int b = blockIdx.y / H, h = blockIdx.y % H, g = h / (H / Hkv);
    const size_t qstride = (size_t)H * dh, kstride = (size_t)Hkv * dh;
    const size_t q0off = ((size_t)b * T_ * H + h) * dh, kv0 = ((size_t)b * T_ * Hkv + g) * dh;
    const int tw0 = i0 + warp * 16, t = tw0 + r;
    float *Sw = Ss + warp * 16 * G.lds, *dPw = dPs + warp * 16 * G.lds, *dQw = dQs + warp * 16 * G.ldo;
    bf16 *dSw = dSs + warp * 16 * G.ldp;

    stage_rows(Qs, G.ldh, q + q0off, qstride, i0, TL, T_, dh);
    stage_rows(Zs, G.ldh, dz + q0off, qstride, i0, TL, T_, dh);
    for (int i = threadIdx.x; i < TL; i += blockDim.x) {
        const row_stats st = i0 + i < T_ ? stats_read(stash, sstride, ((size_t)b * T_ + i0 + i) * H + h)
                                         : row_stats{0.0f, 0.0f};
        lse[i] = st.lse, dsum[i] = st.dsum;
    }
    for (int i = lane; i < 16 * G.ldo; i += 32) dQw[i] = 0.0f;
    const int last = min(T_ - 1, i0 + TL - 1);
    for (int j0 = attn_first(i0, o.window) / TL * TL; j0 <= last; j0 += TL) {
        __syncthreads(); // the stats and Q, dZ are staged; the previous tile's readers are done
        stage_rows(Ks, G.ldh, k + kv0, kstride, j0, TL, T_, dh);
        stage_rows(Vs, G.ldh, v + kv0, kstride, j0, TL, T_, dh);
        __syncthreads();
        if (tw0 >= T_ || j0 > tw0 + 15 || j0 + TL - 1 < attn_first(tw0, o.window)) continue;
        mm_abt(Sw, G.lds, Qs + warp * 16 * G.ldh, G.ldh, Ks, G.ldh, TL, dh);
        mm_abt(dPw, G.lds, Zs + warp * 16 * G.ldh, G.ldh, Vs, G.ldh, TL, dh);
        __syncwarp();
        const int rr = warp * 16 + r;
        for (int c = half * (TL / 2); c < (half + 1) * (TL / 2); c++) {
            float dd = 0.0f;
            if (sees(t, j0 + c, T_, o.window)) {
                const float s = attn_score(Sw[r * G.lds + c], o);
                dd = dot_grad(expf(s - lse[rr]), dPw[r * G.lds + c], dsum[rr], s, o);
            }
            dSw[r * G.ldp + c] = __float2bfloat16_rn(dd);
        }
        __syncwarp();
        mm_acc(dQw, G.ldo, dSw, G.ldp, Ks, G.ldh, TL, dh);
    }
    __syncthreads(); // every thread's stats reads are done before rows of the stash become dq
    store_rows(dq + q0off, qstride, tw0, T_, dQw, G.ldo, nullptr, dh);
}

// Shared-memory bytes of each kernel (the layouts above).
size_t fwd_smem(int nw, int dh) {
    const geom G(nw, dh);
    return (size_t)G.tl * (3 * G.ldh + G.ldp) * sizeof(bf16) + (size_t)G.tl * (G.lds + G.ldo + 1) * sizeof(float);
}
size_t dkv_smem(int nw, int dh) {
    const geom G(nw, dh);
    return (size_t)G.tl * (4 * G.ldh + 2 * G.ldp) * sizeof(bf16) +
           (size_t)G.tl * (2 * G.ldo + 2 * G.lds + 2) * sizeof(float);
}
size_t dq_smem(int nw, int dh) {
    const geom G(nw, dh);
    return (size_t)G.tl * (4 * G.ldh + G.ldp) * sizeof(bf16) + (size_t)G.tl * (G.ldo + 2 * G.lds + 2) * sizeof(float);
}

template <int NW>
lp_status flash_fwd_launch(lp_ctx *c, void *z, const void *q, const void *k, const void *v, int B, int T_, int H,
                           int Hkv, int dh, lp_attn_opts o) {
    const size_t smem = fwd_smem(NW, dh);
    LP_CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_kernel<NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    const dim3 grid(ceil_div_u((size_t)T_, 16 * NW), (unsigned)(B * H));
    LP_LAUNCH(grid, NW * 32, smem, cuda_stream_of(c), flash_fwd_kernel<NW>)(
        (bf16 *)z, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, T_, H, Hkv, dh, o);
    LP_LAUNCH_CHECK("flash_fwd_kernel");
    return LP_OK;
}

template <int NW>
lp_status flash_bwd_launch(lp_ctx *c, void *dq, void *dk, void *dv, const unsigned char *stash, size_t stride,
                           const void *dz, const void *q, const void *k, const void *v, int B, int T_, int H, int Hkv,
                           int dh, lp_attn_opts o) {
    const unsigned tiles = ceil_div_u((size_t)T_, 16 * NW);
    const size_t s1 = dkv_smem(NW, dh), s2 = dq_smem(NW, dh);
    LP_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_dkv_kernel<NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)s1));
    LP_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_dq_kernel<NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)s2));
    LP_LAUNCH(dim3(tiles, (unsigned)(B * Hkv)), NW * 32, s1, cuda_stream_of(c), flash_bwd_dkv_kernel<NW>)(
        (bf16 *)dk, (bf16 *)dv, stash, stride, (const bf16 *)dz, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v,
        T_, H, Hkv, dh, o);
    LP_LAUNCH_CHECK("flash_bwd_dkv_kernel");
    LP_LAUNCH(dim3(tiles, (unsigned)(B * H)), NW * 32, s2, cuda_stream_of(c), flash_bwd_dq_kernel<NW>)(
        (bf16 *)dq, stash, stride, (const bf16 *)dz, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, T_, H, Hkv,
        dh, o);
    LP_LAUNCH_CHECK("flash_bwd_dq_kernel");
    return LP_OK;
}

} // namespace

// ---- entry points (ops_internal.h) ----

int cuda_flash_fits(const lp_ctx *c, int B, int T, int H, int dh, const void *const *bufs, int nbufs) {
    if (c->dtype != LP_BF16 || dh < 16 || dh > 256 || dh % 16 != 0) return 0;
    if ((long long)B * H > 65535 || T <= 0) return 0; // grid.y
    for (int i = 0; i < nbufs; i++)
        if ((uintptr_t)bufs[i] % 16) return 0; // the 16-byte loads and stores
    return 1;
}

lp_status cuda_flash_attention(lp_ctx *c, void *z, const void *q, const void *k, const void *v, int B, int T,
                                  int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    const lp_attn_opts o = attn_opts_of(cfg, dh);
    return dh > 128 ? flash_fwd_launch<2>(c, z, q, k, v, B, T, H, Hkv, dh, o)
                    : flash_fwd_launch<4>(c, z, q, k, v, B, T, H, Hkv, dh, o);
}

lp_status cuda_flash_attention_backward(lp_ctx *c, void *dq, void *dk, void *dv, const unsigned char *stash,
                                           size_t stride, const void *dz, const void *q, const void *k, const void *v,
                                           int B, int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    const lp_attn_opts o = attn_opts_of(cfg, dh);
    return dh > 128 ? flash_bwd_launch<2>(c, dq, dk, dv, stash, stride, dz, q, k, v, B, T, H, Hkv, dh, o)
                    : flash_bwd_launch<4>(c, dq, dk, dv, stash, stride, dz, q, k, v, B, T, H, Hkv, dh, o);
}
