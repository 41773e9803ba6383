/* sae_track.c: the dispatch point of include/loupe/sae_track.h: arguments checked once, then
 * the CPU twin (host/ops/cpu/sae_track.c) or the CUDA kernel (kernels/sae_track.cu). */
#include <stdint.h>

#include "loupe/sae_ops.h"
#include "ops/ops_internal.h"
#include "ops/sae_track_internal.h"

#define NEED(cond, ...)                                                                       \
    do {                                                                                      \
        if (!(cond)) LP_FAIL(LP_ERR_ARG, __VA_ARGS__);                                        \
    } while (0)
#define CPU(c) ((c)->device == LP_CPU)

lp_status lp_sae_recon_sums_dev(lp_ctx *c, double *sums, const float *x, const float *x_hat, int N, int D) {
    NEED(c && sums && N > 0 && D > 0 && x && x_hat, "sae_recon_sums_dev: bad arguments (N=%d D=%d)", N, D);
    if (CPU(c)) { cpu_sae_recon_sums(sums, x, x_hat, N, D); return LP_OK; }
    return cuda_sae_recon_sums_dev(c, sums, x, x_hat, N, D);
}

lp_status lp_sae_dead_update(lp_ctx *c, int64_t *since, int32_t *cand, double *trk, const int64_t *counts, int S,
                             int64_t tokens, int64_t window) {
    NEED(c && since && trk && counts && S > 0 && tokens >= 0 && window >= 1,
         "sae_dead_update: bad arguments (S=%d tokens=%lld window=%lld)", S, (long long)tokens, (long long)window);
    if (CPU(c)) { cpu_sae_dead_update(since, cand, trk, counts, S, tokens, window); return LP_OK; }
    return cuda_sae_dead_update(c, since, cand, trk, counts, S, tokens, window);
}

lp_status lp_sae_l1_term(lp_ctx *c, double *trk, const float *colsum, const float *norms, int S) {
    NEED(c && trk && colsum && norms && S > 0, "sae_l1_term: bad arguments (S=%d)", S);
    if (CPU(c)) { cpu_sae_l1_term(trk, colsum, norms, S); return LP_OK; }
    return cuda_sae_l1_term(c, trk, colsum, norms, S);
}

lp_status lp_sae_topk_among_counted(lp_ctx *c, int32_t *idx, float *val, const float *pre, const int32_t *cand,
                                    const double *n_cand, int N, int S, int K) {
    NEED(c && idx && val && pre && cand && n_cand && N >= 0 && S > 0 && K >= 1 && K <= S,
         "sae_topk_among_counted: bad arguments (N=%d S=%d K=%d)", N, S, K);
    if (N == 0) return LP_OK;
    if (CPU(c)) {
        const double n = *n_cand; /* host memory: the contract is checked here */
        NEED(n >= 0 && n <= S && n == (int)n, "sae_topk_among_counted: %g candidates of %d", n, S);
        for (int i = 0; i < (int)n; i++)
            NEED(cand[i] >= 0 && cand[i] < S && (i == 0 || cand[i] > cand[i - 1]),
                 "sae_topk_among_counted: candidate %d (latent %d) is out of [0, %d) or out of increasing order", i, cand[i], S);
        return cpu_sae_topk_among(idx, val, pre, cand, (int)n, N, S, K); /* pads past min(K, n) */
    }
    return cuda_sae_topk_among_counted(c, idx, val, pre, cand, n_cand, N, S, K);
}

lp_status lp_sae_batch_threshold(lp_ctx *c, float *thr, double *t, const float *pre, size_t n, size_t count, int S) {
    NEED(c && thr && t && S > 0 && (n == 0 || pre), "sae_batch_threshold: bad arguments (n=%zu S=%d)", n, S);
    if (count >= n) { /* no (count+1)-th entry: 0, as lp_sae_kth_largest */
        LP_CHECK(lp_ctx_memset0(c, t, sizeof(double)));
        return lp_ctx_memset0(c, thr, (size_t)S * sizeof(float));
    }
    if (CPU(c)) {
        const float v = cpu_sae_kth_largest(pre, n, count);
        *t = v;
        for (int i = 0; i < S; i++) thr[i] = v;
        return LP_OK;
    }
    return cuda_sae_batch_threshold(c, thr, t, pre, n, count, S);
}

lp_status lp_sae_track_step(lp_ctx *c, double *trk, const lp_sae_track_step_args *a) {
    NEED(c && trk && a && a->n > 0 && a->n_global > 0 && a->sparse >= 0 && a->sparse <= 2 && (!a->aux || a->aux_k >= 1),
         "sae_track_step: bad arguments");
    if (CPU(c)) { trk_step(trk, *a); return LP_OK; }
    return cuda_sae_track_step(c, trk, a);
}
