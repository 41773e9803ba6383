/* graph.c: an attribution graph for one prompt (graph.h): the replacement model's forward,
 * the nodes (active features, errors, tokens, logit targets), the memory plan, the rows in
 * circuit-tracer's order (logits, then features: all, or by influence round by round), the
 * assembly into node order, pruning and scores. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attrib/graph_internal.h"
#include "loupe/sae.h"

lp_graph_opts lp_graph_defaults(void) {
    lp_graph_opts o = {.max_n_logits = 10, .desired_logit_prob = 0.95f, .batch_size = 512, .max_feature_nodes = 0,
                       .update_interval = 4, .node_threshold = 0.8f, .edge_threshold = 0.98f, .edge_mass = 1.0};
    return o;
}

static int by_f_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* The transcoder's activations of one layer [T, d_sae] (position 0 zeroed, as circuit-tracer). */
static void encode(const lp_sae *s, const float *x, int T, int D, float *acts) {
    int S = s->cfg.d_sae;
    for (int t = 0; t < T; t++) memcpy(acts + (size_t)t * S, s->b_enc, S * sizeof(float));
    float *xin = NULL;
    if (s->cfg.apply_b_dec_to_input && (xin = malloc((size_t)T * D * sizeof(float))))
        for (size_t i = 0; i < (size_t)T * D; i++) xin[i] = x[i] - s->b_dec[i % D];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, S, D, 1.0f, xin ? xin : x, D, s->W_enc, S, 1.0f, acts, S);
    free(xin);
    for (int t = 0; t < T; t++) {
        float *a = acts + (size_t)t * S;
        if (s->cfg.arch == LP_SAE_TOPK && s->cfg.k < S) { /* keep the k largest (ties aside), relu'd */
            float *srt = malloc(S * sizeof(float));
            if (srt) {
                memcpy(srt, a, S * sizeof(float));
                qsort(srt, S, sizeof(float), by_f_desc);
                float kth = srt[s->cfg.k - 1];
                for (int j = 0; j < S; j++)
                    if (a[j] < kth) a[j] = 0.0f;
                free(srt);
            }
        }
        for (int j = 0; j < S; j++) {
            float v = a[j];
            if (s->threshold) a[j] = v > s->threshold[j] ? v : 0.0f;
            else a[j] = v > 0 ? v : 0.0f;
        }
    }
    memset(acts, 0, S * sizeof(float));
}

static lp_status setup_features(graph_work *w, lp_sae *const *tcs) {
    int T = w->T, D = w->D, NL = w->NL;
    size_t cap = 0;
    w->layer_start = calloc(NL + 1, sizeof(int));
    w->err = malloc((size_t)NL * T * D * sizeof(float));
    w->skip = calloc(NL, sizeof(float *));
    if (!w->layer_start || !w->err || !w->skip) LP_FAIL(LP_ERR_OOM, "out of memory for the graph's nodes");
    for (int L = 0; L < NL; L++) {
        const lp_sae *s = tcs[L];
        int S = s->cfg.d_sae;
        if (s->device != LP_CPU || s->cfg.d_in != D || s->cfg.d_out != D)
            LP_FAIL(LP_ERR_SHAPE, "transcoder %d: needs a host transcoder %d -> %d (has %d -> %d)", L, D, D, s->cfg.d_in, s->cfg.d_out);
        w->skip[L] = s->W_skip;
        const float *x = lp_frozen_mlp_in(w->fz, L), *y = lp_frozen_mlp_out(w->fz, L);
        float *acts = malloc((size_t)T * S * sizeof(float)), *rec = malloc((size_t)T * D * sizeof(float));
        if (!acts || !rec) {
            free(acts), free(rec);
            LP_FAIL(LP_ERR_OOM, "out of memory for transcoder %d's activations", L);
        }
        encode(s, x, T, D, acts);
        /* reconstruction = acts W_dec + b_dec (+ x W_skip); error = MLP out - reconstruction */
        for (int t = 0; t < T; t++) memcpy(rec + (size_t)t * D, s->b_dec, D * sizeof(float));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, D, S, 1.0f, acts, S, s->W_dec, D, 1.0f, rec, D);
        if (s->W_skip) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, D, D, 1.0f, x, D, s->W_skip, D, 1.0f, rec, D);
        for (size_t i = 0; i < (size_t)T * D; i++) w->err[(size_t)L * T * D + i] = i < (size_t)D ? 0.0f : y[i] - rec[i];
        w->layer_start[L] = w->n_active;
        lp_status st = LP_OK;
        for (int t = 0; t < T && st == LP_OK; t++)
            for (int j = 0; j < S; j++) {
                float a = acts[(size_t)t * S + j];
                if (a == 0.0f) continue;
                if ((size_t)w->n_active == cap) {
                    cap = cap ? 2 * cap : 1024;
                    int32_t *na = realloc(w->active, cap * 3 * sizeof(int32_t));
                    float *ne = na ? realloc(w->enc, cap * D * sizeof(float)) : NULL, *nd = ne ? realloc(w->dec, cap * D * sizeof(float)) : NULL;
                    float *nv = nd ? realloc(w->actv, cap * sizeof(float)) : NULL;
                    if (na) w->active = na;
                    if (ne) w->enc = ne;
                    if (nd) w->dec = nd;
                    if (nv) w->actv = nv;
                    if (!nv) {
                        st = LP_ERR(LP_ERR_OOM, "out of memory for %zu active features", cap);
                        break;
                    }
                }
                int k = w->n_active++;
                w->active[3 * k] = L, w->active[3 * k + 1] = t, w->active[3 * k + 2] = j;
                w->actv[k] = a;
                for (int i = 0; i < D; i++) {
                    w->enc[(size_t)k * D + i] = s->W_enc[(size_t)i * S + j];
                    w->dec[(size_t)k * D + i] = a * s->W_dec[(size_t)j * D + i];
                }
            }
        free(acts), free(rec);
        LP_CHECK(st);
    }
    w->layer_start[NL] = w->n_active;
    return LP_OK;
}

typedef struct pidx {
    double p;
    int i;
} pidx;
static int by_p_desc(const void *a, const void *b) {
    const pidx *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return x->i - y->i;
}

/* The logit targets: top tokens until cumulative probability >= desired (at most max_n_logits). */
static lp_status setup_logits(graph_work *w, int V, int32_t **ids) {
    const float *lg = lp_frozen_logits(w->fz), *WU = lp_frozen_unembed(w->fz);
    int D = w->D, k = w->o->max_n_logits < V ? w->o->max_n_logits : V;
    pidx *p = malloc((size_t)V * sizeof *p);
    if (!p) LP_FAIL(LP_ERR_OOM, "out of memory for the logits");
    double mx = -INFINITY, sum = 0;
    for (int v = 0; v < V; v++) mx = lg[v] > mx ? lg[v] : mx;
    for (int v = 0; v < V; v++) sum += (p[v].p = exp(lg[v] - mx)), p[v].i = v;
    for (int v = 0; v < V; v++) p[v].p /= sum;
    qsort(p, V, sizeof *p, by_p_desc);
    int n = 0;
    double cum = 0;
    while (n < k) { /* searchsorted(cumsum, desired) + 1 */
        cum += (float)p[n].p;
        n++;
        if ((float)cum >= w->o->desired_logit_prob) break;
    }
    w->n_logits = n;
    *ids = malloc(n * sizeof(int32_t));
    w->logit_p = malloc(n * sizeof(float));
    w->logit_vec = calloc((size_t)n * D, sizeof(float));
    double *mean = calloc(D, sizeof(double));
    lp_status st = *ids && w->logit_p && w->logit_vec && mean ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory for the logits");
    for (int v = 0; st == LP_OK && v < V; v++)
        for (int i = 0; i < D; i++) mean[i] += WU[(size_t)v * D + i];
    for (int a = 0; st == LP_OK && a < n; a++) {
        (*ids)[a] = p[a].i;
        w->logit_p[a] = (float)p[a].p;
        for (int i = 0; i < D; i++) w->logit_vec[(size_t)a * D + i] = (float)(WU[(size_t)p[a].i * D + i] - mean[i] / V);
    }
    free(mean), free(p);
    return st;
}


static void work_free(graph_work *w) {
    lp_frozen_free(w->fz);
    free(w->active), free(w->enc), free(w->dec), free(w->actv), free(w->layer_start), free(w->err), free(w->logit_vec), free(w->logit_p);
    free(w->skip);
    graph_work_rows_free(w);
}

lp_status lp_graph_build(lp_graph **out, lp_model *m, lp_sae *const *tcs, const int32_t *tokens, int T, const lp_graph_opts *o) {
    *out = NULL;
    const lp_config *c = lp_model_config(m);
    if (o->batch_size < 1 || o->update_interval < 1 || o->max_n_logits < 1 || o->edge_mass <= 0 || o->edge_mass > 1)
        LP_FAIL(LP_ERR_ARG, "graph options: batch_size, update_interval, max_n_logits >= 1 and 0 < edge_mass <= 1");
    graph_work w = {.o = o, .T = T, .NL = c->n_layers, .D = c->d_model};
    lp_graph *g = calloc(1, sizeof *g);
    if (!g) LP_FAIL(LP_ERR_OOM, "out of memory for a graph");
    g->T = T, g->n_layers = c->n_layers, g->d_vocab = c->d_vocab;
    lp_status st = lp_frozen_new(&w.fz, m, tokens, T);
    if (st == LP_OK) st = setup_features(&w, tcs);
    if (st == LP_OK) st = setup_logits(&w, c->d_vocab, &g->logit_ids);
    int n_feat = w.n_active;
    if (o->max_feature_nodes > 0 && o->max_feature_nodes < n_feat) n_feat = o->max_feature_nodes;
    w.ncol = w.n_active + (int64_t)w.NL * T + T;
    lp_graph_plan pl = {0};
    if (st == LP_OK) st = graph_plan(&w, c, n_feat, &pl);
    if (st == LP_OK) {
        if (o->on_plan) st = o->on_plan(&pl, o->user);
    }
    if (st == LP_OK && o->host_budget && pl.host_bytes > o->host_budget)
        st = LP_ERR(LP_ERR_ARG, "graph: the plan needs %.1f MiB of host memory over the budget of %.1f MiB; lower batch_size, "
                                 "max_feature_nodes or edge_mass", pl.host_bytes / 1048576.0, o->host_budget / 1048576.0);
    uint8_t *visited = st == LP_OK ? calloc(w.n_active + 1, 1) : NULL;
    if (st == LP_OK && !(w.rowbuf = malloc((size_t)o->batch_size * w.ncol * sizeof(float))))
        st = LP_ERR(LP_ERR_OOM, "out of memory for a block of %d graph rows", o->batch_size);
    if (st == LP_OK) st = graph_select_rows(&w, visited, n_feat);
    if (st == LP_OK) st = graph_assemble(&w, g, visited);
    if (st == LP_OK) g->n_backward = w.n_backward;
    free(visited);
    work_free(&w);
    if (st == LP_OK) st = lp_graph_prune(g, o->node_threshold, o->edge_threshold);
    if (st == LP_OK) st = lp_graph_scores(g);
    if (st == LP_OK && tokens) {
        g->tokens = malloc(T * sizeof(int32_t));
        if (g->tokens) memcpy(g->tokens, tokens, T * sizeof(int32_t));
    }
    if (st != LP_OK) {
        lp_graph_free(g);
        return st;
    }
    *out = g;
    return LP_OK;
}

void lp_graph_free(lp_graph *g) {
    if (!g) return;
    free(g->tokens), free(g->active), free(g->act_values), free(g->selected), free(g->logit_ids), free(g->logit_probs);
    free(g->row_ptr), free(g->col), free(g->val), free(g->row_abs), free(g->node_mask), free(g->edge_mask);
    free(g->cumulative_scores), free(g->influence);
    free(g);
}

int64_t lp_graph_nnz(const lp_graph *g) { return g->row_ptr ? g->row_ptr[g->n_nodes] : 0; }
