/* test_ops_gemma.c: the Gemma-family CPU ops (through the public dispatch, on a CPU context)
 * against float64 references written here: attention with the options of lp_attn_cfg (a
 * score scale, Gemma 2's soft-cap, a sliding window) in its fused, row-at-a-time, three-step
 * and cached forms; GeGLU, the soft-cap and the scale. Shapes have grouped kv heads (H = 4 on
 * Hkv = 2), odd head dims, and lengths past the window and past the CPU's 64-row query
 * blocks, so that a block starts inside its first row's window. Seeds are fixed and printed
 * on failure; budgets are normalized squared error, as in test_ops.c. */
#include "loupe/ops.h"
#include "ops/ops_internal.h"
#include "testutil.h"

/* fp32 against fp64: as test_ops.c (attention 1e-10: dot products of <= 64 terms, a softmax
 * over <= 150 keys, exp and tanh a few ulps). cached_decode: a decode step and the full
 * cached pass compute each row by the same loop, so they must give the same bits. */
static const struct { const char *op; double nmse; } BUDGET[] = {
    {"attention", 1e-10}, {"attn_scores", 1e-10}, {"softmax", 1e-11}, {"attn_apply", 1e-10},
    {"attention_cached", 1e-10}, {"cached_decode", 0}, {"gelu_mul", 1e-12}, {"softcap", 1e-12}, {"scale", 1e-13},
};
static double budget(const char *op) {
    for (size_t i = 0; i < sizeof BUDGET / sizeof *BUDGET; i++)
        if (strcmp(BUDGET[i].op, op) == 0) return BUDGET[i].nmse;
    cr_assert_fail("no budget for %s", op);
    return 0;
}

static lp_ctx cpu;
static void setup(void) { cr_assert_eq(lp_ctx_init(&cpu, LP_CPU, LP_F32), LP_OK); }
TestSuite(gemma_ops, .init = setup);

#define OK(expr)                                                                            \
    do {                                                                                    \
        lp_status s_ = (expr);                                                              \
        cr_assert_eq(s_, LP_OK, "%s: %s: %s", #expr, lp_status_name(s_), lp_last_error());  \
    } while (0)

static void check(const char *op, const char *label, uint64_t seed, const float *got, const double *ref, size_t n) {
    char what[160];
    snprintf(what, sizeof what, "%s %s", op, label);
    lp_cmp c = lp_compare(got, ref, n);
    if (budget(op) == 0) {
        cr_expect(c.max_abs == 0 && c.n_bad == 0, "%s: not exact (max |diff| %g, seed %llu)", what, c.max_abs,
                  (unsigned long long)seed);
        return;
    }
    LP_EXPECT_WITHIN(what, seed, c, nmse, budget(op));
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    cr_assert(p != NULL);
    return p;
}

/* ---- attention with options ---- */

typedef struct attn_shape { int B, T, H, Hkv, dh; } attn_shape;
static const attn_shape SHAPES[] = {
    {1, 1, 1, 1, 1},    /* one token */
    {2, 40, 4, 2, 33},  /* GQA, odd dh, T past every window below but the widest */
    {1, 150, 4, 2, 17}, /* three 64-row blocks of the CPU's fused form */
    {1, 70, 2, 1, 64},  /* multi-query */
};
/* {scale, softcap, window}: the defaults; Gemma 3 (window, a custom scale, no cap); Gemma 2
 * (cap and window) with a cap small enough that tanh bends; a window of one key (the
 * diagonal only); a window wider than a CPU block; a window wider than any T here. */
static const lp_attn_cfg CFGS[] = {
    {0, 0, 0}, {0.3f, 0, 5}, {0.25f, 1.5f, 0}, {0.25f, 1.5f, 7}, {0.5f, 0, 1}, {0, 2.0f, 100}, {0.2f, 3.0f, 1000},
};
#define N_SHAPES (sizeof SHAPES / sizeof *SHAPES)
#define N_CFGS (sizeof CFGS / sizeof *CFGS)

static void label_of(char *buf, size_t n, attn_shape s, lp_attn_cfg g) {
    snprintf(buf, n, "B=%d T=%d H=%d Hkv=%d dh=%d scale=%g cap=%g win=%d", s.B, s.T, s.H, s.Hkv, s.dh, (double)g.scale,
             (double)g.softcap, g.window);
}

/* float64 reference from the definition: score(t, j) = cap tanh(c q_t.k_j / cap) (no tanh
 * without a cap), visible iff t - window < j <= t (j <= t without a window); z, and
 * optionally the scores (-inf where masked) and the pattern. */
static void ref_attention(attn_shape s, lp_attn_cfg g, const float *q, const float *k, const float *v, double *z,
                          double *scores, double *pattern) {
    const double c = g.scale > 0 ? g.scale : 1 / sqrt(s.dh);
    double *row = xmalloc(s.T * sizeof(double));
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int t = 0; t < s.T; t++) {
                const int gk = h / (s.H / s.Hkv);
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j < s.T; j++) {
                    const int seen = j <= t && (g.window == 0 || t - j < g.window);
                    if (!seen) { row[j] = -INFINITY; continue; }
                    double a = 0;
                    for (int d = 0; d < s.dh; d++)
                        a += (double)q[(((size_t)b * s.T + t) * s.H + h) * s.dh + d] *
                             k[(((size_t)b * s.T + j) * s.Hkv + gk) * s.dh + d];
                    a *= c;
                    row[j] = g.softcap > 0 ? g.softcap * tanh(a / g.softcap) : a;
                    mx = fmax(mx, row[j]);
                }
                for (int j = 0; j < s.T; j++) sum += row[j] == -INFINITY ? 0 : exp(row[j] - mx);
                double *zr = z + (((size_t)b * s.T + t) * s.H + h) * s.dh;
                for (int d = 0; d < s.dh; d++) zr[d] = 0;
                for (int j = 0; j < s.T; j++) {
                    const size_t o = (((size_t)b * s.H + h) * s.T + t) * s.T + j;
                    const double p = row[j] == -INFINITY ? 0 : exp(row[j] - mx) / sum;
                    if (scores) scores[o] = row[j];
                    if (pattern) pattern[o] = p;
                    for (int d = 0; d < s.dh; d++) zr[d] += p * v[(((size_t)b * s.T + j) * s.Hkv + gk) * s.dh + d];
                }
            }
    free(row);
}

Test(gemma_ops, attention_options_fused_rows_and_three_steps) {
    for (size_t si = 0; si < N_SHAPES; si++)
        for (size_t ci = 0; ci < N_CFGS; ci++) {
            const attn_shape s = SHAPES[si];
            const lp_attn_cfg g = CFGS[ci];
            const uint64_t seed = 7000 + si * 16 + ci;
            const size_t nq = (size_t)s.B * s.T * s.H * s.dh, nk = (size_t)s.B * s.T * s.Hkv * s.dh;
            const size_t ns = (size_t)s.B * s.H * s.T * s.T, rows = (size_t)s.B * s.H * s.T;
            /* scores c q.k span several units: the cap bends them and the softmax is not flat */
            float *q = lp_test_rand(nq, seed, -3, 3), *k = lp_test_rand(nk, seed + 1, -2, 2);
            float *v = lp_test_rand(nk, seed + 2, -1, 1);
            float *z = xmalloc(nq * 4), *sc = xmalloc(ns * 4), *pat = xmalloc(ns * 4);
            double *rz = xmalloc(nq * 8), *rs = xmalloc(ns * 8), *rp = xmalloc(ns * 8);
            ref_attention(s, g, q, k, v, rz, rs, rp);
            char label[128];
            label_of(label, sizeof label, s, g);

            OK(lp_attention_cfg(&cpu, z, q, k, v, s.B, s.T, s.H, s.Hkv, s.dh, &g));
            check("attention", label, seed, z, rz, nq);
            cpu_attention_rows_cfg(z, q, k, v, s.B, s.T, s.H, s.Hkv, s.dh, &g); /* the fallback form */
            check("attention", label, seed, z, rz, nq);
            OK(lp_attn_scores_cfg(&cpu, sc, q, k, s.B, s.T, s.H, s.Hkv, s.dh, &g));
            check("attn_scores", label, seed, sc, rs, ns); /* -inf exactly where masked */
            OK(lp_softmax_rows(&cpu, pat, sc, rows, s.T));
            check("softmax", label, seed, pat, rp, ns);
            size_t leaks = 0; /* a masked key has exactly zero probability */
            for (size_t i = 0; i < ns; i++) leaks += rp[i] == 0 && pat[i] != 0.0f;
            cr_expect(leaks == 0, "%s: %zu masked keys with non-zero probability", label, leaks);
            OK(lp_attn_apply(&cpu, z, pat, v, s.B, s.T, s.H, s.Hkv, s.dh));
            check("attn_apply", label, seed, z, rz, nq);
            if (g.scale == 0 && g.softcap == 0 && g.window == 0) { /* NULL and zeroed options: the old op */
                float *z0 = xmalloc(nq * 4);
                OK(lp_attention(&cpu, z0, q, k, v, s.B, s.T, s.H, s.Hkv, s.dh));
                OK(lp_attention_cfg(&cpu, z, q, k, v, s.B, s.T, s.H, s.Hkv, s.dh, NULL));
                cr_expect(memcmp(z, z0, nq * 4) == 0, "%s: NULL options differ from lp_attention", label);
                free(z0);
            }
            free(q), free(k), free(v), free(z), free(sc), free(pat), free(rz), free(rs), free(rp);
        }
}

/* [B,T,Hkv,dh] into the first T positions of a [B,Tcap,Hkv,dh] cache that holds NaN after
 * them: a read past the last key a query may see poisons its row. Keys before the window are
 * real values, so reading them would show as a wrong result. */
static float *to_cache(const float *k, int B, int T, int Tcap, int Hkv, int dh) {
    const size_t row = (size_t)Hkv * dh;
    float *c = xmalloc((size_t)B * Tcap * row * 4);
    for (size_t j = 0; j < (size_t)B * Tcap * row; j++) c[j] = NAN;
    for (int b = 0; b < B; b++) memcpy(c + (size_t)b * Tcap * row, k + (size_t)b * T * row, (size_t)T * row * 4);
    return c;
}

Test(gemma_ops, attention_cached_with_window_matches_uncached_row_by_row) {
    for (size_t si = 0; si < N_SHAPES; si++)
        for (size_t ci = 0; ci < N_CFGS; ci++) {
            const attn_shape s = SHAPES[si];
            const lp_attn_cfg g = CFGS[ci];
            const uint64_t seed = 7500 + si * 16 + ci;
            const size_t nq = (size_t)s.B * s.T * s.H * s.dh, nk = (size_t)s.B * s.T * s.Hkv * s.dh;
            const size_t qrow = (size_t)s.H * s.dh;
            float *q = lp_test_rand(nq, seed, -3, 3), *k = lp_test_rand(nk, seed + 1, -2, 2);
            float *v = lp_test_rand(nk, seed + 2, -1, 1);
            float *zu = xmalloc(nq * 4), *zf = xmalloc(nq * 4), *z = xmalloc(nq * 4);
            float *qb = xmalloc(nq * 4), *zb = xmalloc(nq * 4);
            double *rz = xmalloc(nq * 8), *rf = xmalloc(nq * 8);
            ref_attention(s, g, q, k, v, rz, NULL, NULL);
            char label[128];
            label_of(label, sizeof label, s, g);

            /* the uncached op, and the cached one over the whole prompt (pos0 = 0, Tcap = T) */
            OK(lp_attention_cfg(&cpu, zu, q, k, v, s.B, s.T, s.H, s.Hkv, s.dh, &g));
            OK(lp_attention_cached_cfg(&cpu, zf, q, k, v, s.B, s.T, s.T, 0, s.H, s.Hkv, s.dh, &g));
            check("attention_cached", label, seed, zf, rz, nq);
            for (size_t j = 0; j < nq; j++) rf[j] = zu[j];
            check("attention_cached", label, seed, zf, rf, nq); /* against lp_attention_cfg itself */

            /* token by token from a cache with room to spare: each row is the full pass's row */
            const int Tcap = s.T + 5;
            float *kc = to_cache(k, s.B, s.T, Tcap, s.Hkv, s.dh), *vc = to_cache(v, s.B, s.T, Tcap, s.Hkv, s.dh);
            for (int p = 0; p < s.T; p++) {
                for (int b = 0; b < s.B; b++) memcpy(qb + b * qrow, q + ((size_t)b * s.T + p) * qrow, qrow * 4);
                OK(lp_attention_cached_cfg(&cpu, zb, qb, kc, vc, s.B, 1, Tcap, p, s.H, s.Hkv, s.dh, &g));
                for (int b = 0; b < s.B; b++) memcpy(z + ((size_t)b * s.T + p) * qrow, zb + b * qrow, qrow * 4);
            }
            for (size_t j = 0; j < nq; j++) rf[j] = zf[j];
            check("cached_decode", label, seed, z, rf, nq);
            for (size_t j = 0; j < nq; j++) rf[j] = zu[j];
            check("attention_cached", label, seed, z, rf, nq);

            /* a prompt in two chunks: the window reaches back into the first chunk */
            const int T1 = s.T / 2;
            for (int part = 0; part < 2; part++) {
                const int p0 = part ? T1 : 0, Tq = part ? s.T - T1 : T1;
                if (Tq == 0) continue;
                for (int b = 0; b < s.B; b++)
                    memcpy(qb + (size_t)b * Tq * qrow, q + ((size_t)b * s.T + p0) * qrow, Tq * qrow * 4);
                OK(lp_attention_cached_cfg(&cpu, zb, qb, kc, vc, s.B, Tq, Tcap, p0, s.H, s.Hkv, s.dh, &g));
                for (int b = 0; b < s.B; b++)
                    memcpy(z + ((size_t)b * s.T + p0) * qrow, zb + (size_t)b * Tq * qrow, Tq * qrow * 4);
            }
            for (size_t j = 0; j < nq; j++) rf[j] = zf[j];
            check("cached_decode", label, seed, z, rf, nq);
            free(q), free(k), free(v), free(zu), free(zf), free(z), free(qb), free(zb), free(rz), free(rf), free(kc);
            free(vc);
        }
}

/* ---- GeGLU, soft-cap, scale ---- */

static const size_t EW_SIZES[] = {1, 31, 33, 1000};

Test(gemma_ops, gelu_mul) {
    for (size_t i = 0; i < sizeof EW_SIZES / sizeof *EW_SIZES; i++) {
        const size_t n = EW_SIZES[i];
        const uint64_t seed = 7800 + i;
        float *g = lp_test_rand(n, seed, -6, 6), *u = lp_test_rand(n, seed + 1, -2, 2), *out = xmalloc(n * 4);
        double *ref = xmalloc(n * 8);
        for (size_t j = 0; j < n; j++) {
            const double x = g[j];
            ref[j] = 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x))) * u[j];
        }
        char label[32];
        snprintf(label, sizeof label, "n=%zu", n);
        OK(lp_gelu_mul(&cpu, out, g, u, n));
        check("gelu_mul", label, seed, out, ref, n);
        /* the same as lp_gelu times up, bit for bit (one formula for the GELU) */
        float *ge = xmalloc(n * 4);
        OK(lp_gelu(&cpu, ge, g, n));
        size_t diff = 0;
        for (size_t j = 0; j < n; j++) diff += out[j] != ge[j] * u[j];
        cr_expect(diff == 0, "gelu_mul n=%zu: %zu entries differ from gelu(gate) * up", n, diff);
        OK(lp_gelu_mul(&cpu, g, g, u, n)); /* in place over gate */
        check("gelu_mul", label, seed, g, ref, n);
        free(g), free(u), free(out), free(ref), free(ge);
    }
}

Test(gemma_ops, softcap_and_scale) {
    for (size_t i = 0; i < sizeof EW_SIZES / sizeof *EW_SIZES; i++) {
        const size_t n = EW_SIZES[i];
        const uint64_t seed = 7900 + i;
        const float cap = 30.0f, s = 33.941125f; /* Gemma 2's final cap; sqrt(1152), Gemma 3 270M's d_model */
        float *x = lp_test_rand(n, seed, -100, 100), *out = xmalloc(n * 4);
        double *ref = xmalloc(n * 8);
        char label[32];
        snprintf(label, sizeof label, "n=%zu", n);
        for (size_t j = 0; j < n; j++) ref[j] = cap * tanh(x[j] / (double)cap);
        OK(lp_softcap(&cpu, out, x, cap, n));
        check("softcap", label, seed, out, ref, n);
        for (size_t j = 0; j < n; j++) cr_expect(fabsf(out[j]) <= cap, "softcap: |%g| > cap", out[j]);
        for (size_t j = 0; j < n; j++) ref[j] = (double)x[j] * s;
        OK(lp_scale(&cpu, out, x, s, n));
        check("scale", label, seed, out, ref, n);
        OK(lp_scale(&cpu, x, x, s, n)); /* in place */
        check("scale", label, seed, x, ref, n);
        for (size_t j = 0; j < n; j++) ref[j] = cap * tanh(x[j] / (double)cap);
        OK(lp_softcap(&cpu, x, x, cap, n)); /* in place */
        check("softcap", label, seed, x, ref, n);
        free(x), free(out), free(ref);
    }
}

Test(gemma_ops, bad_options_are_errors) {
    float x[16] = {0};
    const lp_attn_cfg bad[] = {{-1, 0, 0}, {0, -1, 0}, {0, 0, -1}, {NAN, 0, 0}, {0, INFINITY, 0}};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        cr_expect_eq(lp_attention_cfg(&cpu, x, x, x, x, 1, 2, 1, 1, 2, &bad[i]), LP_ERR_ARG, "cfg %zu", i);
        cr_expect_eq(lp_attn_scores_cfg(&cpu, x, x, x, 1, 2, 1, 1, 2, &bad[i]), LP_ERR_ARG, "cfg %zu", i);
        cr_expect_eq(lp_attention_cached_cfg(&cpu, x, x, x, x, 1, 2, 2, 0, 1, 1, 2, &bad[i]), LP_ERR_ARG, "cfg %zu", i);
    }
    float y[4] = {0}, w[4] = {0};
    cr_expect_eq(lp_softcap(&cpu, y, w, 0.0f, 4), LP_ERR_ARG);
    cr_expect_eq(lp_softcap(&cpu, y, w, -1.0f, 4), LP_ERR_ARG);
    cr_expect_eq(lp_softcap_backward(&cpu, y, w, w, 0.0f, 4), LP_ERR_ARG);
    cr_expect_eq(lp_gelu_mul_backward(&cpu, y, y, w, w, w, 4), LP_ERR_ARG); /* dgate is dup */
    /* a soft-cap's scores backward needs the saved scores */
    const lp_attn_cfg capped = {0, 5.0f, 0};
    float dq[4], dk[4], q[4] = {0}, k[4] = {0}, ds[4] = {0};
    cr_expect_eq(lp_attn_scores_backward_cfg(&cpu, dq, dk, ds, NULL, q, k, 1, 2, 1, 1, 2, &capped), LP_ERR_ARG);
    cr_expect_eq(lp_attn_scores_backward_cfg(&cpu, dq, dk, ds, NULL, q, k, 1, 2, 1, 1, 2, NULL), LP_OK);
}
