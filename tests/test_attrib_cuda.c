/* test_attrib_cuda.c: attribution end to end on the GPU against the CPU, on small random
 * GPT-2 and Llama models (the same weights on both devices: lp_model_random gives them bit
 * for bit): the model's gradient at every hook, the attribution-patching grid (every node
 * kind) and the exact-patching grid. F32 on both sides; the GPU sums in another order, so
 * the budgets are nmse 1e-8 for gradients and AtP scores (products of activations and
 * gradients) and 1e-6 for exact patching, relative to the metric above 1 and absolute
 * below (a score is a difference of two metrics, each a difference of logits of order 1
 * here, good to ~1e-7 however much they cancel; measured up to 1e-7). Without a GPU every test skips, saying why
 * (LOUPE_REQUIRE_GPU=1 turns the skip into a failure); the emulated build runs it on the
 * CPU emulator. */
#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "loupe/model.h"
#include "testutil.h"

enum { B = 2, T = 7 };

static const lp_config GPT2 = {.arch = LP_ARCH_GPT2, .n_layers = 2, .d_model = 32, .n_heads = 4, .d_mlp = 64,
                               .n_ctx = 16, .d_vocab = 50};
static const lp_config LLAMA = {.arch = LP_ARCH_LLAMA, .n_layers = 2, .d_model = 32, .n_heads = 4, .n_kv_heads = 2,
                                .d_head = 8, .d_mlp = 48, .n_ctx = 16, .d_vocab = 50};

static void models(const lp_config *cfg, lp_model **cpu, lp_model **gpu) {
    cr_assert_eq(lp_model_random(cpu, cfg, 5, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_random(gpu, cfg, 5, LP_CUDA, LP_F32), LP_OK, "%s", lp_last_error());
}

static void inputs(int32_t *tok, int32_t *corr, int32_t *ans, int32_t *wr, int V) {
    uint64_t s = 3;
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)(lp_test_uniform(&s, 0, 1) * V) % V;
    for (int i = 0; i < B * T; i++) corr[i] = i % T == 2 ? (tok[i] + 7) % V : tok[i]; /* one token changed */
    for (int b = 0; b < B; b++) ans[b] = (b * 13 + 1) % V, wr[b] = (b * 29 + 5) % V;
}

static void expect_nmse(const char *what, const float *got, const float *ref, size_t n, double budget) {
    lp_cmp r = lp_compare_f(got, ref, n);
    cr_expect(r.nmse <= budget, "%s: nmse %.3e exceeds %.1e", what, r.nmse, budget);
}

static void grads_at_every_hook(const lp_config *cfg, const char *name) {
    LP_TEST_REQUIRE_GPU();
    lp_model *mc, *mg;
    models(cfg, &mc, &mg);
    int32_t tok[B * T], corr[B * T], ans[B], wr[B];
    inputs(tok, corr, ans, wr, cfg->d_vocab);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wr};
    double metc[B], metg[B];
    cr_assert_eq(lp_model_grad(mc, tok, B, T, &mt, "*", metc), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_grad(mg, tok, B, T, &mt, "*", metg), LP_OK, "%s", lp_last_error());
    for (int b = 0; b < B; b++)
        cr_expect(fabs(metg[b] - metc[b]) <= 1e-5 * fmax(1.0, fabs(metc[b])), "%s metric[%d]: %.8g vs %.8g", name, b, metg[b],
                  metc[b]);
    int checked = 0;
    double worst = 0;
    for (int h = 0; h < lp_hook_count(mc); h++) {
        const char *hook = lp_hook_name(mc, h);
        lp_tensor gc, gg;
        if (lp_grad_get(mc, hook, &gc) != LP_OK) continue; /* no gradient kept there (e.g. after the metric) */
        cr_assert_eq(lp_grad_get(mg, hook, &gg), LP_OK, "%s %s: %s", name, hook, lp_last_error());
        size_t n = (size_t)lp_shape_numel(gc.shape, gc.ndim);
        cr_assert_eq((size_t)lp_shape_numel(gg.shape, gg.ndim), n, "%s %s: shapes differ", name, hook);
        float *c = malloc(n * sizeof(float) + 1);
        memcpy(c, gc.data, n * sizeof(float)); /* the next lp_grad_get may reuse the buffer */
        char what[160];
        snprintf(what, sizeof what, "%s gradient at %s", name, hook);
        expect_nmse(what, gg.data, c, n, 1e-8);
        worst = fmax(worst, lp_compare_f(gg.data, c, n).nmse);
        free(c);
        checked++;
    }
    fprintf(stderr, "  %-6s gradients at %d hooks: worst nmse %.3e of 1.0e-08\n", name, checked, worst);
    cr_expect_gt(checked, 20, "%s: gradients at only %d hooks", name, checked);
    lp_model_free(mc);
    lp_model_free(mg);
}
Test(attrib_cuda, gpt2_gradient_at_every_hook) { grads_at_every_hook(&GPT2, "gpt2"); }
Test(attrib_cuda, llama_gradient_at_every_hook) { grads_at_every_hook(&LLAMA, "llama"); }

static void grids(const lp_config *cfg, const char *name) {
    LP_TEST_REQUIRE_GPU();
    lp_model *mc, *mg;
    models(cfg, &mc, &mg);
    int32_t tok[B * T], corr[B * T], ans[B], wr[B];
    inputs(tok, corr, ans, wr, cfg->d_vocab);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wr};
    lp_attrib_opts o = {.kinds = 0, .patch_batch = 8};
    lp_pair_result rc[B], rg[B];
    memset(rc, 0, sizeof rc), memset(rg, 0, sizeof rg);
    cr_assert_eq(lp_attrib_atp(mc, tok, corr, B, T, &mt, &o, rc), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_attrib_atp(mg, tok, corr, B, T, &mt, &o, rg), LP_OK, "%s", lp_last_error());
    lp_pair_result ec, eg;
    memset(&ec, 0, sizeof ec), memset(&eg, 0, sizeof eg);
    cr_assert_eq(lp_attrib_exact(mc, tok, corr, T, &mt, &o, &ec), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_attrib_exact(mg, tok, corr, T, &mt, &o, &eg), LP_OK, "%s", lp_last_error());
    int kinds = 0;
    double worst = 0;
    cr_expect(fabs(eg.metric_corrupted - ec.metric_corrupted) <= 1e-6 * fmax(1.0, fabs(ec.metric_corrupted)),
              "%s: corrupted metric %.9g on the GPU, %.9g on the CPU", name, eg.metric_corrupted, ec.metric_corrupted);
    for (int k = 0; k < LP_NODE_KINDS; k++) {
        char what[128];
        for (int b = 0; b < B; b++) {
            const lp_node_scores *c = &rc[b].s[k], *g = &rg[b].s[k];
            if (!c->v) continue;
            cr_assert(g->v != NULL, "%s AtP %s: missing on the GPU", name, lp_node_kind_name(k));
            size_t n = (size_t)lp_shape_numel(c->shape, c->ndim);
            snprintf(what, sizeof what, "%s AtP %s pair %d", name, lp_node_kind_name(k), b);
            expect_nmse(what, g->v, c->v, n, 1e-8);
            kinds += b == 0;
        }
        const lp_node_scores *c = &ec.s[k], *g = &eg.s[k];
        if (!c->v) continue;
        cr_assert(g->v != NULL, "%s exact %s: missing on the GPU", name, lp_node_kind_name(k));
        size_t n = (size_t)lp_shape_numel(c->shape, c->ndim);
        const double size = fmax(1.0, fmax(fabs(ec.metric_clean), fabs(ec.metric_corrupted)));
        double diff = 0;
        for (size_t i = 0; i < n; i++) diff = fmax(diff, fabs((double)g->v[i] - c->v[i]));
        cr_expect(diff <= 1e-6 * size, "%s exact %s: max difference %.3e (budget 1e-6 x %.3g)", name,
                  lp_node_kind_name(k), diff, size);
        worst = fmax(worst, diff / size);
    }
    fprintf(stderr, "  %-6s AtP and exact patching grids: %d node kinds; exact: worst difference %.2e (of 1e-6)\n",
            name, kinds, worst);
    cr_expect_eq(kinds, LP_NODE_KINDS, "%s: %d node kinds scored", name, kinds);
    for (int b = 0; b < B; b++) lp_pair_result_free(&rc[b]), lp_pair_result_free(&rg[b]);
    lp_pair_result_free(&ec), lp_pair_result_free(&eg);
    lp_model_free(mc);
    lp_model_free(mg);
}
Test(attrib_cuda, gpt2_patching_grids) { grids(&GPT2, "gpt2"); }
Test(attrib_cuda, llama_patching_grids) { grids(&LLAMA, "llama"); }
