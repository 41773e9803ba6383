/* test_attrib_fused_cuda.c: the fused node sums of attribution patching, formed on the GPU by
 * the backward's hook sites, equal the unfused float64 reduction of the same GPU run's
 * captures and kept gradients (attrib_fused_test.h). Without a GPU every test skips, saying
 * why; the emulated build runs it on the CPU emulator. */
#include "attrib_fused_test.h"

Test(attrib_fused_cuda, gpt2_every_node_kind) {
    LP_TEST_REQUIRE_GPU();
    fused_check(&FUSED_GPT2, LP_CUDA, "gpt2");
}
Test(attrib_fused_cuda, llama_every_node_kind) {
    LP_TEST_REQUIRE_GPU();
    fused_check(&FUSED_LLAMA, LP_CUDA, "llama");
}
