/* test_sae_ops_train.c: the rest of the SAE ops of include/loupe/sae_ops.h on the CPU,
 * as test_sae_ops.c (its opening comment says how references, budgets and finite
 * differences are chosen): the activations and their gradients, Adam, the decoder-row
 * ops, the reconstruction and firing metrics, and the rejection of bad arguments. */
#include "sae_ops_test.h"

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

/* The standard SAE's fused backward: against the same three things in double. The shapes
 * add one wide enough to split its column blocks over threads. */
Test(sae_ops, l1_relu_grad_against_the_formula) {
    static const int shapes[][2] = {{1, 1}, {31, 33}, {33, 1000}, {1000, 31}, {300, 1100}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
        for (int in_place = 0; in_place < 2; in_place++) {
            const int N = shapes[si][0], S = shapes[si][1];
            const size_t n = (size_t)N * S;
            const uint64_t seed = 2050 + si * 2 + in_place;
            float *pre = rand_ties(n, seed, -2, 2, 0.125f), *w = lp_test_rand(S, seed + 1, 0, 0.01f);
            float *df = lp_test_rand(n, seed + 2, -1, 1), *db = lp_test_rand(S, seed + 3, -1, 1);
            float *dpre = xmalloc(n * 4), *fsum = xmalloc((size_t)S * 4);
            double *rdpre = dalloc(n), *rdb = dalloc(S), *rf = dalloc(S);
            for (int s = 0; s < S; s++) rdb[s] = db[s], rf[s] = 0, fsum[s] = NAN; /* fsum is written, not added to */
            for (int r = 0; r < N; r++)
                for (int s = 0; s < S; s++) {
                    const size_t i = (size_t)r * S + s;
                    rdpre[i] = pre[i] > 0 ? (double)df[i] + w[s] : 0;
                    rdb[s] += (float)rdpre[i]; /* the sum of dpre as written, in fp32 */
                    rf[s] += pre[i] > 0 ? pre[i] : 0;
                }
            if (in_place) memcpy(dpre, df, n * 4);
            OK(lp_sae_l1_relu_grad(&cpu, dpre, db, fsum, in_place ? dpre : df, pre, w, N, S));
            char label[64];
            snprintf(label, sizeof label, "N=%d S=%d%s", N, S, in_place ? " in place" : "");
            check("l1_relu_grad dpre", label, seed, dpre, rdpre, n);
            check("l1_relu_grad db", label, seed, db, rdb, S);
            check("l1_relu_grad fsum", label, seed, fsum, rf, S);
            free(pre), free(w), free(df), free(db), free(dpre), free(fsum), free(rdpre), free(rdb), free(rf);
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
    int32_t *idx = lp_test_rand_idx(N, K, S, seed);
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
