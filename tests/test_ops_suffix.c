/* test_ops_suffix.c: the attention of a query suffix over all keys (ops.h, "a query suffix
 * over all keys"), on the CPU, against the square ops of the whole sequence, which
 * test_backward.c and test_backward_gemma.c check against float64 references and finite
 * differences. A query row depends only on keys at or before it, so:
 *   forward: the suffix's z, scores and pattern are the square ops' rows pos0 .. ;
 *   backward: with the upstream gradient zero at the prefix's queries, the square backward's
 *   dq at the suffix's queries and dk, dv at the suffix's keys are the suffix ops' (the
 *   prefix's queries see no suffix key, so nothing else reaches them).
 * Plain, windowed (window shorter than pos0) + soft-capped + custom-scale options; GQA
 * (H = 4 on Hkv = 2), pos0 = 0 (the square op itself), pos0 in the middle and Tq = 1.
 * Budget: relative max error 2e-5 (float rounding of sums taken in another order; the
 * forward's blocks and the backward's double sums differ between the two forms). */
#include <math.h>

#include "loupe/ops.h"
#include "testutil.h"

enum { SB = 2, SH = 4, SHKV = 2, SDH = 6 };

static lp_ctx cpu;
static void setup(void) { cr_assert_eq(lp_ctx_init(&cpu, LP_CPU, LP_F32), LP_OK); }
TestSuite(ops_suffix, .init = setup);

#define OK(expr)                                                                            \
    do {                                                                                    \
        lp_status s_ = (expr);                                                              \
        cr_assert_eq(s_, LP_OK, "%s: %s: %s", #expr, lp_status_name(s_), lp_last_error());  \
    } while (0)

static float *zeros(size_t n) {
    float *p = calloc(n ? n : 1, sizeof(float));
    cr_assert(p);
    return p;
}

/* Rows r0 .. r0+n-1 of each of `outer` blocks of R rows of `w` floats, packed. */
static float *rows_of(const float *x, size_t outer, int R, int r0, int n, size_t w) {
    float *o = zeros(outer * n * w);
    for (size_t b = 0; b < outer; b++) memcpy(o + b * n * w, x + (b * R + r0) * w, n * w * sizeof(float));
    return o;
}

/* got vs want (n values): max |got - want| <= 2e-5 max |want|; equal infinities allowed. */
static void same(const char *what, const float *got, const float *want, size_t n) {
    double mx = 0, err = 0;
    for (size_t i = 0; i < n; i++)
        if (isfinite(want[i])) mx = fmax(mx, fabs(want[i]));
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(want[i])) {
            cr_expect(got[i] == want[i], "%s: value %zu is %g, the square op's %g", what, i, got[i], want[i]);
            continue;
        }
        err = fmax(err, fabs((double)got[i] - want[i]));
    }
    cr_expect(err <= 2e-5 * mx + 1e-30, "%s: max error %.3g of max %.3g", what, err, mx);
}

static void check(int T, int pos0, const lp_attn_cfg *g, uint64_t seed) {
    const int Tq = T - pos0, B = SB, H = SH, Hkv = SHKV, dh = SDH;
    const size_t qw = (size_t)H * dh, kw = (size_t)Hkv * dh, nq = (size_t)B * T * qw, nk = (size_t)B * T * kw;
    const size_t nsq = (size_t)B * H * T * T, ns = (size_t)B * H * Tq * T, nqs = (size_t)B * Tq * qw, nks = (size_t)B * Tq * kw;
    char what[160];
    snprintf(what, sizeof what, "T %d pos0 %d window %d cap %g", T, pos0, g->window, g->softcap);
    float *q = lp_test_rand(nq, seed, -2, 2), *k = lp_test_rand(nk, seed + 1, -2, 2), *v = lp_test_rand(nk, seed + 2, -1, 1);
    float *dz = lp_test_rand(nq, seed + 3, -1, 1), *dsq = lp_test_rand(nsq, seed + 4, -1, 1);
    for (int b = 0; b < B; b++) memset(dz + (size_t)b * T * qw, 0, (size_t)pos0 * qw * sizeof(float));
    for (int b = 0; b < B * H; b++) memset(dsq + (size_t)b * T * T, 0, (size_t)pos0 * T * sizeof(float));
    float *qs = rows_of(q, B, T, pos0, Tq, qw), *dzs = rows_of(dz, B, T, pos0, Tq, qw);
    float *dss = rows_of(dsq, (size_t)B * H, T, pos0, Tq, T);
    /* the square ops over the whole sequence */
    float *z = zeros(nq), *sc = zeros(nsq), *pat = zeros(nsq), *z3 = zeros(nq), *dq = zeros(nq), *dk = zeros(nk), *dv = zeros(nk);
    float *dpat = zeros(nsq), *dv3 = zeros(nk), *dq3 = zeros(nq), *dk3 = zeros(nk);
    OK(lp_attention_cfg(&cpu, z, q, k, v, B, T, H, Hkv, dh, g));
    OK(lp_attn_scores_cfg(&cpu, sc, q, k, B, T, H, Hkv, dh, g));
    OK(lp_softmax_rows(&cpu, pat, sc, (size_t)B * H * T, T));
    OK(lp_attn_apply(&cpu, z3, pat, v, B, T, H, Hkv, dh));
    OK(lp_attention_backward_cfg(&cpu, dq, dk, dv, dz, q, k, v, B, T, H, Hkv, dh, g));
    for (int b = 0; b < B * H; b++) memset(pat + (size_t)b * T * T, 0, (size_t)pos0 * T * sizeof(float)); /* prefix queries: no dv */
    OK(lp_attn_apply_backward(&cpu, dpat, dv3, dz, pat, v, B, T, H, Hkv, dh));
    OK(lp_attn_scores_backward_cfg(&cpu, dq3, dk3, dsq, sc, q, k, B, T, H, Hkv, dh, g));
    /* the suffix ops */
    float *zs = zeros(nqs), *scs = zeros(ns), *pats = zeros(ns), *z3s = zeros(nqs), *dqs = zeros(nqs), *dks = zeros(nks), *dvs = zeros(nks);
    float *dpats = zeros(ns), *dv3s = zeros(nks), *dq3s = zeros(nqs), *dk3s = zeros(nks);
    OK(lp_attention_suffix(&cpu, zs, qs, k, v, B, Tq, pos0, H, Hkv, dh, g));
    OK(lp_attn_scores_suffix(&cpu, scs, qs, k, B, Tq, pos0, H, Hkv, dh, g));
    OK(lp_softmax_rows(&cpu, pats, scs, (size_t)B * H * Tq, T));
    OK(lp_attn_apply_suffix(&cpu, z3s, pats, v, B, Tq, pos0, H, Hkv, dh));
    OK(lp_attention_backward_suffix(&cpu, dqs, dks, dvs, dzs, qs, k, v, B, Tq, pos0, H, Hkv, dh, g));
    OK(lp_attn_apply_backward_suffix(&cpu, dpats, dv3s, dzs, pats, v, B, Tq, pos0, H, Hkv, dh));
    OK(lp_attn_scores_backward_suffix(&cpu, dq3s, dk3s, dss, scs, qs, k, B, Tq, pos0, H, Hkv, dh, g));
    struct { const char *name; const float *got, *full; size_t outer; size_t w; } c[] = {
        {"attention z", zs, z, B, qw}, {"scores", scs, sc, (size_t)B * H, T}, {"apply z", z3s, z3, B, qw},
        {"attention dq", dqs, dq, B, qw}, {"attention dk", dks, dk, B, kw}, {"attention dv", dvs, dv, B, kw},
        {"apply dpattern", dpats, dpat, (size_t)B * H, T}, {"apply dv", dv3s, dv3, B, kw},
        {"scores dq", dq3s, dq3, B, qw}, {"scores dk", dk3s, dk3, B, kw},
    };
    for (size_t i = 0; i < sizeof c / sizeof *c; i++) {
        float *want = rows_of(c[i].full, c[i].outer, T, pos0, Tq, c[i].w);
        char w2[200];
        snprintf(w2, sizeof w2, "%s: %s", what, c[i].name);
        same(w2, c[i].got, want, c[i].outer * Tq * c[i].w);
        free(want);
    }
    float *all[] = {q, k, v, dz, dsq, qs, dzs, dss, z, sc, pat, z3, dq, dk, dv, dpat, dv3, dq3, dk3,
                    zs, scs, pats, z3s, dqs, dks, dvs, dpats, dv3s, dq3s, dk3s};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]);
}

Test(ops_suffix, equals_the_square_ops_at_the_suffix) {
    const lp_attn_cfg plain = {0}, opts = {.scale = 0.3f, .softcap = 2.0f, .window = 3};
    const struct { int T, pos0; } cases[] = {{7, 0}, {9, 4}, {9, 8}, {70, 5}, {11, 1}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        check(cases[i].T, cases[i].pos0, &plain, 700 + i);
        check(cases[i].T, cases[i].pos0, &opts, 800 + i);
    }
}

Test(ops_suffix, refuses_bad_arguments) {
    float x[8] = {0};
    cr_expect_neq(lp_attention_suffix(&cpu, x, x, x, x, 1, 1, -1, 1, 1, 2, NULL), LP_OK);
    cr_expect_neq(lp_attention_backward_suffix(&cpu, x, x, x + 2, x + 4, x + 6, x, x, 1, 1, 0, 1, 1, 2, NULL), LP_OK);
    cr_expect_neq(lp_attn_scores_suffix(&cpu, x, x, x, 1, 1, 0, 3, 2, 2, NULL), LP_OK); /* H % Hkv != 0 */
}
