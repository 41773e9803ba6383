/* test_gemma_real.c: Gemma 3 270M from its GGUF (models/gemma-3-270m-q4_k_m.gguf, fetched by
 * `make model-gemma`; every test skips, saying why, when it is absent) on the CPU in F32,
 * against Hugging Face transformers run on the same weights.
 *
 * Fixture: tests/fixtures/gemma3-270m/reference.safetensors (tests/gen/gen_gemma_real_fixture.py,
 * pinned in tests/gen/requirements-gemma.txt). transformers 5.25 loads the GGUF itself,
 * dequantizing every tensor with gguf-py, which loupe's dequantizers match bit for bit
 * (test_gemma_gguf.c); the generator checks every parameter against gguf-py. The references
 * are HF's float64 run (float32 islands removed); HF's own float32 run of the same weights is
 * recorded beside them as the calibration: it is what an independent float32 implementation
 * lands at.
 *
 *   text    a 78-token English paragraph (<bos> first): the mean next-token loss over its 77
 *           predictions within 1e-4 of HF float64's (HF float32: 9.4e-8 off; loupe sums in
 *           another order, so three orders of magnitude of room), each prediction's loss within
 *           1e-3 (HF float32: at most 8.5e-6 off).
 *   prompt  "<bos>The capital of France is": loupe's logits at the last position, at the 64
 *           ids HF float64 ranks highest, max |loupe - HF| <= 1e-4 * max |HF| (about 2e-3 on
 *           logits near 19; HF float32: 4.4e-7 of it); loupe's own top-1 is HF's (float64
 *           margin 0.54); the logsumexp of loupe's whole row of 262144 logits within 1e-3 of
 *           HF's (every logit, not only the top 64, enters it).
 *   greedy  12 tokens from the prompt (" the capital of the country of France. It is the
 *           largest") with the KV cache, token by token against HF float64's greedy
 *           continuation. A step may pick another token only where HF's float64 top-1 minus
 *           top-2 margin is below 1e-2: more than twice the logit error the budget above
 *           allows, and far above HF float32's (8.4e-6 on the top logits); from such a step
 *           on the two texts differ legitimately and nothing more is compared. This
 *           fixture's smallest margin is 0.014 (the last step), so all 12 must agree. */
#include <unistd.h>

#include "loupe/hooks.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#define GEMMA "models/gemma-3-270m-q4_k_m.gguf"
#define REF LP_FIXTURES "/gemma3-270m/reference.safetensors"

static const double LOSS_ABS = 1e-4;
static const double TOKEN_LOSS_ABS = 1e-3;
static const double LOGITS_MAX_REL = 1e-4;
static const double LSE_ABS = 1e-3;
static const float GREEDY_TIE = 1e-2f;
enum { VOCAB = 262144 };

static const lp_st_tensor *R(const lp_st_file *ref, const char *name) {
    const lp_st_tensor *t = lp_st_find(ref, name);
    cr_assert(t != NULL, "reference tensor %s missing from %s", name, ref->path);
    return t;
}

static lp_model *load(lp_st_file *ref) {
    if (access(GEMMA, R_OK) != 0) cr_skip_test("%s is absent (make model-gemma fetches it)", GEMMA);
    cr_assert_eq(lp_st_open(ref, REF), LP_OK, "%s", lp_last_error());
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, GEMMA, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    return m;
}

Test(gemma_real, config_from_gguf) {
    lp_st_file ref;
    lp_model *m = load(&ref);
    const lp_config *c = lp_model_config(m);
    cr_expect(c->n_layers == 18 && c->d_model == 640 && c->n_heads == 4 && c->n_kv_heads == 1 && c->d_head == 256 &&
                  c->d_mlp == 2048 && c->d_vocab == VOCAB,
              "layers %d d_model %d heads %d/%d d_head %d d_mlp %d vocab %d", c->n_layers, c->d_model, c->n_heads, c->n_kv_heads,
              c->d_head, c->d_mlp, c->d_vocab);
    cr_expect(c->tied_unembed, "the GGUF has no output.weight: the unembedding is token_embd");
    cr_expect(fabsf(c->ln_eps - 1e-6f) <= 1e-9f, "ln_eps %g", c->ln_eps);
    /* TransformerLens's Gemma 3 hooks: 28 per block (test_gemma.c) */
    cr_expect_eq(lp_hook_count(m), 1 + 28 * 18 + 4, "%d hooks", lp_hook_count(m));
    cr_expect(lp_hook_find(m, "blocks.17.attn.q_norm.hook_scale") >= 0 && lp_hook_find(m, "blocks.0.ln2_post.hook_normalized") >= 0,
              "Gemma 3 hooks");
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(gemma_real, text_loss_matches_hf) {
    lp_st_file ref;
    lp_model *m = load(&ref);
    const lp_st_tensor *tok = R(&ref, "text.tokens");
    int T = (int)tok->shape[1];
    cr_assert_eq(((const int32_t *)tok->data)[0], 2, "the text starts with <bos>");
    cr_assert_eq(lp_model_forward(m, tok->data, 1, T, LP_WANT_LOSS), LP_OK, "%s", lp_last_error());
    const float *l = lp_model_losses(m), *want = R(&ref, "text.token_loss")->data;
    cr_assert(l != NULL);
    double sum = 0, worst = 0;
    int at = 0;
    for (int t = 0; t < T - 1; t++) {
        sum += l[t];
        if (!(fabs(l[t] - want[t]) <= worst)) worst = fabs(l[t] - want[t]), at = t;
    }
    double got = sum / (T - 1), ref64 = *(const double *)R(&ref, "text.loss")->data, ref32 = *(const double *)R(&ref, "text.loss_f32")->data;
    fprintf(stderr, "  %-40s loss %.7f, HF float64 %.7f (|diff| %.2e of %.0e; HF float32 %.2e); per token at most %.2e of %.0e\n",
            "gemma-3-270m text", got, ref64, fabs(got - ref64), LOSS_ABS, fabs(ref32 - ref64), worst, TOKEN_LOSS_ABS);
    cr_expect(fabs(got - ref64) <= LOSS_ABS, "loss %.7f, HF float64 %.7f", got, ref64);
    cr_expect(worst <= TOKEN_LOSS_ABS, "prediction %d: loss %.6f, HF float64 %.6f", at, l[at], want[at]);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(gemma_real, prompt_logits_match_hf) {
    lp_st_file ref;
    lp_model *m = load(&ref);
    const lp_st_tensor *p = R(&ref, "prompt.tokens"), *ids = R(&ref, "prompt.top_ids");
    int P = (int)p->shape[0], K = (int)ids->shape[0];
    cr_assert_eq(lp_model_forward(m, p->data, 1, P, LP_WANT_LOGITS), LP_OK, "%s", lp_last_error());
    const float *row = lp_model_logits(m) + (size_t)(P - 1) * VOCAB;
    const int32_t *id = ids->data;
    const double *want = R(&ref, "prompt.top_logits")->data;
    float *got = malloc(K * sizeof(float));
    for (int k = 0; k < K; k++) got[k] = row[id[k]];
    LP_EXPECT_WITHIN("gemma-3-270m prompt top-64 logits", 0, lp_compare(got, want, K), max_rel, LOGITS_MAX_REL);
    int a = 0;
    for (int v = 1; v < VOCAB; v++)
        if (row[v] > row[a]) a = v;
    cr_expect_eq(a, id[0], "top-1 %d, HF %d (float64 margin %.4f)", a, id[0], want[0] - want[1]);
    double mx = row[a], z = 0;
    for (int v = 0; v < VOCAB; v++) z += exp((double)row[v] - mx);
    double lse = mx + log(z), lse_ref = *(const double *)R(&ref, "prompt.logsumexp")->data;
    fprintf(stderr, "  %-40s logsumexp %.6f, HF float64 %.6f (|diff| %.2e of %.0e)\n", "gemma-3-270m prompt", lse, lse_ref,
            fabs(lse - lse_ref), LSE_ABS);
    cr_expect(fabs(lse - lse_ref) <= LSE_ABS, "logsumexp %.6f, HF float64 %.6f", lse, lse_ref);
    free(got);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(gemma_real, greedy_matches_hf) {
    lp_st_file ref;
    lp_model *m = load(&ref);
    const lp_st_tensor *p = R(&ref, "prompt.tokens"), *g = R(&ref, "greedy.tokens");
    const int32_t *want = g->data;
    const float *margin = R(&ref, "greedy.margin")->data;
    int G = (int)g->shape[0], n_out = 0;
    int32_t out[64];
    cr_assert(G <= 64);
    lp_gen_opts o = {.max_tokens = G, .temperature = 0.0f, .top_p = 1.0f, .seed = 1, .stop_token = -1};
    cr_assert_eq(lp_generate(m, p->data, (int)p->shape[0], &o, out, &n_out), LP_OK, "%s", lp_last_error());
    cr_assert_eq(n_out, G, "%d tokens generated, %d asked", n_out, G);
    int checked = 0;
    for (int k = 0; k < G; k++, checked++) {
        if (out[k] == want[k]) continue;
        cr_expect(margin[k] < GREEDY_TIE, "greedy token %d is %d, HF float64 %d (margin there %.4f >= %.0e)", k, out[k], want[k],
                  margin[k], GREEDY_TIE);
        break; /* a near-tie: the texts part here */
    }
    fprintf(stderr, "  %-40s greedy: %d of %d tokens agree before any near-tie\n", "gemma-3-270m", checked, G);
    lp_model_free(m);
    lp_st_close(&ref);
}
