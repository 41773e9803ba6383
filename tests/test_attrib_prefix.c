/* test_attrib_prefix.c: attribution patching with the pairs' common prefix shared against
 * the full runs, on the CPU, over every node kind of the grid (attrib_prefix_test.h), on the
 * GPT-2, Llama, Gemma 2 and Gemma 3 fixtures; and the paths that always run whole. */
#include "attrib_prefix_test.h"

Test(attrib_prefix, gpt2) { prefix_check_model("tests/fixtures/gpt2-tiny", "gpt2", LP_CPU, 0); }
Test(attrib_prefix, llama_gqa) { prefix_check_model("tests/fixtures/llama-tiny", "llama", LP_CPU, 0); }
Test(attrib_prefix, gemma2_window_softcap) { prefix_check_model("tests/fixtures/gemma2-tiny", "gemma2", LP_CPU, 0); }
Test(attrib_prefix, gemma3_qk_norm) { prefix_check_model("tests/fixtures/gemma3-tiny", "gemma3", LP_CPU, 0); }

/* Off by default, and unavailable under integrated gradients: both runs whole. */
Test(attrib_prefix, off_and_integrated_gradients_run_whole) {
    lp_model *m = load_on("tests/fixtures/gpt2-tiny", LP_CPU);
    const lp_config *c = lp_model_config(m);
    int32_t clean[PB * PT], corr[PB * PT], ans[PB] = {1, 2}, wr[PB] = {3, 4};
    for (int i = 0; i < PB * PT; i++) clean[i] = corr[i] = (int32_t)((i * 7 + 1) % c->d_vocab);
    corr[6] = (corr[6] + 1) % c->d_vocab, corr[PT + 6] = (corr[PT + 6] + 1) % c->d_vocab;
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wr};
    lp_pair_result r[PB];
    lp_attrib_opts ig = {.ig_steps = 2, .kinds = 1u << LP_NODE_RESID_PRE, .prefix_share = 1};
    cr_assert_eq(lp_attrib_atp(m, clean, corr, PB, PT, &mt, &ig, r), LP_OK, "%s", lp_last_error());
    cr_expect_eq(m->res.T, PT);
    for (int b = 0; b < PB; b++) lp_pair_result_free(&r[b]);
    lp_attrib_opts off = {.kinds = 1u << LP_NODE_RESID_PRE}, on = off;
    cr_assert_eq(lp_attrib_atp(m, clean, corr, PB, PT, &mt, &off, r), LP_OK, "%s", lp_last_error());
    cr_expect_eq(m->res.T, PT);
    for (int b = 0; b < PB; b++) lp_pair_result_free(&r[b]);
    on.prefix_share = 1;
    cr_assert_eq(lp_attrib_atp(m, clean, corr, PB, PT, &mt, &on, r), LP_OK, "%s", lp_last_error());
    cr_expect_eq(m->res.T, PT - 6);
    for (int b = 0; b < PB; b++) lp_pair_result_free(&r[b]);
    lp_model_free(m);
}
