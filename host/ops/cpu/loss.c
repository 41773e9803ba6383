/* loss.c: CPU reference of the per-row cross-entropy of logits against target ids. */
#include <math.h>

#include "ops/cpu/vmath.h"
#include "ops/ops_internal.h"

LP_VEC void cpu_cross_entropy(float *losses, const float *logits, const int32_t *targets, int N, int V) {
    // logits is (N,V); losses, targets are (N,); a negative target marks a row with no loss
    for (int n = 0; n < N; n++) {
        const float *r = logits + (size_t)n * V;
        if (targets[n] < 0) { losses[n] = 0; continue; }
        float mx = vmaxf(r, V);
        double sum = vexp_sum(NULL, r, mx, V);
        losses[n] = (float)(log(sum) + mx - r[targets[n]]);
    }
}
