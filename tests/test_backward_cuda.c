/* test_backward_cuda.c: every backward op of ops.h on the GPU against its CPU twin
 * (host/ops/cpu/backward.c, itself checked against float64 and finite differences by
 * test_backward.c), through the public dispatch, in both GPU activation dtypes.
 *
 * Each case draws seeded random inputs over awkward shapes, runs the op on an LP_CUDA and an
 * LP_CPU context and compares by normalized squared error against BUDGET below. Device
 * buffers sit between guard bytes, checked after the op. BF16 cases round the host inputs to
 * bf16 first and hand those same values to the CPU (saved forward values such as the norm
 * scale or the softmax pattern are computed on the CPU, then rounded, as the hook would hold
 * them), so what remains is the kernel's own rounding. The fused attention backward is also
 * run twice and must give the same bits (no atomics), and must agree with the three-step
 * chain on the GPU itself. Without a GPU every test skips, saying why (LOUPE_REQUIRE_GPU=1
 * turns the skip into a failure). */
#include "loupe/ops.h"
#include "gputest.h"

/* ---- budgets: nmse = sum (gpu - cpu)^2 / sum cpu^2 ------------------------------------
 * fp32: the GPU sums in fp32 in another order than the CPU (which sums in double where it
 *   can): ~1e-14 .. 1e-12 per element-wise op, ~K * 1e-14 for sums of K terms (the fused
 *   attention's dk sums T * group terms; softmax-backward terms p (dp - D) cancel).
 * bf16: one rounding of each output, relative <= 2^-9, gives nmse ~1.3e-6 (~3e-6 measured on
 *   a host transcription of the kernels); 1e-4 leaves a margin of ~30. The three-step chain in
 *   bf16 also rounds the scores, the pattern, dpattern (before the softmax backward subtracts
 *   D from it) and dscores: ~3e-5 measured there, budget 5e-4 (as the forward's steps).
 * The fused attention backward in fp32 measured ~2e-13 (host transcription); 1e-9.
 * A second run of the fused attention backward must reproduce the first bit for bit. */
enum {
    OP_LN, OP_RMS, OP_GELU, OP_SILU, OP_ROPE, OP_SOFTMAX, OP_ATTN, OP_ATTN_APPLY, OP_ATTN_SCORES,
    OP_XENT, OP_FUSED_VS_STEPS, OP_ATTN_REPEAT, OP_COUNT
};
static const struct budget {
    const char *op;
    double nmse[2]; /* [0]: F32, [1]: BF16 */
} BUDGET[OP_COUNT] = {
    [OP_LN] = {"ln_backward", {1e-9, 1e-4}},
    [OP_RMS] = {"rms_backward", {1e-9, 1e-4}},
    [OP_GELU] = {"gelu_backward", {1e-10, 1e-4}},
    [OP_SILU] = {"silu_mul_backward", {1e-10, 1e-4}},
    [OP_ROPE] = {"rope_backward", {1e-10, 1e-4}},
    [OP_SOFTMAX] = {"softmax_rows_backward", {1e-9, 1e-4}},
    [OP_ATTN] = {"attention_backward", {1e-9, 1e-4}},
    [OP_ATTN_APPLY] = {"attn_apply_backward", {1e-8, 1e-4}},
    [OP_ATTN_SCORES] = {"attn_scores_backward", {1e-8, 1e-4}},
    [OP_XENT] = {"xent_backward", {1e-9, 1e-4}},
    [OP_FUSED_VS_STEPS] = {"attention_backward vs 3 steps (GPU)", {1e-9, 5e-4}},
    [OP_ATTN_REPEAT] = {"attention_backward run twice (GPU)", {0, 0}},
};

static const lp_dtype DTYPES[2] = {LP_F32, LP_BF16};
static double budget(int op, lp_dtype dt) { return BUDGET[op].nmse[dt == LP_BF16]; }

static void expect_close(int op, lp_dtype dt, const char *label, uint64_t seed, const float *got, const float *ref,
                         size_t n) {
    char what[192];
    snprintf(what, sizeof what, "%s %s %s", BUDGET[op].op, lp_dtype_name(dt), label);
    LP_EXPECT_WITHIN(what, seed, lp_compare_f(got, ref, n), nmse, budget(op, dt));
}

/* ---- LayerNorm / RMSNorm ---- */

static const int NORM_SHAPES[][2] = {{1, 1}, {1, 1600}, {31, 33}, {33, 31}, {32, 1000}, {1000, 64}};

/* variant 0: with w; 1: normalized only (w = NULL); 2: with w, dx written over dy */
static void check_norm(int rms, lp_dtype dt, int N, int D, int variant, uint64_t seed) {
    const size_t n = (size_t)N * D;
    float *x = lp_test_rand(n, seed, -1, 1);
    for (int r = 0; r < N; r++) /* LayerNorm: a mean 300 away from zero; RMSNorm: rows 100x larger */
        for (int d = 0; d < D; d++) {
            if (!rms && r % 2 == 1) x[(size_t)r * D + d] += 300.0f;
            if (rms && r % 3 == 0) x[(size_t)r * D + d] *= 100.0f;
        }
    round_act(dt, x, n);
    float *w = rand_act(dt, D, seed + 1, 0.5f, 1.5f), *dy = rand_act(dt, n, seed + 2, -1, 1);
    float *scale = zeros(N), *ref = zeros(n);
    if (rms) OK(lp_rms_scale(cpu(), scale, x, N, D, 1e-6f));
    else OK(lp_ln_scale(cpu(), scale, x, N, D, 1e-5f));
    round_act(dt, scale, N); /* the hook value both sides read */
    const float *wp = variant == 1 ? NULL : w;
    if (rms) OK(lp_rms_backward(cpu(), ref, dy, x, scale, wp, N, D));
    else OK(lp_ln_backward(cpu(), ref, dy, x, scale, wp, N, D));

    gpu g;
    gpu_init(&g, dt);
    void *d_x = gpu_put_act(&g, x, n), *d_s = gpu_put_act(&g, scale, N), *d_w = gpu_put_act(&g, w, D);
    void *d_dy = gpu_put_act(&g, dy, n), *d_dx = variant == 2 ? d_dy : gpu_alloc(&g, act_bytes(&g, n));
    const void *d_wp = variant == 1 ? NULL : d_w;
    if (rms) OK(lp_rms_backward(&g.c, d_dx, d_dy, d_x, d_s, d_wp, N, D));
    else OK(lp_ln_backward(&g.c, d_dx, d_dy, d_x, d_s, d_wp, N, D));
    float *got = gpu_get_act(&g, d_dx, n);
    char label[64];
    snprintf(label, sizeof label, "N=%d D=%d %s", N, D, variant == 0 ? "w" : variant == 1 ? "normalized" : "w in place");
    if (rms && D == 1) {
        /* RMSNorm over one element: xh = +-1 and dx = dy w (1 - xh^2) / s = dy w eps / s^3, ~0
         * and decided by the rounding of xh (fp32 here, double on the CPU). Compare dx s / (dy w),
         * i.e. 1 - xh^2, on an absolute scale: fp32 ~2e-7; bf16 rounds a value of ~2^-8 to 2^-9. */
        double worst = 0;
        for (int r = 0; r < N; r++) {
            double gw = fabs((double)dy[r] * (wp ? wp[0] : 1.0f));
            if (gw == 0) continue;
            double e = fabs((double)got[r] - ref[r]) * scale[r] / gw;
            cr_expect(isfinite(got[r]), "rms D=1: dx[%d] = %g", r, got[r]);
            if (e > worst) worst = e;
        }
        fprintf(stderr, "  %s %s %s: max |dx - ref| s / |dy w| = %.3e of 1.0e-4\n", BUDGET[OP_RMS].op,
                lp_dtype_name(dt), label, worst);
        cr_expect(worst <= 1e-4, "rms_backward %s %s: %.3e exceeds 1e-4 (seed %llu)", lp_dtype_name(dt), label,
                  worst, (unsigned long long)seed);
    } else {
        expect_close(rms ? OP_RMS : OP_LN, dt, label, seed, got, ref, n);
    }
    if (variant != 2 && D > 1) { /* the gradient at hook_scale, from the same inputs */
        float *sref = zeros(N);
        OK(lp_norm_scale_grad(cpu(), sref, dy, x, scale, wp, N, D, !rms));
        void *d_ds = gpu_alloc(&g, act_bytes(&g, N));
        OK(lp_norm_scale_grad(&g.c, d_ds, d_dy, d_x, d_s, d_wp, N, D, !rms));
        float *sgot = gpu_get_act(&g, d_ds, N);
        char sl[96];
        snprintf(sl, sizeof sl, "%s, hook_scale gradient", label);
        expect_close(rms ? OP_RMS : OP_LN, dt, sl, seed, sgot, sref, N);
        free(sref), free(sgot);
    }
    gpu_done(&g, label);
    free(x), free(w), free(dy), free(scale), free(ref), free(got);
}

Test(backward_cuda, ln_backward) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof NORM_SHAPES / sizeof *NORM_SHAPES; si++)
            for (int variant = 0; variant < 3; variant++)
                check_norm(0, DTYPES[di], NORM_SHAPES[si][0], NORM_SHAPES[si][1], variant, 100 + si);
}

Test(backward_cuda, rms_backward) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof NORM_SHAPES / sizeof *NORM_SHAPES; si++)
            for (int variant = 0; variant < 3; variant++)
                check_norm(1, DTYPES[di], NORM_SHAPES[si][0], NORM_SHAPES[si][1], variant, 200 + si);
}

/* ---- element-wise ---- */

static const size_t EW_SIZES[] = {1, 31, 33, 1000, 100003};

Test(backward_cuda, gelu_backward) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof EW_SIZES / sizeof *EW_SIZES; si++)
            for (int in_place = 0; in_place < 2; in_place++) {
                const lp_dtype dt = DTYPES[di];
                const size_t n = EW_SIZES[si];
                const uint64_t seed = 300 + si;
                float *x = rand_act(dt, n, seed, -8, 8), *dy = rand_act(dt, n, seed + 1, -1, 1);
                float *ref = zeros(n);
                OK(lp_gelu_backward(cpu(), ref, dy, x, n));

                gpu g;
                gpu_init(&g, dt);
                void *d_x = gpu_put_act(&g, x, n), *d_dy = gpu_put_act(&g, dy, n);
                void *d_dx = in_place ? d_dy : gpu_alloc(&g, act_bytes(&g, n));
                OK(lp_gelu_backward(&g.c, d_dx, d_dy, d_x, n));
                float *got = gpu_get_act(&g, d_dx, n);
                char label[64];
                snprintf(label, sizeof label, "n=%zu%s", n, in_place ? " in place" : "");
                expect_close(OP_GELU, dt, label, seed, got, ref, n);
                gpu_done(&g, label);
                free(x), free(dy), free(ref), free(got);
            }
}

Test(backward_cuda, silu_mul_backward) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof EW_SIZES / sizeof *EW_SIZES; si++) {
            const lp_dtype dt = DTYPES[di];
            const size_t n = EW_SIZES[si];
            const uint64_t seed = 400 + si;
            /* gate in [-20, 20]: sig(gate) from 2e-9 to 1 - 2e-9 */
            float *gate = rand_act(dt, n, seed, -20, 20), *up = rand_act(dt, n, seed + 1, -3, 3);
            float *dy = rand_act(dt, n, seed + 2, -1, 1), *rg = zeros(n), *ru = zeros(n);
            OK(lp_silu_mul_backward(cpu(), rg, ru, dy, gate, up, n));

            gpu g;
            gpu_init(&g, dt);
            void *d_g = gpu_put_act(&g, gate, n), *d_u = gpu_put_act(&g, up, n), *d_dy = gpu_put_act(&g, dy, n);
            void *d_dg = gpu_alloc(&g, act_bytes(&g, n)), *d_du = gpu_alloc(&g, act_bytes(&g, n));
            OK(lp_silu_mul_backward(&g.c, d_dg, d_du, d_dy, d_g, d_u, n));
            float *gg = gpu_get_act(&g, d_dg, n), *gu = gpu_get_act(&g, d_du, n);
            char label[64];
            snprintf(label, sizeof label, "n=%zu dgate", n);
            expect_close(OP_SILU, dt, label, seed, gg, rg, n);
            snprintf(label, sizeof label, "n=%zu dup", n);
            expect_close(OP_SILU, dt, label, seed, gu, ru, n);
            gpu_done(&g, label);
            free(gate), free(up), free(dy), free(rg), free(ru), free(gg), free(gu);
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

Test(backward_cuda, rope_backward) {
    LP_TEST_REQUIRE_GPU();
    /* (B, T, H, dh, pos0): one pair; odd lengths; SmolLM2's heads; a decode step far into the
     * table; the largest head dim; a long sequence */
    static const int shapes[][5] = {{1, 1, 1, 2, 0},      {2, 31, 3, 34, 0}, {1, 33, 9, 64, 7},
                                    {3, 1, 4, 128, 4000}, {1, 5, 2, 256, 3}, {1, 1000, 2, 64, 0}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
            for (int in_place = 0; in_place < 2; in_place++) {
                const lp_dtype dt = DTYPES[di];
                const int B = shapes[si][0], T = shapes[si][1], H = shapes[si][2], dh = shapes[si][3];
                const int pos0 = shapes[si][4], n_pos = pos0 + T + 3;
                const size_t n = (size_t)B * T * H * dh, ntab = (size_t)n_pos * (dh / 2);
                const uint64_t seed = 500 + si;
                float *dy = rand_act(dt, n, seed, -3, 3), *ct, *st;
                rope_tables(n_pos, dh, &ct, &st);
                float *ref = zeros(n);
                OK(lp_rope_backward(cpu(), ref, dy, ct, st, B, T, H, dh, pos0));

                gpu g;
                gpu_init(&g, dt);
                void *d_dy = gpu_put_act(&g, dy, n);
                float *d_c = gpu_put(&g, ct, ntab * sizeof(float)), *d_s = gpu_put(&g, st, ntab * sizeof(float));
                void *d_dx = in_place ? d_dy : gpu_alloc(&g, act_bytes(&g, n));
                OK(lp_rope_backward(&g.c, d_dx, d_dy, d_c, d_s, B, T, H, dh, pos0));
                float *got = gpu_get_act(&g, d_dx, n);
                char label[80];
                snprintf(label, sizeof label, "B=%d T=%d H=%d dh=%d pos0=%d%s", B, T, H, dh, pos0,
                         in_place ? " in place" : "");
                expect_close(OP_ROPE, dt, label, seed, got, ref, n);
                gpu_done(&g, label);
                free(dy), free(ct), free(st), free(ref), free(got);
            }
}

/* ---- softmax rows ---- */

Test(backward_cuda, softmax_rows_backward) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][2] = {{1, 1}, {31, 33}, {33, 31}, {33, 1000}, {1000, 64}, {3, 50257}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
            for (int in_place = 0; in_place < 2; in_place++) {
                const lp_dtype dt = DTYPES[di];
                const size_t rows = shapes[si][0];
                const int cols = shapes[si][1];
                const size_t n = rows * cols;
                const uint64_t seed = 600 + si;
                /* about a quarter of the entries masked (never column 0), the second row fully,
                 * and NaN gradients on some masked entries: they must not spread */
                float *x = lp_test_rand(n, seed, -8, 8), *dy = rand_act(dt, n, seed + 1, -1, 1);
                uint64_t s = seed + 7;
                for (size_t r = 0; r < rows; r++)
                    for (int j = 0; j < cols; j++)
                        if ((j > 0 && lp_test_next(&s) % 4 == 0) || r == 1) x[r * cols + j] = -INFINITY;
                for (size_t j = 0; j < n; j++)
                    if (isinf(x[j]) && j % 3 == 0) dy[j] = NAN;
                round_act(dt, x, n);
                float *y = zeros(n), *ref = zeros(n);
                OK(lp_softmax_rows(cpu(), y, x, rows, cols));
                round_act(dt, y, n);
                OK(lp_softmax_rows_backward(cpu(), ref, dy, y, rows, cols));

                gpu g;
                gpu_init(&g, dt);
                void *d_y = gpu_put_act(&g, y, n), *d_dy = gpu_put_act(&g, dy, n);
                void *d_dx = in_place ? d_dy : gpu_alloc(&g, act_bytes(&g, n));
                OK(lp_softmax_rows_backward(&g.c, d_dx, d_dy, d_y, rows, cols));
                float *got = gpu_get_act(&g, d_dx, n);
                char label[64];
                snprintf(label, sizeof label, "rows=%zu cols=%d%s", rows, cols, in_place ? " in place" : "");
                expect_close(OP_SOFTMAX, dt, label, seed, got, ref, n);
                gpu_done(&g, label);
                free(x), free(dy), free(y), free(ref), free(got);
            }
}

/* ---- attention ---- */

typedef struct attn_shape { int B, T, H, Hkv, dh; } attn_shape;
static const attn_shape ATTN_SHAPES[] = {
    {1, 1, 1, 1, 1},     /* one token, dh = 1: the stats go to a scratch buffer (both dtypes) */
    {1, 17, 4, 2, 3},    /* dh = 3: scratch in BF16 (6-byte dq rows), dq rows in F32 */
    {1, 17, 4, 2, 4},    /* dh = 4: the smallest head dim whose BF16 dq rows hold the stats */
    {2, 31, 3, 3, 33},   /* dh just over a warp */
    {1, 33, 8, 2, 64},   /* GQA, GPT-2's head dim */
    {2, 33, 9, 3, 64},   /* SmolLM2's heads */
    {1, 40, 2, 1, 100},  /* multi-query, dh not a power of two */
    {1, 37, 2, 2, 256},  /* the largest head dim */
    {1, LONG_T(1000), 2, 1, 64}, /* long context: many 32-key and 32-query chunks */
};
#define N_ATTN (sizeof ATTN_SHAPES / sizeof *ATTN_SHAPES)

typedef struct attn_in { float *q, *k, *v, *dz; size_t nq, nkv, ns; } attn_in;

/* q in [-3, 3] so that softmax rows are neither flat nor one-hot. */
static attn_in attn_inputs(lp_dtype dt, attn_shape s, uint64_t seed) {
    attn_in a;
    a.nq = (size_t)s.B * s.T * s.H * s.dh;
    a.nkv = (size_t)s.B * s.T * s.Hkv * s.dh;
    a.ns = (size_t)s.B * s.H * s.T * s.T;
    a.q = rand_act(dt, a.nq, seed, -3, 3);
    a.k = rand_act(dt, a.nkv, seed + 1, -1, 1);
    a.v = rand_act(dt, a.nkv, seed + 2, -1, 1);
    a.dz = rand_act(dt, a.nq, seed + 3, -1, 1);
    return a;
}
static void attn_free(attn_in *a) { free(a->q), free(a->k), free(a->v), free(a->dz); }

static void attn_label(char *buf, size_t n, attn_shape s) {
    snprintf(buf, n, "B=%d T=%d H=%d Hkv=%d dh=%d", s.B, s.T, s.H, s.Hkv, s.dh);
}

static void check_attention_backward(lp_dtype dt, attn_shape s, uint64_t seed) {
    attn_in a = attn_inputs(dt, s, seed);
    float *rq = zeros(a.nq), *rk = zeros(a.nkv), *rv = zeros(a.nkv);
    OK(lp_attention_backward(cpu(), rq, rk, rv, a.dz, a.q, a.k, a.v, s.B, s.T, s.H, s.Hkv, s.dh));

    gpu g;
    gpu_init(&g, dt);
    void *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv), *d_v = gpu_put_act(&g, a.v, a.nkv);
    void *d_dz = gpu_put_act(&g, a.dz, a.nq);
    void *d_dq = gpu_alloc(&g, act_bytes(&g, a.nq)), *d_dk = gpu_alloc(&g, act_bytes(&g, a.nkv));
    void *d_dv = gpu_alloc(&g, act_bytes(&g, a.nkv));
    OK(lp_attention_backward(&g.c, d_dq, d_dk, d_dv, d_dz, d_q, d_k, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
    float *gq = gpu_get_act(&g, d_dq, a.nq), *gk = gpu_get_act(&g, d_dk, a.nkv), *gv = gpu_get_act(&g, d_dv, a.nkv);
    char label[96], l2[128];
    attn_label(label, sizeof label, s);
    snprintf(l2, sizeof l2, "%s dq", label);
    expect_close(OP_ATTN, dt, l2, seed, gq, rq, a.nq);
    snprintf(l2, sizeof l2, "%s dk", label);
    expect_close(OP_ATTN, dt, l2, seed, gk, rk, a.nkv);
    snprintf(l2, sizeof l2, "%s dv", label);
    expect_close(OP_ATTN, dt, l2, seed, gv, rv, a.nkv);

    /* again, over outputs full of garbage: the same bits (no atomics, nothing read from dq/dk/dv) */
    float *junk = lp_test_rand(a.nq, seed + 9, -1e30f, 1e30f);
    OK(lp_ctx_to_device(&g.c, d_dq, junk, act_bytes(&g, a.nq)));
    OK(lp_ctx_to_device(&g.c, d_dk, junk, act_bytes(&g, a.nkv)));
    OK(lp_ctx_to_device(&g.c, d_dv, junk, act_bytes(&g, a.nkv)));
    OK(lp_attention_backward(&g.c, d_dq, d_dk, d_dv, d_dz, d_q, d_k, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
    float *gq2 = gpu_get_act(&g, d_dq, a.nq), *gk2 = gpu_get_act(&g, d_dk, a.nkv), *gv2 = gpu_get_act(&g, d_dv, a.nkv);
    snprintf(l2, sizeof l2, "%s dq", label);
    expect_close(OP_ATTN_REPEAT, dt, l2, seed, gq2, gq, a.nq);
    snprintf(l2, sizeof l2, "%s dk", label);
    expect_close(OP_ATTN_REPEAT, dt, l2, seed, gk2, gk, a.nkv);
    snprintf(l2, sizeof l2, "%s dv", label);
    expect_close(OP_ATTN_REPEAT, dt, l2, seed, gv2, gv, a.nkv);
    gpu_done(&g, label);
    free(rq), free(rk), free(rv), free(gq), free(gk), free(gv), free(gq2), free(gk2), free(gv2), free(junk);
    attn_free(&a);
}

Test(backward_cuda, attention_backward) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < N_ATTN; si++) check_attention_backward(DTYPES[di], ATTN_SHAPES[si], 700 + si);
}

/* pattern_kind 0: a causal softmax pattern (the model's); 1: a dense random pattern with
 * weight above the diagonal and exact zeros (an edited hook_pattern, applied as given). */
static void check_apply_backward(lp_dtype dt, attn_shape s, uint64_t seed, int pattern_kind) {
    attn_in a = attn_inputs(dt, s, seed);
    float *pat = zeros(a.ns);
    if (pattern_kind == 0) {
        float *sc = zeros(a.ns);
        OK(lp_attn_scores(cpu(), sc, a.q, a.k, s.B, s.T, s.H, s.Hkv, s.dh));
        OK(lp_softmax_rows(cpu(), pat, sc, (size_t)s.B * s.H * s.T, s.T));
        free(sc);
    } else {
        lp_test_fill(pat, a.ns, seed + 4, -0.5f, 1.0f);
        for (size_t i = 0; i < a.ns; i++)
            if (pat[i] < 0) pat[i] = 0;
    }
    round_act(dt, pat, a.ns);
    float *rp = zeros(a.ns), *rv = zeros(a.nkv);
    OK(lp_attn_apply_backward(cpu(), rp, rv, a.dz, pat, a.v, s.B, s.T, s.H, s.Hkv, s.dh));

    gpu g;
    gpu_init(&g, dt);
    void *d_p = gpu_put_act(&g, pat, a.ns), *d_v = gpu_put_act(&g, a.v, a.nkv), *d_dz = gpu_put_act(&g, a.dz, a.nq);
    void *d_dp = gpu_alloc(&g, act_bytes(&g, a.ns)), *d_dv = gpu_alloc(&g, act_bytes(&g, a.nkv));
    OK(lp_attn_apply_backward(&g.c, d_dp, d_dv, d_dz, d_p, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
    float *gp = gpu_get_act(&g, d_dp, a.ns), *gv = gpu_get_act(&g, d_dv, a.nkv);
    char label[96], l2[128];
    attn_label(label, sizeof label, s);
    snprintf(l2, sizeof l2, "%s %s dpattern", label, pattern_kind ? "dense" : "causal");
    expect_close(OP_ATTN_APPLY, dt, l2, seed, gp, rp, a.ns);
    snprintf(l2, sizeof l2, "%s %s dv", label, pattern_kind ? "dense" : "causal");
    expect_close(OP_ATTN_APPLY, dt, l2, seed, gv, rv, a.nkv);
    gpu_done(&g, label);
    free(pat), free(rp), free(rv), free(gp), free(gv);
    attn_free(&a);
}

Test(backward_cuda, attn_apply_backward) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < N_ATTN; si++)
            for (int kind = 0; kind < 2; kind++) check_apply_backward(DTYPES[di], ATTN_SHAPES[si], 800 + si, kind);
}

/* dscores random where the key is at or before the query, NaN above the diagonal: the masked
 * entries must be ignored. */
static void check_scores_backward(lp_dtype dt, attn_shape s, uint64_t seed) {
    attn_in a = attn_inputs(dt, s, seed);
    float *ds = rand_act(dt, a.ns, seed + 5, -1, 1);
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int t = 0; t < s.T; t++)
                for (int j = t + 1; j < s.T; j++) ds[(((size_t)b * s.H + h) * s.T + t) * s.T + j] = NAN;
    float *rq = zeros(a.nq), *rk = zeros(a.nkv);
    OK(lp_attn_scores_backward(cpu(), rq, rk, ds, a.q, a.k, s.B, s.T, s.H, s.Hkv, s.dh));

    gpu g;
    gpu_init(&g, dt);
    void *d_ds = gpu_put_act(&g, ds, a.ns), *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv);
    void *d_dq = gpu_alloc(&g, act_bytes(&g, a.nq)), *d_dk = gpu_alloc(&g, act_bytes(&g, a.nkv));
    OK(lp_attn_scores_backward(&g.c, d_dq, d_dk, d_ds, d_q, d_k, s.B, s.T, s.H, s.Hkv, s.dh));
    float *gq = gpu_get_act(&g, d_dq, a.nq), *gk = gpu_get_act(&g, d_dk, a.nkv);
    char label[96], l2[128];
    attn_label(label, sizeof label, s);
    snprintf(l2, sizeof l2, "%s dq", label);
    expect_close(OP_ATTN_SCORES, dt, l2, seed, gq, rq, a.nq);
    snprintf(l2, sizeof l2, "%s dk", label);
    expect_close(OP_ATTN_SCORES, dt, l2, seed, gk, rk, a.nkv);
    gpu_done(&g, label);
    free(ds), free(rq), free(rk), free(gq), free(gk);
    attn_free(&a);
}

Test(backward_cuda, attn_scores_backward) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < N_ATTN; si++) check_scores_backward(DTYPES[di], ATTN_SHAPES[si], 900 + si);
}

/* The fused backward and the chain attn_apply -> softmax_rows -> attn_scores backward agree
 * on the GPU itself (the forward pattern of the chain is computed on the GPU too). */
Test(backward_cuda, fused_attention_backward_equals_three_steps) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < N_ATTN; si++) {
            const lp_dtype dt = DTYPES[di];
            const attn_shape s = ATTN_SHAPES[si];
            if (s.T > 100) continue; /* [B,H,T,T] buffers: keep them small */
            const uint64_t seed = 1000 + si;
            attn_in a = attn_inputs(dt, s, seed);
            const size_t rows = (size_t)s.B * s.H * s.T;
            gpu g;
            gpu_init(&g, dt);
            void *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv);
            void *d_v = gpu_put_act(&g, a.v, a.nkv), *d_dz = gpu_put_act(&g, a.dz, a.nq);
            void *d_dq = gpu_alloc(&g, act_bytes(&g, a.nq)), *d_dk = gpu_alloc(&g, act_bytes(&g, a.nkv));
            void *d_dv = gpu_alloc(&g, act_bytes(&g, a.nkv));
            void *d_dq3 = gpu_alloc(&g, act_bytes(&g, a.nq)), *d_dk3 = gpu_alloc(&g, act_bytes(&g, a.nkv));
            void *d_dv3 = gpu_alloc(&g, act_bytes(&g, a.nkv));
            void *d_s = gpu_alloc(&g, act_bytes(&g, a.ns)), *d_p = gpu_alloc(&g, act_bytes(&g, a.ns));
            void *d_dp = gpu_alloc(&g, act_bytes(&g, a.ns)), *d_ds = gpu_alloc(&g, act_bytes(&g, a.ns));
            OK(lp_attention_backward(&g.c, d_dq, d_dk, d_dv, d_dz, d_q, d_k, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
            OK(lp_attn_scores(&g.c, d_s, d_q, d_k, s.B, s.T, s.H, s.Hkv, s.dh));
            OK(lp_softmax_rows(&g.c, d_p, d_s, rows, s.T));
            OK(lp_attn_apply_backward(&g.c, d_dp, d_dv3, d_dz, d_p, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
            OK(lp_softmax_rows_backward(&g.c, d_ds, d_dp, d_p, rows, s.T));
            OK(lp_attn_scores_backward(&g.c, d_dq3, d_dk3, d_ds, d_q, d_k, s.B, s.T, s.H, s.Hkv, s.dh));
            char label[96], l2[128];
            attn_label(label, sizeof label, s);
            void *fused[3] = {d_dq, d_dk, d_dv}, *steps[3] = {d_dq3, d_dk3, d_dv3};
            const size_t counts[3] = {a.nq, a.nkv, a.nkv};
            const char *names[3] = {"dq", "dk", "dv"};
            for (int o = 0; o < 3; o++) {
                float *f = gpu_get_act(&g, fused[o], counts[o]), *st = gpu_get_act(&g, steps[o], counts[o]);
                snprintf(l2, sizeof l2, "%s %s", label, names[o]);
                expect_close(OP_FUSED_VS_STEPS, dt, l2, seed, st, f, counts[o]);
                free(f), free(st);
            }
            gpu_done(&g, label);
            attn_free(&a);
        }
}

/* ---- cross-entropy ---- */

Test(backward_cuda, xent_backward) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][2] = {{1, 1}, {31, 31}, {33, 33}, {33, 1000}, {5, 50257}, {1000, 64}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
            const lp_dtype dt = DTYPES[di];
            const int N = shapes[si][0], V = shapes[si][1];
            const size_t n = (size_t)N * V;
            const uint64_t seed = 1100 + si;
            float *logits = rand_act(dt, n, seed, -10, 10), *scale = lp_test_rand(N, seed + 1, 0.5f, 2);
            int32_t *tgt = malloc(N * sizeof(int32_t));
            uint64_t s = seed + 5;
            for (int r = 0; r < N; r++) {
                uint64_t x = lp_test_next(&s);
                tgt[r] = (N > 1 && x % 5 == 0) ? -1 : (int32_t)((x >> 8) % V); /* -1: no loss */
            }
            float *ref = zeros(n);
            OK(lp_xent_backward(cpu(), ref, logits, tgt, scale, N, V));

            gpu g;
            gpu_init(&g, dt);
            void *d_l = gpu_put_act(&g, logits, n);
            int32_t *d_t = gpu_put(&g, tgt, N * sizeof(int32_t));
            float *d_s = gpu_put(&g, scale, N * sizeof(float));
            void *d_dl = gpu_alloc(&g, act_bytes(&g, n));
            OK(lp_xent_backward(&g.c, d_dl, d_l, d_t, d_s, N, V));
            float *got = gpu_get_act(&g, d_dl, n);
            char label[64];
            snprintf(label, sizeof label, "N=%d V=%d", N, V);
            expect_close(OP_XENT, dt, label, seed, got, ref, n);
            size_t nonzero = 0; /* rows without a target are exactly zero */
            for (int r = 0; r < N; r++)
                if (tgt[r] < 0)
                    for (int j = 0; j < V; j++) nonzero += got[(size_t)r * V + j] != 0.0f;
            cr_expect(nonzero == 0, "xent %s %s: %zu non-zeros in rows without a target", lp_dtype_name(dt), label,
                      nonzero);
            gpu_done(&g, label);
            free(logits), free(scale), free(tgt), free(ref), free(got);
        }
}

Test(backward_cuda, xent_out_of_range_target_gives_nan) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++) {
        gpu g;
        gpu_init(&g, DTYPES[di]);
        float lg[3] = {1, 2, 3}, sc[1] = {1};
        int32_t tg[1] = {3};
        void *d_l = gpu_put_act(&g, lg, 3), *d_dl = gpu_alloc(&g, act_bytes(&g, 3));
        int32_t *d_t = gpu_put(&g, tg, sizeof tg);
        float *d_s = gpu_put(&g, sc, sizeof sc);
        OK(lp_xent_backward(&g.c, d_dl, d_l, d_t, d_s, 1, 3));
        float *got = gpu_get_act(&g, d_dl, 3);
        for (int j = 0; j < 3; j++) cr_expect(isnan(got[j]), "%s entry %d is %g", lp_dtype_name(g.dt), j, got[j]);
        gpu_done(&g, "xent target out of range");
        free(got);
    }
}

Test(backward_cuda, attention_backward_rejects_head_dim_over_256) {
    LP_TEST_REQUIRE_GPU();
    gpu g;
    gpu_init(&g, LP_F32);
    const int B = 1, T = 2, H = 1, dh = 257;
    const size_t n = (size_t)B * T * H * dh;
    void *a = gpu_alloc(&g, act_bytes(&g, n)), *b = gpu_alloc(&g, act_bytes(&g, n));
    void *c = gpu_alloc(&g, act_bytes(&g, n)), *d = gpu_alloc(&g, act_bytes(&g, n));
    lp_status st = lp_attention_backward(&g.c, a, b, c, d, d, d, d, B, T, H, H, dh);
    cr_expect_eq(st, LP_ERR_ARG, "dh = 257 gave %s (%s)", lp_status_name(st), lp_last_error());
    gpu_done(&g, "dh 257");
}
