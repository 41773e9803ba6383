/* test_sae_train_ref.c: the trainer's steps (sparse for topk: gathered decoder rows,
 * latent-major encoder gradient; d b_dec through d b_enc) against a dense float64 training
 * loop written here from the definitions: every latent's pre-activation, the top-k mask
 * (or ReLU and the norm-weighted L1), full [N, d_sae] gradients, Adam, unit decoder rows.
 *
 * The store holds exactly one batch, so every step sees the same tokens (in a shuffled
 * order, which changes only the rounding). Budgets: the engine computes in f32 with double
 * accumulators in its reductions; over 25 Adam steps its parameters stay within nmse 1e-11
 * of the float64 ones (measured: 1e-13; a few f32 ulps per update, which Adam does not
 * amplify where the gradient is well above rounding), and each step's MSE within 1e-5
 * relative (measured: 2e-6). */
#include "sae_train_ref.h"

static char dir[64];
static void mk(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-test-saeref-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
}
static void rm(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect_eq(system(cmd), 0);
}
TestSuite(sae_train_ref, .init = mk, .fini = rm, .timeout = 300);

static void check(lp_sae_arch arch) {
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    check_curve(dir, arch, &c, 0, 0, 1e-5, 1e-11);
    lp_ctx_free(&c);
}

Test(sae_train_ref, topk_steps_equal_a_dense_float64_loop) { check(LP_SAE_TOPK); }
Test(sae_train_ref, standard_steps_equal_a_dense_float64_loop) { check(LP_SAE_STANDARD); }
