/* test_gemma_cuda.c: the Gemma 2 and Gemma 3 CUDA forward and backward against the float64
 * references of test_gemma.c (tests/fixtures/gemma2-tiny, gemma3-tiny: TransformerLens 3.9 /
 * Hugging Face), in fp32: the logits, the loss, every hook's value and the loss's gradient at
 * every hook, with the CPU test's budgets and conventions (gemma_test.h: logits max_rel 1e-4,
 * hooks and gradients nmse 1e-9, loss 1e-4; q_norm / k_norm hooks compared flattened; ln1's
 * whole gradient formed from the fixture); the GPU computes in fp32 too, only the summation
 * order differs. Then greedy generation with the KV cache past the sliding window: the same
 * tokens as the CPU's, from logits within the logits budget of the CPU's at every step.
 * Skips with the reason when no GPU is usable; LOUPE_REQUIRE_GPU=1 turns the skip into a
 * failure (the emulated build, tests/cuda_emu/, runs it on the CPU: the models are tiny). */
#include "gemma_test.h"

Test(gemma_cuda, parity_gemma2_tiny) {
    LP_TEST_REQUIRE_GPU();
    parity(&GEMMA2, LP_CUDA);
}
Test(gemma_cuda, parity_gemma3_tiny) {
    LP_TEST_REQUIRE_GPU();
    parity(&GEMMA3, LP_CUDA);
}
Test(gemma_cuda, gradients_gemma2_tiny) {
    LP_TEST_REQUIRE_GPU();
    gradients(&GEMMA2, LP_CUDA);
}
Test(gemma_cuda, gradients_gemma3_tiny) {
    LP_TEST_REQUIRE_GPU();
    gradients(&GEMMA3, LP_CUDA);
}

typedef struct step_logits {
    float *rows; /* [n_new, V] */
    int V;
} step_logits;

static lp_status keep_logits(int step, const float *logits, int n_vocab, void *user) {
    step_logits *s = user;
    if (n_vocab != s->V) return LP_ERR(LP_ERR_SHAPE, "on_logits: %d logits, the model has %d", n_vocab, s->V);
    memcpy(s->rows + (size_t)step * s->V, logits, (size_t)n_vocab * sizeof(float));
    return LP_OK;
}

enum { N_NEW = 16 };

static void generate(lp_model *m, const int32_t *prompt, int P, int32_t *out, float *rows) {
    step_logits s = {.rows = rows, .V = lp_model_config(m)->d_vocab};
    int n_out = 0;
    lp_gen_opts o = {.max_tokens = N_NEW, .temperature = 0.0f, .top_p = 1.0f, .seed = 1, .stop_token = -1,
                     .on_logits = keep_logits, .user = &s};
    cr_assert_eq(lp_generate(m, prompt, P, &o, out, &n_out), LP_OK, "%s", lp_last_error());
    cr_assert_eq(n_out, N_NEW);
}

/* 9 prompt tokens and 16 new ones: every local layer's window of 4 slides 21 times. The
 * smallest float64 top-1 margin on this continuation is 0.014 (gemma2-tiny, test_gemma.c),
 * far above fp32 noise, so the tokens must be the same. */
static void generate_like_cpu(const tiny *f) {
    LP_TEST_REQUIRE_GPU();
    lp_st_file ref;
    open_ref(&ref, f);
    lp_model *cpu = load(f, LP_CPU), *gpu = load(f, LP_CUDA);
    const lp_st_tensor *tok = R(&ref, "tokens");
    int P = (int)tok->shape[1], V = lp_model_config(cpu)->d_vocab;
    int32_t out_c[N_NEW], out_g[N_NEW];
    float *rc = malloc((size_t)N_NEW * V * sizeof(float)), *rg = malloc((size_t)N_NEW * V * sizeof(float));
    cr_assert(rc && rg);
    generate(cpu, tok->data, P, out_c, rc);
    generate(gpu, tok->data, P, out_g, rg);
    for (int k = 0; k < N_NEW; k++) {
        char what[96];
        snprintf(what, sizeof what, "%s cuda step %d logits vs cpu", f->name, k);
        LP_EXPECT_WITHIN(what, 0, lp_compare_f(rg + (size_t)k * V, rc + (size_t)k * V, V), max_rel, LOGITS_MAX_REL);
        cr_expect_eq(out_g[k], out_c[k], "%s: step %d: cuda %d, cpu %d", f->name, k, out_g[k], out_c[k]);
    }
    free(rc), free(rg);
    lp_model_free(cpu), lp_model_free(gpu);
    lp_st_close(&ref);
}

Test(gemma_cuda, generate_like_cpu_gemma2_tiny) { generate_like_cpu(&GEMMA2); }
Test(gemma_cuda, generate_like_cpu_gemma3_tiny) { generate_like_cpu(&GEMMA3); }
