/* graph_internal.h: host/attrib/graph*.c, the attribution graph (graph.h). graph.c sets up
 * the nodes and the plan, graph_rows.c runs the backward passes and keeps the sparse rows,
 * graph_prune.c prunes and scores, graph_json.c writes the viewer's JSON. */
#ifndef LOUPE_ATTRIB_GRAPH_INTERNAL_H
#define LOUPE_ATTRIB_GRAPH_INTERNAL_H

#include "loupe/clt.h"
#include "loupe/frozen.h"
#include "loupe/graph.h"

/* What the backward passes need: the nodes in the column space of every active feature
 * (active, then errors layer-major, then tokens), before the selection drops columns. */
typedef struct graph_dev graph_dev;

typedef struct graph_work {
    lp_frozen *fz;
    const lp_config *mc;    /* the model's */
    graph_dev *dev;         /* graph.device = cuda: the device half (graph_dev.c), else NULL */
    const lp_graph_opts *o;
    int T, NL, D;
    int n_active, n_logits;
    int32_t *active;        /* [n_active, 3] */
    const lp_clt *tc;
    float *enc;             /* [n_active, D]: encoder rows */
    float *gather;          /* [d_sae, D] one position's scaled decoder rows */
    float *actv;            /* [n_active] activations */
    int *layer_start;       /* [NL + 1] first active index of each layer */
    float *err;             /* [NL, T, D] */
    float *logit_vec;       /* [n_logits, D] */
    float *logit_p;         /* [n_logits] */
    const float **skip;     /* [NL] W_skip or NULL */
    int64_t ncol;           /* n_active + NL * T + T */
    /* the rows so far, in the order computed: node (active index, or ncol + logit) */
    int64_t n_rows, cap_rows;
    int64_t *row_node, *row_start; /* row_start [n_rows + 1] */
    double *row_abs;
    int64_t nnz, cap_nnz;
    int32_t *col;
    float *val;
    float *rowbuf;          /* [batch, ncol] one backward's dense rows */
    int64_t n_backward;
    double max_dropped;
} graph_work;

/* Runs the backward for rows (layer, pos, vec) and stores them for nodes node[]. */
lp_status graph_rows(graph_work *w, int R, const int *layer, const int *pos, const float *vec, const int64_t *node);
/* circuit-tracer's compute_partial_influences over the rows so far: infl [ncol + n_logits]. */
lp_status graph_partial_influence(const graph_work *w, double *infl);
/* graph_sel.c: the plan; the rows in circuit-tracer's order (visited[n_active]: the features
 * whose rows were computed); the rows into node order as g's CSR. */
lp_status graph_plan(graph_work *w, const lp_config *c, int n_feat, lp_graph_plan *pl);
lp_status graph_select_rows(graph_work *w, uint8_t *visited, int n_feat);
lp_status graph_assemble(graph_work *w, lp_graph *g, const uint8_t *visited);
void graph_work_rows_free(graph_work *w);
/* graph_dev.c: the device bytes of the plan; the device set up (w->rowbuf becomes a pinned
 * block); one block's dense rows into w->rowbuf; the device bytes allocated as the device
 * reported them; everything released (w->rowbuf too). */
lp_status graph_dev_check(void); /* a usable GPU, or the refusal naming graph.device */
size_t graph_dev_bytes(const graph_work *w, const lp_config *c);
lp_status graph_dev_start(graph_work *w, const lp_graph_plan *pl);
lp_status graph_dev_rows(graph_work *w, int R, const int *layer, const int *pos, const float *vec);
size_t graph_dev_measured(const graph_work *w);
void graph_dev_free(graph_work *w);

#endif
