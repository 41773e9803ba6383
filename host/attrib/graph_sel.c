/* graph_sel.c: the memory plan, the order rows are computed in (circuit-tracer's attribute():
 * logits first, then every feature in index order, or max_feature_nodes of them chosen by
 * partial influence, update_interval * batch_size per round), and the assembly of the rows
 * into node order. */
#include <stdlib.h>
#include <string.h>

#include "attrib/graph_internal.h"

lp_status graph_plan(graph_work *w, const lp_config *c, int n_feat, lp_graph_plan *pl) {
    int B = w->o->batch_size;
    int64_t rows = (int64_t)n_feat + w->n_logits, n_nodes = rows + (int64_t)w->NL * w->T + w->T;
    int64_t per_row = w->o->max_row_edges > 0 && w->o->max_row_edges < w->ncol ? w->o->max_row_edges : w->ncol;
    size_t D = w->D;
    pl->T = w->T, pl->n_layers = w->NL, pl->n_active = w->n_active, pl->n_features = n_feat, pl->n_logits = w->n_logits;
    pl->n_nodes = n_nodes, pl->batch = B;
    pl->model_bytes = lp_frozen_bytes(c, w->T) + (size_t)w->n_active * (2 * D + 4) * 4 + (size_t)w->NL * w->T * D * 4;
    pl->backward_bytes = lp_frozen_backward_bytes(c, w->T, B) + (size_t)B * w->ncol * 4 + (size_t)w->ncol * 8;
    /* stored entries (8 bytes) with doubling slack, then a second copy while assembling */
    size_t edges = (size_t)rows * per_row;
    pl->edge_bytes = 2 * edges * 8 + (size_t)rows * 32;
    /* influence vectors, masks and scores; edge masks and the sorted edge scores */
    pl->prune_bytes = (size_t)n_nodes * 48 + edges * 9;
    pl->device_bytes = w->o->device == LP_CUDA ? graph_dev_bytes(w, c) : 0;
    if (pl->device_bytes) /* the host keeps only the pinned row block of a backward */
        pl->backward_bytes = (size_t)B * w->ncol * 4 + (size_t)w->ncol * 8;
    pl->host_bytes = pl->model_bytes + pl->backward_bytes + pl->edge_bytes + pl->prune_bytes;
    /* Cached patterns spare every backward its H T^2 exponentials per layer; only under a
     * stated budget they fit in (with no budget, nothing unasked-for is allocated). */
    size_t pat = lp_frozen_pattern_bytes(c, w->T);
    pl->pattern_bytes = !pl->device_bytes && w->o->host_budget && pl->host_bytes + pat <= w->o->host_budget ? pat : 0;
    pl->host_bytes += pl->pattern_bytes;
    return LP_OK;
}

typedef struct rank {
    double p;
    int i;
} rank;
static int by_rank(const void *a, const void *b) {
    const rank *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->i - y->i;
}

/* One backward per batch_size features of idx[0..n). */
static lp_status feature_rows(graph_work *w, const int *idx, int n, uint8_t *visited) {
    int B = w->o->batch_size, D = w->D;
    int *layer = malloc(B * sizeof(int)), *pos = malloc(B * sizeof(int));
    int64_t *node = malloc(B * sizeof(int64_t));
    float *vec = malloc((size_t)B * D * sizeof(float));
    lp_status st = layer && pos && node && vec ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory for a batch of rows");
    for (int s = 0; s < n && st == LP_OK; s += B) {
        int R = n - s < B ? n - s : B;
        for (int r = 0; r < R; r++) {
            int j = idx[s + r];
            layer[r] = w->active[3 * j], pos[r] = w->active[3 * j + 1], node[r] = j;
            memcpy(vec + (size_t)r * D, w->enc + (size_t)j * D, D * sizeof(float));
            visited[j] = 1;
        }
        st = graph_rows(w, R, layer, pos, vec, node);
    }
    free(layer), free(pos), free(node), free(vec);
    return st;
}

lp_status graph_select_rows(graph_work *w, uint8_t *visited, int n_feat) {
    int B = w->o->batch_size;
    for (int i = 0; i < w->n_logits; i += B) {
        int R = w->n_logits - i < B ? w->n_logits - i : B, layer[R], pos[R];
        int64_t node[R];
        for (int r = 0; r < R; r++) layer[r] = w->NL, pos[r] = w->T - 1, node[r] = w->ncol + i + r;
        LP_CHECK(graph_rows(w, R, layer, pos, w->logit_vec + (size_t)i * w->D, node));
    }
    int *idx = malloc((w->n_active + 1) * sizeof(int));
    rank *rk = n_feat < w->n_active ? malloc(w->n_active * sizeof *rk) : NULL;
    double *infl = rk ? malloc((w->ncol + w->n_logits) * sizeof *infl) : NULL;
    if (!idx || (n_feat < w->n_active && !infl)) {
        free(idx), free(rk), free(infl);
        LP_FAIL(LP_ERR_OOM, "out of memory for the feature order");
    }
    lp_status st = LP_OK;
    if (n_feat == w->n_active) {
        for (int j = 0; j < w->n_active; j++) idx[j] = j;
        st = feature_rows(w, idx, w->n_active, visited);
    }
    for (int done = 0; n_feat < w->n_active && done < n_feat && st == LP_OK;) {
        st = graph_partial_influence(w, infl);
        if (st != LP_OK) break;
        for (int j = 0; j < w->n_active; j++) rk[j].p = (float)infl[j], rk[j].i = j;
        qsort(rk, w->n_active, sizeof *rk, by_rank);
        int q = w->o->update_interval * B, n = 0;
        if (q > n_feat - done) q = n_feat - done;
        for (int j = 0; j < w->n_active && n < q; j++)
            if (!visited[rk[j].i]) idx[n++] = rk[j].i;
        st = feature_rows(w, idx, n, visited);
        done += n;
    }
    free(idx), free(rk), free(infl);
    return st;
}

lp_status graph_assemble(graph_work *w, lp_graph *g, const uint8_t *visited) {
    int nf = 0;
    for (int j = 0; j < w->n_active; j++) nf += visited[j];
    g->n_active = w->n_active, g->n_features = nf, g->n_logits = w->n_logits, g->max_dropped = w->max_dropped;
    g->n_nodes = nf + (int64_t)w->NL * w->T + w->T + w->n_logits;
    int64_t N = g->n_nodes, shift = w->n_active - nf;
    int32_t *map = malloc((w->n_active + 1) * sizeof(int32_t));
    int64_t *row_of = malloc(N * sizeof(int64_t));
    g->active = malloc((size_t)(w->n_active + 1) * 3 * sizeof(int32_t));
    g->act_values = malloc((w->n_active + 1) * sizeof(float));
    g->selected = malloc((nf + 1) * sizeof(int32_t));
    g->logit_probs = malloc(w->n_logits * sizeof(float));
    g->row_ptr = calloc(N + 1, sizeof(int64_t));
    g->row_abs = calloc(N, sizeof(double));
    g->col = malloc((w->nnz + 1) * sizeof(int32_t));
    g->val = malloc((w->nnz + 1) * sizeof(float));
    if (!map || !row_of || !g->active || !g->act_values || !g->selected || !g->logit_probs || !g->row_ptr || !g->row_abs || !g->col ||
        !g->val) {
        free(map), free(row_of);
        LP_FAIL(LP_ERR_OOM, "out of memory for the graph's %lld nodes", (long long)N);
    }
    memcpy(g->active, w->active, (size_t)w->n_active * 3 * sizeof(int32_t));
    memcpy(g->act_values, w->actv, w->n_active * sizeof(float));
    memcpy(g->logit_probs, w->logit_p, w->n_logits * sizeof(float));
    for (int j = 0, k = 0; j < w->n_active; j++) map[j] = visited[j] ? (g->selected[k] = j, k++) : -1;
    for (int64_t i = 0; i < N; i++) row_of[i] = -1;
    for (int64_t k = 0; k < w->n_rows; k++) {
        int64_t nd = w->row_node[k];
        row_of[nd >= w->ncol ? N - w->n_logits + (nd - w->ncol) : map[nd]] = k;
    }
    /* rows in node order; feature columns not selected are dropped (their mass leaves the row sum) */
    int64_t e = 0;
    for (int64_t i = 0; i < N; i++) {
        int64_t k = row_of[i];
        if (k >= 0) {
            double abs_sum = w->row_abs[k];
            for (int64_t a = w->row_start[k]; a < w->row_start[k + 1]; a++) {
                int32_t c = w->col[a];
                int64_t nc = c < w->n_active ? map[c] : c - shift;
                if (nc < 0) {
                    abs_sum -= w->val[a] < 0 ? -w->val[a] : w->val[a];
                    continue;
                }
                g->col[e] = (int32_t)nc, g->val[e++] = w->val[a];
            }
            g->row_abs[i] = abs_sum > 0 ? abs_sum : 0;
        }
        g->row_ptr[i + 1] = e;
    }
    free(map), free(row_of);
    return LP_OK;
}
