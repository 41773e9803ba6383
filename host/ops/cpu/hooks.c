/* hooks.c: CPU reference of the hook-site ops: the built-in edits (zero, set, add,
 * patch) limited to positions and heads, position-limited gathers for captures, and the
 * per-node sums of attribution patching (lp_diff_dot_rows).
 * See lp_view in include/loupe/ops.h for how a hook activation is addressed. */
#include <string.h>

#include "ops/ops_internal.h"

/* offset of element (b, p, h, 0) in a view with P positions */
static inline size_t view_off(lp_view v, int P, int b, int p, int h) {
    return v.head_outer ? (((size_t)b * v.H + h) * P + p) * v.E : (((size_t)b * P + p) * v.H + h) * v.E;
}

void cpu_edit_apply(float *act, lp_view v, lp_edit_kind kind, const float *src, float coef,
                       const uint8_t *pos_mask, const uint8_t *head_mask) {
    for (int b = 0; b < v.B; b++)
        for (int p = 0; p < v.P; p++) {
            if (pos_mask && !pos_mask[p]) continue;
            for (int h = 0; h < v.H; h++) {
                if (head_mask && !head_mask[h]) continue;
                size_t o = view_off(v, v.P, b, p, h);
                float *a = act + o;
                for (int e = 0; e < v.E; e++) {
                    switch (kind) {
                    case LP_EDIT_ZERO: a[e] = 0; break;
                    case LP_EDIT_SET: a[e] = src[(size_t)h * v.E + e]; break;
                    case LP_EDIT_ADD: a[e] += coef * src[(size_t)h * v.E + e]; break;
                    case LP_EDIT_PATCH: a[e] = src[o + e]; break;
                    }
                }
            }
        }
}

void cpu_gather_pos(float *dst, const float *act, lp_view v, const int32_t *pos, int npos) {
    for (int b = 0; b < v.B; b++)
        for (int i = 0; i < npos; i++)
            for (int h = 0; h < v.H; h++)
                memcpy(dst + view_off(v, npos, b, i, h), act + view_off(v, v.P, b, pos[i], h),
                       v.E * sizeof(float));
}

void cpu_diff_dot_rows(float *out, const float *a, const float *b, const float *g, size_t rows, size_t per) {
    for (size_t r = 0; r < rows; r++) {
        const float *ar = a + r * per, *br = b + r * per, *gr = g + r * per;
        double acc = 0;
        for (size_t i = 0; i < per; i++) acc += ((double)ar[i] - br[i]) * gr[i];
        out[r] = (float)acc;
    }
}
