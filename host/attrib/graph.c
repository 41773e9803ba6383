/* graph.c: an attribution graph for one prompt (graph.h): the replacement model's forward,
 * the nodes (active features, errors, tokens, logit targets), the memory plan, the rows in
 * circuit-tracer's order (logits, then features: all, or by influence round by round), the
 * assembly into node order, pruning and scores. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attrib/graph_internal.h"

lp_graph_opts lp_graph_defaults(void) {
    lp_graph_opts o = {.max_n_logits = 10, .desired_logit_prob = 0.95f, .batch_size = 512, .max_feature_nodes = 0,
                       .update_interval = 4, .node_threshold = 0.8f, .edge_threshold = 0.98f, .edge_mass = 1.0};
    return o;
}

typedef struct fidx {
    float v;
    int i;
} fidx;
static int by_v_desc(const void *a, const void *b) { /* ties: the lower index first */
    const fidx *x = a, *y = b;
    if (x->v != y->v) return x->v < y->v ? 1 : -1;
    return x->i - y->i;
}

/* Layer l's activations [T, S] (the first `zero` positions zeroed, as circuit-tracer): clt.h's activations.
 * TopK keeps exactly the k largest as they are (no relu after the selection), as clt.h. */
static lp_status encode(const lp_clt *tc, int l, const float *x, int T, float *acts, int zero) {
    const lp_clt_layer *y = &tc->layer[l];
    int S = tc->cfg.d_sae, D = tc->cfg.d_model;
    for (int t = 0; t < T; t++) memcpy(acts + (size_t)t * S, y->b_enc, S * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, S, D, 1.0f, x, D, y->W_enc, D, 1.0f, acts, S);
    fidx *srt = tc->cfg.act == LP_CLT_TOPK ? malloc(S * sizeof *srt) : NULL;
    if (tc->cfg.act == LP_CLT_TOPK && !srt) LP_FAIL(LP_ERR_OOM, "out of memory for a topk row");
    for (int t = 0; t < T; t++) {
        float *a = acts + (size_t)t * S;
        if (srt) {
            for (int j = 0; j < S; j++) srt[j].v = a[j], srt[j].i = j;
            qsort(srt, S, sizeof *srt, by_v_desc);
            for (int j = tc->cfg.k; j < S; j++) a[srt[j].i] = 0.0f;
        } else {
            for (int j = 0; j < S; j++) {
                if (tc->cfg.act == LP_CLT_JUMPRELU) a[j] = a[j] > y->threshold[j] ? a[j] : 0.0f;
                else a[j] = a[j] > 0 ? a[j] : 0.0f;
            }
        }
    }
    free(srt);
    memset(acts, 0, (size_t)(zero < T ? zero : T) * S * sizeof(float));
    return LP_OK;
}

static lp_status add_active(graph_work *w, size_t *cap, int l, int t, int f, float a) {
    if ((size_t)w->n_active == *cap) {
        size_t c = *cap ? 2 * *cap : 1024;
        int32_t *na = realloc(w->active, c * 3 * sizeof(int32_t));
        if (na) w->active = na;
        float *ne = na ? realloc(w->enc, c * w->D * sizeof(float)) : NULL;
        if (ne) w->enc = ne;
        float *nv = ne ? realloc(w->actv, c * sizeof(float)) : NULL;
        if (nv) w->actv = nv;
        if (!nv) LP_FAIL(LP_ERR_OOM, "out of memory for %zu active features", c);
        *cap = c;
    }
    int k = w->n_active++;
    w->active[3 * k] = l, w->active[3 * k + 1] = t, w->active[3 * k + 2] = f;
    w->actv[k] = a;
    memcpy(w->enc + (size_t)k * w->D, lp_clt_enc_vec(w->tc, l, f), w->D * sizeof(float));
    return LP_OK;
}

static lp_status check_tc(const lp_clt *tc, const lp_config *c) {
    if (tc->device != LP_CPU) LP_FAIL(LP_ERR_ARG, "transcoders: the graph needs them on the host");
    if (tc->cfg.n_layers != c->n_layers || tc->cfg.d_model != c->d_model)
        LP_FAIL(LP_ERR_SHAPE, "transcoders: %d layers of width %d for a model of %d layers of width %d", tc->cfg.n_layers, tc->cfg.d_model,
                c->n_layers, c->d_model);
    const char *in = tc->cfg.input_hook, *out = tc->cfg.output_hook;
    if ((strcmp(in, "mlp.hook_in") && strcmp(in, "ln2.hook_normalized")) || (strcmp(out, "mlp.hook_out") && strcmp(out, "hook_mlp_out")))
        LP_FAIL(LP_ERR_ARG, "transcoders: feature_input_hook %s / feature_output_hook %s: the graph takes transcoders reading the "
                            "MLP's input (mlp.hook_in or ln2.hook_normalized) and writing its output (mlp.hook_out or hook_mlp_out)", in, out);
    return LP_OK;
}

/* Active features (layer, position, feature order), their encoder rows, and the error of
 * each layer: MLP output - (b_dec + sum_{l <= L} f_l W_dec_l[L - l] + skip), zero at position 0. */
static lp_status setup_features(graph_work *w) {
    const lp_clt *tc = w->tc;
    int T = w->T, D = w->D, NL = w->NL, S = tc->cfg.d_sae;
    size_t cap = 0;
    /* positions without features and with a zero error: circuit-tracer's zero_positions */
    int zero = w->o->keep_first_position ? 0 : w->o->zero_positions > 1 ? w->o->zero_positions : 1;
    float *acts = malloc((size_t)T * S * sizeof(float)), *rec = malloc((size_t)T * D * sizeof(float));
    w->layer_start = calloc(NL + 1, sizeof(int));
    w->err = malloc((size_t)NL * T * D * sizeof(float));
    w->skip = calloc(NL, sizeof(float *));
    w->gather = malloc((size_t)S * D * sizeof(float));
    lp_status st = acts && rec && w->layer_start && w->err && w->skip && w->gather ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory for the graph's nodes");
    for (int L = 0; L < NL && st == LP_OK; L++) {
        float *a = acts;
        st = encode(tc, L, lp_frozen_mlp_in(w->fz, L), T, a, zero);
        w->skip[L] = tc->layer[L].W_skip;
        w->layer_start[L] = w->n_active;
        for (int t = 0; t < T && st == LP_OK; t++)
            for (int f = 0; f < S && st == LP_OK; f++)
                if (a[(size_t)t * S + f] != 0.0f) st = add_active(w, &cap, L, t, f, a[(size_t)t * S + f]);
    }
    if (st == LP_OK) w->layer_start[NL] = w->n_active;
    for (int L = 0; L < NL && st == LP_OK; L++) {
        const float *x = lp_frozen_mlp_in(w->fz, L), *y = lp_frozen_mlp_out(w->fz, L);
        for (int t = 0; t < T; t++) memcpy(rec + (size_t)t * D, tc->layer[L].b_dec, D * sizeof(float));
        /* from the active list, so no layer's [T, S] activations are kept */
        for (int k = 0; k < w->layer_start[L + 1]; k++) {
            int l = w->active[3 * k];
            const float *dv = l <= L ? lp_clt_dec_vec(tc, l, w->active[3 * k + 2], L) : NULL;
            if (dv) cblas_saxpy(D, w->actv[k], dv, 1, rec + (size_t)w->active[3 * k + 1] * D, 1);
        }
        if (w->skip[L]) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, D, D, 1.0f, x, D, w->skip[L], D, 1.0f, rec, D);
        for (size_t i = 0; i < (size_t)T * D; i++) w->err[(size_t)L * T * D + i] = i < (size_t)zero * D ? 0.0f : y[i] - rec[i];
    }
    free(acts), free(rec);
    return st;
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
    graph_dev_free(w);
    lp_frozen_free(w->fz);
    free(w->active), free(w->enc), free(w->actv), free(w->layer_start), free(w->err), free(w->logit_vec), free(w->logit_p);
    free(w->skip);
    graph_work_rows_free(w);
}

lp_status lp_graph_build(lp_graph **out, lp_model *m, const lp_clt *tc, const int32_t *tokens, int T, const lp_graph_opts *o) {
    *out = NULL;
    const lp_config *c = lp_model_config(m);
    if (o->batch_size < 1 || o->update_interval < 1 || o->max_n_logits < 1 || o->edge_mass <= 0 || o->edge_mass > 1)
        LP_FAIL(LP_ERR_ARG, "graph options: batch_size, update_interval, max_n_logits >= 1 and 0 < edge_mass <= 1");
    LP_CHECK(check_tc(tc, c));
    if (o->device != LP_CPU && o->device != LP_CUDA) LP_FAIL(LP_ERR_ARG, "graph.device: cpu or cuda");
    if (o->device == LP_CUDA) LP_CHECK(graph_dev_check());
    graph_work w = {.o = o, .tc = tc, .mc = c, .T = T, .NL = c->n_layers, .D = c->d_model};
    lp_graph *g = calloc(1, sizeof *g);
    if (!g) LP_FAIL(LP_ERR_OOM, "out of memory for a graph");
    g->T = T, g->n_layers = c->n_layers, g->d_vocab = c->d_vocab;
    /* ln2.hook_normalized is before the norm's weight; mlp.hook_out before a post-norm */
    lp_frozen_sites sites = {.input_normalized = strcmp(tc->cfg.input_hook, "ln2.hook_normalized") == 0,
                             .output_before_post_norm = strcmp(tc->cfg.output_hook, "mlp.hook_out") == 0};
    lp_status st = lp_frozen_new_sites(&w.fz, m, tokens, T, &sites);
    if (st == LP_OK) st = setup_features(&w);
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
        st = LP_ERR(LP_ERR_ARG, "graph: the plan needs %.1f MiB of host memory over the budget of %.1f MiB; lower batch or "
                                 "max_feature_nodes, or cap max_row_edges", pl.host_bytes / 1048576.0, o->host_budget / 1048576.0);
    if (st == LP_OK && pl.pattern_bytes) st = lp_frozen_cache_patterns(w.fz);
    uint8_t *visited = st == LP_OK ? calloc(w.n_active + 1, 1) : NULL;
    if (st == LP_OK && o->device == LP_CUDA) st = graph_dev_start(&w, &pl);
    else if (st == LP_OK && !(w.rowbuf = malloc((size_t)o->batch_size * w.ncol * sizeof(float))))
        st = LP_ERR(LP_ERR_OOM, "out of memory for a block of %d graph rows", o->batch_size);
    if (st == LP_OK) st = graph_select_rows(&w, visited, n_feat);
    if (st == LP_OK) st = graph_assemble(&w, g, visited);
    if (st == LP_OK) g->n_backward = w.n_backward, g->device_bytes = graph_dev_measured(&w);
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
