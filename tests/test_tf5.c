/* test_tf5.c: checkpoints written by transformers 5, whose config.json keeps the rotary
 * settings under "rope_parameters" (tests/gen/gen_tf5_fixture.py; tests/gen/README.md):
 *   llama-tiny-tf5    f32, tied, GQA 4/2, llama3 rope (theta 5e5 inside rope_parameters)
 *   mistral-tiny-tf5  f16, untied, GQA 4/2, head_dim 24 (heads x head_dim 96 != d_model 64), theta 1e6
 *   qwen2-tiny-tf5    bf16, tied, q/k/v biases, GQA 4/1, linear rope (factor 2, theta 1e6)
 * loupe on the CPU (F32) against the generator's float64 forward, at test_llama.c's budgets:
 * logits max_rel <= 1e-4, hooks nmse <= 1e-9, loss abs <= 1e-4. Reading theta 10000 instead
 * moves these logits by max_rel 0.47 to 0.55 (the generator checks), so a reader that
 * missed rope_parameters fails here by orders of magnitude.
 *
 * Then the layout's edge cases, each as transformers 5.25 reads it (the generator prints
 * them): rope_parameters without rope_theta (top-level rope_theta, else 10000), a non-empty
 * rope_scaling replacing rope_parameters, and rotary settings loupe cannot honour, refused
 * naming the key. */
#include "cfgvariant.h"
#include "loupe/hooks.h"
#include "loupe/safetensors.h"

static const double LOGITS_MAX_REL = 1e-4;
static const double HOOK_NMSE = 1e-9;
static const double LOSS_ABS = 1e-4;

typedef struct tf5 {
    const char *name;
    int n_kv_heads, d_head, d_mlp, tied, qkv_bias;
    float eps;
    double theta, factor;
    lp_rope_kind rope;
} tf5;

static const tf5 LLAMA = {"llama-tiny-tf5", 2, 16, 160, 1, 0, 1e-5f, 500000.0, 8.0, LP_ROPE_LLAMA3};
static const tf5 MISTRAL = {"mistral-tiny-tf5", 2, 24, 128, 0, 0, 1e-6f, 1000000.0, 0, LP_ROPE_DEFAULT};
static const tf5 QWEN2 = {"qwen2-tiny-tf5", 1, 16, 128, 1, 1, 1e-6f, 1000000.0, 2.0, LP_ROPE_LINEAR};

static lp_model *load(const char *name) {
    char d[512];
    snprintf(d, sizeof d, "%s/%s", LP_FIXTURES, name);
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, d, LP_CPU, LP_F32), LP_OK, "%s: %s", name, lp_last_error());
    return m;
}

static void config_matches(const tf5 *f) {
    lp_model *m = load(f->name);
    const lp_config *c = lp_model_config(m);
    cr_expect(c->n_layers == 2 && c->d_model == 64 && c->n_heads == 4 && c->d_vocab == 512, "%s: dimensions", f->name);
    cr_expect_eq(c->n_kv_heads, f->n_kv_heads, "%s: n_kv_heads %d", f->name, c->n_kv_heads);
    cr_expect_eq(c->d_head, f->d_head, "%s: d_head %d", f->name, c->d_head);
    cr_expect_eq(c->d_mlp, f->d_mlp, "%s: d_mlp %d", f->name, c->d_mlp);
    cr_expect_eq(!!c->tied_unembed, f->tied, "%s: tied %d", f->name, c->tied_unembed);
    cr_expect_eq(!!c->qkv_bias, f->qkv_bias, "%s: qkv_bias %d", f->name, c->qkv_bias);
    cr_expect(fabsf(c->ln_eps - f->eps) <= 1e-6f * f->eps, "%s: eps %g", f->name, c->ln_eps);
    cr_expect(c->rope_theta == f->theta, "%s: rope_theta %g, expected %g", f->name, c->rope_theta, f->theta);
    cr_expect_eq(c->rope_kind, f->rope, "%s: rope kind %d", f->name, c->rope_kind);
    if (f->rope != LP_ROPE_DEFAULT) cr_expect(c->rope_factor == f->factor, "%s: factor %g", f->name, c->rope_factor);
    if (f->rope == LP_ROPE_LLAMA3)
        cr_expect(c->rope_low_freq_factor == 1.0 && c->rope_high_freq_factor == 4.0 && c->rope_orig_ctx == 64,
                  "%s: llama3 %g %g %d", f->name, c->rope_low_freq_factor, c->rope_high_freq_factor, c->rope_orig_ctx);
    lp_model_free(m);
}

Test(tf5, config_llama) { config_matches(&LLAMA); }
Test(tf5, config_mistral) { config_matches(&MISTRAL); }
Test(tf5, config_qwen2) { config_matches(&QWEN2); }

static void parity(const tf5 *f) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s/reference.safetensors", LP_FIXTURES, f->name);
    lp_st_file ref;
    cr_assert_eq(lp_st_open(&ref, p), LP_OK, "%s", lp_last_error());
    lp_model *m = load(f->name);
    int n_hooks = 0;
    for (int i = 0; i < ref.n; i++) {
        const char *k = ref.tensors[i].name;
        if (!(strchr(k, '.') || strcmp(k, "hook_embed") == 0)) continue;
        cr_assert_eq(lp_hook_capture(m, k, NULL, 0, NULL), LP_OK, "%s: %s", k, lp_last_error());
        n_hooks++;
    }
    cr_expect_eq(n_hooks, 1 + 7 * 2 + 1, "%s: %d reference hooks", f->name, n_hooks);
    const lp_st_tensor *tok = lp_st_find(&ref, "tokens");
    cr_assert(tok && tok->dtype == LP_I32 && tok->ndim == 2);
    int B = (int)tok->shape[0], T = (int)tok->shape[1];
    cr_assert_eq(lp_model_forward(m, tok->data, B, T, LP_WANT_LOGITS | LP_WANT_LOSS), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *lg = lp_st_find(&ref, "logits");
    cr_assert(lg && lp_model_logits(m));
    LP_EXPECT_WITHIN("logits", 0, lp_compare_f(lp_model_logits(m), lg->data, lg->nbytes / 4), max_rel, LOGITS_MAX_REL);
    for (int i = 0; i < ref.n; i++) {
        const lp_st_tensor *r = &ref.tensors[i];
        if (!(strchr(r->name, '.') || strcmp(r->name, "hook_embed") == 0)) continue;
        lp_tensor t;
        cr_assert_eq(lp_capture_get(m, r->name, &t), LP_OK, "%s", lp_last_error());
        cr_assert_eq(t.ndim, r->ndim, "%s %s: rank %d, reference %d", f->name, r->name, t.ndim, r->ndim);
        for (int d = 0; d < t.ndim; d++)
            cr_assert_eq(t.shape[d], r->shape[d], "%s %s: dim %d = %lld, reference %lld", f->name, r->name, d,
                         (long long)t.shape[d], (long long)r->shape[d]);
        LP_EXPECT_WITHIN(r->name, 0, lp_compare_f(t.data, r->data, r->nbytes / 4), nmse, HOOK_NMSE);
    }
    const float *losses = lp_model_losses(m), *per_seq = lp_st_find(&ref, "per_seq_loss")->data;
    double sum = 0;
    for (int b = 0; b < B; b++) {
        double s = 0;
        for (int t = 0; t < T - 1; t++) s += losses[b * (T - 1) + t];
        cr_expect(fabs(s / (T - 1) - per_seq[b]) <= LOSS_ABS, "%s: row %d loss %.6f, reference %.6f", f->name, b, s / (T - 1), per_seq[b]);
        sum += s;
    }
    float want = *(const float *)lp_st_find(&ref, "loss")->data;
    cr_expect(fabs(sum / (B * (T - 1)) - want) <= LOSS_ABS, "%s: loss %.6f, reference %.6f", f->name, sum / (B * (T - 1)), want);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(tf5, parity_llama) { parity(&LLAMA); }
Test(tf5, parity_mistral) { parity(&MISTRAL); }
Test(tf5, parity_qwen2) { parity(&QWEN2); }

/* ---- the layout's edge cases, as transformers 5 reads them ---- */

static void expect_rope(const char *patch, double theta, lp_rope_kind kind, double factor) {
    lp_model *m;
    cr_assert_eq(cfg_variant_load("mistral-tiny-tf5", patch, &m), LP_OK, "%s: %s", patch, lp_last_error());
    const lp_config *c = lp_model_config(m);
    cr_expect(c->rope_theta == theta, "%s: theta %g, transformers reads %g", patch, c->rope_theta, theta);
    cr_expect_eq(c->rope_kind, kind, "%s: rope kind %d", patch, c->rope_kind);
    if (kind != LP_ROPE_DEFAULT) cr_expect(c->rope_factor == factor, "%s: factor %g", patch, c->rope_factor);
    lp_model_free(m);
}

Test(tf5, rope_theta_fallbacks) {
    /* transformers 5.25: {'rope_type': 'default', 'rope_theta': 10000.0} */
    expect_rope("{\"rope_parameters\": {\"rope_type\": \"default\"}}", 10000.0, LP_ROPE_DEFAULT, 0);
    /* a top-level rope_theta fills a dict without one: 5e5 */
    expect_rope("{\"rope_parameters\": {\"rope_type\": \"default\"}, \"rope_theta\": 500000.0}", 500000.0, LP_ROPE_DEFAULT, 0);
    /* the dict's wins over the top level's: 1e6 */
    expect_rope("{\"rope_theta\": 500000.0}", 1000000.0, LP_ROPE_DEFAULT, 0);
    /* no rotary keys at all: 10000 */
    expect_rope("{\"rope_parameters\": \"<delete>\"}", 10000.0, LP_ROPE_DEFAULT, 0);
    /* a non-empty rope_scaling replaces rope_parameters, theta included: linear x2 at 10000 */
    expect_rope("{\"rope_scaling\": {\"rope_type\": \"linear\", \"factor\": 2.0}}", 10000.0, LP_ROPE_LINEAR, 2.0);
    /* an empty or null rope_scaling does not */
    expect_rope("{\"rope_scaling\": {}}", 1000000.0, LP_ROPE_DEFAULT, 0);
    expect_rope("{\"rope_scaling\": null}", 1000000.0, LP_ROPE_DEFAULT, 0);
    /* transformers 4's "type" */
    expect_rope("{\"rope_parameters\": {\"type\": \"linear\", \"factor\": 4.0, \"rope_theta\": 20000.0}}", 20000.0, LP_ROPE_LINEAR, 4.0);
}

Test(tf5, llama3_original_context) {
    lp_model *m;
    /* absent from the dict: max_position_embeddings (512) */
    cr_assert_eq(cfg_variant_load("llama-tiny-tf5", "{\"rope_parameters\": {\"rope_type\": \"llama3\", \"rope_theta\": 500000.0, "
                                  "\"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0}}", &m), LP_OK, "%s", lp_last_error());
    cr_expect_eq(lp_model_config(m)->rope_orig_ctx, 512);
    lp_model_free(m);
    /* a top-level original_max_position_embeddings wins over the dict's */
    cr_assert_eq(cfg_variant_load("llama-tiny-tf5", "{\"original_max_position_embeddings\": 128}", &m), LP_OK, "%s", lp_last_error());
    cr_expect_eq(lp_model_config(m)->rope_orig_ctx, 128);
    lp_model_free(m);
}

Test(tf5, rope_settings_loupe_cannot_honour_are_refused) {
    static const char *const types[] = {"yarn", "dynamic", "longrope", "proportional", "su"};
    char patch[256];
    for (size_t i = 0; i < sizeof types / sizeof *types; i++) {
        snprintf(patch, sizeof patch, "{\"rope_parameters\": {\"rope_type\": \"%s\", \"factor\": 2.0, \"rope_theta\": 1e6}}", types[i]);
        CFG_REFUSED("mistral-tiny-tf5", patch, LP_ERR_FORMAT, "config.json", "\"rope_parameters.rope_type\"", types[i]);
    }
    CFG_REFUSED("mistral-tiny-tf5", "{\"rope_scaling\": {\"type\": \"dynamic\", \"factor\": 2.0}}", LP_ERR_FORMAT,
                "\"rope_scaling.type\"", "dynamic");
    CFG_REFUSED("mistral-tiny-tf5", "{\"rope_parameters\": {\"rope_type\": \"default\", \"partial_rotary_factor\": 0.5}}",
                LP_ERR_FORMAT, "\"rope_parameters.partial_rotary_factor\"");
    CFG_REFUSED("mistral-tiny-tf5", "{\"partial_rotary_factor\": 0.5}", LP_ERR_FORMAT, "\"partial_rotary_factor\"");
    CFG_REFUSED("mistral-tiny-tf5", "{\"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": -5}}", LP_ERR_FORMAT,
                "\"rope_parameters.rope_theta\"");
    CFG_REFUSED("mistral-tiny-tf5", "{\"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": \"1e6\"}}", LP_ERR_FORMAT,
                "\"rope_parameters.rope_theta\"");
    CFG_REFUSED("mistral-tiny-tf5", "{\"rope_parameters\": {\"rope_type\": \"linear\"}}", LP_ERR_FORMAT, "\"rope_parameters.factor\"");
    CFG_REFUSED("llama-tiny-tf5", "{\"rope_parameters\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 4.0, "
                "\"high_freq_factor\": 1.0}}", LP_ERR_FORMAT, "high_freq_factor");
    CFG_REFUSED("mistral-tiny-tf5", "{\"rope_parameters\": {\"full_attention\": {\"rope_type\": \"default\"}}}", LP_ERR_FORMAT,
                "\"rope_parameters.full_attention\"");
    CFG_REFUSED("mistral-tiny-tf5", "{\"rope_parameters\": 5}", LP_ERR_FORMAT, "\"rope_parameters\"");
}
