// attention.cu: causal self-attention, fused and in the three hookable steps (ops.h).
//
// Layouts: q and z are [B,T,H,dh]; k and v are [B,T,Hkv,dh]; scores and pattern are
// [B,H,T,T]. Query head h reads kv head h / (H/Hkv) (GQA; Hkv == H for GPT-2). The options
// of lp_attn_cfg (lp_attn_opts, common.cuh): a score scale, Gemma 2's soft-cap of the scaled
// score, and a sliding window, whose keys before the window's start a row never visits.
//
// Every kernel gives one warp one (b, h, query) row, and lanes split the work two ways:
//   scores: lane j owns key j (mod 32) and forms the whole dot product q.k_j, with q
//           staged in shared memory so every lane reads it by broadcast;
//   values: lane l owns dims l, l+32, ... (up to 8 per lane, so dh <= 256) and walks the
//           keys, taking each key's weight from the lane that scored it (__shfl_sync).
// cuda_attention keeps a running max and sum per row (online softmax), one chunk of 32
// keys at a time, so the [T,T] matrix never exists and no scratch memory is needed. All
// accumulation is fp32; outputs are rounded once on the store. Warps of a block take
// neighbouring queries of one (b, h), so they share K/V rows through L1, and the longest
// rows (late queries) are scheduled first.
#include "common.cuh"

static const int kWarps = 4; // rows (warps) per block
static const int kMaxDh = 256;

// q.k over dh with q in shared memory (broadcast) and k a row in global memory.
template <typename T>
__device__ __forceinline__ float dot_qk(const float *qs, const T *kr, int dh) {
    float s = 0.0f;
    for (int d = 0; d < dh; d++) s = fmaf(qs[d], lp_to_f(kr[d]), s);
    return s;
}

// Decodes a warp's row into (b, h, t), t counted from the end so long rows start first.
struct row_idx { int b, h, t; };
__device__ __forceinline__ row_idx decode_row(long long row, int T_, int H, bool reverse_t) {
    row_idx r;
    const int tt = (int)(row % T_);
    const long long bh = row / T_;
    r.t = reverse_t ? T_ - 1 - tt : tt;
    r.h = (int)(bh % H);
    r.b = (int)(bh / H);
    return r;
}

// ---- fused: z = softmax(cap(q k^T * scale), causal or windowed) v ----
// Also attention against a KV cache (cuda_attention_cached): q holds Tq queries at
// positions pos0 .. pos0+Tq-1, k and v are caches of Tcap positions, and query i reads keys
// first .. pos0+i (first = 0, or the start of its window, in absolute positions). The plain
// fused case is Tq = Tcap = T, pos0 = 0. A row's arithmetic does not depend on Tq or on the
// launch, so decoding token by token reproduces a full pass bit for bit.
template <typename T, int DPL>
__global__ void
attention_kernel(T *z, const T *q, const T *k, const T *v, int B, int Tq, int Tcap, int pos0, int H, int Hkv,
                 int dh, lp_attn_opts o) {
    LP_DYNAMIC_SHARED(float, smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *qs = smem + warp * dh;
    const long long rows = (long long)B * H * Tq;
    const int group = H / Hkv;
    const size_t kv_stride = (size_t)Hkv * dh; // between consecutive keys

    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows;
         row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, Tq, H, true);
        const int tq = pos0 + r.t; // the last key this query sees
        const size_t qoff = (((size_t)r.b * Tq + r.t) * H + r.h) * dh;
        __syncwarp(); // the previous row's readers of qs are done
        for (int d = lane; d < dh; d += 32) qs[d] = lp_to_f(q[qoff + d]);
        __syncwarp();

        const size_t kv0 = ((size_t)r.b * Tcap * Hkv + r.h / group) * dh; // key 0 of this kv head
        const T *kb = k + kv0;
        const T *vb = v + kv0;
        float m = -INFINITY, l = 0.0f, acc[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] = 0.0f;

        for (int j0 = attn_first(tq, o.window); j0 <= tq; j0 += 32) {
            const int j = j0 + lane;
            const bool live = j <= tq;
            const float s = live ? attn_score(dot_qk(qs, kb + (size_t)j * kv_stride, dh), o) : -INFINITY;
            // Lane 0's key (first <= j0 <= tq) is always live, so m_new is finite and no exp sees
            // inf - inf. On the first chunk m = -inf and corr = exp(-inf) = 0.
            const float m_new = fmaxf(m, warp_max(s));
            const float corr = expf(m - m_new);
            const float p = live ? expf(s - m_new) : 0.0f;
            l = l * corr + warp_sum(p);
#pragma unroll
            for (int i = 0; i < DPL; i++) acc[i] *= corr;
            const int cnt = min(32, tq - j0 + 1); // the same in every lane
#pragma unroll 4
            for (int jj = 0; jj < cnt; jj++) {
                const float pj = __shfl_sync(LP_FULL_MASK, p, jj);
                const T *vr = vb + (size_t)(j0 + jj) * kv_stride;
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    const int d = lane + 32 * i;
                    if (d < dh) acc[i] = fmaf(pj, lp_to_f(vr[d]), acc[i]);
                }
            }
            m = m_new;
        }
        const float inv = 1.0f / l; // l >= 1: the max key contributes exp(0)
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < dh) z[qoff + d] = lp_from_f<T>(acc[i] * inv);
        }
    }
}

// ---- scores[b,h,i,j] = cap(q_i . k_j * scale), exactly -inf where j > i or j is before the window ----
template <typename T>
__global__ void
attn_scores_kernel(T *scores, const T *q, const T *k, int B, int T_, int H, int Hkv, int dh,
                   lp_attn_opts o) {
    LP_DYNAMIC_SHARED(float, smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *qs = smem + warp * dh;
    const long long rows = (long long)B * H * T_;
    const int group = H / Hkv;
    const size_t kv_stride = (size_t)Hkv * dh;

    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows;
         row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, T_, H, false);
        const size_t qoff = (((size_t)r.b * T_ + r.t) * H + r.h) * dh;
        __syncwarp();
        for (int d = lane; d < dh; d += 32) qs[d] = lp_to_f(q[qoff + d]);
        __syncwarp();
        const T *kb = k + ((size_t)r.b * T_ * Hkv + r.h / group) * dh;
        T *out = scores + (size_t)row * T_; // row == (b*H + h)*T + t when not reversed
        const int first = attn_first(r.t, o.window);
        for (int j = lane; j < T_; j += 32) {
            const float s = j <= r.t && j >= first ? attn_score(dot_qk(qs, kb + (size_t)j * kv_stride, dh), o)
                                                   : -INFINITY;
            out[j] = lp_from_f<T>(s);
        }
    }
}

// ---- out = softmax over the last axis; a row of only -inf gives zeros ----
// Three passes (max, sum, write) over a row read from global memory (L1/L2 hits after the
// first); each lane reads an element before writing it, so out may alias x.
template <typename T>
__global__ void softmax_rows_kernel(T *out, const T *x, size_t rows, int cols) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (size_t row = (size_t)blockIdx.x * kWarps + warp; row < rows;
         row += (size_t)gridDim.x * kWarps) {
        const T *xr = x + row * cols;
        T *yr = out + row * cols;
        float m = -INFINITY;
        for (int j = lane; j < cols; j += 32) m = fmaxf(m, lp_to_f(xr[j]));
        m = warp_max(m);
        if (m == -INFINITY) { // every key masked: no distribution, and no NaN either
            for (int j = lane; j < cols; j += 32) yr[j] = lp_from_f<T>(0.0f);
            continue;
        }
        float s = 0.0f;
        for (int j = lane; j < cols; j += 32) s += expf(lp_to_f(xr[j]) - m);
        s = warp_sum(s);
        for (int j = lane; j < cols; j += 32) yr[j] = lp_from_f<T>(expf(lp_to_f(xr[j]) - m) / s);
    }
}

// ---- z[b,i,h,:] = sum_j pattern[b,h,i,j] v[b,j,h/group,:] ----
// The sum runs over all T keys as the contract (pattern @ v) says, so an edited pattern
// with weight above the diagonal is honoured; chunks of 32 keys whose weights are all zero
// (the causal upper triangle) are skipped.
template <typename T, int DPL>
__global__ void
attn_apply_kernel(T *z, const T *pattern, const T *v, int B, int T_, int H, int Hkv, int dh) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long rows = (long long)B * H * T_;
    const int group = H / Hkv;
    const size_t kv_stride = (size_t)Hkv * dh;

    for (long long row = (long long)blockIdx.x * kWarps + warp; row < rows;
         row += (long long)gridDim.x * kWarps) {
        const row_idx r = decode_row(row, T_, H, false);
        const T *pr = pattern + (size_t)row * T_;
        const T *vb = v + ((size_t)r.b * T_ * Hkv + r.h / group) * dh;
        float acc[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] = 0.0f;
        for (int j0 = 0; j0 < T_; j0 += 32) {
            const int j = j0 + lane;
            const float p = j < T_ ? lp_to_f(pr[j]) : 0.0f;
            if (!__any_sync(LP_FULL_MASK, p != 0.0f)) continue;
            const int cnt = min(32, T_ - j0);
#pragma unroll 4
            for (int jj = 0; jj < cnt; jj++) {
                const float pj = __shfl_sync(LP_FULL_MASK, p, jj);
                const T *vr = vb + (size_t)(j0 + jj) * kv_stride;
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    const int d = lane + 32 * i;
                    if (d < dh) acc[i] = fmaf(pj, lp_to_f(vr[d]), acc[i]);
                }
            }
        }
        const size_t zoff = (((size_t)r.b * T_ + r.t) * H + r.h) * dh;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < dh) z[zoff + d] = lp_from_f<T>(acc[i]);
        }
    }
}

// ---- launchers ----

template <typename T, int DPL>
static lp_status attention_launch(lp_ctx *c, void *z, const void *q, const void *k, const void *v,
                                  int B, int Tq, int Tcap, int pos0, int H, int Hkv, int dh, lp_attn_opts o) {
    const long long rows = (long long)B * H * Tq;
    const size_t smem = (size_t)kWarps * dh * sizeof(float);
    LP_LAUNCH(grid_rows(rows, kWarps), kWarps * 32, smem, cuda_stream_of(c), attention_kernel<T, DPL>)(
        (T *)z, (const T *)q, (const T *)k, (const T *)v, B, Tq, Tcap, pos0, H, Hkv, dh, o);
    LP_LAUNCH_CHECK("attention_kernel");
    return LP_OK;
}

template <typename T>
static lp_status attention_dispatch(lp_ctx *c, void *z, const void *q, const void *k,
                                    const void *v, int B, int Tq, int Tcap, int pos0, int H, int Hkv, int dh,
                                    lp_attn_opts o) {
#define LAUNCH(DPL) attention_launch<T, DPL>(c, z, q, k, v, B, Tq, Tcap, pos0, H, Hkv, dh, o)
    if (dh <= 32) return LAUNCH(1);
    if (dh <= 64) return LAUNCH(2);
    if (dh <= 128) return LAUNCH(4);
    return LAUNCH(8);
#undef LAUNCH
}

template <typename T>
static lp_status attn_scores_launch(lp_ctx *c, void *scores, const void *q, const void *k, int B,
                                    int T_, int H, int Hkv, int dh, lp_attn_opts o) {
    const long long rows = (long long)B * H * T_;
    const size_t smem = (size_t)kWarps * dh * sizeof(float);
    LP_LAUNCH(grid_rows(rows, kWarps), kWarps * 32, smem, cuda_stream_of(c), attn_scores_kernel<T>)(
        (T *)scores, (const T *)q, (const T *)k, B, T_, H, Hkv, dh, o);
    LP_LAUNCH_CHECK("attn_scores_kernel");
    return LP_OK;
}

template <typename T>
static lp_status softmax_rows_launch(lp_ctx *c, void *out, const void *x, size_t rows, int cols) {
    LP_LAUNCH(grid_rows((long long)rows, kWarps), kWarps * 32, 0, cuda_stream_of(c), softmax_rows_kernel<T>)(
        (T *)out, (const T *)x, rows, cols);
    LP_LAUNCH_CHECK("softmax_rows_kernel");
    return LP_OK;
}

template <typename T, int DPL>
static lp_status attn_apply_launch(lp_ctx *c, void *z, const void *pattern, const void *v, int B,
                                   int T_, int H, int Hkv, int dh) {
    const long long rows = (long long)B * H * T_;
    LP_LAUNCH(grid_rows(rows, kWarps), kWarps * 32, 0, cuda_stream_of(c), attn_apply_kernel<T, DPL>)(
        (T *)z, (const T *)pattern, (const T *)v, B, T_, H, Hkv, dh);
    LP_LAUNCH_CHECK("attn_apply_kernel");
    return LP_OK;
}

template <typename T>
static lp_status attn_apply_dispatch(lp_ctx *c, void *z, const void *pattern, const void *v, int B,
                                     int T_, int H, int Hkv, int dh) {
    if (dh <= 32) return attn_apply_launch<T, 1>(c, z, pattern, v, B, T_, H, Hkv, dh);
    if (dh <= 64) return attn_apply_launch<T, 2>(c, z, pattern, v, B, T_, H, Hkv, dh);
    if (dh <= 128) return attn_apply_launch<T, 4>(c, z, pattern, v, B, T_, H, Hkv, dh);
    return attn_apply_launch<T, 8>(c, z, pattern, v, B, T_, H, Hkv, dh);
}

// Shape checks shared by the attention entry points.
static lp_status check_attn_shape(const char *op, int B, int T_, int H, int Hkv, int dh) {
    LP_CUDA_REQUIRE(B >= 0 && T_ >= 0, "%s: negative size B=%d T=%d", op, B, T_);
    LP_CUDA_REQUIRE(H >= 1 && Hkv >= 1 && H % Hkv == 0,
                    "%s: H=%d must be a positive multiple of Hkv=%d", op, H, Hkv);
    LP_CUDA_REQUIRE(dh >= 1 && dh <= kMaxDh, "%s: head dim %d outside 1..%d", op, dh, kMaxDh);
    return LP_OK;
}

// ---- entry points ----

lp_status cuda_attention(lp_ctx *c, void *z, const void *q, const void *k, const void *v, int B,
                            int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_attention");
    LP_CHECK(check_attn_shape("cuda_attention", B, T, H, Hkv, dh));
    if ((long long)B * T == 0) return LP_OK;
    LP_CUDA_REQUIRE(z && q && k && v, "cuda_attention: NULL buffer");
    const void *bufs[4] = {z, q, k, v};
    if (cuda_flash_fits(c, B, T, H, dh, bufs, 4)) // tensor cores (attention_flash.cu)
        return cuda_flash_attention(c, z, q, k, v, B, T, H, Hkv, dh, cfg);
    const lp_attn_opts o = attn_opts_of(cfg, dh);
    return c->dtype == LP_BF16 ? attention_dispatch<__nv_bfloat16>(c, z, q, k, v, B, T, T, 0, H, Hkv, dh, o)
                               : attention_dispatch<float>(c, z, q, k, v, B, T, T, 0, H, Hkv, dh, o);
}

lp_status cuda_attention_cached(lp_ctx *c, void *z, const void *q, const void *kc, const void *vc,
                                   int B, int Tq, int Tcap, int pos0, int H, int Hkv, int dh,
                                   const lp_attn_cfg *cfg) {
    const char *op = "cuda_attention_cached";
    LP_CUDA_REQUIRE_CTX(c, op);
    LP_CUDA_REQUIRE(B >= 0 && Tq >= 0 && Tcap >= 0 && pos0 >= 0,
                    "%s: negative size B=%d Tq=%d Tcap=%d pos0=%d", op, B, Tq, Tcap, pos0);
    LP_CUDA_REQUIRE((long long)pos0 + Tq <= Tcap, "%s: positions %d .. %lld do not fit a cache of %d",
                    op, pos0, (long long)pos0 + Tq - 1, Tcap);
    LP_CUDA_REQUIRE(H >= 1 && Hkv >= 1 && H % Hkv == 0,
                    "%s: H=%d must be a positive multiple of Hkv=%d", op, H, Hkv);
    LP_CUDA_REQUIRE(dh >= 1 && dh <= kMaxDh, "%s: head dim %d outside 1..%d", op, dh, kMaxDh);
    if ((long long)B * Tq == 0) return LP_OK;
    LP_CUDA_REQUIRE(z && q && kc && vc, "%s: NULL buffer", op);
    const lp_attn_opts o = attn_opts_of(cfg, dh);
    return c->dtype == LP_BF16 ? attention_dispatch<__nv_bfloat16>(c, z, q, kc, vc, B, Tq, Tcap, pos0, H, Hkv, dh, o)
                               : attention_dispatch<float>(c, z, q, kc, vc, B, Tq, Tcap, pos0, H, Hkv, dh, o);
}

lp_status cuda_attn_scores(lp_ctx *c, void *scores, const void *q, const void *k, int B, int T,
                              int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_attn_scores");
    LP_CHECK(check_attn_shape("cuda_attn_scores", B, T, H, Hkv, dh));
    if ((long long)B * T == 0) return LP_OK;
    LP_CUDA_REQUIRE(scores && q && k, "cuda_attn_scores: NULL buffer");
    const lp_attn_opts o = attn_opts_of(cfg, dh);
    return c->dtype == LP_BF16
               ? attn_scores_launch<__nv_bfloat16>(c, scores, q, k, B, T, H, Hkv, dh, o)
               : attn_scores_launch<float>(c, scores, q, k, B, T, H, Hkv, dh, o);
}

lp_status cuda_softmax_rows(lp_ctx *c, void *out, const void *x, size_t rows, int cols) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_softmax_rows");
    LP_CUDA_REQUIRE(cols >= 0, "cuda_softmax_rows: negative cols %d", cols);
    if (rows == 0 || cols == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && x, "cuda_softmax_rows: NULL buffer");
    return c->dtype == LP_BF16 ? softmax_rows_launch<__nv_bfloat16>(c, out, x, rows, cols)
                               : softmax_rows_launch<float>(c, out, x, rows, cols);
}

lp_status cuda_attn_apply(lp_ctx *c, void *z, const void *pattern, const void *v, int B, int T,
                             int H, int Hkv, int dh) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_attn_apply");
    LP_CHECK(check_attn_shape("cuda_attn_apply", B, T, H, Hkv, dh));
    if ((long long)B * T == 0) return LP_OK;
    LP_CUDA_REQUIRE(z && pattern && v, "cuda_attn_apply: NULL buffer");
    return c->dtype == LP_BF16
               ? attn_apply_dispatch<__nv_bfloat16>(c, z, pattern, v, B, T, H, Hkv, dh)
               : attn_apply_dispatch<float>(c, z, pattern, v, B, T, H, Hkv, dh);
}
