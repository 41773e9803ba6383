/* test_ops_gemma_cuda.c: the Gemma-family ops of include/loupe/ops.h on the GPU against their
 * CPU twins (themselves checked against float64 and finite differences by test_ops_gemma.c and
 * test_backward_gemma.c), in F32 and BF16, by the rules and budgets of ops_cuda_budget.h:
 * attention with the options of lp_attn_cfg (scale, soft-cap, sliding window) fused, in three
 * steps and against a KV cache, forward and backward; GeGLU, the soft-cap and the scale with
 * their backward ops. Windows start inside and across the kernels' 32-key (and 32-query)
 * chunks, and T runs past several chunks. Without a GPU every test skips, saying why
 * (LOUPE_REQUIRE_GPU=1 turns the skip into a failure). */
#include "loupe/ops.h"
#include "gputest.h"
#include "ops_cuda_budget.h"

/* ---- attention with options ---- */

typedef struct attn_shape { int B, T, H, Hkv, dh; } attn_shape;
static const attn_shape SHAPES[] = {
    {1, 1, 1, 1, 1},            /* one token; dh = 1 (the backward's scratch stats) */
    {2, 70, 4, 2, 33},          /* GQA, odd dh, three 32-key chunks */
    {1, 40, 2, 1, 100},         /* multi-query, dh not a power of two */
    {1, LONG_T(300), 4, 2, 64}, /* long: windows end deep in the row */
};
/* {scale, softcap, window}: Gemma 3 style (custom scale, window); Gemma 2 style with a cap
 * that bends the scores; a cap with a window wider than a chunk (40 keys span two or three);
 * the diagonal alone; a window of exactly one chunk plus one; the defaults, spelled out. */
static const lp_attn_cfg CFGS[] = {
    {0.3f, 0, 5}, {0.25f, 1.5f, 7}, {0, 2.0f, 40}, {0.5f, 0, 1}, {0.2f, 0, 33}, {0, 0, 0},
};
#define N_SHAPES (sizeof SHAPES / sizeof *SHAPES)
#define N_CFGS (sizeof CFGS / sizeof *CFGS)

typedef struct attn_in { float *q, *k, *v, *dz; size_t nq, nkv, ns; } attn_in;

/* q in [-3, 3], k in [-1, 1]: softmax rows neither flat nor one-hot */
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

static void label_of(char *buf, size_t n, attn_shape s, lp_attn_cfg g) {
    snprintf(buf, n, "B=%d T=%d H=%d Hkv=%d dh=%d scale=%g cap=%g win=%d", s.B, s.T, s.H, s.Hkv, s.dh,
             (double)g.scale, (double)g.softcap, g.window);
}
static int seen(lp_attn_cfg g, int t, int j) { return j <= t && (g.window == 0 || t - j < g.window); }

/* Fused and three-step forward, GPU against CPU and against each other; the GPU's scores must
 * be exactly -inf where masked and finite elsewhere, its pattern exactly 0 where masked. */
static void check_forward(lp_dtype dt, attn_shape s, lp_attn_cfg cf, uint64_t seed) {
    attn_in a = attn_inputs(dt, s, seed);
    const size_t rows = (size_t)s.B * s.H * s.T;
    float *rz = zeros(a.nq), *rs = zeros(a.ns);
    OK(lp_attention_cfg(cpu(), rz, a.q, a.k, a.v, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
    OK(lp_attn_scores_cfg(cpu(), rs, a.q, a.k, s.B, s.T, s.H, s.Hkv, s.dh, &cf));

    gpu g;
    gpu_init(&g, dt);
    void *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv), *d_v = gpu_put_act(&g, a.v, a.nkv);
    void *d_z = gpu_alloc(&g, act_bytes(&g, a.nq)), *d_z3 = gpu_alloc(&g, act_bytes(&g, a.nq));
    void *d_s = gpu_alloc(&g, act_bytes(&g, a.ns)), *d_p = gpu_alloc(&g, act_bytes(&g, a.ns));
    OK(lp_attention_cfg(&g.c, d_z, d_q, d_k, d_v, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
    OK(lp_attn_scores_cfg(&g.c, d_s, d_q, d_k, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
    OK(lp_softmax_rows(&g.c, d_p, d_s, rows, s.T));
    OK(lp_attn_apply(&g.c, d_z3, d_p, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
    float *z = gpu_get_act(&g, d_z, a.nq), *z3 = gpu_get_act(&g, d_z3, a.nq);
    float *sc = gpu_get_act(&g, d_s, a.ns), *pat = gpu_get_act(&g, d_p, a.ns);
    char label[128];
    label_of(label, sizeof label, s, cf);
    expect_close(OP_ATTN_CFG, dt, label, seed, z, rz, a.nq);
    expect_close(OP_ATTN_SCORES_CFG, dt, label, seed, sc, rs, a.ns);
    expect_close(OP_FUSED_VS_STEPS_CFG, dt, label, seed, z3, z, a.nq);
    size_t wrong = 0;
    for (int b = 0; b < s.B; b++)
        for (int h = 0; h < s.H; h++)
            for (int t = 0; t < s.T; t++)
                for (int j = 0; j < s.T; j++) {
                    const size_t i = (((size_t)b * s.H + h) * s.T + t) * s.T + j;
                    wrong += seen(cf, t, j) ? !isfinite(sc[i]) : !(isinf(sc[i]) && sc[i] < 0) || pat[i] != 0.0f;
                }
    cr_expect(wrong == 0, "%s %s: %zu entries wrongly masked", label, lp_dtype_name(dt), wrong);
    gpu_done(&g, label);
    free(rz), free(rs), free(z), free(z3), free(sc), free(pat);
    attn_free(&a);
}

Test(gemma_cuda, attention_options_forward) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < N_SHAPES; si++)
            for (size_t ci = 0; ci < N_CFGS; ci++) check_forward(DTYPES[di], SHAPES[si], CFGS[ci], 9000 + si * 16 + ci);
}

/* The cached kernel with options: over the whole prompt against the CPU and against the fused
 * kernel; decoding token by token from a larger cache (NaN past the filled part) reproduces
 * the one pass bit for bit. */
static void check_cached(lp_dtype dt, attn_shape s, lp_attn_cfg cf, uint64_t seed) {
    attn_in a = attn_inputs(dt, s, seed);
    const int Tcap = s.T + 9;
    const size_t qrow = (size_t)s.H * s.dh, krow = (size_t)s.Hkv * s.dh, nc = (size_t)s.B * Tcap * krow;
    float *ref = zeros(a.nq);
    OK(lp_attention_cached_cfg(cpu(), ref, a.q, a.k, a.v, s.B, s.T, s.T, 0, s.H, s.Hkv, s.dh, &cf));
    float *kc = zeros(nc), *vc = zeros(nc);
    for (size_t j = 0; j < nc; j++) kc[j] = vc[j] = NAN;
    for (int b = 0; b < s.B; b++) {
        memcpy(kc + (size_t)b * Tcap * krow, a.k + (size_t)b * s.T * krow, s.T * krow * 4);
        memcpy(vc + (size_t)b * Tcap * krow, a.v + (size_t)b * s.T * krow, s.T * krow * 4);
    }
    gpu g;
    gpu_init(&g, dt);
    void *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv), *d_v = gpu_put_act(&g, a.v, a.nkv);
    void *d_zf = gpu_alloc(&g, act_bytes(&g, a.nq)), *d_zc = gpu_alloc(&g, act_bytes(&g, a.nq));
    void *d_kc = gpu_put_act(&g, kc, nc), *d_vc = gpu_put_act(&g, vc, nc);
    void *d_q1 = gpu_alloc(&g, act_bytes(&g, (size_t)s.B * qrow));
    void *d_z1 = gpu_alloc(&g, act_bytes(&g, (size_t)s.B * qrow));
    OK(lp_attention_cfg(&g.c, d_zf, d_q, d_k, d_v, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
    OK(lp_attention_cached_cfg(&g.c, d_zc, d_q, d_k, d_v, s.B, s.T, s.T, 0, s.H, s.Hkv, s.dh, &cf));
    float *fused = gpu_get_act(&g, d_zf, a.nq), *full = gpu_get_act(&g, d_zc, a.nq);
    char label[128];
    label_of(label, sizeof label, s, cf);
    expect_close(OP_ATTN_CACHED_CFG, dt, label, seed, full, ref, a.nq);
    expect_close(OP_CACHED_VS_FUSED_CFG, dt, label, seed, full, fused, a.nq);
    float *q1 = zeros((size_t)s.B * qrow), *dec = zeros(a.nq);
    void *h = malloc(act_bytes(&g, (size_t)s.B * qrow));
    for (int p = 0; p < s.T; p++) {
        for (int b = 0; b < s.B; b++) memcpy(q1 + b * qrow, a.q + ((size_t)b * s.T + p) * qrow, qrow * 4);
        OK(lp_convert_host(h, dt, q1, LP_F32, (size_t)s.B * qrow));
        OK(lp_ctx_to_device(&g.c, d_q1, h, act_bytes(&g, (size_t)s.B * qrow)));
        OK(lp_attention_cached_cfg(&g.c, d_z1, d_q1, d_kc, d_vc, s.B, 1, Tcap, p, s.H, s.Hkv, s.dh, &cf));
        float *z1 = gpu_get_act(&g, d_z1, (size_t)s.B * qrow);
        for (int b = 0; b < s.B; b++) memcpy(dec + ((size_t)b * s.T + p) * qrow, z1 + b * qrow, qrow * 4);
        free(z1);
    }
    expect_close(OP_CACHED_DECODE_CFG, dt, label, seed, dec, full, a.nq);
    gpu_done(&g, label);
    free(h), free(ref), free(kc), free(vc), free(fused), free(full), free(q1), free(dec);
    attn_free(&a);
}

Test(gemma_cuda, attention_cached_options) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < N_SHAPES; si++)
            for (size_t ci = 0; ci < N_CFGS; ci++) {
                if (SHAPES[si].T > 100 && ci % 2) continue; /* the long decode: half the options */
                check_cached(DTYPES[di], SHAPES[si], CFGS[ci], 9200 + si * 16 + ci);
            }
}

/* Fused backward, GPU against CPU, run twice over garbage outputs for the same bits, and
 * against the GPU's own three-step chain (whose scores backward reads the saved scores). */
static void check_backward(lp_dtype dt, attn_shape s, lp_attn_cfg cf, uint64_t seed) {
    attn_in a = attn_inputs(dt, s, seed);
    const size_t rows = (size_t)s.B * s.H * s.T;
    float *rq = zeros(a.nq), *rk = zeros(a.nkv), *rv = zeros(a.nkv);
    OK(lp_attention_backward_cfg(cpu(), rq, rk, rv, a.dz, a.q, a.k, a.v, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
    gpu g;
    gpu_init(&g, dt);
    void *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv), *d_v = gpu_put_act(&g, a.v, a.nkv);
    void *d_dz = gpu_put_act(&g, a.dz, a.nq);
    void *d_out[3] = {gpu_alloc(&g, act_bytes(&g, a.nq)), gpu_alloc(&g, act_bytes(&g, a.nkv)),
                      gpu_alloc(&g, act_bytes(&g, a.nkv))};
    void *d_out3[3] = {gpu_alloc(&g, act_bytes(&g, a.nq)), gpu_alloc(&g, act_bytes(&g, a.nkv)),
                       gpu_alloc(&g, act_bytes(&g, a.nkv))};
    const size_t counts[3] = {a.nq, a.nkv, a.nkv};
    const char *names[3] = {"dq", "dk", "dv"};
    const float *refs[3] = {rq, rk, rv};
    OK(lp_attention_backward_cfg(&g.c, d_out[0], d_out[1], d_out[2], d_dz, d_q, d_k, d_v, s.B, s.T, s.H, s.Hkv, s.dh,
                                 &cf));
    float *got[3];
    char label[128], l2[160];
    label_of(label, sizeof label, s, cf);
    for (int o = 0; o < 3; o++) {
        got[o] = gpu_get_act(&g, d_out[o], counts[o]);
        snprintf(l2, sizeof l2, "%s %s", label, names[o]);
        expect_close(OP_ATTN_BWD_CFG, dt, l2, seed, got[o], refs[o], counts[o]);
    }
    float *junk = lp_test_rand(a.nq, seed + 9, -1e30f, 1e30f);
    for (int o = 0; o < 3; o++) OK(lp_ctx_to_device(&g.c, d_out[o], junk, act_bytes(&g, counts[o])));
    OK(lp_attention_backward_cfg(&g.c, d_out[0], d_out[1], d_out[2], d_dz, d_q, d_k, d_v, s.B, s.T, s.H, s.Hkv, s.dh,
                                 &cf));
    for (int o = 0; o < 3; o++) {
        float *again = gpu_get_act(&g, d_out[o], counts[o]);
        snprintf(l2, sizeof l2, "%s %s", label, names[o]);
        expect_close(OP_ATTN_BWD_REPEAT_CFG, dt, l2, seed, again, got[o], counts[o]);
        free(again);
    }
    if (s.T <= 100) { /* the chain's [B,H,T,T] buffers: keep them small */
        void *d_s = gpu_alloc(&g, act_bytes(&g, a.ns)), *d_p = gpu_alloc(&g, act_bytes(&g, a.ns));
        void *d_dp = gpu_alloc(&g, act_bytes(&g, a.ns)), *d_ds = gpu_alloc(&g, act_bytes(&g, a.ns));
        OK(lp_attn_scores_cfg(&g.c, d_s, d_q, d_k, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
        OK(lp_softmax_rows(&g.c, d_p, d_s, rows, s.T));
        OK(lp_attn_apply_backward(&g.c, d_dp, d_out3[2], d_dz, d_p, d_v, s.B, s.T, s.H, s.Hkv, s.dh));
        OK(lp_softmax_rows_backward(&g.c, d_ds, d_dp, d_p, rows, s.T));
        OK(lp_attn_scores_backward_cfg(&g.c, d_out3[0], d_out3[1], d_ds, d_s, d_q, d_k, s.B, s.T, s.H, s.Hkv, s.dh,
                                       &cf));
        for (int o = 0; o < 3; o++) {
            float *st = gpu_get_act(&g, d_out3[o], counts[o]);
            snprintf(l2, sizeof l2, "%s %s", label, names[o]);
            expect_close(OP_BWD_VS_STEPS_CFG, dt, l2, seed, st, got[o], counts[o]);
            free(st);
        }
    }
    gpu_done(&g, label);
    for (int o = 0; o < 3; o++) free(got[o]);
    free(rq), free(rk), free(rv), free(junk);
    attn_free(&a);
}

Test(gemma_cuda, attention_options_backward) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < N_SHAPES; si++)
            for (size_t ci = 0; ci < N_CFGS; ci++)
                check_backward(DTYPES[di], SHAPES[si], CFGS[ci], 9400 + si * 16 + ci);
}

/* lp_attn_scores_backward_cfg alone, GPU against CPU on the same inputs: the saved scores
 * computed on the CPU and rounded as the hook would hold them, dscores poisoned (NaN) outside
 * the window, where nothing may read it. */
Test(gemma_cuda, attn_scores_backward_options) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < N_SHAPES; si++)
            for (size_t ci = 0; ci < N_CFGS; ci++) {
                const lp_dtype dt = DTYPES[di];
                const attn_shape s = SHAPES[si];
                const lp_attn_cfg cf = CFGS[ci];
                if (s.T > 100) continue;
                const uint64_t seed = 9600 + si * 16 + ci;
                attn_in a = attn_inputs(dt, s, seed);
                float *sc = zeros(a.ns), *ds = rand_act(dt, a.ns, seed + 5, -1, 1);
                OK(lp_attn_scores_cfg(cpu(), sc, a.q, a.k, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
                round_act(dt, sc, a.ns);
                for (int b = 0; b < s.B; b++)
                    for (int h = 0; h < s.H; h++)
                        for (int t = 0; t < s.T; t++)
                            for (int j = 0; j < s.T; j++)
                                if (!seen(cf, t, j)) ds[(((size_t)b * s.H + h) * s.T + t) * s.T + j] = NAN;
                float *rq = zeros(a.nq), *rk = zeros(a.nkv);
                OK(lp_attn_scores_backward_cfg(cpu(), rq, rk, ds, sc, a.q, a.k, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
                gpu g;
                gpu_init(&g, dt);
                void *d_q = gpu_put_act(&g, a.q, a.nq), *d_k = gpu_put_act(&g, a.k, a.nkv);
                void *d_s = gpu_put_act(&g, sc, a.ns), *d_ds = gpu_put_act(&g, ds, a.ns);
                void *d_dq = gpu_alloc(&g, act_bytes(&g, a.nq)), *d_dk = gpu_alloc(&g, act_bytes(&g, a.nkv));
                OK(lp_attn_scores_backward_cfg(&g.c, d_dq, d_dk, d_ds, d_s, d_q, d_k, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
                float *gq = gpu_get_act(&g, d_dq, a.nq), *gk = gpu_get_act(&g, d_dk, a.nkv);
                char label[128], l2[160];
                label_of(label, sizeof label, s, cf);
                snprintf(l2, sizeof l2, "%s dq", label);
                expect_close(OP_ATTN_SCORES_BWD_CFG, dt, l2, seed, gq, rq, a.nq);
                snprintf(l2, sizeof l2, "%s dk", label);
                expect_close(OP_ATTN_SCORES_BWD_CFG, dt, l2, seed, gk, rk, a.nkv);
                gpu_done(&g, label);
                free(sc), free(ds), free(rq), free(rk), free(gq), free(gk);
                attn_free(&a);
            }
}

/* ---- GeGLU, soft-cap, scale ---- */

static const size_t EW_SIZES[] = {1, 31, 33, 1000, 100003};

Test(gemma_cuda, gelu_mul_softcap_scale) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t i = 0; i < sizeof EW_SIZES / sizeof *EW_SIZES; i++) {
            const lp_dtype dt = DTYPES[di];
            const size_t n = EMU_CAP(EW_SIZES[i], 5003);
            const uint64_t seed = 9800 + i;
            const float cap = 30.0f, sc = 33.941125f;
            float *g0 = rand_act(dt, n, seed, -6, 6), *u = rand_act(dt, n, seed + 1, -2, 2);
            float *x = rand_act(dt, n, seed + 2, -100, 100);
            float *r_gm = zeros(n), *r_cap = zeros(n), *r_sc = zeros(n);
            OK(lp_gelu_mul(cpu(), r_gm, g0, u, n));
            OK(lp_softcap(cpu(), r_cap, x, cap, n));
            OK(lp_scale(cpu(), r_sc, x, sc, n));
            gpu g;
            gpu_init(&g, dt);
            void *d_g = gpu_put_act(&g, g0, n), *d_u = gpu_put_act(&g, u, n), *d_x = gpu_put_act(&g, x, n);
            void *d_o = gpu_alloc(&g, act_bytes(&g, n));
            char label[32];
            snprintf(label, sizeof label, "n=%zu", n);
            OK(lp_gelu_mul(&g.c, d_o, d_g, d_u, n));
            float *got = gpu_get_act(&g, d_o, n);
            expect_close(OP_GELU_MUL, dt, label, seed, got, r_gm, n);
            free(got);
            OK(lp_gelu_mul(&g.c, d_u, d_g, d_u, n)); /* in place over up */
            got = gpu_get_act(&g, d_u, n);
            expect_close(OP_GELU_MUL, dt, "in place", seed, got, r_gm, n);
            free(got);
            OK(lp_scale(&g.c, d_o, d_x, sc, n));
            got = gpu_get_act(&g, d_o, n);
            expect_close(OP_SCALE, dt, label, seed, got, r_sc, n);
            free(got);
            OK(lp_softcap(&g.c, d_x, d_x, cap, n)); /* in place */
            got = gpu_get_act(&g, d_x, n);
            expect_close(OP_SOFTCAP, dt, label, seed, got, r_cap, n);
            free(got);
            gpu_done(&g, label);
            free(g0), free(u), free(x), free(r_gm), free(r_cap), free(r_sc);
        }
}

Test(gemma_cuda, gelu_mul_and_softcap_backward) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t i = 0; i < sizeof EW_SIZES / sizeof *EW_SIZES; i++) {
            const lp_dtype dt = DTYPES[di];
            const size_t n = EMU_CAP(EW_SIZES[i], 5003);
            const uint64_t seed = 9900 + i;
            const float cap = 30.0f;
            float *g0 = rand_act(dt, n, seed, -6, 6), *u = rand_act(dt, n, seed + 1, -2, 2);
            float *dy = rand_act(dt, n, seed + 2, -1, 1), *x = lp_test_rand(n, seed + 3, -90, 90), *y = zeros(n);
            OK(lp_softcap(cpu(), y, x, cap, n));
            round_act(dt, y, n); /* the saved output both sides read */
            float *r_dg = zeros(n), *r_du = zeros(n), *r_dx = zeros(n);
            OK(lp_gelu_mul_backward(cpu(), r_dg, r_du, dy, g0, u, n));
            OK(lp_softcap_backward(cpu(), r_dx, dy, y, cap, n));
            gpu g;
            gpu_init(&g, dt);
            void *d_g = gpu_put_act(&g, g0, n), *d_u = gpu_put_act(&g, u, n), *d_dy = gpu_put_act(&g, dy, n);
            void *d_y = gpu_put_act(&g, y, n);
            void *d_dg = gpu_alloc(&g, act_bytes(&g, n)), *d_du = gpu_alloc(&g, act_bytes(&g, n));
            char label[32];
            snprintf(label, sizeof label, "n=%zu", n);
            OK(lp_gelu_mul_backward(&g.c, d_dg, d_du, d_dy, d_g, d_u, n));
            float *gg = gpu_get_act(&g, d_dg, n), *gu = gpu_get_act(&g, d_du, n);
            expect_close(OP_GELU_MUL_BWD, dt, "dgate", seed, gg, r_dg, n);
            expect_close(OP_GELU_MUL_BWD, dt, "dup", seed, gu, r_du, n);
            OK(lp_softcap_backward(&g.c, d_dy, d_dy, d_y, cap, n)); /* in place over dy */
            float *gx = gpu_get_act(&g, d_dy, n);
            expect_close(OP_SOFTCAP_BWD, dt, label, seed, gx, r_dx, n);
            gpu_done(&g, label);
            free(g0), free(u), free(dy), free(x), free(y), free(r_dg), free(r_du), free(r_dx);
            free(gg), free(gu), free(gx);
        }
}
