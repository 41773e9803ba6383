/* test_gpt2_cuda.c: the CUDA forward against the Hugging Face float64 reference, in
 * fp32 and bf16, every hook captured (through the device staging and the copy stream),
 * and the built-in edits on the GPU. Skips with the reason when no GPU is usable;
 * LOUPE_REQUIRE_GPU=1 turns the skip into a failure.
 *
 * Budgets per dtype:
 *   f32:  logits max_rel 1e-4 (the bound, as on the CPU); hooks nmse 1e-9.
 *   bf16: weights and every activation are stored in bf16 (unit roundoff 2^-9 = 2e-3).
 *         One rounding gives nmse ~ 1.3e-6; about twenty roundings in sequence through two
 *         layers, with attention and LayerNorm amplifying, stay under nmse 1e-3 per hook.
 *         Logits: each is a 64-long dot product of bf16 values with magnitude up to ~17,
 *         so the max error relative to the largest logit is bounded by 5e-2. */
#include "loupe/hooks.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#define MODEL LP_FIXTURES "/gpt2-tiny"
#define REF LP_FIXTURES "/gpt2-tiny/reference.safetensors"

static const struct { lp_dtype dt; double logits_max_rel, hook_nmse; } BUDGET[] = {
    {LP_F32, 1e-4, 1e-9},
    {LP_BF16, 5e-2, 1e-3},
};

static lp_st_file ref;
static void open_ref(void) { cr_assert_eq(lp_st_open(&ref, REF), LP_OK, "%s", lp_last_error()); }
static void close_ref(void) { lp_st_close(&ref); }
TestSuite(gpt2_cuda, .init = open_ref, .fini = close_ref);

static const lp_st_tensor *R(const char *name) {
    const lp_st_tensor *t = lp_st_find(&ref, name);
    cr_assert(t != NULL, "reference tensor %s missing", name);
    return t;
}

static lp_model *load_gpu(lp_dtype dt) {
    lp_model *m;
    lp_status st = lp_model_load(&m, MODEL, LP_CUDA, dt);
    cr_assert_eq(st, LP_OK, "%s", lp_last_error());
    return m;
}

static void forward(lp_model *m, int want) {
    const lp_st_tensor *t = R("tokens");
    cr_assert_eq(lp_model_forward(m, t->data, 2, 16, want), LP_OK, "%s", lp_last_error());
}

static void parity(int bi) {
    LP_TEST_REQUIRE_GPU();
    lp_model *m = load_gpu(BUDGET[bi].dt);
    cr_assert_eq(lp_hook_capture(m, "*", NULL, 0, NULL), LP_OK);
    forward(m, LP_WANT_LOGITS | LP_WANT_LOSS);
    lp_cmp c = lp_compare_f(lp_model_logits(m), R("logits")->data, 2 * 16 * 997);
    LP_EXPECT_WITHIN("logits", 0, c, max_rel, BUDGET[bi].logits_max_rel);
    for (int id = 0; id < lp_hook_count(m); id++) {
        const char *name = lp_hook_name(m, id), *key = lp_test_hf_key(name);
        if (!key) continue;
        const lp_st_tensor *r = R(key);
        size_t n = r->nbytes / 4;
        float *got = malloc(n * sizeof(float));
        cr_assert_eq(lp_capture_read_f32(m, name, got, n), LP_OK, "%s", lp_last_error());
        c = lp_compare_f(got, r->data, n);
        LP_EXPECT_WITHIN(name, 0, c, nmse, BUDGET[bi].hook_nmse);
        free(got);
    }
    lp_model_free(m);
}

Test(gpt2_cuda, parity_f32) { parity(0); }
Test(gpt2_cuda, parity_bf16) { parity(1); }

static void edits(int bi) {
    LP_TEST_REQUIRE_GPU();
    lp_model *m = load_gpu(BUDGET[bi].dt);
    lp_edit_spec z = {.kind = LP_EDIT_ZERO, .heads = (int[]){1}, .nheads = 1};
    cr_assert_eq(lp_hook_edit(m, "blocks.0.attn.hook_z", &z), LP_OK);
    forward(m, LP_WANT_LOGITS);
    lp_cmp c = lp_compare_f(lp_model_logits(m), R("edit.zero_z_L0_H1.logits")->data, 2 * 16 * 997);
    LP_EXPECT_WITHIN("zero head", 0, c, max_rel, BUDGET[bi].logits_max_rel);
    lp_hooks_clear(m);
    lp_edit_spec s = {.kind = LP_EDIT_ADD, .src = R("edit.steer_resid_post_L0.vector")->data, .src_len = 64, .coef = 2.0f};
    cr_assert_eq(lp_hook_edit(m, "blocks.0.hook_resid_post", &s), LP_OK);
    forward(m, LP_WANT_LOGITS);
    c = lp_compare_f(lp_model_logits(m), R("edit.steer_resid_post_L0.logits")->data, 2 * 16 * 997);
    LP_EXPECT_WITHIN("steer", 0, c, max_rel, BUDGET[bi].logits_max_rel);
    lp_hooks_clear(m);
    lp_edit_spec p = {.kind = LP_EDIT_PATCH, .src = R("edit.patch.source")->data, .src_len = 2 * 16 * 64,
                      .pos = (int[]){2, 3, 4, 5, 6, 7}, .npos = 6};
    cr_assert_eq(lp_hook_edit(m, "blocks.1.hook_resid_pre", &p), LP_OK);
    cr_assert_eq(lp_hook_capture(m, "blocks.1.attn.hook_pattern", (int[]){15, 3}, 2, NULL), LP_OK);
    forward(m, LP_WANT_LOGITS);
    c = lp_compare_f(lp_model_logits(m), R("edit.patch_resid_pre_L1.logits")->data, 2 * 16 * 997);
    LP_EXPECT_WITHIN("patch", 0, c, max_rel, BUDGET[bi].logits_max_rel);
    lp_model_free(m);
}

Test(gpt2_cuda, edits_f32) { edits(0); }
Test(gpt2_cuda, edits_bf16) { edits(1); }
