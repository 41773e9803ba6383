/* test_graph_cuda.c: attribution graphs with graph.device = cuda (graph_dev.c, frozen_dev.c)
 * against the CPU twin on the fixture of test_graph.c (a random 3-layer Llama with grouped
 * key/value heads, random per-layer skip transcoders and a CLT):
 *   rows      every stored entry within 1e-5 of the largest |entry| (fp32 sums in another
 *             order: cuBLAS and the tiled contractions against OpenBLAS; the CPU graph itself
 *             is within 3.3e-6 of circuit-tracer there), the same sparsity pattern, row
 *             sums within 1e-5 relative
 *   graph     the same nodes (active, selected, logits), node and edge masks, scores within 1e-6
 * with every feature (7-row blocks mixing layers), with max_feature_nodes (the influence
 * ranking sees the device rows) and with a CLT (its features write to every later layer);
 *   gemma     the Gemma 2 and 3 fixtures of test_graph_gemma.c (post-norms, soft-capped and
 *             windowed attention, q/k norms; transcoders at Gemma Scope's sites and before
 *             the post-norm): the same comparison;
 *   model     a CUDA F32 model's forward gives the replacement model the same graph as the CPU's;
 *   memory    the plan's device bytes are what the device reports the graph's buffers took,
 *             and a plan over the device's memory is refused naming graph.batch. */
#include <math.h>

#include "loupe/clt.h"
#include "loupe/graph.h"
#include "loupe/safetensors.h"
#include "gputest.h"

#define GDIR LP_FIXTURES "/graph"

typedef struct fixture {
    lp_model *m;
    lp_ctx c;
    lp_clt *tc;
    lp_st_file ref;
    int T;
    const int32_t *tokens;
} fixture;

static void setup(fixture *fx) {
    OK(lp_st_open(&fx->ref, GDIR "/reference.safetensors"));
    OK(lp_model_load(&fx->m, GDIR "/model", LP_CPU, LP_F32));
    OK(lp_ctx_init(&fx->c, LP_CPU, LP_F32));
    OK(lp_clt_load(&fx->tc, &fx->c, GDIR "/transcoders"));
    const lp_st_tensor *t = lp_st_find(&fx->ref, "tokens");
    cr_assert(t);
    fx->tokens = t->data;
    fx->T = (int)t->shape[0];
}

static void teardown(fixture *fx) {
    lp_clt_free(fx->tc, &fx->c);
    lp_model_free(fx->m);
    lp_ctx_free(&fx->c);
    lp_st_close(&fx->ref);
}

static void same_graph(const lp_graph *cpu, const lp_graph *dev, const char *what) {
    cr_assert_eq(dev->n_active, cpu->n_active, "%s: active features", what);
    cr_assert_eq(memcmp(dev->active, cpu->active, (size_t)cpu->n_active * 3 * sizeof(int32_t)), 0, "%s: active features", what);
    cr_assert_eq(dev->n_features, cpu->n_features, "%s: selected features", what);
    cr_assert_eq(memcmp(dev->selected, cpu->selected, (size_t)cpu->n_features * sizeof(int32_t)), 0, "%s: selection", what);
    cr_assert_eq(dev->n_logits, cpu->n_logits);
    cr_assert_eq(memcmp(dev->logit_ids, cpu->logit_ids, cpu->n_logits * sizeof(int32_t)), 0, "%s: logit targets", what);
    cr_assert_eq(dev->n_nodes, cpu->n_nodes);
    cr_assert_eq(lp_graph_nnz(dev), lp_graph_nnz(cpu), "%s: %lld stored entries vs the CPU's %lld", what, (long long)lp_graph_nnz(dev),
                 (long long)lp_graph_nnz(cpu));
    double amax = 0, dmax = 0, smax = 0;
    for (int64_t e = 0; e < lp_graph_nnz(cpu); e++) amax = fmax(amax, fabs(cpu->val[e]));
    for (int64_t i = 0; i < cpu->n_nodes; i++) {
        cr_assert_eq(dev->row_ptr[i + 1], cpu->row_ptr[i + 1], "%s: row %lld's entries", what, (long long)i);
        for (int64_t e = cpu->row_ptr[i]; e < cpu->row_ptr[i + 1]; e++) {
            cr_assert_eq(dev->col[e], cpu->col[e], "%s: row %lld's columns", what, (long long)i);
            dmax = fmax(dmax, fabs(dev->val[e] - cpu->val[e]));
        }
        smax = fmax(smax, fabs(dev->row_abs[i] - cpu->row_abs[i]) / fmax(cpu->row_abs[i], 1e-30));
    }
    cr_log_info("%s: %lld nodes, %lld entries, %lld backward passes; max |A| %.4g, device vs CPU max |diff| %.3g, row sums %.3g "
                "relative; replacement %.7f / %.7f, completeness %.7f / %.7f",
                what, (long long)cpu->n_nodes, (long long)lp_graph_nnz(cpu), (long long)dev->n_backward, amax, dmax, smax,
                dev->replacement_score, cpu->replacement_score, dev->completeness_score, cpu->completeness_score);
    cr_assert(amax > 0 && dmax <= 1e-5 * amax, "%s: device rows differ by %.3g (largest entry %.3g)", what, dmax, amax);
    cr_assert_leq(smax, 1e-5, "%s: row sums", what);
    for (int64_t i = 0; i < cpu->n_nodes; i++) cr_assert_eq(dev->node_mask[i], cpu->node_mask[i], "%s: node mask %lld", what, (long long)i);
    for (int64_t e = 0; e < lp_graph_nnz(cpu); e++) cr_assert_eq(dev->edge_mask[e], cpu->edge_mask[e], "%s: edge mask %lld", what, (long long)e);
    cr_assert_leq(fabs(dev->replacement_score - cpu->replacement_score), 1e-6, "%s: replacement score", what);
    cr_assert_leq(fabs(dev->completeness_score - cpu->completeness_score), 1e-6, "%s: completeness score", what);
}

static void both(fixture *fx, const lp_clt *tc, lp_graph_opts o, const char *what) {
    lp_graph *cpu, *dev;
    OK(lp_graph_build(&cpu, fx->m, tc, fx->tokens, fx->T, &o));
    o.device = LP_CUDA;
    OK(lp_graph_build(&dev, fx->m, tc, fx->tokens, fx->T, &o));
    cr_assert_eq(cpu->device_bytes, 0);
    cr_assert_gt(dev->device_bytes, 0);
    same_graph(cpu, dev, what);
    lp_graph_free(cpu);
    lp_graph_free(dev);
}

Test(graph_cuda, every_feature_matches_the_cpu) {
    LP_TEST_REQUIRE_GPU();
    fixture fx = {0};
    setup(&fx);
    lp_graph_opts o = lp_graph_defaults();
    o.batch_size = 7; /* several blocks, each mixing layers and positions */
    both(&fx, fx.tc, o, "full");
    teardown(&fx);
}

Test(graph_cuda, max_feature_nodes_matches_the_cpu) {
    LP_TEST_REQUIRE_GPU();
    fixture fx = {0};
    setup(&fx);
    lp_graph_opts o = lp_graph_defaults();
    o.batch_size = 8, o.update_interval = 2, o.max_feature_nodes = 40;
    both(&fx, fx.tc, o, "selection");
    teardown(&fx);
}

Test(graph_cuda, cross_layer_transcoder_matches_the_cpu) {
    LP_TEST_REQUIRE_GPU();
    fixture fx = {0};
    setup(&fx);
    lp_clt *clt;
    OK(lp_clt_load(&clt, &fx.c, GDIR "/clt"));
    lp_graph_opts o = lp_graph_defaults();
    o.batch_size = 16;
    both(&fx, clt, o, "clt");
    lp_clt_free(clt, &fx.c);
    teardown(&fx);
}

static lp_status keep_plan(const lp_graph_plan *p, void *user) {
    *(lp_graph_plan *)user = *p;
    return LP_OK;
}

/* The plan's device bytes against the device's own count of what the graph took (free memory
 * before and after its allocations): equal on the emulator; a GPU may round each of the two
 * allocations up to its 2 MiB pages. */
Test(graph_cuda, plan_states_the_device_bytes) {
    LP_TEST_REQUIRE_GPU();
    fixture fx = {0};
    setup(&fx);
    lp_graph_plan pl = {0};
    lp_graph_opts o = lp_graph_defaults();
    o.batch_size = 5, o.device = LP_CUDA, o.on_plan = keep_plan, o.user = &pl;
    lp_graph *g;
    OK(lp_graph_build(&g, fx.m, fx.tc, fx.tokens, fx.T, &o));
    cr_log_info("plan: device %zu bytes; the device reported %zu", pl.device_bytes, g->device_bytes);
    cr_assert_gt(pl.device_bytes, 0);
    cr_assert(g->device_bytes >= pl.device_bytes && g->device_bytes <= pl.device_bytes + (4u << 20),
              "plan %zu device bytes, allocated %zu", pl.device_bytes, g->device_bytes);
    /* the row block dominates as batch grows: the plan grows with it */
    lp_graph_plan p2 = {0};
    o.batch_size = 50, o.user = &p2;
    lp_graph_free(g);
    OK(lp_graph_build(&g, fx.m, fx.tc, fx.tokens, fx.T, &o));
    cr_assert_gt(p2.device_bytes, pl.device_bytes);
    cr_assert(g->device_bytes >= p2.device_bytes && g->device_bytes <= p2.device_bytes + (4u << 20));
    lp_graph_free(g);
    /* a plan over the device's memory: refused before anything is allocated, naming the setting */
    o.batch_size = 1 << 24, o.user = &p2;
    cr_assert_eq(lp_graph_build(&g, fx.m, fx.tc, fx.tokens, fx.T, &o), LP_ERR_ARG);
    cr_assert(strstr(lp_last_error(), "graph.batch"), "%s", lp_last_error());
    cr_assert_null(g);
    teardown(&fx);
}

/* The replacement model's forward on a CUDA F32 model (what a large model needs): the same
 * graph as from the CPU model. */
Test(graph_cuda, cuda_model_gives_the_same_graph) {
    LP_TEST_REQUIRE_GPU();
    fixture fx = {0};
    setup(&fx);
    lp_model *gm;
    OK(lp_model_load(&gm, GDIR "/model", LP_CUDA, LP_F32));
    lp_graph_opts o = lp_graph_defaults();
    o.batch_size = 32;
    lp_graph *cpu, *dev;
    OK(lp_graph_build(&cpu, fx.m, fx.tc, fx.tokens, fx.T, &o));
    o.device = LP_CUDA;
    OK(lp_graph_build(&dev, gm, fx.tc, fx.tokens, fx.T, &o));
    same_graph(cpu, dev, "cuda model");
    lp_graph_free(cpu);
    lp_graph_free(dev);
    lp_model_free(gm);
    teardown(&fx);
}

/* Gemma: the device's post-norm backward, soft-capped and windowed patterns and the other
 * transcoder sites against the CPU twin (itself checked against circuit-tracer). */
static void gemma_both(const char *model, const char *tcdir, int batch, const char *what) {
    lp_st_file ref;
    OK(lp_st_open(&ref, LP_FIXTURES "/graph_gemma/reference.safetensors"));
    fixture fx = {0};
    OK(lp_model_load(&fx.m, model, LP_CPU, LP_F32));
    OK(lp_ctx_init(&fx.c, LP_CPU, LP_F32));
    OK(lp_clt_load(&fx.tc, &fx.c, tcdir));
    const lp_st_tensor *t = lp_st_find(&ref, "tokens");
    cr_assert(t);
    fx.tokens = t->data, fx.T = (int)t->shape[0];
    lp_graph_opts o = lp_graph_defaults();
    o.batch_size = batch;
    both(&fx, fx.tc, o, what);
    lp_clt_free(fx.tc, &fx.c);
    lp_model_free(fx.m);
    lp_ctx_free(&fx.c);
    lp_st_close(&ref);
}

Test(graph_cuda, gemma2_sites_match_the_cpu) {
    LP_TEST_REQUIRE_GPU();
    gemma_both(LP_FIXTURES "/graph_gemma/gemma2/model", LP_FIXTURES "/graph_gemma/gemma2/scope", 16, "gemma2 scope");
    gemma_both(LP_FIXTURES "/graph_gemma/gemma2/model", LP_FIXTURES "/graph_gemma/gemma2/skip", 7, "gemma2 skip");
}

Test(graph_cuda, gemma3_matches_the_cpu) {
    LP_TEST_REQUIRE_GPU();
    gemma_both(LP_FIXTURES "/graph_gemma/gemma3/model", LP_FIXTURES "/graph_gemma/gemma3/skip", 16, "gemma3 skip");
}
