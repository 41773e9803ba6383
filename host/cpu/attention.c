/* attention.c: CPU reference of causal multi-head attention (with grouped kv heads).
 * The fused form keeps one score row at a time, so no [T,T] matrix exists unless a
 * hook asks for hook_attn_scores or hook_pattern, which use the three-step form. */
#include <math.h>

#include "ops_internal.h"

/* q (B,T,H,dh); k (B,T,Hkv,dh): the dot product of query t of head h with key s */
static inline float qk(const float *q, const float *k, int b, int t, int s, int h, int T, int H,
                       int Hkv, int dh) {
    const float *qr = q + (((size_t)b * T + t) * H + h) * dh;
    const float *kr = k + (((size_t)b * T + s) * Hkv + h / (H / Hkv)) * dh;
    float acc = 0;
    for (int i = 0; i < dh; i++) acc += qr[i] * kr[i];
    return acc;
}

void lp_cpu_attention(float *z, const float *q, const float *k, const float *v, int B, int T, int H,
                      int Hkv, int dh) {
    const float scale = 1.0f / sqrtf((float)dh);
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            float row[T > 0 ? T : 1];
            for (int t = 0; t < T; t++) {
                float mx = -INFINITY;
                for (int s = 0; s <= t; s++) {
                    row[s] = qk(q, k, b, t, s, h, T, H, Hkv, dh) * scale;
                    if (row[s] > mx) mx = row[s];
                }
                float sum = 0;
                for (int s = 0; s <= t; s++) sum += (row[s] = expf(row[s] - mx));
                float *zr = z + (((size_t)b * T + t) * H + h) * dh;
                for (int i = 0; i < dh; i++) zr[i] = 0;
                for (int s = 0; s <= t; s++) {
                    const float *vr = v + (((size_t)b * T + s) * Hkv + h / (H / Hkv)) * dh;
                    float p = row[s] / sum;
                    for (int i = 0; i < dh; i++) zr[i] += p * vr[i];
                }
            }
        }
}

void lp_cpu_attn_scores(float *scores, const float *q, const float *k, int B, int T, int H, int Hkv,
                        int dh) {
    // scores is (B,H,T,T)
    const float scale = 1.0f / sqrtf((float)dh);
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                float *row = scores + (((size_t)b * H + h) * T + t) * T;
                for (int s = 0; s < T; s++) row[s] = s <= t ? qk(q, k, b, t, s, h, T, H, Hkv, dh) * scale : -INFINITY;
            }
}

void lp_cpu_softmax_rows(float *out, const float *x, size_t rows, int cols) {
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *o = out + r * cols;
        float mx = -INFINITY;
        for (int i = 0; i < cols; i++)
            if (xr[i] > mx) mx = xr[i];
        if (mx == -INFINITY) { /* fully masked row: nothing to attend to */
            for (int i = 0; i < cols; i++) o[i] = 0;
            continue;
        }
        double sum = 0;
        for (int i = 0; i < cols; i++) sum += (o[i] = expf(xr[i] - mx));
        float inv = (float)(1.0 / sum);
        for (int i = 0; i < cols; i++) o[i] *= inv;
    }
}

void lp_cpu_attn_apply(float *z, const float *pattern, const float *v, int B, int T, int H, int Hkv,
                       int dh) {
    // z is (B,T,H,dh); pattern is (B,H,T,T); v is (B,T,Hkv,dh). Keys after t have weight 0
    // in an unedited pattern; an edited one is applied as given, over all keys.
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *p = pattern + (((size_t)b * H + h) * T + t) * T;
                float *zr = z + (((size_t)b * T + t) * H + h) * dh;
                for (int i = 0; i < dh; i++) zr[i] = 0;
                for (int s = 0; s < T; s++) {
                    if (p[s] == 0.0f) continue;
                    const float *vr = v + (((size_t)b * T + s) * Hkv + h / (H / Hkv)) * dh;
                    for (int i = 0; i < dh; i++) zr[i] += p[s] * vr[i];
                }
            }
}
