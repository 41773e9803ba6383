/* test_ops_attention_cuda.c: the attention ops of include/loupe/ops.h on the GPU against
 * the CPU reference (fused attention, its three-step form, softmax rows, attention against
 * a KV cache), in F32 and BF16, by the rules and budgets of test_ops_cuda.c
 * (ops_cuda_budget.h). Without a GPU every test skips, saying why (LOUPE_REQUIRE_GPU=1
 * turns the skip into a failure). */
#include "loupe/ops.h"
#include "gputest.h"
#include "ops_cuda_budget.h"
#include "ops/ops_internal.h"
#include "core/rng.h"

/* ---- attention ---- */

typedef struct attn_shape { int B, T, H, Hkv, dh; } attn_shape;
static const attn_shape ATTN_SHAPES[] = {
    {1, 1, 1, 1, 1},    /* one query, one key, dh = 1 */
    {2, 31, 3, 3, 33},  /* dh just over a warp */
    {1, 33, 8, 2, 64},  /* GQA, GPT-2's head dim */
    {1, 40, 2, 1, 100}, /* multi-query, dh not a power of two */
    {1, 37, 2, 2, 256}, /* the largest head dim */
    {1, LONG_T(1000), 2, 2, 64} /* long context: many 32-key chunks */
};

typedef struct attn_in { float *q, *k, *v; size_t nq, nkv; } attn_in;

/* q in [-3, 3] so that softmax rows are neither flat nor one-hot. */
static attn_in attn_inputs(lp_dtype dt, attn_shape s, uint64_t seed) {
    attn_in a;
    a.nq = (size_t)s.B * s.T * s.H * s.dh;
    a.nkv = (size_t)s.B * s.T * s.Hkv * s.dh;
    a.q = rand_act(dt, a.nq, seed, -3, 3);
    a.k = rand_act(dt, a.nkv, seed + 1, -1, 1);
    a.v = rand_act(dt, a.nkv, seed + 2, -1, 1);
    return a;
}
static void attn_free(attn_in *a) { free(a->q), free(a->k), free(a->v); }

static void attn_label(char *buf, size_t n, attn_shape s) {
    snprintf(buf, n, "B=%d T=%d H=%d Hkv=%d dh=%d", s.B, s.T, s.H, s.Hkv, s.dh);
}

/* Fused attention on GPU vs CPU for one shape and dtype. */
static void check_attention(lp_dtype dt, attn_shape s, uint64_t seed) {
    attn_in a = attn_inputs(dt, s, seed);
    float *ref = zeros(a.nq);
    OK(lp_attention(cpu(), ref, a.q, a.k, a.v, s.B, s.T, s.H, s.Hkv, s.dh));

    gpu g;
    gpu_init(&g, dt);
    void *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv);
    void *d_v = gpu_put_act(&g, a.v, a.nkv), *d_z = gpu_alloc(&g, act_bytes(&g, a.nq));
    OK(lp_attention(&g.c, d_z, d_q, d_k, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
    float *got = gpu_get_act(&g, d_z, a.nq);
    char label[80];
    attn_label(label, sizeof label, s);
    expect_close(OP_ATTENTION, dt, label, seed, got, ref, a.nq);
    gpu_done(&g, label);
    free(ref), free(got);
    attn_free(&a);
}

/* attn_scores on GPU vs CPU; the comparison also requires every masked entry (key after
 * query) to be exactly -inf and every other entry finite. */
static void check_scores(lp_dtype dt, attn_shape s, uint64_t seed) {
    attn_in a = attn_inputs(dt, s, seed);
    const size_t ns = (size_t)s.B * s.H * s.T * s.T;
    float *ref = zeros(ns);
    OK(lp_attn_scores(cpu(), ref, a.q, a.k, s.B, s.T, s.H, s.Hkv, s.dh));

    gpu g;
    gpu_init(&g, dt);
    void *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv);
    void *d_s = gpu_alloc(&g, act_bytes(&g, ns));
    OK(lp_attn_scores(&g.c, d_s, d_q, d_k, s.B, s.T, s.H, s.Hkv, s.dh));
    float *got = gpu_get_act(&g, d_s, ns);
    char label[80];
    attn_label(label, sizeof label, s);
    expect_close(OP_ATTN_SCORES, dt, label, seed, got, ref, ns);
    gpu_done(&g, label);
    free(ref), free(got);
    attn_free(&a);
}

/* attn_apply on GPU vs CPU. pattern_kind 0: a causal softmax pattern (what the model
 * produces); 1: a dense random pattern with weight above the diagonal and some exact
 * zeros (an edited hook_pattern, applied as given). */
static void check_apply(lp_dtype dt, attn_shape s, uint64_t seed, int pattern_kind) {
    attn_in a = attn_inputs(dt, s, seed);
    const size_t ns = (size_t)s.B * s.H * s.T * s.T;
    float *pat = zeros(ns);
    if (pattern_kind == 0) {
        float *sc = zeros(ns);
        OK(lp_attn_scores(cpu(), sc, a.q, a.k, s.B, s.T, s.H, s.Hkv, s.dh));
        OK(lp_softmax_rows(cpu(), pat, sc, (size_t)s.B * s.H * s.T, s.T));
        free(sc);
    } else {
        lp_test_fill(pat, ns, seed + 3, -0.5f, 1.0f);
        for (size_t i = 0; i < ns; i++)
            if (pat[i] < 0) pat[i] = 0;
    }
    round_act(dt, pat, ns);
    float *ref = zeros(a.nq);
    OK(lp_attn_apply(cpu(), ref, pat, a.v, s.B, s.T, s.H, s.Hkv, s.dh));

    gpu g;
    gpu_init(&g, dt);
    void *d_p = gpu_put_act(&g, pat, ns), *d_v = gpu_put_act(&g, a.v, a.nkv);
    void *d_z = gpu_alloc(&g, act_bytes(&g, a.nq));
    OK(lp_attn_apply(&g.c, d_z, d_p, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
    float *got = gpu_get_act(&g, d_z, a.nq);
    char label[96];
    attn_label(label, sizeof label, s);
    strncat(label, pattern_kind ? " dense pattern" : " causal pattern",
            sizeof label - strlen(label) - 1);
    expect_close(OP_ATTN_APPLY, dt, label, seed, got, ref, a.nq);
    gpu_done(&g, label);
    free(pat), free(ref), free(got);
    attn_free(&a);
}

Test(ops_cuda, attention) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof ATTN_SHAPES / sizeof ATTN_SHAPES[0]; si++)
            check_attention(DTYPES[di], ATTN_SHAPES[si], 900 + si);
}

Test(ops_cuda, attn_scores_masked_entries_are_minus_inf) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof ATTN_SHAPES / sizeof ATTN_SHAPES[0]; si++)
            check_scores(DTYPES[di], ATTN_SHAPES[si], 1000 + si);
    /* And directly: with T = 33, every entry above the diagonal reads back as -inf. */
    attn_shape s = {1, 33, 2, 1, 16};
    for (int di = 0; di < 2; di++) {
        const lp_dtype dt = DTYPES[di];
        attn_in a = attn_inputs(dt, s, 1099);
        const size_t ns = (size_t)s.B * s.H * s.T * s.T;
        gpu g;
        gpu_init(&g, dt);
        void *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv);
        void *d_s = gpu_alloc(&g, act_bytes(&g, ns));
        OK(lp_attn_scores(&g.c, d_s, d_q, d_k, s.B, s.T, s.H, s.Hkv, s.dh));
        float *got = gpu_get_act(&g, d_s, ns);
        size_t wrong = 0;
        for (int h = 0; h < s.H; h++)
            for (int i = 0; i < s.T; i++)
                for (int j = 0; j < s.T; j++) {
                    float x = got[((size_t)h * s.T + i) * s.T + j];
                    wrong += j > i ? !(isinf(x) && x < 0) : !isfinite(x);
                }
        cr_expect(wrong == 0, "scores %s: %zu entries wrongly masked or not finite",
                  lp_dtype_name(dt), wrong);
        gpu_done(&g, "scores mask");
        free(got);
        attn_free(&a);
    }
}

Test(ops_cuda, softmax_rows) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][2] = {{1, 1}, {31, 33}, {33, 31}, {33, 1000}, {1000, 64}, {3, 50257}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            const lp_dtype dt = DTYPES[di];
            const size_t rows = shapes[si][0];
            const int cols = shapes[si][1];
            const size_t n = rows * cols;
            const uint64_t seed = 1100 + si;
            /* Entries in [-8, 8]; about a quarter of them -inf (masked keys), never a whole
             * row, since the fully masked row has its own test. */
            float *x = lp_test_rand(n, seed, -8, 8);
            uint64_t st = seed + 7;
            for (size_t r = 0; r < rows; r++)
                for (int j = 1; j < cols; j++)
                    if (lp_test_next(&st) % 4 == 0) x[r * cols + j] = -INFINITY;
            round_act(dt, x, n);
            float *ref = zeros(n);
            OK(lp_softmax_rows(cpu(), ref, x, rows, cols));

            gpu g;
            gpu_init(&g, dt);
            void *d_x = gpu_put_act(&g, x, n), *d_out = gpu_alloc(&g, act_bytes(&g, n));
            OK(lp_softmax_rows(&g.c, d_out, d_x, rows, cols));
            float *got = gpu_get_act(&g, d_out, n);
            char label[64];
            snprintf(label, sizeof label, "rows=%zu cols=%d", rows, cols);
            expect_close(OP_SOFTMAX, dt, label, seed, got, ref, n);
            gpu_done(&g, label);
            free(x), free(ref), free(got);
        }
}

Test(ops_cuda, softmax_of_fully_masked_row_is_zeros) {
    LP_TEST_REQUIRE_GPU();
    static const int cols_list[] = {1, 33, 1000};
    for (int di = 0; di < 2; di++)
        for (size_t ci = 0; ci < sizeof cols_list / sizeof cols_list[0]; ci++) {
            const lp_dtype dt = DTYPES[di];
            const int cols = cols_list[ci], rows = 3; /* the middle row is all -inf */
            const size_t n = (size_t)rows * cols;
            float *x = rand_act(dt, n, 1200 + ci, -2, 2);
            for (int j = 0; j < cols; j++) x[(size_t)cols + j] = -INFINITY;
            gpu g;
            gpu_init(&g, dt);
            void *d_x = gpu_put_act(&g, x, n), *d_out = gpu_alloc(&g, act_bytes(&g, n));
            OK(lp_softmax_rows(&g.c, d_out, d_x, rows, cols));
            float *got = gpu_get_act(&g, d_out, n);
            size_t nonzero = 0, nonfinite = 0;
            for (size_t i = 0; i < n; i++) nonfinite += !isfinite(got[i]);
            for (int j = 0; j < cols; j++) nonzero += got[(size_t)cols + j] != 0.0f;
            cr_expect(nonfinite == 0, "softmax %s cols=%d: %zu non-finite outputs",
                      lp_dtype_name(dt), cols, nonfinite);
            cr_expect(nonzero == 0, "softmax %s cols=%d: fully masked row has %zu non-zeros",
                      lp_dtype_name(dt), cols, nonzero);
            gpu_done(&g, "softmax masked row");
            free(x), free(got);
        }
}

Test(ops_cuda, attn_apply) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof ATTN_SHAPES / sizeof ATTN_SHAPES[0]; si++)
            for (int kind = 0; kind < 2; kind++)
                check_apply(DTYPES[di], ATTN_SHAPES[si], 1300 + si, kind);
}

Test(ops_cuda, gqa_matches_cpu) {
    LP_TEST_REQUIRE_GPU();
    /* H = 8 query heads on Hkv = 2 kv heads: heads 0-3 read kv head 0, 4-7 kv head 1. */
    static const attn_shape gqa[] = {{2, 33, 8, 2, 64}, {1, 31, 8, 2, 33}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < 2; si++) {
            check_attention(DTYPES[di], gqa[si], 1400 + si);
            check_scores(DTYPES[di], gqa[si], 1410 + si);
            check_apply(DTYPES[di], gqa[si], 1420 + si, 0);
        }
}

/* The fused kernel and the three hookable steps must agree on the GPU itself. */
Test(ops_cuda, fused_attention_equals_three_steps) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof ATTN_SHAPES / sizeof ATTN_SHAPES[0]; si++) {
            const lp_dtype dt = DTYPES[di];
            const attn_shape s = ATTN_SHAPES[si];
            const uint64_t seed = 1500 + si;
            attn_in a = attn_inputs(dt, s, seed);
            const size_t ns = (size_t)s.B * s.H * s.T * s.T;
            gpu g;
            gpu_init(&g, dt);
            void *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv);
            void *d_v = gpu_put_act(&g, a.v, a.nkv);
            void *d_z1 = gpu_alloc(&g, act_bytes(&g, a.nq)), *d_z2 = gpu_alloc(&g, act_bytes(&g, a.nq));
            void *d_s = gpu_alloc(&g, act_bytes(&g, ns)), *d_p = gpu_alloc(&g, act_bytes(&g, ns));
            OK(lp_attention(&g.c, d_z1, d_q, d_k, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
            OK(lp_attn_scores(&g.c, d_s, d_q, d_k, s.B, s.T, s.H, s.Hkv, s.dh));
            OK(lp_softmax_rows(&g.c, d_p, d_s, (size_t)s.B * s.H * s.T, s.T));
            OK(lp_attn_apply(&g.c, d_z2, d_p, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
            float *fused = gpu_get_act(&g, d_z1, a.nq), *steps = gpu_get_act(&g, d_z2, a.nq);
            char label[80];
            attn_label(label, sizeof label, s);
            expect_close(OP_FUSED_VS_STEPS, dt, label, seed, fused, steps, a.nq);
            gpu_done(&g, label);
            free(fused), free(steps);
            attn_free(&a);
        }
}

Test(ops_cuda, attention_rejects_head_dim_over_256) {
    LP_TEST_REQUIRE_GPU();
    gpu g;
    gpu_init(&g, LP_F32);
    const int B = 1, T = 2, H = 1, dh = 257;
    void *d_q = gpu_alloc(&g, act_bytes(&g, (size_t)B * T * H * dh));
    void *d_z = gpu_alloc(&g, act_bytes(&g, (size_t)B * T * H * dh));
    lp_status st = lp_attention(&g.c, d_z, d_q, d_q, d_q, B, T, H, H, dh);
    cr_expect_eq(st, LP_ERR_ARG, "dh = 257 gave %s (%s)", lp_status_name(st), lp_last_error());
    gpu_done(&g, "dh 257");
}

/* ---- attention against a KV cache ---- */

typedef struct cached_shape { int B, Tq, Tcap, pos0, H, Hkv, dh; } cached_shape;
static const cached_shape CACHED_SHAPES[] = {
    {1, 1, 1, 0, 1, 1, 1},       /* the first token */
    {2, 1, 40, 31, 3, 3, 33},    /* a decode step, dh just over a warp */
    {1, 7, 64, 33, 8, 2, 64},    /* a prefill chunk after 33 cached tokens, GQA */
    {2, 31, 31, 0, 9, 3, 64},    /* a whole prompt in a full cache (SmolLM2's heads) */
    {1, 1, 1100, 1000, 2, 2, 64}, /* a late decode step: many 32-key chunks */
    {1, 3, 50, 20, 2, 1, 100},   /* multi-query, dh not a power of two */
    {1, 2, 45, 37, 2, 2, 256},   /* the largest head dim */
};

static void cached_label(char *buf, size_t n, cached_shape s) {
    snprintf(buf, n, "B=%d Tq=%d Tcap=%d pos0=%d H=%d Hkv=%d dh=%d", s.B, s.Tq, s.Tcap, s.pos0, s.H,
             s.Hkv, s.dh);
}

/* A cache [B,Tcap,Hkv,dh] whose first `filled` positions are random and the rest NaN: a
 * kernel that reads past the last key a query may see poisons its row. */
static float *cache_input(lp_dtype dt, cached_shape s, int filled, uint64_t seed) {
    const size_t row = (size_t)s.Hkv * s.dh, n = (size_t)s.B * s.Tcap * row;
    float *c = rand_act(dt, n, seed, -1, 1);
    for (int b = 0; b < s.B; b++)
        for (size_t j = (size_t)filled * row; j < (size_t)s.Tcap * row; j++)
            c[(size_t)b * s.Tcap * row + j] = NAN;
    return c;
}

Test(ops_cuda, attention_cached) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof CACHED_SHAPES / sizeof CACHED_SHAPES[0]; si++) {
            const lp_dtype dt = DTYPES[di];
            const cached_shape s = CACHED_SHAPES[si];
            const uint64_t seed = 2300 + si;
            const size_t nq = (size_t)s.B * s.Tq * s.H * s.dh;
            const size_t nc = (size_t)s.B * s.Tcap * s.Hkv * s.dh;
            float *q = rand_act(dt, nq, seed, -3, 3);
            float *kc = cache_input(dt, s, s.pos0 + s.Tq, seed + 1);
            float *vc = cache_input(dt, s, s.pos0 + s.Tq, seed + 2);
            float *ref = zeros(nq);
            OK(lp_attention_cached(cpu(), ref, q, kc, vc, s.B, s.Tq, s.Tcap, s.pos0, s.H, s.Hkv, s.dh));

            gpu g;
            gpu_init(&g, dt);
            void *d_q = gpu_put_act(&g, q, nq), *d_k = gpu_put_act(&g, kc, nc);
            void *d_v = gpu_put_act(&g, vc, nc), *d_z = gpu_alloc(&g, act_bytes(&g, nq));
            OK(lp_attention_cached(&g.c, d_z, d_q, d_k, d_v, s.B, s.Tq, s.Tcap, s.pos0, s.H, s.Hkv,
                                   s.dh));
            float *got = gpu_get_act(&g, d_z, nq);
            char label[96];
            cached_label(label, sizeof label, s);
            expect_close(OP_ATTN_CACHED, dt, label, seed, got, ref, nq);
            gpu_done(&g, label);
            free(q), free(kc), free(vc), free(ref), free(got);
        }
}

/* On the GPU itself: with pos0 = 0 and Tcap = T the cached kernel is lp_attention; decoding
 * token by token (Tq = 1, pos0 = 0, 1, ..., in a cache larger than needed) gives the rows of
 * one pass over the whole prompt. */
Test(ops_cuda, attention_cached_prefill_and_decode_match_full_pass) {
    LP_TEST_REQUIRE_GPU();
    static const attn_shape shapes[] = {{1, 1, 1, 1, 1}, {2, 33, 9, 3, 64}, {1, 40, 2, 1, 100},
                                        {1, 37, 2, 2, 256}, {1, LONG_T(300), 4, 2, 64}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            const lp_dtype dt = DTYPES[di];
            const attn_shape s = shapes[si];
            const uint64_t seed = 2400 + si;
            attn_in a = attn_inputs(dt, s, seed);
            const int Tcap = s.T + 9;
            const size_t qrow = (size_t)s.H * s.dh, krow = (size_t)s.Hkv * s.dh;
            gpu g;
            gpu_init(&g, dt);
            void *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv);
            void *d_v = gpu_put_act(&g, a.v, a.nkv);
            void *d_zf = gpu_alloc(&g, act_bytes(&g, a.nq)), *d_zc = gpu_alloc(&g, act_bytes(&g, a.nq));
            OK(lp_attention(&g.c, d_zf, d_q, d_k, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
            OK(lp_attention_cached(&g.c, d_zc, d_q, d_k, d_v, s.B, s.T, s.T, 0, s.H, s.Hkv, s.dh));
            float *fused = gpu_get_act(&g, d_zf, a.nq), *full = gpu_get_act(&g, d_zc, a.nq);
            char label[96];
            attn_label(label, sizeof label, s);
            expect_close(OP_CACHED_VS_FUSED, dt, label, seed, full, fused, a.nq);

            /* caches [B,Tcap,Hkv,dh] holding the prompt's keys and values, NaN after them */
            float *kc = zeros((size_t)s.B * Tcap * krow), *vc = zeros((size_t)s.B * Tcap * krow);
            for (size_t j = 0; j < (size_t)s.B * Tcap * krow; j++) kc[j] = vc[j] = NAN;
            for (int b = 0; b < s.B; b++) {
                memcpy(kc + (size_t)b * Tcap * krow, a.k + (size_t)b * s.T * krow, s.T * krow * 4);
                memcpy(vc + (size_t)b * Tcap * krow, a.v + (size_t)b * s.T * krow, s.T * krow * 4);
            }
            void *d_kc = gpu_put_act(&g, kc, (size_t)s.B * Tcap * krow);
            void *d_vc = gpu_put_act(&g, vc, (size_t)s.B * Tcap * krow);
            void *d_q1 = gpu_alloc(&g, act_bytes(&g, (size_t)s.B * qrow));
            void *d_z1 = gpu_alloc(&g, act_bytes(&g, (size_t)s.B * qrow));
            float *q1 = zeros((size_t)s.B * qrow), *dec = zeros(a.nq);
            for (int p = 0; p < s.T; p++) {
                for (int b = 0; b < s.B; b++)
                    memcpy(q1 + b * qrow, a.q + ((size_t)b * s.T + p) * qrow, qrow * 4);
                void *h = malloc(act_bytes(&g, (size_t)s.B * qrow));
                OK(lp_convert_host(h, dt, q1, LP_F32, (size_t)s.B * qrow));
                OK(lp_ctx_to_device(&g.c, d_q1, h, act_bytes(&g, (size_t)s.B * qrow)));
                free(h);
                OK(lp_attention_cached(&g.c, d_z1, d_q1, d_kc, d_vc, s.B, 1, Tcap, p, s.H, s.Hkv,
                                       s.dh));
                float *z1 = gpu_get_act(&g, d_z1, (size_t)s.B * qrow);
                for (int b = 0; b < s.B; b++)
                    memcpy(dec + ((size_t)b * s.T + p) * qrow, z1 + b * qrow, qrow * 4);
                free(z1);
            }
            expect_close(OP_CACHED_DECODE, dt, label, seed, dec, full, a.nq);
            gpu_done(&g, label);
            free(fused), free(full), free(kc), free(vc), free(q1), free(dec);
            attn_free(&a);
        }
}
