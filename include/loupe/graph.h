/* graph.h: attribution graphs (circuit-tracer 0.5.0's semantics) for one prompt.
 *
 *   lp_graph_opts o = lp_graph_defaults();
 *   lp_graph *g;
 *   lp_graph_build(&g, m, tcs, tokens, T, &o);   // nodes, exact edges, pruning, scores
 *   lp_graph_write_json(g, &jo, "graph.json");
 *
 * The model is the local replacement model (frozen.h) with each MLP replaced by a transcoder
 * (per-layer, or cross-layer: clt.h). Nodes, in circuit-tracer's order:
 *   features   every active (layer, position, feature), position 0 excluded, ordered by
 *              (layer, position, feature); or the max_feature_nodes chosen by influence
 *              round by round (update_interval * batch_size rows a round), as circuit-tracer
 *   errors     (layer, position): the MLP's output minus the transcoder's reconstruction
 *              (zero at position 0), layer-major
 *   tokens     the prompt's embeddings
 *   logits     the top tokens up to cumulative probability desired_logit_prob (at most
 *              max_n_logits), each as the demeaned unembedding column
 * Edge A[t, s] is the direct effect of source s on target t: the gradient of t's input
 * direction (a feature's encoder row, a logit's vector) at s's output (activation times
 * decoder row, summed over a CLT feature's target layers; the error vector; the token
 * embedding) under the frozen backward. Rows are
 * computed batch_size at a time (one backward each) and stored sparse: row t keeps its
 * largest |entries| until they hold edge_mass of the row's absolute sum (1: every nonzero),
 * and the full sum is kept, so row normalisation is exact and each normalised row loses at
 * most 1 - edge_mass of its mass (max_row_edges caps a row's entries as well; what a row
 * lost is in g->max_dropped, a fraction of its mass). Pruning and the scores run on that
 * form, each row normalised by its full sum. */
#ifndef LOUPE_GRAPH_H
#define LOUPE_GRAPH_H

#include "loupe/model.h"

#ifdef __cplusplus
extern "C" {
#endif

struct lp_clt;

/* What a run will hold at its peak: the plan printed before running. */
typedef struct lp_graph_plan {
    int T, n_layers, n_active, n_features, n_logits; /* n_features: the nodes kept of n_active */
    int64_t n_nodes;
    int batch;                  /* rows per backward */
    size_t model_bytes;         /* what the replacement model keeps (frozen.h) */
    size_t backward_bytes;      /* one backward's buffers and its dense row block */
    size_t edge_bytes;          /* the sparse rows at their bound (edge_mass < 1: an estimate) */
    size_t prune_bytes;         /* influence vectors and masks */
    size_t pattern_bytes;       /* every layer's attention patterns [H, T, T], computed once
                                 * and kept when the host budget has room for them (CPU;
                                 * 0: recomputed in each backward instead) */
    size_t host_bytes, device_bytes; /* peak, on the host and on the device (0: CPU) */
} lp_graph_plan;

typedef struct lp_graph_opts {
    int max_n_logits;           /* 10 */
    float desired_logit_prob;   /* 0.95 */
    int batch_size;             /* 512: rows per backward, and the ranking's round unit */
    int max_feature_nodes;      /* 0: every active feature */
    int update_interval;        /* 4 */
    float node_threshold;       /* 0.8 */
    float edge_threshold;       /* 0.98 */
    double edge_mass;           /* 1.0: keep every nonzero edge */
    int max_row_edges;          /* > 0: and at most this many per row (the plan's bound) */
    int keep_first_position;    /* 0 (circuit-tracer): position 0 has no features and a zero
                                 * error; 1: it is treated like any other position */
    int zero_positions;         /* > 1: positions 0 .. zero_positions - 1 have no features and
                                 * a zero error (circuit-tracer: 4 for instruction-tuned Gemma 3,
                                 * whose prompts open "<bos><start_of_turn>user\n"); 0 or 1:
                                 * position 0 only (unless keep_first_position) */
    size_t host_budget;         /* refuse a run whose plan exceeds it (0: no limit) */
    lp_device device;           /* LP_CPU (default), or LP_CUDA: the backward passes and their
                                 * contractions run on the GPU (fp32), one copy back per row
                                 * block; the plan's device_bytes is what it allocates there,
                                 * and a plan over the device's free memory is refused */
    /* called once with the plan before any backward; its status stops the run */
    lp_status (*on_plan)(const lp_graph_plan *p, void *user);
    /* NULL, or called after every backward pass with the rows and passes done so far; its
     * status stops the run (progress, timing) */
    lp_status (*on_block)(int64_t rows_done, int64_t n_backward, void *user);
    void *user;
} lp_graph_opts;

lp_graph_opts lp_graph_defaults(void);

typedef struct lp_graph {
    int T, n_layers, n_logits, d_vocab;
    int32_t *tokens;            /* [T] */
    int n_active;
    int32_t *active;            /* [n_active, 3] (layer, pos, feature) */
    float *act_values;          /* [n_active] */
    int n_features;
    int32_t *selected;          /* [n_features] indices into active, ascending */
    int32_t *logit_ids;         /* [n_logits] */
    float *logit_probs;         /* [n_logits] */
    int64_t n_nodes;            /* n_features + n_layers * T + T + n_logits */
    /* the adjacency, rows by target (CSR): row i's entries are col/val[row_ptr[i] .. row_ptr[i+1]) */
    int64_t *row_ptr;           /* [n_nodes + 1] */
    int32_t *col;
    float *val;
    double *row_abs;            /* [n_nodes] sum of |A[i, :]| before any entry was dropped */
    double max_dropped;         /* the largest fraction of a row's |mass| not stored */
    int64_t n_backward;         /* backward passes run */
    size_t device_bytes;        /* graph.device = cuda: device memory its buffers took, as the
                                 * device reported it (0 on the CPU) */
    /* pruning (node_threshold, edge_threshold) and the scores */
    float node_threshold, edge_threshold; /* what the masks were pruned with */
    uint8_t *node_mask;         /* [n_nodes] */
    uint8_t *edge_mask;         /* [nnz] per stored entry */
    float *cumulative_scores;   /* [n_nodes] */
    double *influence;          /* [n_nodes] node influence on the logits */
    double replacement_score, completeness_score;
} lp_graph;

/* tc: per-layer transcoders or a cross-layer transcoder (clt.h) on the host, reading each
 * layer's MLP input (mlp.hook_in) and writing its MLP output; a CLT feature's edges are
 * summed over the layers it writes to, as circuit-tracer does. */
lp_status lp_graph_build(lp_graph **out, lp_model *m, const struct lp_clt *tc, const int32_t *tokens, int T,
                         const lp_graph_opts *o);
void lp_graph_free(lp_graph *g);
int64_t lp_graph_nnz(const lp_graph *g);
/* The node index of feature k of the selected list, error (L, t), token t, logit i. */
static inline int64_t lp_graph_error_node(const lp_graph *g, int L, int t) { return g->n_features + (int64_t)L * g->T + t; }
static inline int64_t lp_graph_token_node(const lp_graph *g, int t) { return g->n_features + (int64_t)g->n_layers * g->T + t; }
static inline int64_t lp_graph_logit_node(const lp_graph *g, int i) { return g->n_nodes - g->n_logits + i; }

/* ---- pruning and scores on the sparse rows (graph_prune.c) ----
 * As circuit-tracer's prune_graph / compute_graph_scores; exposed for graphs built elsewhere
 * (tests build synthetic ones): n_features, T, n_layers, n_logits, logit_probs, the CSR and
 * row_abs must be set. */
lp_status lp_graph_prune(lp_graph *g, float node_threshold, float edge_threshold);
lp_status lp_graph_scores(lp_graph *g);
/* Influence of every node on the logits through the row-normalised |A| (A + A^2 + ...):
 * infl [n_nodes]; keep: NULL, or a node mask applied to rows and columns (renormalised). */
lp_status lp_graph_influence(const lp_graph *g, const uint8_t *keep, double *infl);

/* ---- circuit-tracer / Neuronpedia graph JSON ----
 * slug, scan and the token strings (T of them, and the logits' n_logits; NULL: "<id>") label
 * the graph; the pruned nodes and edges are written as circuit-tracer's create_graph_files. */
typedef struct lp_graph_json_opts {
    const char *slug, *scan, *prompt;
    const char *const *token_str;   /* [T] */
    const char *const *logit_str;   /* [n_logits] */
} lp_graph_json_opts;
lp_status lp_graph_write_json(const lp_graph *g, const lp_graph_json_opts *o, const char *path);
/* graph-metadata.json in dir: {"graphs": [metadata, ...]}, this graph's entry added (one of
 * the same slug replaced), as circuit-tracer's add_graph_metadata. */
lp_status lp_graph_metadata_add(const char *dir, const lp_graph_json_opts *o, const lp_graph *g);

#ifdef __cplusplus
}
#endif
#endif
