/* test_graph_gemma.c: attribution graphs of Gemma 2 and Gemma 3 against circuit-tracer 0.5.0
 * (tests/gen/gen_graph_gemma_fixture.py: tiny random models through circuit-tracer's
 * TransformerLens backend, whose logits the generator checks against Hugging Face's):
 *   g2scope  Gemma 2 (attention and final soft-caps, sliding windows, post-norms, embedding
 *            scale) with JumpReLU transcoders at Gemma Scope's sites, ln2.hook_normalized
 *            (before the norm's weight) -> hook_mlp_out (after the post-norm)
 *   g2skip   the same model, ReLU transcoders with skip, mlp.hook_in -> mlp.hook_out (the
 *            MLP's output, before the post-norm: the backward passes through its frozen scale)
 *   g2topk   the same model, TopK transcoders (k 4, no relu after the selection) with skip
 *   g3skip   Gemma 3 (q/k norms, windows, post-norms), ReLU with skip, mlp.hook_in -> hook_mlp_out
 *   g3it     the same with zero_positions 4, circuit-tracer's for instruction-tuned Gemma 3
 * each as test_graph.c: the same active features and logit targets (the final soft-cap
 * applies to the logits the targets are chosen from), the adjacency within 1e-4 of its
 * largest entry, identical pruning masks, cumulative and graph scores within 1e-5. */
#include <math.h>

#include "loupe/clt.h"
#include "loupe/graph.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#define GDIR LP_FIXTURES "/graph_gemma"

static lp_st_file ref;

static const lp_st_tensor *R(const char *pre, const char *name) {
    char k[96];
    snprintf(k, sizeof k, "%s%s", pre, name);
    const lp_st_tensor *t = lp_st_find(&ref, k);
    cr_assert(t, "reference.safetensors has no %s", k);
    return t;
}

static float *dense(const lp_graph *g, int masks) {
    int64_t N = g->n_nodes;
    float *d = calloc(N * N, sizeof(float));
    cr_assert(d);
    for (int64_t i = 0; i < N; i++)
        for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1]; e++) d[i * N + g->col[e]] = masks ? g->edge_mask[e] : g->val[e];
    return d;
}

static void check_nodes(const lp_graph *g, const char *pre) {
    const lp_st_tensor *act = R(pre, "active_features");
    cr_assert_eq(g->n_active, act->shape[0], "%s active features: %d vs circuit-tracer's %lld", pre, g->n_active, (long long)act->shape[0]);
    cr_assert_eq(memcmp(g->active, act->data, (size_t)g->n_active * 3 * sizeof(int32_t)), 0, "%s active features differ", pre);
    const float *av = R(pre, "activation_values")->data;
    for (int i = 0; i < g->n_active; i++)
        cr_assert(fabsf(g->act_values[i] - av[i]) <= 1e-4f * (1 + fabsf(av[i])), "%s activation %d: %g vs %g", pre, i, g->act_values[i], av[i]);
    const lp_st_tensor *lt = R(pre, "logit_targets");
    cr_assert_eq(g->n_logits, lt->shape[0], "%s: %d logits vs %lld", pre, g->n_logits, (long long)lt->shape[0]);
    cr_assert_eq(memcmp(g->logit_ids, lt->data, g->n_logits * sizeof(int32_t)), 0, "%s logit targets differ", pre);
    const float *lp = R(pre, "logit_probabilities")->data;
    for (int i = 0; i < g->n_logits; i++) cr_assert(fabsf(g->logit_probs[i] - lp[i]) < 1e-5f, "%s logit probability %d", pre, i);
    const lp_st_tensor *sel = R(pre, "selected");
    cr_assert_eq(g->n_features, sel->shape[0]);
    cr_assert_eq(memcmp(g->selected, sel->data, g->n_features * sizeof(int32_t)), 0, "%s selected features differ", pre);
}

static void check_graph(const lp_graph *g, const char *pre) {
    check_nodes(g, pre);
    const lp_st_tensor *adj = R(pre, "adjacency");
    int64_t N = g->n_nodes;
    cr_assert_eq(adj->shape[0], N);
    const float *A = adj->data;
    float *mine = dense(g, 0);
    double amax = 0, dmax = 0;
    for (int64_t i = 0; i < N * N; i++) amax = fmax(amax, fabs(A[i])), dmax = fmax(dmax, fabs(A[i] - mine[i]));
    cr_log_info("%s %lld nodes, %lld edges; max |A| %.4g, max |diff| %.3g", pre, (long long)N, (long long)lp_graph_nnz(g), amax, dmax);
    cr_assert(amax > 0 && dmax <= 1e-4 * amax, "%s adjacency: max |diff| %.3g > 1e-4 * %.3g", pre, dmax, amax);
    free(mine);
    const uint8_t *nm = R(pre, "node_mask")->data, *em = R(pre, "edge_mask")->data;
    int64_t kn = 0, ke = 0;
    for (int64_t i = 0; i < N; i++) {
        cr_assert_eq(!!g->node_mask[i], !!nm[i], "%s node %lld: %d vs circuit-tracer's %d", pre, (long long)i, g->node_mask[i], nm[i]);
        kn += nm[i];
    }
    float *mask = dense(g, 1);
    for (int64_t i = 0; i < N * N; i++) {
        cr_assert_eq(mask[i] != 0, em[i] != 0, "%s edge (%lld, %lld) differs", pre, (long long)(i / N), (long long)(i % N));
        ke += em[i];
    }
    free(mask);
    const float *cs = R(pre, "cumulative_scores")->data;
    for (int64_t i = 0; i < N; i++) cr_assert(fabsf(g->cumulative_scores[i] - cs[i]) < 1e-5f, "%s cumulative score %lld", pre, (long long)i);
    const double *sc = R(pre, "scores")->data;
    cr_log_info("%s kept %lld nodes, %lld edges; replacement %.6f (circuit-tracer %.6f), completeness %.6f (%.6f)", pre, (long long)kn,
                (long long)ke, g->replacement_score, sc[0], g->completeness_score, sc[1]);
    cr_assert(fabs(g->replacement_score - sc[0]) < 1e-5, "%s replacement score %.7f vs %.7f", pre, g->replacement_score, sc[0]);
    cr_assert(fabs(g->completeness_score - sc[1]) < 1e-5, "%s completeness score %.7f vs %.7f", pre, g->completeness_score, sc[1]);
}

static lp_status keep_plan(const lp_graph_plan *p, void *user) {
    *(lp_graph_plan *)user = *p;
    return LP_OK;
}

/* zero: the positions without features (0: the default); budget > 0: a host budget with room
 * for the cached patterns, which the plan must take */
static void run_z(const char *model, const char *tcdir, const char *pre, int batch, int zero, size_t budget) {
    cr_assert_eq(lp_st_open(&ref, GDIR "/reference.safetensors"), LP_OK, "%s", lp_last_error());
    lp_model *m;
    lp_ctx c;
    lp_clt *tc;
    cr_assert_eq(lp_model_load(&m, model, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    cr_assert_eq(lp_clt_load(&tc, &c, tcdir), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *tok = R("", "tokens");
    lp_graph_opts o = lp_graph_defaults();
    lp_graph_plan pl = {0};
    o.batch_size = batch, o.host_budget = budget, o.on_plan = keep_plan, o.user = &pl;
    o.zero_positions = zero;
    lp_graph *g;
    cr_assert_eq(lp_graph_build(&g, m, tc, tok->data, (int)tok->shape[0], &o), LP_OK, "%s", lp_last_error());
    cr_assert_eq(pl.pattern_bytes > 0, budget > 0, "patterns cached: %zu bytes under a budget of %zu", pl.pattern_bytes, budget);
    check_graph(g, pre);
    lp_graph_free(g);
    lp_clt_free(tc, &c);
    lp_model_free(m);
    lp_ctx_free(&c);
    lp_st_close(&ref);
}

static void run(const char *model, const char *tcdir, const char *pre, int batch) { run_z(model, tcdir, pre, batch, 0, 0); }

Test(graph_gemma, gemma2_gemma_scope_sites_match_circuit_tracer) { run(GDIR "/gemma2/model", GDIR "/gemma2/scope", "g2scope.", 16); }
Test(graph_gemma, gemma2_before_post_norm_matches_circuit_tracer) { run(GDIR "/gemma2/model", GDIR "/gemma2/skip", "g2skip.", 7); }
Test(graph_gemma, gemma3_matches_circuit_tracer) { run(GDIR "/gemma3/model", GDIR "/gemma3/skip", "g3skip.", 16); }
/* TopK transcoders: exactly k features per position, chosen values kept as they are (60 of
 * the 108 negative here), as circuit-tracer's TopK; a relu after the selection would drop
 * those nodes */
Test(graph_gemma, gemma2_topk_matches_circuit_tracer) { run(GDIR "/gemma2/model", GDIR "/gemma2/topk", "g2topk.", 16); }
/* zero_positions 4: circuit-tracer's for instruction-tuned Gemma 3 (no features and a zero
 * error at positions 0..3) */
Test(graph_gemma, gemma3_four_zero_positions_match_circuit_tracer) { run_z(GDIR "/gemma3/model", GDIR "/gemma3/skip", "g3it.", 16, 4, 0); }
/* the patterns computed once per graph and kept (windows, soft-caps and all) give the same */
Test(graph_gemma, gemma2_cached_patterns_match_circuit_tracer) {
    run_z(GDIR "/gemma2/model", GDIR "/gemma2/skip", "g2skip.", 7, 0, (size_t)1 << 40);
}
Test(graph_gemma, gemma3_cached_patterns_match_circuit_tracer) {
    run_z(GDIR "/gemma3/model", GDIR "/gemma3/skip", "g3skip.", 16, 0, (size_t)1 << 40);
}
