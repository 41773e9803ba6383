/* test_graph_memory.c: pruning and scoring run on the sparse rows, so their memory grows
 * with the edges kept, not with N^2. A synthetic graph of 50,010 nodes (45,000 features in 8
 * layers, errors and tokens of 4 x 1000 positions, 10 logits; each row k random sources in
 * lower layers) is pruned and scored; the peak resident memory of the test process (its own
 * process: Criterion forks per test) must stay within the stated budget
 *     64 MiB + 24 bytes per stored edge + 256 bytes per node,
 * about 105 MiB for k = 20, where a dense float adjacency alone would be 9.3 GiB; and the
 * run with 4x the edges must need more memory than the small one by no more than the
 * per-edge budget predicts. */
#include <math.h>
#include <sys/resource.h>

#include "loupe/graph.h"
#include "testutil.h"

#define NF 45000
#define NL 4
#define NT 1000
#define NLOG 10
#define FLAYERS 8

static lp_graph *synthetic(int k, uint64_t seed) {
    lp_graph *g = calloc(1, sizeof *g);
    g->T = NT, g->n_layers = NL, g->n_logits = NLOG, g->n_features = NF;
    g->n_nodes = NF + NL * NT + NT + NLOG;
    int64_t N = g->n_nodes, rows = NF + NLOG, nnz = rows * k;
    g->logit_probs = malloc(NLOG * sizeof(float));
    for (int i = 0; i < NLOG; i++) g->logit_probs[i] = 0.09f;
    g->row_ptr = calloc(N + 1, sizeof(int64_t));
    g->row_abs = calloc(N, sizeof(double));
    g->col = malloc(nnz * sizeof(int32_t));
    g->val = malloc(nnz * sizeof(float));
    cr_assert(g->logit_probs && g->row_ptr && g->row_abs && g->col && g->val);
    int64_t e = 0, per_layer = NF / FLAYERS, nonfeat = N - NF - NLOG;
    for (int64_t i = 0; i < N; i++) {
        int is_logit = i >= N - NLOG;
        if (i < NF || is_logit) {
            int64_t layer = is_logit ? FLAYERS : i / per_layer, below = layer * per_layer; /* features of lower layers */
            for (int j = 0; j < k; j++) {
                uint64_t r = lp_test_next(&seed);
                int64_t c = below && (r & 1) ? (int64_t)((r >> 1) % (uint64_t)below) : NF + (int64_t)((r >> 1) % (uint64_t)nonfeat);
                g->col[e] = (int32_t)c;
                g->val[e] = lp_test_uniform(&seed, -1, 1);
                g->row_abs[i] += fabsf(g->val[e]);
                e++;
            }
        }
        g->row_ptr[i + 1] = e;
    }
    return g;
}

static long peak_kib(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_maxrss;
}

static long run(int k) {
    long before = peak_kib();
    lp_graph *g = synthetic(k, 7);
    cr_assert_eq(lp_graph_prune(g, 0.8f, 0.98f), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_graph_scores(g), LP_OK, "%s", lp_last_error());
    int64_t kn = 0, ke = 0;
    for (int64_t i = 0; i < g->n_nodes; i++) kn += g->node_mask[i];
    for (int64_t i = 0; i < lp_graph_nnz(g); i++) ke += g->edge_mask[i];
    long used = peak_kib() - before;
    double budget = 64.0 * 1024 + (24.0 * lp_graph_nnz(g) + 256.0 * g->n_nodes) / 1024;
    cr_log_info("N = %lld nodes, %lld edges: kept %lld nodes, %lld edges; replacement %.4f completeness %.4f; peak +%.1f MiB "
                "(budget %.1f MiB; dense N^2 floats %.1f GiB)",
                (long long)g->n_nodes, (long long)lp_graph_nnz(g), (long long)kn, (long long)ke, g->replacement_score, g->completeness_score,
                used / 1024.0, budget / 1024, (double)g->n_nodes * g->n_nodes * 4 / (1 << 30));
    cr_assert(kn > NT + NLOG && ke > 0, "pruning kept something beyond tokens and logits");
    cr_assert_leq(used, (long)budget, "peak +%ld KiB over the budget of %.0f KiB", used, budget);
    lp_graph_free(g);
    return used;
}

Test(graph_memory, fifty_thousand_nodes_within_an_edge_budget) { run(20); }

Test(graph_memory, memory_grows_with_edges_not_nodes) {
    long small = run(10), large = run(40); /* same N; 4x the edges; peak is cumulative, so large includes small's */
    double per_edge_budget = 24.0 * (NF + NLOG) * 40 / 1024;
    cr_log_info("peak +%ld KiB with 10 edges per row, +%ld KiB more with 40", small, large);
    cr_assert_leq(large, (long)(per_edge_budget + 8 * 1024), "the larger run grew by %ld KiB", large);
}
