/* test_sae_ops.c: every SAE op of include/loupe/sae_ops.h on the CPU (through the public
 * dispatch) against an independent float64 reference written here, on awkward sizes
 * (1, 31, 33, 1000 and the d_sae = 24576 of the benchmark where it matters); selection
 * on inputs full of ties (and -0 beside +0); and every gradient op against central finite
 * differences of a scalar loss.
 *
 * Finite differences: L = sum(w * out) with random weights w, accumulated in double over
 * the outputs of the F32 forward op itself (lp_sae_decode_sparse, lp_matmul, lp_sae_relu,
 * lp_sae_jumprelu), so the check ties each backward op to the forward op it differentiates,
 * not to a reimplementation. Each sampled input is moved by h = 1e-3 (rounded to float;
 * the quotient uses the step actually taken). Every forward here is linear or piecewise
 * linear in the perturbed input, so the difference quotient is exact up to the fp32
 * rounding of the few outputs that change: ~1e-7 relative per output / 2h ~ 1e-4
 * absolute, nmse ~1e-9; budget 1e-6. Points within 2h of a kink are not sampled.
 * The JumpReLU threshold gradient is a straight-through pseudo-gradient: it is checked
 * against the header's formula evaluated in double instead. */
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
    {"relu_grad", 0},       {"jumprelu dpre", 0},      {"jumprelu dtheta", 1e-12}, {"adam", 1e-12},
    {"rows_unit_norm", 1e-13}, {"rows_remove_parallel", 1e-12}, {"rows_norm", 1e-13},
    /* recon_sums: max relative error of each of the four sums; both sides sum up to ~1e5
     * terms in double, whose worst-case relative error is n * 2^-53 ~ 1e-11 */
    {"recon_sums", 1e-10},
    {"fire_counts", 0},     {"finite differences", 1e-6},
};
static double budget(const char *op) {
    for (size_t i = 0; i < sizeof BUDGET / sizeof *BUDGET; i++)
        if (strcmp(BUDGET[i].op, op) == 0) return BUDGET[i].nmse;
    cr_assert_fail("no budget for %s", op);
    return 0;
}

#define FD_H 1e-3
#define FD_SAMPLES 40

static lp_ctx cpu;
static void setup(void) { cr_assert_eq(lp_ctx_init(&cpu, LP_CPU, LP_F32), LP_OK); }
TestSuite(sae_ops, .init = setup);

#define OK(expr)                                                                            \
    do {                                                                                    \
        lp_status s_ = (expr);                                                              \
        cr_assert_eq(s_, LP_OK, "%s: %s: %s", #expr, lp_status_name(s_), lp_last_error());  \
    } while (0)

static void check(const char *op, const char *label, uint64_t seed, const float *got, const double *ref, size_t n) {
    char what[128];
    snprintf(what, sizeof what, "%s %s", op, label);
    lp_cmp c = lp_compare(got, ref, n);
    const double bud = budget(op);
    if (bud == 0) LP_EXPECT_WITHIN(what, seed, c, max_abs, 0.0); /* selections, masks: bit for bit */
    else LP_EXPECT_WITHIN(what, seed, c, nmse, bud);
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    cr_assert(p != NULL);
    return p;
}
static double *dalloc(size_t n) { return xmalloc(n * sizeof(double)); }

/* Distinct random latents per row (as a top-k gives): idx [N,K] in [0,S), K <= S. */
static int32_t *rand_idx(int N, int K, int S, uint64_t seed) {
    int32_t *idx = xmalloc((size_t)N * K * sizeof(int32_t));
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

/* Values on a grid of `step` in [lo, hi]: ties everywhere; every 7th zero becomes -0. */
static float *rand_ties(size_t n, uint64_t seed, float lo, float hi, float step) {
    float *x = lp_test_rand(n, seed, lo, hi);
    for (size_t i = 0; i < n; i++) {
        x[i] = roundf(x[i] / step) * step;
        if (x[i] == 0.0f && i % 7 == 0) x[i] = -0.0f;
    }
    return x;
}

/* ---- finite differences ---- */

typedef double (*loss_fn)(void *st);

static double fd_at(float *p, loss_fn L, void *st) {
    const float v = *p, up = (float)((double)v + FD_H), dn = (float)((double)v - FD_H);
    *p = up;
    const double lu = L(st);
    *p = dn;
    const double ld = L(st);
    *p = v;
    return (lu - ld) / ((double)up - (double)dn);
}

static double weighted_sum(const float *w, const float *out, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)w[i] * out[i];
    return s;
}

/* Compares analytic gradients got[i] with finite differences fd[i] at the sampled points. */
static void check_fd(const char *label, uint64_t seed, const float *got, const double *fd, size_t n) {
    char what[128];
    snprintf(what, sizeof what, "fd %s", label);
    LP_EXPECT_WITHIN(what, seed, lp_compare(got, fd, n), nmse, budget("finite differences"));
}

/* ---- weight-gradient GEMM and column sums ---- */

static const int GEMM_SHAPES[][3] = {{1, 1, 1}, {31, 33, 1}, {33, 31, 1000}, {1000, 33, 31}, {7, 1000, 33}};

Test(sae_ops, matmul_at) {
    for (size_t si = 0; si < sizeof GEMM_SHAPES / sizeof *GEMM_SHAPES; si++)
        for (int beta = 0; beta < 2; beta++) {
            const int N = GEMM_SHAPES[si][0], K = GEMM_SHAPES[si][1], M = GEMM_SHAPES[si][2];
            const uint64_t seed = 1000 + si * 2 + beta;
            float *a = lp_test_rand((size_t)N * K, seed, -1, 1), *b = lp_test_rand((size_t)N * M, seed + 1, -1, 1);
            float *out = lp_test_rand((size_t)K * M, seed + 2, -1, 1);
            double *ref = dalloc((size_t)K * M);
            for (int k = 0; k < K; k++)
                for (int m = 0; m < M; m++) {
                    double acc = beta ? out[(size_t)k * M + m] : 0;
                    for (int n = 0; n < N; n++) acc += (double)a[(size_t)n * K + k] * b[(size_t)n * M + m];
                    ref[(size_t)k * M + m] = acc;
                }
            if (!beta) /* beta = 0 must not read out */
                for (size_t i = 0; i < (size_t)K * M; i++) out[i] = NAN;
            OK(lp_matmul_at(&cpu, out, a, b, N, K, M, (float)beta));
            char label[64];
            snprintf(label, sizeof label, "N=%d K=%d M=%d beta=%d", N, K, M, beta);
            check("matmul_at", label, seed, out, ref, (size_t)K * M);
            free(a), free(b), free(out), free(ref);
        }
}

static const int COL_SHAPES[][2] = {{1, 1}, {31, 33}, {1000, 31}, {33, 1000}, {4096, 3}, {3, 24576}};

Test(sae_ops, col_sum) {
    for (size_t si = 0; si < sizeof COL_SHAPES / sizeof *COL_SHAPES; si++)
        for (int beta = 0; beta < 2; beta++) {
            const int N = COL_SHAPES[si][0], M = COL_SHAPES[si][1];
            const uint64_t seed = 1100 + si * 2 + beta;
            float *x = lp_test_rand((size_t)N * M, seed, -1, 1), *out = lp_test_rand(M, seed + 1, -1, 1);
            double *ref = dalloc(M);
            for (int m = 0; m < M; m++) {
                ref[m] = beta ? out[m] : 0;
                for (int n = 0; n < N; n++) ref[m] += x[(size_t)n * M + m];
            }
            if (!beta)
                for (int m = 0; m < M; m++) out[m] = NAN;
            OK(lp_col_sum(&cpu, out, x, N, M, (float)beta));
            char label[64];
            snprintf(label, sizeof label, "N=%d M=%d beta=%d", N, M, beta);
            check("col_sum", label, seed, out, ref, M);
            free(x), free(out), free(ref);
        }
}

Test(sae_ops, matmul_at_and_col_sum_of_zero_rows) {
    float out[6] = {1, 2, 3, 4, 5, 6}, x[1] = {0};
    OK(lp_matmul_at(&cpu, out, x, x, 0, 2, 3, 1.0f));
    for (int i = 0; i < 6; i++) cr_expect(out[i] == i + 1, "beta = 1 with N = 0 must leave out");
    OK(lp_matmul_at(&cpu, out, NULL, NULL, 0, 2, 3, 0.0f));
    for (int i = 0; i < 6; i++) cr_expect(out[i] == 0, "beta = 0 with N = 0 must zero out");
    out[0] = 7;
    OK(lp_col_sum(&cpu, out, NULL, 0, 1, 1.0f));
    cr_expect(out[0] == 7);
    OK(lp_col_sum(&cpu, out, NULL, 0, 1, 0.0f));
    cr_expect(out[0] == 0);
}

/* matmul_at as the weight gradient and col_sum as the bias gradient of
 * L = sum(wt * (a @ W + bias)), forward through lp_matmul. */
typedef struct { const float *a, *wt; float *W, *bias, *out; int N, K, M; } lin_st;
static double lin_loss(void *p) {
    lin_st *s = p;
    cr_assert_eq(lp_matmul(&cpu, s->out, s->a, s->W, s->bias, s->N, s->K, s->M, 0), LP_OK);
    return weighted_sum(s->wt, s->out, (size_t)s->N * s->M);
}

Test(sae_ops, matmul_at_and_col_sum_finite_differences) {
    const int N = 31, K = 33, M = 17;
    const uint64_t seed = 1200;
    float *a = lp_test_rand((size_t)N * K, seed, -1, 1), *wt = lp_test_rand((size_t)N * M, seed + 1, -1, 1);
    float *W = lp_test_rand((size_t)K * M, seed + 2, -1, 1), *bias = lp_test_rand(M, seed + 3, -1, 1);
    float *out = xmalloc((size_t)N * M * 4), *dW = xmalloc((size_t)K * M * 4), *db = xmalloc(M * 4);
    OK(lp_matmul_at(&cpu, dW, a, wt, N, K, M, 0.0f));
    OK(lp_col_sum(&cpu, db, wt, N, M, 0.0f));
    lin_st st = {a, wt, W, bias, out, N, K, M};
    float got[FD_SAMPLES];
    double fd[FD_SAMPLES];
    uint64_t s = seed;
    for (int i = 0; i < FD_SAMPLES; i++) {
        const size_t at = lp_test_next(&s) % ((size_t)K * M);
        got[i] = dW[at];
        fd[i] = fd_at(&W[at], lin_loss, &st);
    }
    check_fd("matmul_at (dL/dW)", seed, got, fd, FD_SAMPLES);
    for (int m = 0; m < M; m++) {
        got[m] = db[m];
        fd[m] = fd_at(&bias[m], lin_loss, &st);
    }
    check_fd("col_sum (dL/dbias)", seed, got, fd, M);
    free(a), free(wt), free(W), free(bias), free(out), free(dW), free(db);
}

/* ---- top-k ---- */

/* Reference order, written independently of the op: larger value first, -0 below +0,
 * then the lower index. */
static const float *g_row;
static int ref_cmp(const void *pa, const void *pb) {
    const int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    const double va = g_row[a], vb = g_row[b];
    if (va != vb) return va > vb ? -1 : 1;
    if (va == 0 && signbit(g_row[a]) != signbit(g_row[b])) return signbit(g_row[a]) ? 1 : -1;
    return a < b ? -1 : 1;
}

static void topk_reference(int32_t *ridx, double *rval, const float *pre, int N, int S, int K) {
    int32_t *order = xmalloc((size_t)S * sizeof(int32_t));
    for (int n = 0; n < N; n++) {
        g_row = pre + (size_t)n * S;
        for (int i = 0; i < S; i++) order[i] = i;
        qsort(order, S, sizeof *order, ref_cmp);
        for (int j = 0; j < K; j++) {
            ridx[(size_t)n * K + j] = order[j];
            rval[(size_t)n * K + j] = g_row[order[j]] > 0 ? g_row[order[j]] : 0;
        }
    }
    free(order);
}

Test(sae_ops, topk_with_ties) {
    /* (N, S, K): single entry, K = S, odd sizes, the benchmark's d_sae and k */
    static const int shapes[][3] = {{1, 1, 1}, {3, 31, 31}, {5, 33, 7}, {4, 1000, 32}, {2, 1000, 1}, {3, 24576, 32}, {2, 5000, 300}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
        for (int variant = 0; variant < 3; variant++) { /* 0: coarse grid; 1: continuous; 2: all negative */
            const int N = shapes[si][0], S = shapes[si][1], K = shapes[si][2];
            const uint64_t seed = 1300 + si * 3 + variant;
            const size_t n = (size_t)N * S;
            float *pre = variant == 1 ? lp_test_rand(n, seed, -3, 3) : rand_ties(n, seed, variant == 2 ? -4.0f : -2.0f, variant == 2 ? -0.25f : 2.0f, 0.25f);
            if (variant == 0 && N > 1) /* one row of one repeated value: the first K indices win */
                for (int i = 0; i < S; i++) pre[(size_t)S + i] = 0.5f;
            int32_t *idx = xmalloc((size_t)N * K * 4), *ridx = xmalloc((size_t)N * K * 4);
            float *val = xmalloc((size_t)N * K * 4);
            double *rval = dalloc((size_t)N * K), *didx = dalloc((size_t)N * K);
            float *fidx = xmalloc((size_t)N * K * 4);
            topk_reference(ridx, rval, pre, N, S, K);
            OK(lp_sae_topk(&cpu, idx, val, pre, N, S, K));
            for (size_t i = 0; i < (size_t)N * K; i++) didx[i] = ridx[i], fidx[i] = (float)idx[i];
            char label[64];
            snprintf(label, sizeof label, "N=%d S=%d K=%d %s", N, S, K, variant == 0 ? "ties" : variant == 1 ? "continuous" : "negative");
            check("topk idx", label, seed, fidx, didx, (size_t)N * K);
            check("topk val", label, seed, val, rval, (size_t)N * K);
            free(pre), free(idx), free(ridx), free(val), free(rval), free(didx), free(fidx);
        }
}

/* ---- the BatchTopK threshold ---- */

static int desc_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x > y ? -1 : x < y ? 1 : 0;
}

/* t = the (count+1)-th largest of relu(pre), 0 if there are not that many positives. */
static double kth_reference(const float *pre, size_t n, size_t count) {
    double *pos = dalloc(n);
    size_t P = 0;
    for (size_t i = 0; i < n; i++)
        if (pre[i] > 0) pos[P++] = pre[i];
    qsort(pos, P, sizeof *pos, desc_double);
    const double t = count < P ? pos[count] : 0;
    free(pos);
    return t;
}

Test(sae_ops, kth_largest) {
    static const size_t sizes[] = {1, 31, 1000, 4096 * 33};
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
        for (int variant = 0; variant < 3; variant++) { /* ties, continuous, all <= 0 */
            const size_t n = sizes[si];
            const uint64_t seed = 1400 + si * 3 + variant;
            float *pre = variant == 1 ? lp_test_rand(n, seed, -2, 3) : rand_ties(n, seed, variant == 2 ? -3.0f : -2.0f, variant == 2 ? 0.0f : 3.0f, 0.125f);
            size_t P = 0;
            for (size_t i = 0; i < n; i++) P += pre[i] > 0;
            const size_t counts[] = {0, 1, n / 3, n / 2, P ? P - 1 : 0, P, P + 1, n - 1, n, n + 7};
            for (size_t ci = 0; ci < sizeof counts / sizeof *counts; ci++) {
                const size_t count = counts[ci];
                int seen = 0;
                for (size_t cj = 0; cj < ci; cj++) seen |= counts[cj] == count;
                if (seen) continue;
                float t = -1;
                OK(lp_sae_kth_largest(&cpu, &t, pre, n, count));
                const double ref = kth_reference(pre, n, count);
                char label[96];
                snprintf(label, sizeof label, "n=%zu count=%zu (%zu positive)", n, count, P);
                check("kth_largest", label, seed, &t, &ref, 1);
                size_t above = 0; /* the contract: at most count entries exceed t */
                for (size_t i = 0; i < n; i++) above += pre[i] > t;
                cr_expect(above <= count, "%s: %zu entries exceed t=%g", label, above, (double)t);
                if (variant == 1 && count <= P) cr_expect(above == count, "%s: %zu entries exceed t (no ties)", label, above);
            }
            free(pre);
        }
    float t = -1;
    OK(lp_sae_kth_largest(&cpu, &t, NULL, 0, 0));
    cr_expect(t == 0);
}

/* ---- sparse decode ---- */

/* (N, K, D, S) */
static const int DEC_SHAPES[][4] = {{1, 1, 1, 1}, {31, 7, 33, 50}, {33, 32, 1000, 100}, {1000, 3, 31, 2000}, {8, 33, 768, 24576}};

Test(sae_ops, decode_sparse) {
    for (size_t si = 0; si < sizeof DEC_SHAPES / sizeof *DEC_SHAPES; si++)
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            const int N = DEC_SHAPES[si][0], K = DEC_SHAPES[si][1], D = DEC_SHAPES[si][2], S = DEC_SHAPES[si][3];
            const uint64_t seed = 1500 + si * 2 + with_bias;
            int32_t *idx = rand_idx(N, K, S, seed);
            float *val = lp_test_rand((size_t)N * K, seed + 1, 0, 3), *W = lp_test_rand((size_t)S * D, seed + 2, -1, 1);
            float *bias = with_bias ? lp_test_rand(D, seed + 3, -1, 1) : NULL, *out = xmalloc((size_t)N * D * 4);
            double *ref = dalloc((size_t)N * D);
            for (int n = 0; n < N; n++)
                for (int d = 0; d < D; d++) {
                    double acc = bias ? bias[d] : 0;
                    for (int j = 0; j < K; j++) acc += (double)val[(size_t)n * K + j] * W[(size_t)idx[(size_t)n * K + j] * D + d];
                    ref[(size_t)n * D + d] = acc;
                }
            OK(lp_sae_decode_sparse(&cpu, out, idx, val, W, bias, N, K, D));
            char label[64];
            snprintf(label, sizeof label, "N=%d K=%d D=%d%s", N, K, D, bias ? " bias" : "");
            check("decode_sparse", label, seed, out, ref, (size_t)N * D);
            free(idx), free(val), free(W), free(bias), free(out), free(ref);
        }
}

Test(sae_ops, decode_sparse_grad) {
    for (size_t si = 0; si < sizeof DEC_SHAPES / sizeof *DEC_SHAPES; si++) {
        const int N = DEC_SHAPES[si][0], K = DEC_SHAPES[si][1], D = DEC_SHAPES[si][2], S = DEC_SHAPES[si][3];
        const uint64_t seed = 1600 + si;
        int32_t *idx = rand_idx(N, K, S, seed);
        float *val = lp_test_rand((size_t)N * K, seed + 1, 0, 3), *W = lp_test_rand((size_t)S * D, seed + 2, -1, 1);
        float *dout = lp_test_rand((size_t)N * D, seed + 3, -1, 1), *dW = lp_test_rand((size_t)S * D, seed + 4, -1, 1);
        float *dW0 = xmalloc((size_t)S * D * 4), *dval = xmalloc((size_t)N * K * 4);
        memcpy(dW0, dW, (size_t)S * D * 4);
        double *rdval = dalloc((size_t)N * K), *rdW = dalloc((size_t)S * D);
        for (size_t i = 0; i < (size_t)S * D; i++) rdW[i] = dW[i];
        for (int n = 0; n < N; n++)
            for (int j = 0; j < K; j++) {
                const size_t e = (size_t)n * K + j, row = (size_t)idx[e] * D;
                double dot = 0;
                for (int d = 0; d < D; d++) {
                    dot += (double)dout[(size_t)n * D + d] * W[row + d];
                    rdW[row + d] += (double)val[e] * dout[(size_t)n * D + d];
                }
                rdval[e] = dot;
            }
        OK(lp_sae_decode_sparse_grad(&cpu, dval, dW, dout, idx, val, W, N, K, D));
        char label[64];
        snprintf(label, sizeof label, "N=%d K=%d D=%d S=%d", N, K, D, S);
        check("decode dval", label, seed, dval, rdval, (size_t)N * K);
        check("decode dW", label, seed, dW, rdW, (size_t)S * D);
        /* rows no token selected are left bit for bit */
        uint8_t *touched = calloc(S, 1);
        for (size_t e = 0; e < (size_t)N * K; e++) touched[idx[e]] = 1;
        size_t changed = 0;
        for (int s = 0; s < S; s++)
            if (!touched[s]) changed += memcmp(dW + (size_t)s * D, dW0 + (size_t)s * D, (size_t)D * 4) != 0;
        cr_expect(changed == 0, "%s: %zu untouched rows of dW changed", label, changed);
        free(touched), free(idx), free(val), free(W), free(dout), free(dW), free(dW0), free(dval), free(rdval), free(rdW);
    }
}

/* L = sum(wt * decode_sparse(idx, val, W, bias)) through the F32 op. */
typedef struct { const int32_t *idx; float *val, *W; const float *bias, *wt; float *out; int N, K, D; } dec_st;
static double dec_loss(void *p) {
    dec_st *s = p;
    cr_assert_eq(lp_sae_decode_sparse(&cpu, s->out, s->idx, s->val, s->W, s->bias, s->N, s->K, s->D), LP_OK);
    return weighted_sum(s->wt, s->out, (size_t)s->N * s->D);
}

Test(sae_ops, decode_sparse_grad_finite_differences) {
    const int N = 31, K = 7, D = 33, S = 20; /* S small: latents shared between tokens */
    const uint64_t seed = 1700;
    int32_t *idx = rand_idx(N, K, S, seed);
    float *val = lp_test_rand((size_t)N * K, seed + 1, 0, 3), *W = lp_test_rand((size_t)S * D, seed + 2, -1, 1);
    float *bias = lp_test_rand(D, seed + 3, -1, 1), *wt = lp_test_rand((size_t)N * D, seed + 4, -1, 1);
    float *out = xmalloc((size_t)N * D * 4), *dval = xmalloc((size_t)N * K * 4), *dW = calloc((size_t)S * D, 4);
    OK(lp_sae_decode_sparse_grad(&cpu, dval, dW, wt, idx, val, W, N, K, D));
    dec_st st = {idx, val, W, bias, wt, out, N, K, D};
    float got[FD_SAMPLES];
    double fd[FD_SAMPLES];
    uint64_t s = seed;
    for (int i = 0; i < FD_SAMPLES; i++) {
        const size_t e = lp_test_next(&s) % ((size_t)N * K);
        got[i] = dval[e];
        fd[i] = fd_at(&val[e], dec_loss, &st);
    }
    check_fd("decode_sparse_grad dval", seed, got, fd, FD_SAMPLES);
    for (int i = 0; i < FD_SAMPLES; i++) { /* any row: untouched ones must have gradient 0 */
        const size_t at = lp_test_next(&s) % ((size_t)S * D);
        got[i] = dW[at];
        fd[i] = fd_at(&W[at], dec_loss, &st);
    }
    check_fd("decode_sparse_grad dW", seed, got, fd, FD_SAMPLES);
    free(idx), free(val), free(W), free(bias), free(wt), free(out), free(dval), free(dW);
}

/* ---- sparse encoder gradient ---- */

Test(sae_ops, encode_sparse_grad) {
    for (size_t si = 0; si < sizeof DEC_SHAPES / sizeof *DEC_SHAPES; si++) {
        const int N = DEC_SHAPES[si][0], K = DEC_SHAPES[si][1], D = DEC_SHAPES[si][2], S = DEC_SHAPES[si][3];
        const uint64_t seed = 1800 + si;
        int32_t *idx = rand_idx(N, K, S, seed);
        float *x = lp_test_rand((size_t)N * D, seed + 1, -1, 1), *dpre = lp_test_rand((size_t)N * K, seed + 2, -1, 1);
        float *dWe = lp_test_rand((size_t)D * S, seed + 3, -1, 1), *dbe = lp_test_rand(S, seed + 4, -1, 1);
        double *rW = dalloc((size_t)D * S), *rb = dalloc(S);
        for (size_t i = 0; i < (size_t)D * S; i++) rW[i] = dWe[i];
        for (int i = 0; i < S; i++) rb[i] = dbe[i];
        for (int n = 0; n < N; n++)
            for (int j = 0; j < K; j++) {
                const size_t e = (size_t)n * K + j;
                rb[idx[e]] += dpre[e];
                for (int d = 0; d < D; d++) rW[(size_t)d * S + idx[e]] += (double)x[(size_t)n * D + d] * dpre[e];
            }
        OK(lp_sae_encode_sparse_grad(&cpu, dWe, dbe, x, idx, dpre, N, K, D, S));
        char label[64];
        snprintf(label, sizeof label, "N=%d K=%d D=%d S=%d", N, K, D, S);
        check("encode dW_enc", label, seed, dWe, rW, (size_t)D * S);
        check("encode db_enc", label, seed, dbe, rb, S);
        free(idx), free(x), free(dpre), free(dWe), free(dbe), free(rW), free(rb);
    }
}

Test(sae_ops, encode_sparse_input_grad) {
    for (size_t si = 0; si < sizeof DEC_SHAPES / sizeof *DEC_SHAPES; si++) {
        const int N = DEC_SHAPES[si][0], K = DEC_SHAPES[si][1], D = DEC_SHAPES[si][2], S = DEC_SHAPES[si][3];
        const uint64_t seed = 1850 + si;
        int32_t *idx = rand_idx(N, K, S, seed);
        float *dpre = lp_test_rand((size_t)N * K, seed + 1, -1, 1), *W = lp_test_rand((size_t)D * S, seed + 2, -1, 1);
        float *dx = xmalloc((size_t)N * D * 4);
        double *ref = dalloc((size_t)N * D);
        for (int n = 0; n < N; n++)
            for (int d = 0; d < D; d++) {
                double acc = 0;
                for (int j = 0; j < K; j++) acc += (double)dpre[(size_t)n * K + j] * W[(size_t)d * S + idx[(size_t)n * K + j]];
                ref[(size_t)n * D + d] = acc;
            }
        OK(lp_sae_encode_sparse_input_grad(&cpu, dx, dpre, idx, W, N, K, D, S));
        char label[64];
        snprintf(label, sizeof label, "N=%d K=%d D=%d S=%d", N, K, D, S);
        check("encode dx", label, seed, dx, ref, (size_t)N * D);
        free(idx), free(dpre), free(W), free(dx), free(ref);
    }
}

/* L = sum_{n,j} wt[n,j] * pre[n, idx[n,j]], pre = x @ W_enc + b_enc through lp_matmul:
 * the loss whose gradient in W_enc and b_enc the sparse encoder gradient is. */
typedef struct { float *x; const float *wt; float *W, *b, *pre; const int32_t *idx; int N, K, D, S; } enc_st;
static double enc_loss(void *p) {
    enc_st *s = p;
    cr_assert_eq(lp_matmul(&cpu, s->pre, s->x, s->W, s->b, s->N, s->D, s->S, 0), LP_OK);
    double L = 0;
    for (int n = 0; n < s->N; n++)
        for (int j = 0; j < s->K; j++)
            L += (double)s->wt[(size_t)n * s->K + j] * s->pre[(size_t)n * s->S + s->idx[(size_t)n * s->K + j]];
    return L;
}

Test(sae_ops, encode_sparse_grad_finite_differences) {
    const int N = 31, K = 5, D = 33, S = 40;
    const uint64_t seed = 1900;
    int32_t *idx = rand_idx(N, K, S, seed);
    float *x = lp_test_rand((size_t)N * D, seed + 1, -1, 1), *wt = lp_test_rand((size_t)N * K, seed + 2, -1, 1);
    float *W = lp_test_rand((size_t)D * S, seed + 3, -1, 1), *b = lp_test_rand(S, seed + 4, -1, 1);
    float *pre = xmalloc((size_t)N * S * 4), *dW = calloc((size_t)D * S, 4), *db = calloc(S, 4);
    OK(lp_sae_encode_sparse_grad(&cpu, dW, db, x, idx, wt, N, K, D, S));
    enc_st st = {x, wt, W, b, pre, idx, N, K, D, S};
    float got[FD_SAMPLES];
    double fd[FD_SAMPLES];
    uint64_t s = seed;
    for (int i = 0; i < FD_SAMPLES; i++) {
        const size_t at = lp_test_next(&s) % ((size_t)D * S);
        got[i] = dW[at];
        fd[i] = fd_at(&W[at], enc_loss, &st);
    }
    check_fd("encode_sparse_grad dW_enc", seed, got, fd, FD_SAMPLES);
    for (int i = 0; i < S; i++) {
        got[i] = db[i];
        fd[i] = fd_at(&b[i], enc_loss, &st);
    }
    check_fd("encode_sparse_grad db_enc", seed, got, fd, S);
    /* the input gradient through the same loss */
    float *dx = xmalloc((size_t)N * D * 4);
    OK(lp_sae_encode_sparse_input_grad(&cpu, dx, wt, idx, W, N, K, D, S));
    for (int i = 0; i < FD_SAMPLES; i++) {
        const size_t at = lp_test_next(&s) % ((size_t)N * D);
        got[i] = dx[at];
        fd[i] = fd_at(&x[at], enc_loss, &st);
    }
    check_fd("encode_sparse_input_grad dx", seed, got, fd, FD_SAMPLES);
    free(idx), free(x), free(wt), free(W), free(b), free(pre), free(dW), free(db), free(dx);
}

/* ---- activations ---- */

static const int ACT_SHAPES[][2] = {{1, 1}, {31, 33}, {33, 1000}, {1000, 31}};

Test(sae_ops, scale_relu_and_jumprelu) {
    for (size_t si = 0; si < sizeof ACT_SHAPES / sizeof *ACT_SHAPES; si++)
        for (int in_place = 0; in_place < 2; in_place++) {
            const int N = ACT_SHAPES[si][0], S = ACT_SHAPES[si][1];
            const size_t n = (size_t)N * S;
            const uint64_t seed = 2000 + si * 2 + in_place;
            float *pre = rand_ties(n, seed, -2, 2, 0.125f), *theta = lp_test_rand(S, seed + 1, 0, 1);
            for (int s = 0; s < S; s += 3) theta[s] = 0.5f; /* pre == theta occurs: not active */
            float *df = lp_test_rand(n, seed + 2, -1, 1), *f = xmalloc(n * 4), *work = xmalloc(n * 4);
            double *ref = dalloc(n);
            char label[64];
            snprintf(label, sizeof label, "N=%d S=%d%s", N, S, in_place ? " in place" : "");

            for (size_t i = 0; i < n; i++) ref[i] = pre[i] > 0 ? pre[i] : 0;
            memcpy(work, pre, n * 4);
            OK(lp_sae_relu(&cpu, in_place ? work : f, work, n));
            check("relu", label, seed, in_place ? work : f, ref, n);

            for (size_t i = 0; i < n; i++) ref[i] = pre[i] > theta[i % S] ? pre[i] : 0;
            memcpy(work, pre, n * 4);
            OK(lp_sae_jumprelu(&cpu, in_place ? work : f, work, theta, N, S));
            check("jumprelu", label, seed, in_place ? work : f, ref, n);

            for (size_t i = 0; i < n; i++) ref[i] = (double)pre[i] * -0.37f;
            memcpy(work, pre, n * 4);
            OK(lp_sae_scale(&cpu, work, -0.37f, n)); /* in place by definition */
            check("scale", label, seed, work, ref, n);

            for (size_t i = 0; i < n; i++) ref[i] = pre[i] > 0 ? df[i] : 0;
            memcpy(work, df, n * 4);
            OK(lp_sae_relu_grad(&cpu, in_place ? work : f, work, pre, n));
            check("relu_grad", label, seed, in_place ? work : f, ref, n);
            free(pre), free(theta), free(df), free(f), free(work), free(ref);
        }
}

Test(sae_ops, jumprelu_grad_against_the_formula) {
    for (size_t si = 0; si < sizeof ACT_SHAPES / sizeof *ACT_SHAPES; si++)
        for (int in_place = 0; in_place < 2; in_place++) {
            const int N = ACT_SHAPES[si][0], S = ACT_SHAPES[si][1];
            const size_t n = (size_t)N * S;
            const uint64_t seed = 2100 + si * 2 + in_place;
            const float eps = 0.5f, l0 = 0.3f / N;
            /* a wide window (|pre - theta| < 0.25) so a sixth of the entries fall inside */
            float *pre = lp_test_rand(n, seed, -1, 2), *theta = lp_test_rand(S, seed + 1, 0.2f, 1.0f);
            float *df = lp_test_rand(n, seed + 2, -1, 1), *dtheta = lp_test_rand(S, seed + 3, -1, 1);
            float *dpre = xmalloc(n * 4);
            double *rdpre = dalloc(n), *rdth = dalloc(S);
            for (int s = 0; s < S; s++) rdth[s] = dtheta[s];
            for (int r = 0; r < N; r++)
                for (int s = 0; s < S; s++) {
                    const size_t i = (size_t)r * S + s;
                    const double u = ((double)pre[i] - theta[s]) / eps, k = fabs(u) < 0.5 ? 1 : 0;
                    rdpre[i] = pre[i] > theta[s] ? df[i] : 0;
                    rdth[s] += -((double)theta[s] / eps) * k * df[i] + (double)l0 * -(1.0 / eps) * k;
                }
            if (in_place) memcpy(dpre, df, n * 4);
            OK(lp_sae_jumprelu_grad(&cpu, dpre, dtheta, in_place ? dpre : df, pre, theta, eps, l0, N, S));
            char label[64];
            snprintf(label, sizeof label, "N=%d S=%d%s", N, S, in_place ? " in place" : "");
            check("jumprelu dpre", label, seed, dpre, rdpre, n);
            check("jumprelu dtheta", label, seed, dtheta, rdth, S);
            free(pre), free(theta), free(df), free(dtheta), free(dpre), free(rdpre), free(rdth);
        }
}

/* L = sum(wt * act(pre)) through the F32 forward op; act = relu or jumprelu. */
typedef struct { float *pre; const float *theta, *wt; float *f; int N, S; } act_st;
static double relu_loss(void *p) {
    act_st *s = p;
    cr_assert_eq(lp_sae_relu(&cpu, s->f, s->pre, (size_t)s->N * s->S), LP_OK);
    return weighted_sum(s->wt, s->f, (size_t)s->N * s->S);
}
static double jumprelu_loss(void *p) {
    act_st *s = p;
    cr_assert_eq(lp_sae_jumprelu(&cpu, s->f, s->pre, s->theta, s->N, s->S), LP_OK);
    return weighted_sum(s->wt, s->f, (size_t)s->N * s->S);
}

Test(sae_ops, activation_grads_finite_differences) {
    const int N = 31, S = 33;
    const size_t n = (size_t)N * S;
    const uint64_t seed = 2200;
    float *pre = lp_test_rand(n, seed, -2, 2), *theta = lp_test_rand(S, seed + 1, 0.2f, 1.0f);
    float *wt = lp_test_rand(n, seed + 2, -1, 1), *f = xmalloc(n * 4), *dpre = xmalloc(n * 4);
    float *dtheta = calloc(S, 4);
    act_st st = {pre, theta, wt, f, N, S};
    float got[FD_SAMPLES];
    double fd[FD_SAMPLES];
    for (int jump = 0; jump < 2; jump++) {
        if (jump) OK(lp_sae_jumprelu_grad(&cpu, dpre, dtheta, wt, pre, theta, 0.1f, 0.0f, N, S));
        else OK(lp_sae_relu_grad(&cpu, dpre, wt, pre, n));
        uint64_t s = seed + jump;
        int k = 0;
        while (k < FD_SAMPLES) {
            const size_t i = lp_test_next(&s) % n;
            const float kink = jump ? theta[i % S] : 0.0f;
            if (fabsf(pre[i] - kink) < 2 * FD_H) continue; /* away from the kink */
            got[k] = dpre[i];
            fd[k++] = fd_at(&pre[i], jump ? jumprelu_loss : relu_loss, &st);
        }
        check_fd(jump ? "jumprelu_grad dpre" : "relu_grad dpre", seed, got, fd, FD_SAMPLES);
    }
    free(pre), free(theta), free(wt), free(f), free(dpre), free(dtheta);
}

/* ---- Adam ---- */

Test(sae_ops, adam_three_steps) {
    static const size_t sizes[] = {1, 31, 1000, 100003};
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
        const size_t n = sizes[si];
        const uint64_t seed = 2300 + si;
        const float lr = 1e-3f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
        float *p = lp_test_rand(n, seed, -1, 1), *m = calloc(n, 4), *v = calloc(n, 4);
        double *rp = dalloc(n), *rm = dalloc(n), *rv = dalloc(n);
        for (size_t i = 0; i < n; i++) rp[i] = p[i], rm[i] = 0, rv[i] = 0;
        for (int t = 1; t <= 3; t++) {
            float *g = lp_test_rand(n, seed + 10 * t, -1, 1);
            if (t == 1) g[0] = 0; /* a zero gradient: no step (m = v = 0) */
            for (size_t i = 0; i < n; i++) {
                rm[i] = b1 * rm[i] + (1 - (double)b1) * g[i];
                rv[i] = b2 * rv[i] + (1 - (double)b2) * (double)g[i] * g[i];
                const double mh = rm[i] / (1 - pow(b1, t)), vh = rv[i] / (1 - pow(b2, t));
                rp[i] -= lr * mh / (sqrt(vh) + eps);
            }
            float p0[8];
            for (size_t i = 0; i < n && i < 8; i++) p0[i] = p[i];
            OK(lp_adam_step(&cpu, p, g, m, v, n, lr, b1, b2, eps, t));
            if (t == 1) /* bias-corrected first step: |dp| = lr where |g| >> eps, 0 where g = 0 */
                for (size_t i = 0; i < n && i < 8; i++) {
                    const double step = fabs((double)p[i] - p0[i]), want = g[i] == 0 ? 0 : lr;
                    cr_expect(fabs(step - want) < 1e-6, "adam first step %zu: |dp| = %g, expected %g", i, step, want);
                }
            free(g);
        }
        char label[64];
        snprintf(label, sizeof label, "n=%zu p", n);
        check("adam", label, seed, p, rp, n);
        snprintf(label, sizeof label, "n=%zu m", n);
        check("adam", label, seed, m, rm, n);
        snprintf(label, sizeof label, "n=%zu v", n);
        check("adam", label, seed, v, rv, n);
        free(p), free(m), free(v), free(rp), free(rm), free(rv);
    }
}

/* ---- decoder rows ---- */

static const int ROW_SHAPES[][2] = {{1, 1}, {31, 33}, {1000, 31}, {33, 1000}, {3, 768}};

Test(sae_ops, rows_unit_norm_remove_parallel_norm) {
    for (size_t si = 0; si < sizeof ROW_SHAPES / sizeof *ROW_SHAPES; si++) {
        const int S = ROW_SHAPES[si][0], D = ROW_SHAPES[si][1];
        const size_t n = (size_t)S * D;
        const uint64_t seed = 2400 + si;
        float *W = lp_test_rand(n, seed, -1, 1), *dW = lp_test_rand(n, seed + 1, -1, 1), *nrm = xmalloc(S * 4);
        if (S > 1) memset(W + D, 0, D * 4); /* a zero row: left alone */
        double *ref = dalloc(n), *rn = dalloc(S);
        char label[64];
        snprintf(label, sizeof label, "S=%d D=%d", S, D);

        for (int s = 0; s < S; s++) {
            double ss = 0;
            for (int d = 0; d < D; d++) ss += (double)W[(size_t)s * D + d] * W[(size_t)s * D + d];
            rn[s] = sqrt(ss);
        }
        OK(lp_rows_norm(&cpu, nrm, W, S, D));
        check("rows_norm", label, seed, nrm, rn, S);

        for (size_t i = 0; i < n; i++) ref[i] = rn[i / D] > 0 ? W[i] / rn[i / D] : 0;
        OK(lp_rows_unit_norm(&cpu, W, S, D));
        check("rows_unit_norm", label, seed, W, ref, n);

        for (int s = 0; s < S; s++) { /* against the normalized W the op now holds */
            double dot = 0;
            for (int d = 0; d < D; d++) dot += (double)dW[(size_t)s * D + d] * W[(size_t)s * D + d];
            for (int d = 0; d < D; d++) ref[(size_t)s * D + d] = dW[(size_t)s * D + d] - dot * W[(size_t)s * D + d];
        }
        OK(lp_rows_remove_parallel(&cpu, dW, W, S, D));
        check("rows_remove_parallel", label, seed, dW, ref, n);
        free(W), free(dW), free(nrm), free(ref), free(rn);
    }
}

/* ---- metrics ---- */

Test(sae_ops, recon_sums) {
    static const int shapes[][2] = {{1, 1}, {31, 33}, {1000, 31}, {33, 1000}, {4, 768}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        const int N = shapes[si][0], D = shapes[si][1];
        const size_t n = (size_t)N * D;
        const uint64_t seed = 2500 + si;
        /* an offset of 100 (the variance must not be E[x^2] - E[x]^2 in low precision),
         * one zero x row and one zero x_hat row (their cosine and ratio terms are 0) */
        float *x = lp_test_rand(n, seed, 99, 101), *xh = lp_test_rand(n, seed + 1, 99, 101);
        if (N > 2) memset(x + D, 0, D * 4), memset(xh + 2 * D, 0, D * 4);
        long double se = 0, cs = 0, ra = 0, var = 0;
        for (int r = 0; r < N; r++) {
            long double xx = 0, hh = 0, xhd = 0;
            for (int d = 0; d < D; d++) {
                const long double a = x[(size_t)r * D + d], b = xh[(size_t)r * D + d];
                se += (b - a) * (b - a), xx += a * a, hh += b * b, xhd += a * b;
            }
            if (xx > 0 && hh > 0) cs += xhd / sqrtl(xx * hh);
            if (xx > 0) ra += sqrtl(hh / xx);
        }
        for (int d = 0; d < D; d++) {
            long double mean = 0;
            for (int r = 0; r < N; r++) mean += x[(size_t)r * D + d];
            mean /= N;
            for (int r = 0; r < N; r++) var += (x[(size_t)r * D + d] - mean) * (x[(size_t)r * D + d] - mean);
        }
        const long double ref[4] = {se, var, cs, ra};
        double sums[4];
        OK(lp_sae_recon_sums(&cpu, sums, x, xh, N, D));
        lp_cmp c = {0};
        for (int i = 0; i < 4; i++) {
            const double err = fabs((double)(sums[i] - ref[i])), scale = fabs((double)ref[i]) > 0 ? fabs((double)ref[i]) : 1;
            if (!isfinite(sums[i])) c.n_bad++;
            if (err / scale > c.max_rel) c.max_rel = err / scale, c.worst = i;
        }
        char what[64];
        snprintf(what, sizeof what, "recon_sums N=%d D=%d", N, D);
        LP_EXPECT_WITHIN(what, seed, c, max_rel, budget("recon_sums"));
        free(x), free(xh);
    }
    double sums[4] = {1, 1, 1, 1};
    OK(lp_sae_recon_sums(&cpu, sums, NULL, NULL, 0, 5));
    for (int i = 0; i < 4; i++) cr_expect(sums[i] == 0);
}

Test(sae_ops, fire_counts_sparse_and_dense) {
    const int N = 33, K = 7, S = 50;
    const uint64_t seed = 2600;
    int32_t *idx = rand_idx(N, K, S, seed);
    float *val = rand_ties((size_t)N * K, seed + 1, -1, 2, 0.5f); /* zeros and negatives do not fire */
    idx[3] = -1, idx[4] = S;                                        /* ignored */
    val[3] = val[4] = 1;
    int64_t counts[50], ref[50];
    for (int s = 0; s < S; s++) counts[s] = ref[s] = s; /* accumulated */
    for (size_t e = 0; e < (size_t)N * K; e++)
        if (val[e] > 0 && idx[e] >= 0 && idx[e] < S) ref[idx[e]]++;
    OK(lp_sae_fire_counts(&cpu, counts, idx, val, NULL, N, K, S));
    for (int s = 0; s < S; s++) cr_expect(counts[s] == ref[s], "sparse: latent %d: %lld, expected %lld", s, (long long)counts[s], (long long)ref[s]);

    float *f = rand_ties((size_t)N * S, seed + 2, -1, 1, 0.25f);
    for (size_t i = 0; i < (size_t)N * S; i++)
        if (f[i] > 0) ref[i % S]++;
    OK(lp_sae_fire_counts(&cpu, counts, NULL, NULL, f, N, 0, S));
    for (int s = 0; s < S; s++) cr_expect(counts[s] == ref[s], "dense: latent %d: %lld, expected %lld", s, (long long)counts[s], (long long)ref[s]);
    fprintf(stderr, "  %-40s exact\n", "fire_counts sparse and dense");
    free(idx), free(val), free(f);
}

/* ---- arguments ---- */

Test(sae_ops, bad_arguments_are_rejected) {
    float buf[64] = {0}, t;
    int32_t ib[64] = {0};
    int64_t cb[8] = {0};
    double sums[4];
    cr_expect_eq(lp_matmul_at(&cpu, buf, buf, buf, 2, 2, 2, 0.5f), LP_ERR_ARG);
    cr_expect_eq(lp_matmul_at(&cpu, buf, buf, buf, -1, 2, 2, 0.0f), LP_ERR_ARG);
    cr_expect_eq(lp_col_sum(&cpu, buf, buf, 2, 0, 0.0f), LP_ERR_ARG);
    cr_expect_eq(lp_col_sum(&cpu, buf, buf, 2, 2, 2.0f), LP_ERR_ARG);
    cr_expect_eq(lp_sae_topk(&cpu, ib, buf, buf, 1, 4, 5), LP_ERR_ARG); /* k > d_sae */
    cr_expect_eq(lp_sae_topk(&cpu, ib, buf, buf, 1, 4, 0), LP_ERR_ARG);
    cr_expect_eq(lp_sae_kth_largest(&cpu, NULL, buf, 4, 1), LP_ERR_ARG);
    cr_expect_eq(lp_sae_kth_largest(&cpu, &t, NULL, 4, 1), LP_ERR_ARG);
    cr_expect_eq(lp_sae_decode_sparse(&cpu, buf, ib, buf, NULL, NULL, 1, 1, 1), LP_ERR_ARG);
    cr_expect_eq(lp_sae_decode_sparse_grad(&cpu, buf, buf, buf, ib, buf, buf, 1, 0, 1), LP_ERR_ARG);
    cr_expect_eq(lp_sae_encode_sparse_grad(&cpu, buf, NULL, buf, ib, buf, 1, 1, 1, 1), LP_ERR_ARG);
    cr_expect_eq(lp_sae_jumprelu_grad(&cpu, buf, buf, buf, buf, buf, 0.0f, 0.0f, 1, 1), LP_ERR_ARG);
    cr_expect_eq(lp_adam_step(&cpu, buf, buf, buf, buf, 4, 1e-3f, 0.9f, 0.999f, 1e-8f, 0), LP_ERR_ARG);
    cr_expect_eq(lp_adam_step(&cpu, buf, buf, buf, buf, 4, 1e-3f, 1.0f, 0.999f, 1e-8f, 1), LP_ERR_ARG);
    cr_expect_eq(lp_rows_unit_norm(&cpu, buf, 2, 0), LP_ERR_ARG);
    cr_expect_eq(lp_sae_recon_sums(&cpu, NULL, buf, buf, 1, 1), LP_ERR_ARG);
    cr_expect_eq(lp_sae_fire_counts(&cpu, cb, ib, NULL, NULL, 1, 1, 1), LP_ERR_ARG);
    cr_expect_eq(lp_sae_fire_counts(&cpu, cb, NULL, NULL, NULL, 1, 1, 1), LP_ERR_ARG);
    (void)sums;
}
