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
 * against the header's formula evaluated in double instead (test_sae_ops_train.c).
 *
 * Here: the weight-gradient GEMM and column sums, top-k, the BatchTopK threshold, sparse
 * decode and the sparse encoder gradient. The activations, Adam, the decoder rows, the
 * metrics and argument checks are test_sae_ops_train.c. */
#include "sae_ops_test.h"

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

/* The selection over a batch in pieces (data-parallel ranks): the four passes' histograms
 * of the pieces summed, picked with lp_sae_radix_pick, give lp_sae_kth_largest's answer over
 * the whole, bit for bit; each histogram counts exactly the positive entries under its
 * prefix. */
static float kth_in_pieces(const float *pre, size_t n, size_t count, int pieces) {
    if (count >= n) return 0.0f;
    int64_t rank = (int64_t)count + 1, hist[256], part[256];
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        memset(hist, 0, sizeof hist);
        for (int p = 0; p < pieces; p++) {
            size_t a = n * p / pieces, b = n * (p + 1) / pieces;
            OK(lp_sae_radix_hist(&cpu, part, pre + a, b - a, prefix, mask, shift));
            int64_t want[256] = {0};
            for (size_t i = a; i < b; i++) {
                uint32_t u;
                memcpy(&u, &pre[i], 4);
                if (pre[i] > 0 && (u & mask) == prefix) want[(u >> shift) & 255]++;
            }
            cr_assert(memcmp(part, want, sizeof want) == 0, "radix_hist: shift %d, piece %d of %d", shift, p, pieces);
            for (int d = 0; d < 256; d++) hist[d] += part[d];
        }
        if (!lp_sae_radix_pick(hist, &rank, &prefix, &mask, shift)) return 0.0f;
    }
    float t;
    memcpy(&t, &prefix, 4);
    return t;
}

Test(sae_ops, kth_largest_in_pieces) {
    static const size_t sizes[] = {1, 31, 1000, 4096 * 3};
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
        for (int variant = 0; variant < 3; variant++) { /* ties, continuous, all <= 0 */
            const size_t n = sizes[si];
            const uint64_t seed = 1500 + si * 3 + variant;
            float *pre = variant == 1 ? lp_test_rand(n, seed, -2, 3) : rand_ties(n, seed, variant == 2 ? -3.0f : -2.0f, variant == 2 ? 0.0f : 3.0f, 0.125f);
            size_t P = 0;
            for (size_t i = 0; i < n; i++) P += pre[i] > 0;
            const size_t counts[] = {0, 1, n / 3, P ? P - 1 : 0, P, P + 1, n - 1};
            for (size_t ci = 0; ci < sizeof counts / sizeof *counts; ci++)
                for (int pieces = 1; pieces <= 4; pieces++) {
                    float whole = -1, split = kth_in_pieces(pre, n, counts[ci], pieces);
                    OK(lp_sae_kth_largest(&cpu, &whole, pre, n, counts[ci]));
                    cr_expect(memcmp(&whole, &split, 4) == 0, "n=%zu count=%zu, %d pieces: %.9g, whole: %.9g", n, counts[ci], pieces,
                              (double)split, (double)whole);
                }
            free(pre);
        }
    int64_t hist[256];
    cr_expect_eq(lp_sae_radix_hist(&cpu, hist, NULL, 0, 0, 0xFF000000u, 16), LP_OK);
    cr_expect_eq(lp_sae_radix_hist(&cpu, hist, NULL, 0, 0, 0, 16), LP_ERR_ARG, "a mask that leaves out the bytes above shift");
    cr_expect_eq(lp_sae_radix_hist(&cpu, hist, NULL, 0, 1, 0, 24), LP_ERR_ARG, "a prefix outside the mask");
    cr_expect_eq(lp_sae_radix_hist(&cpu, hist, NULL, 0, 0, 0, 12), LP_ERR_ARG, "shift 12");
}

/* ---- sparse decode ---- */

/* (N, K, D, S) */
static const int DEC_SHAPES[][4] = {{1, 1, 1, 1}, {31, 7, 33, 50}, {33, 32, 1000, 100}, {1000, 3, 31, 2000}, {8, 33, 768, 24576}};

Test(sae_ops, decode_sparse) {
    for (size_t si = 0; si < sizeof DEC_SHAPES / sizeof *DEC_SHAPES; si++)
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            const int N = DEC_SHAPES[si][0], K = DEC_SHAPES[si][1], D = DEC_SHAPES[si][2], S = DEC_SHAPES[si][3];
            const uint64_t seed = 1500 + si * 2 + with_bias;
            int32_t *idx = lp_test_rand_idx(N, K, S, seed);
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
        int32_t *idx = lp_test_rand_idx(N, K, S, seed);
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
    int32_t *idx = lp_test_rand_idx(N, K, S, seed);
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
        int32_t *idx = lp_test_rand_idx(N, K, S, seed);
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
        int32_t *idx = lp_test_rand_idx(N, K, S, seed);
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
    int32_t *idx = lp_test_rand_idx(N, K, S, seed);
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
