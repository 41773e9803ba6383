/* attrib_prefix_test.h: attribution patching with the pairs' common prefix shared
 * (lp_attrib_opts.prefix_share = 1) against the full runs (prefix_share = 0, the default),
 * (test_attrib_prefix.c on the CPU over every node kind of the grid; test_attrib_prefix_cuda.c
 * on the GPU, without attn.hook_pattern, whose suffix ops are CPU only), on the GPT-2 (learned positions), Llama
 * (rotary, grouped k/v heads), Gemma 2 (sliding windows, attention and final soft-caps,
 * grouped k/v) and Gemma 3 (q/k norms, local rotary base) fixtures:
 *   - pairs first differing at a middle position (the pairs of a batch at different ones:
 *     the prefix is the shorter), gradient at the corrupted and at the clean run, logit
 *     difference and log-probability metrics: the shared run covers only the suffix (the
 *     model's last forward has T - p0 positions) and every score equals the full path's;
 *     before p0 the shared scores are exactly 0 and the full path's vanish;
 *   - pairs differing at position 0, and a metric read before p0: the full path runs.
 * Budget per node: 2e-5 of the largest |score| of its hook (kind, layer) plus 1e-6 of the
 * kind's largest: the two paths differ only in float rounding (the suffix attends through
 * another kernel, the prefix's keys come from the other run's forward); measured worst
 * ~2.5e-6 of the hook's plus the kind's scale. A wrong position offset (rotary, learned positions or the window)
 * or a key missed in the backward changes the scores at O(1) of their scale. */
#ifndef LOUPE_ATTRIB_PREFIX_TEST_H
#define LOUPE_ATTRIB_PREFIX_TEST_H

#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "model/model_internal.h"
#include "testutil.h"

enum { PB = 2, PT = 12 };

static lp_model *load_on(const char *dir, lp_device dev) {
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, dir, dev, LP_F32), LP_OK, "%s", lp_last_error());
    return m;
}

/* The largest |v| of n values. */
static double max_abs(const float *v, size_t n) {
    double mx = 0;
    for (size_t i = 0; i < n; i++) mx = fmax(mx, fabs(v[i]));
    return mx;
}

/* Compares the shared run's scores with the full run's; p0 > 0: the nodes before p0 score
 * exactly 0 in the shared run and vanish in the full one. Returns the worst error / scale. */
static double compare(const char *what, const lp_model *m, const lp_pair_result *sh, const lp_pair_result *full, int p0) {
    int nL = lp_model_config(m)->n_layers;
    double worst = 0;
    for (int b = 0; b < PB; b++) {
        cr_expect(fabs(sh[b].metric_clean - full[b].metric_clean) <= 1e-5 * (1 + fabs(full[b].metric_clean)), "%s: metric_clean", what);
        cr_expect(fabs(sh[b].metric_corrupted - full[b].metric_corrupted) <= 1e-5 * (1 + fabs(full[b].metric_corrupted)),
                  "%s: metric_corrupted %.9g vs %.9g", what, sh[b].metric_corrupted, full[b].metric_corrupted);
        for (int k = 0; k < LP_NODE_KINDS; k++) {
            const lp_node_scores *s = &sh[b].s[k], *f = &full[b].s[k];
            if (!f->v && !s->v) continue; /* a kind not asked for */
            cr_assert(s->v && f->v, "%s: no scores of %s", what, lp_node_kind_name(k));
            cr_assert_eq(s->ndim, f->ndim);
            for (int d = 0; d < s->ndim; d++) cr_assert_eq(s->shape[d], f->shape[d]);
            size_t per_layer = (size_t)s->shape[1] * (s->ndim == 3 ? s->shape[2] : 1);
            size_t per_pos = k == LP_NODE_PATTERN ? 0 : per_layer / PT;
            double kind_scale = max_abs(f->v, per_layer * nL);
            for (int L = 0; L < nL; L++) {
                const float *sv = s->v + L * per_layer, *fv = f->v + L * per_layer;
                double scale = max_abs(fv, per_layer), tol = 2e-5 * scale + 1e-6 * kind_scale + 1e-30;
                for (size_t j = 0; j < per_layer; j++) {
                    double err = fabs((double)sv[j] - fv[j]);
                    worst = fmax(worst, err / (scale + kind_scale + 1e-30));
                    cr_expect(err <= tol, "%s: pair %d %s layer %d node %zu: shared %.9g, full %.9g", what, b, lp_node_kind_name(k), L, j,
                              sv[j], fv[j]);
                    if (p0 > 0 && per_pos && j < (size_t)p0 * per_pos) {
                        cr_expect(sv[j] == 0.0f, "%s: pair %d %s layer %d node %zu before p0 = %d scores %g", what, b, lp_node_kind_name(k), L,
                                  j, p0, sv[j]);
                        cr_expect(fabs(fv[j]) <= 1e-6 * kind_scale + 1e-30, "%s: the full path's %s node %zu before p0: %g", what,
                                  lp_node_kind_name(k), j, fv[j]);
                    }
                }
            }
        }
    }
    return worst;
}

/* Pairs whose row b first differs at diff[b]; the metric reads position pos (-1: the last). */
static void check_case(lp_model *m, const char *name, const int diff[PB], int pos, lp_metric_kind kind, int at_clean, int expect_p0,
                       unsigned kinds) {
    const lp_config *c = lp_model_config(m);
    int32_t clean[PB * PT], corr[PB * PT], ans[PB], wr[PB], mpos[PB];
    uint64_t seed = 99;
    for (int i = 0; i < PB * PT; i++) clean[i] = (int32_t)(lp_test_next(&seed) % (uint64_t)c->d_vocab);
    memcpy(corr, clean, sizeof corr);
    for (int b = 0; b < PB; b++) {
        corr[b * PT + diff[b]] = (clean[b * PT + diff[b]] + 5) % c->d_vocab;
        corr[b * PT + PT - 2] = (clean[b * PT + PT - 2] + 3) % c->d_vocab; /* a second difference in the suffix */
        ans[b] = (b * 17 + 3) % c->d_vocab, wr[b] = (b * 31 + 8) % c->d_vocab, mpos[b] = pos < 0 ? PT - 1 : pos;
    }
    lp_metric mt = {.kind = kind, .answer = ans, .wrong = wr, .pos = mpos};
    lp_attrib_opts full_o = {.kinds = kinds, .grad_at_clean = at_clean};
    lp_attrib_opts sh_o = {.kinds = kinds, .grad_at_clean = at_clean, .prefix_share = 1};
    lp_pair_result full[PB], sh[PB];
    cr_assert_eq(lp_attrib_atp(m, clean, corr, PB, PT, &mt, &full_o, full), LP_OK, "%s", lp_last_error());
    cr_assert_eq(m->res.T, PT, "%s: the full path's last forward covers %d positions", name, m->res.T);
    cr_assert_eq(lp_attrib_atp(m, clean, corr, PB, PT, &mt, &sh_o, sh), LP_OK, "%s", lp_last_error());
    /* the scored run of the shared path covers positions p0 .. alone */
    cr_assert_eq(m->res.T, PT - expect_p0, "%s: the scored run covered %d positions, expected %d", name, m->res.T, PT - expect_p0);
    char what[160];
    snprintf(what, sizeof what, "%s diff %d,%d pos %d %s%s", name, diff[0], diff[1], pos, kind == LP_METRIC_LOGPROB ? "logprob" : "logit_diff",
             at_clean ? " at clean" : "");
    double worst = compare(what, m, sh, full, expect_p0);
    fprintf(stderr, "  %-52s p0 %d: worst |shared - full| / scale %.2e\n", what, expect_p0, worst);
    for (int b = 0; b < PB; b++) lp_pair_result_free(&sh[b]), lp_pair_result_free(&full[b]);
}

/* The cases of one model: middle differences under both gradient sides and both metrics, and
 * the two that must run whole (a difference at 0, a metric read before p0). */
static void prefix_check_model(const char *dir, const char *name, lp_device dev, unsigned kinds) {
    lp_model *m = load_on(dir, dev);
    const int mid[PB] = {5, 7}, zero[PB] = {3, 0}, late[PB] = {8, 8};
    check_case(m, name, mid, -1, LP_METRIC_LOGIT_DIFF, 0, 5, kinds);
    check_case(m, name, mid, -1, LP_METRIC_LOGIT_DIFF, 1, 5, kinds);
    check_case(m, name, late, 9, LP_METRIC_LOGPROB, 0, 8, kinds);
    check_case(m, name, zero, -1, LP_METRIC_LOGIT_DIFF, 0, 0, kinds); /* differs at 0: nothing to share */
    check_case(m, name, mid, 3, LP_METRIC_LOGIT_DIFF, 0, 0, kinds);   /* the metric reads before p0 */
    lp_model_free(m);
}

#endif
