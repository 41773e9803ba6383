/* The transcoder-set trainer (clt_train.h): on data made by a random "teacher" CLT the
 * joint loss falls, for a CLT and for per-layer transcoders (JumpReLU with skip); the set
 * it writes reloads to the same parameters and the same encode/decode; the live source
 * trains from the tiny Llama's mlp.hook_in / hook_mlp_out. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/clt_train.h"
#include "loupe/hooks.h"
#include "loupe/model.h"
#include "loupe/output.h"
#include "loupe/tokens.h"
#include "testutil.h"

static lp_ctx ctx;
static char tmp[256];

static void setup(void) {
    cr_assert_eq(lp_ctx_init(&ctx, LP_CPU, LP_F32), LP_OK);
    snprintf(tmp, sizeof tmp, "/tmp/loupe-test-clt-train-XXXXXX");
    cr_assert(mkdtemp(tmp));
}
static void teardown(void) {
    lp_remove_tree(tmp);
    lp_ctx_free(&ctx);
}
TestSuite(clt_train, .init = setup, .fini = teardown);

/* y = a random set's decode of x uniform in +-1.7 (a set of the kind being trained: a per-layer
 * set cannot see another layer's input) */
typedef struct teacher {
    lp_clt *t;
    uint64_t seed;
    int L, D;
} teacher;

static lp_status teach(void *user, int n, float *x, float *y) {
    teacher *te = user;
    int L = te->L, D = te->D, S = te->t->cfg.d_sae;
    lp_test_fill(x, (size_t)L * n * D, te->seed++, -1.7f, 1.7f);
    float *f = malloc((size_t)L * n * S * sizeof *f);
    const float *fl[8];
    for (int l = 0; l < L; l++) {
        cr_assert_eq(lp_clt_encode(te->t, &ctx, l, x + (size_t)l * n * D, n, f + (size_t)l * n * S, 0), LP_OK);
        fl[l] = f + (size_t)l * n * S;
    }
    for (int j = 0; j < L; j++) cr_assert_eq(lp_clt_decode(te->t, &ctx, j, fl, x + (size_t)j * n * D, n, y + (size_t)j * n * D), LP_OK);
    free(f);
    return LP_OK;
}

static teacher make_teacher(lp_clt_kind kind, int L, int D, int S, uint64_t seed) {
    lp_clt_cfg c = {.kind = kind, .act = LP_CLT_RELU, .n_layers = L, .d_model = D, .d_sae = S};
    snprintf(c.input_hook, sizeof c.input_hook, "mlp.hook_in");
    snprintf(c.output_hook, sizeof c.output_hook, "hook_mlp_out");
    teacher te = {.seed = seed, .L = L, .D = D};
    cr_assert_eq(lp_clt_alloc(&te.t, &c, &ctx), LP_OK);
    float *p = te.t->mem;
    lp_test_fill(p, te.t->n_floats, seed + 1000, -0.3f, 0.3f);
    return te;
}

/* Reload: the same parameters, and encode/decode bit-identical on fresh inputs. */
static void expect_reload(lp_clt *t, const char *dir) {
    lp_clt *u = NULL;
    cr_assert_eq(lp_clt_load(&u, &ctx, dir), LP_OK, "%s", lp_last_error());
    cr_assert_eq(u->n_floats, t->n_floats);
    cr_expect(memcmp(u->mem, t->mem, t->n_floats * 4) == 0, "%s: the reloaded parameters differ", dir);
    cr_expect_eq(u->cfg.kind, t->cfg.kind);
    cr_expect_eq(u->cfg.act, t->cfg.act);
    cr_expect_eq(u->cfg.skip, t->cfg.skip);
    int L = t->cfg.n_layers, D = t->cfg.d_model, S = t->cfg.d_sae, N = 9;
    float *x = lp_test_rand((size_t)L * N * D, 77, -2, 2), *fa = malloc((size_t)L * N * S * 4), *fb = malloc((size_t)L * N * S * 4);
    float *ya = malloc((size_t)N * D * 4), *yb = malloc((size_t)N * D * 4);
    const float *la[8], *lb[8];
    for (int l = 0; l < L; l++) {
        cr_assert_eq(lp_clt_encode(t, &ctx, l, x + (size_t)l * N * D, N, fa + (size_t)l * N * S, 0), LP_OK);
        cr_assert_eq(lp_clt_encode(u, &ctx, l, x + (size_t)l * N * D, N, fb + (size_t)l * N * S, 0), LP_OK);
        la[l] = fa + (size_t)l * N * S, lb[l] = fb + (size_t)l * N * S;
    }
    cr_expect(memcmp(fa, fb, (size_t)L * N * S * 4) == 0, "encode differs after reload");
    for (int j = 0; j < L; j++) {
        cr_assert_eq(lp_clt_decode(t, &ctx, j, la, x + (size_t)j * N * D, N, ya), LP_OK);
        cr_assert_eq(lp_clt_decode(u, &ctx, j, lb, x + (size_t)j * N * D, N, yb), LP_OK);
        cr_expect(memcmp(ya, yb, (size_t)N * D * 4) == 0, "decode of layer %d differs after reload", j);
    }
    free(x), free(fa), free(fb), free(ya), free(yb);
    lp_clt_free(u, &ctx);
}

static void train_on_teacher(lp_clt_kind kind, lp_clt_act act, int skip, const char *name, double want_drop) {
    teacher te = make_teacher(kind, 3, 16, 24, 4242);
    lp_clt_train_cfg t;
    lp_clt_train_defaults(&t);
    t.clt = te.t->cfg;
    t.clt.kind = kind, t.clt.act = act, t.clt.skip = skip, t.clt.d_sae = 48;
    char out[512];
    snprintf(out, sizeof out, "%s/%s", tmp, name);
    t.out = out, t.tokens = 128 * 300, t.batch_tokens = 128, t.lr = 3e-3, t.sparsity_coefficient = 1e-3, t.log_every = 50;
    lp_clt_train_report rep;
    lp_clt *trained = NULL;
    cr_assert_eq(lp_clt_train(&t, &ctx, teach, &te, &rep, &trained), LP_OK, "%s", lp_last_error());
    fprintf(stderr, "  %-22s loss %.4f -> %.4f (%.1f%%), explained variance %.3f, L0 %.1f, %lld steps\n", name, rep.first_loss,
            rep.loss, 100 * rep.loss / rep.first_loss, rep.explained_variance, rep.l0, (long long)rep.steps);
    cr_expect_lt(rep.loss, want_drop * rep.first_loss, "%s: the loss went from %g to %g", name, rep.first_loss, rep.loss);
    cr_expect_gt(rep.explained_variance, 0.5, "%s: explained variance %g", name, rep.explained_variance);
    expect_reload(trained, out);
    lp_clt_free(trained, &ctx);
    lp_clt_free(te.t, &ctx);
}

Test(clt_train, cross_layer_loss_falls) { train_on_teacher(LP_CLT_CROSS_LAYER, LP_CLT_RELU, 0, "clt_relu", 0.3); }
Test(clt_train, cross_layer_jumprelu) { train_on_teacher(LP_CLT_CROSS_LAYER, LP_CLT_JUMPRELU, 0, "clt_jumprelu", 0.3); }
Test(clt_train, per_layer_skip) { train_on_teacher(LP_CLT_PER_LAYER, LP_CLT_RELU, 1, "plt_skip", 0.3); }

/* Live from the tiny Llama: mlp.hook_in -> hook_mlp_out of both layers; the loss falls and
 * the set, written with its scales folded in, reconstructs the model's raw MLP outputs from
 * its raw MLP inputs as well as it did in training (the explained variance over fresh tokens
 * computed from raw captures agrees with the trainer's last window, within noise). */
Test(clt_train, live_tiny_llama) {
    lp_model *m = NULL;
    cr_assert_eq(lp_model_load(&m, LP_FIXTURES "/llama-tiny", LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_hooks_add_mlp_in(m), LP_OK);
    lp_tokens toks = {0};
    cr_assert_eq(lp_tokens_load(&toks, LP_FIXTURES "/llama-tiny/tokens.npy", 0, 0, NULL), LP_OK, "%s", lp_last_error());
    lp_clt_train_cfg t;
    lp_clt_train_defaults(&t);
    t.clt.kind = LP_CLT_CROSS_LAYER, t.clt.n_layers = 2, t.clt.d_model = 64, t.clt.d_sae = 128;
    char out[512];
    snprintf(out, sizeof out, "%s/live", tmp);
    t.out = out, t.tokens = 128 * 60, t.batch_tokens = 128, t.lr = 2e-3, t.log_every = 20;
    lp_clt_source *src = NULL;
    cr_assert_eq(lp_clt_source_live(&src, m, &t.clt, toks.ids, toks.n_seq, toks.ctx, 2, 1), LP_OK, "%s", lp_last_error());
    lp_clt_train_report rep;
    lp_clt *trained = NULL;
    cr_assert_eq(lp_clt_train(&t, &ctx, lp_clt_source_next, src, &rep, &trained), LP_OK, "%s", lp_last_error());
    fprintf(stderr, "  live llama-tiny        loss %.4f -> %.4f, explained variance %.3f, L0 %.1f\n", rep.first_loss, rep.loss,
            rep.explained_variance, rep.l0);
    cr_expect_lt(rep.loss, 0.5 * rep.first_loss);
    /* raw activations through the written set */
    int N = 128, L = 2, D = 64, S = 128;
    float *x = malloc((size_t)L * N * D * 4), *y = malloc((size_t)L * N * D * 4), *f = malloc((size_t)L * N * S * 4);
    float *yh = malloc((size_t)N * D * 4);
    cr_assert_eq(lp_clt_source_next(src, N, x, y), LP_OK);
    lp_clt *u = NULL;
    cr_assert_eq(lp_clt_load(&u, &ctx, out), LP_OK, "%s", lp_last_error());
    const float *fl[2];
    for (int l = 0; l < L; l++) {
        cr_assert_eq(lp_clt_encode(u, &ctx, l, x + (size_t)l * N * D, N, f + (size_t)l * N * S, 0), LP_OK);
        fl[l] = f + (size_t)l * N * S;
    }
    double sse = 0, var = 0;
    for (int j = 0; j < L; j++) {
        cr_assert_eq(lp_clt_decode(u, &ctx, j, fl, x + (size_t)j * N * D, N, yh), LP_OK);
        for (int d = 0; d < D; d++) {
            double mean = 0;
            for (int n = 0; n < N; n++) mean += y[((size_t)j * N + n) * D + d] / N;
            for (int n = 0; n < N; n++) {
                double e = yh[(size_t)n * D + d] - y[((size_t)j * N + n) * D + d], v = y[((size_t)j * N + n) * D + d] - mean;
                sse += e * e, var += v * v;
            }
        }
    }
    fprintf(stderr, "  raw activations through the written set: explained variance %.3f\n", 1 - sse / var);
    cr_expect_gt(1 - sse / var, rep.explained_variance - 0.15, "the written set does not reconstruct raw activations");
    free(x), free(y), free(f), free(yh);
    lp_clt_free(u, &ctx);
    lp_clt_free(trained, &ctx);
    lp_clt_source_free(src);
    lp_tokens_free(&toks);
    lp_model_free(m);
}
