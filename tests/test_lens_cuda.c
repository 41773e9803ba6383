/* test_lens_cuda.c: the logit lens and direct logit attribution of a CUDA model against the
 * same on the CPU, on the gpt2-tiny and llama-tiny fixtures (F32 on both sides). The lens
 * reads its captures from the device and computes the rest on the host in double, so the
 * budget is that of the F32 forward's hooks in test_gpt2_cuda.c: nmse 1e-9 for every
 * array (the residual stack, the components and heads, the lens logits of both modes,
 * the metrics and probabilities), and 1e-5 relative to the metric for the run's metric.
 * Without a GPU every test skips, saying why (LOUPE_REQUIRE_GPU=1 turns the skip into a
 * failure); the emulated build runs it on the CPU emulator. */
#include "loupe/lens.h"
#include "loupe/model.h"
#include "testutil.h"

enum { T = 9 };
#define NMSE 1e-9

static lp_model *load(const char *dir, lp_device dev) {
    lp_model *m = NULL;
    cr_assert_eq(lp_model_load(&m, dir, dev, LP_F32), LP_OK, "%s: %s", dir, lp_last_error());
    return m;
}

static void run(lp_model *m, const int32_t *tok, const lp_lens_opts *o, lp_lens *r) {
    lp_lens_ctx *lx;
    cr_assert_eq(lp_lens_open(&lx, m), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_lens_run(lx, tok, T, o, r), LP_OK, "%s", lp_last_error());
    lp_lens_close(lx);
}

static void same(const char *name, const char *what, const float *g, const float *c, size_t n, double *worst) {
    char label[128];
    snprintf(label, sizeof label, "%s %s", name, what);
    cr_assert(g && c, "%s: missing", label);
    lp_cmp d = lp_compare_f(g, c, n);
    cr_expect(d.n_bad == 0 && d.nmse <= NMSE, "%s: nmse %.3e of %.1e (%zu non-finite)", label, d.nmse, NMSE, d.n_bad);
    *worst = fmax(*worst, d.nmse);
}

static void lens(const char *name, const char *dir) {
    LP_TEST_REQUIRE_GPU();
    lp_model *mc = load(dir, LP_CPU), *mg = load(dir, LP_CUDA);
    const int V = lp_model_config(mc)->d_vocab;
    int32_t tok[T];
    uint64_t s = 23;
    for (int i = 0; i < T; i++) tok[i] = (int32_t)(lp_test_next(&s) % (uint64_t)V);
    lp_lens_opts o = {.pos = 5, .answer = 3, .wrong = 17, .top_k = 5, .keep_logits = 1};
    lp_lens rc, rg;
    run(mc, tok, &o, &rc);
    run(mg, tok, &o, &rg);
    cr_assert_eq(rg.n_stack, rc.n_stack);
    cr_assert_eq(rg.n_comp, rc.n_comp);
    cr_expect(fabs(rg.metric - rc.metric) <= 1e-5 * fmax(1.0, fabs(rc.metric)), "%s: metric %.8g on the GPU, %.8g on the CPU", name,
              rg.metric, rc.metric);
    cr_expect(fabs(rg.unembed_bias - rc.unembed_bias) <= 1e-6 * fmax(1.0, fabs(rc.unembed_bias)), "%s: unembed bias", name);
    const size_t S = rc.n_stack, C = rc.n_comp, H = (size_t)rc.n_layers * rc.n_heads, D = rc.d_model;
    double worst = 0;
    same(name, "resid", rg.resid, rc.resid, S * D, &worst);
    same(name, "comp_ln", rg.comp_ln, rc.comp_ln, C * D, &worst);
    same(name, "head_ln", rg.head_ln, rc.head_ln, H * D, &worst);
    static const char *mode[] = {"cached", "recomputed"};
    for (int k = 0; k < LP_LENS_MODES; k++) {
        char w[64];
        snprintf(w, sizeof w, "%s lens metric", mode[k]), same(name, w, rg.lens_metric[k], rc.lens_metric[k], S, &worst);
        snprintf(w, sizeof w, "%s lens prob", mode[k]), same(name, w, rg.lens_prob[k], rc.lens_prob[k], S, &worst);
        snprintf(w, sizeof w, "%s lens logits", mode[k]), same(name, w, rg.lens_logits[k], rc.lens_logits[k], S * V, &worst);
        snprintf(w, sizeof w, "%s DLA components", mode[k]), same(name, w, rg.comp[k], rc.comp[k], C, &worst);
        snprintf(w, sizeof w, "%s DLA heads", mode[k]), same(name, w, rg.head[k], rc.head[k], H, &worst);
        snprintf(w, sizeof w, "%s DLA b_O", mode[k]), same(name, w, rg.bias[k], rc.bias[k], rc.n_layers, &worst);
    }
    fprintf(stderr, "  %-12s lens and DLA on the GPU: worst nmse %.3e of %.1e\n", name, worst, NMSE);
    lp_lens_free(&rc), lp_lens_free(&rg);
    lp_model_free(mc), lp_model_free(mg);
}

Test(lens_cuda, gpt2_tiny) { lens("gpt2-tiny", LP_FIXTURES "/gpt2-tiny"); }
Test(lens_cuda, llama_tiny) { lens("llama-tiny", LP_FIXTURES "/llama-tiny"); }
