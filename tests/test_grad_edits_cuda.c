/* test_grad_edits_cuda.c: gradients through an edited forward on the GPU against the CPU,
 * on the gpt2-tiny and llama-tiny fixtures (test_grad_edits.c checks the CPU's against
 * central differences). With a zero-ablated head, a frozen (patched) and a shifted norm
 * scale and a steering vector registered, the CUDA backward (F32) gives the CPU's gradients
 * at hooks at and upstream of the edits (nmse 1e-9, the budget of the F32 forward's hooks
 * in test_gpt2_cuda.c), and exact zeros where the zero-ablation replaced the value.
 * Without a GPU every test skips, saying why (LOUPE_REQUIRE_GPU=1 turns the skip into a
 * failure); the emulated build runs it on the CPU emulator. */
#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "testutil.h"

enum { B = 2, T = 9 };

static lp_model *load(const char *dir) {
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, dir, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    return m;
}

static void tokens(int32_t *t, int n, int V, uint64_t seed) {
    for (int i = 0; i < n; i++) t[i] = (int32_t)(lp_test_next(&seed) % (uint64_t)V);
}

typedef struct uedit {
    const char *hook;
    lp_edit_spec spec;
} uedit;

static void register_edits(lp_model *m, const uedit *ed, int ne) {
    lp_hooks_clear(m);
    for (int i = 0; i < ne; i++) cr_assert_eq(lp_hook_edit(m, ed[i].hook, &ed[i].spec), LP_OK, "%s", lp_last_error());
}

/* A hook's activation in a run of tok (no edits), F32 copy of n floats. */
static float *capture_of(lp_model *m, const int32_t *tok, const lp_metric *mt, const char *hook, size_t *n) {
    lp_hooks_clear(m);
    cr_assert_eq(lp_hook_capture(m, hook, NULL, 0, NULL), LP_OK, "%s", lp_last_error());
    double met[B];
    cr_assert_eq(lp_model_metric(m, tok, B, T, mt, met), LP_OK, "%s", lp_last_error());
    lp_tensor a;
    cr_assert_eq(lp_capture_get(m, hook, &a), LP_OK);
    *n = (size_t)lp_shape_numel(a.shape, a.ndim);
    float *v = malloc(*n * sizeof(float));
    memcpy(v, a.data, *n * sizeof(float));
    lp_hooks_clear(m);
    return v;
}

/* max |g| over [B, T, H, E] inside (or outside) the given positions and heads */
static double max_where(const float *g, int H, size_t E, const int *pos, int npos, const int *heads, int nheads, int inside) {
    double mx = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++) {
                int in_p = !pos, in_h = !heads;
                for (int i = 0; pos && i < npos; i++) in_p |= pos[i] == t;
                for (int i = 0; heads && i < nheads; i++) in_h |= heads[i] == h;
                if ((in_p && in_h) != inside) continue;
                for (size_t e = 0; e < E; e++) mx = fmax(mx, fabs(g[(((size_t)b * T + t) * H + h) * E + e]));
            }
    return mx;
}

static lp_metric logit_diff(int32_t *ans, int32_t *wr, int V) {
    tokens(ans, B, V, 12);
    tokens(wr, B, V, 13);
    return (lp_metric){.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wr};
}

static void cuda_vs_cpu(const char *dir, int llama) {
    LP_TEST_REQUIRE_GPU();
    lp_model *mc = load(dir), *mg;
    cr_assert_eq(lp_model_load(&mg, dir, LP_CUDA, LP_F32), LP_OK, "%s", lp_last_error());
    const lp_config *c = lp_model_config(mc);
    int32_t tok[B * T], other[B * T], ans[B], wr[B];
    tokens(tok, B * T, c->d_vocab, 11);
    tokens(other, B * T, c->d_vocab, 17);
    lp_metric mt = logit_diff(ans, wr, c->d_vocab);
    size_t ns;
    float *frozen = capture_of(mc, other, &mt, "blocks.0.ln2.hook_scale", &ns), shift = 0.5f;
    float *steer = lp_test_rand(c->d_model, 5, -1, 1);
    int pos[] = {2, 5}, heads[] = {1};
    uedit ed[] = {{"blocks.0.attn.hook_z", {.kind = LP_EDIT_ZERO, .pos = pos, .npos = 2, .heads = heads, .nheads = 1}},
                  {"blocks.0.ln2.hook_scale", {.kind = LP_EDIT_PATCH, .src = frozen, .src_len = ns, .pos = pos, .npos = 2}},
                  {"blocks.1.ln1.hook_scale", {.kind = LP_EDIT_ADD, .src = &shift, .src_len = 1, .coef = 1.0f}},
                  {"blocks.0.hook_resid_post", {.kind = LP_EDIT_ADD, .src = steer, .src_len = c->d_model, .coef = 2.0f}}};
    const char *hooks[] = {"blocks.0.attn.hook_q", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre",
                           llama ? "blocks.0.attn.hook_rot_k" : "hook_pos_embed"};
    const char *list = llama ? "blocks.0.attn.hook_q,blocks.0.hook_resid_mid,blocks.1.hook_resid_pre,blocks.0.hook_resid_pre,blocks.0.attn.hook_rot_k"
                             : "blocks.0.attn.hook_q,blocks.0.hook_resid_mid,blocks.1.hook_resid_pre,blocks.0.hook_resid_pre,hook_pos_embed";
    double met_c[B], met_g[B];
    register_edits(mc, ed, 4);
    register_edits(mg, ed, 4);
    cr_assert_eq(lp_model_grad(mc, tok, B, T, &mt, list, met_c), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_grad(mg, tok, B, T, &mt, list, met_g), LP_OK, "%s", lp_last_error());
    for (int h = 0; h < 5; h++) {
        lp_tensor a, b;
        cr_assert_eq(lp_grad_get(mc, hooks[h], &a), LP_OK, "%s", lp_last_error());
        cr_assert_eq(lp_grad_get(mg, hooks[h], &b), LP_OK, "%s", lp_last_error());
        size_t n = (size_t)lp_shape_numel(a.shape, a.ndim);
        lp_cmp cmp = lp_compare_f(b.data, a.data, n);
        LP_EXPECT_WITHIN(hooks[h], 0, cmp, nmse, 1e-9);
    }
    lp_tensor q;
    cr_assert_eq(lp_grad_get(mg, "blocks.0.attn.hook_q", &q), LP_OK);
    cr_expect_eq(max_where(q.data, c->n_heads, c->d_head, pos, 2, heads, 1, 1), 0.0, "the CUDA gradient passed a zero-ablation");
    free(frozen), free(steer);
    lp_model_free(mc), lp_model_free(mg);
}

Test(grad_edits_cuda, cuda_matches_cpu_gpt2) { cuda_vs_cpu(LP_FIXTURES "/gpt2-tiny", 0); }
Test(grad_edits_cuda, cuda_matches_cpu_llama) { cuda_vs_cpu(LP_FIXTURES "/llama-tiny", 1); }
