/* elementwise.c: CPU references of the row-wise and element-wise ops
 * (embedding lookups, residual add, GELU, per-column affine). */
#include <math.h>
#include <string.h>

#include "ops/cpu/vmath.h"
#include "ops/ops_internal.h"

void cpu_embed(float *out, const int32_t *tok, const float *wte, int N, int D) {
    // out is (N,D); wte is (V,D); tok is (N,)
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * D, wte + (size_t)tok[n] * D, D * sizeof(float));
}

void cpu_pos_embed(float *out, const float *wpe, int B, int T, int D) {
    // out is (B,T,D); wpe is (>=T, D)
    for (int b = 0; b < B; b++) memcpy(out + (size_t)b * T * D, wpe, (size_t)T * D * sizeof(float));
}

void cpu_add(float *out, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* 0.5 v (1 + tanh(u)) written as v sigmoid(2u): the same function, without the cancellation
 * of 1 + tanh(u) in the negative tail, and in a form whose loop vectorizes. */
LP_VEC void cpu_gelu(float *out, const float *x, size_t n) {
    const float s2 = 2 * 0.7978845608028654f; /* 2 sqrt(2/pi) */
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        out[i] = v * vsigmoidf(s2 * (v + 0.044715f * v * v * v));
    }
}

void cpu_affine(float *out, const float *x, const float *w, const float *b, int N, int D) {
    // out, x are (N,D); w, b are (D,)
    for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++) {
            size_t i = (size_t)n * D + d;
            out[i] = x[i] * w[d] + (b ? b[d] : 0.0f);
        }
}
