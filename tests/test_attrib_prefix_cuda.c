/* test_attrib_prefix_cuda.c: attribution patching with the pairs' common prefix shared
 * against the full runs on the GPU (attrib_prefix_test.h), over every node kind but
 * attn.hook_pattern (whose three-step suffix attention is CPU only: with it the GPU runs
 * whole), on the GPT-2, Llama and Gemma 2 fixtures; and with the pattern asked for, the
 * full path. Without a GPU every test skips, saying why. */
#include "attrib_prefix_test.h"

#define NO_PATTERN (((1u << LP_NODE_KINDS) - 1) & ~(1u << LP_NODE_PATTERN))

Test(attrib_prefix_cuda, gpt2) {
    LP_TEST_REQUIRE_GPU();
    prefix_check_model("tests/fixtures/gpt2-tiny", "gpt2 (GPU)", LP_CUDA, NO_PATTERN);
}
Test(attrib_prefix_cuda, llama_gqa) {
    LP_TEST_REQUIRE_GPU();
    prefix_check_model("tests/fixtures/llama-tiny", "llama (GPU)", LP_CUDA, NO_PATTERN);
}
Test(attrib_prefix_cuda, gemma2_window_softcap) {
    LP_TEST_REQUIRE_GPU();
    prefix_check_model("tests/fixtures/gemma2-tiny", "gemma2 (GPU)", LP_CUDA, NO_PATTERN);
}

Test(attrib_prefix_cuda, pattern_nodes_run_whole) {
    LP_TEST_REQUIRE_GPU();
    lp_model *m = load_on("tests/fixtures/gpt2-tiny", LP_CUDA);
    const int mid[PB] = {5, 7};
    check_case(m, "gpt2 (GPU) with the pattern", mid, -1, LP_METRIC_LOGIT_DIFF, 0, 0, 0);
    lp_model_free(m);
}
