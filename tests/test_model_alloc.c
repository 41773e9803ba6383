/* test_model_alloc.c: a backward allocates nothing once its buffers are sized. The model
 * keeps the backward's scratch, the tape, the weight-gradient buffer and a direction's
 * device copy (host/model/grad.h); a second lp_model_grad of the same size (and a smaller
 * one) makes no device allocation (the context counts them: lp_ctx.n_allocs), keeps every
 * buffer where it was, and gives the same gradients. */
#include <string.h>

#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "model/grad.h"
#include "testutil.h"

static lp_model *load(const char *dir) {
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, dir, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    return m;
}

static void run_twice(const char *dir, const lp_metric *mt, const char *wanted, const char *check) {
    lp_model *m = load(dir);
    enum { B = 2, T = 9 };
    int32_t tok[B * T];
    uint64_t seed = 11;
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)(lp_test_next(&seed) % (uint64_t)lp_model_config(m)->d_vocab);
    double met[B];
    cr_assert_eq(lp_model_grad(m, tok, B, T, mt, wanted, met), LP_OK, "%s", lp_last_error());
    lp_tensor g;
    cr_assert_eq(lp_grad_get(m, check, &g), LP_OK, "%s", lp_last_error());
    size_t n = (size_t)lp_shape_numel(g.shape, g.ndim);
    float *first = malloc(n * sizeof(float));
    cr_assert(first);
    memcpy(first, g.data, n * sizeof(float));
    const struct grad_state *gs = m->grad;
    void *scratch = gs->scratch, *tape = m->tp.mem, *dw = gs->dw, *inject = gs->inject_dev, *acts = m->a.mem;
    unsigned long allocs = lp_model_ctx(m)->n_allocs;
    cr_assert_eq(lp_model_grad(m, tok, B, T, mt, wanted, met), LP_OK, "%s", lp_last_error());
    cr_expect_eq(lp_model_ctx(m)->n_allocs, allocs, "%s: the second backward made %lu device allocations", dir,
                 lp_model_ctx(m)->n_allocs - allocs);
    cr_expect(gs->scratch == scratch && m->tp.mem == tape && gs->dw == dw && gs->inject_dev == inject && m->a.mem == acts,
              "%s: the second backward allocated again", dir);
    cr_assert_eq(lp_grad_get(m, check, &g), LP_OK, "%s", lp_last_error());
    cr_expect(memcmp(first, g.data, n * sizeof(float)) == 0, "%s: the second backward's gradient differs", dir);
    /* a smaller batch fits what is there */
    cr_assert_eq(lp_model_grad(m, tok, 1, T - 2, mt, wanted, met), LP_OK, "%s", lp_last_error());
    cr_expect_eq(lp_model_ctx(m)->n_allocs, allocs, "%s: a smaller backward allocated", dir);
    cr_expect(gs->scratch == scratch && m->tp.mem == tape && m->a.mem == acts, "%s: a smaller backward allocated again", dir);
    free(first);
    lp_model_free(m);
}

Test(model_alloc, logit_metric_with_weight_gradients) {
    int32_t ans[2] = {3, 5}, wr[2] = {7, 1};
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wr};
    run_twice(LP_FIXTURES "/gpt2-tiny", &mt, "blocks.*.hook_resid_pre,blocks.0.mlp.W_in", "blocks.0.mlp.W_in");
    run_twice(LP_FIXTURES "/gemma3-tiny", &mt, "blocks.*.hook_resid_pre,blocks.1.attn.W_Q", "blocks.1.attn.W_Q");
}

Test(model_alloc, mean_loss_and_direction) {
    lp_metric loss = {.kind = LP_METRIC_MEAN_LOSS};
    run_twice(LP_FIXTURES "/llama-tiny", &loss, "*", "blocks.0.hook_resid_pre");
    float dir[64];
    for (int i = 0; i < 64; i++) dir[i] = (float)((i * 7) % 5) - 2.0f;
    lp_model *m = load(LP_FIXTURES "/gemma2-tiny");
    int D = lp_model_config(m)->d_model;
    lp_model_free(m);
    cr_assert_leq(D, 64);
    lp_metric d = {.kind = LP_METRIC_DIRECTION, .hook = "blocks.1.hook_resid_post", .direction = dir};
    run_twice(LP_FIXTURES "/gemma2-tiny", &d, "blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre");
}
