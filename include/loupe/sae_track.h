/* sae_track.h: the bookkeeping of SAE training kept on the device, so that a step queues
 * its work and the host reads only at log steps, checkpoints and the end: the logged sums,
 * the non-finite loss flag, and the dead-latent counters with the dead list AuxK selects
 * from. CPU twins in host/ops/cpu/sae_track.c, CUDA kernels in kernels/sae_track.cu,
 * dispatched in host/ops/sae_track.c. All of it is double (and int64) arithmetic in a
 * fixed order where it can be, so the CPU twin gives the host loop's former values bit for
 * bit. */
#ifndef LOUPE_SAE_TRACK_H
#define LOUPE_SAE_TRACK_H

#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The slots of the tracking block: LP_TRK_LEN doubles on the device. */
enum {
    /* the log window's running sums (what metrics.jsonl prints, over its steps) */
    LP_TRK_ACC_MSE = 0, LP_TRK_ACC_SSE, LP_TRK_ACC_SST, LP_TRK_ACC_L0, LP_TRK_ACC_SPARSE, LP_TRK_ACC_AUX,
    LP_TRK_BAD_STEP,  /* the first step whose loss was not finite, -1 none */
    LP_TRK_BAD_NAN,   /* 1 when that loss was a NaN, 0 when infinite */
    LP_TRK_N_DEAD,    /* latents not fired for the dead window, after the last update */
    LP_TRK_MAX_SINCE, /* the largest tokens-since-fired, after the last update */
    LP_TRK_FIRED,     /* firings of the last update's batch (all latents) */
    LP_TRK_THR_EMA,   /* batchtopk: the running mean of the batch thresholds (the exported one) */
    LP_TRK_BATCH_T,   /* batchtopk: this batch's threshold (lp_sae_batch_threshold) */
    LP_TRK_RECON,     /* [4]: lp_sae_recon_sums of the step's reconstruction */
    LP_TRK_AUX = LP_TRK_RECON + 4, /* [4]: of AuxK's reconstruction of the residual */
    LP_TRK_L1DOT = LP_TRK_AUX + 4, /* sum_s colsum[s] * norm[s]: the L1 term before l1 / N */
    /* the step's values: mse, sparsity term, aux loss, sse, sst, l0 */
    LP_TRK_STEP, LP_TRK_STEP_SPARSE, LP_TRK_STEP_AUX, LP_TRK_STEP_SSE, LP_TRK_STEP_SST, LP_TRK_STEP_L0,
    LP_TRK_LEN = 32
};

/* lp_sae_recon_sums with the four sums left in device memory (sums: 4 doubles there). */
lp_status lp_sae_recon_sums_dev(lp_ctx *c, double *sums, const float *x, const float *x_hat, int N, int D);

/* Dead-latent bookkeeping for one batch of `tokens` tokens, from the batch's fire counts
 * (int64 [S]): since[s] = counts[s] ? 0 : since[s] + tokens (int64 [S]); cand (int32 [S])
 * gets the latents with since >= window in increasing order, their number in
 * trk[LP_TRK_N_DEAD]; trk[LP_TRK_MAX_SINCE] the largest since, trk[LP_TRK_FIRED] the sum of
 * the counts. cand may be NULL (no list wanted). */
lp_status lp_sae_dead_update(lp_ctx *c, int64_t *since, int32_t *cand, double *trk, const int64_t *counts, int S,
                             int64_t tokens, int64_t window);

/* trk[LP_TRK_L1DOT] = sum over s in order of (double)colsum[s] * norms[s] (F32 [S] each). */
lp_status lp_sae_l1_term(lp_ctx *c, double *trk, const float *colsum, const float *norms, int S);

/* lp_sae_topk_among (include/loupe/sae_ops.h) over the first n of the candidates cand[S],
 * with n read on the device (*n_cand: a double holding an integer, e.g. trk +
 * LP_TRK_N_DEAD after lp_sae_dead_update), so the host need not know it: each row takes its
 * m = min(K, n) best as there in entries 0..m-1 of its K, and the other K - m entries are
 * padding with value 0 and latent (n_row * K + j) % S (spread over the latents). Value-0
 * entries add nothing to the sparse decode or its gradients (their relu gradient is 0);
 * 1 <= K <= S. AuxK's selection without a read of the dead count. */
lp_status lp_sae_topk_among_counted(lp_ctx *c, int32_t *idx, float *val, const float *pre, const int32_t *cand,
                                    const double *n_cand, int N, int S, int K);

/* BatchTopK's threshold on the device: *t (a double in device memory) = the float
 * lp_sae_kth_largest(pre, n, count) would return, and thr[0..S) = that float; no host
 * wait. */
lp_status lp_sae_batch_threshold(lp_ctx *c, float *thr, double *t, const float *pre, size_t n, size_t count, int S);

/* What one step adds to the tracking block (host scalars: kernel arguments, no copy). */
typedef struct lp_sae_track_step_args {
    int64_t step;         /* this step's index, for the non-finite flag */
    int n;                /* tokens the step's sums are over (this rank's) */
    int64_t n_global;     /* tokens of the global batch (the L0's denominator) */
    int sparse;           /* 0: no sparsity term; 1: l1 * trk[L1DOT] / n; 2: l0_coef * l0 */
    double l1, l0_coef;
    int aux;              /* 1: AuxK ran this step, over trk[LP_TRK_AUX] */
    int aux_k;            /* its k before the dead count caps it */
    double aux_coef;
    int accumulate;       /* 1: add to the log window's sums and set the flag */
    int batchtopk;        /* 1: THR_EMA = step == 0 ? BATCH_T : 0.95 THR_EMA + 0.05 BATCH_T */
} lp_sae_track_step_args;

/* From trk's RECON, FIRED, N_DEAD, AUX and L1DOT slots (and BATCH_T): the step's values
 *   mse = recon[0] / n, sse = recon[0], sst = recon[1], l0 = fired / n_global,
 *   sparse = (1) l1 * l1dot / n, (2) l0_coef * l0, (0) 0,
 *   aux = w * aux[0] / n with w = aux_coef * min(n_dead / min(aux_k, n_dead), 1) (0 without AuxK)
 * into the STEP slots; with accumulate, each added to its ACC slot, and where
 * mse + sparse + aux is not finite and no step was flagged before, BAD_STEP = step and
 * BAD_NAN = isnan. */
lp_status lp_sae_track_step(lp_ctx *c, double *trk, const lp_sae_track_step_args *a);

#ifdef __cplusplus
}
#endif
#endif
