/* test_sae_train_bf16_cuda.c: TopK training on the GPU with the bf16 encoder copy (the
 * default there: fp32 master weights, the pre-activation GEMM on bf16 copies of W_enc and
 * x_in with fp32 sums, the latent-major encoder gradient) follows the dense float64 loop of
 * tests/sae_train_ref.h step by step over its 25 steps. The F32 GPU path is held to the CPU's
 * budgets (MSE 1e-5 relative per step, parameters nmse 1e-11). The bf16 budgets: each
 * pre-activation carries a relative error of ~2^-9 from the two roundings, so the kept
 * values and the MSE move by ~1e-3 relative, and a latent within that of the k-th may swap
 * in or out of a token's top k; each step's MSE within 2e-2 relative of float64's and the
 * final parameters within nmse 1e-3 (measured values printed). Without a GPU the test
 * skips; `make test` runs it on the CUDA emulator. */
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

Test(sae_train_bf16_cuda, topk_bf16_encoder_follows_the_float64_curve) {
    LP_TEST_REQUIRE_GPU();
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CUDA, LP_F32), LP_OK, "%s", lp_last_error());
    check_curve(dir, LP_SAE_TOPK, &c, -1, 2e-2, 1e-3); /* -1: the default, bf16 on CUDA */
    lp_ctx_free(&c);
}

Test(sae_train_bf16_cuda, topk_f32_encoder_keeps_the_cpu_budgets) {
    LP_TEST_REQUIRE_GPU();
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CUDA, LP_F32), LP_OK, "%s", lp_last_error());
    check_curve(dir, LP_SAE_TOPK, &c, 0, 1e-5, 1e-11);
    lp_ctx_free(&c);
}
