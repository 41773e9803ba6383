/* graph_rows.c: the edges, row block by row block: one frozen backward per block, contracted
 * at each layer's MLP output with the active features' scaled decoder rows and the error
 * vectors and at the embedding with the token embeddings; each dense row is then cut to its
 * sparse form (edge_mass) and appended. The dense block [batch, ncol] is the only N-wide
 * buffer. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attrib/graph_internal.h"

typedef struct sink_ctx {
    graph_work *w;
    int R;
} sink_ctx;

static lp_status sink(int L, const float *G, int R, int Tm, void *user) {
    graph_work *w = ((sink_ctx *)user)->w;
    int D = w->D, T = w->T;
    int64_t nc = w->ncol;
    if (L < 0) { /* token embeddings */
        int64_t off = w->n_active + (int64_t)w->NL * T;
        for (int r = 0; r < R; r++)
            for (int t = 0; t < Tm; t++)
                w->rowbuf[r * nc + off + t] = cblas_sdot(D, G + ((size_t)r * Tm + t) * D, 1, lp_frozen_embed(w->fz) + (size_t)t * D, 1);
        return LP_OK;
    }
    /* features writing to layer L (a CLT's from every layer l <= L), a run of equal
     * positions at a time: their activation-scaled decoder rows at L against G */
    for (int l = 0; l <= L; l++) {
        if (lp_clt_n_out(w->tc, l) <= L - l) continue;
        for (int j = w->layer_start[l]; j < w->layer_start[l + 1];) {
            int t = w->active[3 * j + 1], e = j;
            while (e < w->layer_start[l + 1] && w->active[3 * e + 1] == t) e++;
            if (t < Tm) {
                for (int k = j; k < e; k++) {
                    const float *dv = lp_clt_dec_vec(w->tc, l, w->active[3 * k + 2], L);
                    for (int i = 0; i < D; i++) w->gather[(size_t)(k - j) * D + i] = w->actv[k] * dv[i];
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, e - j, D, 1.0f, G + (size_t)t * D, Tm * D, w->gather, D,
                            1.0f, w->rowbuf + j, (int)nc);
            }
            j = e;
        }
    }
    int64_t off = w->n_active + (int64_t)L * T;
    for (int r = 0; r < R; r++)
        for (int t = 0; t < Tm; t++)
            w->rowbuf[r * nc + off + t] = cblas_sdot(D, G + ((size_t)r * Tm + t) * D, 1, w->err + ((size_t)L * T + t) * D, 1);
    return LP_OK;
}

typedef struct absidx {
    float a;
    int32_t i;
} absidx;

static int by_abs_desc(const void *x, const void *y) {
    const absidx *p = x, *q = y;
    if (p->a != q->a) return p->a < q->a ? 1 : -1;
    return p->i < q->i ? -1 : p->i > q->i;
}

static lp_status grow(graph_work *w, int64_t need_nnz) {
    if (w->n_rows + 1 >= w->cap_rows) {
        int64_t c = w->cap_rows ? 2 * w->cap_rows : 256;
        int64_t *a = realloc(w->row_node, c * sizeof *a), *b = a ? realloc(w->row_start, (c + 1) * sizeof *b) : NULL;
        double *d = b ? realloc(w->row_abs, c * sizeof *d) : NULL;
        if (a) w->row_node = a;
        if (b) w->row_start = b;
        if (d) w->row_abs = d;
        if (!a || !b || !d) LP_FAIL(LP_ERR_OOM, "out of memory for %lld graph rows", (long long)c);
        w->cap_rows = c;
    }
    if (w->nnz + need_nnz > w->cap_nnz) {
        int64_t c = w->cap_nnz ? w->cap_nnz : 1 << 16;
        while (c < w->nnz + need_nnz) c *= 2;
        int32_t *a = realloc(w->col, c * sizeof *a);
        float *b = a ? realloc(w->val, c * sizeof *b) : NULL;
        if (a) w->col = a;
        if (b) w->val = b;
        if (!a || !b) LP_FAIL(LP_ERR_OOM, "out of memory for %lld graph edges", (long long)c);
        w->cap_nnz = c;
    }
    return LP_OK;
}

/* Appends dense row v (ncol) cut to its edge_mass form. */
static lp_status keep_row(graph_work *w, const float *v, int64_t node, absidx *tmp) {
    int64_t nc = w->ncol, n = 0;
    double sum = 0;
    for (int64_t i = 0; i < nc; i++)
        if (v[i] != 0.0f) {
            tmp[n].a = fabsf(v[i]);
            tmp[n++].i = (int32_t)i;
            sum += fabs(v[i]);
        }
    int64_t keep = n, cap = w->o->max_row_edges > 0 ? w->o->max_row_edges : n;
    int cut = (w->o->edge_mass < 1.0 || cap < n) && n > 0;
    if (cut) {
        qsort(tmp, n, sizeof *tmp, by_abs_desc);
        double acc = 0, goal = w->o->edge_mass < 1.0 ? w->o->edge_mass * sum : INFINITY;
        for (keep = 0; keep < n && keep < cap && acc < goal; keep++) acc += tmp[keep].a;
        if (sum > 0 && 1.0 - acc / sum > w->max_dropped) w->max_dropped = 1.0 - acc / sum;
    }
    LP_CHECK(grow(w, keep));
    if (w->n_rows == 0) w->row_start[0] = 0;
    int64_t s = w->nnz;
    if (cut) {
        /* columns of the kept entries, ascending */
        int32_t *cols = (int32_t *)tmp;
        for (int64_t a = 0; a < keep; a++) cols[a] = tmp[a].i;
        for (int64_t a = 1; a < keep; a++) { /* insertion sort is fine: rows are short once cut */
            int32_t x = cols[a];
            int64_t b = a - 1;
            while (b >= 0 && cols[b] > x) cols[b + 1] = cols[b], b--;
            cols[b + 1] = x;
        }
        for (int64_t a = 0; a < keep; a++) w->col[s + a] = cols[a], w->val[s + a] = v[cols[a]];
    } else {
        for (int64_t a = 0; a < keep; a++) w->col[s + a] = tmp[a].i, w->val[s + a] = v[tmp[a].i];
    }
    w->nnz += keep;
    w->row_node[w->n_rows] = node;
    w->row_abs[w->n_rows] = sum;
    w->row_start[++w->n_rows] = w->nnz;
    return LP_OK;
}

lp_status graph_rows(graph_work *w, int R, const int *layer, const int *pos, const float *vec, const int64_t *node) {
    if (w->dev)
        LP_CHECK(graph_dev_rows(w, R, layer, pos, vec));
    else {
        memset(w->rowbuf, 0, (size_t)R * w->ncol * sizeof(float));
        sink_ctx sc = {w, R};
        LP_CHECK(lp_frozen_backward(w->fz, R, layer, pos, vec, w->skip, sink, &sc));
    }
    w->n_backward++;
    absidx *tmp = malloc(w->ncol * sizeof *tmp);
    if (!tmp) LP_FAIL(LP_ERR_OOM, "out of memory for a graph row");
    lp_status st = LP_OK;
    for (int r = 0; r < R && st == LP_OK; r++) st = keep_row(w, w->rowbuf + (size_t)r * w->ncol, node[r], tmp);
    free(tmp);
    if (st == LP_OK && w->o->on_block) st = w->o->on_block(w->n_rows, w->n_backward, w->o->user);
    return st;
}

lp_status graph_partial_influence(const graph_work *w, double *infl) {
    int64_t n = w->ncol + w->n_logits;
    double *prod = calloc(n, sizeof *prod), *next = calloc(n, sizeof *next);
    if (!prod || !next) {
        free(prod), free(next);
        LP_FAIL(LP_ERR_OOM, "out of memory for the influence ranking");
    }
    memset(infl, 0, n * sizeof *infl);
    for (int i = 0; i < w->n_logits; i++) prod[w->ncol + i] = w->logit_p[i];
    lp_status st = LP_ERR(LP_ERR_INTERNAL, "influence ranking: no convergence in 128 steps");
    for (int it = 0; it < 128; it++) {
        memset(next, 0, n * sizeof *next);
        int any = 0;
        for (int64_t k = 0; k < w->n_rows; k++) {
            double x = prod[w->row_node[k]];
            if (x == 0) continue;
            double s = x / (w->row_abs[k] > 1e-8 ? w->row_abs[k] : 1e-8);
            for (int64_t e = w->row_start[k]; e < w->row_start[k + 1]; e++) next[w->col[e]] += s * fabs(w->val[e]);
        }
        for (int64_t i = 0; i < n; i++)
            if (next[i] != 0) any = 1, infl[i] += next[i];
        double *t = prod;
        prod = next, next = t;
        if (!any) {
            st = LP_OK;
            break;
        }
    }
    free(prod), free(next);
    return st;
}

void graph_work_rows_free(graph_work *w) {
    free(w->row_node), free(w->row_start), free(w->row_abs), free(w->col), free(w->val), free(w->rowbuf), free(w->gather);
}
