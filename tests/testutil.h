/* testutil.h: what every loupe test shares: seeded random inputs, the GPU skip
 * rule, and comparisons by a named metric against a declared budget.
 *
 * A comparison prints how much of its budget it used, so a drift toward the limit is
 * visible long before it fails. Any NaN or Inf in a result fails. Seeds are printed
 * on failure. */
#ifndef LOUPE_TESTUTIL_H
#define LOUPE_TESTUTIL_H

#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/tensor.h"

#ifndef LP_FIXTURES
#define LP_FIXTURES "tests/fixtures"
#endif

/* splitmix64: tiny, seedable, identical everywhere. */
static inline uint64_t lp_test_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static inline float lp_test_uniform(uint64_t *s, float lo, float hi) {
    return lo + (hi - lo) * (float)((lp_test_next(s) >> 40) * (1.0 / 16777216.0));
}
static inline void lp_test_fill(float *x, size_t n, uint64_t seed, float lo, float hi) {
    uint64_t s = seed;
    for (size_t i = 0; i < n; i++) x[i] = lp_test_uniform(&s, lo, hi);
}
static inline float *lp_test_rand(size_t n, uint64_t seed, float lo, float hi) {
    float *x = malloc((n ? n : 1) * sizeof(float));
    cr_assert(x != NULL);
    lp_test_fill(x, n, seed, lo, hi);
    return x;
}
/* Distinct random latents per row (as a top-k gives): idx [N,K] in [0,S), K <= S. */
static inline int32_t *lp_test_rand_idx(int N, int K, int S, uint64_t seed) {
    const size_t n_idx = (size_t)N * K;
    int32_t *idx = malloc((n_idx ? n_idx : 1) * sizeof(int32_t));
    cr_assert(idx != NULL);
    uint64_t s = seed;
    for (int n = 0; n < N; n++)
        for (int j = 0; j < K; j++) {
            int32_t v;
            int dup;
            do {
                v = (int32_t)(lp_test_next(&s) % (uint64_t)S);
                dup = 0;
                for (int q = 0; q < j; q++) dup |= idx[(size_t)n * K + q] == v;
            } while (dup);
            idx[(size_t)n * K + j] = v;
        }
    return idx;
}

/* CUDA tests call this first: skip with the reason, or fail under LOUPE_REQUIRE_GPU=1. */
#define LP_TEST_REQUIRE_GPU()                                                             \
    do {                                                                                  \
        char why_[256];                                                                   \
        if (!lp_cuda_available(why_, sizeof why_)) {                                      \
            const char *req_ = getenv("LOUPE_REQUIRE_GPU");                               \
            if (req_ && strcmp(req_, "1") == 0)                                           \
                cr_assert_fail("LOUPE_REQUIRE_GPU=1 but no usable GPU: %s", why_);        \
            cr_skip_test("no usable GPU: %s", why_);                                      \
        }                                                                                 \
    } while (0)

typedef struct lp_cmp {
    double nmse;      /* sum (a - ref)^2 / sum ref^2 (ref all zero: sum (a - ref)^2) */
    double max_abs;   /* max |a - ref| */
    double max_rel;   /* max |a - ref| / max |ref| */
    size_t n_bad;     /* non-finite values in a where ref is finite, or mismatched infinities */
    size_t worst;     /* index of max_abs */
} lp_cmp;

/* Compares a (float) with ref (double). Entries where ref is -inf must be -inf in a
 * (masked attention scores); they are excluded from the error sums. */
static inline lp_cmp lp_compare(const float *a, const double *ref, size_t n) {
    lp_cmp c = {0};
    double num = 0, den = 0, maxref = 0;
    for (size_t i = 0; i < n; i++) {
        if (isinf(ref[i])) {
            if (!(isinf(a[i]) && (a[i] > 0) == (ref[i] > 0))) c.n_bad++;
            continue;
        }
        if (!isfinite(a[i])) { c.n_bad++; continue; }
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
        if (fabs(ref[i]) > maxref) maxref = fabs(ref[i]);
        if (fabs(d) > c.max_abs) { c.max_abs = fabs(d); c.worst = i; }
    }
    c.nmse = den > 0 ? num / den : num;
    c.max_rel = maxref > 0 ? c.max_abs / maxref : c.max_abs;
    return c;
}
static inline lp_cmp lp_compare_f(const float *a, const float *ref, size_t n) {
    double *r = malloc((n ? n : 1) * sizeof(double));
    for (size_t i = 0; i < n; i++) r[i] = ref[i];
    lp_cmp c = lp_compare(a, r, n);
    free(r);
    return c;
}

/* The key of a hook in the Hugging Face references (tests/gen/gen_*_fixture.py), which
 * predate the unembed hooks: unembed.hook_out is their `logits`; unembed.hook_in (the final
 * norm's output after its weight) is not recorded there and is compared with TransformerLens
 * itself in test_tl.c. NULL: not in those references. */
static inline const char *lp_test_hf_key(const char *hook) {
    if (strcmp(hook, "unembed.hook_out") == 0) return "logits";
    if (strcmp(hook, "unembed.hook_in") == 0) return NULL;
    return hook;
}

/* Asserts metric <= budget and prints the fraction of the budget used. */
#define LP_EXPECT_WITHIN(what, seed, cmp, field, budget)                                   \
    do {                                                                                   \
        lp_cmp c_ = (cmp);                                                                 \
        double b_ = (budget);                                                              \
        if (b_ > 0)                                                                        \
            fprintf(stderr, "  %-40s %-8s %.3e of %.1e (%5.1f%%)\n", (what), #field,       \
                    c_.field, b_, 100.0 * c_.field / b_);                                  \
        else                                                                               \
            fprintf(stderr, "  %-40s %-8s %.3e (must be exact)\n", (what), #field, c_.field); \
        cr_expect(c_.n_bad == 0, "%s: %zu non-finite or mismatched values (seed %llu)",    \
                  (what), c_.n_bad, (unsigned long long)(seed));                           \
        cr_expect(c_.field <= b_,                                                          \
                  "%s: %s %.3e exceeds %.1e (worst index %zu, seed %llu)", (what), #field,  \
                  c_.field, b_, c_.worst, (unsigned long long)(seed));                     \
    } while (0)

#endif
