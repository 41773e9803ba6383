/* gemma.c: CPU references of the Gemma-family element-wise ops (ops.h, "Gemma family"):
 * the GeGLU product of Gemma's MLP, the soft-cap of Gemma 2's final logits, and a scalar
 * scale (the embedding times sqrt(d_model)). fp32 in and out; each element is read before
 * it is written, so out may alias an input. (Their backward ops are in backward.c.) */
#include <math.h>

#include "ops/cpu/vmath.h"
#include "ops/ops_internal.h"

LP_VEC void cpu_gelu_mul(float *out, const float *gate, const float *up, size_t n) {
    // gelu_tanh(g) * u, gelu_tanh exactly as cpu_gelu writes it
    const float s2 = 2 * 0.7978845608028654f; /* 2 sqrt(2/pi) */
    for (size_t i = 0; i < n; i++) {
        float g = gate[i], u = up[i];
        out[i] = g * vsigmoidf(s2 * (g + 0.044715f * g * g * g)) * u;
    }
}

void cpu_softcap(float *out, const float *x, float cap, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = cap * tanhf(x[i] / cap);
}

void cpu_scale(float *out, const float *x, float s, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = x[i] * s;
}
