/* paths.h: path patching and edge attribution patching between components.
 *
 * Components write to the residual stream; receivers read from it:
 *   senders    "embed" (hook_embed + hook_pos_embed), "blocks.L.attn.head.H" (the head's
 *              result z_H W_O[H], TransformerLens's attn.hook_result), "blocks.L.mlp"
 *              (hook_mlp_out)
 *   receivers  "blocks.L.attn.head.H.q|k|v" (the residual into that head's query, key or
 *              value projection, before ln1: TransformerLens's hook_q_input etc.; with
 *              grouped-query attention the key and value receivers are the kv heads,
 *              "blocks.L.attn.kv_head.J.k|v"), "blocks.L.mlp" (the residual into the MLP,
 *              before ln2: hook_mlp_in), "logits" (the final residual, before ln_final)
 * An edge S -> R exists when S writes before R reads (a head's result reaches the MLP of
 * its own layer; nothing reaches the heads of its own layer). The residual stream is the
 * sum of the senders' outputs and of biases that do not change between runs, so a
 * sender's delta Δ_S = S(corrupted) - S(clean) reaches every receiver downstream of it
 * unchanged along the direct path.
 *
 * Path patching (Wang et al. 2022, the indirect-object-identification circuit): the clean
 * run, with each receiver's input replaced by its clean input + Δ_S (all other paths from
 * S frozen at clean), everything downstream of the receivers free:
 *   - a head receiver: its q (k, v) is computed from ln1(clean resid_pre + Δ_S) exactly, the
 *     norm included, for that head alone (the other heads read the clean residual);
 *   - an MLP receiver: ln2's output is computed from clean resid_mid + Δ_S;
 *   - logits: Δ_S is added to the final residual of the run (so that the changes other
 *     receivers cause reach the logits too).
 * The head and MLP receivers' patched inputs are fixed values (Wang et al.'s step 3): a
 * receiver downstream of another sees the upstream receiver's change only through its
 * inputs that are not receivers. effect = metric(that run) - metric(clean run).
 *
 * Edge attribution patching (Syed et al. 2023): per edge,
 *   score(S -> R) = sum over positions of Δ_S . d metric / d (R's input copy) at the clean run,
 * the first-order estimate of path patching S -> {R}. With ig_steps > 0 the gradient is
 * averaged over the runs whose input embeddings lie at the midpoints of ig_steps intervals
 * on the straight line from the corrupted to the clean embeddings (EAP-IG, Hanna et al.
 * 2024). Identities (exact, up to rounding):
 *   - sum over R of score(S -> R) = Δ_S . d metric / d (the residual where S writes), which
 *     is the node attribution of S in the clean-gradient (noising) sign: minus lp_attrib_atp's
 *     attn.hook_z score of the head (hook_mlp_out's for an MLP) with grad_at_clean, or with the
 *     same ig_steps;
 *   - sum over S of score(S -> R) = (R's input at corrupted - at clean) . its gradient.
 * The per-head gradients are ln1's backward applied to each head's share of the gradient at
 * hook_q/k/v: (n_heads + 2 n_kv_heads) x d_model values per layer and position, on the host.
 *
 * freeze (both methods): hooks (comma-separated names or globs) held at their clean-run
 * values in every run, the corrupted one too, e.g. "blocks.*.attn.hook_pattern" (paths
 * through queries and keys then carry nothing). The gradients pass the frozen hooks as
 * edits do (attrib.h): nothing flows through a frozen value, a frozen norm scale is a
 * constant. Both methods run one pair (B = 1) and their own forwards (registered edits
 * are refused, as in attrib.h). */
#ifndef LOUPE_PATHS_H
#define LOUPE_PATHS_H

#include "loupe/attrib.h"

#ifdef __cplusplus
extern "C" {
#endif

int lp_path_n_senders(const lp_model *m);
int lp_path_n_receivers(const lp_model *m);
/* Names of sender i and receiver j (above). */
void lp_path_sender_name(const lp_model *m, int i, char *buf, size_t n);
void lp_path_receiver_name(const lp_model *m, int j, char *buf, size_t n);
/* Index by name, or -1. */
int lp_path_sender_find(const lp_model *m, const char *name);
int lp_path_receiver_find(const lp_model *m, const char *name);
/* Whether sender i writes before receiver j reads. */
int lp_path_is_edge(const lp_model *m, int i, int j);
/* The layer of a sender (-1 for the embeddings) or receiver (n_layers for the logits). */
int lp_path_sender_layer(const lp_model *m, int i);
int lp_path_receiver_layer(const lp_model *m, int j);

typedef struct lp_path_opts {
    const char *freeze; /* hooks held at their clean values in every run; NULL or "": none */
    int ig_steps;       /* edge attribution: > 0 integrated gradients with that many steps */
    int ig_batch;       /* steps per forward; 0: all */
} lp_path_opts;

/* Path patching of one pair (tokens [T]; mt describes row 0) from sender `sender` to the
 * receivers recv[0..n_recv): the metrics of the clean and corrupted runs and the effect. */
lp_status lp_path_patch(lp_model *m, const int32_t *clean, const int32_t *corrupted, int T, const lp_metric *mt, int sender,
                        const int *recv, int n_recv, const lp_path_opts *o, double *metric_clean, double *metric_corrupted,
                        double *effect);

typedef struct lp_eap_result {
    double metric_clean, metric_corrupted;
    int n_senders, n_receivers;
    float *scores; /* [n_senders, n_receivers]; 0 where there is no edge */
} lp_eap_result;

/* Edge attribution patching of one pair (tokens [T]). Free with lp_eap_result_free. */
lp_status lp_eap(lp_model *m, const int32_t *clean, const int32_t *corrupted, int T, const lp_metric *mt, const lp_path_opts *o,
                 lp_eap_result *res);
void lp_eap_result_free(lp_eap_result *r);

#ifdef __cplusplus
}
#endif
#endif
