/* ops_cuda_budget.h: the error budgets of the GPU-against-CPU op tests (test_ops_cuda.c,
 * test_ops_attention_cuda.c), in one table so that both files compare by the same rules. */
#ifndef LOUPE_TEST_OPS_CUDA_BUDGET_H
#define LOUPE_TEST_OPS_CUDA_BUDGET_H

#include "loupe/ops.h"
#include "gputest.h"

/* ---- budgets: nmse = sum (gpu - cpu)^2 / sum cpu^2 -------------------------------------
 * fp32: the GPU and the CPU differ only in summation order and in last-ulp differences
 *   of expf/tanhf/division (and FMA contraction): per element ~1e-7 relative, so nmse
 *   ~1e-14 .. 1e-12; long dot products (K = 1000) give ~K * 2^-48 ~ 1e-11.
 * bf16: one round-to-nearest of the output has relative error <= 2^-9 (~2e-3), about
 *   uniform, so nmse ~ 2^-18 / 3 ~ 1.3e-6 from that rounding alone; 1e-4 leaves a
 *   margin of ~80 for accumulation and for outputs near zero. Comparisons of two GPU
 *   paths where one rounds its intermediates to bf16 (scores, pattern) get 5e-4.
 * Pure copies (embeddings, SET/PATCH/ZERO edits, gathers) must be bit-exact: budget 0.
 * Cross-entropy writes fp32 losses in both dtypes from identical (rounded) logits. */
enum {
    OP_EMBED, OP_POS_EMBED, OP_ADD, OP_GELU, OP_AFFINE, OP_LN_SCALE, OP_LN_APPLY, OP_MATMUL,
    OP_ATTENTION, OP_ATTN_SCORES, OP_SOFTMAX, OP_ATTN_APPLY, OP_FUSED_VS_STEPS,
    OP_CROSS_ENTROPY, OP_EDIT_COPY, OP_EDIT_ADD, OP_GATHER,
    OP_RMS_SCALE, OP_RMS_APPLY, OP_ROPE, OP_SILU_MUL, OP_ATTN_CACHED, OP_CACHED_VS_FUSED,
    OP_CACHED_DECODE,
    OP_ATTN_CFG, OP_ATTN_SCORES_CFG, OP_FUSED_VS_STEPS_CFG, OP_ATTN_CACHED_CFG, OP_CACHED_VS_FUSED_CFG,
    OP_CACHED_DECODE_CFG, OP_GELU_MUL, OP_SOFTCAP, OP_SCALE,
    OP_GELU_MUL_BWD, OP_SOFTCAP_BWD, OP_ATTN_BWD_CFG, OP_ATTN_SCORES_BWD_CFG, OP_BWD_VS_STEPS_CFG,
    OP_ATTN_BWD_REPEAT_CFG, OP_FLASH_FWD, OP_FLASH_BWD, OP_FLASH_VS_ROWS, OP_MATMUL_GELU, OP_COUNT
};
static const struct budget {
    const char *op;
    double nmse[2]; /* [0]: F32, [1]: BF16 */
} BUDGET[OP_COUNT] = {
    [OP_EMBED] = {"embed", {0, 0}},
    [OP_POS_EMBED] = {"pos_embed", {0, 0}},
    [OP_ADD] = {"add", {1e-10, 1e-4}},
    [OP_GELU] = {"gelu", {1e-10, 1e-4}},
    [OP_AFFINE] = {"affine", {1e-10, 1e-4}},
    [OP_LN_SCALE] = {"ln_scale", {1e-9, 1e-4}},
    [OP_LN_APPLY] = {"ln_apply", {1e-9, 1e-4}},
    [OP_MATMUL] = {"matmul", {1e-8, 1e-4}},
    [OP_ATTENTION] = {"attention", {1e-8, 1e-4}},
    [OP_ATTN_SCORES] = {"attn_scores", {1e-9, 1e-4}},
    [OP_SOFTMAX] = {"softmax_rows", {1e-9, 1e-4}},
    [OP_ATTN_APPLY] = {"attn_apply", {1e-8, 1e-4}},
    [OP_FUSED_VS_STEPS] = {"attention vs 3 steps (GPU)", {1e-9, 5e-4}},
    [OP_CROSS_ENTROPY] = {"cross_entropy", {1e-9, 1e-9}},
    [OP_EDIT_COPY] = {"edit zero/set/patch", {0, 0}},
    [OP_EDIT_ADD] = {"edit add", {1e-10, 1e-4}},
    [OP_GATHER] = {"gather_pos", {0, 0}},
    /* Llama family: the same reasoning as above (one bf16 rounding of the output, fp32
     * summation order otherwise). The cached kernel against the fused one on the GPU does
     * the same arithmetic in a different kernel: fp32 budget, and one output rounding in
     * bf16. A decode step and a full pass run each row through the same code of the same
     * kernel, so token-by-token decoding must reproduce the full pass bit for bit. */
    [OP_RMS_SCALE] = {"rms_scale", {1e-9, 1e-4}},
    [OP_RMS_APPLY] = {"rms_apply", {1e-9, 1e-4}},
    [OP_ROPE] = {"rope", {1e-10, 1e-4}},
    [OP_SILU_MUL] = {"silu_mul", {1e-10, 1e-4}},
    [OP_ATTN_CACHED] = {"attention_cached", {1e-8, 1e-4}},
    [OP_CACHED_VS_FUSED] = {"attention_cached vs fused (GPU)", {1e-9, 1e-4}},
    [OP_CACHED_DECODE] = {"attention_cached decode vs one pass (GPU)", {0, 0}},
    /* Gemma family (test_ops_gemma_cuda.c), by the same rules: the attention options add a
     * scale, a tanh (a few ulps) and a window, which only drops keys, to the same kernels, so
     * the attention budgets are those above; the backward ones are test_backward_cuda.c's
     * (fused backward 1e-9 in fp32, the three-step chain 5e-4 in bf16 where it rounds scores,
     * pattern, dpattern and dscores; and here also tanh' = 1 - (s/cap)^2 from bf16 scores).
     * lp_scale is one correctly rounded fp32 product on both sides: exact in F32. */
    [OP_ATTN_CFG] = {"attention_cfg", {1e-8, 1e-4}},
    [OP_ATTN_SCORES_CFG] = {"attn_scores_cfg", {1e-9, 1e-4}},
    [OP_FUSED_VS_STEPS_CFG] = {"attention_cfg vs 3 steps (GPU)", {1e-9, 5e-4}},
    [OP_ATTN_CACHED_CFG] = {"attention_cached_cfg", {1e-8, 1e-4}},
    [OP_CACHED_VS_FUSED_CFG] = {"attention_cached_cfg vs fused (GPU)", {1e-9, 1e-4}},
    [OP_CACHED_DECODE_CFG] = {"attention_cached_cfg decode vs one pass (GPU)", {0, 0}},
    [OP_GELU_MUL] = {"gelu_mul", {1e-10, 1e-4}},
    [OP_SOFTCAP] = {"softcap", {1e-10, 1e-4}},
    [OP_SCALE] = {"scale", {0, 1e-4}},
    [OP_GELU_MUL_BWD] = {"gelu_mul_backward", {1e-10, 1e-4}},
    [OP_SOFTCAP_BWD] = {"softcap_backward", {1e-10, 1e-4}},
    [OP_ATTN_BWD_CFG] = {"attention_backward_cfg", {1e-9, 1e-4}},
    [OP_ATTN_SCORES_BWD_CFG] = {"attn_scores_backward_cfg", {1e-8, 1e-4}},
    [OP_BWD_VS_STEPS_CFG] = {"attention_backward_cfg vs 3 steps (GPU)", {1e-9, 5e-4}},
    [OP_ATTN_BWD_REPEAT_CFG] = {"attention_backward_cfg run twice (GPU)", {0, 0}},
    /* The tensor-core attention (BF16 only; test_ops_flash_cuda.c): bf16 operands are exact in
     * the fp32 products, so beyond the output's rounding (~1.3e-6) it adds the rounding of the
     * probabilities (and in the backward of dS) to bf16 before their products, each ~2^-9
     * relative and independent across keys: the same order again, within the 1e-4 of every
     * bf16 attention budget. Against the row kernels (same inputs, two such roundings) 1e-4. */
    [OP_FLASH_FWD] = {"flash attention", {0, 1e-4}},
    [OP_FLASH_BWD] = {"flash attention backward", {0, 1e-4}},
    [OP_FLASH_VS_ROWS] = {"flash attention vs row kernels (GPU)", {0, 1e-4}},
    /* matmul + GELU in one GEMM (cuBLASLt's epilogue in BF16): the GELU of the fp32 sum rounded
     * once, where the CPU rounds nothing: matmul's budgets. */
    [OP_MATMUL_GELU] = {"matmul_gelu", {1e-8, 1e-4}},
};

static const lp_dtype DTYPES[2] = {LP_F32, LP_BF16};
static inline double budget(int op, lp_dtype dt) { return BUDGET[op].nmse[dt == LP_BF16]; }

static inline void expect_close(int op, lp_dtype dt, const char *label, uint64_t seed, const float *got,
                         const float *ref, size_t n) {
    char what[160];
    snprintf(what, sizeof what, "%s %s %s", BUDGET[op].op, lp_dtype_name(dt), label);
    LP_EXPECT_WITHIN(what, seed, lp_compare_f(got, ref, n), nmse, budget(op, dt));
}

#endif
