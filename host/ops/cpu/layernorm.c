/* layernorm.c: CPU reference of LayerNorm, split as TransformerLens hooks it:
 * hook_scale = sqrt(var + eps), hook_normalized = (x - mean) / scale, then the affine. */
#include <math.h>

#include "ops/ops_internal.h"

void cpu_ln_scale(float *scale, const float *x, int N, int D, float eps) {
    // x is (N,D); scale is (N,). Two passes in double: exact enough for rows with a large mean.
    for (int n = 0; n < N; n++) {
        const float *r = x + (size_t)n * D;
        double mean = 0, var = 0;
        for (int d = 0; d < D; d++) mean += r[d];
        mean /= D;
        for (int d = 0; d < D; d++) var += (r[d] - mean) * (r[d] - mean);
        scale[n] = (float)sqrt(var / D + eps);
    }
}

void cpu_ln_apply(float *out, const float *x, const float *scale, const float *w, const float *b,
                     int N, int D) {
    // out, x are (N,D); scale is (N,); w, b are (D,) or NULL (normalize only)
    for (int n = 0; n < N; n++) {
        const float *r = x + (size_t)n * D;
        float *o = out + (size_t)n * D;
        double mean = 0;
        for (int d = 0; d < D; d++) mean += r[d];
        mean /= D;
        float inv = 1.0f / scale[n];
        for (int d = 0; d < D; d++) {
            float v = (float)(r[d] - mean) * inv;
            o[d] = w ? v * w[d] + (b ? b[d] : 0.0f) : v;
        }
    }
}
