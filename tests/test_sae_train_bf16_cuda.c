/* test_sae_train_bf16_cuda.c: TopK training on the GPU with the bf16 encoder copy (the
 * default there: fp32 master weights, the pre-activation GEMM on bf16 copies of W_enc and
 * x_in with fp32 sums and bias, the latent-major encoder gradient, the next window uploaded
 * asynchronously: the store here holds one batch per window, so every step switches
 * windows) against the dense float64 loop of tests/sae_train_ref.h, 25 steps:
 *  - against float64 with the same bf16 roundings of x_in and W_enc in its pre-activations:
 *    equal to fp32 rounding (MSE within 1e-5 relative, measured ~1e-6) until a master
 *    weight within rounding of a bf16 boundary rounds the other way on one side or a
 *    latent within rounding of the k-th swaps (here from step ~20); over all 25 steps the
 *    MSE within 2e-2 relative (measured 7e-3) and the parameters within nmse 1e-4
 *    (measured 2e-5). The first 15 steps are held to the 1e-5.
 *  - against plain float64: each pre-activation carries a relative error of ~2^-9, the MSE
 *    of the first step moves by 3e-3, and Adam (lr 1e-2, where a small gradient's sign sets
 *    a full step) lets the runs drift apart along the same descent: each step's MSE within
 *    1.5e-1 relative (measured 7e-2), parameters within nmse 1.5e-1 (measured 4e-2).
 *  - the F32 encoder GEMM on the GPU keeps the CPU's budgets (1e-5, 1e-11).
 * Without a GPU the tests skip; `make test` runs them on the CUDA emulator. */
#include "sae_train_ref.h"

static char dir[64];
static void mk(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-test-saebf16-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
}
static void rm(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect_eq(system(cmd), 0);
}
TestSuite(sae_train_bf16_cuda, .init = mk, .fini = rm, .timeout = 600);

static void run(int encoder_bf16, int bf16_ref, double mse_budget, double param_budget) {
    LP_TEST_REQUIRE_GPU();
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CUDA, LP_F32), LP_OK, "%s", lp_last_error());
    check_curve(dir, LP_SAE_TOPK, &c, encoder_bf16, bf16_ref, mse_budget, param_budget);
    lp_ctx_free(&c);
}

/* -1: the default, bf16 on CUDA */
Test(sae_train_bf16_cuda, topk_bf16_encoder_equals_float64_with_the_same_roundings) {
    LP_TEST_REQUIRE_GPU();
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CUDA, LP_F32), LP_OK, "%s", lp_last_error());
    check_curve_tight(dir, LP_SAE_TOPK, &c, -1, 1, 2e-2, 1e-4, 15, 1e-5);
    lp_ctx_free(&c);
}
Test(sae_train_bf16_cuda, topk_bf16_encoder_follows_the_float64_curve) { run(-1, 0, 1.5e-1, 1.5e-1); }
Test(sae_train_bf16_cuda, topk_f32_encoder_keeps_the_cpu_budgets) { run(0, 0, 1e-5, 1e-11); }
