/* sae_train.h: training sparse autoencoders and transcoders, and running them over
 * activations (encode, reconstruct, evaluate).
 *
 *   lp_sae_train_cfg t;
 *   lp_sae_train_defaults(&t);
 *   t.sae.arch = LP_SAE_TOPK, t.sae.d_sae = 4096, t.sae.k = 32;
 *   t.store = "build/demo/store", t.sae.hook_name = ...; t.out = "build/sae";
 *   lp_sae_train(&t, &ctx, &report);     // writes out/cfg.json + sae_weights.safetensors
 *
 * Data: activations of one hook (two for a transcoder) read from an activation store.
 * The token stream is cut into windows of `shuffle_tokens` tokens; each window is
 * shuffled with a permutation seeded by (seed, window), so batches mix many sequences and
 * a run restarted from a checkpoint sees exactly the same batches.
 *
 * Loss (SAELens's definitions): mse = sum over dims, mean over tokens, of (x_hat - x)^2;
 * standard adds l1_coefficient * mean_n sum_s f[n,s] * ||W_dec[s]||; jumprelu adds
 * l0_coefficient * mean_n L0 (straight-through estimator); topk and batchtopk add
 * aux_k_coefficient * the AuxK loss of the dead latents. Decoder rows stay at unit norm
 * (the gradient component parallel to each row is removed before every Adam step). */
#ifndef LOUPE_SAE_TRAIN_H
#define LOUPE_SAE_TRAIN_H

#include "loupe/model.h"
#include "loupe/sae.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lp_train_progress {
    int64_t tokens_done, tokens_total, step, total_steps;
    double tokens_per_s, loss, l0;
    int dead, final;
} lp_train_progress;

typedef struct lp_sae_train_cfg {
    lp_sae_cfg sae;              /* architecture, d_sae, k, apply_b_dec_to_input, normalize, hooks */
    const char *store;           /* activation store directory */
    const char *out;             /* receives cfg.json + sae_weights.safetensors, metrics.jsonl, checkpoints/ */
    double lr, adam_beta1, adam_beta2, adam_eps;
    int64_t lr_warm_up_steps, lr_decay_steps;
    char lr_scheduler[16];       /* constant | linear | cosine (decay over the last lr_decay_steps) */
    double l1_coefficient;       /* standard */
    int64_t l1_warm_up_steps;
    double l0_coefficient;       /* jumprelu */
    double jumprelu_init_threshold;
    double aux_k_coefficient;    /* topk, batchtopk */
    int aux_k;                   /* latents used by AuxK; 0: d_in / 2 */
    int64_t tokens;              /* training tokens */
    int batch_tokens;
    char b_dec_init[24];         /* mean | geometric_median | zeros */
    int64_t dead_feature_window; /* tokens without firing before a latent counts as dead */
    int64_t shuffle_tokens;      /* tokens shuffled together (rounded up to batches) */
    int64_t checkpoint_every;    /* tokens; 0: at the end only */
    int64_t log_every;           /* steps between metrics lines */
    uint64_t seed;
    /* The pre-activation GEMM on CUDA: on a bf16 copy of W_enc refreshed after every Adam
     * step (fp32 master weights, fp32 sums and bias, fp32 pre-activations): 1; in F32: 0;
     * -1 (the default): bf16 on CUDA, F32 on the CPU (where a bf16 copy only adds rounding). */
    int encoder_bf16;
    /* Called at every metrics step and once at the end (final set); NULL: silent. The
     * library never prints: the CLI draws the bar. */
    void (*on_progress)(const struct lp_train_progress *p, void *user);
    void *progress_user;
    int allow_incomplete;        /* train on a store whose meta.json says it is not complete */
    int64_t stop_after;          /* tests: stop as if killed after this many tokens (0: never) */
    /* Data parallelism (dist.h; NULL or a DP group of one: one process): every DP rank calls
     * lp_sae_train with the same settings and store; each takes its batch_tokens / dp rows of
     * every global batch, the gradients (means over each slice, averaged) and the firing
     * counts of the dead-latent statistics are all-reduced before each Adam step, so every
     * rank holds the same SAE; DP rank 0 alone locks train.out and writes metrics,
     * checkpoints and the SAE. BatchTopK's threshold is the global batch's (each selection
     * pass's histogram all-reduced). A store only (not a live stream).
     * Latent sharding (a TP group of more than one; host/sae/sae_shard.c): the ranks of a
     * TP group share each batch and each holds d_sae / tp of the latents (refused with
     * LP_ERR_ARG naming sae.d_sae when tp does not divide it, sae.k when k > d_sae / tp, and
     * for a live stream); the selections (TopK, BatchTopK, AuxK) are made across the shards
     * as one process makes them and x_hat is summed over the group, so the run is the one
     * process's up to the order of the sums. TP rank 0 of DP rank 0 gathers the shards and
     * writes the one-process files and checkpoints (which resume under any tp). */
    struct lp_dist *dist;
} lp_sae_train_cfg;

void lp_sae_train_defaults(lp_sae_train_cfg *t);
/* Every value checked before any work; the message names the key (SAELens-style names:
 * sae.d_sae, train.lr, ...). d_in comes from the store. */
lp_status lp_sae_train_check(const lp_sae_train_cfg *t);

typedef struct lp_sae_train_report {
    int64_t steps, tokens, resumed_tokens;
    double tokens_per_s;
    double mse, explained_variance, l0; /* over the last log window */
    int dead;
    int stopped;                 /* stop_after ended the run early (nothing final written) */
    int already_complete;        /* out held the finished run already: nothing trained (figures from its metrics) */
} lp_sae_train_report;

/* Trains (resuming from the newest complete checkpoint under out/checkpoints when its
 * settings and the store's fingerprint match) and writes the SAE in the SAELens layout to
 * out. One run at a time holds out (LP_ERR_BUSY for a second). Rerunning a finished run
 * is not an error: it reports already_complete. A store whose meta.json says it is not
 * complete is refused unless allow_incomplete. */
lp_status lp_sae_train(const lp_sae_train_cfg *t, lp_ctx *c, lp_sae_train_report *rep);

/* ---- training from the model itself ----
 * A live stream runs the model over token rows ([n_seq, ctx], read round and round) in
 * forwards of batch_seqs rows, capturing every hook the SAEs trained from it need; the
 * shuffle windows work as for a store, so a restarted run resumes identically. */
typedef struct lp_live lp_live;
lp_status lp_live_open(lp_live **l, lp_model *m, const int32_t *tokens, int64_t n_seq, int ctx, int batch_seqs);
void lp_live_close(lp_live *l);
/* Trains n SAEs (different hooks, widths, k, architectures) from one live stream, each
 * window of activations computed once for all of them. They must share
 * train.batch_tokens and train.shuffle_tokens; cfgs[i].store is not used. */
lp_status lp_sae_train_live(const lp_sae_train_cfg *cfgs, int n, lp_live *live, lp_ctx *c, lp_sae_train_report *reps);

/* ---- running a trained SAE ---- */

/* Evaluation over tokens [0, n_tokens) of a store (n_tokens <= 0: all). */
typedef struct lp_sae_eval {
    int64_t n_tokens;
    double mse, explained_variance, fvu, l0, l1, cos_sim, norm_ratio;
    int dead, dense;             /* latents that never fired; that fired on > 10% of tokens */
    int64_t density_hist[12];    /* latents by log10 firing frequency: [0] never or < 1e-10,
                                  * [1] [-10,-9), ..., [10] [-1, 0), [11] every token */
} lp_sae_eval;
lp_status lp_sae_eval_store(lp_sae *s, lp_ctx *c, const char *store, const char *hook, const char *hook_out,
                            int64_t n_tokens, int batch, lp_sae_eval *out);

/* Latents of n tokens x [n, d_in] (F32 on c's device): the top `k` (the SAE's own k for
 * topk; for the others the k largest of its activations) as idx [n,k] int32 and val
 * [n,k] F32 on the host. */
lp_status lp_sae_encode_topk_host(lp_sae *s, lp_ctx *c, const float *x, int n, int k, int32_t *idx, float *val);

/* x_hat [n, d_out] of x [n, d_in], both F32 on c's device (the SAE's own activation). */
lp_status lp_sae_reconstruct(lp_sae *s, lp_ctx *c, const float *x, int n, float *x_hat);

/* The model's next-token loss with the SAE spliced in at its hook (the hook's value
 * replaced by the SAE's reconstruction), against the clean model and against
 * zero-ablating the hook, over rows tokens [n_seq, ctx]:
 *   ce_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)
 *   kl_* = mean over predicted positions of KL(clean || spliced or ablated).
 * (With the error term added back the spliced model is the clean one, so ce_clean is also
 * the "with error term" figure.) SAEs only (not transcoders); the model's activations must
 * be F32 on the SAE's device. */
typedef struct lp_sae_splice_eval {
    int64_t n_tokens;
    double ce_clean, ce_sae, ce_zero, ce_recovered, kl_sae, kl_zero;
} lp_sae_splice_eval;
lp_status lp_sae_eval_model(lp_model *m, lp_sae *s, lp_ctx *c, const int32_t *tokens, int64_t n_seq, int ctx,
                            lp_sae_splice_eval *out);

#ifdef __cplusplus
}
#endif
#endif
