/* sae_track.c: CPU twins of the training bookkeeping of include/loupe/sae_track.h: the
 * loops the trainer ran on the host over values it had read back, now over the buffers
 * themselves (on the CPU the device is the host). The CUDA twins: kernels/sae_track.cu. */
#include <stdint.h>
#include <stdlib.h>

#include "ops/ops_internal.h"
#include "ops/sae_track_internal.h"

void cpu_sae_dead_update(int64_t *since, int32_t *cand, double *trk, const int64_t *counts, int S, int64_t tokens,
                         int64_t window) {
    int64_t fired = 0, n_dead = 0, most = 0;
    for (int s = 0; s < S; s++) {
        fired += counts[s];
        const int64_t v = counts[s] ? 0 : since[s] + tokens;
        since[s] = v;
        if (v > most) most = v;
        if (v >= window) {
            if (cand) cand[n_dead] = s;
            n_dead++;
        }
    }
    trk[LP_TRK_N_DEAD] = (double)n_dead, trk[LP_TRK_MAX_SINCE] = (double)most, trk[LP_TRK_FIRED] = (double)fired;
}

void cpu_sae_l1_term(double *trk, const float *colsum, const float *norms, int S) {
    double sp = 0;
    for (int s = 0; s < S; s++) sp += (double)colsum[s] * norms[s];
    trk[LP_TRK_L1DOT] = sp;
}
