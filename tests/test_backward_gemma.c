/* test_backward_gemma.c: the backward ops of the Gemma family on the CPU, through the public
 * dispatch, checked as test_backward.c checks the others:
 *   (a) against a float64 reference of the derivative written here from the formula;
 *   (b) against central finite differences of L = sum(w * forward(x)) with random weights w,
 *       forward being the op of ops.h itself (F32, CPU), L accumulated in double; the
 *       backward gets dy = w. Up to 48 sampled inputs per tensor, step h (BUDGET) rounded
 *       to float, the quotient taken with the step actually made.
 * Covered: lp_gelu_mul_backward, lp_softcap_backward, lp_attention_backward_cfg and the
 * three-step chain ending in lp_attn_scores_backward_cfg, with windowed, soft-capped and
 * custom-scale options (GQA H = 4 on Hkv = 2, odd head dims, T longer than the window).
 * Finite-difference error: truncation ~h^2 f''' / 6 (the cap's tanh adds curvature to the
 * scores) plus the fp32 rounding of the outputs that move, ~6e-8 sqrt(#outputs) / 2h. */
#include "loupe/ops.h"
#include "ops/ops_internal.h"
#include "testutil.h"

static const struct { const char *op; double nmse, h; } BUDGET[] = {
    /* (a) as test_backward.c: element-wise derivatives in double rounded once; the fused
     * attention's dk/dv accumulate in fp32 over up to T * group terms */
    {"gelu_mul", 1e-13, 0}, {"softcap", 1e-13, 0}, {"attention", 1e-11, 0}, {"attn_scores", 1e-13, 0},
    {"attention vs 3 steps", 1e-11, 0},
    /* (b) finite differences (the attention steps as test_backward.c's) */
    {"fd gelu_mul", 1e-6, 3e-3}, {"fd softcap", 1e-7, 3e-3}, {"fd attention", 1e-5, 1e-2},
    {"fd attn_scores", 1e-6, 3e-3},
};
static int budget_at(const char *op) {
    for (size_t i = 0; i < sizeof BUDGET / sizeof *BUDGET; i++)
        if (strcmp(BUDGET[i].op, op) == 0) return (int)i;
    cr_assert_fail("no budget for %s", op);
    return 0;
}
static double budget(const char *op) { return BUDGET[budget_at(op)].nmse; }

#define FD_SAMPLES 48

static lp_ctx cpu;
static void setup(void) { cr_assert_eq(lp_ctx_init(&cpu, LP_CPU, LP_F32), LP_OK); }
TestSuite(gemma_backward, .init = setup);

#define OK(expr)                                                                            \
    do {                                                                                    \
        lp_status s_ = (expr);                                                              \
        cr_assert_eq(s_, LP_OK, "%s: %s: %s", #expr, lp_status_name(s_), lp_last_error());  \
    } while (0)

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    cr_assert(p != NULL);
    return p;
}
static float *falloc(size_t n) { return xmalloc(n * sizeof(float)); }
static double *dalloc(size_t n) { return xmalloc(n * sizeof(double)); }

static void check(const char *op, const char *label, uint64_t seed, const float *got, const double *ref, size_t n) {
    char what[192];
    snprintf(what, sizeof what, "%s %s", op, label);
    LP_EXPECT_WITHIN(what, seed, lp_compare(got, ref, n), nmse, budget(op));
}

/* ---- finite differences ---- */

typedef double (*loss_fn)(void *st);

static double weighted_sum(const float *w, const float *out, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)w[i] * out[i];
    return s;
}

static double fd_at(float *p, double h, loss_fn L, void *st) {
    const float v = *p, up = (float)((double)v + h), dn = (float)((double)v - h);
    *p = up;
    const double lu = L(st);
    *p = dn;
    const double ld = L(st);
    *p = v;
    return (lu - ld) / ((double)up - (double)dn);
}

/* grad[i] against finite differences of L in x[i]: every point when there are at most
 * FD_SAMPLES, else FD_SAMPLES points drawn from the seed; step h times hscale[i] (or 1). */
static void check_fd(const char *op, const char *label, uint64_t seed, float *x, size_t n, const float *grad,
                     loss_fn L, void *st, const float *hscale) {
    char what[64], full[224];
    snprintf(what, sizeof what, "fd %s", op);
    const double h = BUDGET[budget_at(what)].h;
    float got[FD_SAMPLES];
    double fd[FD_SAMPLES];
    size_t m = 0;
    uint64_t s = seed ^ 0x5eedull;
    const int all = n <= FD_SAMPLES;
    for (size_t k = 0; k < (all ? n : FD_SAMPLES); k++, m++) {
        const size_t i = all ? k : (size_t)(lp_test_next(&s) % n);
        got[m] = grad[i];
        fd[m] = fd_at(&x[i], h * (hscale ? hscale[i] : 1.0), L, st);
    }
    snprintf(full, sizeof full, "%s %s", what, label);
    LP_EXPECT_WITHIN(full, seed, lp_compare(got, fd, m), nmse, budget(what));
}

/* ---- GeGLU and soft-cap ---- */

static const size_t EW_SIZES[] = {1, 31, 33, 1000};

typedef struct { float *g, *u; const float *wt; float *y; size_t n; } geglu_st;
static double geglu_loss(void *p) {
    geglu_st *a = p;
    OK(lp_gelu_mul(&cpu, a->y, a->g, a->u, a->n));
    return weighted_sum(a->wt, a->y, a->n);
}

Test(gemma_backward, gelu_mul) {
    for (size_t i = 0; i < sizeof EW_SIZES / sizeof *EW_SIZES; i++) {
        const size_t n = EW_SIZES[i];
        const uint64_t seed = 8000 + i;
        float *g = lp_test_rand(n, seed, -6, 6), *u = lp_test_rand(n, seed + 1, -2, 2);
        float *dy = lp_test_rand(n, seed + 2, -1, 1), *dg = falloc(n), *du = falloc(n), *y = falloc(n);
        double *rg = dalloc(n), *ru = dalloc(n);
        const double s = sqrt(2 / M_PI), a = 0.044715;
        for (size_t j = 0; j < n; j++) { /* d/dg of 0.5 g (1 + tanh(s (g + a g^3))), from the tanh form */
            const double x = g[j], th = tanh(s * (x + a * x * x * x));
            const double gelu = 0.5 * x * (1 + th);
            const double dgelu = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * s * (1 + 3 * a * x * x);
            rg[j] = dy[j] * u[j] * dgelu, ru[j] = dy[j] * gelu;
        }
        char label[32];
        snprintf(label, sizeof label, "n=%zu", n);
        OK(lp_gelu_mul_backward(&cpu, dg, du, dy, g, u, n));
        check("gelu_mul", label, seed, dg, rg, n);
        check("gelu_mul", label, seed, du, ru, n);
        geglu_st st = {g, u, dy, y, n};
        check_fd("gelu_mul", label, seed, g, n, dg, geglu_loss, &st, NULL);
        check_fd("gelu_mul", label, seed + 1, u, n, du, geglu_loss, &st, NULL);
        free(g), free(u), free(dy), free(dg), free(du), free(y), free(rg), free(ru);
    }
}

typedef struct { float *x; const float *wt; float *y; float cap; size_t n; } cap_st;
static double cap_loss(void *p) {
    cap_st *a = p;
    OK(lp_softcap(&cpu, a->y, a->x, a->cap, a->n));
    return weighted_sum(a->wt, a->y, a->n);
}

Test(gemma_backward, softcap) {
    for (size_t i = 0; i < sizeof EW_SIZES / sizeof *EW_SIZES; i++) {
        const size_t n = EW_SIZES[i];
        const uint64_t seed = 8100 + i;
        const float cap = 30.0f;
        float *x = lp_test_rand(n, seed, -90, 90), *dy = lp_test_rand(n, seed + 1, -1, 1);
        float *y = falloc(n), *dx = falloc(n), *hs = falloc(n);
        double *ref = dalloc(n);
        OK(lp_softcap(&cpu, y, x, cap, n));
        for (size_t j = 0; j < n; j++) {
            /* (a) the contract's formula from the saved fp32 output; how far that is from the
             * true 1 - tanh^2 (y's rounding, amplified where tanh nears 1) is (b)'s business */
            const double r = y[j] / (double)cap;
            ref[j] = dy[j] * (1 - r * r);
            hs[j] = cap; /* a step on the scale of the cap */
        }
        char label[32];
        snprintf(label, sizeof label, "n=%zu", n);
        OK(lp_softcap_backward(&cpu, dx, dy, y, cap, n));
        check("softcap", label, seed, dx, ref, n);
        cap_st st = {x, dy, y, cap, n};
        check_fd("softcap", label, seed, x, n, dx, cap_loss, &st, hs);
        OK(lp_softcap(&cpu, y, x, cap, n));
        OK(lp_softcap_backward(&cpu, dy, dy, y, cap, n)); /* in place over dy */
        check("softcap", label, seed, dy, ref, n);
        free(x), free(dy), free(y), free(dx), free(hs), free(ref);
    }
}

/* ---- attention with options ---- */

typedef struct attn_shape { int B, T, H, Hkv, dh; } attn_shape;
static const attn_shape SHAPES[] = {{1, 1, 1, 1, 1}, {2, 31, 4, 2, 17}, {1, 70, 4, 2, 33}, {1, 40, 2, 1, 64}};
/* {scale, softcap, window}: Gemma 3 style; Gemma 2 style with a bending cap; the cap alone;
 * a window of one key; a cap with a window wider than T */
static const lp_attn_cfg CFGS[] = {{0.3f, 0, 5}, {0.25f, 1.5f, 7}, {0, 2.0f, 0}, {0.5f, 0, 1}, {0.2f, 3.0f, 1000}};
#define N_SHAPES (sizeof SHAPES / sizeof *SHAPES)
#define N_CFGS (sizeof CFGS / sizeof *CFGS)

static void label_of(char *buf, size_t n, attn_shape s, lp_attn_cfg g) {
    snprintf(buf, n, "B=%d T=%d H=%d Hkv=%d dh=%d scale=%g cap=%g win=%d", s.B, s.T, s.H, s.Hkv, s.dh, (double)g.scale,
             (double)g.softcap, g.window);
}
static size_t qi(attn_shape s, int b, int t, int h, int d) { return (((size_t)b * s.T + t) * s.H + h) * s.dh + d; }
static size_t ki(attn_shape s, int b, int t, int g, int d) { return (((size_t)b * s.T + t) * s.Hkv + g) * s.dh + d; }
static size_t si(attn_shape s, int b, int h, int t, int j) { return (((size_t)b * s.H + h) * s.T + t) * s.T + j; }
static int seen(lp_attn_cfg g, int t, int j) { return j <= t && (g.window == 0 || t - j < g.window); }
static double scale_of(lp_attn_cfg g, attn_shape s) { return g.scale > 0 ? g.scale : 1 / sqrt(s.dh); }

/* float64 backward of the fused attention from the definition: r = c q.k, s = cap tanh(r /
 * cap), p = softmax over the visible keys, z = p v; ds = p (dz.v - dz.z), dr = ds (1 - tanh^2). */
static void ref_attention_backward(attn_shape s, lp_attn_cfg g, const float *q, const float *k, const float *v,
                                   const float *dz, double *dq, double *dk, double *dv) {
    const int group = s.H / s.Hkv;
    const double c = scale_of(g, s);
    memset(dk, 0, (size_t)s.B * s.T * s.Hkv * s.dh * sizeof(double));
    memset(dv, 0, (size_t)s.B * s.T * s.Hkv * s.dh * sizeof(double));
    double *p = dalloc(s.T), *dp = dalloc(s.T), *dth = dalloc(s.T);
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int t = 0; t < s.T; t++) {
                const int gk = h / group;
                double mx = -INFINITY, sum = 0, D = 0;
                for (int j = 0; j <= t; j++) {
                    if (!seen(g, t, j)) continue;
                    double a = 0, e = 0;
                    for (int d = 0; d < s.dh; d++) {
                        a += (double)q[qi(s, b, t, h, d)] * k[ki(s, b, j, gk, d)];
                        e += (double)dz[qi(s, b, t, h, d)] * v[ki(s, b, j, gk, d)];
                    }
                    a *= c, dth[j] = 1;
                    if (g.softcap > 0) {
                        const double th = tanh(a / g.softcap);
                        a = g.softcap * th, dth[j] = 1 - th * th;
                    }
                    p[j] = a, dp[j] = e;
                    mx = fmax(mx, a);
                }
                for (int j = 0; j <= t; j++)
                    if (seen(g, t, j)) sum += (p[j] = exp(p[j] - mx));
                for (int j = 0; j <= t; j++)
                    if (seen(g, t, j)) p[j] /= sum, D += p[j] * dp[j];
                for (int d = 0; d < s.dh; d++) dq[qi(s, b, t, h, d)] = 0;
                for (int j = 0; j <= t; j++) {
                    if (!seen(g, t, j)) continue;
                    const double dr = p[j] * (dp[j] - D) * dth[j];
                    for (int d = 0; d < s.dh; d++) {
                        dq[qi(s, b, t, h, d)] += dr * k[ki(s, b, j, gk, d)] * c;
                        dk[ki(s, b, j, gk, d)] += dr * q[qi(s, b, t, h, d)] * c;
                        dv[ki(s, b, j, gk, d)] += p[j] * dz[qi(s, b, t, h, d)];
                    }
                }
            }
    free(p), free(dp), free(dth);
}

typedef struct { float *q, *k, *v; const float *wt; float *z; attn_shape s; lp_attn_cfg g; } attn_st;
static double attn_loss(void *p) {
    attn_st *a = p;
    OK(lp_attention_cfg(&cpu, a->z, a->q, a->k, a->v, a->s.B, a->s.T, a->s.H, a->s.Hkv, a->s.dh, &a->g));
    return weighted_sum(a->wt, a->z, (size_t)a->s.B * a->s.T * a->s.H * a->s.dh);
}

static void copy_d(double *r, const float *x, size_t n) {
    for (size_t j = 0; j < n; j++) r[j] = x[j];
}

Test(gemma_backward, attention_fused_and_three_steps_with_options) {
    for (size_t i = 0; i < N_SHAPES; i++)
        for (size_t ci = 0; ci < N_CFGS; ci++) {
            const attn_shape s = SHAPES[i];
            const lp_attn_cfg g = CFGS[ci];
            const uint64_t seed = 8200 + i * 16 + ci;
            const size_t nq = (size_t)s.B * s.T * s.H * s.dh, nk = (size_t)s.B * s.T * s.Hkv * s.dh;
            const size_t ns = (size_t)s.B * s.H * s.T * s.T, rows = (size_t)s.B * s.H * s.T;
            float *q = lp_test_rand(nq, seed, -3, 3), *k = lp_test_rand(nk, seed + 1, -2, 2);
            float *v = lp_test_rand(nk, seed + 2, -1, 1), *dz = lp_test_rand(nq, seed + 3, -1, 1);
            float *dq = falloc(nq), *dk = falloc(nk), *dv = falloc(nk), *z = falloc(nq);
            double *rq = dalloc(nq), *rk = dalloc(nk), *rv = dalloc(nk);
            OK(lp_attention_backward_cfg(&cpu, dq, dk, dv, dz, q, k, v, s.B, s.T, s.H, s.Hkv, s.dh, &g));
            ref_attention_backward(s, g, q, k, v, dz, rq, rk, rv);
            char label[128];
            label_of(label, sizeof label, s, g);
            check("attention", label, seed, dq, rq, nq);
            check("attention", label, seed, dk, rk, nk);
            check("attention", label, seed, dv, rv, nk);
            attn_st st = {q, k, v, dz, z, s, g};
            check_fd("attention", label, seed, q, nq, dq, attn_loss, &st, NULL);
            check_fd("attention", label, seed + 1, k, nk, dk, attn_loss, &st, NULL);
            check_fd("attention", label, seed + 2, v, nk, dv, attn_loss, &st, NULL);

            /* the hookable steps, backward: attn_apply -> softmax_rows -> attn_scores_cfg */
            float *sc = falloc(ns), *pat = falloc(ns), *dpat = falloc(ns), *dsc = falloc(ns);
            float *dq3 = falloc(nq), *dk3 = falloc(nk), *dv3 = falloc(nk);
            OK(lp_attn_scores_cfg(&cpu, sc, q, k, s.B, s.T, s.H, s.Hkv, s.dh, &g));
            OK(lp_softmax_rows(&cpu, pat, sc, rows, s.T));
            OK(lp_attn_apply_backward(&cpu, dpat, dv3, dz, pat, v, s.B, s.T, s.H, s.Hkv, s.dh));
            OK(lp_softmax_rows_backward(&cpu, dsc, dpat, pat, rows, s.T));
            OK(lp_attn_scores_backward_cfg(&cpu, dq3, dk3, dsc, sc, q, k, s.B, s.T, s.H, s.Hkv, s.dh, &g));
            double *r = dalloc(nq);
            copy_d(r, dq, nq);
            check("attention vs 3 steps", label, seed, dq3, r, nq);
            copy_d(r, dk, nk);
            check("attention vs 3 steps", label, seed, dk3, r, nk);
            copy_d(r, dv, nk);
            check("attention vs 3 steps", label, seed, dv3, r, nk);
            free(q), free(k), free(v), free(dz), free(dq), free(dk), free(dv), free(z), free(rq), free(rk), free(rv);
            free(sc), free(pat), free(dpat), free(dsc), free(dq3), free(dk3), free(dv3), free(r);
        }
}

/* attn_scores_cfg: the loss weighs the visible scores only (masked ones are a constant -inf) */
typedef struct { float *q, *k; const float *wt; float *sc; attn_shape s; lp_attn_cfg g; } scores_st;
static double scores_loss(void *p) {
    scores_st *a = p;
    const attn_shape s = a->s;
    OK(lp_attn_scores_cfg(&cpu, a->sc, a->q, a->k, s.B, s.T, s.H, s.Hkv, s.dh, &a->g));
    double L = 0;
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int t = 0; t < s.T; t++)
                for (int j = 0; j <= t; j++)
                    if (seen(a->g, t, j)) L += (double)a->wt[si(s, b, h, t, j)] * a->sc[si(s, b, h, t, j)];
    return L;
}

Test(gemma_backward, attn_scores_with_options) {
    for (size_t i = 0; i < N_SHAPES; i++)
        for (size_t ci = 0; ci < N_CFGS; ci++) {
            const attn_shape s = SHAPES[i];
            const lp_attn_cfg g = CFGS[ci];
            const uint64_t seed = 8400 + i * 16 + ci;
            const size_t nq = (size_t)s.B * s.T * s.H * s.dh, nk = (size_t)s.B * s.T * s.Hkv * s.dh;
            const size_t ns = (size_t)s.B * s.H * s.T * s.T;
            float *q = lp_test_rand(nq, seed, -3, 3), *k = lp_test_rand(nk, seed + 1, -2, 2);
            float *ds = lp_test_rand(ns, seed + 2, -1, 1), *sc = falloc(ns), *dq = falloc(nq), *dk = falloc(nk);
            OK(lp_attn_scores_cfg(&cpu, sc, q, k, s.B, s.T, s.H, s.Hkv, s.dh, &g));
            for (int b = 0; b < s.B; b++) /* masked entries must be ignored: poison them */
                for (int h = 0; h < s.H; h++)
                    for (int t = 0; t < s.T; t++)
                        for (int j = 0; j < s.T; j++)
                            if (!seen(g, t, j)) ds[si(s, b, h, t, j)] = NAN;
            OK(lp_attn_scores_backward_cfg(&cpu, dq, dk, ds, sc, q, k, s.B, s.T, s.H, s.Hkv, s.dh, &g));
            double *rq = dalloc(nq), *rk = dalloc(nk);
            memset(rq, 0, nq * sizeof(double)), memset(rk, 0, nk * sizeof(double));
            const int group = s.H / s.Hkv;
            const double c = scale_of(g, s);
            for (int b = 0; b < s.B; b++)
                for (int h = 0; h < s.H; h++)
                    for (int t = 0; t < s.T; t++)
                        for (int j = 0; j <= t; j++) {
                            if (!seen(g, t, j)) continue;
                            /* tanh' = 1 - (s / cap)^2 from the saved (fp32) scores, as the contract says */
                            const double th = g.softcap > 0 ? sc[si(s, b, h, t, j)] / (double)g.softcap : 0;
                            const double gs = ds[si(s, b, h, t, j)] * (1 - th * th) * c;
                            for (int d = 0; d < s.dh; d++) {
                                rq[qi(s, b, t, h, d)] += gs * k[ki(s, b, j, h / group, d)];
                                rk[ki(s, b, j, h / group, d)] += gs * q[qi(s, b, t, h, d)];
                            }
                        }
            char label[128];
            label_of(label, sizeof label, s, g);
            check("attn_scores", label, seed, dq, rq, nq);
            check("attn_scores", label, seed, dk, rk, nk);
            for (size_t j = 0; j < ns; j++) /* the loss weights must be finite */
                if (isnan(ds[j])) ds[j] = 0;
            scores_st st = {q, k, ds, sc, s, g};
            check_fd("attn_scores", label, seed, q, nq, dq, scores_loss, &st, NULL);
            check_fd("attn_scores", label, seed + 1, k, nk, dk, scores_loss, &st, NULL);
            free(q), free(k), free(ds), free(sc), free(dq), free(dk), free(rq), free(rk);
        }
}
