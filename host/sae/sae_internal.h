/* sae_internal.h: the buffers of one SAE batch (host/sae/sae_runner.c), shared with
 * evaluation and encoding (host/sae/sae_eval.c). All F32 on the context's device. */
#ifndef LOUPE_SAE_INTERNAL_H
#define LOUPE_SAE_INTERNAL_H

#include "loupe/dist.h"
#include "loupe/sae.h"

typedef struct sae_runner {
    lp_sae *s;
    lp_ctx *c;
    int N, D, Do, S, K, Ka, train;
    void *mem;
    float *x, *y, *xin, *pre, *f, *val, *xhat, *skip, *nbdec, *ones, *neg1, *thr;
    int32_t *idx;
    int64_t *counts;
    const float *xin_used;
    double *batch_t; /* batchtopk in training: this batch's threshold, on the device (a slot of
                      * the trainer's tracking block, loupe/sae_track.h) */
    int n_dead;
    /* data-parallel training (sae_runner_set_dp): the batch lies split over dist's DP group */
    lp_dist *dist;
    int64_t *hist;     /* [256] on the device: one radix pass of a split batchtopk threshold */
    float *thr_host;   /* [S]: that threshold, broadcast over the latents */
    /* training */
    float *dxhat, *df, *dval, *norms, *colsum, *val_aux, *dval_aux, *e, *ehat;
    int32_t *idx_aux;
    int32_t *cand;     /* [S]: AuxK's dead latents, increasing */
    int32_t *lists;    /* topk: latent-major lists of one selection (lp_sae_latent_lists) */
    /* bf16 encoder (training on CUDA when asked): the pre-activation GEMM reads a bf16
     * copy of W_enc, refreshed after each Adam step, and a bf16 copy of x_in */
    int bf16;
    uint16_t *W_enc_b, *xin_b;
} sae_runner;

/* Buffers for batches of up to N tokens; train adds the gradient buffers (and AuxK's,
 * with aux_k latents; 0: d_in / 2). */
lp_status sae_runner_new(sae_runner **r, lp_sae *s, lp_ctx *c, int N, int train, int aux_k);
/* The same for one shard of a wider SAE (latent sharding, sae_shard.c): AuxK's k is capped
 * by sel_S, the latents its selection spans (the full d_sae), not the shard's. */
lp_status sae_runner_new_sel(sae_runner **r, lp_sae *s, lp_ctx *c, int N, int train, int aux_k, int sel_S);
/* Training only: from now on the encoder GEMM runs on a bf16 copy of W_enc (allocated
 * here; call sae_runner_refresh_bf16 after every change of W_enc). */
lp_status sae_runner_use_bf16(sae_runner *r);
lp_status sae_runner_refresh_bf16(sae_runner *r);
void sae_runner_free(sae_runner *r);
/* Data-parallel training: r's batches are this rank's slices of batches split evenly over
 * d's data-parallel group, so batchtopk's threshold is taken over the whole batch. */
void sae_runner_set_dp(sae_runner *r, lp_dist *d);
/* BatchTopK's threshold over a batch whose pre-activations lie split over the ranks of
 * group g of d (its rows over the DP ranks, its latents over the TP ranks, or both over the
 * world): r->pre holds this rank's n rows of its r->S latents, of `rows` rows and `latents`
 * latents in all. lp_sae_kth_largest's radix selection with each pass's histogram summed over
 * g (histograms add), so every rank gets the threshold one process takes over the whole
 * batch, bit for bit: four all-reduces of 256 counts through the host. Into r->thr [S] and
 * *r->batch_t, as lp_sae_batch_threshold writes them. */
lp_status sae_runner_split_threshold(sae_runner *r, int n, lp_dist *d, lp_dist_group g, size_t rows, size_t latents);
/* An inference runner for at least N tokens kept on the SAE (s->runner_cache; grown when a
 * call needs more, freed by lp_sae_free): do not free it. */
lp_status sae_runner_cached(lp_sae *s, lp_ctx *c, int N, sae_runner **r);
/* At least `bytes` of device scratch kept on the SAE (s->scratch). */
lp_status sae_scratch(lp_sae *s, lp_ctx *c, size_t bytes, void **out);
/* r->x holds n tokens: computes f (or idx/val) and x_hat. batch_thr: batchtopk takes this
 * batch's threshold (training) instead of the learned one. */
lp_status sae_runner_forward(sae_runner *r, int n, int batch_thr);
/* The first half of the forward: x_in (x - b_dec when applied) and pre [n, S]. */
lp_status sae_runner_pre(sae_runner *r, int n);

#endif
