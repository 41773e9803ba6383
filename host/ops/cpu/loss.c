/* loss.c: CPU reference of the per-row cross-entropy of logits against target ids. */
#include <math.h>

#include "ops/ops_internal.h"

void lp_cpu_cross_entropy(float *losses, const float *logits, const int32_t *targets, int N, int V) {
    // logits is (N,V); losses, targets are (N,); a negative target marks a row with no loss
    for (int n = 0; n < N; n++) {
        const float *r = logits + (size_t)n * V;
        if (targets[n] < 0) { losses[n] = 0; continue; }
        float mx = -INFINITY;
        for (int i = 0; i < V; i++)
            if (r[i] > mx) mx = r[i];
        double sum = 0;
        for (int i = 0; i < V; i++) sum += exp((double)r[i] - mx);
        losses[n] = (float)(log(sum) + mx - r[targets[n]]);
    }
}
