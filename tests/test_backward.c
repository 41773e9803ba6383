/* test_backward.c: every backward op of ops.h ("backward ops (attribution gradients)") on
 * the CPU, through the public dispatch, checked two ways on awkward sizes (1, 31, 33, and T
 * up to 100 for attention, with grouped kv heads and dh 1, 16, 33, 64):
 *
 *   (a) against a float64 reference of the derivative written here from the formula;
 *   (b) against central finite differences of a scalar loss L = sum(w * forward(x)) with
 *       random weights w, where forward is the FORWARD op of ops.h itself (F32, CPU) and L
 *       is accumulated in double. This ties each backward op to the op it differentiates as
 *       loupe computes it (epsilon inside the norms' scale, the tanh GELU, the causal mask,
 *       GQA grouping, the 1/sqrt(dh) scale, rotate-half RoPE at pos0), not to a rewrite.
 *       The backward gets dy = w; sampled inputs (all of them up to 48, else 48 drawn from
 *       the seed) are moved by +-h, h = the op's step (1e-2 .. 3e-3, in BUDGET) times the
 *       input's scale (1 for O(1) inputs, |x| for wider ones, the row's rms for RMSNorm),
 *       rounded to float; the quotient uses the step actually taken.
 *
 * Finite-difference error: truncation ~h^2 f''' / 6 plus the fp32 rounding of the forward
 * outputs that move, ~6e-8 * sqrt(#outputs) / 2h in absolute terms: small for an element-wise
 * op, larger for a row of LayerNorm over 1000 or a key of a 100-token attention whose
 * perturbation moves 70 rows of 64 outputs. Budgets (nmse over the sampled points) leave a
 * margin of about 10 or more over the measured values. Seeds are fixed and printed on failure. */
#include "loupe/ops.h"
#include "ops/ops_internal.h"
#include "testutil.h"

static const struct { const char *op; double nmse, h; } BUDGET[] = {
    /* (a) fp32 results against float64: element-wise derivatives round a few times (~1e-14);
     * sums in double rounded once (~1e-15); the fused attention's dk/dv accumulate in fp32
     * over up to T * group terms (~1e-13) and its softmax goes through fp32 scores. */
    {"ln", 1e-13, 0}, {"rms", 1e-13, 0}, {"gelu", 1e-13, 0}, {"silu_mul", 1e-13, 0}, {"rope", 1e-13, 0},
    {"attention", 1e-11, 0}, {"attn_apply", 1e-13, 0}, {"softmax_rows", 1e-13, 0}, {"attn_scores", 1e-13, 0},
    {"xent", 1e-13, 0},
    /* the three-step chain (apply -> softmax -> scores backward) against the fused backward */
    {"attention vs 3 steps", 1e-11, 0},
    /* RoPE is orthogonal: its backward undoes the forward up to two fp32 roundings */
    {"rope inverse", 1e-13, 0},
    /* (b) finite differences, with the step h relative to the input's scale. gelu and
     * silu_mul at n = 1 compare a single point (its relative error): gelu's lies next to the
     * zero of gelu'. xent: the loss is O(log V) and rounded to fp32 while its gradient
     * entries are O(1/V), so the rounding noise ~6e-8 V / 2h relative needs the largest
     * step (truncation there is ~h^2/6). */
    {"fd ln", 1e-6, 1e-2}, {"fd rms", 1e-6, 1e-2}, {"fd gelu", 1e-5, 3e-3}, {"fd silu_mul", 1e-6, 3e-3},
    {"fd rope", 1e-7, 3e-3}, {"fd attention", 1e-5, 1e-2}, {"fd attn_apply", 1e-7, 3e-3},
    {"fd softmax_rows", 1e-6, 1e-2}, {"fd attn_scores", 1e-6, 3e-3}, {"fd xent", 1e-5, 1e-2},
};
static int budget_at(const char *op) {
    for (size_t i = 0; i < sizeof BUDGET / sizeof *BUDGET; i++)
        if (strcmp(BUDGET[i].op, op) == 0) return (int)i;
    cr_assert_fail("no budget for %s", op);
    return 0;
}
static double budget(const char *op) { return BUDGET[budget_at(op)].nmse; }
static double fd_step(const char *op) { return BUDGET[budget_at(op)].h; }

#define FD_SAMPLES 48 /* sampled inputs per tensor */

static lp_ctx cpu;
static void setup(void) { cr_assert_eq(lp_ctx_init(&cpu, LP_CPU, LP_F32), LP_OK); }
TestSuite(backward, .init = setup);

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
    char what[128];
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

/* dL/dp by a central difference with step h (rounded to float; the step taken is used) */
static double fd_at(float *p, double h, loss_fn L, void *st) {
    const float v = *p, up = (float)((double)v + h), dn = (float)((double)v - h);
    *p = up;
    const double lu = L(st);
    *p = dn;
    const double ld = L(st);
    *p = v;
    return (lu - ld) / ((double)up - (double)dn);
}

/* Compares grad[i] with finite differences of L in x[i]: every point when there are at most
 * FD_SAMPLES, else FD_SAMPLES points drawn from the seed. The step for element i is FD_REL
 * times hscale[i] (1 when hscale is NULL); points with skip(i) (masked entries) are left out. */
typedef struct fd_opts {
    const float *hscale;
    int (*skip)(const void *ctx, size_t i);
    const void *skip_ctx;
} fd_opts;

static void check_fd(const char *op, const char *label, uint64_t seed, float *x, size_t n, const float *grad,
                     loss_fn L, void *st, fd_opts o) {
    char what[64], full[192];
    snprintf(what, sizeof what, "fd %s", op);
    const double h = fd_step(what);
    float got[FD_SAMPLES];
    double fd[FD_SAMPLES];
    size_t m = 0;
    uint64_t s = seed ^ 0x5eedull;
    const int all = n <= FD_SAMPLES;
    for (size_t k = 0; k < (all ? n : 8 * FD_SAMPLES) && m < FD_SAMPLES; k++) {
        const size_t i = all ? k : (size_t)(lp_test_next(&s) % n);
        if (o.skip && o.skip(o.skip_ctx, i)) continue;
        got[m] = grad[i];
        fd[m] = fd_at(&x[i], h * (o.hscale ? o.hscale[i] : 1.0), L, st);
        m++;
    }
    cr_assert(m > 0, "%s %s: no point to sample", op, label);
    snprintf(full, sizeof full, "%s %s", what, label);
    LP_EXPECT_WITHIN(full, seed, lp_compare(got, fd, m), nmse, budget(what));
}
static const fd_opts FD_PLAIN = {NULL, NULL, NULL};

/* the step scale max(1, |x|) of inputs spread over several units */
static float *abs_scale(const float *x, size_t n) {
    float *hs = falloc(n);
    for (size_t i = 0; i < n; i++) hs[i] = fabsf(x[i]) > 1 ? fabsf(x[i]) : 1;
    return hs;
}

/* ---- LayerNorm and RMSNorm ---- */

static const int NORM_SHAPES[][2] = {{1, 1}, {1, 33}, {31, 33}, {33, 31}, {3, 1000}};
#define LN_EPS 1e-5f
#define RMS_EPS 1e-6f

typedef struct { float *x; const float *w, *b, *wt; float *scale, *out; int N, D, rms; } norm_st;
static double norm_loss(void *p) {
    norm_st *s = p;
    if (s->rms) {
        OK(lp_rms_scale(&cpu, s->scale, s->x, s->N, s->D, RMS_EPS));
        OK(lp_rms_apply(&cpu, s->out, s->x, s->scale, s->w, s->N, s->D));
    } else {
        OK(lp_ln_scale(&cpu, s->scale, s->x, s->N, s->D, LN_EPS));
        OK(lp_ln_apply(&cpu, s->out, s->x, s->scale, s->w, s->b, s->N, s->D));
    }
    return weighted_sum(s->wt, s->out, (size_t)s->N * s->D);
}

/* float64 derivative of sum(dy * norm(x)) at the saved scale (the op's contract: "given the
 * saved input x and scale"). Where the exact gradient nearly vanishes by cancellation (D = 1
 * RMSNorm: dx = dy eps / s^3) it is decided by the fp32 rounding of the saved scale, so the
 * reference takes that same scale; the finite differences check the derivative of the
 * scale itself. */
static void ref_norm(double *dx, const float *dy, const float *x, const float *scale, const float *w, int N, int D,
                     int rms) {
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D, *dyr = dy + (size_t)n * D;
        double mean = 0, mg = 0, mgx = 0;
        if (!rms) {
            for (int d = 0; d < D; d++) mean += xr[d];
            mean /= D;
        }
        double s = scale[n];
        for (int d = 0; d < D; d++) {
            double g = (double)dyr[d] * (w ? w[d] : 1.0), xh = (xr[d] - mean) / s;
            mg += g, mgx += g * xh;
        }
        mg /= D, mgx /= D;
        for (int d = 0; d < D; d++) {
            double g = (double)dyr[d] * (w ? w[d] : 1.0), xh = (xr[d] - mean) / s;
            dx[(size_t)n * D + d] = (g - (rms ? 0 : mg) - xh * mgx) / s;
        }
    }
}

static void run_norm(int rms) {
    const size_t NS = sizeof NORM_SHAPES / sizeof *NORM_SHAPES;
    for (size_t si = 0; si < NS; si++)
        for (int with_w = 0; with_w < 2; with_w++) {
            const int N = NORM_SHAPES[si][0], D = NORM_SHAPES[si][1];
            const size_t n = (size_t)N * D;
            const uint64_t seed = (rms ? 2000 : 1000) + si * 2 + with_w;
            float *x = lp_test_rand(n, seed, -2, 2), *w = lp_test_rand(D, seed + 1, 0.5f, 1.5f);
            float *b = lp_test_rand(D, seed + 2, -1, 1), *dy = lp_test_rand(n, seed + 3, -1, 1);
            float *hs = falloc(n);
            /* LayerNorm: every other row shifted by 100 (a mean far from zero; the step stays
             * relative to the spread). RMSNorm: every third row 100 times larger (the step
             * follows the row's rms). */
            for (int r = 0; r < N; r++)
                for (int d = 0; d < D; d++) {
                    float *xv = &x[(size_t)r * D + d];
                    if (!rms && r % 2 == 1) *xv += 100.0f;
                    if (rms && r % 3 == 0) *xv *= 100.0f;
                    hs[(size_t)r * D + d] = rms && r % 3 == 0 ? 100.0f : 1.0f;
                }
            float *scale = falloc(N), *out = falloc(n), *dx = falloc(n);
            double *ref = dalloc(n);
            const float *wp = with_w ? w : NULL;
            norm_st st = {x, wp, with_w ? b : NULL, dy, scale, out, N, D, rms};
            norm_loss(&st); /* the saved scale */
            if (rms) OK(lp_rms_backward(&cpu, dx, dy, x, scale, wp, N, D));
            else OK(lp_ln_backward(&cpu, dx, dy, x, scale, wp, N, D));
            ref_norm(ref, dy, x, scale, wp, N, D, rms);
            char label[64];
            snprintf(label, sizeof label, "N=%d D=%d%s", N, D, with_w ? " w" : "");
            check(rms ? "rms" : "ln", label, seed, dx, ref, n);
            check_fd(rms ? "rms" : "ln", label, seed, x, n, dx, norm_loss, &st, (fd_opts){hs, NULL, NULL});
            norm_loss(&st); /* the finite differences left the scale of a perturbed x */
            /* in place over dy, as a backward pass reuses its gradient buffer */
            if (rms) OK(lp_rms_backward(&cpu, dy, dy, x, scale, wp, N, D));
            else OK(lp_ln_backward(&cpu, dy, dy, x, scale, wp, N, D));
            check(rms ? "rms" : "ln", label, seed, dy, ref, n);
            free(x), free(w), free(b), free(dy), free(hs), free(scale), free(out), free(dx), free(ref);
        }
}

Test(backward, layernorm) { run_norm(0); }
Test(backward, rmsnorm) { run_norm(1); }

/* ---- element-wise ---- */

static const size_t EW_SIZES[] = {1, 31, 33, 1000};

typedef struct { float *x; const float *wt; float *out; size_t n; } gelu_st;
static double gelu_loss(void *p) {
    gelu_st *s = p;
    OK(lp_gelu(&cpu, s->out, s->x, s->n));
    return weighted_sum(s->wt, s->out, s->n);
}

Test(backward, gelu) {
    for (size_t si = 0; si < sizeof EW_SIZES / sizeof *EW_SIZES; si++) {
        const size_t n = EW_SIZES[si];
        const uint64_t seed = 3000 + si;
        float *x = lp_test_rand(n, seed, -6, 6), *dy = lp_test_rand(n, seed + 1, -1, 1);
        float *out = falloc(n), *dx = falloc(n), *hs = abs_scale(x, n);
        double *ref = dalloc(n);
        for (size_t i = 0; i < n; i++) {
            double v = x[i], s = sqrt(2 / M_PI), t = tanh(s * (v + 0.044715 * v * v * v));
            ref[i] = dy[i] * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * s * (1 + 3 * 0.044715 * v * v));
        }
        OK(lp_gelu_backward(&cpu, dx, dy, x, n));
        char label[32];
        snprintf(label, sizeof label, "n=%zu", n);
        check("gelu", label, seed, dx, ref, n);
        gelu_st st = {x, dy, out, n};
        check_fd("gelu", label, seed, x, n, dx, gelu_loss, &st, (fd_opts){hs, NULL, NULL});
        OK(lp_gelu_backward(&cpu, dy, dy, x, n)); /* in place: the header allows dx == dy */
        check("gelu", label, seed, dy, ref, n);
        free(x), free(dy), free(out), free(dx), free(hs), free(ref);
    }
}

typedef struct { float *g, *u; const float *wt; float *out; size_t n; } silu_st;
static double silu_loss(void *p) {
    silu_st *s = p;
    OK(lp_silu_mul(&cpu, s->out, s->g, s->u, s->n));
    return weighted_sum(s->wt, s->out, s->n);
}

Test(backward, silu_mul) {
    for (size_t si = 0; si < sizeof EW_SIZES / sizeof *EW_SIZES; si++) {
        const size_t n = EW_SIZES[si];
        const uint64_t seed = 3100 + si;
        /* gate in [-20, 20]: sig(g) spans 2e-9 .. 1 - 2e-9 */
        float *g = lp_test_rand(n, seed, -20, 20), *u = lp_test_rand(n, seed + 1, -3, 3);
        float *dy = lp_test_rand(n, seed + 2, -1, 1), *out = falloc(n), *dg = falloc(n), *du = falloc(n);
        float *hs = abs_scale(g, n);
        double *rg = dalloc(n), *ru = dalloc(n);
        for (size_t i = 0; i < n; i++) {
            double gv = g[i], sig = 1 / (1 + exp(-gv));
            rg[i] = (double)dy[i] * u[i] * sig * (1 + gv * (1 - sig));
            ru[i] = (double)dy[i] * gv * sig;
        }
        OK(lp_silu_mul_backward(&cpu, dg, du, dy, g, u, n));
        char label[32];
        snprintf(label, sizeof label, "n=%zu", n);
        check("silu_mul", label, seed, dg, rg, n);
        check("silu_mul", label, seed, du, ru, n);
        silu_st st = {g, u, dy, out, n};
        check_fd("silu_mul", label, seed, g, n, dg, silu_loss, &st, (fd_opts){hs, NULL, NULL});
        check_fd("silu_mul", label, seed + 1, u, n, du, silu_loss, &st, FD_PLAIN);
        free(g), free(u), free(dy), free(out), free(dg), free(du), free(hs), free(rg), free(ru);
    }
}

/* cos/sin tables [n_pos, dh/2] as the model builds them: angle p * theta^(-2i/dh) in double */
static void rope_tables(int n_pos, int dh, float **cos_t, float **sin_t) {
    int half = dh / 2;
    *cos_t = falloc((size_t)n_pos * half), *sin_t = falloc((size_t)n_pos * half);
    for (int p = 0; p < n_pos; p++)
        for (int i = 0; i < half; i++) {
            double a = p * pow(10000.0, -2.0 * i / dh);
            (*cos_t)[(size_t)p * half + i] = (float)cos(a), (*sin_t)[(size_t)p * half + i] = (float)sin(a);
        }
}

typedef struct { float *x; const float *wt, *ct, *st; float *out; int B, T, H, dh, pos0; } rope_st;
static double rope_loss(void *p) {
    rope_st *s = p;
    OK(lp_rope(&cpu, s->out, s->x, s->ct, s->st, s->B, s->T, s->H, s->dh, s->pos0));
    return weighted_sum(s->wt, s->out, (size_t)s->B * s->T * s->H * s->dh);
}

Test(backward, rope) {
    /* (B, T, H, dh, pos0): a single pair, odd lengths, a decode step far into the table */
    const int shapes[][5] = {{1, 1, 1, 2, 0}, {2, 31, 3, 64, 0}, {1, 33, 9, 34, 7}, {3, 1, 4, 16, 999}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        const int B = shapes[si][0], T = shapes[si][1], H = shapes[si][2], dh = shapes[si][3], pos0 = shapes[si][4];
        const int half = dh / 2, n_pos = pos0 + T + 3;
        const size_t n = (size_t)B * T * H * dh;
        const uint64_t seed = 3200 + si;
        float *x = lp_test_rand(n, seed, -3, 3), *dy = lp_test_rand(n, seed + 1, -1, 1);
        float *out = falloc(n), *dx = falloc(n), *ct, *st;
        rope_tables(n_pos, dh, &ct, &st);
        double *ref = dalloc(n);
        for (size_t r = 0; r < n / dh; r++) { /* r = (b*T + t)*H + h */
            int p = pos0 + (int)(r / H % T);
            for (int i = 0; i < half; i++) {
                double c = ct[(size_t)p * half + i], s = st[(size_t)p * half + i];
                double g1 = dy[r * dh + i], g2 = dy[r * dh + i + half];
                ref[r * dh + i] = g1 * c + g2 * s;
                ref[r * dh + i + half] = g2 * c - g1 * s;
            }
        }
        OK(lp_rope_backward(&cpu, dx, dy, ct, st, B, T, H, dh, pos0));
        char label[64];
        snprintf(label, sizeof label, "B=%d T=%d H=%d dh=%d pos0=%d", B, T, H, dh, pos0);
        check("rope", label, seed, dx, ref, n);
        rope_st rs = {x, dy, ct, st, out, B, T, H, dh, pos0};
        check_fd("rope", label, seed, x, n, dx, rope_loss, &rs, FD_PLAIN);
        OK(lp_rope_backward(&cpu, dy, dy, ct, st, B, T, H, dh, pos0)); /* in place */
        check("rope", label, seed, dy, ref, n);
        /* the transpose of a rotation is its inverse: backward(forward(x)) = x */
        OK(lp_rope(&cpu, out, x, ct, st, B, T, H, dh, pos0));
        OK(lp_rope_backward(&cpu, out, out, ct, st, B, T, H, dh, pos0));
        for (size_t i = 0; i < n; i++) ref[i] = x[i];
        check("rope inverse", label, seed, out, ref, n);
        free(x), free(dy), free(out), free(dx), free(ct), free(st), free(ref);
    }
}

/* ---- attention ---- */

typedef struct attn_shape { int B, T, H, Hkv, dh; } attn_shape;
/* one token and dh = 1; GQA with dh 16; full heads with dh 64; 100 tokens with GQA; dh 33 */
static const attn_shape ATTN_SHAPES[] = {
    {1, 1, 1, 1, 1}, {2, 31, 4, 2, 16}, {1, 33, 4, 4, 64}, {1, 100, 4, 2, 64}, {2, 17, 6, 3, 33},
};
#define N_ATTN (sizeof ATTN_SHAPES / sizeof *ATTN_SHAPES)

static void attn_label(char *buf, size_t n, attn_shape s) {
    snprintf(buf, n, "B=%d T=%d H=%d Hkv=%d dh=%d", s.B, s.T, s.H, s.Hkv, s.dh);
}
static size_t qi(attn_shape s, int b, int t, int h, int d) { return (((size_t)b * s.T + t) * s.H + h) * s.dh + d; }
static size_t ki(attn_shape s, int b, int t, int g, int d) { return (((size_t)b * s.T + t) * s.Hkv + g) * s.dh + d; }
static size_t si(attn_shape s, int b, int h, int t, int j) { return (((size_t)b * s.H + h) * s.T + t) * s.T + j; }

/* float64 backward of the fused attention: dq, dk, dv from dz */
static void ref_attention_backward(attn_shape s, const float *q, const float *k, const float *v, const float *dz,
                                   double *dq, double *dk, double *dv) {
    const int group = s.H / s.Hkv;
    const double sc = 1 / sqrt(s.dh);
    memset(dk, 0, (size_t)s.B * s.T * s.Hkv * s.dh * sizeof(double));
    memset(dv, 0, (size_t)s.B * s.T * s.Hkv * s.dh * sizeof(double));
    double *p = dalloc(s.T), *dp = dalloc(s.T);
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int t = 0; t < s.T; t++) {
                int g = h / group;
                double mx = -INFINITY, sum = 0, D = 0;
                for (int j = 0; j <= t; j++) {
                    double a = 0, e = 0;
                    for (int d = 0; d < s.dh; d++) {
                        a += (double)q[qi(s, b, t, h, d)] * k[ki(s, b, j, g, d)];
                        e += (double)dz[qi(s, b, t, h, d)] * v[ki(s, b, j, g, d)];
                    }
                    p[j] = a * sc, dp[j] = e;
                    mx = fmax(mx, p[j]);
                }
                for (int j = 0; j <= t; j++) sum += (p[j] = exp(p[j] - mx));
                for (int j = 0; j <= t; j++) p[j] /= sum, D += p[j] * dp[j];
                for (int d = 0; d < s.dh; d++) dq[qi(s, b, t, h, d)] = 0;
                for (int j = 0; j <= t; j++) {
                    double ds = p[j] * (dp[j] - D);
                    for (int d = 0; d < s.dh; d++) {
                        dq[qi(s, b, t, h, d)] += ds * k[ki(s, b, j, g, d)] * sc;
                        dk[ki(s, b, j, g, d)] += ds * q[qi(s, b, t, h, d)] * sc;
                        dv[ki(s, b, j, g, d)] += p[j] * dz[qi(s, b, t, h, d)];
                    }
                }
            }
    free(p), free(dp);
}

typedef struct { float *q, *k, *v; const float *wt; float *z; attn_shape s; } attn_st;
static double attn_loss(void *p) {
    attn_st *a = p;
    OK(lp_attention(&cpu, a->z, a->q, a->k, a->v, a->s.B, a->s.T, a->s.H, a->s.Hkv, a->s.dh));
    return weighted_sum(a->wt, a->z, (size_t)a->s.B * a->s.T * a->s.H * a->s.dh);
}

Test(backward, attention_fused) {
    for (size_t i = 0; i < N_ATTN; i++) {
        const attn_shape s = ATTN_SHAPES[i];
        const uint64_t seed = 4000 + i;
        const size_t nq = (size_t)s.B * s.T * s.H * s.dh, nk = (size_t)s.B * s.T * s.Hkv * s.dh;
        const size_t ns = (size_t)s.B * s.H * s.T * s.T;
        float *q = lp_test_rand(nq, seed, -2, 2), *k = lp_test_rand(nk, seed + 1, -2, 2);
        float *v = lp_test_rand(nk, seed + 2, -1, 1), *dz = lp_test_rand(nq, seed + 3, -1, 1);
        float *dq = falloc(nq), *dk = falloc(nk), *dv = falloc(nk), *z = falloc(nq);
        double *rq = dalloc(nq), *rk = dalloc(nk), *rv = dalloc(nk);
        OK(lp_attention_backward(&cpu, dq, dk, dv, dz, q, k, v, s.B, s.T, s.H, s.Hkv, s.dh));
        ref_attention_backward(s, q, k, v, dz, rq, rk, rv);
        char label[80];
        attn_label(label, sizeof label, s);
        check("attention", label, seed, dq, rq, nq);
        check("attention", label, seed, dk, rk, nk);
        check("attention", label, seed, dv, rv, nk);

        attn_st st = {q, k, v, dz, z, s};
        check_fd("attention", label, seed, q, nq, dq, attn_loss, &st, FD_PLAIN);
        check_fd("attention", label, seed + 1, k, nk, dk, attn_loss, &st, FD_PLAIN);
        check_fd("attention", label, seed + 2, v, nk, dv, attn_loss, &st, FD_PLAIN);

        /* the hookable three steps, backward: attn_apply -> softmax_rows -> attn_scores */
        float *sc = falloc(ns), *pat = falloc(ns), *dpat = falloc(ns), *dsc = falloc(ns);
        float *dq3 = falloc(nq), *dk3 = falloc(nk), *dv3 = falloc(nk);
        OK(lp_attn_scores(&cpu, sc, q, k, s.B, s.T, s.H, s.Hkv, s.dh));
        OK(lp_softmax_rows(&cpu, pat, sc, (size_t)s.B * s.H * s.T, s.T));
        OK(lp_attn_apply_backward(&cpu, dpat, dv3, dz, pat, v, s.B, s.T, s.H, s.Hkv, s.dh));
        OK(lp_softmax_rows_backward(&cpu, dsc, dpat, pat, (size_t)s.B * s.H * s.T, s.T));
        OK(lp_attn_scores_backward(&cpu, dq3, dk3, dsc, q, k, s.B, s.T, s.H, s.Hkv, s.dh));
        double *r = dalloc(nq);
        for (size_t j = 0; j < nq; j++) r[j] = dq[j];
        check("attention vs 3 steps", label, seed, dq3, r, nq);
        for (size_t j = 0; j < nk; j++) r[j] = dk[j];
        check("attention vs 3 steps", label, seed, dk3, r, nk);
        for (size_t j = 0; j < nk; j++) r[j] = dv[j];
        check("attention vs 3 steps", label, seed, dv3, r, nk);
        free(q), free(k), free(v), free(dz), free(dq), free(dk), free(dv), free(z), free(rq), free(rk), free(rv);
        free(sc), free(pat), free(dpat), free(dsc), free(dq3), free(dk3), free(dv3), free(r);
    }
}

/* attn_apply: pattern_kind 0 is a causal softmax pattern, 1 a dense random one with weight
 * above the diagonal and exact zeros (an edited hook_pattern, applied as given). */
typedef struct { float *pat, *v; const float *wt; float *z; attn_shape s; } apply_st;
static double apply_loss(void *p) {
    apply_st *a = p;
    OK(lp_attn_apply(&cpu, a->z, a->pat, a->v, a->s.B, a->s.T, a->s.H, a->s.Hkv, a->s.dh));
    return weighted_sum(a->wt, a->z, (size_t)a->s.B * a->s.T * a->s.H * a->s.dh);
}

Test(backward, attn_apply) {
    for (size_t i = 0; i < N_ATTN; i++)
        for (int kind = 0; kind < 2; kind++) {
            const attn_shape s = ATTN_SHAPES[i];
            const uint64_t seed = 4100 + i * 2 + kind;
            const size_t nq = (size_t)s.B * s.T * s.H * s.dh, nk = (size_t)s.B * s.T * s.Hkv * s.dh;
            const size_t ns = (size_t)s.B * s.H * s.T * s.T;
            float *q = lp_test_rand(nq, seed, -2, 2), *k = lp_test_rand(nk, seed + 1, -2, 2);
            float *v = lp_test_rand(nk, seed + 2, -1, 1), *dz = lp_test_rand(nq, seed + 3, -1, 1);
            float *pat = falloc(ns), *dpat = falloc(ns), *dv = falloc(nk), *z = falloc(nq);
            if (kind == 0) {
                OK(lp_attn_scores(&cpu, dpat, q, k, s.B, s.T, s.H, s.Hkv, s.dh));
                OK(lp_softmax_rows(&cpu, pat, dpat, (size_t)s.B * s.H * s.T, s.T));
            } else {
                lp_test_fill(pat, ns, seed + 4, -0.5f, 1.0f);
                for (size_t j = 0; j < ns; j++)
                    if (pat[j] < 0) pat[j] = 0;
            }
            OK(lp_attn_apply_backward(&cpu, dpat, dv, dz, pat, v, s.B, s.T, s.H, s.Hkv, s.dh));
            double *rp = dalloc(ns), *rv = dalloc(nk);
            memset(rv, 0, nk * sizeof(double));
            const int group = s.H / s.Hkv;
            for (int b = 0; b < s.B; b++)
                for (int h = 0; h < s.H; h++)
                    for (int t = 0; t < s.T; t++)
                        for (int j = 0; j < s.T; j++) {
                            double a = 0, pw = pat[si(s, b, h, t, j)];
                            for (int d = 0; d < s.dh; d++) {
                                a += (double)dz[qi(s, b, t, h, d)] * v[ki(s, b, j, h / group, d)];
                                rv[ki(s, b, j, h / group, d)] += pw * dz[qi(s, b, t, h, d)];
                            }
                            rp[si(s, b, h, t, j)] = a;
                        }
            char label[96];
            attn_label(label, sizeof label, s);
            strcat(label, kind ? " dense" : " causal");
            check("attn_apply", label, seed, dpat, rp, ns);
            check("attn_apply", label, seed, dv, rv, nk);
            apply_st st = {pat, v, dz, z, s};
            check_fd("attn_apply", label, seed, pat, ns, dpat, apply_loss, &st, FD_PLAIN);
            check_fd("attn_apply", label, seed + 1, v, nk, dv, apply_loss, &st, FD_PLAIN);
            free(q), free(k), free(v), free(dz), free(pat), free(dpat), free(dv), free(z), free(rp), free(rv);
        }
}

typedef struct { float *x; const float *wt; float *y; size_t rows; int cols; } smax_st;
static double smax_loss(void *p) {
    smax_st *s = p;
    OK(lp_softmax_rows(&cpu, s->y, s->x, s->rows, s->cols));
    return weighted_sum(s->wt, s->y, s->rows * s->cols);
}
static int skip_masked(const void *x, size_t i) { return isinf(((const float *)x)[i]); }

Test(backward, softmax_rows) {
    const int shapes[][2] = {{1, 1}, {31, 33}, {33, 31}, {4, 1000}};
    for (size_t sh = 0; sh < sizeof shapes / sizeof *shapes; sh++) {
        const size_t rows = shapes[sh][0];
        const int cols = shapes[sh][1];
        const size_t n = rows * cols;
        const uint64_t seed = 4200 + sh;
        /* entries in [-4, 4], about a quarter -inf (masked keys, never column 0), and the
         * third row fully masked */
        float *x = lp_test_rand(n, seed, -4, 4), *dy = lp_test_rand(n, seed + 1, -1, 1);
        uint64_t st = seed + 7;
        for (size_t r = 0; r < rows; r++)
            for (int j = 0; j < cols; j++)
                if ((j > 0 && lp_test_next(&st) % 4 == 0) || r == 2) x[r * cols + j] = -INFINITY;
        float *y = falloc(n), *dx = falloc(n);
        OK(lp_softmax_rows(&cpu, y, x, rows, cols));
        for (size_t j = 0; j < n; j++) /* a non-finite gradient on a masked entry must not spread */
            if (isinf(x[j]) && j % 3 == 0) dy[j] = NAN;
        OK(lp_softmax_rows_backward(&cpu, dx, dy, y, rows, cols));
        double *ref = dalloc(n);
        for (size_t r = 0; r < rows; r++) {
            double mx = -INFINITY, sum = 0, dot = 0;
            for (int j = 0; j < cols; j++) mx = fmax(mx, x[r * cols + j]);
            for (int j = 0; j < cols; j++) sum += mx == -INFINITY ? 0 : exp(x[r * cols + j] - mx);
            for (int j = 0; j < cols; j++) {
                double p = mx == -INFINITY ? 0 : exp(x[r * cols + j] - mx) / sum;
                if (p != 0) dot += p * dy[r * cols + j];
            }
            for (int j = 0; j < cols; j++) {
                double p = mx == -INFINITY ? 0 : exp(x[r * cols + j] - mx) / sum;
                ref[r * cols + j] = p == 0 ? 0 : p * (dy[r * cols + j] - dot);
            }
        }
        char label[64];
        snprintf(label, sizeof label, "rows=%zu cols=%d", rows, cols);
        check("softmax_rows", label, seed, dx, ref, n);
        for (size_t j = 0; j < n; j++)
            if (isnan(dy[j])) dy[j] = 0; /* the loss weights must be finite */
        smax_st ss = {x, dy, y, rows, cols};
        check_fd("softmax_rows", label, seed, x, n, dx, smax_loss, &ss, (fd_opts){NULL, skip_masked, x});
        OK(lp_softmax_rows(&cpu, y, x, rows, cols));
        OK(lp_softmax_rows_backward(&cpu, dy, dy, y, rows, cols)); /* in place over dy */
        check("softmax_rows", label, seed, dy, ref, n);
        free(x), free(dy), free(y), free(dx), free(ref);
    }
}

/* attn_scores: the loss weighs the unmasked scores only (masked ones are a constant -inf) */
typedef struct { float *q, *k; const float *wt; float *sc; attn_shape s; } scores_st;
static double scores_loss(void *p) {
    scores_st *a = p;
    const attn_shape s = a->s;
    OK(lp_attn_scores(&cpu, a->sc, a->q, a->k, s.B, s.T, s.H, s.Hkv, s.dh));
    double L = 0;
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int t = 0; t < s.T; t++)
                for (int j = 0; j <= t; j++) L += (double)a->wt[si(s, b, h, t, j)] * a->sc[si(s, b, h, t, j)];
    return L;
}

Test(backward, attn_scores) {
    for (size_t i = 0; i < N_ATTN; i++) {
        const attn_shape s = ATTN_SHAPES[i];
        const uint64_t seed = 4300 + i;
        const size_t nq = (size_t)s.B * s.T * s.H * s.dh, nk = (size_t)s.B * s.T * s.Hkv * s.dh;
        const size_t ns = (size_t)s.B * s.H * s.T * s.T;
        float *q = lp_test_rand(nq, seed, -2, 2), *k = lp_test_rand(nk, seed + 1, -2, 2);
        float *ds = lp_test_rand(ns, seed + 2, -1, 1), *sc = falloc(ns), *dq = falloc(nq), *dk = falloc(nk);
        for (int b = 0; b < s.B; b++) /* masked entries must be ignored: poison them */
            for (int h = 0; h < s.H; h++)
                for (int t = 0; t < s.T; t++)
                    for (int j = t + 1; j < s.T; j++) ds[si(s, b, h, t, j)] = NAN;
        OK(lp_attn_scores_backward(&cpu, dq, dk, ds, q, k, s.B, s.T, s.H, s.Hkv, s.dh));
        double *rq = dalloc(nq), *rk = dalloc(nk);
        memset(rq, 0, nq * sizeof(double)), memset(rk, 0, nk * sizeof(double));
        const int group = s.H / s.Hkv;
        const double scl = 1 / sqrt(s.dh);
        for (int b = 0; b < s.B; b++)
            for (int h = 0; h < s.H; h++)
                for (int t = 0; t < s.T; t++)
                    for (int j = 0; j <= t; j++) {
                        double gs = ds[si(s, b, h, t, j)] * scl;
                        for (int d = 0; d < s.dh; d++) {
                            rq[qi(s, b, t, h, d)] += gs * k[ki(s, b, j, h / group, d)];
                            rk[ki(s, b, j, h / group, d)] += gs * q[qi(s, b, t, h, d)];
                        }
                    }
        char label[80];
        attn_label(label, sizeof label, s);
        check("attn_scores", label, seed, dq, rq, nq);
        check("attn_scores", label, seed, dk, rk, nk);
        scores_st st = {q, k, ds, sc, s};
        check_fd("attn_scores", label, seed, q, nq, dq, scores_loss, &st, FD_PLAIN);
        check_fd("attn_scores", label, seed + 1, k, nk, dk, scores_loss, &st, FD_PLAIN);
        free(q), free(k), free(ds), free(sc), free(dq), free(dk), free(rq), free(rk);
    }
}

/* ---- cross-entropy ---- */

typedef struct { float *lg; const int32_t *tg; const float *scale; float *loss; int N, V; } xent_st;
static double xent_loss(void *p) {
    xent_st *s = p;
    OK(lp_cross_entropy(&cpu, s->loss, s->lg, s->tg, s->N, s->V));
    return weighted_sum(s->scale, s->loss, s->N);
}

Test(backward, xent) {
    const int shapes[][2] = {{1, 1}, {31, 33}, {33, 31}, {4, 1000}};
    for (size_t sh = 0; sh < sizeof shapes / sizeof *shapes; sh++) {
        const int N = shapes[sh][0], V = shapes[sh][1];
        const uint64_t seed = 4400 + sh;
        uint64_t st = seed + 5;
        float *lg = lp_test_rand((size_t)N * V, seed, -8, 8), *scale = lp_test_rand(N, seed + 1, 0.5f, 2);
        float *dl = falloc((size_t)N * V), *loss = falloc(N);
        int32_t *tg = xmalloc(N * sizeof(int32_t));
        for (int n = 0; n < N; n++) tg[n] = n % 5 == 4 ? -1 : (int32_t)(lp_test_next(&st) % V);
        OK(lp_xent_backward(&cpu, dl, lg, tg, scale, N, V));
        double *ref = dalloc((size_t)N * V);
        for (int n = 0; n < N; n++) {
            const float *r = lg + (size_t)n * V;
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j < V; j++) mx = fmax(mx, r[j]);
            for (int j = 0; j < V; j++) sum += exp(r[j] - mx);
            for (int j = 0; j < V; j++)
                ref[(size_t)n * V + j] = tg[n] < 0 ? 0 : scale[n] * (exp(r[j] - mx) / sum - (j == tg[n]));
        }
        char label[48];
        snprintf(label, sizeof label, "N=%d V=%d", N, V);
        check("xent", label, seed, dl, ref, (size_t)N * V);
        xent_st xs = {lg, tg, scale, loss, N, V};
        float *hs = abs_scale(lg, (size_t)N * V);
        check_fd("xent", label, seed, lg, (size_t)N * V, dl, xent_loss, &xs, (fd_opts){hs, NULL, NULL});
        free(lg), free(scale), free(dl), free(loss), free(tg), free(ref), free(hs);
    }
}

Test(backward, xent_out_of_range_target_gives_nan) {
    float lg[3] = {1, 2, 3}, dl[3], scale[1] = {1};
    int32_t tg[1] = {3};
    OK(lp_xent_backward(&cpu, dl, lg, tg, scale, 1, 3));
    for (int j = 0; j < 3; j++) cr_expect(isnan(dl[j]), "entry %d is %g", j, dl[j]);
}

Test(backward, bad_arguments_are_errors) {
    float x[8] = {0};
    cr_expect_eq(lp_ln_backward(&cpu, x, x, x, x, NULL, 1, 0), LP_ERR_ARG);                      /* D = 0 */
    cr_expect_eq(lp_rms_backward(&cpu, x, x, x, NULL, NULL, 1, 4), LP_ERR_ARG);                  /* no scale */
    cr_expect_eq(lp_silu_mul_backward(&cpu, x, x, x, x, x, 4), LP_ERR_ARG);                      /* dgate == dup */
    cr_expect_eq(lp_rope_backward(&cpu, x, x, x, x, 1, 1, 1, 3, 0), LP_ERR_ARG);                 /* odd head dim */
    cr_expect_eq(lp_attention_backward(&cpu, x, x + 1, x + 2, x, x, x, x, 1, 1, 3, 2, 1), LP_ERR_ARG); /* 3 over 2 */
    cr_expect_eq(lp_attention_backward(&cpu, x, x + 2, x + 4, x, x + 6, x + 6, x + 6, 1, 1, 1, 1, 2),
                 LP_ERR_ARG); /* dq is dz */
    cr_expect_eq(lp_attention_backward(&cpu, x, x + 1, x + 2, x, x, x, x, 1, 1, 1, 1, 257), LP_ERR_ARG); /* dh */
    cr_expect_eq(lp_attn_scores_backward(&cpu, x, x, x, x, x, 1, 1, 1, 1, 1), LP_ERR_ARG);       /* dq == dk */
    cr_expect_eq(lp_softmax_rows_backward(&cpu, x, x, x, 1, 4), LP_ERR_ARG);                     /* dx == y */
    cr_expect_eq(lp_xent_backward(&cpu, x, x, (int32_t *)x, NULL, 1, 4), LP_ERR_ARG);            /* no scale */
}
