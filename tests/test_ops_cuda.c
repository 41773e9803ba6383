/* test_ops_cuda.c: every op of include/loupe/ops.h on the GPU against the CPU reference,
 * through the public dispatch API, in both GPU activation dtypes (F32 and BF16).
 *
 * Each case draws seeded random inputs over awkward shapes (1, 31, 33 and >= 1000 in the
 * dimension that matters), runs the op on an LP_CUDA context and on an LP_CPU context,
 * and compares the results by normalized squared error against the budget in BUDGET
 * (ops_cuda_budget.h). The attention ops are in test_ops_attention_cuda.c. Every device buffer sits between guard bytes, checked after the op, so a kernel
 * that writes out of bounds fails even when its in-bounds values are right.
 *
 * bf16 cases round the host inputs to bf16 first and feed those same values to the CPU,
 * so the only difference left is what the kernel rounds (outputs, and intermediates
 * where an op has them). Without a GPU every test skips, saying why
 * (LOUPE_REQUIRE_GPU=1 turns the skip into a failure). */
#include "loupe/ops.h"
#include "gputest.h"
#include "ops/ops_internal.h"
#include "ops_cuda_budget.h"
#include "core/rng.h"

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
    if (cuda_device_count(why, sizeof why) < 2) cr_skip_test("needs two CUDA devices");
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
    OK(cuda_ctx_init(&b)); /* device 1 is now the thread's current device */
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
 * cuda_init_weights gives the host's base + rng_init_weight values bit for bit (after
 * the rounding to bf16 the host's upload does), and rng_init_weight_skip the state the
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
            for (size_t j = 0; j < n; j++) ref[j] = base + rng_init_weight(&s);
            cr_expect_eq(rng_init_weight_skip(s0, n), s, "state after %zu values", n);
            round_act(dt, ref, n);
            gpu g;
            gpu_init(&g, dt);
            void *d = gpu_alloc(&g, act_bytes(&g, n));
            OK(cuda_init_weights(&g.c, d, n, s0, base));
            float *got = gpu_get_act(&g, d, n);
            size_t bad = 0;
            for (size_t j = 0; j < n; j++) bad += memcmp(&got[j], &ref[j], 4) != 0;
            cr_expect_eq(bad, 0, "init_weights %s n=%zu: %zu values differ from the host's", lp_dtype_name(dt), n, bad);
            gpu_done(&g, "init_weights");
            free(ref), free(got);
        }
}
