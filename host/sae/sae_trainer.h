/* sae_trainer.h: the state of one SAE training run, shared by the files that make up the
 * trainer (internal): sae_train.c (setup and run loop), sae_train_data.c, sae_train_step.c
 * and sae_checkpoint.c. */
#ifndef LOUPE_SAE_TRAINER_H
#define LOUPE_SAE_TRAINER_H

#include "loupe/dist.h"
#include "loupe/output.h"
#include "loupe/sae_train.h"
#include "loupe/sae_track.h"
#include "loupe/store.h"
#include "sae/sae_internal.h"

/* A live source: the model run over token rows, its hooks captured (sae_train_data.c). */
#define LIVE_MAX_HOOKS 16

struct lp_live {
    lp_model *m;
    const int32_t *tok;
    int64_t n_seq;
    int ctx, bseq;
    int n_hooks;
    char name[LIVE_MAX_HOOKS][128];
    int d[LIVE_MAX_HOOKS];
    int64_t c0, cn;             /* the cached token range, for every hook */
    float *cache[LIVE_MAX_HOOKS];
    size_t cache_cap;           /* tokens each cache holds */
    float *tmp;                 /* one batch of captures */
    size_t tmp_cap;
};

typedef struct trainer {
    const lp_sae_train_cfg *t;
    lp_ctx *c;
    lp_sae *s;
    sae_runner *r;
    lp_store *in, *outs;            /* the data: a store, or */
    lp_live *live;                  /* a live model stream */
    int live_in, live_out;          /* its hook indices (live_out < 0: an SAE) */
    int transcoder;
    int N, D, Do, S;                /* N: tokens of a global batch */
    int Nl, dp, dpr;                /* this rank's rows of it (N / dp), DP size and rank */
    /* Latent sharding (sae_shard.c): with dist.tp > 1 the trainer's SAE s is this rank's
     * shard, latents [s0, s0 + S) of full.d_sae (S = full.d_sae / tp): its W_enc columns,
     * b_enc, W_dec rows, threshold, their Adam state and dead-latent counters; b_dec and
     * W_skip are replicated. With tp == 1, S == full.d_sae and s0 == 0. */
    int tp, tpr, s0;
    lp_sae_cfg full;                /* the SAE being trained (the files, the checkpoint signature) */
    int writer;                     /* DP rank 0 and TP rank 0: locks train.out, writes every file */
    struct shard_bufs *sh;          /* tp > 1: host buffers of the selections (sae_shard.c) */
    float *ysum;                    /* dp > 1: device [Do], this rank's column sums of y */
    float *ysum_f;                  /* host [Do] */
    double *ysum_host;              /* host [Do + 1] */
    float *grad, *adam_m, *adam_v; /* device, the layout of s->mem */
    lp_sae gview;                   /* grad pointers carved like the SAE's */
    /* data */
    int64_t W, n_tokens, win;       /* tokens per window, in the store, window loaded (-1 none) */
    float *win_x, *win_y;           /* device [W, D], [W, Do] */
    int32_t *perm;                  /* device [W] */
    float *win_x2, *win_y2;         /* GPU, store: the next window's device buffers, */
    int32_t *perm2;                 /* uploaded asynchronously (sae_train_data.c) */
    int64_t win_next;               /* the window they hold (-1 none) */
    float *host_x, *host_y;         /* pinned on the GPU */
    int32_t *host_perm;
    struct sae_prefetch *prefetch;  /* the next window, prepared on a thread (sae_train_data.c) */
    /* state */
    int64_t step, tokens_done;
    double scale, thr_ema;
    int64_t *since;                 /* host [S]: tokens since each latent last fired (checkpoints) */
    int64_t *since_dev;             /* device [S]: the same, updated by every step */
    int64_t since_bound;            /* at least the largest of since_dev (exact at each log read):
                                     * AuxK runs once a latent may have reached the window */
    int64_t *counts_host;           /* dp > 1: the fire counts, all-reduced on the host */
    double *trk;                    /* device [LP_TRK_LEN]: the step's sums, the log window's,
                                     * the non-finite flag, the dead count, BatchTopK's threshold
                                     * and its running mean (loupe/sae_track.h) */
    double trk_host[LP_TRK_LEN];
    int host_acc;                   /* dp > 1: the log window summed on the host, each step */
    double step_v[6];               /* host_acc: the step's mse, sparsity, aux, sse, sst, l0 */
    /* log window (on the host: as last read from trk, or summed there with host_acc) */
    double acc_mse, acc_sse, acc_sst, acc_l0, acc_sparsity, acc_aux, acc_n;
    int metrics;                    /* metrics.jsonl, open for appending (-1: not open) */
    char metrics_path[1200];
    int64_t ckpt_step;              /* step of the newest checkpoint on disk (-1: none) */
    char store_id[64];              /* size and hash of the store's meta.json (shard list) */
    lp_lock lock;                   /* train.out, held for the run */
} trainer;

/* ---- sae_train_data.c ---- */

/* The index and width of hook `name` in the live stream, added if new. */
lp_status sae_live_hook(lp_live *l, const char *name, int *idx, int *d);
/* Tokens [t0, t0 + n) of the endless stream (the data read round and round) of the input
 * (out = 0) or the output hook (out = 1). */
lp_status sae_src_read(trainer *tr, int out, int64_t t0, int64_t n, float *dst);
/* Fails naming the hook and token when x[0..n) (rows of d) holds a NaN or Inf. */
lp_status sae_check_finite(const trainer *tr, const float *x, size_t n, int d, int64_t first_token, const char *hook);
/* Waits for the window being prepared and frees its buffers. */
void sae_prefetch_free(trainer *tr);
/* The batch of step `step` into the runner's x (and y). */
lp_status sae_load_batch(trainer *tr, int64_t step);

/* ---- sae_train_step.c ---- */

double sae_lr_at(const lp_sae_train_cfg *t, int64_t step, int64_t total);
lp_status sae_init_params(trainer *tr);
lp_status sae_init_data_stats(trainer *tr);
/* One step, queued on the device; with host_acc its figures in step_v. */
lp_status sae_train_step(trainer *tr, double lr, double l1);
/* Reads the tracking block (one copy): the log window's sums into acc_* (unless host_acc)
 * and the dead count; fails naming the step when a loss was not finite. */
lp_status sae_read_track(trainer *tr);
/* The one-line error of a non-finite loss at step `step`. */
lp_status sae_loss_error(const trainer *tr, int64_t step, int is_nan);

/* ---- sae_shard.c (tp > 1) ---- */

/* The forward of a latent shard: pre-activations of its latents, the group's selection
 * (TopK, BatchTopK) made across the shards, x_hat summed over the group. */
lp_status shard_forward(trainer *tr);
/* idx/val [Nl, kl]: this rank's best kl entries per row (local latents, values relu'd, as
 * lp_sae_topk gives them) become [Nl, K]: each row's K best over the group, chosen as one
 * process chooses (larger value first, ties to the lower global latent), this rank's own
 * latents kept in place and the others padding of value 0. */
lp_status shard_select(trainer *tr, int32_t *idx, float *val, int kl, int K);
/* The tracking block's per-latent figures (dead count, fired count, L1 term; the largest
 * tokens-since-fired) made the group's, before lp_sae_track_step reads them. */
lp_status shard_track(trainer *tr);
/* Full <-> shard layouts of the flat parameters (sae_carve's order): to_full 1 copies this
 * shard `t`'s part of loc into full, 0 takes it out of full. */
void shard_map(const lp_sae_cfg *full, int tp, int t, float *loc, float *full_buf, int to_full);
/* The group's shards of a device buffer in the layout of s->mem (n_floats of a shard) into
 * full_host (the full SAE's layout) on TP rank 0; a collective over the TP group. */
lp_status shard_gather(trainer *tr, const float *dev, float *full_host);
/* The dead-latent counters of every shard into since_all [full.d_sae] on TP rank 0. */
lp_status shard_gather_since(trainer *tr, int64_t *since_all);
/* The full SAE into train.out (TP rank 0 writes; every rank of the group takes part). */
lp_status shard_save(trainer *tr);
void shard_free(trainer *tr);

/* ---- sae_checkpoint.c ---- */

lp_status sae_save_checkpoint(trainer *tr);
/* Resumes from the newest matching checkpoint in train.out (*found 0: none). */
lp_status sae_load_checkpoint(trainer *tr, int *found);
/* Drops the metrics.jsonl lines past upto_step. */
lp_status sae_trim_metrics(const char *path, int64_t upto_step);
/* The last logged metrics of path into rep. */
void sae_last_metrics(const char *path, lp_sae_train_report *rep);

#endif
