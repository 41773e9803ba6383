/* test_ops.c: every CPU op (through the public dispatch, on a CPU context) against an
 * independent float64 reference written here, on random inputs of awkward sizes
 * (1, 31, 33 and >= 1000 along the op's main axes). Seeds are fixed and printed on
 * failure; budgets are declared once below, per op, as normalized squared error. */
#include "loupe/ops.h"
#include "ops/ops_internal.h"
#include "testutil.h"

/* fp32 against fp64: element-wise ops round once (~1e-14 nmse); reductions of length
 * up to ~1000 accumulate ~sqrt(n) roundings; exp/tanh add a few ulps. */
static const struct { const char *op; double nmse; } BUDGET[] = {
    {"embed", 0}, {"pos_embed", 0}, {"add", 1e-13}, {"gelu", 1e-12}, {"ln_scale", 1e-12}, {"ln_apply", 1e-11},
    {"affine", 1e-13}, {"matmul", 1e-10}, {"attention", 1e-10}, {"attn_scores", 1e-10}, {"softmax", 1e-11},
    {"attn_apply", 1e-10}, {"cross_entropy", 1e-11}, {"edit", 0}, {"gather", 0},
    /* Llama family. rope: a rotation of two fp32 products (cancellation only where the
     * output is small, which nmse discounts). attention_cached: online softmax in fp32, one
     * running rescale per new max. cached_decode: a decode step and the full pass compute each
     * row by the same loop, so token-by-token generation must give the same bits. */
    {"rms_scale", 1e-12}, {"rms_apply", 1e-12}, {"rope", 1e-12}, {"silu_mul", 1e-12},
    {"attention_cached", 1e-10}, {"cached_decode", 0},
};
static double budget(const char *op) {
    for (size_t i = 0; i < sizeof BUDGET / sizeof *BUDGET; i++)
        if (strcmp(BUDGET[i].op, op) == 0) return BUDGET[i].nmse;
    cr_assert_fail("no budget for %s", op);
    return 0;
}

static lp_ctx cpu;
static void setup(void) { cr_assert_eq(lp_ctx_init(&cpu, LP_CPU, LP_F32), LP_OK); }
TestSuite(ops, .init = setup);

static const int SIZES[] = {1, 31, 33, 1000};
#define NS (int)(sizeof SIZES / sizeof *SIZES)

static void check(const char *op, int a, int b, uint64_t seed, const float *got, const double *ref, size_t n) {
    char what[96];
    snprintf(what, sizeof what, "%s (%d, %d)", op, a, b);
    lp_cmp c = lp_compare(got, ref, n);
    double bud = budget(op);
    if (bud == 0) { /* exact ops: copies */
        cr_expect(c.max_abs == 0 && c.n_bad == 0, "%s: not exact (max |diff| %g, seed %llu)", what, c.max_abs, (unsigned long long)seed);
        return;
    }
    LP_EXPECT_WITHIN(what, seed, c, nmse, bud);
}

Test(ops, embed_and_pos_embed) {
    for (int i = 0; i < NS; i++) {
        int N = SIZES[i], D = SIZES[(i + 1) % NS], V = 50;
        uint64_t seed = 100 + i;
        float *wte = lp_test_rand((size_t)V * D, seed, -1, 1), *out = malloc((size_t)N * D * 4);
        int32_t *tok = malloc(N * 4);
        uint64_t s = seed;
        for (int n = 0; n < N; n++) tok[n] = (int32_t)(lp_test_next(&s) % V);
        double *ref = malloc((size_t)N * D * 8);
        for (int n = 0; n < N; n++)
            for (int d = 0; d < D; d++) ref[(size_t)n * D + d] = wte[(size_t)tok[n] * D + d];
        cr_assert_eq(lp_embed(&cpu, out, tok, wte, N, D), LP_OK);
        check("embed", N, D, seed, out, ref, (size_t)N * D);
        int B = 3, T = N < 50 ? N : 50;
        float *pos = malloc((size_t)B * T * D * 4);
        double *pref = malloc((size_t)B * T * D * 8);
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++)
                for (int d = 0; d < D; d++) pref[((size_t)b * T + t) * D + d] = wte[(size_t)t * D + d];
        cr_assert_eq(lp_pos_embed(&cpu, pos, wte, B, T, D), LP_OK);
        check("pos_embed", T, D, seed, pos, pref, (size_t)B * T * D);
        free(wte), free(out), free(tok), free(ref), free(pos), free(pref);
    }
}

Test(ops, add_gelu_affine) {
    for (int i = 0; i < NS; i++) {
        int N = SIZES[i], D = SIZES[NS - 1 - i];
        size_t n = (size_t)N * D;
        uint64_t seed = 200 + i;
        float *a = lp_test_rand(n, seed, -4, 4), *b = lp_test_rand(n, seed + 1, -4, 4), *o = malloc(n * 4);
        float *w = lp_test_rand(D, seed + 2, -2, 2), *bb = lp_test_rand(D, seed + 3, -1, 1);
        double *ref = malloc(n * 8);
        for (size_t j = 0; j < n; j++) ref[j] = (double)a[j] + b[j];
        cr_assert_eq(lp_add(&cpu, o, a, b, n), LP_OK);
        check("add", N, D, seed, o, ref, n);
        for (size_t j = 0; j < n; j++) {
            double x = a[j];
            ref[j] = 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
        }
        cr_assert_eq(lp_gelu(&cpu, o, a, n), LP_OK);
        check("gelu", N, D, seed, o, ref, n);
        for (size_t j = 0; j < n; j++) ref[j] = (double)a[j] * w[j % D] + bb[j % D];
        cr_assert_eq(lp_affine(&cpu, o, a, w, bb, N, D), LP_OK);
        check("affine", N, D, seed, o, ref, n);
        /* in place, as the forward uses it */
        for (size_t j = 0; j < n; j++) ref[j] = (double)a[j] + b[j];
        cr_assert_eq(lp_add(&cpu, a, a, b, n), LP_OK);
        check("add", N, D, seed, a, ref, n);
        free(a), free(b), free(o), free(w), free(bb), free(ref);
    }
}

Test(ops, layernorm_pieces) {
    for (int i = 0; i < NS; i++) {
        int N = SIZES[NS - 1 - i], D = SIZES[i];
        size_t n = (size_t)N * D;
        uint64_t seed = 300 + i;
        /* a large common offset: the variance must not be computed as E[x^2] - E[x]^2 */
        float *x = lp_test_rand(n, seed, 99, 101), *w = lp_test_rand(D, seed + 1, 0.5f, 1.5f), *b = lp_test_rand(D, seed + 2, -1, 1);
        float *scale = malloc(N * 4), *out = malloc(n * 4), *norm = malloc(n * 4);
        double *rs = malloc(N * 8), *ro = malloc(n * 8), *rn = malloc(n * 8);
        for (int r = 0; r < N; r++) {
            double mean = 0, var = 0;
            for (int d = 0; d < D; d++) mean += x[(size_t)r * D + d];
            mean /= D;
            for (int d = 0; d < D; d++) var += pow(x[(size_t)r * D + d] - mean, 2);
            rs[r] = sqrt(var / D + 1e-5);
            for (int d = 0; d < D; d++) {
                rn[(size_t)r * D + d] = (x[(size_t)r * D + d] - mean) / rs[r];
                ro[(size_t)r * D + d] = rn[(size_t)r * D + d] * w[d] + b[d];
            }
        }
        cr_assert_eq(lp_ln_scale(&cpu, scale, x, N, D, 1e-5f), LP_OK);
        check("ln_scale", N, D, seed, scale, rs, N);
        cr_assert_eq(lp_ln_apply(&cpu, out, x, scale, w, b, N, D), LP_OK);
        if (D > 1) check("ln_apply", N, D, seed, out, ro, n); /* D = 1: the normalized value is 0/eps, all zero */
        cr_assert_eq(lp_ln_apply(&cpu, norm, x, scale, NULL, NULL, N, D), LP_OK);
        if (D > 1) check("ln_apply", N, D, seed, norm, rn, n);
        free(x), free(w), free(b), free(scale), free(out), free(norm), free(rs), free(ro), free(rn);
    }
}

Test(ops, matmul_both_layouts_with_and_without_bias) {
    const int shapes[][3] = {{1, 1, 1}, {31, 33, 1}, {33, 31, 1000}, {1000, 33, 31}, {7, 1000, 33}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
        for (int trans = 0; trans < 2; trans++)
            for (int with_bias = 0; with_bias < 2; with_bias++) {
                int N = shapes[si][0], K = shapes[si][1], M = shapes[si][2];
                uint64_t seed = 400 + si * 4 + trans * 2 + with_bias;
                float *x = lp_test_rand((size_t)N * K, seed, -1, 1), *w = lp_test_rand((size_t)K * M, seed + 1, -1, 1);
                float *bias = with_bias ? lp_test_rand(M, seed + 2, -1, 1) : NULL, *out = malloc((size_t)N * M * 4);
                double *ref = malloc((size_t)N * M * 8);
                for (int n = 0; n < N; n++)
                    for (int m = 0; m < M; m++) {
                        double acc = bias ? bias[m] : 0;
                        for (int k = 0; k < K; k++) acc += (double)x[(size_t)n * K + k] * (trans ? w[(size_t)m * K + k] : w[(size_t)k * M + m]);
                        ref[(size_t)n * M + m] = acc;
                    }
                cr_assert_eq(lp_matmul(&cpu, out, x, w, bias, N, K, M, trans), LP_OK);
                check("matmul", N, M, seed, out, ref, (size_t)N * M);
                free(x), free(w), free(bias), free(out), free(ref);
            }
}

/* float64 attention reference: z, and optionally scores and pattern */
static void ref_attention(const float *q, const float *k, const float *v, int B, int T, int H, int Hkv, int dh,
                          double *z, double *scores, double *pattern) {
    double *row = malloc(T * 8);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                int g = h / (H / Hkv);
                double mx = -INFINITY, sum = 0;
                for (int s = 0; s <= t; s++) {
                    double acc = 0;
                    for (int i = 0; i < dh; i++)
                        acc += (double)q[(((size_t)b * T + t) * H + h) * dh + i] * k[(((size_t)b * T + s) * Hkv + g) * dh + i];
                    row[s] = acc / sqrt(dh);
                    if (row[s] > mx) mx = row[s];
                }
                for (int s = 0; s < T; s++) {
                    size_t o = (((size_t)b * H + h) * T + t) * T + s;
                    if (scores) scores[o] = s <= t ? row[s] : -INFINITY;
                }
                for (int s = 0; s <= t; s++) sum += exp(row[s] - mx);
                for (int i = 0; i < dh; i++) z[(((size_t)b * T + t) * H + h) * dh + i] = 0;
                for (int s = 0; s < T; s++) {
                    double p = s <= t ? exp(row[s] - mx) / sum : 0;
                    if (pattern) pattern[(((size_t)b * H + h) * T + t) * T + s] = p;
                    if (s > t) continue;
                    for (int i = 0; i < dh; i++)
                        z[(((size_t)b * T + t) * H + h) * dh + i] += p * v[(((size_t)b * T + s) * Hkv + g) * dh + i];
                }
            }
    free(row);
}

Test(ops, attention_fused_and_three_step) {
    /* (B, T, H, Hkv, dh): single token, odd lengths, grouped kv heads, a long row */
    const int shapes[][5] = {{1, 1, 1, 1, 1}, {2, 31, 4, 4, 16}, {1, 33, 8, 2, 33}, {1, 1000, 2, 1, 8}, {3, 17, 6, 3, 64}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        int B = shapes[si][0], T = shapes[si][1], H = shapes[si][2], Hkv = shapes[si][3], dh = shapes[si][4];
        uint64_t seed = 500 + si;
        size_t nq = (size_t)B * T * H * dh, nk = (size_t)B * T * Hkv * dh, ns = (size_t)B * H * T * T;
        float *q = lp_test_rand(nq, seed, -2, 2), *k = lp_test_rand(nk, seed + 1, -2, 2), *v = lp_test_rand(nk, seed + 2, -1, 1);
        float *z = malloc(nq * 4), *sc = malloc(ns * 4), *pat = malloc(ns * 4);
        double *rz = malloc(nq * 8), *rs = malloc(ns * 8), *rp = malloc(ns * 8);
        ref_attention(q, k, v, B, T, H, Hkv, dh, rz, rs, rp);
        cr_assert_eq(lp_attention(&cpu, z, q, k, v, B, T, H, Hkv, dh), LP_OK);
        check("attention", T, H, seed, z, rz, nq);
        cpu_attention_rows(z, q, k, v, B, T, H, Hkv, dh); /* the fallback form */
        check("attention", T, H, seed, z, rz, nq);
        cr_assert_eq(lp_attn_scores(&cpu, sc, q, k, B, T, H, Hkv, dh), LP_OK);
        check("attn_scores", T, H, seed, sc, rs, ns); /* -inf entries must match exactly */
        cr_assert_eq(lp_softmax_rows(&cpu, pat, sc, (size_t)B * H * T, T), LP_OK);
        check("softmax", T, H, seed, pat, rp, ns);
        cr_assert_eq(lp_attn_apply(&cpu, z, pat, v, B, T, H, Hkv, dh), LP_OK);
        check("attn_apply", T, H, seed, z, rz, nq);
        free(q), free(k), free(v), free(z), free(sc), free(pat), free(rz), free(rs), free(rp);
    }
}

Test(ops, softmax_of_fully_masked_row_is_zero) {
    float x[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, o[4];
    cr_assert_eq(lp_softmax_rows(&cpu, o, x, 1, 4), LP_OK);
    for (int i = 0; i < 4; i++) cr_expect(o[i] == 0.0f, "entry %d is %g", i, o[i]);
}

Test(ops, cross_entropy) {
    const int shapes[][2] = {{1, 1}, {31, 33}, {33, 1000}, {4, 50257}};
    for (size_t si = 0; si < 4; si++) {
        int N = shapes[si][0], V = shapes[si][1];
        uint64_t seed = 600 + si, s = seed;
        float *lg = lp_test_rand((size_t)N * V, seed, -20, 20), *loss = malloc(N * 4);
        int32_t *tg = malloc(N * 4);
        double *ref = malloc(N * 8);
        for (int n = 0; n < N; n++) {
            tg[n] = n % 5 == 4 ? -1 : (int32_t)(lp_test_next(&s) % V);
            double mx = -INFINITY, sum = 0;
            for (int i = 0; i < V; i++) mx = fmax(mx, lg[(size_t)n * V + i]);
            for (int i = 0; i < V; i++) sum += exp(lg[(size_t)n * V + i] - mx);
            ref[n] = tg[n] < 0 ? 0 : log(sum) + mx - lg[(size_t)n * V + tg[n]];
        }
        cr_assert_eq(lp_cross_entropy(&cpu, loss, lg, tg, N, V), LP_OK);
        check("cross_entropy", N, V, seed, loss, ref, N);
        free(lg), free(loss), free(tg), free(ref);
    }
}

Test(ops, edits_and_gather) {
    /* [B,T,H,E] and head-outer [B,H,T,T] views */
    const lp_view views[] = {{2, 31, 1, 33, 0}, {3, 7, 4, 16, 0}, {2, 9, 3, 9, 1}, {1, 1000, 1, 1, 0}};
    for (size_t vi = 0; vi < 4; vi++) {
        lp_view v = views[vi];
        size_t n = (size_t)v.B * v.P * v.H * v.E, per = (size_t)v.H * v.E;
        uint64_t seed = 700 + vi;
        uint8_t pm[1000] = {0}, hm[8] = {0};
        for (int p = 0; p < v.P; p += 3) pm[p] = 1;
        for (int h = 0; h < v.H; h += 2) hm[h] = 1;
        float *src = lp_test_rand(n, seed + 1, -1, 1), *vec = lp_test_rand(per, seed + 2, -1, 1);
        for (int kind = LP_EDIT_ZERO; kind <= LP_EDIT_PATCH; kind++) {
            float *a = lp_test_rand(n, seed, -1, 1);
            double *ref = malloc(n * 8);
            for (int b = 0; b < v.B; b++)
                for (int p = 0; p < v.P; p++)
                    for (int h = 0; h < v.H; h++)
                        for (int e = 0; e < v.E; e++) {
                            size_t o = v.head_outer ? (((size_t)b * v.H + h) * v.P + p) * v.E + e : (((size_t)b * v.P + p) * v.H + h) * v.E + e;
                            double x = a[o];
                            if (pm[p] && hm[h]) {
                                if (kind == LP_EDIT_ZERO) x = 0;
                                if (kind == LP_EDIT_SET) x = vec[h * v.E + e];
                                if (kind == LP_EDIT_ADD) x = a[o] + 0.5f * vec[h * v.E + e];
                                if (kind == LP_EDIT_PATCH) x = src[o];
                            }
                            ref[o] = x;
                        }
            cr_assert_eq(lp_edit_apply(&cpu, a, v, kind, kind == LP_EDIT_PATCH ? src : vec, 0.5f, pm, hm), LP_OK);
            check(kind == LP_EDIT_ADD ? "add" : "edit", (int)vi, kind, seed, a, ref, n);
            free(a), free(ref);
        }
        /* gather positions in a scrambled order */
        int32_t pos[3] = {v.P - 1, 0, v.P / 2};
        float *a = lp_test_rand(n, seed, -1, 1), *g = malloc((size_t)v.B * 3 * per * 4);
        double *ref = malloc((size_t)v.B * 3 * per * 8);
        for (int b = 0; b < v.B; b++)
            for (int i = 0; i < 3; i++)
                for (int h = 0; h < v.H; h++)
                    for (int e = 0; e < v.E; e++) {
                        size_t src_o = v.head_outer ? (((size_t)b * v.H + h) * v.P + pos[i]) * v.E + e : (((size_t)b * v.P + pos[i]) * v.H + h) * v.E + e;
                        size_t dst_o = v.head_outer ? (((size_t)b * v.H + h) * 3 + i) * v.E + e : (((size_t)b * 3 + i) * v.H + h) * v.E + e;
                        ref[dst_o] = a[src_o];
                    }
        cr_assert_eq(lp_gather_pos(&cpu, g, a, v, pos, 3), LP_OK);
        check("gather", (int)vi, 3, seed, g, ref, (size_t)v.B * 3 * per);
        free(a), free(g), free(ref), free(src), free(vec);
    }
}

/* ---- Llama family ---- */

Test(ops, rmsnorm_pieces) {
    for (int i = 0; i < NS; i++) {
        int N = SIZES[NS - 1 - i], D = SIZES[i];
        size_t n = (size_t)N * D;
        uint64_t seed = 800 + i;
        /* every third row 100 times larger: the scale follows the row's magnitude */
        float *x = lp_test_rand(n, seed, -2, 2), *w = lp_test_rand(D, seed + 1, 0.5f, 1.5f);
        for (int r = 0; r < N; r += 3)
            for (int d = 0; d < D; d++) x[(size_t)r * D + d] *= 100;
        float *scale = malloc(N * 4), *out = malloc(n * 4), *norm = malloc(n * 4);
        double *rs = malloc(N * 8), *ro = malloc(n * 8), *rn = malloc(n * 8);
        for (int r = 0; r < N; r++) {
            double ss = 0;
            for (int d = 0; d < D; d++) ss += pow(x[(size_t)r * D + d], 2);
            rs[r] = sqrt(ss / D + 1e-6);
            for (int d = 0; d < D; d++) {
                rn[(size_t)r * D + d] = x[(size_t)r * D + d] / rs[r];
                ro[(size_t)r * D + d] = rn[(size_t)r * D + d] * w[d];
            }
        }
        cr_assert_eq(lp_rms_scale(&cpu, scale, x, N, D, 1e-6f), LP_OK);
        check("rms_scale", N, D, seed, scale, rs, N);
        cr_assert_eq(lp_rms_apply(&cpu, out, x, scale, w, N, D), LP_OK);
        check("rms_apply", N, D, seed, out, ro, n);
        cr_assert_eq(lp_rms_apply(&cpu, norm, x, scale, NULL, N, D), LP_OK);
        check("rms_apply", N, D, seed, norm, rn, n);
        cr_assert_eq(lp_rms_apply(&cpu, x, x, scale, w, N, D), LP_OK); /* in place */
        check("rms_apply", N, D, seed, x, ro, n);
        free(x), free(w), free(scale), free(out), free(norm), free(rs), free(ro), free(rn);
    }
}

/* cos/sin tables [n_pos, dh/2] as the model builds them: angle p * theta^(-2i/dh) in double */
static void rope_tables(int n_pos, int dh, float **cos_t, float **sin_t) {
    int half = dh / 2;
    *cos_t = malloc((size_t)n_pos * half * 4), *sin_t = malloc((size_t)n_pos * half * 4);
    for (int p = 0; p < n_pos; p++)
        for (int i = 0; i < half; i++) {
            double a = p * pow(10000.0, -2.0 * i / dh);
            (*cos_t)[(size_t)p * half + i] = (float)cos(a), (*sin_t)[(size_t)p * half + i] = (float)sin(a);
        }
}

Test(ops, rope_rotate_half) {
    /* (B, T, H, dh, pos0): a single pair, odd lengths, a decode step far into the table, a long run */
    const int shapes[][5] = {{1, 1, 1, 2, 0}, {2, 31, 3, 64, 0}, {1, 33, 9, 34, 7}, {3, 1, 4, 128, 999}, {1, 1000, 2, 8, 5}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        int B = shapes[si][0], T = shapes[si][1], H = shapes[si][2], dh = shapes[si][3], pos0 = shapes[si][4];
        int half = dh / 2, n_pos = pos0 + T + 3;
        size_t n = (size_t)B * T * H * dh;
        uint64_t seed = 900 + si;
        float *x = lp_test_rand(n, seed, -3, 3), *out = malloc(n * 4), *ct, *st;
        rope_tables(n_pos, dh, &ct, &st);
        double *ref = malloc(n * 8);
        for (size_t r = 0; r < n / dh; r++) { /* r = (b*T + t)*H + h */
            int p = pos0 + (int)(r / H % T);
            for (int i = 0; i < half; i++) {
                double c = ct[(size_t)p * half + i], s = st[(size_t)p * half + i];
                double x1 = x[r * dh + i], x2 = x[r * dh + i + half];
                ref[r * dh + i] = x1 * c - x2 * s;
                ref[r * dh + i + half] = x2 * c + x1 * s;
            }
        }
        cr_assert_eq(lp_rope(&cpu, out, x, ct, st, B, T, H, dh, pos0), LP_OK);
        check("rope", T, dh, seed, out, ref, n);
        cr_assert_eq(lp_rope(&cpu, x, x, ct, st, B, T, H, dh, pos0), LP_OK); /* in place, as the model calls it */
        check("rope", T, dh, seed, x, ref, n);
        free(x), free(out), free(ct), free(st), free(ref);
    }
}

Test(ops, silu_mul) {
    for (int i = 0; i < NS; i++) {
        int N = SIZES[i], D = SIZES[NS - 1 - i];
        size_t n = (size_t)N * D;
        uint64_t seed = 1000 + i;
        /* gate in [-20, 20]: exp(-gate) spans 2e-9 .. 5e8 */
        float *g = lp_test_rand(n, seed, -20, 20), *u = lp_test_rand(n, seed + 1, -3, 3), *o = malloc(n * 4);
        double *ref = malloc(n * 8);
        for (size_t j = 0; j < n; j++) ref[j] = g[j] / (1 + exp(-(double)g[j])) * u[j];
        cr_assert_eq(lp_silu_mul(&cpu, o, g, u, n), LP_OK);
        check("silu_mul", N, D, seed, o, ref, n);
        cr_assert_eq(lp_silu_mul(&cpu, g, g, u, n), LP_OK); /* in place over the gate */
        check("silu_mul", N, D, seed, g, ref, n);
        free(g), free(u), free(o), free(ref);
    }
}

/* Copies k [B,T,Hkv,dh] into the first T positions of a [B,Tcap,Hkv,dh] cache whose other
 * positions hold NaN: a read past the last key a query may see poisons its row. */
static float *to_cache(const float *k, int B, int T, int Tcap, int Hkv, int dh) {
    size_t row = (size_t)Hkv * dh;
    float *c = malloc((size_t)B * Tcap * row * 4);
    for (size_t j = 0; j < (size_t)B * Tcap * row; j++) c[j] = NAN;
    for (int b = 0; b < B; b++) memcpy(c + (size_t)b * Tcap * row, k + (size_t)b * T * row, (size_t)T * row * 4);
    return c;
}

Test(ops, attention_cached_prefill_chunks_and_decode) {
    /* (B, T, H, Hkv, dh), as in the attention test, plus SmolLM2's heads (9 over 3, dh 64) */
    const int shapes[][5] = {{1, 1, 1, 1, 1}, {2, 31, 4, 4, 16}, {1, 33, 8, 2, 33}, {1, 1000, 2, 1, 8}, {2, 17, 9, 3, 64}};
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        int B = shapes[si][0], T = shapes[si][1], H = shapes[si][2], Hkv = shapes[si][3], dh = shapes[si][4];
        uint64_t seed = 1100 + si;
        size_t nq = (size_t)B * T * H * dh, nk = (size_t)B * T * Hkv * dh, qrow = (size_t)H * dh;
        float *q = lp_test_rand(nq, seed, -2, 2), *k = lp_test_rand(nk, seed + 1, -2, 2), *v = lp_test_rand(nk, seed + 2, -1, 1);
        float *z = malloc(nq * 4), *zf = malloc(nq * 4);
        double *rz = malloc(nq * 8), *rf = malloc(nq * 8);
        ref_attention(q, k, v, B, T, H, Hkv, dh, rz, NULL, NULL);

        /* pos0 = 0, Tcap = T: the same as lp_attention */
        cr_assert_eq(lp_attention_cached(&cpu, zf, q, k, v, B, T, T, 0, H, Hkv, dh), LP_OK);
        check("attention_cached", T, H, seed, zf, rz, nq);
        cr_assert_eq(lp_attention(&cpu, z, q, k, v, B, T, H, Hkv, dh), LP_OK);
        for (size_t j = 0; j < nq; j++) rf[j] = z[j];
        check("attention_cached", T, H, seed, zf, rf, nq); /* against lp_attention itself */

        /* a cache with room to spare (NaN beyond the filled part) */
        int Tcap = T + 5;
        float *kc = to_cache(k, B, T, Tcap, Hkv, dh), *vc = to_cache(v, B, T, Tcap, Hkv, dh);
        for (size_t j = 0; j < nq; j++) rf[j] = zf[j];

        /* a prompt in two chunks: positions 0 .. T1-1, then T1 .. T-1 */
        int T1 = T / 2;
        float *qb = malloc(nq * 4), *zb = malloc(nq * 4);
        for (int part = 0; part < 2; part++) {
            int p0 = part ? T1 : 0, Tq = part ? T - T1 : T1;
            if (Tq == 0) continue;
            for (int b = 0; b < B; b++)
                memcpy(qb + (size_t)b * Tq * qrow, q + ((size_t)b * T + p0) * qrow, Tq * qrow * 4);
            cr_assert_eq(lp_attention_cached(&cpu, zb, qb, kc, vc, B, Tq, Tcap, p0, H, Hkv, dh), LP_OK);
            for (int b = 0; b < B; b++)
                memcpy(z + ((size_t)b * T + p0) * qrow, zb + (size_t)b * Tq * qrow, Tq * qrow * 4);
        }
        check("cached_decode", T, H, seed, z, rf, nq);

        /* token by token: Tq = 1 at pos0 = 0, 1, 2, ... */
        for (int p = 0; p < T; p++) {
            for (int b = 0; b < B; b++) memcpy(qb + b * qrow, q + ((size_t)b * T + p) * qrow, qrow * 4);
            cr_assert_eq(lp_attention_cached(&cpu, zb, qb, kc, vc, B, 1, Tcap, p, H, Hkv, dh), LP_OK);
            for (int b = 0; b < B; b++) memcpy(z + ((size_t)b * T + p) * qrow, zb + b * qrow, qrow * 4);
        }
        check("cached_decode", T, H, seed, z, rf, nq);
        check("attention_cached", T, H, seed, z, rz, nq);
        free(q), free(k), free(v), free(z), free(zf), free(rz), free(rf), free(kc), free(vc), free(qb), free(zb);
    }
}

Test(ops, bad_arguments_are_errors) {
    float x[4] = {0};
    cr_expect_eq(lp_matmul(&cpu, x, x, x, NULL, 1, 0, 1, 0), LP_ERR_ARG);
    cr_expect_eq(lp_attention(&cpu, x, x, x, x, 1, 1, 3, 2, 1), LP_ERR_ARG); /* 3 heads over 2 kv heads */
    cr_expect_eq(lp_edit_apply(&cpu, x, (lp_view){1, 1, 1, 4, 0}, LP_EDIT_PATCH, NULL, 0, NULL, NULL), LP_ERR_ARG);
    cr_expect_eq(lp_rms_scale(&cpu, x, x, 1, 4, -1e-6f), LP_ERR_ARG);                   /* negative eps */
    cr_expect_eq(lp_rope(&cpu, x, x, x, x, 1, 1, 1, 3, 0), LP_ERR_ARG);                   /* odd head dim */
    cr_expect_eq(lp_rope(&cpu, x, x, x, x, 1, 1, 1, 2, -1), LP_ERR_ARG);                  /* negative position */
    cr_expect_eq(lp_attention_cached(&cpu, x, x, x, x, 1, 2, 2, 1, 1, 1, 1), LP_ERR_ARG); /* positions 1..2, cache of 2 */
    cr_expect_eq(lp_attention_cached(&cpu, x, x, x, x, 1, 1, 1, 0, 3, 2, 1), LP_ERR_ARG); /* 3 heads over 2 kv heads */
}

Test(ops, bf16_conversion_rounds_to_nearest_even) {
    cr_expect_eq(lp_f32_to_bf16(1.0f), 0x3f80);
    cr_expect_eq(lp_bf16_to_f32(0x3f80), 1.0f);
    /* 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even (1) */
    cr_expect_eq(lp_f32_to_bf16(1.0f + 1.0f / 256), 0x3f80);
    cr_expect_eq(lp_f32_to_bf16(1.0f + 3.0f / 256), 0x3f82);
    cr_expect(isnan(lp_bf16_to_f32(lp_f32_to_bf16(NAN))));
    cr_expect_eq(lp_f16_to_f32(0x3c00), 1.0f);
    cr_expect_eq(lp_f16_to_f32(0xc000), -2.0f);
    cr_expect_eq(lp_f16_to_f32(0x0001), ldexpf(1, -24));
}
