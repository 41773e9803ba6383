/* llama.c: CPU references of the Llama-family ops (ops.h, "Llama family"): RMSNorm split
 * as TransformerLens hooks it (hook_scale, hook_normalized, then the weight), rotary
 * position embedding in the rotate-half form, the SwiGLU product, and attention against
 * a KV cache for generation. All fp32 in and out; reductions accumulate in double. */
#include <math.h>

#include "ops/cpu/vmath.h"
#include "ops/ops_internal.h"

void cpu_rms_scale(float *scale, const float *x, int N, int D, float eps) {
    // x is (N,D); scale is (N,) = sqrt(mean(x^2) + eps)
    for (int n = 0; n < N; n++) {
        const float *r = x + (size_t)n * D;
        double ss = 0;
        for (int d = 0; d < D; d++) ss += (double)r[d] * r[d];
        scale[n] = (float)sqrt(ss / D + eps);
    }
}

void cpu_rms_apply(float *out, const float *x, const float *scale, const float *w, int N, int D) {
    // out, x are (N,D); scale is (N,); w is (D,) or NULL (normalize only). out may alias x.
    for (int n = 0; n < N; n++) {
        const float *r = x + (size_t)n * D;
        float *o = out + (size_t)n * D;
        for (int d = 0; d < D; d++) {
            float v = r[d] / scale[n];
            o[d] = w ? v * w[d] : v;
        }
    }
}

void cpu_rope(float *out, const float *x, const float *cos_t, const float *sin_t, int B, int T, int H,
                 int dh, int pos0) {
    // out, x are (B,T,H,dh); cos_t, sin_t are (n_pos, dh/2). Both halves of a pair are read
    // before either is written, so out may alias x.
    const int half = dh / 2;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *c = cos_t + (size_t)(pos0 + t) * half, *s = sin_t + (size_t)(pos0 + t) * half;
            for (int h = 0; h < H; h++) {
                size_t off = (((size_t)b * T + t) * H + h) * dh;
                for (int i = 0; i < half; i++) {
                    float x1 = x[off + i], x2 = x[off + i + half];
                    out[off + i] = x1 * c[i] - x2 * s[i];
                    out[off + i + half] = x2 * c[i] + x1 * s[i];
                }
            }
        }
}

LP_VEC void cpu_silu_mul(float *out, const float *gate, const float *up, size_t n) {
    // out may alias gate or up: each element is read before it is written
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + vexpf(-g)) * up[i];
    }
}

void cpu_attention_cached(float *z, const float *q, const float *kc, const float *vc, int B, int Tq,
                             int Tcap, int pos0, int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    // z, q are (B,Tq,H,dh); kc, vc are (B,Tcap,Hkv,dh) caches. Query i sits at position
    // pos0 + i and attends keys first .. pos0 + i (first = 0, or the start of cfg's window),
    // with the scores scaled and capped as cpu_attention does. One pass over the keys per query with a
    // running max and sum (online softmax): no score row is stored, so nothing is allocated
    // and a decode step (Tq = 1) costs O(pos0 * dh) per head. The running accumulator is
    // at most 256 floats (dh <= 256, checked by the dispatch) on the stack.
    const float scale = cfg->scale > 0 ? cfg->scale : 1.0f / sqrtf((float)dh), cap = cfg->softcap;
    const int group = H / Hkv;
    for (int b = 0; b < B; b++)
        for (int i = 0; i < Tq; i++)
            for (int h = 0; h < H; h++) {
                const float *qr = q + (((size_t)b * Tq + i) * H + h) * dh;
                float *zr = z + (((size_t)b * Tq + i) * H + h) * dh;
                float acc[dh];
                float m = -INFINITY, l = 0;
                for (int d = 0; d < dh; d++) acc[d] = 0;
                for (int s = attn_first_key(cfg, pos0 + i); s <= pos0 + i; s++) {
                    const float *kr = kc + (((size_t)b * Tcap + s) * Hkv + h / group) * dh;
                    const float *vr = vc + (((size_t)b * Tcap + s) * Hkv + h / group) * dh;
                    float sc = 0;
                    for (int d = 0; d < dh; d++) sc += qr[d] * kr[d];
                    sc *= scale;
                    if (cap > 0) sc = cap * tanhf(sc / cap);
                    if (sc > m) { /* new max: rescale what was summed so far (exp(-inf) = 0 at first) */
                        float corr = expf(m - sc);
                        l *= corr;
                        for (int d = 0; d < dh; d++) acc[d] *= corr;
                        m = sc;
                    }
                    float p = expf(sc - m);
                    l += p;
                    for (int d = 0; d < dh; d++) acc[d] += p * vr[d];
                }
                for (int d = 0; d < dh; d++) zr[d] = acc[d] / l; /* l >= 1: the max key gives exp(0) */
            }
}
