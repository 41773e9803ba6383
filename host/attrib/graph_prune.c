/* graph_prune.c: circuit-tracer's prune_graph and compute_graph_scores on the sparse rows.
 * Memory is the stored entries plus a few vectors over the nodes: no N x N buffer. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/graph.h"

static double *logit_weights(const lp_graph *g) {
    double *w = calloc(g->n_nodes, sizeof *w);
    for (int i = 0; w && i < g->n_logits; i++) w[g->n_nodes - g->n_logits + i] = g->logit_probs[i];
    return w;
}

/* Row sums of |A| over kept rows and columns (keep NULL: the stored full sums). */
static double *row_sums(const lp_graph *g, const uint8_t *keep) {
    double *s = calloc(g->n_nodes, sizeof *s);
    for (int64_t i = 0; s && i < g->n_nodes; i++) {
        if (!keep) {
            s[i] = g->row_abs[i];
            continue;
        }
        if (!keep[i]) continue;
        for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1]; e++)
            if (keep[g->col[e]]) s[i] += fabs(g->val[e]);
    }
    return s;
}

lp_status lp_graph_influence(const lp_graph *g, const uint8_t *keep, double *infl) {
    int64_t N = g->n_nodes;
    double *s = row_sums(g, keep), *cur = logit_weights(g), *next = calloc(N, sizeof *next);
    lp_status st = s && cur && next ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory for node influence");
    if (st == LP_OK) memset(infl, 0, N * sizeof *infl);
    /* influence = w A + w A^2 + ...: A is nilpotent (edges go from earlier to later nodes) */
    for (int it = 0; st == LP_OK; it++) {
        if (it > 1000) {
            st = LP_ERR(LP_ERR_INTERNAL, "node influence: no convergence after 1000 steps");
            break;
        }
        memset(next, 0, N * sizeof *next);
        int any = 0;
        for (int64_t i = 0; i < N; i++) {
            if (cur[i] == 0 || (keep && !keep[i])) continue;
            double f = cur[i] / (s[i] > 1e-10 ? s[i] : 1e-10);
            for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1]; e++)
                if (!keep || keep[g->col[e]]) next[g->col[e]] += f * fabs(g->val[e]);
        }
        for (int64_t i = 0; i < N; i++)
            if (next[i] != 0) any = 1, infl[i] += next[i];
        double *t = cur;
        cur = next, next = t;
        if (!any) break;
    }
    free(s), free(cur), free(next);
    return st;
}

static int by_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* find_threshold: the score at which the sorted scores' cumulative share reaches frac. */
static double find_threshold(double *sorted, int64_t n, int64_t n_total, double frac) {
    qsort(sorted, n, sizeof *sorted, by_desc);
    double tot = 0, acc = 0;
    for (int64_t i = 0; i < n; i++) tot += sorted[i];
    for (int64_t i = 0; i < n; i++) {
        acc += sorted[i];
        if (acc / tot >= frac) return sorted[i];
    }
    return n < n_total ? 0.0 : (n ? sorted[n - 1] : 0.0);
}

typedef struct vi {
    double v;
    int64_t i;
} vi;
static int vi_desc(const void *a, const void *b) {
    const vi *x = a, *y = b;
    if (x->v != y->v) return x->v < y->v ? 1 : -1;
    return (x->i > y->i) - (x->i < y->i);
}

/* Features and errors need a kept outgoing edge; features a kept incoming one; repeated. */
static void refine(lp_graph *g, uint8_t *nm, uint8_t *em) {
    int64_t N = g->n_nodes, src_end = N - g->n_logits - g->T;
    uint8_t *out = malloc(N);
    if (!out) return;
    for (int changed = 1; changed;) {
        changed = 0;
        memset(out, 0, N);
        for (int64_t i = 0; i < N; i++)
            for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1]; e++) {
                if (em[e] && (!nm[i] || !nm[g->col[e]])) em[e] = 0;
                if (em[e]) out[g->col[e]] = 1;
            }
        for (int64_t i = 0; i < src_end; i++) {
            int in = 0;
            if (i < g->n_features)
                for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1] && !in; e++) in = em[e];
            uint8_t keep = nm[i] && out[i] && (i >= g->n_features || in);
            if (keep != nm[i]) nm[i] = keep, changed = 1;
        }
    }
    free(out);
}

lp_status lp_graph_prune(lp_graph *g, float node_threshold, float edge_threshold) {
    if (!(node_threshold >= 0 && node_threshold <= 1 && edge_threshold >= 0 && edge_threshold <= 1))
        LP_FAIL(LP_ERR_ARG, "graph: node_threshold and edge_threshold must be within [0, 1]");
    int64_t N = g->n_nodes, nnz = g->row_ptr[N];
    g->node_threshold = node_threshold, g->edge_threshold = edge_threshold;
    free(g->node_mask), free(g->edge_mask), free(g->cumulative_scores), free(g->influence);
    g->node_mask = calloc(N, 1), g->edge_mask = calloc(nnz + 1, 1);
    g->cumulative_scores = calloc(N, sizeof(float)), g->influence = calloc(N, sizeof(double));
    double *tmp = malloc((N > nnz ? N : nnz + 1) * sizeof(double)), *ip = calloc(N, sizeof(double)), *w = logit_weights(g);
    double *s = NULL;
    lp_status st = g->node_mask && g->edge_mask && g->cumulative_scores && g->influence && tmp && ip && w
                       ? lp_graph_influence(g, NULL, g->influence)
                       : LP_ERR(LP_ERR_OOM, "out of memory for pruning");
    if (st == LP_OK) {
        memcpy(tmp, g->influence, N * sizeof(double));
        double thr = find_threshold(tmp, N, N, node_threshold);
        for (int64_t i = 0; i < N; i++) g->node_mask[i] = g->influence[i] >= thr || i >= N - g->n_logits - g->T;
        st = lp_graph_influence(g, g->node_mask, ip);
    }
    if (st == LP_OK && !(s = row_sums(g, g->node_mask))) st = LP_ERR(LP_ERR_OOM, "out of memory for pruning");
    if (st == LP_OK) { /* edge scores: normalised pruned |A| times (influence + logit weight) of the target */
        int64_t n = 0;
        for (int64_t i = 0; i < N; i++)
            for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1]; e++) {
                double sc = g->node_mask[i] && g->node_mask[g->col[e]] ? fabs(g->val[e]) / (s[i] > 1e-10 ? s[i] : 1e-10) * (ip[i] + w[i]) : 0;
                if (sc > 0) tmp[n++] = sc;
            }
        double thr = find_threshold(tmp, n, N * N, edge_threshold);
        for (int64_t i = 0; i < N; i++)
            for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1]; e++) {
                double sc = g->node_mask[i] && g->node_mask[g->col[e]] ? fabs(g->val[e]) / (s[i] > 1e-10 ? s[i] : 1e-10) * (ip[i] + w[i]) : 0;
                g->edge_mask[e] = sc >= thr && sc > 0;
            }
        refine(g, g->node_mask, g->edge_mask);
        vi *o = (vi *)malloc(N * sizeof(vi));
        if (!o) st = LP_ERR(LP_ERR_OOM, "out of memory for pruning");
        double tot = 0, acc = 0;
        for (int64_t i = 0; o && i < N; i++) o[i].v = g->influence[i], o[i].i = i, tot += g->influence[i];
        if (o) qsort(o, N, sizeof *o, vi_desc);
        for (int64_t k = 0; o && k < N; k++) acc += o[k].v, g->cumulative_scores[o[k].i] = (float)(acc / tot);
        free(o);
    }
    free(tmp), free(ip), free(w), free(s);
    return st;
}

lp_status lp_graph_scores(lp_graph *g) {
    int64_t N = g->n_nodes, err0 = g->n_features, err1 = err0 + (int64_t)g->n_layers * g->T, tok1 = err1 + g->T;
    double *infl = malloc(N * sizeof *infl), *w = logit_weights(g);
    lp_status st = infl && w ? lp_graph_influence(g, NULL, infl) : LP_ERR(LP_ERR_OOM, "out of memory for the graph scores");
    if (st == LP_OK) {
        double tok = 0, err = 0, num = 0, den = 0;
        for (int64_t i = err1; i < tok1; i++) tok += infl[i];
        for (int64_t i = err0; i < err1; i++) err += infl[i];
        g->replacement_score = tok / (tok + err);
        for (int64_t i = 0; i < N; i++) {
            double e = 0, s = g->row_abs[i] > 1e-10 ? g->row_abs[i] : 1e-10;
            for (int64_t k = g->row_ptr[i]; k < g->row_ptr[i + 1]; k++)
                if (g->col[k] >= err0 && g->col[k] < err1) e += fabs(g->val[k]) / s;
            num += (1 - e) * (infl[i] + w[i]);
            den += infl[i] + w[i];
        }
        g->completeness_score = num / den;
    }
    free(infl), free(w);
    return st;
}
