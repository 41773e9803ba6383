/* test_graph.c: attribution graphs against circuit-tracer 0.5.0 (tests/gen/gen_graph_fixture.py)
 * on a small random Llama with random per-layer skip transcoders:
 *   nodes     the same active features, selected features and logit targets
 *   edges     the adjacency within 1e-4 of its largest entry
 *   pruning   identical node and edge masks at the default thresholds (0.8, 0.98)
 *   scores    replacement and completeness within 1e-5
 * with every feature, with max_feature_nodes (the influence-ordered selection) and with a
 * cross-layer transcoder in place of the per-layer ones; the viewer's JSON against
 * create_graph_files'; and
 * the sparse form's error: with edge_mass < 1 node influences move by no more than the
 * dropped mass allows. */
#include <cjson/cJSON.h>
#include <math.h>
#include <unistd.h>

#include "loupe/graph.h"
#include "loupe/clt.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#define GDIR LP_FIXTURES "/graph"

static lp_st_file ref;

static const lp_st_tensor *R(const char *name) {
    const lp_st_tensor *t = lp_st_find(&ref, name);
    cr_assert(t, "reference.safetensors has no %s", name);
    return t;
}

typedef struct fixture {
    lp_model *m;
    lp_ctx c;
    lp_clt *tc;
    int NL, T;
    const int32_t *tokens;
} fixture;

static void setup(fixture *fx) {
    cr_assert_eq(lp_st_open(&ref, GDIR "/reference.safetensors"), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_load(&fx->m, GDIR "/model", LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    fx->NL = lp_model_config(fx->m)->n_layers;
    cr_assert_eq(lp_ctx_init(&fx->c, LP_CPU, LP_F32), LP_OK);
    cr_assert_eq(lp_clt_load(&fx->tc, &fx->c, GDIR "/transcoders"), LP_OK, "%s", lp_last_error());
    fx->tokens = R("tokens")->data;
    fx->T = (int)R("tokens")->shape[0];
}

static void teardown(fixture *fx) {
    lp_clt_free(fx->tc, &fx->c);
    lp_model_free(fx->m);
    lp_ctx_free(&fx->c);
    lp_st_close(&ref);
}

static void check_graph(const lp_graph *g, const char *pre) {
    char k[64];
    /* nodes (the CLT graph has its own active features) */
    int clt = !strcmp(pre, "clt.");
    const lp_st_tensor *act = R(clt ? "clt.active_features" : "active_features");
    cr_assert_eq(g->n_active, act->shape[0], "active features: %d vs circuit-tracer's %lld", g->n_active, (long long)act->shape[0]);
    cr_assert_eq(memcmp(g->active, act->data, (size_t)g->n_active * 3 * sizeof(int32_t)), 0, "active features differ");
    const float *av = R(clt ? "clt.activation_values" : "activation_values")->data;
    for (int i = 0; i < g->n_active; i++) cr_assert(fabsf(g->act_values[i] - av[i]) <= 1e-4f * (1 + fabsf(av[i])), "activation %d", i);
    const lp_st_tensor *lt = R(clt ? "clt.logit_targets" : "logit_targets");
    cr_assert_eq(g->n_logits, lt->shape[0]);
    cr_assert_eq(memcmp(g->logit_ids, lt->data, g->n_logits * sizeof(int32_t)), 0, "logit targets differ");
    snprintf(k, sizeof k, "%sselected", pre);
    const lp_st_tensor *sel = R(k);
    cr_assert_eq(g->n_features, sel->shape[0], "%s: %d features vs %lld", k, g->n_features, (long long)sel->shape[0]);
    cr_assert_eq(memcmp(g->selected, sel->data, g->n_features * sizeof(int32_t)), 0, "%s differ", k);
    /* edges */
    snprintf(k, sizeof k, "%sadjacency", pre);
    const lp_st_tensor *adj = R(k);
    int64_t N = g->n_nodes;
    cr_assert_eq(adj->shape[0], N);
    const float *A = adj->data;
    float *mine = calloc(N * N, sizeof(float));
    for (int64_t i = 0; i < N; i++)
        for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1]; e++) mine[i * N + g->col[e]] = g->val[e];
    double amax = 0, dmax = 0;
    for (int64_t i = 0; i < N * N; i++) {
        amax = fmax(amax, fabs(A[i]));
        dmax = fmax(dmax, fabs(A[i] - mine[i]));
    }
    cr_log_info("%s: %lld nodes, %lld edges, %lld backward passes; max |A| %.4g, max |diff| %.3g", pre, (long long)N,
                (long long)lp_graph_nnz(g), (long long)g->n_backward, amax, dmax);
    cr_assert(amax > 0 && dmax <= 1e-4 * amax, "%s adjacency: max |diff| %.3g > 1e-4 * %.3g", pre, dmax, amax);
    /* pruning masks */
    snprintf(k, sizeof k, "%snode_mask", pre);
    const uint8_t *nm = R(k)->data;
    int64_t kept = 0;
    for (int64_t i = 0; i < N; i++) {
        cr_assert_eq(!!g->node_mask[i], !!nm[i], "%s node %lld: %d vs circuit-tracer's %d", pre, (long long)i, g->node_mask[i], nm[i]);
        kept += nm[i];
    }
    snprintf(k, sizeof k, "%sedge_mask", pre);
    const uint8_t *em = R(k)->data;
    int64_t ke = 0, ko = 0;
    memset(mine, 0, N * N * sizeof(float));
    for (int64_t i = 0; i < N; i++)
        for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1]; e++) mine[i * N + g->col[e]] = g->edge_mask[e];
    for (int64_t i = 0; i < N * N; i++) {
        ke += em[i];
        ko += mine[i] != 0;
        cr_assert_eq(mine[i] != 0, em[i] != 0, "%s edge (%lld, %lld) differs", pre, (long long)(i / N), (long long)(i % N));
    }
    cr_log_info("%s: kept %lld nodes and %lld edges (circuit-tracer %lld, %lld)", pre, (long long)kept, (long long)ko, (long long)kept,
                (long long)ke);
    free(mine);
    snprintf(k, sizeof k, "%scumulative_scores", pre);
    const float *cs = R(k)->data;
    for (int64_t i = 0; i < N; i++) cr_assert(fabsf(g->cumulative_scores[i] - cs[i]) < 1e-5f, "%s cumulative score %lld", pre, (long long)i);
    /* scores */
    snprintf(k, sizeof k, "%sscores", pre);
    const double *sc = R(k)->data;
    cr_log_info("%s: replacement %.6f (circuit-tracer %.6f), completeness %.6f (%.6f)", pre, g->replacement_score, sc[0],
                g->completeness_score, sc[1]);
    cr_assert(fabs(g->replacement_score - sc[0]) < 1e-5, "replacement score %.7f vs %.7f", g->replacement_score, sc[0]);
    cr_assert(fabs(g->completeness_score - sc[1]) < 1e-5, "completeness score %.7f vs %.7f", g->completeness_score, sc[1]);
}

Test(graph, every_feature_matches_circuit_tracer) {
    fixture fx = {0};
    setup(&fx);
    lp_graph_opts o = lp_graph_defaults();
    o.batch_size = 7; /* several backward passes, mixing layers within one */
    lp_graph *g;
    cr_assert_eq(lp_graph_build(&g, fx.m, fx.tc, fx.tokens, fx.T, &o), LP_OK, "%s", lp_last_error());
    check_graph(g, "full.");
    lp_graph_free(g);
    teardown(&fx);
}

static lp_status keep_plan(const lp_graph_plan *p, void *user) {
    *(lp_graph_plan *)user = *p;
    return LP_OK;
}

/* a host budget with room for them: the patterns are computed once and kept; same graph */
Test(graph, cached_patterns_match_circuit_tracer) {
    fixture fx = {0};
    setup(&fx);
    lp_graph_opts o = lp_graph_defaults();
    lp_graph_plan pl = {0};
    o.batch_size = 7, o.host_budget = (size_t)1 << 40, o.on_plan = keep_plan, o.user = &pl;
    lp_graph *g;
    cr_assert_eq(lp_graph_build(&g, fx.m, fx.tc, fx.tokens, fx.T, &o), LP_OK, "%s", lp_last_error());
    cr_assert_gt(pl.pattern_bytes, 0, "the plan kept no patterns under a budget with room for them");
    check_graph(g, "full.");
    lp_graph_free(g);
    teardown(&fx);
}

Test(graph, max_feature_nodes_selects_as_circuit_tracer) {
    fixture fx = {0};
    setup(&fx);
    lp_graph_opts o = lp_graph_defaults();
    o.batch_size = 8, o.update_interval = 2, o.max_feature_nodes = 40; /* as the generator ran it */
    lp_graph *g;
    cr_assert_eq(lp_graph_build(&g, fx.m, fx.tc, fx.tokens, fx.T, &o), LP_OK, "%s", lp_last_error());
    check_graph(g, "sel.");
    lp_graph_free(g);
    teardown(&fx);
}

Test(graph, cross_layer_transcoder_matches_circuit_tracer) {
    fixture fx = {0};
    setup(&fx);
    lp_clt *clt;
    cr_assert_eq(lp_clt_load(&clt, &fx.c, GDIR "/clt"), LP_OK, "%s", lp_last_error());
    cr_assert_eq(clt->cfg.kind, LP_CLT_CROSS_LAYER);
    lp_graph_opts o = lp_graph_defaults();
    o.batch_size = 16;
    lp_graph *g;
    cr_assert_eq(lp_graph_build(&g, fx.m, clt, fx.tokens, fx.T, &o), LP_OK, "%s", lp_last_error());
    check_graph(g, "clt.");
    lp_graph_free(g);
    lp_clt_free(clt, &fx.c);
    teardown(&fx);
}

/* edge_mass < 1: each row keeps its largest entries up to that share of its |mass|; the
 * influences of the exact graph change by at most what the dropped mass allows (the logit
 * weights sum to <= 1 and each step through a row loses at most 1 - edge_mass of it) */
Test(graph, sparse_rows_bound_the_influence_error) {
    fixture fx = {0};
    setup(&fx);
    lp_graph_opts o = lp_graph_defaults();
    lp_graph *ex, *sp;
    cr_assert_eq(lp_graph_build(&ex, fx.m, fx.tc, fx.tokens, fx.T, &o), LP_OK, "%s", lp_last_error());
    o.edge_mass = 0.99;
    cr_assert_eq(lp_graph_build(&sp, fx.m, fx.tc, fx.tokens, fx.T, &o), LP_OK, "%s", lp_last_error());
    cr_assert_lt(lp_graph_nnz(sp), lp_graph_nnz(ex), "edge_mass 0.99 stored %lld of %lld entries", (long long)lp_graph_nnz(sp),
                 (long long)lp_graph_nnz(ex));
    cr_assert_leq(sp->max_dropped, 0.01 + 1e-9);
    double tot = 0, dmax = 0;
    for (int64_t i = 0; i < ex->n_nodes; i++) tot += ex->influence[i], dmax = fmax(dmax, fabs(ex->influence[i] - sp->influence[i]));
    /* depth <= n_layers + 2 steps, each losing <= 1% of what flows through it */
    double bound = (fx.NL + 2) * 0.01 * (tot + 1);
    cr_log_info("edge_mass 0.99: %lld of %lld entries; max influence change %.3g (bound %.3g); scores %.5f/%.5f vs %.5f/%.5f",
                (long long)lp_graph_nnz(sp), (long long)lp_graph_nnz(ex), dmax, bound, sp->replacement_score, sp->completeness_score,
                ex->replacement_score, ex->completeness_score);
    cr_assert_leq(dmax, bound);
    cr_assert_lt(fabs(sp->replacement_score - ex->replacement_score), 0.05);
    lp_graph_free(ex);
    lp_graph_free(sp);
    teardown(&fx);
}

/* The viewer's JSON: the same nodes (ids, kinds, influence, activation) and links (source,
 * target, weight) as circuit-tracer's create_graph_files wrote for the full graph. */
static cJSON *read_json(const char *path) {
    FILE *f = fopen(path, "rb");
    cr_assert(f, "%s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc(n + 1);
    cr_assert_eq(fread(b, 1, n, f), (size_t)n);
    b[n] = 0;
    fclose(f);
    cJSON *j = cJSON_Parse(b);
    free(b);
    cr_assert(j, "%s does not parse", path);
    return j;
}

static void same_field(cJSON *a, cJSON *b, const char *key, const char *where) {
    cJSON *x = cJSON_GetObjectItem(a, key), *y = cJSON_GetObjectItem(b, key);
    cr_assert(x && y, "%s: %s missing", where, key);
    if (cJSON_IsString(y)) cr_assert_str_eq(x->valuestring, y->valuestring, "%s.%s", where, key);
    else if (cJSON_IsNumber(y)) cr_assert(fabs(x->valuedouble - y->valuedouble) <= 1e-4 * (1 + fabs(y->valuedouble)), "%s.%s: %g vs %g", where, key, x->valuedouble, y->valuedouble);
    else cr_assert_eq(x->type & 0xff, y->type & 0xff, "%s.%s type", where, key);
}

Test(graph, json_matches_create_graph_files) {
    fixture fx = {0};
    setup(&fx);
    lp_graph_opts o = lp_graph_defaults();
    lp_graph *g;
    cr_assert_eq(lp_graph_build(&g, fx.m, fx.tc, fx.tokens, fx.T, &o), LP_OK, "%s", lp_last_error());
    char dir[] = "/tmp/lp_graph_json_XXXXXX", path[256];
    cr_assert(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/tiny-llama-graph.json", dir);
    lp_graph_json_opts jo = {.slug = "tiny-llama-graph", .scan = "tiny-llama-plt", .prompt = "<1><17><200><33><91><150><7><64><120><5>"};
    cr_assert_eq(lp_graph_write_json(g, &jo, path), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_graph_metadata_add(dir, &jo, g), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_graph_metadata_add(dir, &jo, g), LP_OK, "%s", lp_last_error());
    cJSON *mine = read_json(path), *ref = read_json(GDIR "/graph-full.json");
    const char *mkeys[] = {"slug", "scan", "prompt", "node_threshold", "schema_version"};
    for (size_t k = 0; k < sizeof mkeys / sizeof *mkeys; k++)
        same_field(cJSON_GetObjectItem(mine, "metadata"), cJSON_GetObjectItem(ref, "metadata"), mkeys[k], "metadata");
    cJSON *mn = cJSON_GetObjectItem(mine, "nodes"), *rn = cJSON_GetObjectItem(ref, "nodes");
    cr_assert_eq(cJSON_GetArraySize(mn), cJSON_GetArraySize(rn), "%d nodes vs circuit-tracer's %d", cJSON_GetArraySize(mn), cJSON_GetArraySize(rn));
    const char *nkeys[] = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "jsNodeId",
                           "clerp", "influence", "activation"};
    for (int i = 0; i < cJSON_GetArraySize(rn); i++)
        for (size_t k = 0; k < sizeof nkeys / sizeof *nkeys; k++) same_field(cJSON_GetArrayItem(mn, i), cJSON_GetArrayItem(rn, i), nkeys[k], "node");
    cJSON *ml = cJSON_GetObjectItem(mine, "links"), *rl = cJSON_GetObjectItem(ref, "links");
    cr_assert_eq(cJSON_GetArraySize(ml), cJSON_GetArraySize(rl));
    for (int i = 0; i < cJSON_GetArraySize(rl); i++) {
        cJSON *a = cJSON_GetArrayItem(ml, i), *b = cJSON_GetArrayItem(rl, i);
        same_field(a, b, "source", "link");
        same_field(a, b, "target", "link");
        double w = cJSON_GetObjectItem(b, "weight")->valuedouble;
        cr_assert(fabs(cJSON_GetObjectItem(a, "weight")->valuedouble - w) <= 1e-4 * 4.1, "link %d weight", i);
    }
    snprintf(path, sizeof path, "%s/graph-metadata.json", dir);
    cJSON *meta = read_json(path);
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItem(meta, "graphs")), 1, "one entry per slug");
    cJSON_Delete(meta), cJSON_Delete(mine), cJSON_Delete(ref);
    remove(path);
    snprintf(path, sizeof path, "%s/tiny-llama-graph.json", dir);
    remove(path);
    rmdir(dir);
    lp_graph_free(g);
    teardown(&fx);
}
