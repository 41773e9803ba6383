/* attrib_fused_test.h: attribution patching's node sums, formed in the backward at each hook
 * site (lp_attrib_atp), against the unfused reduction done here in float64: the grid's
 * activations of both runs captured, the gradient kept at every grid hook (lp_grad_get), and
 * per node the sum of (clean - corrupted) * gradient in double. Every node kind, on GPT-2 and
 * Llama (grouped k/v heads) shapes, with the gradient at the corrupted run, at the clean run,
 * and for a direction metric entering mid-model (nodes the backward never reaches score 0).
 * Budget per node: 1e-6 of the sum of the absolute values of its terms (float rounding of
 * the conditioned sum), plus 1e-30; measured ~5e-8 on the CPU (the float rounding of the score). */
#ifndef LOUPE_ATTRIB_FUSED_TEST_H
#define LOUPE_ATTRIB_FUSED_TEST_H

#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "loupe/model.h"
#include "testutil.h"

enum { FB = 2, FT = 7 };

static const lp_config FUSED_GPT2 = {.arch = LP_ARCH_GPT2, .n_layers = 2, .d_model = 32, .n_heads = 4, .d_mlp = 64,
                                     .n_ctx = 16, .d_vocab = 50};
static const lp_config FUSED_LLAMA = {.arch = LP_ARCH_LLAMA, .n_layers = 2, .d_model = 32, .n_heads = 4, .n_kv_heads = 2,
                                      .d_head = 8, .d_mlp = 48, .n_ctx = 16, .d_vocab = 50};

/* Hook (k, L)'s activation of the last forward, as F32 (n values). */
static float *fused_read_capture(lp_model *m, const char *name, size_t *n) {
    lp_tensor t;
    cr_assert_eq(lp_capture_get(m, name, &t), LP_OK, "%s", lp_last_error());
    *n = (size_t)lp_shape_numel(t.shape, t.ndim);
    float *v = malloc(*n * sizeof(float));
    cr_assert(v);
    cr_assert_eq(lp_capture_read_f32(m, name, v, *n), LP_OK, "%s", lp_last_error());
    return v;
}

/* Per (kind, layer): the reference's activation, the other run's, and the gradient at the
 * run it is taken at (NULL where the backward did not reach the hook: zero). */
typedef struct fused_ref { float *a[LP_NODE_KINDS][4], *x[LP_NODE_KINDS][4], *g[LP_NODE_KINDS][4]; size_t n[LP_NODE_KINDS][4]; } fused_ref;

static void fused_name(char *buf, size_t len, int k, int L) { snprintf(buf, len, "blocks.%d.%s", L, lp_node_kind_name(k)); }

/* The unfused path: captures of both runs and the kept gradients, first run = `first`. */
static void fused_reference(lp_model *m, const int32_t *first, const int32_t *second, const lp_metric *mt, fused_ref *r) {
    int nL = lp_model_config(m)->n_layers;
    char name[128], list[1024] = "";
    lp_hooks_clear(m);
    for (int k = 0; k < LP_NODE_KINDS; k++) {
        char pat[96];
        snprintf(pat, sizeof pat, "blocks.*.%s", lp_node_kind_name(k));
        cr_assert_eq(lp_hook_capture(m, pat, NULL, 0, NULL), LP_OK, "%s", lp_last_error());
        strcat(list, k ? "," : ""), strcat(list, pat);
    }
    double met[FB];
    cr_assert_eq(lp_model_metric(m, first, FB, FT, mt, met), LP_OK, "%s", lp_last_error());
    for (int k = 0; k < LP_NODE_KINDS; k++)
        for (int L = 0; L < nL; L++) fused_name(name, sizeof name, k, L), r->a[k][L] = fused_read_capture(m, name, &r->n[k][L]);
    cr_assert_eq(lp_model_grad(m, second, FB, FT, mt, list, met), LP_OK, "%s", lp_last_error());
    for (int k = 0; k < LP_NODE_KINDS; k++)
        for (int L = 0; L < nL; L++) {
            size_t n;
            fused_name(name, sizeof name, k, L);
            r->x[k][L] = fused_read_capture(m, name, &n);
            lp_tensor g;
            r->g[k][L] = NULL;
            if (lp_grad_get(m, name, &g) != LP_OK) continue; /* not reached: the metric does not depend on it */
            cr_assert_eq((size_t)lp_shape_numel(g.shape, g.ndim), n);
            r->g[k][L] = malloc(n * sizeof(float));
            memcpy(r->g[k][L], g.data, n * sizeof(float));
        }
    lp_hooks_clear(m);
}

static void fused_ref_free(fused_ref *r) {
    for (int k = 0; k < LP_NODE_KINDS; k++)
        for (int L = 0; L < 4; L++) free(r->a[k][L]), free(r->x[k][L]), free(r->g[k][L]);
}

/* Compares lp_attrib_atp's scores with the float64 reduction; sign -1: the reference run
 * was the corrupted one (clean - corrupted = -(ref - other)). Returns the nodes checked. */
static size_t fused_compare(const char *what, lp_model *m, const lp_pair_result *res, const fused_ref *r, double sign, double *worst) {
    int nL = lp_model_config(m)->n_layers;
    size_t checked = 0;
    for (int k = 0; k < LP_NODE_KINDS; k++) {
        const lp_node_scores *s = &res[0].s[k];
        cr_assert(s->v, "%s: no scores of %s", what, lp_node_kind_name(k));
        size_t groups = (size_t)s->shape[1] * (s->ndim == 3 ? s->shape[2] : 1), per = r->n[k][0] / FB / groups;
        for (int L = 0; L < nL; L++)
            for (int b = 0; b < FB; b++)
                for (size_t j = 0; j < groups; j++) {
                    double acc = 0, mag = 0;
                    size_t o = ((size_t)b * groups + j) * per;
                    for (size_t i = 0; r->g[k][L] && i < per; i++) {
                        double t = sign * ((double)r->a[k][L][o + i] - r->x[k][L][o + i]) * r->g[k][L][o + i];
                        acc += t, mag += fabs(t);
                    }
                    double got = res[b].s[k].v[L * groups + j], err = fabs(got - acc);
                    *worst = fmax(*worst, mag > 0 ? err / mag : err);
                    cr_expect(err <= 1e-6 * mag + 1e-30, "%s %s layer %d pair %d node %zu: fused %.9g, float64 reduction %.9g (terms' |sum| %.3g)",
                              what, lp_node_kind_name(k), L, b, j, got, acc, mag);
                    checked++;
                }
    }
    return checked;
}

static void fused_inputs(int32_t *tok, int32_t *corr, int32_t *ans, int32_t *wr, int V) {
    uint64_t s = 11;
    for (int i = 0; i < FB * FT; i++) tok[i] = (int32_t)(lp_test_uniform(&s, 0, 1) * V) % V;
    for (int i = 0; i < FB * FT; i++) corr[i] = i % FT == 2 ? (tok[i] + 7) % V : tok[i];
    for (int b = 0; b < FB; b++) ans[b] = (b * 13 + 1) % V, wr[b] = (b * 29 + 5) % V;
}

/* One model, three cases: gradient at the corrupted run, at the clean run, and a direction
 * metric at blocks.0.hook_resid_mid (the nodes above it score 0). */
static void fused_check(const lp_config *cfg, lp_device dev, const char *name) {
    lp_model *m;
    cr_assert_eq(lp_model_random(&m, cfg, 5, dev, LP_F32), LP_OK, "%s", lp_last_error());
    cr_assert_leq(cfg->n_layers, 4);
    int32_t tok[FB * FT], corr[FB * FT], ans[FB], wr[FB];
    fused_inputs(tok, corr, ans, wr, cfg->d_vocab);
    float dir[64];
    for (int i = 0; i < cfg->d_model; i++) dir[i] = (float)((i * 7 % 11) - 5) / 5.0f;
    lp_metric logit = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wr};
    lp_metric direction = {.kind = LP_METRIC_DIRECTION, .hook = "blocks.0.hook_resid_mid", .direction = dir};
    struct { const char *what; const lp_metric *mt; int at_clean; } cases[] = {
        {"at corrupted", &logit, 0}, {"at clean", &logit, 1}, {"direction", &direction, 0}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        lp_attrib_opts o = {.grad_at_clean = cases[c].at_clean};
        lp_pair_result res[FB];
        cr_assert_eq(lp_attrib_atp(m, tok, corr, FB, FT, cases[c].mt, &o, res), LP_OK, "%s", lp_last_error());
        fused_ref r = {0};
        if (cases[c].at_clean) fused_reference(m, corr, tok, cases[c].mt, &r);
        else fused_reference(m, tok, corr, cases[c].mt, &r);
        char what[96];
        snprintf(what, sizeof what, "%s %s", name, cases[c].what);
        double worst = 0;
        size_t n = fused_compare(what, m, res, &r, cases[c].at_clean ? -1.0 : 1.0, &worst);
        fprintf(stderr, "  %-22s %zu nodes of %d kinds: worst |fused - float64| / sum |terms| %.2e of 1e-6\n", what, n,
                LP_NODE_KINDS, worst);
        fused_ref_free(&r);
        for (int b = 0; b < FB; b++) lp_pair_result_free(&res[b]);
    }
    lp_model_free(m);
}

#endif
