/* sae_ops_test.h: what the SAE op tests on the CPU (test_sae_ops.c, test_sae_ops_train.c)
 * share: the nmse budgets, the suite's CPU context, the comparison against a float64
 * reference, random inputs (distinct latents, values full of ties) and the finite
 * difference checks. See test_sae_ops.c for how the budgets and differences are chosen. */
#ifndef LOUPE_TEST_SAE_OPS_H
#define LOUPE_TEST_SAE_OPS_H

#include "loupe/ops.h"
#include "loupe/sae_ops.h"
#include "ops/ops_internal.h"
#include "testutil.h"

/* nmse budgets against float64 (0: must be exact). fp32 ops that round once: ~1e-14;
 * sums accumulated in double and rounded once: ~1e-15; fp32 accumulation of K terms
 * (decode, the scattered gradients): ~K * 1e-14; OpenBLAS GEMM over N = 1000: ~1e-12. */
static const struct { const char *op; double nmse; } BUDGET[] = {
    {"matmul_at", 1e-10},   {"col_sum", 1e-13},        {"topk idx", 0},          {"topk val", 0},
    {"kth_largest", 0},     {"decode_sparse", 1e-12},  {"decode dval", 1e-13},   {"decode dW", 1e-12},
    {"encode dW_enc", 1e-12}, {"encode db_enc", 1e-12}, {"encode dx", 1e-12}, {"scale", 1e-13}, {"relu", 0},             {"jumprelu", 0},
    {"relu_grad", 0},       {"l1_relu_grad dpre", 1e-13}, {"l1_relu_grad db", 1e-13}, {"l1_relu_grad fsum", 1e-13},
    {"jumprelu dpre", 0},      {"jumprelu dtheta", 1e-12}, {"adam", 1e-12},
    {"rows_unit_norm", 1e-13}, {"rows_remove_parallel", 1e-12}, {"rows_norm", 1e-13},
    /* recon_sums: max relative error of each of the four sums; both sides sum up to ~1e5
     * terms in double, whose worst-case relative error is n * 2^-53 ~ 1e-11 */
    {"recon_sums", 1e-10},
    {"fire_counts", 0},     {"finite differences", 1e-6},
};
static inline double budget(const char *op) {
    for (size_t i = 0; i < sizeof BUDGET / sizeof *BUDGET; i++)
        if (strcmp(BUDGET[i].op, op) == 0) return BUDGET[i].nmse;
    cr_assert_fail("no budget for %s", op);
    return 0;
}

#define FD_H 1e-3
#define FD_SAMPLES 40

static lp_ctx cpu;
static inline void setup(void) { cr_assert_eq(lp_ctx_init(&cpu, LP_CPU, LP_F32), LP_OK); }
TestSuite(sae_ops, .init = setup);

#define OK(expr)                                                                            \
    do {                                                                                    \
        lp_status s_ = (expr);                                                              \
        cr_assert_eq(s_, LP_OK, "%s: %s: %s", #expr, lp_status_name(s_), lp_last_error());  \
    } while (0)

static inline void check(const char *op, const char *label, uint64_t seed, const float *got, const double *ref, size_t n) {
    char what[128];
    snprintf(what, sizeof what, "%s %s", op, label);
    lp_cmp c = lp_compare(got, ref, n);
    const double bud = budget(op);
    if (bud == 0) LP_EXPECT_WITHIN(what, seed, c, max_abs, 0.0); /* selections, masks: bit for bit */
    else LP_EXPECT_WITHIN(what, seed, c, nmse, bud);
}

static inline void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    cr_assert(p != NULL);
    return p;
}
static inline double *dalloc(size_t n) { return xmalloc(n * sizeof(double)); }

/* Values on a grid of `step` in [lo, hi]: ties everywhere; every 7th zero becomes -0. */
static inline float *rand_ties(size_t n, uint64_t seed, float lo, float hi, float step) {
    float *x = lp_test_rand(n, seed, lo, hi);
    for (size_t i = 0; i < n; i++) {
        x[i] = roundf(x[i] / step) * step;
        if (x[i] == 0.0f && i % 7 == 0) x[i] = -0.0f;
    }
    return x;
}

/* ---- finite differences ---- */

typedef double (*loss_fn)(void *st);

static inline double fd_at(float *p, loss_fn L, void *st) {
    const float v = *p, up = (float)((double)v + FD_H), dn = (float)((double)v - FD_H);
    *p = up;
    const double lu = L(st);
    *p = dn;
    const double ld = L(st);
    *p = v;
    return (lu - ld) / ((double)up - (double)dn);
}

static inline double weighted_sum(const float *w, const float *out, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)w[i] * out[i];
    return s;
}

/* Compares analytic gradients got[i] with finite differences fd[i] at the sampled points. */
static inline void check_fd(const char *label, uint64_t seed, const float *got, const double *fd, size_t n) {
    char what[128];
    snprintf(what, sizeof what, "fd %s", label);
    LP_EXPECT_WITHIN(what, seed, lp_compare(got, fd, n), nmse, budget("finite differences"));
}

#endif
