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

/* lp_sae_topk_among_counted, n_cand already read: per row the m = min(K, n_cand) best of
 * the gathered candidates (cpu_sae_topk_row, as cpu_sae_topk_among takes them), then the
 * padding. */
typedef struct {
    int32_t *idx;
    float *val;
    const float *pre;
    const int32_t *cand;
    int n_cand, S, K;
    volatile int oom;
} counted_args;

static void counted_rows(void *p, size_t n0, size_t n1) {
    counted_args *a = p;
    const int m = a->K < a->n_cand ? a->K : a->n_cand;
    float *row = malloc((size_t)(a->n_cand ? a->n_cand : 1) * sizeof(float));
    if (!row) {
        a->oom = 1;
        return;
    }
    for (size_t n = n0; n < n1; n++) {
        int32_t *h = a->idx + n * a->K;
        float *v = a->val + n * a->K;
        if (m > 0) {
            const float *pr = a->pre + n * a->S;
            for (int i = 0; i < a->n_cand; i++) row[i] = pr[a->cand[i]];
            cpu_sae_topk_row(h, v, row, a->n_cand, m);
            for (int j = 0; j < m; j++) h[j] = a->cand[h[j]];
        }
        for (int j = m; j < a->K; j++) h[j] = (int32_t)((n * a->K + j) % (size_t)a->S), v[j] = 0.0f;
    }
    free(row);
}

lp_status cpu_sae_topk_among_counted(int32_t *idx, float *val, const float *pre, const int32_t *cand, int n_cand, int N,
                                     int S, int K) {
    counted_args a = {idx, val, pre, cand, n_cand, S, K, 0};
    cpu_parallel_for((size_t)N, 16, counted_rows, &a);
    if (a.oom) LP_FAIL(LP_ERR_OOM, "sae_topk_among_counted: out of memory for a row of %d candidates", n_cand);
    return LP_OK;
}
