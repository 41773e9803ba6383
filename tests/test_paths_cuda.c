/* test_paths_cuda.c: path patching and edge attribution patching on the GPU against the
 * CPU, on the gpt2-tiny and llama-tiny (grouped-query) fixtures, F32 on both sides, with the
 * budgets of test_attrib_cuda.c: edge scores (products of deltas and gradients, with and
 * without integrated gradients and a frozen pattern) within nmse 1e-8. A path-patching effect
 * is a difference of two logit differences, four logits, each of which the GPU gives within
 * ~1e-6 of the largest logit (F32 forwards agree to max_rel 9e-7 in test_generate_cuda.c):
 * the budget is 4e-6 x max(1, max |logit|) of the clean run (measured 2e-7 of it on the
 * emulator). Without a GPU every test skips, saying why (LOUPE_REQUIRE_GPU=1 turns
 * the skip into a failure); the emulated build runs it on the CPU emulator. */
#include "loupe/model.h"
#include "loupe/paths.h"
#include "testutil.h"

enum { T = 8 };

static lp_model *load(const char *dir, lp_device dev) {
    lp_model *m = NULL;
    cr_assert_eq(lp_model_load(&m, dir, dev, LP_F32), LP_OK, "%s: %s", dir, lp_last_error());
    return m;
}

static void eap(const char *name, lp_model *mc, lp_model *mg, const int32_t *cl, const int32_t *cx, const lp_metric *mt,
                const lp_path_opts *o, const char *what) {
    lp_eap_result rc, rg;
    cr_assert_eq(lp_eap(mc, cl, cx, T, mt, o, &rc), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_eap(mg, cl, cx, T, mt, o, &rg), LP_OK, "%s", lp_last_error());
    cr_assert(rg.n_senders == rc.n_senders && rg.n_receivers == rc.n_receivers);
    char label[128];
    snprintf(label, sizeof label, "%s EAP %s", name, what);
    cr_expect(fabs(rg.metric_clean - rc.metric_clean) <= 1e-5 * fmax(1.0, fabs(rc.metric_clean)), "%s: clean metric", label);
    LP_EXPECT_WITHIN(label, 0, lp_compare_f(rg.scores, rc.scores, (size_t)rc.n_senders * rc.n_receivers), nmse, 1e-8);
    lp_eap_result_free(&rc), lp_eap_result_free(&rg);
}

static void paths(const char *name, const char *dir) {
    LP_TEST_REQUIRE_GPU();
    lp_model *mc = load(dir, LP_CPU), *mg = load(dir, LP_CUDA);
    const int V = lp_model_config(mc)->d_vocab;
    int32_t cl[T], cx[T], ans = 5, wr = 9;
    uint64_t s = 31;
    for (int i = 0; i < T; i++) cl[i] = (int32_t)(lp_test_next(&s) % (uint64_t)V);
    memcpy(cx, cl, sizeof cl);
    cx[2] = (cl[2] + 17) % V, cx[5] = (cl[5] + 3) % V;
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans, .wrong = &wr};
    eap(name, mc, mg, cl, cx, &mt, &(lp_path_opts){0}, "plain");
    eap(name, mc, mg, cl, cx, &mt, &(lp_path_opts){.ig_steps = 3}, "IG 3 steps");
    eap(name, mc, mg, cl, cx, &mt, &(lp_path_opts){.freeze = "blocks.*.attn.hook_pattern"}, "pattern frozen");
    /* path patching: every sender to the logits, and one head to every receiver it reaches */
    const int NS = lp_path_n_senders(mc), NR = lp_path_n_receivers(mc);
    const int logits = lp_path_receiver_find(mc, "logits"), head = lp_path_sender_find(mc, "blocks.0.attn.head.1");
    cr_assert(logits >= 0 && head >= 0);
    int recv[256], nr = 0;
    for (int j = 0; j < NR && nr < 256; j++)
        if (lp_path_is_edge(mc, head, j)) recv[nr++] = j;
    cr_assert_eq(lp_model_forward(mc, cl, 1, T, LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
    double size = 1;
    for (int v = 0; v < V * T; v++) size = fmax(size, fabs(lp_model_logits(mc)[v]));
    double worst = 0;
    for (int i = 0; i <= NS; i++) {
        const int sender = i < NS ? i : head, *rv = i < NS ? &logits : recv, n = i < NS ? 1 : nr;
        double ac, xc, ec, ag, xg, eg;
        cr_assert_eq(lp_path_patch(mc, cl, cx, T, &mt, sender, rv, n, NULL, &ac, &xc, &ec), LP_OK, "%s", lp_last_error());
        cr_assert_eq(lp_path_patch(mg, cl, cx, T, &mt, sender, rv, n, NULL, &ag, &xg, &eg), LP_OK, "%s", lp_last_error());
        char sn[96];
        lp_path_sender_name(mc, sender, sn, sizeof sn);
        cr_expect(fabs(eg - ec) <= 4e-6 * size, "%s path patching %s -> %s: effect %.9g on the GPU, %.9g on the CPU", name, sn,
                  i < NS ? "logits" : "every receiver", eg, ec);
        cr_expect(fabs(xg - xc) <= 4e-6 * size, "%s: corrupted metric %.9g on the GPU, %.9g on the CPU", name, xg, xc);
        worst = fmax(worst, fabs(eg - ec) / size);
    }
    fprintf(stderr, "  %-12s path patching of %d senders: worst difference %.2e of the largest logit %.3g (of 4e-6)\n", name, NS, worst, size);
    lp_model_free(mc), lp_model_free(mg);
}

Test(paths_cuda, gpt2_tiny) { paths("gpt2-tiny", LP_FIXTURES "/gpt2-tiny"); }
Test(paths_cuda, llama_tiny) { paths("llama-tiny", LP_FIXTURES "/llama-tiny"); }
