/* test_ops_cuda.c: every op of include/loupe/ops.h on the GPU against the CPU reference,
 * through the public dispatch API, in both GPU activation dtypes (F32 and BF16).
 *
 * Each case draws seeded random inputs over awkward shapes (1, 31, 33 and >= 1000 in the
 * dimension that matters), runs the op on an LP_CUDA context and on an LP_CPU context,
 * and compares the results by normalized squared error against the budget in BUDGET
 * below. Every device buffer sits between guard bytes, checked after the op, so a kernel
 * that writes out of bounds fails even when its in-bounds values are right.
 *
 * bf16 cases round the host inputs to bf16 first and feed those same values to the CPU,
 * so the only difference left is what the kernel rounds (outputs, and intermediates
 * where an op has them). Without a GPU every test skips, saying why
 * (LOUPE_REQUIRE_GPU=1 turns the skip into a failure). */
#include "loupe/ops.h"
#include "gputest.h"
#include "ops_internal.h"
#include "rng.h"

/* ---- budgets: nmse = sum (gpu - cpu)^2 / sum cpu^2 -------------------------------------
 * fp32: the GPU and the CPU differ only in summation order and in last-ulp differences
 *   of expf/tanhf/division (and FMA contraction): per element ~1e-7 relative, so nmse
 *   ~1e-14 .. 1e-12; long dot products (K = 1000) give ~K * 2^-48 ~ 1e-11.
 * bf16: one round-to-nearest of the output has relative error <= 2^-9 (~2e-3), about
 *   uniform, so nmse ~ 2^-18 / 3 ~ 1.3e-6 from that rounding alone; 1e-4 leaves a
 *   margin of ~80 for accumulation and for outputs near zero. Comparisons of two GPU
 *   paths where one rounds its intermediates to bf16 (scores, pattern) get 5e-4.
 * Pure copies (embeddings, SET/PATCH/ZERO edits, gathers) must be bit-exact: budget 0.
 * Cross-entropy writes fp32 losses in both dtypes from identical (rounded) logits. */
enum {
    OP_EMBED, OP_POS_EMBED, OP_ADD, OP_GELU, OP_AFFINE, OP_LN_SCALE, OP_LN_APPLY, OP_MATMUL,
    OP_ATTENTION, OP_ATTN_SCORES, OP_SOFTMAX, OP_ATTN_APPLY, OP_FUSED_VS_STEPS,
    OP_CROSS_ENTROPY, OP_EDIT_COPY, OP_EDIT_ADD, OP_GATHER,
    OP_RMS_SCALE, OP_RMS_APPLY, OP_ROPE, OP_SILU_MUL, OP_ATTN_CACHED, OP_CACHED_VS_FUSED,
    OP_CACHED_DECODE, OP_COUNT
};
static const struct budget {
    const char *op;
    double nmse[2]; /* [0]: F32, [1]: BF16 */
} BUDGET[OP_COUNT] = {
    [OP_EMBED] = {"embed", {0, 0}},
    [OP_POS_EMBED] = {"pos_embed", {0, 0}},
    [OP_ADD] = {"add", {1e-10, 1e-4}},
    [OP_GELU] = {"gelu", {1e-10, 1e-4}},
    [OP_AFFINE] = {"affine", {1e-10, 1e-4}},
    [OP_LN_SCALE] = {"ln_scale", {1e-9, 1e-4}},
    [OP_LN_APPLY] = {"ln_apply", {1e-9, 1e-4}},
    [OP_MATMUL] = {"matmul", {1e-8, 1e-4}},
    [OP_ATTENTION] = {"attention", {1e-8, 1e-4}},
    [OP_ATTN_SCORES] = {"attn_scores", {1e-9, 1e-4}},
    [OP_SOFTMAX] = {"softmax_rows", {1e-9, 1e-4}},
    [OP_ATTN_APPLY] = {"attn_apply", {1e-8, 1e-4}},
    [OP_FUSED_VS_STEPS] = {"attention vs 3 steps (GPU)", {1e-9, 5e-4}},
    [OP_CROSS_ENTROPY] = {"cross_entropy", {1e-9, 1e-9}},
    [OP_EDIT_COPY] = {"edit zero/set/patch", {0, 0}},
    [OP_EDIT_ADD] = {"edit add", {1e-10, 1e-4}},
    [OP_GATHER] = {"gather_pos", {0, 0}},
    /* Llama family: the same reasoning as above (one bf16 rounding of the output, fp32
     * summation order otherwise). The cached kernel against the fused one on the GPU does
     * the same arithmetic in a different kernel: fp32 budget, and one output rounding in
     * bf16. A decode step and a full pass run each row through the same code of the same
     * kernel, so token-by-token decoding must reproduce the full pass bit for bit. */
    [OP_RMS_SCALE] = {"rms_scale", {1e-9, 1e-4}},
    [OP_RMS_APPLY] = {"rms_apply", {1e-9, 1e-4}},
    [OP_ROPE] = {"rope", {1e-10, 1e-4}},
    [OP_SILU_MUL] = {"silu_mul", {1e-10, 1e-4}},
    [OP_ATTN_CACHED] = {"attention_cached", {1e-8, 1e-4}},
    [OP_CACHED_VS_FUSED] = {"attention_cached vs fused (GPU)", {1e-9, 1e-4}},
    [OP_CACHED_DECODE] = {"attention_cached decode vs one pass (GPU)", {0, 0}},
};

static const lp_dtype DTYPES[2] = {LP_F32, LP_BF16};
static double budget(int op, lp_dtype dt) { return BUDGET[op].nmse[dt == LP_BF16]; }

static void expect_close(int op, lp_dtype dt, const char *label, uint64_t seed, const float *got,
                         const float *ref, size_t n) {
    char what[160];
    snprintf(what, sizeof what, "%s %s %s", BUDGET[op].op, lp_dtype_name(dt), label);
    LP_EXPECT_WITHIN(what, seed, lp_compare_f(got, ref, n), nmse, budget(op, dt));
}

/* ---- element-wise ops ---- */

Test(ops_cuda, embed) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][3] = {{1, 1, 1}, {31, 33, 50}, {33, 768, 1000}, {1000, 31, 1031}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            const lp_dtype dt = DTYPES[di];
            const int N = shapes[si][0], D = shapes[si][1], V = shapes[si][2];
            const uint64_t seed = 100 + si;
            float *wte = rand_act(dt, (size_t)V * D, seed, -1, 1);
            int32_t *tok = malloc(N * sizeof(int32_t));
            uint64_t s = seed;
            for (int n = 0; n < N; n++) tok[n] = (int32_t)(lp_test_next(&s) % V);
            float *ref = zeros((size_t)N * D);
            OK(lp_embed(cpu(), ref, tok, wte, N, D));

            gpu g;
            gpu_init(&g, dt);
            void *d_wte = gpu_put_act(&g, wte, (size_t)V * D);
            int32_t *d_tok = gpu_put(&g, tok, N * sizeof(int32_t));
            void *d_out = gpu_alloc(&g, act_bytes(&g, (size_t)N * D));
            OK(lp_embed(&g.c, d_out, d_tok, d_wte, N, D));
            float *got = gpu_get_act(&g, d_out, (size_t)N * D);
            char label[64];
            snprintf(label, sizeof label, "N=%d D=%d V=%d", N, D, V);
            expect_close(OP_EMBED, dt, label, seed, got, ref, (size_t)N * D);
            gpu_done(&g, label);
            free(wte), free(tok), free(ref), free(got);
        }
}

Test(ops_cuda, pos_embed) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][3] = {{1, 1, 1}, {2, 31, 33}, {3, 33, 768}, {2, 1000, 31}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            const lp_dtype dt = DTYPES[di];
            const int B = shapes[si][0], T = shapes[si][1], D = shapes[si][2];
            const size_t n = (size_t)B * T * D;
            const uint64_t seed = 200 + si;
            float *wpe = rand_act(dt, (size_t)T * D, seed, -1, 1);
            float *ref = zeros(n);
            OK(lp_pos_embed(cpu(), ref, wpe, B, T, D));

            gpu g;
            gpu_init(&g, dt);
            void *d_wpe = gpu_put_act(&g, wpe, (size_t)T * D);
            void *d_out = gpu_alloc(&g, act_bytes(&g, n));
            OK(lp_pos_embed(&g.c, d_out, d_wpe, B, T, D));
            float *got = gpu_get_act(&g, d_out, n);
            char label[64];
            snprintf(label, sizeof label, "B=%d T=%d D=%d", B, T, D);
            expect_close(OP_POS_EMBED, dt, label, seed, got, ref, n);
            gpu_done(&g, label);
            free(wpe), free(ref), free(got);
        }
}

Test(ops_cuda, add) {
    LP_TEST_REQUIRE_GPU();
    static const size_t sizes[] = {1, 31, 33, 1000, 100003};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++)
            for (int in_place = 0; in_place < 2; in_place++) {
                const lp_dtype dt = DTYPES[di];
                const size_t n = sizes[si];
                const uint64_t seed = 300 + si;
                float *a = rand_act(dt, n, seed, -4, 4), *b = rand_act(dt, n, seed + 1000, -4, 4);
                float *ref = zeros(n);
                OK(lp_add(cpu(), ref, a, b, n));

                gpu g;
                gpu_init(&g, dt);
                void *d_a = gpu_put_act(&g, a, n), *d_b = gpu_put_act(&g, b, n);
                void *d_out = in_place ? d_a : gpu_alloc(&g, act_bytes(&g, n));
                OK(lp_add(&g.c, d_out, d_a, d_b, n)); /* in place: the residual stream update */
                float *got = gpu_get_act(&g, d_out, n);
                char label[64];
                snprintf(label, sizeof label, "n=%zu%s", n, in_place ? " in place" : "");
                expect_close(OP_ADD, dt, label, seed, got, ref, n);
                gpu_done(&g, label);
                free(a), free(b), free(ref), free(got);
            }
}

Test(ops_cuda, gelu) {
    LP_TEST_REQUIRE_GPU();
    static const size_t sizes[] = {1, 31, 33, 1000, 100003};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
            const lp_dtype dt = DTYPES[di];
            const size_t n = sizes[si];
            const uint64_t seed = 400 + si;
            float *x = rand_act(dt, n, seed, -8, 8);
            float *ref = zeros(n);
            OK(lp_gelu(cpu(), ref, x, n));

            gpu g;
            gpu_init(&g, dt);
            void *d_x = gpu_put_act(&g, x, n);
            void *d_out = gpu_alloc(&g, act_bytes(&g, n));
            OK(lp_gelu(&g.c, d_out, d_x, n));
            float *got = gpu_get_act(&g, d_out, n);
            char label[64];
            snprintf(label, sizeof label, "n=%zu", n);
            expect_close(OP_GELU, dt, label, seed, got, ref, n);
            gpu_done(&g, label);
            free(x), free(ref), free(got);
        }
}

Test(ops_cuda, affine) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][2] = {{1, 1}, {31, 33}, {33, 1000}, {1000, 31}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
            for (int variant = 0; variant < 3; variant++) { /* 0: w, b; 1: w only; 2: in place */
                const lp_dtype dt = DTYPES[di];
                const int N = shapes[si][0], D = shapes[si][1];
                const size_t n = (size_t)N * D;
                const uint64_t seed = 500 + si;
                float *x = rand_act(dt, n, seed, -3, 3);
                float *w = rand_act(dt, D, seed + 1, -2, 2), *b = rand_act(dt, D, seed + 2, -1, 1);
                const int use_b = variant != 1;
                float *ref = zeros(n);
                OK(lp_affine(cpu(), ref, x, w, use_b ? b : NULL, N, D));

                gpu g;
                gpu_init(&g, dt);
                void *d_x = gpu_put_act(&g, x, n);
                void *d_w = gpu_put_act(&g, w, D), *d_b = gpu_put_act(&g, b, D);
                void *d_out = variant == 2 ? d_x : gpu_alloc(&g, act_bytes(&g, n));
                OK(lp_affine(&g.c, d_out, d_x, d_w, use_b ? d_b : NULL, N, D));
                float *got = gpu_get_act(&g, d_out, n);
                char label[64];
                snprintf(label, sizeof label, "N=%d D=%d %s", N, D,
                         variant == 0 ? "w,b" : variant == 1 ? "w" : "w,b in place");
                expect_close(OP_AFFINE, dt, label, seed, got, ref, n);
                gpu_done(&g, label);
                free(x), free(w), free(b), free(ref), free(got);
            }
}

/* ---- LayerNorm ---- */

/* Rows in [-1, 1], every other row shifted by 300: a mean 300 standard deviations away
 * from zero, where a naive one-pass or single-precision mean loses digits. */
static float *ln_input(lp_dtype dt, int N, int D, uint64_t seed) {
    float *x = lp_test_rand((size_t)N * D, seed, -1, 1);
    for (int r = 1; r < N; r += 2)
        for (int d = 0; d < D; d++) x[(size_t)r * D + d] += 300.0f;
    round_act(dt, x, (size_t)N * D);
    return x;
}

static const int LN_SHAPES[][2] = {{1, 1}, {1, 1600}, {31, 33}, {33, 31}, {32, 1000}, {1000, 64}};

Test(ops_cuda, ln_scale) {
    LP_TEST_REQUIRE_GPU();
    const float eps = 1e-5f;
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof LN_SHAPES / sizeof LN_SHAPES[0]; si++) {
            const lp_dtype dt = DTYPES[di];
            const int N = LN_SHAPES[si][0], D = LN_SHAPES[si][1];
            const uint64_t seed = 600 + si;
            float *x = ln_input(dt, N, D, seed);
            float *ref = zeros(N);
            OK(lp_ln_scale(cpu(), ref, x, N, D, eps));

            gpu g;
            gpu_init(&g, dt);
            void *d_x = gpu_put_act(&g, x, (size_t)N * D);
            void *d_s = gpu_alloc(&g, act_bytes(&g, N));
            OK(lp_ln_scale(&g.c, d_s, d_x, N, D, eps));
            float *got = gpu_get_act(&g, d_s, N);
            char label[64];
            snprintf(label, sizeof label, "N=%d D=%d", N, D);
            expect_close(OP_LN_SCALE, dt, label, seed, got, ref, N);
            gpu_done(&g, label);
            free(x), free(ref), free(got);
        }
}

Test(ops_cuda, ln_apply) {
    LP_TEST_REQUIRE_GPU();
    const float eps = 1e-5f;
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof LN_SHAPES / sizeof LN_SHAPES[0]; si++)
            for (int affine = 0; affine < 2; affine++) {
                const lp_dtype dt = DTYPES[di];
                const int N = LN_SHAPES[si][0], D = LN_SHAPES[si][1];
                const size_t n = (size_t)N * D;
                const uint64_t seed = 700 + si;
                float *x = ln_input(dt, N, D, seed);
                float *scale = zeros(N);
                OK(lp_ln_scale(cpu(), scale, x, N, D, eps));
                round_act(dt, scale, N); /* the hook value both sides then read */
                float *w = rand_act(dt, D, seed + 1, 0.5f, 1.5f);
                float *b = rand_act(dt, D, seed + 2, -1, 1);
                float *ref = zeros(n);
                OK(lp_ln_apply(cpu(), ref, x, scale, affine ? w : NULL, affine ? b : NULL, N, D));

                gpu g;
                gpu_init(&g, dt);
                void *d_x = gpu_put_act(&g, x, n), *d_s = gpu_put_act(&g, scale, N);
                void *d_w = gpu_put_act(&g, w, D), *d_b = gpu_put_act(&g, b, D);
                void *d_out = gpu_alloc(&g, act_bytes(&g, n));
                OK(lp_ln_apply(&g.c, d_out, d_x, d_s, affine ? d_w : NULL, affine ? d_b : NULL, N,
                               D));
                float *got = gpu_get_act(&g, d_out, n);
                char label[64];
                snprintf(label, sizeof label, "N=%d D=%d %s", N, D, affine ? "w,b" : "normalized");
                expect_close(OP_LN_APPLY, dt, label, seed, got, ref, n);
                gpu_done(&g, label);
                free(x), free(scale), free(w), free(b), free(ref), free(got);
            }
}

/* ---- matmul ---- */

Test(ops_cuda, matmul) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][3] = {
        {1, 1, 1}, {31, 33, 1000}, {33, 1000, 31}, {1000, 31, 33}, {64, 768, 2304}, {3, 64, 50257},
    };
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
            for (int wt = 0; wt < 2; wt++)
                for (int use_bias = 0; use_bias < 2; use_bias++) {
                    const lp_dtype dt = DTYPES[di];
                    const int N = shapes[si][0], K = shapes[si][1], M = shapes[si][2];
                    const uint64_t seed = 800 + si;
                    float *x = rand_act(dt, (size_t)N * K, seed, -1, 1);
                    float *w = rand_act(dt, (size_t)K * M, seed + 1, -1, 1);
                    float *bias = rand_act(dt, M, seed + 2, -1, 1);
                    float *ref = zeros((size_t)N * M);
                    OK(lp_matmul(cpu(), ref, x, w, use_bias ? bias : NULL, N, K, M, wt));

                    gpu g;
                    gpu_init(&g, dt);
                    void *d_x = gpu_put_act(&g, x, (size_t)N * K);
                    void *d_w = gpu_put_act(&g, w, (size_t)K * M);
                    void *d_b = gpu_put_act(&g, bias, M);
                    void *d_out = gpu_alloc(&g, act_bytes(&g, (size_t)N * M));
                    OK(lp_matmul(&g.c, d_out, d_x, d_w, use_bias ? d_b : NULL, N, K, M, wt));
                    float *got = gpu_get_act(&g, d_out, (size_t)N * M);
                    char label[80];
                    snprintf(label, sizeof label, "N=%d K=%d M=%d w_trans=%d%s", N, K, M, wt,
                             use_bias ? " bias" : "");
                    expect_close(OP_MATMUL, dt, label, seed, got, ref, (size_t)N * M);
                    gpu_done(&g, label);
                    free(x), free(w), free(bias), free(ref), free(got);
                }
}

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

/* ---- cross-entropy ---- */

Test(ops_cuda, cross_entropy) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][2] = {{1, 1}, {31, 31}, {33, 33}, {33, 1000}, {5, 50257}, {1000, 64}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            const lp_dtype dt = DTYPES[di];
            const int N = shapes[si][0], V = shapes[si][1];
            const uint64_t seed = 1600 + si;
            float *logits = rand_act(dt, (size_t)N * V, seed, -10, 10);
            int32_t *tgt = malloc(N * sizeof(int32_t));
            uint64_t s = seed + 5;
            for (int n = 0; n < N; n++) {
                uint64_t r = lp_test_next(&s);
                tgt[n] = (N > 1 && r % 5 == 0) ? -1 : (int32_t)((r >> 8) % V); /* -1: no loss */
            }
            float *ref = zeros(N);
            OK(lp_cross_entropy(cpu(), ref, logits, tgt, N, V));

            gpu g;
            gpu_init(&g, dt);
            void *d_l = gpu_put_act(&g, logits, (size_t)N * V);
            int32_t *d_t = gpu_put(&g, tgt, N * sizeof(int32_t));
            float *d_loss = gpu_alloc(&g, N * sizeof(float));
            OK(lp_cross_entropy(&g.c, d_loss, d_l, d_t, N, V));
            float *got = malloc(N * sizeof(float));
            OK(lp_ctx_to_host(&g.c, got, d_loss, N * sizeof(float)));
            size_t wrong_zero = 0;
            for (int n = 0; n < N; n++) wrong_zero += tgt[n] < 0 && got[n] != 0.0f;
            cr_expect(wrong_zero == 0, "cross_entropy: %zu rows with target -1 gave a loss",
                      wrong_zero);
            char label[64];
            snprintf(label, sizeof label, "N=%d V=%d", N, V);
            expect_close(OP_CROSS_ENTROPY, dt, label, seed, got, ref, N);
            gpu_done(&g, label);
            free(logits), free(tgt), free(ref), free(got);
        }
}

/* ---- hooks: edits and gathers over the three view layouts ---- */

static const lp_view VIEWS[] = {
    {2, 31, 1, 33, 0},   /* [B,T,D] */
    {2, 33, 3, 31, 0},   /* [B,T,H,dh] */
    {1, 31, 4, 31, 1},   /* [B,H,Tq,Tk] */
    {1, 1000, 1, 64, 0}, /* long sequence */
    {1, 1, 1, 1, 0},
};

static void view_label(char *buf, size_t n, lp_view v, const char *extra) {
    snprintf(buf, n, "[%d,%d,%d,%d]%s %s", v.B, v.P, v.H, v.E, v.head_outer ? " head_outer" : "",
             extra);
}

Test(ops_cuda, edit_apply) {
    LP_TEST_REQUIRE_GPU();
    static const char *kind_name[] = {"zero", "set", "add", "patch"};
    for (int di = 0; di < 2; di++)
        for (size_t vi = 0; vi < sizeof VIEWS / sizeof VIEWS[0]; vi++)
            for (int kind = LP_EDIT_ZERO; kind <= LP_EDIT_PATCH; kind++)
                for (int masked = 0; masked < 2; masked++) {
                    const lp_dtype dt = DTYPES[di];
                    const lp_view v = VIEWS[vi];
                    const size_t n = (size_t)v.B * v.P * v.H * v.E;
                    const uint64_t seed = 1700 + vi * 10 + kind;
                    float *act = rand_act(dt, n, seed, -2, 2);
                    const size_t nsrc = kind == LP_EDIT_PATCH ? n : (size_t)v.H * v.E;
                    float *src = rand_act(dt, nsrc, seed + 1, -2, 2);
                    uint8_t *pm = malloc(v.P), *hm = malloc(v.H);
                    uint64_t s = seed + 2;
                    for (int p = 0; p < v.P; p++) pm[p] = lp_test_next(&s) % 3 != 0;
                    for (int h = 0; h < v.H; h++) hm[h] = h % 2 == 0 || v.H == 1;
                    const float coef = 0.75f;
                    float *ref = malloc(n * sizeof(float));
                    memcpy(ref, act, n * sizeof(float));
                    OK(lp_edit_apply(cpu(), ref, v, kind, src, coef, masked ? pm : NULL,
                                     masked ? hm : NULL));

                    gpu g;
                    gpu_init(&g, dt);
                    void *d_act = gpu_put_act(&g, act, n), *d_src = gpu_put_act(&g, src, nsrc);
                    uint8_t *d_pm = gpu_put(&g, pm, v.P), *d_hm = gpu_put(&g, hm, v.H);
                    OK(lp_edit_apply(&g.c, d_act, v, kind, d_src, coef, masked ? d_pm : NULL,
                                     masked ? d_hm : NULL));
                    float *got = gpu_get_act(&g, d_act, n);
                    char extra[48], label[96];
                    snprintf(extra, sizeof extra, "%s%s", kind_name[kind], masked ? " masked" : "");
                    view_label(label, sizeof label, v, extra);
                    expect_close(kind == LP_EDIT_ADD ? OP_EDIT_ADD : OP_EDIT_COPY, dt, label, seed,
                                 got, ref, n);
                    gpu_done(&g, label);
                    free(act), free(src), free(pm), free(hm), free(ref), free(got);
                }
}

Test(ops_cuda, gather_pos) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t vi = 0; vi < sizeof VIEWS / sizeof VIEWS[0]; vi++)
            for (int which = 0; which < 3; which++) {
                const lp_dtype dt = DTYPES[di];
                const lp_view v = VIEWS[vi];
                const size_t n = (size_t)v.B * v.P * v.H * v.E;
                const uint64_t seed = 1800 + vi * 10 + which;
                /* one position; the last position; every position in a shuffled order with
                 * repeats */
                const int npos = which == 0 ? 1 : which == 1 ? 1 : v.P;
                int32_t *pos = malloc(npos * sizeof(int32_t));
                uint64_t s = seed + 3;
                for (int i = 0; i < npos; i++)
                    pos[i] = which == 1 ? v.P - 1 : (int32_t)(lp_test_next(&s) % v.P);
                float *act = rand_act(dt, n, seed, -2, 2);
                const size_t nd = (size_t)v.B * npos * v.H * v.E;
                float *ref = zeros(nd);
                OK(lp_gather_pos(cpu(), ref, act, v, pos, npos));

                gpu g;
                gpu_init(&g, dt);
                void *d_act = gpu_put_act(&g, act, n);
                int32_t *d_pos = gpu_put(&g, pos, npos * sizeof(int32_t));
                void *d_dst = gpu_alloc(&g, act_bytes(&g, nd));
                OK(lp_gather_pos(&g.c, d_dst, d_act, v, d_pos, npos));
                float *got = gpu_get_act(&g, d_dst, nd);
                char extra[32], label[96];
                snprintf(extra, sizeof extra, "npos=%d", npos);
                view_label(label, sizeof label, v, extra);
                expect_close(OP_GATHER, dt, label, seed, got, ref, nd);
                gpu_done(&g, label);
                free(pos), free(act), free(ref), free(got);
            }
}

/* ---- Llama family ---- */

/* Rows in [-2, 2], every third row 100 times larger (RMSNorm has no mean to cancel; the
 * scale must follow the magnitude). */
static float *rms_input(lp_dtype dt, int N, int D, uint64_t seed) {
    float *x = lp_test_rand((size_t)N * D, seed, -2, 2);
    for (int r = 0; r < N; r += 3)
        for (int d = 0; d < D; d++) x[(size_t)r * D + d] *= 100.0f;
    round_act(dt, x, (size_t)N * D);
    return x;
}

static const int RMS_SHAPES[][2] = {{1, 1}, {1, 2048}, {31, 33}, {33, 31}, {32, 1000}, {1000, 576}};

Test(ops_cuda, rms_scale) {
    LP_TEST_REQUIRE_GPU();
    const float eps = 1e-5f;
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof RMS_SHAPES / sizeof RMS_SHAPES[0]; si++) {
            const lp_dtype dt = DTYPES[di];
            const int N = RMS_SHAPES[si][0], D = RMS_SHAPES[si][1];
            const uint64_t seed = 1900 + si;
            float *x = rms_input(dt, N, D, seed);
            float *ref = zeros(N);
            OK(lp_rms_scale(cpu(), ref, x, N, D, eps));

            gpu g;
            gpu_init(&g, dt);
            void *d_x = gpu_put_act(&g, x, (size_t)N * D);
            void *d_s = gpu_alloc(&g, act_bytes(&g, N));
            OK(lp_rms_scale(&g.c, d_s, d_x, N, D, eps));
            float *got = gpu_get_act(&g, d_s, N);
            char label[64];
            snprintf(label, sizeof label, "N=%d D=%d", N, D);
            expect_close(OP_RMS_SCALE, dt, label, seed, got, ref, N);
            gpu_done(&g, label);
            free(x), free(ref), free(got);
        }
}

Test(ops_cuda, rms_apply) {
    LP_TEST_REQUIRE_GPU();
    const float eps = 1e-5f;
    static const char *variant_name[] = {"normalized", "weight", "weight in place"};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof RMS_SHAPES / sizeof RMS_SHAPES[0]; si++)
            for (int variant = 0; variant < 3; variant++) {
                const lp_dtype dt = DTYPES[di];
                const int N = RMS_SHAPES[si][0], D = RMS_SHAPES[si][1];
                const size_t n = (size_t)N * D;
                const uint64_t seed = 2000 + si;
                float *x = rms_input(dt, N, D, seed);
                float *scale = zeros(N);
                OK(lp_rms_scale(cpu(), scale, x, N, D, eps));
                round_act(dt, scale, N); /* the hook value both sides then read */
                float *w = rand_act(dt, D, seed + 1, 0.5f, 1.5f);
                const float *use_w = variant ? w : NULL;
                float *ref = zeros(n);
                OK(lp_rms_apply(cpu(), ref, x, scale, use_w, N, D));

                gpu g;
                gpu_init(&g, dt);
                void *d_x = gpu_put_act(&g, x, n), *d_s = gpu_put_act(&g, scale, N);
                void *d_w = gpu_put_act(&g, w, D);
                void *d_out = variant == 2 ? d_x : gpu_alloc(&g, act_bytes(&g, n));
                OK(lp_rms_apply(&g.c, d_out, d_x, d_s, use_w ? d_w : NULL, N, D));
                float *got = gpu_get_act(&g, d_out, n);
                char label[64];
                snprintf(label, sizeof label, "N=%d D=%d %s", N, D, variant_name[variant]);
                expect_close(OP_RMS_APPLY, dt, label, seed, got, ref, n);
                gpu_done(&g, label);
                free(x), free(scale), free(w), free(ref), free(got);
            }
}

/* cos/sin tables [n_pos, dh/2] as the model builds them (angle p * 10000^(-2i/dh), double) */
static void rope_tables(int n_pos, int dh, float **cos_t, float **sin_t) {
    const int half = dh / 2;
    *cos_t = zeros((size_t)n_pos * half);
    *sin_t = zeros((size_t)n_pos * half);
    for (int p = 0; p < n_pos; p++)
        for (int i = 0; i < half; i++) {
            const double a = p * pow(10000.0, -2.0 * i / dh);
            (*cos_t)[(size_t)p * half + i] = (float)cos(a);
            (*sin_t)[(size_t)p * half + i] = (float)sin(a);
        }
}

Test(ops_cuda, rope) {
    LP_TEST_REQUIRE_GPU();
    /* (B, T, H, dh, pos0): one pair; odd lengths; SmolLM2's q and k heads; a decode step far
     * into the table; the largest head dim; a long sequence */
    static const int shapes[][5] = {{1, 1, 1, 2, 0},   {2, 31, 3, 34, 0},    {1, 33, 9, 64, 7},
                                    {2, 33, 3, 64, 7}, {3, 1, 4, 128, 4000}, {1, 5, 2, 256, 3},
                                    {1, 1000, 2, 64, 0}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
            for (int in_place = 0; in_place < 2; in_place++) {
                const lp_dtype dt = DTYPES[di];
                const int B = shapes[si][0], T = shapes[si][1], H = shapes[si][2];
                const int dh = shapes[si][3], pos0 = shapes[si][4];
                const int n_pos = pos0 + T + 3;
                const size_t n = (size_t)B * T * H * dh, ntab = (size_t)n_pos * (dh / 2);
                const uint64_t seed = 2100 + si;
                float *x = rand_act(dt, n, seed, -3, 3), *ct, *st;
                rope_tables(n_pos, dh, &ct, &st);
                float *ref = zeros(n);
                OK(lp_rope(cpu(), ref, x, ct, st, B, T, H, dh, pos0));

                gpu g;
                gpu_init(&g, dt);
                void *d_x = gpu_put_act(&g, x, n);
                float *d_c = gpu_put(&g, ct, ntab * sizeof(float));
                float *d_s = gpu_put(&g, st, ntab * sizeof(float));
                void *d_out = in_place ? d_x : gpu_alloc(&g, act_bytes(&g, n));
                OK(lp_rope(&g.c, d_out, d_x, d_c, d_s, B, T, H, dh, pos0));
                float *got = gpu_get_act(&g, d_out, n);
                char label[80];
                snprintf(label, sizeof label, "B=%d T=%d H=%d dh=%d pos0=%d%s", B, T, H, dh, pos0,
                         in_place ? " in place" : "");
                expect_close(OP_ROPE, dt, label, seed, got, ref, n);
                gpu_done(&g, label);
                free(x), free(ct), free(st), free(ref), free(got);
            }
}

Test(ops_cuda, silu_mul) {
    LP_TEST_REQUIRE_GPU();
    static const size_t sizes[] = {1, 31, 33, 1000, 100003};
    static const char *where[] = {"", " in place (gate)", " in place (up)"};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++)
            for (int alias = 0; alias < 3; alias++) {
                const lp_dtype dt = DTYPES[di];
                const size_t n = sizes[si];
                const uint64_t seed = 2200 + si;
                /* gate in [-20, 20]: exp(-gate) from 2e-9 to 5e8 */
                float *gate = rand_act(dt, n, seed, -20, 20), *up = rand_act(dt, n, seed + 1, -3, 3);
                float *ref = zeros(n);
                OK(lp_silu_mul(cpu(), ref, gate, up, n));

                gpu g;
                gpu_init(&g, dt);
                void *d_g = gpu_put_act(&g, gate, n), *d_u = gpu_put_act(&g, up, n);
                void *d_out = alias == 1 ? d_g : alias == 2 ? d_u : gpu_alloc(&g, act_bytes(&g, n));
                OK(lp_silu_mul(&g.c, d_out, d_g, d_u, n));
                float *got = gpu_get_act(&g, d_out, n);
                char label[64];
                snprintf(label, sizeof label, "n=%zu%s", n, where[alias]);
                expect_close(OP_SILU_MUL, dt, label, seed, got, ref, n);
                gpu_done(&g, label);
                free(gate), free(up), free(ref), free(got);
            }
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

Test(ops_cuda, llama_ops_reject_bad_shapes) {
    LP_TEST_REQUIRE_GPU();
    gpu g;
    gpu_init(&g, LP_F32);
    void *d = gpu_alloc(&g, act_bytes(&g, 2 * 257));
    lp_status st = lp_attention_cached(&g.c, d, d, d, d, 1, 1, 2, 0, 1, 1, 257);
    cr_expect_eq(st, LP_ERR_ARG, "cached dh = 257 gave %s (%s)", lp_status_name(st), lp_last_error());
    st = lp_attention_cached(&g.c, d, d, d, d, 1, 2, 2, 1, 1, 1, 8);
    cr_expect_eq(st, LP_ERR_ARG, "positions past the cache gave %s (%s)", lp_status_name(st),
                 lp_last_error());
    st = lp_rope(&g.c, d, d, (const float *)d, (const float *)d, 1, 1, 1, 3, 0);
    cr_expect_eq(st, LP_ERR_ARG, "rope with dh = 3 gave %s (%s)", lp_status_name(st), lp_last_error());
    gpu_done(&g, "llama bad shapes");
}

/* ---- contexts on two devices in one thread ----
 * The runtime's current device belongs to the host thread: after a context on device 1 is
 * created, work for a context on device 0 must still run on device 0. (The emulator lends
 * two devices through LOUPE_EMU_DEVICES and reports memory of one device used on another;
 * a GPU machine with one device skips.) */
Test(ops_cuda, contexts_on_two_devices_in_one_thread) {
    LP_TEST_REQUIRE_GPU();
    setenv("LOUPE_EMU_DEVICES", "2", 1); /* read by the emulator only */
    char why[128];
    if (lp_cuda_device_count(why, sizeof why) < 2) cr_skip_test("needs two CUDA devices");
    enum { n = 1000 };
    float *x = lp_test_rand(n, 71, -1, 1), *y = lp_test_rand(n, 72, -1, 1), ref[n], got[n];
    for (int i = 0; i < n; i++) ref[i] = x[i] + y[i];
    lp_ctx a, b;
    OK(lp_ctx_init(&a, LP_CUDA, LP_F32));
    void *dx, *dy, *dout;
    OK(lp_ctx_alloc(&a, n * 4, &dx));
    OK(lp_ctx_alloc(&a, n * 4, &dy));
    OK(lp_ctx_alloc(&a, n * 4, &dout));
    memset(&b, 0, sizeof b);
    b.device = LP_CUDA, b.dtype = LP_F32, b.cuda_device = 1;
    OK(lp_cuda_ctx_init(&b)); /* device 1 is now the thread's current device */
    void *db;
    OK(lp_ctx_alloc(&b, n * 4, &db));
    OK(lp_ctx_to_device(&b, db, x, n * 4));
    OK(lp_ctx_to_device(&a, dx, x, n * 4));
    OK(lp_ctx_to_device(&a, dy, y, n * 4));
    OK(lp_add(&a, dout, dx, dy, n));
    OK(lp_add(&b, db, db, db, n));
    OK(lp_ctx_to_host(&a, got, dout, n * 4));
    for (int i = 0; i < n; i++) cr_expect_float_eq(got[i], ref[i], 0.0f, "x + y [%d] on device 0", i);
    OK(lp_ctx_to_host(&b, got, db, n * 4));
    for (int i = 0; i < n; i++) cr_expect_float_eq(got[i], 2 * x[i], 0.0f, "x + x [%d] on device 1", i);
    lp_ctx_release(&b, db);
    lp_ctx_release(&a, dx), lp_ctx_release(&a, dy), lp_ctx_release(&a, dout);
    lp_ctx_free(&b);
    lp_ctx_free(&a);
    free(x), free(y);
}

/* ---- random weights on the device ----
 * lp_cuda_init_weights gives the host's base + lp_rng_init_weight values bit for bit (after
 * the rounding to bf16 the host's upload does), and lp_rng_init_weight_skip the state the
 * host loop leaves: random models are the same on both sides. */
Test(ops_cuda, init_weights_match_the_host_generator) {
    LP_TEST_REQUIRE_GPU();
    static const size_t sizes[] = {1, 63, 64, 65, EMU_CAP(300007, 20011)};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
            const lp_dtype dt = DTYPES[di];
            const size_t n = sizes[si];
            const float base = si % 2 ? 1.0f : 0.0f;
            const uint64_t s0 = 1 + 977 * si;
            uint64_t s = s0;
            float *ref = zeros(n);
            for (size_t j = 0; j < n; j++) ref[j] = base + lp_rng_init_weight(&s);
            cr_expect_eq(lp_rng_init_weight_skip(s0, n), s, "state after %zu values", n);
            round_act(dt, ref, n);
            gpu g;
            gpu_init(&g, dt);
            void *d = gpu_alloc(&g, act_bytes(&g, n));
            OK(lp_cuda_init_weights(&g.c, d, n, s0, base));
            float *got = gpu_get_act(&g, d, n);
            size_t bad = 0;
            for (size_t j = 0; j < n; j++) bad += memcmp(&got[j], &ref[j], 4) != 0;
            cr_expect_eq(bad, 0, "init_weights %s n=%zu: %zu values differ from the host's", lp_dtype_name(dt), n, bad);
            gpu_done(&g, "init_weights");
            free(ref), free(got);
        }
}
