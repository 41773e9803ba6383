/* test_llama_cuda.c: the Llama-family CUDA forward against the Hugging Face float64
 * references of test_llama.c: the tiny fixtures in fp32 (every hook, an edit, greedy
 * generation), SmolLM2-135M-Instruct (GGUF Q4_1) in fp32 and in bf16. Skips with the reason
 * when no GPU is usable; LOUPE_REQUIRE_GPU=1 turns the skip into a failure.
 *
 * Metrics as in test_llama.c: max_rel = max|a - ref| / max|ref| over the compared tensor,
 * nmse = sum (a - ref)^2 / sum ref^2.
 *
 * Budgets:
 *   f32 (tiny and SmolLM2): those of the CPU test (tiny: logits max_rel 1e-4, hooks nmse 1e-9;
 *     SmolLM2: logits max_rel 1e-3, hooks nmse 1e-8, top-1 where the float64 margin is >= 1e-2,
 *     greedy identical); the GPU computes in fp32 too, only the summation order differs.
 *   bf16 (SmolLM2): weights and activations are stored in bf16 (8 significant bits, unit
 *     roundoff 2^-9 = 2e-3), accumulation in fp32. One rounding gives nmse ~1e-6; the residual
 *     stream is re-rounded in each of 30 blocks, with RMSNorm and attention amplifying. HF's
 *     own bf16 run of this model, against the same float64 reference (prompts.json
 *     "calibration" and the README): hooks nmse up to 7.9e-3 (blocks.10.mlp.hook_post; the
 *     residual stream 2e-5 at block 0, 1.8e-3 at block 29), logits max_rel up to 4.3e-2
 *     (|error| 1.2 with max|logit| 28), top-1 minus top-2 margins off by up to 0.62. So:
 *       hooks nmse <= 2e-2 and logits max_rel <= 1e-1 (about 2.5x HF's bf16 figures: another
 *         bf16 implementation rounds at other places);
 *       top-1 agrees at every recorded position whose float64 margin exceeds 1.0 (above the
 *         0.62 worst margin error, with room);
 *       greedy: the tokens agree for the steps before the first step whose float64 margin is
 *         below 1.0 (from there a flip is legitimate and every later token continues another
 *         text); with this fixture that is 2 steps of prompt 1 and 18 of prompt 3. */
#include "loupe/hooks.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#include <unistd.h>

#define SMOLLM2_GGUF "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define SMOLLM2_REF LP_FIXTURES "/smollm2/reference.safetensors"

static const double TINY_LOGITS_MAX_REL = 1e-4;
static const double TINY_HOOK_NMSE = 1e-9;

static const struct { lp_dtype dt; const char *name; double logits_max_rel, hook_nmse, margin; } SMOL[] = {
    {LP_F32, "f32", 1e-3, 1e-8, 1e-2},
    {LP_BF16, "bf16", 1e-1, 2e-2, 1.0},
};
/* bf16: the two greedy prompts together must leave at least this many checked steps */
static const int BF16_MIN_GREEDY_STEPS = 10;

static const lp_st_tensor *R(const lp_st_file *ref, const char *name) {
    const lp_st_tensor *t = lp_st_find(ref, name);
    cr_assert(t != NULL, "reference tensor %s missing from %s", name, ref->path);
    return t;
}

static int is_meta_key(const char *k) {
    return strcmp(k, "logits") == 0 || strcmp(k, "loss") == 0 || strcmp(k, "per_seq_loss") == 0 ||
           strcmp(k, "tokens") == 0 || strncmp(k, "edit.", 5) == 0 || strncmp(k, "greedy.", 7) == 0;
}

static int argmax(const float *x, int n) {
    int a = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[a]) a = i;
    return a;
}

/* Greedy with lp_generate; returns how many leading tokens agree with the reference. */
static int greedy_prefix(const char *what, lp_model *m, const int32_t *prompt, int n_prompt, const int32_t *want,
                         int n_new) {
    int32_t out[64];
    cr_assert(n_new <= 64);
    int n_out = -1;
    lp_gen_opts o = {.max_tokens = n_new, .temperature = 0.0f, .top_p = 1.0f, .seed = 1, .stop_token = -1};
    cr_assert_eq(lp_generate(m, prompt, n_prompt, &o, out, &n_out), LP_OK, "%s: %s", what, lp_last_error());
    cr_assert_eq(n_out, n_new, "%s: %d tokens generated, %d asked", what, n_out, n_new);
    int same = 0;
    while (same < n_new && out[same] == want[same]) same++;
    return same;
}

/* ---- the tiny fixtures in fp32 ---- */

static void tiny_f32(const char *name, const char *zero_hook, int zero_head, const char *zero_ref) {
    LP_TEST_REQUIRE_GPU();
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/%s", LP_FIXTURES, name);
    snprintf(path, sizeof path, "%s/reference.safetensors", dir);
    lp_st_file ref;
    cr_assert_eq(lp_st_open(&ref, path), LP_OK, "%s", lp_last_error());
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, dir, LP_CUDA, LP_F32), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *tok = R(&ref, "tokens");
    int B = (int)tok->shape[0], T = (int)tok->shape[1];
    /* every hook */
    cr_assert_eq(lp_hook_capture(m, "*", NULL, 0, NULL), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_forward(m, tok->data, B, T, LP_WANT_LOGITS | LP_WANT_LOSS), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *lr = R(&ref, "logits");
    LP_EXPECT_WITHIN("logits", 0, lp_compare_f(lp_model_logits(m), lr->data, lr->nbytes / 4), max_rel, TINY_LOGITS_MAX_REL);
    int n_ref = 0;
    for (int i = 0; i < ref.n; i++) n_ref += !is_meta_key(ref.tensors[i].name);
    cr_expect_eq(n_ref + 2, lp_hook_count(m), "%s: %d reference hooks (no unembed hooks), %d model hooks", name, n_ref, lp_hook_count(m));
    for (int id = 0; id < lp_hook_count(m); id++) {
        const char *h = lp_hook_name(m, id), *key = lp_test_hf_key(h);
        if (!key) continue;
        const lp_st_tensor *r = R(&ref, key);
        size_t n = r->nbytes / 4;
        float *got = malloc(n * sizeof(float));
        cr_assert_eq(lp_capture_read_f32(m, h, got, n), LP_OK, "%s", lp_last_error());
        LP_EXPECT_WITHIN(h, 0, lp_compare_f(got, r->data, n), nmse, TINY_HOOK_NMSE);
        free(got);
    }
    /* zero one head */
    lp_hooks_clear(m);
    lp_edit_spec z = {.kind = LP_EDIT_ZERO, .heads = (int[]){zero_head}, .nheads = 1};
    cr_assert_eq(lp_hook_edit(m, zero_hook, &z), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_forward(m, tok->data, B, T, LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *er = R(&ref, zero_ref);
    LP_EXPECT_WITHIN(zero_ref, 0, lp_compare_f(lp_model_logits(m), er->data, er->nbytes / 4), max_rel, TINY_LOGITS_MAX_REL);
    lp_hooks_clear(m);
    /* greedy generation: every float64 margin is >= 0.06, far above fp32 noise */
    const lp_st_tensor *p = R(&ref, "greedy.prompt"), *g = R(&ref, "greedy.tokens");
    int same = greedy_prefix(name, m, p->data, (int)p->shape[0], g->data, (int)g->shape[0]);
    cr_expect_eq(same, (int)g->shape[0], "%s: greedy differs from the reference at token %d", name, same);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(llama_cuda, llama_tiny_f32) { tiny_f32("llama-tiny", "blocks.1.attn.hook_v", 1, "edit.zero_v_L1_H1.logits"); }
Test(llama_cuda, qwen2_tiny_f32) { tiny_f32("qwen2-tiny", "blocks.1.attn.hook_z", 2, "edit.zero_z_L1_H2.logits"); }
Test(llama_cuda, mistral_tiny_f32) { tiny_f32("mistral-tiny", "blocks.0.attn.hook_z", 3, "edit.zero_z_L0_H3.logits"); }

/* ---- SmolLM2-135M-Instruct from GGUF ---- */

static const char *SMOL_HOOKS[] = {
    "blocks.0.hook_resid_post",  "blocks.14.hook_resid_post",    "blocks.29.hook_resid_post",
    "blocks.5.attn.hook_rot_q",  "blocks.5.attn.hook_rot_k",     "blocks.10.mlp.hook_post",
    "blocks.3.ln1.hook_scale",   "blocks.3.ln1.hook_normalized", "ln_final.hook_scale",
    "ln_final.hook_normalized",
};
enum { SMOL_N_PROMPTS = 4, SMOL_N_HOOKS = sizeof SMOL_HOOKS / sizeof *SMOL_HOOKS, V = 49152 };

static const lp_st_tensor *Rp(const lp_st_file *ref, int p, const char *what) {
    char k[128];
    snprintf(k, sizeof k, "p%d.%s", p, what);
    return R(ref, k);
}

static void smollm2(int bi) {
    LP_TEST_REQUIRE_GPU();
    if (access(SMOLLM2_GGUF, R_OK) != 0) cr_skip_test("%s is absent (make model fetches it)", SMOLLM2_GGUF);
#ifdef LOUPE_TEST_SMALL
    /* 30 layers, 49152-token vocabulary and greedy decoding: minutes per dtype on the CPU
     * emulator or under compute-sanitizer; the tiny Llama, Qwen2 and Mistral fixtures above
     * run the same kernels. */
    cr_skip_test("SmolLM2-135M is too large for the small-size build (emulator, sanitizer); the tiny fixtures cover its kernels");
#endif
    lp_st_file ref;
    cr_assert_eq(lp_st_open(&ref, SMOLLM2_REF), LP_OK, "%s", lp_last_error());
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, SMOLLM2_GGUF, LP_CUDA, SMOL[bi].dt), LP_OK, "%s", lp_last_error());
    const char *dn = SMOL[bi].name;
    for (int h = 0; h < SMOL_N_HOOKS; h++) cr_assert_eq(lp_hook_capture(m, SMOL_HOOKS[h], NULL, 0, NULL), LP_OK, "%s", lp_last_error());
    char what[128];
    for (int p = 0; p < SMOL_N_PROMPTS; p++) {
        const lp_st_tensor *tok = Rp(&ref, p, "tokens");
        int T = (int)tok->shape[1];
        cr_assert_eq(lp_model_forward(m, tok->data, 1, T, LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
        const float *lg = lp_model_logits(m);
        const lp_st_tensor *pt = Rp(&ref, p, "logit_pos");
        const int32_t *pos = pt->data;
        int np = (int)pt->shape[0];
        const float *want = Rp(&ref, p, "logits")->data, *margin = Rp(&ref, p, "logit_margin")->data;
        float *got = malloc(np * (size_t)V * sizeof(float));
        for (int i = 0; i < np; i++) memcpy(got + (size_t)i * V, lg + (size_t)pos[i] * V, V * sizeof(float));
        snprintf(what, sizeof what, "%s p%d logits at position %d%s", dn, p, pos[np - 1], np > 1 ? " and before" : "");
        LP_EXPECT_WITHIN(what, 0, lp_compare_f(got, want, np * (size_t)V), max_rel, SMOL[bi].logits_max_rel);
        for (int i = 0; i < np; i++) {
            if (margin[i] < SMOL[bi].margin) continue;
            int a = argmax(got + (size_t)i * V, V), b = argmax(want + (size_t)i * V, V);
            cr_expect_eq(a, b, "%s p%d pos %d: top-1 %d, reference %d (float64 margin %.4f)", dn, p, pos[i], a, b, margin[i]);
        }
        free(got);
        for (int h = 0; h < SMOL_N_HOOKS; h++) {
            const lp_st_tensor *r = Rp(&ref, p, SMOL_HOOKS[h]);
            size_t n = r->nbytes / 4;
            float *cap = malloc(n * sizeof(float));
            cr_assert_eq(lp_capture_read_f32(m, SMOL_HOOKS[h], cap, n), LP_OK, "%s", lp_last_error());
            snprintf(what, sizeof what, "%s p%d %s", dn, p, SMOL_HOOKS[h]);
            LP_EXPECT_WITHIN(what, 0, lp_compare_f(cap, r->data, n), nmse, SMOL[bi].hook_nmse);
            free(cap);
        }
    }
    int done = 0, checked = 0;
    for (int p = 0; p < SMOL_N_PROMPTS; p++) {
        char k[64];
        snprintf(k, sizeof k, "p%d.greedy.tokens", p);
        const lp_st_tensor *g = lp_st_find(&ref, k);
        if (!g) continue;
        done++;
        const lp_st_tensor *tok = Rp(&ref, p, "tokens");
        const float *mg = Rp(&ref, p, "greedy.margin")->data;
        int n = (int)g->shape[0];
        /* the steps before the first float64 margin below the bound must agree (f32: all of
         * them, since every margin is above 1e-2) */
        int must = 0;
        while (must < n && mg[must] >= SMOL[bi].margin) must++;
        snprintf(what, sizeof what, "%s smollm2 p%d", dn, p);
        int same = greedy_prefix(what, m, tok->data, (int)tok->shape[1], g->data, n);
        fprintf(stderr, "  %-40s greedy: %d of %d tokens agree, %d required\n", what, same, n, must);
        cr_expect(same >= must, "%s: greedy tokens agree for %d steps, %d required (float64 margins >= %.2f up to there)",
                  what, same, must, SMOL[bi].margin);
        checked += must;
    }
    cr_expect_eq(done, 2, "the fixture should hold two greedy continuations");
    if (SMOL[bi].dt == LP_BF16)
        cr_expect(checked >= BF16_MIN_GREEDY_STEPS, "the fixture's margins leave only %d checked greedy steps", checked);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(llama_cuda, smollm2_f32) { smollm2(0); }
Test(llama_cuda, smollm2_bf16) { smollm2(1); }
