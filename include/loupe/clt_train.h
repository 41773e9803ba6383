/* clt_train.h: training a transcoder set (clt.h): per-layer transcoders, all layers at
 * once, or a cross-layer transcoder (CLT), written in circuit-tracer's layout.
 *
 * Data: for every token, every layer's input x_l (at cfg.clt.input_hook) and output y_l (at
 * cfg.clt.output_hook), from an activation store holding both hooks of every layer, from
 * the model itself (live), or from any source through a callback.
 *
 * Loss, per batch of N tokens (the CLT paper's, Ameisen et al. 2025, "Circuit Tracing"):
 *   mse      = sum over layers j of mean_n ||y_hat_j - y_j||^2   (y_hat_j from every
 *              layer l <= j's features for a CLT, layer j's alone per-layer)
 *   sparsity = lambda * mean_n sum_{l,s} tanh(c * f_{l,s} * ||W_dec_{l,s}||)
 *              with ||W_dec_{l,s}|| the norm of feature (l, s)'s decoder vectors of all
 *              its target layers concatenated (per-layer: its one decoder row)
 * lambda = sparsity_coefficient, ramped linearly from 0 over sparsity_warm_up_steps; c =
 * sparsity_c. JumpReLU thresholds learn through the rectangle-kernel straight-through
 * estimator (bandwidth jumprelu_bandwidth), from the gradient of both terms. Adam on every
 * parameter; no decoder-norm constraint (the penalty carries the norm).
 * Each layer's inputs and outputs are scaled to mean norm sqrt(d_model) (factors from the
 * first batch) while training, so the losses above are in those units; the factors are
 * folded into the weights written, which take and give the model's raw activations. */
#ifndef LOUPE_CLT_TRAIN_H
#define LOUPE_CLT_TRAIN_H

#include "loupe/clt.h"
#include "loupe/model.h"
#include "loupe/sae_train.h" /* lp_train_progress */

#ifdef __cplusplus
extern "C" {
#endif

/* Fills x and y (host F32, [n_layers, n, d_model] each) with the next n tokens' inputs and
 * outputs. */
typedef lp_status (*lp_clt_batch_fn)(void *user, int n, float *x, float *y);

typedef struct lp_clt_train_cfg {
    lp_clt_cfg clt;              /* kind, act (relu|jumprelu), d_sae, skip, hooks, model_name;
                                  * n_layers and d_model must match the data */
    const char *out;             /* receives the set (config.yaml + circuit-tracer's files) */
    double lr, adam_beta1, adam_beta2, adam_eps;
    double sparsity_coefficient; /* lambda */
    double sparsity_c;           /* c */
    int64_t sparsity_warm_up_steps;
    double jumprelu_init_threshold, jumprelu_bandwidth;
    int64_t tokens;              /* training tokens */
    int batch_tokens;
    int64_t log_every;           /* steps between progress calls */
    uint64_t seed;
    void (*on_progress)(const struct lp_train_progress *p, void *user);
    void *progress_user;
} lp_clt_train_cfg;

void lp_clt_train_defaults(lp_clt_train_cfg *t);
/* Every value checked; the message names the key (sae.d_sae, train.lr, ...). */
lp_status lp_clt_train_check(const lp_clt_train_cfg *t);

typedef struct lp_clt_train_report {
    int64_t steps, tokens;
    double tokens_per_s;
    double first_loss, loss;     /* mse + sparsity: the first step's, the mean of the last log window's */
    double mse, explained_variance, l0; /* last log window: mse summed over layers, EV over all
                                          * layers' outputs, active features per token per layer */
} lp_clt_train_report;

/* Trains from `next` and writes the set to t->out; trained (may be NULL) receives the set
 * itself (free with lp_clt_free). */
lp_status lp_clt_train(const lp_clt_train_cfg *t, lp_ctx *c, lp_clt_batch_fn next, void *user, lp_clt_train_report *rep,
                       lp_clt **trained);

/* Sources. A store: blocks.{l}.<input hook> and blocks.{l}.<output hook> for every l, read
 * in shuffled runs of 16 tokens (seeded). Live: the model over token rows ([n_seq, ctx],
 * round and round) in forwards of batch_seqs rows, each forward's tokens but position 0
 * (whose features circuit-tracer zeroes) shuffled; the
 * model must have the hooks (lp_hooks_add_mlp_in for mlp.hook_in). */
typedef struct lp_clt_source lp_clt_source;
lp_status lp_clt_source_store(lp_clt_source **s, const char *dir, const lp_clt_cfg *cfg, uint64_t seed);
lp_status lp_clt_source_live(lp_clt_source **s, lp_model *m, const lp_clt_cfg *cfg, const int32_t *tokens, int64_t n_seq,
                             int ctx, int batch_seqs, uint64_t seed);
/* n_layers and d_model of the source's data. */
void lp_clt_source_dims(const lp_clt_source *s, int *n_layers, int *d_model);
/* The lp_clt_batch_fn of a source (user = the source). */
lp_status lp_clt_source_next(void *source, int n, float *x, float *y);
void lp_clt_source_free(lp_clt_source *s);

#ifdef __cplusplus
}
#endif
#endif
