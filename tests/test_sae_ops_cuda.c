/* test_sae_ops_cuda.c: every SAE op of include/loupe/sae_ops.h on the GPU against its CPU
 * twin (tests/test_sae_ops.c checks the CPU against float64 and finite differences),
 * through the public dispatch, on awkward shapes and on the benchmark's (d_in 768,
 * d_sae 24576, k 32). SAE buffers are F32 whatever the context's activation dtype, so
 * every case runs on an F32 and on a BF16 context with the same budget.
 *
 * Every device buffer sits between guard bytes, checked after the op, so a kernel that
 * writes out of bounds fails even when its in-bounds values are right. Without a GPU
 * every test skips, saying why (LOUPE_REQUIRE_GPU=1 turns the skip into a failure). */
#include "loupe/sae_ops.h"
#include "ops/ops_internal.h"
#include "sae/sae_internal.h"
#include "gputest.h"

/* ---- budgets: nmse = sum (gpu - cpu)^2 / sum cpu^2 (0: bit for bit) ----------------------
 * Selections (topk, the BatchTopK threshold), masks (relu, jumprelu and their dpre),
 * scaling, counts and Adam (the same IEEE operations in the same order, no FMA
 * contraction) must match exactly. Everything else differs from the CPU in summation
 * order and FMA contraction only, ~1e-7 relative per element: nmse ~1e-14; the atomics
 * of the scattered gradients and of split column sums change the order run to run, and
 * fp32 dot products of length 1000 against the CPU's double: ~1e-12. recon_sums is
 * double on both sides: max relative error ~1e-15, budget 1e-10. */
enum {
    OP_MATMUL_AT, OP_COL_SUM, OP_TOPK, OP_KTH, OP_DECODE, OP_DECODE_DVAL, OP_DECODE_DW, OP_ENCODE_DW,
    OP_ENCODE_DB, OP_ENCODE_DX, OP_ELEMENTWISE, OP_L1_SUMS, OP_JUMPRELU_DTHETA, OP_ADAM, OP_ROWS, OP_RECON, OP_FIRE, OP_COUNT
};
static const struct { const char *op; double nmse; } BUDGET[OP_COUNT] = {
    [OP_MATMUL_AT] = {"matmul_at", 1e-9},
    [OP_COL_SUM] = {"col_sum", 1e-10},
    [OP_TOPK] = {"topk", 0},
    [OP_KTH] = {"kth_largest", 0},
    [OP_DECODE] = {"decode_sparse", 1e-11},
    [OP_DECODE_DVAL] = {"decode_sparse_grad dval", 1e-10},
    [OP_DECODE_DW] = {"decode_sparse_grad dW", 1e-10},
    [OP_ENCODE_DW] = {"encode_sparse_grad dW_enc", 1e-10},
    [OP_ENCODE_DB] = {"encode_sparse_grad db_enc", 1e-10},
    [OP_ENCODE_DX] = {"encode_sparse_input_grad", 1e-11},
    [OP_ELEMENTWISE] = {"scale/relu/jumprelu/dpre", 0},
    [OP_L1_SUMS] = {"l1_relu_grad db/fsum", 1e-10},
    [OP_JUMPRELU_DTHETA] = {"jumprelu_grad dtheta", 1e-9},
    [OP_ADAM] = {"adam", 0},
    [OP_ROWS] = {"rows", 1e-11},
    [OP_RECON] = {"recon_sums (max rel)", 1e-10},
    [OP_FIRE] = {"fire_counts", 0},
};

static const lp_dtype DTYPES[2] = {LP_F32, LP_BF16};

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    cr_assert(p != NULL);
    return p;
}
static void *dup(const void *x, size_t bytes) { return memcpy(xmalloc(bytes), x, bytes); }

static void expect_close(int op, lp_dtype dt, const char *label, uint64_t seed, const float *got, const float *ref,
                         size_t n) {
    char what[160];
    snprintf(what, sizeof what, "%s %s %s", BUDGET[op].op, lp_dtype_name(dt), label);
    const lp_cmp c = lp_compare_f(got, ref, n);
    if (BUDGET[op].nmse == 0) LP_EXPECT_WITHIN(what, seed, c, max_abs, 0.0);
    else LP_EXPECT_WITHIN(what, seed, c, nmse, BUDGET[op].nmse);
}

static void expect_same_ints(int op, lp_dtype dt, const char *label, uint64_t seed, const void *got, const void *ref,
                             size_t n, size_t elem) {
    size_t bad = 0, first = n;
    for (size_t i = 0; i < n; i++)
        if (memcmp((const char *)got + i * elem, (const char *)ref + i * elem, elem) != 0) {
            if (!bad) first = i;
            bad++;
        }
    fprintf(stderr, "  %s %s %-40s %zu of %zu differ (must be exact)\n", BUDGET[op].op, lp_dtype_name(dt), label,
            bad, n);
    cr_expect(bad == 0, "%s %s %s: %zu of %zu entries differ, first at %zu (seed %llu)", BUDGET[op].op,
              lp_dtype_name(dt), label, bad, n, first, (unsigned long long)seed);
}

/* Values on a grid of `step`: ties everywhere; every 7th zero becomes -0. */
static float *rand_ties(size_t n, uint64_t seed, float lo, float hi, float step) {
    float *x = lp_test_rand(n, seed, lo, hi);
    for (size_t i = 0; i < n; i++) {
        x[i] = roundf(x[i] / step) * step;
        if (x[i] == 0.0f && i % 7 == 0) x[i] = -0.0f;
    }
    return x;
}

/* ---- weight gradients ---- */

Test(sae_ops_cuda, matmul_at) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][3] = {{1, 1, 1}, {31, 33, 1}, {33, 31, 1000}, {1000, 33, 31}, {4096, 64, 768}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
            for (int beta = 0; beta < 2; beta++) {
                const int N = shapes[si][0], K = shapes[si][1], M = shapes[si][2];
                const uint64_t seed = 100 + si;
                float *a = lp_test_rand((size_t)N * K, seed, -1, 1), *b = lp_test_rand((size_t)N * M, seed + 1, -1, 1);
                float *ref = lp_test_rand((size_t)K * M, seed + 2, -1, 1);
                float *init = dup(ref, (size_t)K * M * 4);
                OK(lp_matmul_at(cpu(), ref, a, b, N, K, M, (float)beta));
                if (!beta) /* beta = 0 must not read out */
                    for (size_t i = 0; i < (size_t)K * M; i++) init[i] = NAN;
                gpu g;
                gpu_init(&g, DTYPES[di]);
                float *da = gpu_put(&g, a, (size_t)N * K * 4), *db = gpu_put(&g, b, (size_t)N * M * 4);
                float *dout = gpu_put(&g, init, (size_t)K * M * 4);
                OK(lp_matmul_at(&g.c, dout, da, db, N, K, M, (float)beta));
                float *got = gpu_get(&g, dout, (size_t)K * M * 4);
                char label[64];
                snprintf(label, sizeof label, "N=%d K=%d M=%d beta=%d", N, K, M, beta);
                expect_close(OP_MATMUL_AT, DTYPES[di], label, seed, got, ref, (size_t)K * M);
                gpu_done(&g, label);
                free(a), free(b), free(ref), free(init), free(got);
            }
}

Test(sae_ops_cuda, col_sum) {
    LP_TEST_REQUIRE_GPU();
    /* d_in-wide inputs split their rows over blocks (atomics); d_sae-wide ones do not */
    static const int shapes[][2] = {{1, 1}, {31, 33}, {1000, 31}, {4096, 768}, {3, 24576}, {4096, 3}, {512, 24576}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
            for (int beta = 0; beta < 2; beta++) {
                const int N = shapes[si][0], M = shapes[si][1];
                const uint64_t seed = 200 + si;
                float *x = lp_test_rand((size_t)N * M, seed, -1, 1), *ref = lp_test_rand(M, seed + 1, -1, 1);
                float *init = dup(ref, (size_t)M * 4);
                OK(lp_col_sum(cpu(), ref, x, N, M, (float)beta));
                if (!beta)
                    for (int i = 0; i < M; i++) init[i] = NAN;
                gpu g;
                gpu_init(&g, DTYPES[di]);
                float *dx = gpu_put(&g, x, (size_t)N * M * 4), *dout = gpu_put(&g, init, (size_t)M * 4);
                OK(lp_col_sum(&g.c, dout, dx, N, M, (float)beta));
                float *got = gpu_get(&g, dout, (size_t)M * 4);
                char label[64];
                snprintf(label, sizeof label, "N=%d M=%d beta=%d", N, M, beta);
                expect_close(OP_COL_SUM, DTYPES[di], label, seed, got, ref, M);
                gpu_done(&g, label);
                free(x), free(ref), free(init), free(got);
            }
}

/* ---- selection ---- */

Test(sae_ops_cuda, topk) {
    LP_TEST_REQUIRE_GPU();
    /* (N, S, K): tiny, K = S, odd, the benchmark, a row too long for shared memory (re-read
     * from global memory), the largest K, K = 1 */
    static const int shapes[][3] = {{1, 1, 1}, {3, 31, 31}, {5, 33, 7}, {EMU_CAP(64, 3), 24576, 32},
                                    {3, 70000, 64}, {4, 5000, 2048}, {2, 1000, 1}, {7, 24576, 129}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
            for (int variant = 0; variant < 4; variant++) { /* ties, continuous, all negative, one value */
                const int N = shapes[si][0], S = shapes[si][1], K = shapes[si][2];
                const size_t n = (size_t)N * S;
                const uint64_t seed = 300 + si * 4 + variant;
                float *pre = variant == 1 ? lp_test_rand(n, seed, -3, 3)
                                          : rand_ties(n, seed, variant == 2 ? -4.0f : -2.0f, variant == 2 ? -0.25f : 2.0f, 0.25f);
                if (variant == 3)
                    for (size_t i = 0; i < n; i++) pre[i] = 0.5f;
                int32_t *ridx = xmalloc((size_t)N * K * 4);
                float *rval = xmalloc((size_t)N * K * 4);
                OK(lp_sae_topk(cpu(), ridx, rval, pre, N, S, K));
                gpu g;
                gpu_init(&g, DTYPES[di]);
                float *dpre = gpu_put(&g, pre, n * 4), *dval = gpu_alloc(&g, (size_t)N * K * 4);
                int32_t *didx = gpu_alloc(&g, (size_t)N * K * 4);
                OK(lp_sae_topk(&g.c, didx, dval, dpre, N, S, K));
                int32_t *idx = gpu_get(&g, didx, (size_t)N * K * 4);
                float *val = gpu_get(&g, dval, (size_t)N * K * 4);
                char label[64];
                snprintf(label, sizeof label, "N=%d S=%d K=%d %s idx", N, S, K,
                         (const char *[]){"ties", "continuous", "negative", "constant"}[variant]);
                expect_same_ints(OP_TOPK, DTYPES[di], label, seed, idx, ridx, (size_t)N * K, 4);
                label[strlen(label) - 3] = 0;
                expect_close(OP_TOPK, DTYPES[di], label, seed, val, rval, (size_t)N * K);
                gpu_done(&g, label);
                free(pre), free(ridx), free(rval), free(idx), free(val);
            }
}

Test(sae_ops_cuda, topk_rejects_k_above_the_cuda_limit) {
    LP_TEST_REQUIRE_GPU();
    gpu g;
    gpu_init(&g, LP_F32);
    const int S = 3000, K = 2049;
    float *dpre = gpu_alloc(&g, (size_t)S * 4), *dval = gpu_alloc(&g, (size_t)K * 4);
    int32_t *didx = gpu_alloc(&g, (size_t)K * 4);
    cr_expect_eq(lp_sae_topk(&g.c, didx, dval, dpre, 1, S, K), LP_ERR_ARG);
    gpu_done(&g, "topk k=2049");
}

Test(sae_ops_cuda, kth_largest) {
    LP_TEST_REQUIRE_GPU();
    static const size_t sizes[] = {1, 1000, EMU_CAP(3000017, 100003)};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
            for (int variant = 0; variant < 3; variant++) { /* ties, continuous, none positive */
                const size_t n = sizes[si];
                const uint64_t seed = 400 + si * 3 + variant;
                float *pre = variant == 1 ? lp_test_rand(n, seed, -2, 3)
                                          : rand_ties(n, seed, -3.0f, variant == 2 ? 0.0f : 3.0f, 0.125f);
                size_t P = 0;
                for (size_t i = 0; i < n; i++) P += pre[i] > 0;
                gpu g;
                gpu_init(&g, DTYPES[di]);
                float *dpre = gpu_put(&g, pre, n * 4);
                const size_t counts[] = {0, 1, n / 3, P ? P - 1 : 0, P, P + 1, n - 1};
                for (size_t ci = 0; ci < sizeof counts / sizeof *counts; ci++) {
                    float ref = -1, got = -2;
                    OK(lp_sae_kth_largest(cpu(), &ref, pre, n, counts[ci]));
                    OK(lp_sae_kth_largest(&g.c, &got, dpre, n, counts[ci]));
                    char label[96];
                    snprintf(label, sizeof label, "n=%zu count=%zu (%zu positive)", n, counts[ci], P);
                    expect_close(OP_KTH, DTYPES[di], label, seed, &got, &ref, 1);
                }
                gpu_done(&g, "kth_largest");
                free(pre);
            }
}

/* One radix pass on the device against the CPU twin: every pass of a whole selection (the
 * prefixes the CPU's own picks lead to), counts exact. */
Test(sae_ops_cuda, radix_hist) {
    LP_TEST_REQUIRE_GPU();
    static const size_t sizes[] = {0, 1, 1000, EMU_CAP(3000017, 100003)};
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++)
        for (int variant = 0; variant < 2; variant++) { /* ties, continuous */
            const size_t n = sizes[si];
            const uint64_t seed = 450 + si * 2 + variant;
            float *pre = variant ? lp_test_rand(n, seed, -2, 3) : rand_ties(n, seed, -3.0f, 3.0f, 0.125f);
            gpu g;
            gpu_init(&g, LP_F32);
            float *dpre = n ? gpu_put(&g, pre, n * 4) : NULL;
            int64_t *dhist = gpu_alloc(&g, 256 * sizeof(int64_t)), ref[256], rank = n / 3 + 1;
            uint32_t prefix = 0, mask = 0;
            for (int shift = 24; shift >= 0; shift -= 8) {
                OK(lp_sae_radix_hist(cpu(), ref, pre, n, prefix, mask, shift));
                OK(lp_sae_radix_hist(&g.c, dhist, dpre, n, prefix, mask, shift));
                int64_t *got = gpu_get(&g, dhist, 256 * sizeof(int64_t));
                cr_expect(memcmp(got, ref, sizeof ref) == 0, "radix_hist n=%zu variant %d shift %d: counts differ", n, variant, shift);
                free(got);
                if (!lp_sae_radix_pick(ref, &rank, &prefix, &mask, shift)) break;
            }
            gpu_done(&g, "radix_hist");
            free(pre);
        }
}

/* ---- sparse decode and the sparse gradients ---- */

/* (N, K, D, S): tiny, odd, K above one shared-memory chunk (256), the benchmark's widths */
static const int SPARSE_SHAPES[][4] = {{1, 1, 1, 1}, {31, 7, 33, 50}, {33, 300, 1000, 400}, {256, 32, 768, 24576}};
#define NSPARSE (sizeof SPARSE_SHAPES / sizeof *SPARSE_SHAPES)

Test(sae_ops_cuda, decode_sparse) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < NSPARSE; si++)
            for (int with_bias = 0; with_bias < 2; with_bias++) {
                const int N = SPARSE_SHAPES[si][0], K = SPARSE_SHAPES[si][1], D = SPARSE_SHAPES[si][2], S = SPARSE_SHAPES[si][3];
                const uint64_t seed = 500 + si;
                int32_t *idx = lp_test_rand_idx(N, K, S, seed);
                float *val = lp_test_rand((size_t)N * K, seed + 1, 0, 3), *W = lp_test_rand((size_t)S * D, seed + 2, -1, 1);
                float *bias = lp_test_rand(D, seed + 3, -1, 1), *ref = xmalloc((size_t)N * D * 4);
                OK(lp_sae_decode_sparse(cpu(), ref, idx, val, W, with_bias ? bias : NULL, N, K, D));
                gpu g;
                gpu_init(&g, DTYPES[di]);
                int32_t *didx = gpu_put(&g, idx, (size_t)N * K * 4);
                float *dval = gpu_put(&g, val, (size_t)N * K * 4), *dW = gpu_put(&g, W, (size_t)S * D * 4);
                float *db = gpu_put(&g, bias, (size_t)D * 4), *dout = gpu_alloc(&g, (size_t)N * D * 4);
                OK(lp_sae_decode_sparse(&g.c, dout, didx, dval, dW, with_bias ? db : NULL, N, K, D));
                float *got = gpu_get(&g, dout, (size_t)N * D * 4);
                char label[64];
                snprintf(label, sizeof label, "N=%d K=%d D=%d%s", N, K, D, with_bias ? " bias" : "");
                expect_close(OP_DECODE, DTYPES[di], label, seed, got, ref, (size_t)N * D);
                gpu_done(&g, label);
                free(idx), free(val), free(W), free(bias), free(ref), free(got);
            }
}

Test(sae_ops_cuda, decode_sparse_grad) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < NSPARSE; si++) {
            const int N = SPARSE_SHAPES[si][0], K = SPARSE_SHAPES[si][1], D = SPARSE_SHAPES[si][2], S = SPARSE_SHAPES[si][3];
            const uint64_t seed = 600 + si;
            int32_t *idx = lp_test_rand_idx(N, K, S, seed);
            float *val = lp_test_rand((size_t)N * K, seed + 1, 0, 3), *W = lp_test_rand((size_t)S * D, seed + 2, -1, 1);
            float *dout = lp_test_rand((size_t)N * D, seed + 3, -1, 1), *rdW = lp_test_rand((size_t)S * D, seed + 4, -1, 1);
            float *dW0 = dup(rdW, (size_t)S * D * 4), *rdval = xmalloc((size_t)N * K * 4);
            OK(lp_sae_decode_sparse_grad(cpu(), rdval, rdW, dout, idx, val, W, N, K, D));
            gpu g;
            gpu_init(&g, DTYPES[di]);
            int32_t *didx = gpu_put(&g, idx, (size_t)N * K * 4);
            float *dv = gpu_put(&g, val, (size_t)N * K * 4), *dWt = gpu_put(&g, W, (size_t)S * D * 4);
            float *dg = gpu_put(&g, dout, (size_t)N * D * 4), *ddW = gpu_put(&g, dW0, (size_t)S * D * 4);
            float *ddval = gpu_alloc(&g, (size_t)N * K * 4);
            OK(lp_sae_decode_sparse_grad(&g.c, ddval, ddW, dg, didx, dv, dWt, N, K, D));
            float *gdval = gpu_get(&g, ddval, (size_t)N * K * 4), *gdW = gpu_get(&g, ddW, (size_t)S * D * 4);
            char label[64];
            snprintf(label, sizeof label, "N=%d K=%d D=%d S=%d", N, K, D, S);
            expect_close(OP_DECODE_DVAL, DTYPES[di], label, seed, gdval, rdval, (size_t)N * K);
            expect_close(OP_DECODE_DW, DTYPES[di], label, seed, gdW, rdW, (size_t)S * D);
            gpu_done(&g, label);
            free(idx), free(val), free(W), free(dout), free(rdW), free(dW0), free(rdval), free(gdval), free(gdW);
        }
}

Test(sae_ops_cuda, encode_sparse_grads) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < NSPARSE; si++) {
            const int N = SPARSE_SHAPES[si][0], K = SPARSE_SHAPES[si][1], D = SPARSE_SHAPES[si][2], S = SPARSE_SHAPES[si][3];
            const uint64_t seed = 700 + si;
            int32_t *idx = lp_test_rand_idx(N, K, S, seed);
            float *x = lp_test_rand((size_t)N * D, seed + 1, -1, 1), *dpre = lp_test_rand((size_t)N * K, seed + 2, -1, 1);
            float *rW = lp_test_rand((size_t)D * S, seed + 3, -1, 1), *rb = lp_test_rand(S, seed + 4, -1, 1);
            float *W0 = dup(rW, (size_t)D * S * 4), *b0 = dup(rb, (size_t)S * 4), *rdx = xmalloc((size_t)N * D * 4);
            OK(lp_sae_encode_sparse_grad(cpu(), rW, rb, x, idx, dpre, N, K, D, S));
            OK(lp_sae_encode_sparse_input_grad(cpu(), rdx, dpre, idx, W0, N, K, D, S)); /* W0 as a weight */
            gpu g;
            gpu_init(&g, DTYPES[di]);
            int32_t *didx = gpu_put(&g, idx, (size_t)N * K * 4);
            float *dx = gpu_put(&g, x, (size_t)N * D * 4), *dp = gpu_put(&g, dpre, (size_t)N * K * 4);
            float *dW = gpu_put(&g, W0, (size_t)D * S * 4), *db = gpu_put(&g, b0, (size_t)S * 4);
            float *dWenc = gpu_put(&g, W0, (size_t)D * S * 4), *ddx = gpu_alloc(&g, (size_t)N * D * 4);
            OK(lp_sae_encode_sparse_grad(&g.c, dW, db, dx, didx, dp, N, K, D, S));
            OK(lp_sae_encode_sparse_input_grad(&g.c, ddx, dp, didx, dWenc, N, K, D, S));
            float *gW = gpu_get(&g, dW, (size_t)D * S * 4), *gb = gpu_get(&g, db, (size_t)S * 4);
            float *gdx = gpu_get(&g, ddx, (size_t)N * D * 4);
            char label[64];
            snprintf(label, sizeof label, "N=%d K=%d D=%d S=%d", N, K, D, S);
            expect_close(OP_ENCODE_DW, DTYPES[di], label, seed, gW, rW, (size_t)D * S);
            expect_close(OP_ENCODE_DB, DTYPES[di], label, seed, gb, rb, S);
            expect_close(OP_ENCODE_DX, DTYPES[di], label, seed, gdx, rdx, (size_t)N * D);
            gpu_done(&g, label);
            free(idx), free(x), free(dpre), free(rW), free(rb), free(W0), free(b0), free(rdx), free(gW), free(gb), free(gdx);
        }
}

/* ---- activations ---- */

Test(sae_ops_cuda, scale_relu_jumprelu_and_their_masks) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][2] = {{1, 1}, {31, 33}, {33, 1000}, {7, 24576}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
            for (int in_place = 0; in_place < 2; in_place++) {
                const int N = shapes[si][0], S = shapes[si][1];
                const size_t n = (size_t)N * S;
                const uint64_t seed = 800 + si;
                float *pre = rand_ties(n, seed, -2, 2, 0.125f), *theta = lp_test_rand(S, seed + 1, 0, 1);
                for (int s = 0; s < S; s += 3) theta[s] = 0.5f;
                float *df = lp_test_rand(n, seed + 2, -1, 1), *ref = xmalloc(n * 4);
                gpu g;
                gpu_init(&g, DTYPES[di]);
                float *dpre = gpu_put(&g, pre, n * 4), *dth = gpu_put(&g, theta, (size_t)S * 4);
                float *ddf = gpu_put(&g, df, n * 4), *dout = gpu_alloc(&g, n * 4);
                char label[64];
                for (int op = 0; op < 4; op++) {
                    /* in place: the op's input buffer is also its output */
                    const float *src = op == 3 ? df : pre;
                    float *io = in_place ? gpu_put(&g, src, n * 4) : dout, *in = in_place ? io : (op == 3 ? ddf : dpre);
                    if (op == 0) {
                        memcpy(ref, pre, n * 4);
                        OK(lp_sae_scale(cpu(), ref, -0.37f, n));
                        if (!in_place) OK(lp_ctx_copy(&g.c, dout, dpre, n * 4));
                        OK(lp_sae_scale(&g.c, in_place ? io : dout, -0.37f, n));
                    } else if (op == 1) {
                        OK(lp_sae_relu(cpu(), ref, pre, n));
                        OK(lp_sae_relu(&g.c, io, in, n));
                    } else if (op == 2) {
                        OK(lp_sae_jumprelu(cpu(), ref, pre, theta, N, S));
                        OK(lp_sae_jumprelu(&g.c, io, in, dth, N, S));
                    } else {
                        OK(lp_sae_relu_grad(cpu(), ref, df, pre, n));
                        OK(lp_sae_relu_grad(&g.c, io, in, dpre, n));
                    }
                    float *got = gpu_get(&g, io, n * 4);
                    snprintf(label, sizeof label, "%s N=%d S=%d%s", (const char *[]){"scale", "relu", "jumprelu", "relu_grad"}[op],
                             N, S, in_place ? " in place" : "");
                    expect_close(OP_ELEMENTWISE, DTYPES[di], label, seed, got, ref, n);
                    free(got);
                }
                gpu_done(&g, label);
                free(pre), free(theta), free(df), free(ref);
            }
}

/* dpre is one fp32 add under a mask: exact; its column sums and those of relu(pre) as
 * col_sum's (split over row slices, by atomics, at d_in-like widths). */
Test(sae_ops_cuda, l1_relu_grad) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][2] = {{1, 1}, {31, 33}, {1000, 31}, {EMU_CAP(4096, 1024), 768}, {EMU_CAP(512, 64), 24576}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
            for (int in_place = 0; in_place < 2; in_place++) {
                const int N = shapes[si][0], S = shapes[si][1];
                const size_t n = (size_t)N * S;
                const uint64_t seed = 850 + si;
                float *pre = rand_ties(n, seed, -2, 2, 0.125f), *w = lp_test_rand(S, seed + 1, 0, 0.01f);
                float *df = lp_test_rand(n, seed + 2, -1, 1), *db = lp_test_rand(S, seed + 3, -1, 1);
                float *ref = xmalloc(n * 4), *rdb = dup(db, (size_t)S * 4), *rf = xmalloc((size_t)S * 4);
                OK(lp_sae_l1_relu_grad(cpu(), ref, rdb, rf, df, pre, w, N, S));
                gpu g;
                gpu_init(&g, DTYPES[di]);
                float *dpre_in = gpu_put(&g, pre, n * 4), *ddf = gpu_put(&g, df, n * 4), *dw = gpu_put(&g, w, (size_t)S * 4);
                float *ddb = gpu_put(&g, db, (size_t)S * 4), *dfs = gpu_alloc(&g, (size_t)S * 4);
                float *out = in_place ? ddf : gpu_alloc(&g, n * 4);
                OK(lp_sae_l1_relu_grad(&g.c, out, ddb, dfs, ddf, dpre_in, dw, N, S));
                float *got = gpu_get(&g, out, n * 4), *gdb = gpu_get(&g, ddb, (size_t)S * 4), *gf = gpu_get(&g, dfs, (size_t)S * 4);
                char label[64];
                snprintf(label, sizeof label, "dpre N=%d S=%d%s", N, S, in_place ? " in place" : "");
                expect_close(OP_ELEMENTWISE, DTYPES[di], label, seed, got, ref, n);
                snprintf(label, sizeof label, "db N=%d S=%d%s", N, S, in_place ? " in place" : "");
                expect_close(OP_L1_SUMS, DTYPES[di], label, seed, gdb, rdb, S);
                snprintf(label, sizeof label, "fsum N=%d S=%d%s", N, S, in_place ? " in place" : "");
                expect_close(OP_L1_SUMS, DTYPES[di], label, seed, gf, rf, S);
                gpu_done(&g, label);
                free(pre), free(w), free(df), free(db), free(ref), free(rdb), free(rf), free(got), free(gdb), free(gf);
            }
}

Test(sae_ops_cuda, jumprelu_grad) {
    LP_TEST_REQUIRE_GPU();
    /* narrow inputs split their rows over blocks (atomics into dtheta) */
    static const int shapes[][2] = {{1, 1}, {31, 33}, {1000, 31}, {4096, 96}, {256, 24576}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
            const int N = shapes[si][0], S = shapes[si][1];
            const size_t n = (size_t)N * S;
            const uint64_t seed = 900 + si;
            const float eps = 0.5f, l0 = 0.3f / N;
            float *pre = lp_test_rand(n, seed, -1, 2), *theta = lp_test_rand(S, seed + 1, 0.2f, 1.0f);
            float *df = lp_test_rand(n, seed + 2, -1, 1), *rth = lp_test_rand(S, seed + 3, -1, 1);
            float *th0 = dup(rth, (size_t)S * 4), *rdpre = xmalloc(n * 4);
            OK(lp_sae_jumprelu_grad(cpu(), rdpre, rth, df, pre, theta, eps, l0, N, S));
            gpu g;
            gpu_init(&g, DTYPES[di]);
            float *dpre = gpu_put(&g, pre, n * 4), *dth = gpu_put(&g, theta, (size_t)S * 4);
            float *ddf = gpu_put(&g, df, n * 4), *ddth = gpu_put(&g, th0, (size_t)S * 4);
            OK(lp_sae_jumprelu_grad(&g.c, ddf, ddth, ddf, dpre, dth, eps, l0, N, S)); /* dpre in place of df */
            float *gdpre = gpu_get(&g, ddf, n * 4), *gth = gpu_get(&g, ddth, (size_t)S * 4);
            char label[64];
            snprintf(label, sizeof label, "jumprelu_grad dpre N=%d S=%d", N, S);
            expect_close(OP_ELEMENTWISE, DTYPES[di], label, seed, gdpre, rdpre, n);
            snprintf(label, sizeof label, "N=%d S=%d", N, S);
            expect_close(OP_JUMPRELU_DTHETA, DTYPES[di], label, seed, gth, rth, S);
            gpu_done(&g, label);
            free(pre), free(theta), free(df), free(rth), free(th0), free(rdpre), free(gdpre), free(gth);
        }
}

/* ---- optimizer, decoder rows, metrics ---- */

Test(sae_ops_cuda, adam_three_steps) {
    LP_TEST_REQUIRE_GPU();
    static const size_t sizes[] = {1, 31, 100003};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
            const size_t n = sizes[si];
            const uint64_t seed = 1000 + si;
            float *p = lp_test_rand(n, seed, -1, 1), *m = calloc(n, 4), *v = calloc(n, 4);
            gpu g;
            gpu_init(&g, DTYPES[di]);
            float *dp = gpu_put(&g, p, n * 4), *dm = gpu_put(&g, m, n * 4), *dv = gpu_put(&g, v, n * 4);
            float *dg = gpu_alloc(&g, n * 4);
            for (int t = 1; t <= 3; t++) {
                float *gr = lp_test_rand(n, seed + 10 * t, -1, 1);
                OK(lp_adam_step(cpu(), p, gr, m, v, n, 1e-3f, 0.9f, 0.999f, 1e-8f, t));
                OK(lp_ctx_to_device(&g.c, dg, gr, n * 4));
                OK(lp_adam_step(&g.c, dp, dg, dm, dv, n, 1e-3f, 0.9f, 0.999f, 1e-8f, t));
                free(gr);
            }
            float *gp = gpu_get(&g, dp, n * 4), *gm = gpu_get(&g, dm, n * 4), *gv = gpu_get(&g, dv, n * 4);
            char label[64];
            snprintf(label, sizeof label, "n=%zu p", n);
            expect_close(OP_ADAM, DTYPES[di], label, seed, gp, p, n);
            snprintf(label, sizeof label, "n=%zu m", n);
            expect_close(OP_ADAM, DTYPES[di], label, seed, gm, m, n);
            snprintf(label, sizeof label, "n=%zu v", n);
            expect_close(OP_ADAM, DTYPES[di], label, seed, gv, v, n);
            gpu_done(&g, label);
            free(p), free(m), free(v), free(gp), free(gm), free(gv);
        }
}

Test(sae_ops_cuda, rows_unit_norm_remove_parallel_norm) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][2] = {{1, 1}, {31, 33}, {1000, 31}, {33, 1000}, {4096, 768}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
            const int S = shapes[si][0], D = shapes[si][1];
            const size_t n = (size_t)S * D;
            const uint64_t seed = 1100 + si;
            float *W = lp_test_rand(n, seed, -1, 1), *dW = lp_test_rand(n, seed + 1, -1, 1);
            if (S > 1) memset(W + D, 0, (size_t)D * 4); /* a zero row */
            float *rn = xmalloc((size_t)S * 4), *rW = dup(W, n * 4), *rdW = dup(dW, n * 4);
            OK(lp_rows_norm(cpu(), rn, rW, S, D));
            OK(lp_rows_unit_norm(cpu(), rW, S, D));
            OK(lp_rows_remove_parallel(cpu(), rdW, rW, S, D));
            gpu g;
            gpu_init(&g, DTYPES[di]);
            float *dWt = gpu_put(&g, W, n * 4), *ddW = gpu_put(&g, dW, n * 4), *dn = gpu_alloc(&g, (size_t)S * 4);
            float *dWu = gpu_put(&g, rW, n * 4); /* the CPU's unit rows: remove_parallel on the same input */
            OK(lp_rows_norm(&g.c, dn, dWt, S, D));
            OK(lp_rows_unit_norm(&g.c, dWt, S, D));
            OK(lp_rows_remove_parallel(&g.c, ddW, dWu, S, D));
            float *gn = gpu_get(&g, dn, (size_t)S * 4), *gW = gpu_get(&g, dWt, n * 4), *gdW = gpu_get(&g, ddW, n * 4);
            char label[64];
            snprintf(label, sizeof label, "rows_norm S=%d D=%d", S, D);
            expect_close(OP_ROWS, DTYPES[di], label, seed, gn, rn, S);
            snprintf(label, sizeof label, "rows_unit_norm S=%d D=%d", S, D);
            expect_close(OP_ROWS, DTYPES[di], label, seed, gW, rW, n);
            snprintf(label, sizeof label, "rows_remove_parallel S=%d D=%d", S, D);
            expect_close(OP_ROWS, DTYPES[di], label, seed, gdW, rdW, n);
            gpu_done(&g, label);
            free(W), free(dW), free(rn), free(rW), free(rdW), free(gn), free(gW), free(gdW);
        }
}

Test(sae_ops_cuda, recon_sums) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][2] = {{1, 1}, {31, 33}, {1000, 31}, {4096, 768}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
            const int N = shapes[si][0], D = shapes[si][1];
            const size_t n = (size_t)N * D;
            const uint64_t seed = 1200 + si;
            float *x = lp_test_rand(n, seed, 99, 101), *xh = lp_test_rand(n, seed + 1, 99, 101);
            if (N > 2) memset(x + D, 0, (size_t)D * 4), memset(xh + 2 * D, 0, (size_t)D * 4);
            double ref[4], got[4];
            OK(lp_sae_recon_sums(cpu(), ref, x, xh, N, D));
            gpu g;
            gpu_init(&g, DTYPES[di]);
            float *dx = gpu_put(&g, x, n * 4), *dxh = gpu_put(&g, xh, n * 4);
            OK(lp_sae_recon_sums(&g.c, got, dx, dxh, N, D));
            lp_cmp c = {0};
            for (int i = 0; i < 4; i++) {
                const double scale = fabs(ref[i]) > 0 ? fabs(ref[i]) : 1, rel = fabs(got[i] - ref[i]) / scale;
                if (!isfinite(got[i])) c.n_bad++;
                if (rel > c.max_rel) c.max_rel = rel, c.worst = i;
            }
            char what[96];
            snprintf(what, sizeof what, "%s %s N=%d D=%d", BUDGET[OP_RECON].op, lp_dtype_name(DTYPES[di]), N, D);
            LP_EXPECT_WITHIN(what, seed, c, max_rel, BUDGET[OP_RECON].nmse);
            gpu_done(&g, what);
            free(x), free(xh);
        }
}

Test(sae_ops_cuda, fire_counts) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][3] = {{1, 1, 1}, {33, 7, 50}, {EMU_CAP(4096, 64), 32, 24576}, {4096, 8, 96}}; /* N, K, S */
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
            const int N = shapes[si][0], K = shapes[si][1], S = shapes[si][2];
            const uint64_t seed = 1300 + si;
            int32_t *idx = lp_test_rand_idx(N, K, S, seed);
            float *val = rand_ties((size_t)N * K, seed + 1, -1, 2, 0.5f), *f = rand_ties((size_t)N * S, seed + 2, -1, 1, 0.25f);
            if (N * K > 4) idx[3] = -1, idx[4] = S, val[3] = val[4] = 1; /* ignored */
            int64_t *c0 = xmalloc((size_t)S * 8), *rs = xmalloc((size_t)S * 8), *rd = xmalloc((size_t)S * 8);
            for (int s = 0; s < S; s++) c0[s] = rs[s] = rd[s] = s;
            OK(lp_sae_fire_counts(cpu(), rs, idx, val, NULL, N, K, S));
            OK(lp_sae_fire_counts(cpu(), rd, NULL, NULL, f, N, K, S));
            gpu g;
            gpu_init(&g, DTYPES[di]);
            int32_t *didx = gpu_put(&g, idx, (size_t)N * K * 4);
            float *dval = gpu_put(&g, val, (size_t)N * K * 4), *df = gpu_put(&g, f, (size_t)N * S * 4);
            int64_t *dcs = gpu_put(&g, c0, (size_t)S * 8), *dcd = gpu_put(&g, c0, (size_t)S * 8);
            OK(lp_sae_fire_counts(&g.c, dcs, didx, dval, NULL, N, K, S));
            OK(lp_sae_fire_counts(&g.c, dcd, NULL, NULL, df, N, K, S));
            int64_t *gs = gpu_get(&g, dcs, (size_t)S * 8), *gd = gpu_get(&g, dcd, (size_t)S * 8);
            char label[64];
            snprintf(label, sizeof label, "sparse N=%d K=%d S=%d", N, K, S);
            expect_same_ints(OP_FIRE, DTYPES[di], label, seed, gs, rs, S, 8);
            snprintf(label, sizeof label, "dense N=%d S=%d", N, S);
            expect_same_ints(OP_FIRE, DTYPES[di], label, seed, gd, rd, S, 8);
            gpu_done(&g, label);
            free(idx), free(val), free(f), free(c0), free(rs), free(rd), free(gs), free(gd);
        }
}

/* The SAE runner feeds F32 buffers to the generic ops, which read the context's activation
 * dtype: a BF16 context is refused rather than misreading them. */
Test(sae_ops_cuda, runner_refuses_a_bf16_context) {
    LP_TEST_REQUIRE_GPU();
    lp_ctx c;
    OK(lp_ctx_init(&c, LP_CUDA, LP_BF16));
    lp_sae_cfg cfg = {.arch = LP_SAE_STANDARD, .d_in = 8, .d_sae = 16, .d_out = 8};
    snprintf(cfg.normalize, sizeof cfg.normalize, "none");
    lp_sae *s;
    OK(lp_sae_alloc(&s, &cfg, &c));
    sae_runner *r = NULL;
    cr_expect_eq(sae_runner_new(&r, s, &c, 4, 1, 0), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "F32") != NULL, "%s", lp_last_error());
    cr_expect(r == NULL);
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
}
