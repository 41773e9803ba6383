/* sae_track_internal.h: the back ends of include/loupe/sae_track.h (the CPU twins in
 * host/ops/cpu/sae_track.c, the CUDA kernels in kernels/sae_track.cu), and the step's
 * scalar arithmetic that both run, written once (TRK_HD: __host__ __device__ in the .cu). */
#ifndef LOUPE_OPS_SAE_TRACK_INTERNAL_H
#define LOUPE_OPS_SAE_TRACK_INTERNAL_H

#include <math.h>

#include "loupe/sae_track.h"

#ifndef TRK_HD
#define TRK_HD static inline
#endif

/* lp_sae_track_step's arithmetic, in the order the host loop did it. */
TRK_HD void trk_step(double *trk, lp_sae_track_step_args a) {
    const double rs0 = trk[LP_TRK_RECON], rs1 = trk[LP_TRK_RECON + 1];
    const double mse = rs0 / a.n, l0 = trk[LP_TRK_FIRED] / (double)a.n_global;
    double sp = 0, aux = 0;
    if (a.sparse == 1) sp = a.l1 * trk[LP_TRK_L1DOT] / a.n;
    else if (a.sparse == 2) sp = a.l0_coef * l0;
    const int64_t n_dead = (int64_t)trk[LP_TRK_N_DEAD];
    if (a.aux && n_dead > 0) {
        const int64_t ka = a.aux_k < n_dead ? a.aux_k : n_dead;
        const double w = a.aux_coef * fmin((double)n_dead / ka, 1.0);
        aux = w * trk[LP_TRK_AUX] / a.n;
    }
    trk[LP_TRK_STEP] = mse, trk[LP_TRK_STEP_SPARSE] = sp, trk[LP_TRK_STEP_AUX] = aux;
    trk[LP_TRK_STEP_SSE] = rs0, trk[LP_TRK_STEP_SST] = rs1, trk[LP_TRK_STEP_L0] = l0;
    if (a.batchtopk) {
        const double t = trk[LP_TRK_BATCH_T];
        trk[LP_TRK_THR_EMA] = a.step == 0 ? t : 0.95 * trk[LP_TRK_THR_EMA] + 0.05 * t;
    }
    if (!a.accumulate) return;
    trk[LP_TRK_ACC_MSE] += mse, trk[LP_TRK_ACC_SSE] += rs0, trk[LP_TRK_ACC_SST] += rs1;
    trk[LP_TRK_ACC_L0] += l0, trk[LP_TRK_ACC_SPARSE] += sp, trk[LP_TRK_ACC_AUX] += aux;
    const double loss = mse + sp + aux;
    if (!isfinite(loss) && trk[LP_TRK_BAD_STEP] < 0) trk[LP_TRK_BAD_STEP] = (double)a.step, trk[LP_TRK_BAD_NAN] = isnan(loss);
}

#ifdef __cplusplus
extern "C" {
#endif

void cpu_sae_dead_update(int64_t *since, int32_t *cand, double *trk, const int64_t *counts, int S, int64_t tokens,
                         int64_t window);
void cpu_sae_l1_term(double *trk, const float *colsum, const float *norms, int S);
lp_status cuda_sae_topk_among_counted(lp_ctx *c, int32_t *idx, float *val, const float *pre, const int32_t *cand,
                                      const double *n_cand, int N, int S, int K);

lp_status cuda_sae_recon_sums_dev(lp_ctx *c, double *sums, const float *x, const float *x_hat, int N, int D);
lp_status cuda_sae_dead_update(lp_ctx *c, int64_t *since, int32_t *cand, double *trk, const int64_t *counts, int S,
                               int64_t tokens, int64_t window);
lp_status cuda_sae_l1_term(lp_ctx *c, double *trk, const float *colsum, const float *norms, int S);
lp_status cuda_sae_track_step(lp_ctx *c, double *trk, const lp_sae_track_step_args *a);
lp_status cuda_sae_batch_threshold(lp_ctx *c, float *thr, double *t, const float *pre, size_t n, size_t count, int S);

#ifdef __cplusplus
}
#endif

#endif
