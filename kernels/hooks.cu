// hooks.cu: what the hook machinery does to activations on the GPU: in-place edits
// (zero / mean-ablate / steer / patch) limited by position and head masks, and the
// gathering of selected positions for position-limited captures. Both address the
// activation through lp_view (ops.h): axes [B, P, H, E], E contiguous, stored in the
// order (b, p, h, e), or (b, h, p, e) when head_outer (attention patterns, scores).
//
// Both are grid-stride loops over the elements, decoding each memory index into
// (b, p, h, e). Copies (SET, PATCH, gather) move the stored value and so are exact.
#include "common.cuh"

static const unsigned kBlock = 256;

struct view_pos { size_t b; int p, h, e; };

// Memory index -> coordinates of a view [B, P, H, E] (P replaced by npos for a gather).
__device__ __forceinline__ view_pos decode_view(size_t i, int P, int H, int E, int head_outer) {
    view_pos r;
    r.e = (int)(i % E);
    size_t rest = i / E;
    if (head_outer) {
        r.p = (int)(rest % P); rest /= P;
        r.h = (int)(rest % H); rest /= H;
    } else {
        r.h = (int)(rest % H); rest /= H;
        r.p = (int)(rest % P); rest /= P;
    }
    r.b = rest;
    return r;
}

template <typename T>
__global__ void edit_kernel(T *act, size_t n, int P, int H, int E, int head_outer, int kind,
                            const T *src, float coef, const uint8_t *pos_mask,
                            const uint8_t *head_mask) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const view_pos r = decode_view(i, P, H, E, head_outer);
        if (pos_mask && !pos_mask[r.p]) continue;
        if (head_mask && !head_mask[r.h]) continue;
        const size_t he = (size_t)r.h * E + r.e; // index into a per-token [H,E] source
        switch (kind) {
        case LP_EDIT_ZERO: act[i] = lp_from_f<T>(0.0f); break;
        case LP_EDIT_SET: act[i] = src[he]; break;
        case LP_EDIT_ADD: act[i] = lp_from_f<T>(lp_to_f(act[i]) + coef * lp_to_f(src[he])); break;
        case LP_EDIT_PATCH: act[i] = src[i]; break;
        default: break;
        }
    }
}

// dst[b, k, h, e] (or [b, h, k, e]) = act at position pos[k]. A position outside 0..P-1
// (the host cannot check a device array) gives NaN instead of a read out of bounds.
template <typename T>
__global__ void gather_pos_kernel(T *dst, const T *act, size_t n, int P, int H, int E,
                                  int head_outer, const int32_t *pos, int npos) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const view_pos r = decode_view(i, npos, H, E, head_outer);
        const int p = pos[r.p];
        if (p < 0 || p >= P) {
            dst[i] = lp_from_f<T>(NAN);
            continue;
        }
        const size_t s = head_outer ? ((r.b * H + r.h) * P + p) * E + r.e
                                    : ((r.b * P + p) * H + r.h) * E + r.e;
        dst[i] = act[s];
    }
}

template <typename T>
static lp_status edit_launch(lp_ctx *c, void *act, lp_view v, size_t n, lp_edit_kind kind,
                             const void *src, float coef, const uint8_t *pos_mask,
                             const uint8_t *head_mask) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), edit_kernel<T>)(
        (T *)act, n, v.P, v.H, v.E, v.head_outer, (int)kind, (const T *)src, coef, pos_mask,
        head_mask);
    LP_LAUNCH_CHECK("edit_kernel");
    return LP_OK;
}

template <typename T>
static lp_status gather_launch(lp_ctx *c, void *dst, const void *act, lp_view v, size_t n,
                               const int32_t *pos, int npos) {
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), gather_pos_kernel<T>)(
        (T *)dst, (const T *)act, n, v.P, v.H, v.E, v.head_outer, pos, npos);
    LP_LAUNCH_CHECK("gather_pos_kernel");
    return LP_OK;
}

lp_status cuda_edit_apply(lp_ctx *c, void *act, lp_view v, lp_edit_kind kind, const void *src,
                             float coef, const uint8_t *pos_mask, const uint8_t *head_mask) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_edit_apply");
    LP_CUDA_REQUIRE(v.B >= 0 && v.P >= 0 && v.H >= 0 && v.E >= 0,
                    "cuda_edit_apply: negative view [%d, %d, %d, %d]", v.B, v.P, v.H, v.E);
    LP_CUDA_REQUIRE(kind >= LP_EDIT_ZERO && kind <= LP_EDIT_PATCH,
                    "cuda_edit_apply: unknown edit kind %d", (int)kind);
    const size_t n = (size_t)v.B * v.P * v.H * v.E;
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(act != NULL, "cuda_edit_apply: NULL activation");
    LP_CUDA_REQUIRE(kind == LP_EDIT_ZERO || src != NULL,
                    "cuda_edit_apply: edit kind %d needs a source", (int)kind);
    return c->dtype == LP_BF16
               ? edit_launch<__nv_bfloat16>(c, act, v, n, kind, src, coef, pos_mask, head_mask)
               : edit_launch<float>(c, act, v, n, kind, src, coef, pos_mask, head_mask);
}

lp_status cuda_gather_pos(lp_ctx *c, void *dst, const void *act, lp_view v, const int32_t *pos,
                             int npos) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_gather_pos");
    LP_CUDA_REQUIRE(v.B >= 0 && v.P >= 0 && v.H >= 0 && v.E >= 0 && npos >= 0,
                    "cuda_gather_pos: negative view [%d, %d, %d, %d] or npos %d", v.B, v.P, v.H,
                    v.E, npos);
    const size_t n = (size_t)v.B * npos * v.H * v.E;
    if (n == 0) return LP_OK;
    LP_CUDA_REQUIRE(dst && act && pos, "cuda_gather_pos: NULL buffer");
    return c->dtype == LP_BF16 ? gather_launch<__nv_bfloat16>(c, dst, act, v, n, pos, npos)
                               : gather_launch<float>(c, dst, act, v, n, pos, npos);
}

// out[r] = sum_i (a - b) * g over row r: one warp per row (rows are a position's or a head's
// values: dh, d_model or T*T of them), lanes striding the row so that loads coalesce, summed
// in double (the sums cancel: a clean and a corrupted activation differ little) and reduced
// across the warp. The backward calls it at each scored hook, so no gradient leaves the device.
template <typename T>
__global__ void diff_dot_rows_kernel(float *out, const T *a, const T *b, const T *g, size_t rows,
                                     size_t per) {
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (size_t r = (size_t)blockIdx.x * warps + (threadIdx.x >> 5); r < rows;
         r += (size_t)gridDim.x * warps) {
        const size_t o = r * per;
        double acc = 0;
        for (size_t i = lane; i < per; i += 32)
            acc += ((double)lp_to_f(a[o + i]) - (double)lp_to_f(b[o + i])) * (double)lp_to_f(g[o + i]);
#pragma unroll
        for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(LP_FULL_MASK, acc, s);
        if (lane == 0) out[r] = (float)acc;
    }
}

template <typename T>
static lp_status diff_dot_launch(lp_ctx *c, float *out, const void *a, const void *b,
                                 const void *g, size_t rows, size_t per) {
    LP_LAUNCH(grid_rows((long long)rows, kBlock / 32), kBlock, 0, cuda_stream_of(c),
              diff_dot_rows_kernel<T>)(out, (const T *)a, (const T *)b, (const T *)g, rows, per);
    LP_LAUNCH_CHECK("diff_dot_rows_kernel");
    return LP_OK;
}

lp_status cuda_diff_dot_rows(lp_ctx *c, float *out, const void *a, const void *b, const void *g,
                             size_t rows, size_t per) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_diff_dot_rows");
    if (rows == 0) return LP_OK;
    LP_CUDA_REQUIRE(out && a && b && g && per > 0, "cuda_diff_dot_rows: NULL buffer or empty rows");
    return c->dtype == LP_BF16 ? diff_dot_launch<__nv_bfloat16>(c, out, a, b, g, rows, per)
                               : diff_dot_launch<float>(c, out, a, b, g, rows, per);
}
