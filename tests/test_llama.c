/* test_llama.c: loupe's Llama-family forward on the CPU (F32) against Hugging Face
 * transformers run in float64, every hook included, plus edits and greedy generation.
 *
 * Fixtures (tests/gen/gen_llama_fixture.py, gen_smollm2_fixture.py; see tests/gen/README.md):
 *   llama-tiny   LlamaForCausalLM, f32, tied embeddings, GQA 4/2, llama3 rope scaling
 *   qwen2-tiny   Qwen2ForCausalLM, bf16, q/k/v biases, untied, GQA 4/1, two shards
 *   mistral-tiny MistralForCausalLM, f16, untied, 4/4 heads
 *   smollm2      SmolLM2-135M-Instruct Q4_1 GGUF (models/, fetched by `make model`): logits at
 *                three positions of four prompts, nine hooks, two 20-token greedy continuations
 *
 * Metrics (tests/testutil.h): max_rel = max|a - ref| / max|ref| over the compared tensor;
 * nmse = sum (a - ref)^2 / sum ref^2; -inf entries (masked scores) must match exactly.
 *
 * Budgets, tiny models: logits max_rel <= 1e-4; hooks nmse <= 1e-9; loss abs <= 1e-4. HF's own
 * float32 run of the same checkpoints lands at logits max_rel ~5e-7 and hook nmse ~3e-13, so
 * the budgets leave two to three orders of magnitude for a different summation order.
 * SmolLM2: logits max_rel <= 1e-3 at each prompt's recorded positions (the last; the final
 * norm's output at every position is among the hooks; HF's own float32 run: 3e-6); hooks nmse <= 1e-8 (HF float32
 * through 30 layers: at most 1.2e-11, see tests/fixtures/smollm2/prompts.json "calibration");
 * top-1 agrees where the float64 margin is >= 1e-2; greedy tokens identical, since every
 * recorded float64 top-1 minus top-2 margin is >= 0.17, far above fp32 noise (~1e-4 here). */
#include "loupe/hooks.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#include <unistd.h>

#define SMOLLM2_GGUF "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define SMOLLM2_REF LP_FIXTURES "/smollm2/reference.safetensors"

static const double LOGITS_MAX_REL = 1e-4;
static const double HOOK_NMSE = 1e-9;
static const double LOSS_ABS = 1e-4;
static const double SMOL_LOGITS_MAX_REL = 1e-3;
static const double SMOL_HOOK_NMSE = 1e-8;
static const int B = 2, T = 16;

/* What each tiny fixture's config.json says (tests/gen/gen_llama_fixture.py SPECS). */
typedef struct tiny {
    const char *name;
    int n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, n_ctx, d_vocab, tied, qkv_bias;
    float eps;
    double theta;
    lp_rope_kind rope;
} tiny;

static const tiny LLAMA = {"llama-tiny", 2, 64, 4, 2, 16, 160, 512, 1000, 1, 0, 1e-5f, 500000.0, LP_ROPE_LLAMA3};
static const tiny QWEN2 = {"qwen2-tiny", 2, 64, 4, 1, 16, 128, 128, 1000, 0, 1, 1e-6f, 1000000.0, LP_ROPE_DEFAULT};
static const tiny MISTRAL = {"mistral-tiny", 2, 64, 4, 4, 16, 192, 128, 1000, 0, 0, 1e-5f, 10000.0, LP_ROPE_DEFAULT};

static void dir_of(const tiny *f, char *buf, size_t n) { snprintf(buf, n, "%s/%s", LP_FIXTURES, f->name); }

static void open_ref(lp_st_file *ref, const tiny *f) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s/reference.safetensors", LP_FIXTURES, f->name);
    cr_assert_eq(lp_st_open(ref, p), LP_OK, "%s", lp_last_error());
}

static const lp_st_tensor *R(const lp_st_file *ref, const char *name) {
    const lp_st_tensor *t = lp_st_find(ref, name);
    cr_assert(t != NULL, "reference tensor %s missing from %s", name, ref->path);
    return t;
}

static lp_model *load_tiny(const tiny *f) {
    char d[512];
    dir_of(f, d, sizeof d);
    lp_model *m;
    lp_status st = lp_model_load(&m, d, LP_CPU, LP_F32);
    cr_assert_eq(st, LP_OK, "%s: %s", f->name, lp_last_error());
    return m;
}

/* Reference keys that are not hook points. */
static int is_meta_key(const char *k) {
    static const char *meta[] = {"logits", "loss", "per_seq_loss", "tokens"};
    for (size_t i = 0; i < sizeof meta / sizeof *meta; i++)
        if (strcmp(k, meta[i]) == 0) return 1;
    return strncmp(k, "edit.", 5) == 0 || strncmp(k, "greedy.", 7) == 0;
}

static void forward(lp_model *m, const lp_st_file *ref, int want) {
    const lp_st_tensor *t = R(ref, "tokens");
    cr_assert_eq(t->dtype, LP_I32);
    cr_assert_eq(lp_model_forward(m, t->data, (int)t->shape[0], (int)t->shape[1], want), LP_OK, "%s", lp_last_error());
}

static void expect_logits(const char *what, lp_model *m, const lp_st_file *ref, const char *name, double budget) {
    const lp_st_tensor *r = R(ref, name);
    const float *got = lp_model_logits(m);
    cr_assert(got != NULL, "%s: no logits", what);
    LP_EXPECT_WITHIN(what, 0, lp_compare_f(got, r->data, r->nbytes / 4), max_rel, budget);
}

/* ---- configuration ---- */

static void config_matches(const tiny *f) {
    lp_model *m = load_tiny(f);
    const lp_config *c = lp_model_config(m);
    cr_expect_eq(c->arch, LP_ARCH_LLAMA, "%s: arch", f->name);
    cr_expect_eq(c->n_layers, f->n_layers, "%s: n_layers %d", f->name, c->n_layers);
    cr_expect_eq(c->d_model, f->d_model, "%s: d_model %d", f->name, c->d_model);
    cr_expect_eq(c->n_heads, f->n_heads, "%s: n_heads %d", f->name, c->n_heads);
    cr_expect_eq(c->n_kv_heads, f->n_kv_heads, "%s: n_kv_heads %d", f->name, c->n_kv_heads);
    cr_expect_eq(c->d_head, f->d_head, "%s: d_head %d", f->name, c->d_head);
    cr_expect_eq(c->d_mlp, f->d_mlp, "%s: d_mlp %d", f->name, c->d_mlp);
    cr_expect_eq(c->n_ctx, f->n_ctx, "%s: n_ctx %d", f->name, c->n_ctx);
    cr_expect_eq(c->d_vocab, f->d_vocab, "%s: d_vocab %d", f->name, c->d_vocab);
    cr_expect_eq(!!c->tied_unembed, f->tied, "%s: tied_unembed %d", f->name, c->tied_unembed);
    cr_expect_eq(!!c->qkv_bias, f->qkv_bias, "%s: qkv_bias %d", f->name, c->qkv_bias);
    cr_expect(fabsf(c->ln_eps - f->eps) <= 1e-3f * f->eps, "%s: ln_eps %g", f->name, c->ln_eps);
    cr_expect(fabs(c->rope_theta - f->theta) <= 1e-9 * f->theta, "%s: rope_theta %g", f->name, c->rope_theta);
    cr_expect_eq(c->rope_kind, f->rope, "%s: rope_kind %d", f->name, c->rope_kind);
    if (f->rope == LP_ROPE_LLAMA3) {
        cr_expect(c->rope_factor == 8.0 && c->rope_low_freq_factor == 1.0 && c->rope_high_freq_factor == 4.0,
                  "%s: llama3 factors %g %g %g", f->name, c->rope_factor, c->rope_low_freq_factor, c->rope_high_freq_factor);
        cr_expect_eq(c->rope_orig_ctx, 64, "%s: rope_orig_ctx %d", f->name, c->rope_orig_ctx);
    }
    /* hook_embed + 20 per block + ln_final scale and normalized + unembed in and out; no hook_pos_embed */
    cr_expect_eq(lp_hook_count(m), 1 + 20 * f->n_layers + 2 + 2, "%s: %d hooks", f->name, lp_hook_count(m));
    cr_expect_eq(lp_hook_find(m, "hook_pos_embed"), -1, "%s: a rotary model has no hook_pos_embed", f->name);
    int64_t D = f->d_model, qd = (int64_t)f->n_heads * f->d_head, kvd = (int64_t)f->n_kv_heads * f->d_head;
    int64_t per_layer = D * qd + 2 * D * kvd + qd * D + (f->qkv_bias ? qd + 2 * kvd : 0) + 3 * D * f->d_mlp + 2 * D;
    int64_t want = (int64_t)f->d_vocab * D * (f->tied ? 1 : 2) + f->n_layers * per_layer + D;
    cr_expect_eq(lp_model_n_params(m), want, "%s: %lld parameters, expected %lld", f->name, (long long)lp_model_n_params(m),
                 (long long)want);
    lp_model_free(m);
}

Test(llama, config_llama_tiny) { config_matches(&LLAMA); }
Test(llama, config_qwen2_tiny) { config_matches(&QWEN2); }
Test(llama, config_mistral_tiny) { config_matches(&MISTRAL); }

/* ---- every hook, the logits and the loss against HF float64 ---- */

static void parity(const tiny *f) {
    lp_st_file ref;
    open_ref(&ref, f);
    lp_model *m = load_tiny(f);
    int n;
    cr_assert_eq(lp_hook_capture(m, "*", NULL, 0, &n), LP_OK, "%s", lp_last_error());
    cr_expect_eq(n, lp_hook_count(m));
    /* the reference's hooks and the model's hooks are the same set, but for the unembed hooks
     * (the reference has the logits, and test_tl.c checks both against TransformerLens) */
    int n_ref_hooks = 0;
    for (int i = 0; i < ref.n; i++) {
        const char *k = ref.tensors[i].name;
        if (is_meta_key(k)) continue;
        n_ref_hooks++;
        cr_expect(lp_hook_find(m, k) >= 0, "%s: reference hook %s is not a hook of the model", f->name, k);
    }
    cr_expect_eq(n_ref_hooks + 2, lp_hook_count(m), "%s: %d reference hooks, %d model hooks", f->name, n_ref_hooks,
                 lp_hook_count(m));
    forward(m, &ref, LP_WANT_LOGITS | LP_WANT_LOSS);
    expect_logits("logits", m, &ref, "logits", LOGITS_MAX_REL);
    for (int id = 0; id < lp_hook_count(m); id++) {
        const char *name = lp_hook_name(m, id), *key = lp_test_hf_key(name);
        if (!key) continue;
        const lp_st_tensor *r = R(&ref, key);
        int64_t shape[LP_MAX_DIMS];
        int nd = lp_hook_shape(m, id, B, T, shape);
        cr_expect_eq(nd, r->ndim, "%s %s: lp_hook_shape rank %d, reference %d", f->name, name, nd, r->ndim);
        for (int d = 0; d < nd && d < r->ndim; d++)
            cr_expect_eq(shape[d], r->shape[d], "%s %s: lp_hook_shape dim %d = %lld, reference %lld", f->name, name, d,
                         (long long)shape[d], (long long)r->shape[d]);
        lp_tensor t;
        cr_assert_eq(lp_capture_get(m, name, &t), LP_OK, "%s", lp_last_error());
        cr_assert_eq(t.dtype, LP_F32, "%s: capture dtype", name);
        cr_assert_eq(t.ndim, r->ndim, "%s %s: capture rank %d, reference %d", f->name, name, t.ndim, r->ndim);
        for (int d = 0; d < t.ndim; d++)
            cr_assert_eq(t.shape[d], r->shape[d], "%s %s: capture dim %d = %lld, reference %lld", f->name, name, d,
                         (long long)t.shape[d], (long long)r->shape[d]);
        LP_EXPECT_WITHIN(name, 0, lp_compare_f(t.data, r->data, r->nbytes / 4), nmse, HOOK_NMSE);
    }
    /* mean next-token loss over all B*(T-1) predictions, and per sequence */
    const float *losses = lp_model_losses(m);
    cr_assert(losses != NULL);
    const float *per_seq = R(&ref, "per_seq_loss")->data;
    double sum = 0;
    for (int b = 0; b < B; b++) {
        double s = 0;
        for (int t = 0; t < T - 1; t++) s += losses[b * (T - 1) + t];
        cr_expect(fabs(s / (T - 1) - per_seq[b]) <= LOSS_ABS, "%s: loss of row %d %.6f, reference %.6f", f->name, b,
                  s / (T - 1), per_seq[b]);
        sum += s;
    }
    float want = *(const float *)R(&ref, "loss")->data;
    cr_expect(fabs(sum / (B * (T - 1)) - want) <= LOSS_ABS, "%s: loss %.6f, reference %.6f", f->name, sum / (B * (T - 1)),
              want);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(llama, parity_llama_tiny) { parity(&LLAMA); }
Test(llama, parity_qwen2_tiny) { parity(&QWEN2); }
Test(llama, parity_mistral_tiny) { parity(&MISTRAL); }

/* k, v and rot_k carry n_kv_heads, q, rot_q and z n_heads (GQA 4/2). */
Test(llama, gqa_hook_shapes) {
    lp_model *m = load_tiny(&LLAMA);
    static const struct { const char *hook; int64_t shape[4]; } want[] = {
        {"blocks.1.attn.hook_q", {2, 16, 4, 16}},        {"blocks.1.attn.hook_k", {2, 16, 2, 16}},
        {"blocks.1.attn.hook_v", {2, 16, 2, 16}},        {"blocks.1.attn.hook_rot_q", {2, 16, 4, 16}},
        {"blocks.1.attn.hook_rot_k", {2, 16, 2, 16}},    {"blocks.1.attn.hook_z", {2, 16, 4, 16}},
        {"blocks.1.attn.hook_pattern", {2, 4, 16, 16}},  {"blocks.1.attn.hook_attn_scores", {2, 4, 16, 16}},
        {"blocks.1.mlp.hook_pre_linear", {2, 16, 160}},  {"blocks.1.ln2.hook_scale", {2, 16, 1}},
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        int id = lp_hook_find(m, want[i].hook);
        cr_assert(id >= 0, "no hook %s", want[i].hook);
        int64_t s[LP_MAX_DIMS];
        int nd = lp_hook_shape(m, id, 2, 16, s);
        int wnd = want[i].shape[3] ? 4 : 3;
        cr_expect_eq(nd, wnd, "%s: rank %d", want[i].hook, nd);
        for (int d = 0; d < wnd && d < nd; d++)
            cr_expect_eq(s[d], want[i].shape[d], "%s: dim %d = %lld", want[i].hook, d, (long long)s[d]);
    }
    lp_model_free(m);
}

/* ---- edits: zero one head, compared with HF runs with the same head zeroed ---- */

static void zero_head(const tiny *f, const char *hook, int head, const char *ref_name) {
    lp_st_file ref;
    open_ref(&ref, f);
    lp_model *m = load_tiny(f);
    lp_edit_spec e = {.kind = LP_EDIT_ZERO, .heads = (int[]){head}, .nheads = 1};
    cr_assert_eq(lp_hook_edit(m, hook, &e), LP_OK, "%s", lp_last_error());
    forward(m, &ref, LP_WANT_LOGITS);
    expect_logits(ref_name, m, &ref, ref_name, LOGITS_MAX_REL);
    /* and the edit did something: the clean logits are far from these */
    lp_cmp c = lp_compare_f(lp_model_logits(m), R(&ref, "logits")->data, (size_t)B * T * f->d_vocab);
    cr_expect(c.max_rel > 100 * LOGITS_MAX_REL, "%s: zeroing %s head %d barely changed the logits", f->name, hook, head);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(llama, zero_z_head_llama_tiny) { zero_head(&LLAMA, "blocks.0.attn.hook_z", 1, "edit.zero_z_L0_H1.logits"); }
/* hook_v has n_kv_heads heads: kv head 1 feeds query heads 2 and 3 */
Test(llama, zero_v_kv_head_llama_tiny) { zero_head(&LLAMA, "blocks.1.attn.hook_v", 1, "edit.zero_v_L1_H1.logits"); }
Test(llama, zero_z_head_qwen2_tiny) { zero_head(&QWEN2, "blocks.1.attn.hook_z", 2, "edit.zero_z_L1_H2.logits"); }
Test(llama, zero_z_head_mistral_tiny) { zero_head(&MISTRAL, "blocks.0.attn.hook_z", 3, "edit.zero_z_L0_H3.logits"); }

/* ---- greedy generation with the KV cache ---- */

static void expect_greedy(const char *what, lp_model *m, const int32_t *prompt, int n_prompt, const int32_t *want,
                          const float *margin, int n_new) {
    int32_t out[64];
    cr_assert(n_new <= 64);
    int n_out = -1;
    lp_gen_opts o = {.max_tokens = n_new, .temperature = 0.0f, .top_p = 1.0f, .seed = 1, .stop_token = -1};
    cr_assert_eq(lp_generate(m, prompt, n_prompt, &o, out, &n_out), LP_OK, "%s: %s", what, lp_last_error());
    cr_assert_eq(n_out, n_new, "%s: %d tokens generated, %d asked", what, n_out, n_new);
    float minm = INFINITY;
    for (int i = 0; i < n_new; i++) minm = fminf(minm, margin[i]);
    fprintf(stderr, "  %-40s greedy %d tokens, smallest float64 margin %.4f\n", what, n_new, minm);
    for (int i = 0; i < n_new; i++)
        cr_assert_eq(out[i], want[i], "%s: greedy token %d is %d, reference %d (float64 margin there %.4f)", what, i,
                     out[i], want[i], margin[i]);
}

static void greedy_tiny(const tiny *f) {
    lp_st_file ref;
    open_ref(&ref, f);
    lp_model *m = load_tiny(f);
    const lp_st_tensor *p = R(&ref, "greedy.prompt"), *g = R(&ref, "greedy.tokens"), *mg = R(&ref, "greedy.margin");
    expect_greedy(f->name, m, p->data, (int)p->shape[0], g->data, mg->data, (int)g->shape[0]);
    /* a forward in between (different shape) leaves generation unchanged */
    forward(m, &ref, LP_WANT_LOGITS);
    expect_greedy(f->name, m, p->data, (int)p->shape[0], g->data, mg->data, (int)g->shape[0]);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(llama, greedy_llama_tiny) { greedy_tiny(&LLAMA); }
Test(llama, greedy_qwen2_tiny) { greedy_tiny(&QWEN2); }
Test(llama, greedy_mistral_tiny) { greedy_tiny(&MISTRAL); }

/* ---- SmolLM2-135M-Instruct from GGUF ---- */

static const char *SMOL_HOOKS[] = {
    "blocks.0.hook_resid_post",  "blocks.14.hook_resid_post",    "blocks.29.hook_resid_post",
    "blocks.5.attn.hook_rot_q",  "blocks.5.attn.hook_rot_k",     "blocks.10.mlp.hook_post",
    "blocks.3.ln1.hook_scale",   "blocks.3.ln1.hook_normalized", "ln_final.hook_scale",
    "ln_final.hook_normalized",
};
enum { SMOL_N_PROMPTS = 4, SMOL_N_HOOKS = sizeof SMOL_HOOKS / sizeof *SMOL_HOOKS };

static lp_model *load_smollm2(lp_st_file *ref) {
    if (access(SMOLLM2_GGUF, R_OK) != 0) cr_skip_test("%s is absent (make model fetches it)", SMOLLM2_GGUF);
    cr_assert_eq(lp_st_open(ref, SMOLLM2_REF), LP_OK, "%s", lp_last_error());
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, SMOLLM2_GGUF, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    return m;
}

static const lp_st_tensor *Rp(const lp_st_file *ref, int p, const char *what) {
    char k[128];
    snprintf(k, sizeof k, "p%d.%s", p, what);
    return R(ref, k);
}

Test(smollm2, config_from_gguf) {
    lp_st_file ref;
    lp_model *m = load_smollm2(&ref);
    const lp_config *c = lp_model_config(m);
    cr_expect_eq(c->arch, LP_ARCH_LLAMA);
    cr_expect(c->n_layers == 30 && c->d_model == 576 && c->n_heads == 9 && c->n_kv_heads == 3 && c->d_head == 64 &&
                  c->d_mlp == 1536 && c->d_vocab == 49152,
              "config %d %d %d %d %d %d %d", c->n_layers, c->d_model, c->n_heads, c->n_kv_heads, c->d_head, c->d_mlp,
              c->d_vocab);
    cr_expect(c->tied_unembed, "the GGUF has no output.weight: the unembedding is token_embd");
    cr_expect(fabs(c->rope_theta - 1e5) < 1e-3, "rope_theta %g", c->rope_theta);
    cr_expect_eq(c->rope_kind, LP_ROPE_DEFAULT);
    cr_expect_eq(lp_hook_count(m), 1 + 20 * 30 + 2 + 2);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(smollm2, logits_and_hooks_match_hf_float64) {
    lp_st_file ref;
    lp_model *m = load_smollm2(&ref);
    const int V = 49152;
    for (int h = 0; h < SMOL_N_HOOKS; h++) cr_assert_eq(lp_hook_capture(m, SMOL_HOOKS[h], NULL, 0, NULL), LP_OK, "%s", lp_last_error());
    for (int p = 0; p < SMOL_N_PROMPTS; p++) {
        const lp_st_tensor *tok = Rp(&ref, p, "tokens");
        int Tp = (int)tok->shape[1];
        cr_assert_eq(lp_model_forward(m, tok->data, 1, Tp, LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
        const float *lg = lp_model_logits(m);
        const lp_st_tensor *pt = Rp(&ref, p, "logit_pos");
        const int32_t *pos = pt->data;
        int np = (int)pt->shape[0];
        const float *want = Rp(&ref, p, "logits")->data, *margin = Rp(&ref, p, "logit_margin")->data;
        float *got = malloc(np * (size_t)V * sizeof(float));
        for (int i = 0; i < np; i++) memcpy(got + (size_t)i * V, lg + (size_t)pos[i] * V, V * sizeof(float));
        char what[96];
        snprintf(what, sizeof what, "p%d logits at position %d%s", p, pos[np - 1], np > 1 ? " and before" : "");
        LP_EXPECT_WITHIN(what, 0, lp_compare_f(got, want, np * (size_t)V), max_rel, SMOL_LOGITS_MAX_REL);
        /* top-1 agrees wherever the float64 margin is above fp32 noise */
        for (int i = 0; i < np; i++) {
            if (margin[i] < 1e-2f) continue;
            int a = 0, b = 0;
            for (int v = 1; v < V; v++) {
                if (got[(size_t)i * V + v] > got[(size_t)i * V + a]) a = v;
                if (want[(size_t)i * V + v] > want[(size_t)i * V + b]) b = v;
            }
            cr_expect_eq(a, b, "p%d pos %d: top-1 %d, reference %d (margin %.4f)", p, pos[i], a, b, margin[i]);
        }
        free(got);
        for (int h = 0; h < SMOL_N_HOOKS; h++) {
            const lp_st_tensor *r = Rp(&ref, p, SMOL_HOOKS[h]);
            size_t n = r->nbytes / 4;
            lp_tensor t;
            cr_assert_eq(lp_capture_get(m, SMOL_HOOKS[h], &t), LP_OK, "%s", lp_last_error());
            cr_assert_eq(t.ndim, r->ndim, "%s: rank %d, reference %d", SMOL_HOOKS[h], t.ndim, r->ndim);
            for (int d = 0; d < t.ndim; d++)
                cr_assert_eq(t.shape[d], r->shape[d], "p%d %s: dim %d = %lld, reference %lld", p, SMOL_HOOKS[h], d,
                             (long long)t.shape[d], (long long)r->shape[d]);
            snprintf(what, sizeof what, "p%d %s", p, SMOL_HOOKS[h]);
            LP_EXPECT_WITHIN(what, 0, lp_compare_f(t.data, r->data, n), nmse, SMOL_HOOK_NMSE);
        }
    }
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(smollm2, greedy_continuation_matches_hf_float64) {
    lp_st_file ref;
    lp_model *m = load_smollm2(&ref);
    int done = 0;
    for (int p = 0; p < SMOL_N_PROMPTS; p++) {
        char k[64];
        snprintf(k, sizeof k, "p%d.greedy.tokens", p);
        const lp_st_tensor *g = lp_st_find(&ref, k);
        if (!g) continue;
        const lp_st_tensor *tok = Rp(&ref, p, "tokens");
        snprintf(k, sizeof k, "smollm2 p%d", p);
        expect_greedy(k, m, tok->data, (int)tok->shape[1], g->data, Rp(&ref, p, "greedy.margin")->data, (int)g->shape[0]);
        done++;
    }
    cr_expect_eq(done, 2, "the fixture should hold two greedy continuations");
    lp_model_free(m);
    lp_st_close(&ref);
}
