/* test_tl.c: loupe's hooks against TransformerLens 3.x itself, on the CPU (F32).
 *
 * Fixtures: tests/fixtures/tl/NAME.safetensors (tests/gen/gen_tl_fixture.py, pinned in
 * tests/gen/requirements-tl.txt: transformer-lens 3.9.0). TransformerLens's HookedTransformer,
 * built with its own config and weight conversion and no weight processing
 * (from_pretrained_no_processing semantics) from the committed gpt2-tiny, llama-tiny (GQA 4/2),
 * qwen2-tiny (GQA 4/1, q/k/v biases) and mistral-tiny checkpoints, ran run_with_cache in
 * float64 on each one's tokens: every hook it fired is recorded, with the mean loss.
 *
 * For each family the set of hook names must be the same on both sides: TransformerLens fires
 * no hook in a default forward that loupe lacks, and loupe has none that TransformerLens does
 * not fire, so there are no exceptions to list. (HookedTransformer also defines
 * blocks.L.hook_attn_in, hook_q_input, hook_k_input, hook_v_input, hook_mlp_in and
 * attn.hook_result, which fire only with use_attn_in, use_split_qkv_input, use_hook_mlp_in
 * and use_attn_result set; neither side has them in a default forward.) Every shape must
 * match, every value must be within the model tests' budget (nmse <= 1e-9, as test_gpt2.c and
 * test_llama.c against Hugging Face; -inf masked scores must match exactly), and the loss
 * within 1e-4.
 *
 * TransformerLens 2.x placed hook_normalized after the norm's weight and bias; 3.x (and loupe)
 * before. `placement_is_discriminated` shows the fixture tells the two apart: there, the
 * value after the final norm's weight (unembed.hook_in) is far outside the budget from
 * ln_final.hook_normalized. */
#include "loupe/hooks.h"
#include "loupe/safetensors.h"
#include "testutil.h"

static const double HOOK_NMSE = 1e-9;
static const double LOSS_ABS = 1e-4;

static const char *const FAMILIES[] = {"gpt2-tiny", "llama-tiny", "qwen2-tiny", "mistral-tiny"};
enum { N_FAMILIES = sizeof FAMILIES / sizeof *FAMILIES };

static void open_tl(lp_st_file *ref, const char *name) {
    char p[512];
    snprintf(p, sizeof p, "%s/tl/%s.safetensors", LP_FIXTURES, name);
    cr_assert_eq(lp_st_open(ref, p), LP_OK, "%s", lp_last_error());
}

static const lp_st_tensor *R(const lp_st_file *ref, const char *name) {
    const lp_st_tensor *t = lp_st_find(ref, name);
    cr_assert(t != NULL, "%s: TransformerLens did not record %s", ref->path, name);
    return t;
}

static int is_meta_key(const char *k) { return strcmp(k, "loss") == 0 || strcmp(k, "tokens") == 0; }

static lp_model *load(const char *name) {
    char d[512];
    snprintf(d, sizeof d, "%s/%s", LP_FIXTURES, name);
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, d, LP_CPU, LP_F32), LP_OK, "%s: %s", name, lp_last_error());
    return m;
}

/* Mean next-token loss of the last forward over every predicted position. */
static double mean_loss(lp_model *m, int B, int T) {
    const float *l = lp_model_losses(m);
    cr_assert(l != NULL);
    double s = 0;
    for (int i = 0; i < B * (T - 1); i++) s += l[i];
    return s / (B * (T - 1));
}

/* The names: every TransformerLens hook is a loupe hook, and the counts agree. */
static void same_names(const char *name, lp_model *m, const lp_st_file *ref) {
    int n_tl = 0;
    for (int i = 0; i < ref->n; i++) {
        const char *k = ref->tensors[i].name;
        if (is_meta_key(k)) continue;
        n_tl++;
        cr_expect(lp_hook_find(m, k) >= 0, "%s: TransformerLens fires %s, loupe has no such hook", name, k);
    }
    for (int id = 0; id < lp_hook_count(m); id++)
        cr_expect(lp_st_find(ref, lp_hook_name(m, id)) != NULL, "%s: loupe has %s, TransformerLens does not fire it", name,
                  lp_hook_name(m, id));
    cr_expect_eq(n_tl, lp_hook_count(m), "%s: TransformerLens fired %d hooks, loupe has %d", name, n_tl, lp_hook_count(m));
}

static void parity(const char *name) {
    lp_st_file ref;
    open_tl(&ref, name);
    lp_model *m = load(name);
    same_names(name, m, &ref);
    const lp_st_tensor *tok = R(&ref, "tokens");
    cr_assert_eq(tok->dtype, LP_I32);
    int B = (int)tok->shape[0], T = (int)tok->shape[1];
    cr_assert_eq(lp_hook_capture(m, "*", NULL, 0, NULL), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_forward(m, tok->data, B, T, LP_WANT_LOSS), LP_OK, "%s", lp_last_error());
    int compared = 0;
    for (int id = 0; id < lp_hook_count(m); id++) {
        const char *h = lp_hook_name(m, id);
        const lp_st_tensor *r = lp_st_find(&ref, h);
        if (!r) continue; /* reported by same_names */
        char what[160];
        snprintf(what, sizeof what, "%s %s", name, h);
        int64_t shape[LP_MAX_DIMS];
        int nd = lp_hook_shape(m, id, B, T, shape);
        cr_expect_eq(nd, r->ndim, "%s: lp_hook_shape rank %d, TransformerLens %d", what, nd, r->ndim);
        for (int d = 0; d < nd && d < r->ndim; d++)
            cr_expect_eq(shape[d], r->shape[d], "%s: lp_hook_shape dim %d = %lld, TransformerLens %lld", what, d, (long long)shape[d],
                         (long long)r->shape[d]);
        lp_tensor t;
        cr_assert_eq(lp_capture_get(m, h, &t), LP_OK, "%s", lp_last_error());
        cr_assert_eq(t.ndim, r->ndim, "%s: capture rank %d, TransformerLens %d", what, t.ndim, r->ndim);
        for (int d = 0; d < t.ndim; d++)
            cr_assert_eq(t.shape[d], r->shape[d], "%s: capture dim %d = %lld, TransformerLens %lld", what, d, (long long)t.shape[d],
                         (long long)r->shape[d]);
        LP_EXPECT_WITHIN(what, 0, lp_compare_f(t.data, r->data, r->nbytes / 4), nmse, HOOK_NMSE);
        compared++;
    }
    cr_expect_eq(compared, lp_hook_count(m), "%s: compared %d of %d hooks", name, compared, lp_hook_count(m));
    double want = *(const float *)R(&ref, "loss")->data, got = mean_loss(m, B, T);
    fprintf(stderr, "  %-40s loss %.6f, TransformerLens %.6f\n", name, got, want);
    cr_expect(fabs(got - want) <= LOSS_ABS, "%s: loss %.6f, TransformerLens %.6f", name, got, want);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(tl, gpt2_tiny) { parity("gpt2-tiny"); }
Test(tl, llama_tiny_gqa) { parity("llama-tiny"); }
Test(tl, qwen2_tiny_mqa) { parity("qwen2-tiny"); }
Test(tl, mistral_tiny) { parity("mistral-tiny"); }

/* hook_normalized before the weight (3.x) and after it (2.x, = unembed.hook_in for the final
 * norm of these models, whose unembedding has no bias to fold) differ far beyond the budget. */
Test(tl, placement_is_discriminated) {
    for (int f = 0; f < N_FAMILIES; f++) {
        lp_st_file ref;
        open_tl(&ref, FAMILIES[f]);
        const lp_st_tensor *pre = R(&ref, "ln_final.hook_normalized"), *post = R(&ref, "unembed.hook_in");
        lp_cmp c = lp_compare_f(pre->data, post->data, post->nbytes / 4);
        cr_expect_gt(c.nmse, 1e3 * HOOK_NMSE, "%s: ln_final.hook_normalized and unembed.hook_in agree (nmse %.3e)", FAMILIES[f], c.nmse);
        lp_st_close(&ref);
    }
}

/* An edit of unembed.hook_out is what the loss is computed from, and what the capture at the
 * same hook records: steering the logits by v at every position gives TransformerLens's
 * logits + v there, and the cross-entropy of those (computed here in double). */
static void steer_logits(const char *name) {
    lp_st_file ref;
    open_tl(&ref, name);
    lp_model *m = load(name);
    const lp_st_tensor *tok = R(&ref, "tokens"), *lg = R(&ref, "unembed.hook_out");
    int B = (int)tok->shape[0], T = (int)tok->shape[1], V = lp_model_config(m)->d_vocab;
    float *v = lp_test_rand(V, 21, -3, 3);
    lp_edit_spec e = {.kind = LP_EDIT_ADD, .src = v, .src_len = V, .coef = 1.0f};
    cr_assert_eq(lp_hook_edit(m, "unembed.hook_out", &e), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_hook_capture(m, "unembed.hook_out", NULL, 0, NULL), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_forward(m, tok->data, B, T, LP_WANT_LOSS | LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
    size_t n = (size_t)B * T * V;
    double *want = malloc(n * sizeof(double)), loss = 0;
    const float *l0 = lg->data;
    const int32_t *ids = tok->data;
    for (size_t i = 0; i < n; i++) want[i] = (double)l0[i] + v[i % V];
    for (int b = 0; b < B; b++)
        for (int t = 0; t + 1 < T; t++) {
            const double *row = want + ((size_t)b * T + t) * V;
            double mx = -INFINITY, z = 0;
            for (int k = 0; k < V; k++) mx = fmax(mx, row[k]);
            for (int k = 0; k < V; k++) z += exp(row[k] - mx);
            loss += mx + log(z) - row[ids[b * T + t + 1]];
        }
    loss /= B * (T - 1);
    lp_tensor t;
    cr_assert_eq(lp_capture_get(m, "unembed.hook_out", &t), LP_OK, "%s", lp_last_error());
    char what[96];
    snprintf(what, sizeof what, "%s steered unembed.hook_out", name);
    LP_EXPECT_WITHIN(what, 21, lp_compare(t.data, want, n), nmse, HOOK_NMSE);
    snprintf(what, sizeof what, "%s steered logits", name);
    LP_EXPECT_WITHIN(what, 21, lp_compare(lp_model_logits(m), want, n), nmse, HOOK_NMSE);
    double got = mean_loss(m, B, T), plain = *(const float *)R(&ref, "loss")->data;
    fprintf(stderr, "  %-40s loss %.6f, expected %.6f (unsteered %.6f)\n", what, got, loss, plain);
    cr_expect(fabs(got - loss) <= LOSS_ABS, "%s: loss %.6f, expected %.6f", name, got, loss);
    cr_expect(fabs(plain - loss) > 100 * LOSS_ABS, "%s: the steer does not move the loss (%.6f vs %.6f)", name, plain, loss);
    free(want), free(v);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(tl, steering_the_logits_changes_the_loss_gpt2) { steer_logits("gpt2-tiny"); }
Test(tl, steering_the_logits_changes_the_loss_llama) { steer_logits("llama-tiny"); }

/* The whole [B, T, d_vocab] logits are kept only while unembed.hook_out is hooked: a vocabulary
 * large enough that B x T rows of logits exceed the 64 MiB chunk the unembedding otherwise
 * works in. Hooking it (with an edit that adds zero) grows the activation memory by at least
 * the rows beyond the chunk, and gives the same loss as the chunked pass. */
Test(tl, logits_whole_only_while_hooked) {
    lp_config cfg = {.arch = LP_ARCH_GPT2, .n_layers = 1, .d_model = 16, .n_heads = 2, .d_mlp = 32, .n_ctx = 64, .d_vocab = 140000};
    lp_model *m;
    cr_assert_eq(lp_model_random(&m, &cfg, 5, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    enum { B = 2, T = 64 };
    int32_t tok[B * T];
    uint64_t s = 6;
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)(lp_test_next(&s) % (uint64_t)cfg.d_vocab);
    cr_assert_eq(lp_model_forward(m, tok, B, T, LP_WANT_LOSS), LP_OK, "%s", lp_last_error());
    double chunked = mean_loss(m, B, T);
    size_t plain = lp_model_device_bytes(m), whole = (size_t)B * T * cfg.d_vocab * sizeof(float), chunk = (size_t)64 << 20;
    float *zero = calloc(cfg.d_vocab, sizeof(float));
    lp_edit_spec e = {.kind = LP_EDIT_ADD, .src = zero, .src_len = cfg.d_vocab, .coef = 1.0f};
    cr_assert_eq(lp_hook_edit(m, "unembed.hook_out", &e), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_forward(m, tok, B, T, LP_WANT_LOSS), LP_OK, "%s", lp_last_error());
    size_t hooked = lp_model_device_bytes(m);
    double got = mean_loss(m, B, T);
    fprintf(stderr, "  %-40s %zu -> %zu bytes; loss %.6f chunked, %.6f whole\n", "unembed.hook_out hooked", plain, hooked, chunked, got);
    cr_expect_geq(hooked, plain + (whole - chunk), "whole logits: %zu bytes, before %zu", hooked, plain);
    cr_expect(fabs(got - chunked) <= 1e-5 * fabs(chunked), "loss %.7f whole, %.7f chunked", got, chunked);
    free(zero);
    lp_model_free(m);
}
