/* test_steer.c: edits active while generating. For every kind of edit, greedy generation
 * with the KV cache must pick the same tokens, from the same logits, as forwards over the
 * whole growing sequence without the cache and with the same edit, token by token; and
 * the edit must change what is generated (or, restricted to new tokens, leave the prompt
 * pass alone). On the gpt2-tiny and llama-tiny fixtures, CPU F32. */
#include "testutil.h"

#include "loupe/hooks.h"
#include "loupe/model.h"
#include "loupe/sae.h"
#include "sae/sae_internal.h"

enum { P = 7, NEW = 10, MAXV = 1024 };

typedef struct { const char *name, *dir; } fixture;
static const fixture GPT2 = {"gpt2-tiny", LP_FIXTURES "/gpt2-tiny"};
static const fixture LLAMA = {"llama-tiny", LP_FIXTURES "/llama-tiny"};

/* The same cache-versus-recompute agreement the plain generation tests rely on: F32 on
 * the CPU, two layers; the cached step sums in a different order (one row, the cache's
 * keys), so logits agree to rounding, not bit for bit. */
#define LOGITS_MAX_REL 2e-5

static lp_model *load(const fixture *f) {
    lp_model *m = NULL;
    cr_assert_eq(lp_model_load(&m, f->dir, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    return m;
}

static void prompt_ids(const lp_model *m, int32_t *ids, int n, uint64_t seed) {
    uint64_t s = seed;
    for (int i = 0; i < n; i++) ids[i] = (int32_t)(lp_test_next(&s) % (uint64_t)lp_model_config(m)->d_vocab);
}

/* A case installs its edits for sequences of T positions (T matters only to a patch,
 * whose source in a plain forward must cover the batch). */
typedef struct scase scase;
struct scase {
    const char *what;
    void (*install)(lp_model *m, scase *k, int T);
    int new_only; /* the edit touches only new tokens: the prompt pass is unchanged */
    float *vec, *src;
    int n_src;
    sae_runner *sae;
};

typedef struct { float logits[NEW][MAXV]; int V; } rec;
static lp_status record(int step, const float *l, int V, void *user) {
    rec *r = user;
    cr_assert(V <= MAXV && step < NEW);
    memcpy(r->logits[step], l, V * sizeof(float));
    r->V = V;
    return LP_OK;
}

static int argmax(const float *l, int V) {
    int b = 0;
    for (int v = 1; v < V; v++)
        if (l[v] > l[b]) b = v;
    return b;
}

static void gen(lp_model *m, const int32_t *prompt, int32_t *out, rec *r) {
    lp_gen_opts o = {.max_tokens = NEW, .temperature = 0, .top_p = 1, .stop_token = -1, .on_logits = record, .user = r};
    int n = 0;
    cr_assert_eq(lp_generate(m, prompt, P, &o, out, &n), LP_OK, "%s", lp_last_error());
    cr_assert_eq(n, NEW);
}

static void run_case(const fixture *f, scase *k) {
    lp_model *m = load(f);
    int V = lp_model_config(m)->d_vocab;
    int32_t prompt[P], out[NEW], base_out[NEW], seq[P + NEW];
    prompt_ids(m, prompt, P, 11);
    static rec r, base;
    gen(m, prompt, base_out, &base);
    k->install(m, k, 0);
    gen(m, prompt, out, &r);
    /* the reference: a forward over the whole sequence so far for every step */
    memcpy(seq, prompt, sizeof prompt);
    lp_cmp worst = {0};
    for (int i = 0; i < NEW; i++) {
        lp_hooks_clear(m);
        k->install(m, k, P + i);
        cr_assert_eq(lp_model_forward(m, seq, 1, P + i, LP_WANT_LOGITS), LP_OK, "%s: %s", k->what, lp_last_error());
        const float *l = lp_model_logits(m) + (size_t)(P + i - 1) * V;
        seq[P + i] = argmax(l, V);
        cr_assert_eq(out[i], seq[P + i], "%s %s: step %d: cached %d, recomputed %d", f->name, k->what, i, out[i], seq[P + i]);
        lp_cmp c = lp_compare_f(r.logits[i], l, V);
        if (c.max_rel >= worst.max_rel) worst = c;
        cr_expect(c.n_bad == 0);
    }
    char what[128];
    snprintf(what, sizeof what, "%s %s", f->name, k->what);
    LP_EXPECT_WITHIN(what, 11, worst, max_rel, LOGITS_MAX_REL);
    /* the edit did something, where it should */
    lp_cmp first = lp_compare_f(r.logits[0], base.logits[0], V), last = lp_compare_f(r.logits[NEW - 1], base.logits[NEW - 1], V);
    if (k->new_only) cr_expect(first.max_abs == 0, "%s: an edit of new tokens changed the prompt pass (%g)", what, first.max_abs);
    else cr_expect(first.max_rel > 1e-3, "%s: the edit barely changed the first step's logits (%g)", what, first.max_rel);
    cr_expect(last.max_rel > 1e-3, "%s: the edit barely changed the last step's logits (%g)", what, last.max_rel);
    lp_hooks_clear(m);
    if (k->sae) {
        lp_sae *s = k->sae->s;
        sae_runner_free(k->sae);
        lp_sae_free(s, lp_model_ctx(m));
    }
    free(k->vec);
    free(k->src);
    lp_model_free(m);
}

/* ---- the cases ---- */

static void edit(lp_model *m, const char *hook, lp_edit_spec e) {
    cr_assert_eq(lp_hook_edit(m, hook, &e), LP_OK, "%s: %s", hook, lp_last_error());
}

static float *vec(lp_model *m, scase *k, uint64_t seed) {
    if (!k->vec) k->vec = lp_test_rand(lp_model_config(m)->d_model, seed, -1, 1);
    return k->vec;
}

static void steer_all(lp_model *m, scase *k, int T) {
    int D = lp_model_config(m)->d_model;
    edit(m, "blocks.0.hook_resid_post", (lp_edit_spec){.kind = LP_EDIT_ADD, .src = vec(m, k, 5), .src_len = D, .coef = 4});
}

static void steer_new(lp_model *m, scase *k, int T) {
    int D = lp_model_config(m)->d_model, n_ctx = lp_model_config(m)->n_ctx, pos[1024], n = 0;
    for (int p = P; p < n_ctx; p++) pos[n++] = p;
    edit(m, "blocks.1.hook_resid_pre",
         (lp_edit_spec){.kind = LP_EDIT_ADD, .src = vec(m, k, 6), .src_len = D, .coef = 4, .pos = pos, .npos = n});
}

static void zero_z(lp_model *m, scase *k, int T) {
    int pos[] = {2, P, P + 3}, head[] = {1};
    edit(m, "blocks.0.attn.hook_z", (lp_edit_spec){.kind = LP_EDIT_ZERO, .pos = pos, .npos = 3, .heads = head, .nheads = 1});
}

/* the cache keeps the edited value: later tokens attend to it */
static void zero_v(lp_model *m, scase *k, int T) {
    int pos[] = {0, 1, P + 1}, head[] = {0};
    edit(m, "blocks.0.attn.hook_v", (lp_edit_spec){.kind = LP_EDIT_ZERO, .pos = pos, .npos = 3, .heads = head, .nheads = 1});
}

/* needs the pattern: every step recomputes the sequence */
static void zero_pattern(lp_model *m, scase *k, int T) {
    int pos[] = {P - 1, P + 2}, head[] = {0, 2};
    edit(m, "blocks.1.attn.hook_pattern", (lp_edit_spec){.kind = LP_EDIT_ZERO, .pos = pos, .npos = 2, .heads = head, .nheads = 2});
}

static void steer_logits(lp_model *m, scase *k, int T) {
    int V = lp_model_config(m)->d_vocab;
    if (!k->vec) k->vec = lp_test_rand(V, 9, -1, 1);
    edit(m, "unembed.hook_out", (lp_edit_spec){.kind = LP_EDIT_ADD, .src = k->vec, .src_len = V, .coef = 3});
}

/* resid_pre of layer 1 at three positions from a run on another prompt: a source of P
 * positions for generation (T = 0), padded to T for a plain forward (never read there) */
static void patch_resid(lp_model *m, scase *k, int T) {
    int D = lp_model_config(m)->d_model;
    const char *hook = "blocks.1.hook_resid_pre";
    if (!k->src) {
        int32_t other[P];
        prompt_ids(m, other, P, 99);
        cr_assert_eq(lp_hook_capture(m, hook, NULL, 0, NULL), LP_OK);
        cr_assert_eq(lp_model_forward(m, other, 1, P, 0), LP_OK, "%s", lp_last_error());
        k->src = calloc((size_t)(P + NEW) * D, sizeof(float));
        cr_assert_eq(lp_capture_read_f32(m, hook, k->src, (size_t)P * D), LP_OK, "%s", lp_last_error());
        lp_hooks_clear(m);
    }
    int pos[] = {0, 3, P - 1};
    edit(m, hook, (lp_edit_spec){.kind = LP_EDIT_PATCH, .src = k->src, .src_len = (size_t)(T ? T : P) * D, .pos = pos, .npos = 3});
}

/* the SAE runner's forward in place of the activation, as eval-sae splices it */
static lp_status splice(const char *hook, lp_tensor *act, void *user) {
    sae_runner *r = user;
    int64_t numel = lp_shape_numel(act->shape, act->ndim);
    cr_assert(numel % r->D == 0 && numel / r->D <= r->N);
    memcpy(r->x, act->data, numel * sizeof(float));
    LP_CHECK(sae_runner_forward(r, (int)(numel / r->D), 0));
    memcpy(act->data, r->xhat, numel * sizeof(float));
    return LP_OK;
}

static void sae_splice(lp_model *m, scase *k, int T) {
    if (!k->sae) {
        int D = lp_model_config(m)->d_model;
        lp_sae_cfg cf = {.arch = LP_SAE_STANDARD, .d_in = D, .d_sae = 4 * D, .d_out = D, .apply_b_dec_to_input = 1};
        snprintf(cf.normalize, sizeof cf.normalize, "none");
        lp_sae *s;
        cr_assert_eq(lp_sae_alloc(&s, &cf, lp_model_ctx(m)), LP_OK, "%s", lp_last_error());
        lp_test_fill(s->W_enc, (size_t)D * cf.d_sae, 21, -0.3f, 0.3f);
        lp_test_fill(s->b_enc, cf.d_sae, 22, -0.2f, 0.1f);
        lp_test_fill(s->W_dec, (size_t)cf.d_sae * D, 23, -0.15f, 0.15f);
        lp_test_fill(s->b_dec, D, 24, -0.1f, 0.1f);
        cr_assert_eq(sae_runner_new(&k->sae, s, lp_model_ctx(m), lp_model_config(m)->n_ctx, 0, 0), LP_OK, "%s", lp_last_error());
    }
    edit(m, "blocks.0.hook_resid_post", (lp_edit_spec){.fn = splice, .user = k->sae});
}

/* a callback that depends on the absolute position: scales row i by 1 + (first + i) % 3 / 2 */
static lp_status by_position(const char *hook, lp_tensor *act, void *user) {
    lp_model *m = user;
    int first = lp_hook_first_pos(m), n = (int)act->shape[1], D = (int)act->shape[2];
    float *x = act->data;
    for (int i = 0; i < n; i++)
        for (int d = 0; d < D; d++) x[(size_t)i * D + d] *= 1.0f + (float)((first + i) % 3) * 0.5f;
    return LP_OK;
}

static void callback(lp_model *m, scase *k, int T) {
    edit(m, "blocks.0.hook_mlp_out", (lp_edit_spec){.fn = by_position, .user = m});
}

#define CASES(f, tag)                                                                                        \
    Test(steer, steer_all_##tag) { run_case(&f, &(scase){"steer resid_post, all positions", steer_all}); }    \
    Test(steer, steer_new_##tag) { run_case(&f, &(scase){"steer resid_pre, new tokens", steer_new, 1}); }     \
    Test(steer, zero_z_##tag) { run_case(&f, &(scase){"zero z head 1 at 3 positions", zero_z}); }            \
    Test(steer, zero_v_##tag) { run_case(&f, &(scase){"zero v head 0 at 3 positions", zero_v}); }            \
    Test(steer, zero_pattern_##tag) { run_case(&f, &(scase){"zero pattern at 2 queries", zero_pattern}); }    \
    Test(steer, steer_logits_##tag) { run_case(&f, &(scase){"steer unembed.hook_out", steer_logits}); }      \
    Test(steer, patch_resid_##tag) { run_case(&f, &(scase){"patch resid_pre at 3 positions", patch_resid}); } \
    Test(steer, sae_splice_##tag) { run_case(&f, &(scase){"SAE splice at resid_post", sae_splice}); }         \
    Test(steer, callback_##tag) { run_case(&f, &(scase){"callback by absolute position", callback}); }

CASES(GPT2, gpt2_tiny)
CASES(LLAMA, llama_tiny)

/* A patch that generation would outrun is refused before any work, naming the hook. */
Test(steer, patch_past_its_source_is_refused) {
    lp_model *m = load(&GPT2);
    int D = lp_model_config(m)->d_model;
    float *src = lp_test_rand((size_t)P * D, 3, -1, 1);
    edit(m, "blocks.0.hook_resid_post", (lp_edit_spec){.kind = LP_EDIT_PATCH, .src = src, .src_len = (size_t)P * D});
    int32_t prompt[P], out[NEW];
    prompt_ids(m, prompt, P, 11);
    int n = -1;
    lp_gen_opts o = {.max_tokens = NEW, .top_p = 1, .stop_token = -1};
    cr_expect_eq(lp_generate(m, prompt, P, &o, out, &n), LP_ERR_ARG);
    cr_expect_eq(n, 0);
    cr_expect(strstr(lp_last_error(), "blocks.0.hook_resid_post") && strstr(lp_last_error(), "position 7"), "%s", lp_last_error());
    /* restricted to the positions it covers, the same source is fine; zero new tokens too */
    lp_hooks_clear(m);
    int pos[] = {1, 2};
    edit(m, "blocks.0.hook_resid_post",
         (lp_edit_spec){.kind = LP_EDIT_PATCH, .src = src, .src_len = (size_t)P * D, .pos = pos, .npos = 2});
    cr_expect_eq(lp_generate(m, prompt, P, &o, out, &n), LP_OK, "%s", lp_last_error());
    cr_expect_eq(n, NEW);
    /* a patch of the pattern grows with the sequence: refused */
    lp_hooks_clear(m);
    int H = lp_model_config(m)->n_heads;
    float *pat = calloc((size_t)H * P * P, sizeof(float));
    edit(m, "blocks.0.attn.hook_pattern", (lp_edit_spec){.kind = LP_EDIT_PATCH, .src = pat, .src_len = (size_t)H * P * P});
    cr_expect_eq(lp_generate(m, prompt, P, &o, out, &n), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "hook_pattern"), "%s", lp_last_error());
    /* captures are not taken while generating, and the last forward's are not offered after it */
    lp_hooks_clear(m);
    cr_assert_eq(lp_hook_capture(m, "blocks.0.hook_resid_post", NULL, 0, NULL), LP_OK);
    cr_assert_eq(lp_generate(m, prompt, P, &o, out, &n), LP_OK, "%s", lp_last_error());
    lp_tensor t;
    cr_expect_eq(lp_capture_get(m, "blocks.0.hook_resid_post", &t), LP_ERR_NOT_FOUND);
    free(pat);
    free(src);
    lp_model_free(m);
}
