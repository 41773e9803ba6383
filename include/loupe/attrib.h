/* attrib.h: gradients of a metric with respect to hook activations (TransformerLens's
 * `<hook>_grad`), attribution patching and exact activation patching.
 *
 *   lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wrong};
 *   double metric[B];
 *   lp_model_grad(m, tokens, B, T, &mt, "blocks.*.hook_resid_pre", metric);
 *   lp_grad_get(m, "blocks.3.hook_resid_pre", &g);      // [B, T, d_model], F32 on the host
 *
 * The metric is per row; the gradient is that of the sum over rows, so each row's
 * gradients are its own. Edits registered on the model (hooks.h) apply to the forward the
 * gradient is taken through, and the backward passes each by its Jacobian (as torch
 * autograd does through TransformerLens's hooks): the gradient at an edited hook is that of
 * its value after the edits; where ZERO, SET or PATCH replaced elements no gradient passes
 * to what is upstream of them; ADD passes it unchanged; a callback passes it as its spec's
 * `grad` declares, and if undeclared every gradient that would pass it is refused by
 * lp_grad_get (naming the callback's hook). */
#ifndef LOUPE_ATTRIB_H
#define LOUPE_ATTRIB_H

#include "loupe/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lp_metric_kind {
    LP_METRIC_LOGIT_DIFF = 0, /* logit[answer] - logit[wrong] at the row's position */
    LP_METRIC_LOGPROB,        /* log softmax(logits)[answer] at the row's position */
    LP_METRIC_MEAN_LOSS,      /* mean next-token loss of the row */
    LP_METRIC_DIRECTION,      /* sum over positions of the hook's activation . direction */
} lp_metric_kind;

typedef struct lp_metric {
    lp_metric_kind kind;
    const int32_t *answer;    /* [B] */
    const int32_t *wrong;     /* [B] */
    const int32_t *pos;       /* [B] position read in each row; NULL: the last */
    const char *hook;         /* LP_METRIC_DIRECTION: the hook (per-token hooks only) */
    const float *direction;   /* LP_METRIC_DIRECTION: [the hook's values per token] */
} lp_metric;

/* Forward (tokens [B,T]), metric per row into metric_out[B], and the backward of the sum
 * over rows, keeping the gradient at every hook matching grad_hooks (comma-separated
 * names or globs; NULL or "": none). The list may also name the blocks' linear weights
 * (blocks.L.attn.W_Q|W_K|W_V|W_O, blocks.L.mlp.W_in|W_out, and W_gate for the Llama
 * family; F32 models only): their gradients come back in the weights' own shapes. */
lp_status lp_model_grad(lp_model *m, const int32_t *tokens, int B, int T, const lp_metric *metric, const char *grad_hooks,
                        double *metric_out);
/* The metric alone (one forward): what exact patching runs per batch. */
lp_status lp_model_metric(lp_model *m, const int32_t *tokens, int B, int T, const lp_metric *metric, double *metric_out);
/* The gradient at a hook (or a weight) from the last lp_model_grad: F32 on the host, the
 * hook's (or weight's) shape, valid until the next lp_model_grad. lp_model_metric runs do
 * not clear it. Never an older run's: LP_ERR_NOT_FOUND, with one line naming the hook and
 * why, when the last lp_model_grad failed, did not ask for it, or did not reach it (a
 * direction metric's backward reaches no layer above its hook's); LP_ERR_ARG when its
 * gradient passes a callback edit of undeclared Jacobian. */
lp_status lp_grad_get(lp_model *m, const char *hook, lp_tensor *out);

/* ---- attribution patching and exact activation patching over a grid of nodes ----
 * Node kinds, each at every layer:                              scores per pair
 *   hook_resid_pre, hook_resid_mid, hook_resid_post,
 *   hook_attn_out, hook_mlp_out                   per position     [n_layers, T]
 *   attn.hook_z, attn.hook_q                      per position, head  [n_layers, T, n_heads]
 *   attn.hook_k, attn.hook_v                      per position, kv head [n_layers, T, n_kv_heads]
 *   attn.hook_pattern                             per head (all of its [query, key] pattern) [n_layers, n_heads]
 * Attribution patching (AtP): score = sum over the node's values of
 * (a_clean - a_corrupted) * d metric / d a, the gradient at the corrupted run (or at the
 * clean run, grad_at_clean), or averaged over ig_steps points of the straight path from
 * the corrupted to the clean input embeddings (integrated gradients).
 * Exact patching: score = metric(corrupted run with the node set to its clean value) -
 * metric(corrupted run), the nodes of one hook batched patch_batch at a time.
 * Both run their own forwards (captures and patches, cleared when done) on the unedited
 * model: with edits registered they fail with LP_ERR_ARG rather than discard them. Under a
 * direction metric, nodes above its hook's layer score 0 (the metric does not depend on them). */
typedef enum lp_node_kind {
    LP_NODE_RESID_PRE = 0, LP_NODE_RESID_MID, LP_NODE_RESID_POST, LP_NODE_ATTN_OUT, LP_NODE_MLP_OUT,
    LP_NODE_Z, LP_NODE_Q, LP_NODE_K, LP_NODE_V, LP_NODE_PATTERN, LP_NODE_KINDS
} lp_node_kind;
const char *lp_node_kind_name(int kind);   /* "hook_resid_pre", ..., "attn.hook_pattern" */
int lp_node_kind_parse(const char *name);  /* -1 if unknown */

typedef struct lp_attrib_opts {
    unsigned kinds;       /* bit (1 << kind) per node kind; 0: all */
    int grad_at_clean;    /* AtP gradient at the clean run instead of the corrupted one */
    int ig_steps;         /* > 0: integrated gradients with that many steps */
    int ig_batch;         /* steps per forward (their rows side by side); 0: all */
    int patch_batch;      /* exact patching: nodes per forward */
    /* AtP shares the pairs' common prefix when this is set (the CLI's attrib.prefix_share,
     * on by default there): positions before the first one where some pair's prompts differ
     * have equal activations in both runs (every score there is exactly 0), so the
     * gradient's run and its backward cover only the positions from there on, attending over
     * the other run's keys and values for the prefix. The scores equal the full runs' within
     * float rounding, but not bit for bit (the suffix's GEMMs have other row counts): a node
     * whose two activations are equal scores ~1e-7 of its scale rather than exactly 0, hence
     * opt-in here. Taken in one process (on the GPU only when attn.hook_pattern is not among
     * the kinds), for logit-difference and log-probability metrics read at or after that
     * position, without integrated gradients; elsewhere (and when 0) both runs cover every
     * position. */
    int prefix_share;
} lp_attrib_opts;

typedef struct lp_node_scores {
    int ndim;
    int64_t shape[3];
    float *v;             /* NULL when the kind was not asked for */
} lp_node_scores;

typedef struct lp_pair_result {
    double metric_clean, metric_corrupted;
    lp_node_scores s[LP_NODE_KINDS];
} lp_pair_result;

/* AtP for B pairs at once (clean and corrupted tokens [B,T]); res[B]. */
lp_status lp_attrib_atp(lp_model *m, const int32_t *clean, const int32_t *corrupted, int B, int T, const lp_metric *mt,
                        const lp_attrib_opts *o, lp_pair_result *res);
/* Exact patching for one pair (tokens [T]); mt describes row 0. */
lp_status lp_attrib_exact(lp_model *m, const int32_t *clean, const int32_t *corrupted, int T, const lp_metric *mt,
                          const lp_attrib_opts *o, lp_pair_result *res);
void lp_pair_result_free(lp_pair_result *r);
/* The node's name, e.g. "blocks.3.attn.hook_z[pos=5,head=2]", for flat index i of kind. */
void lp_node_name(const lp_model *m, int kind, const lp_node_scores *s, int64_t i, char *buf, size_t n);
double lp_pearson(const float *a, const float *b, size_t n);
double lp_spearman(const float *a, const float *b, size_t n);

/* ---- SAE latents as nodes ----
 * With an SAE at its hook, the hook's value is x = f W_dec + b_dec + err (the
 * reconstruction error kept as its own node), so d metric / d f = W_dec (d metric / d x).
 * Per position t and latent s of each pair:
 *   atp[t,s]      = (f_clean - f_corrupted)[t,s] * d metric / d f at the corrupted run
 *   grad_act[t,s] = f_corrupted[t,s] * d metric / d f                  (gradient x activation)
 *   error_atp[t]  = (err_clean - err_corrupted)[t] . d metric / d x
 * Summed over latents plus the error node, atp is exactly the hook's own attribution. The
 * top n latents (by |atp|) of each pair are returned. */
struct lp_sae;
typedef struct lp_sae_node {
    int pos, latent;
    float atp, grad_act;
} lp_sae_node;
typedef struct lp_sae_attrib {
    double metric_clean, metric_corrupted;
    lp_sae_node *top;   /* [n_top], by |atp| descending */
    int n_top;
    float *error_atp;   /* [T] */
    double total_atp;   /* sum of atp over all (t, s) plus error_atp: the hook's attribution */
} lp_sae_attrib;
/* sae lives on c (F32). res[B]; free with lp_sae_attrib_free. */
lp_status lp_attrib_sae(lp_model *m, struct lp_sae *sae, lp_ctx *c, const int32_t *clean, const int32_t *corrupted, int B, int T,
                        const lp_metric *mt, int n_top, lp_sae_attrib *res);
void lp_sae_attrib_free(lp_sae_attrib *r);

#ifdef __cplusplus
}
#endif
#endif
