/* test_attrib_fused.c: the fused node sums of attribution patching equal the unfused float64
 * reduction, on the CPU (attrib_fused_test.h). */
#include "attrib_fused_test.h"

Test(attrib_fused, gpt2_every_node_kind) { fused_check(&FUSED_GPT2, LP_CPU, "gpt2"); }
Test(attrib_fused, llama_every_node_kind) { fused_check(&FUSED_LLAMA, LP_CPU, "llama"); }
