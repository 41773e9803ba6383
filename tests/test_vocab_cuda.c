/* test_vocab_cuda.c: the GPU's loss-only unembedding over the vocabulary padded to a multiple
 * of 64 and taken in row chunks (host/model/vocab.c), on a random GPT-2-shaped model whose
 * vocabulary (203) is not a multiple of 64. The chunk is forced to 4 rows of the 2 x 9 batch
 * (five chunks, the last of 2 rows) and left at its L2 default (one chunk).
 * F32: the per-token losses, the mean-loss metric and its gradient at the residual stream and
 *   at the unembedding's input equal the CPU's (which has no padding) within 1e-5 of the
 *   largest reference value (max_rel; summation order and expf ulps only, ~1e-7 expected).
 * BF16: the same quantities equal the GPU's own unpadded, whole-chunk path within the bf16
 *   GEMM budget of ops_cuda_budget.h (nmse 1e-4): the two differ only in the GEMMs' shapes.
 * The padded columns never reach a result: a loss or gradient that read them would differ
 * from the unpadded references by far more (203 of 256 columns are real).
 * Without a GPU every test skips, saying why (LOUPE_REQUIRE_GPU=1 turns the skip into a
 * failure); the emulated build runs it on the CPU emulator. */
#include "loupe/attrib.h"
#include "model/model_internal.h"
#include "testutil.h"

enum { B = 2, T = 9, V = 203, NH = 3 };
static const char *HOOKS = "blocks.0.hook_resid_pre,blocks.1.hook_resid_post,unembed.hook_in";
static const char *HOOK[NH] = {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "unembed.hook_in"};

static lp_model *model(lp_device dev, lp_dtype dt) {
    lp_config g = {.arch = LP_ARCH_GPT2, .n_layers = 2, .d_model = 32, .n_heads = 4, .d_mlp = 64, .n_ctx = 16, .d_vocab = V};
    lp_model *m;
    cr_assert_eq(lp_model_random(&m, &g, 7, dev, dt), LP_OK, "%s", lp_last_error());
    return m;
}

/* losses [B, T-1], the mean-loss metric [B] and the gradients at HOOK, all host F32 */
typedef struct result {
    float loss[B * (T - 1)];
    float metric[B];
    float *grad[NH];
    size_t n[NH];
} result;

static void run(lp_model *m, const int32_t *tok, result *r) {
    cr_assert_eq(lp_model_forward(m, tok, B, T, LP_WANT_LOSS), LP_OK, "%s", lp_last_error());
    memcpy(r->loss, lp_model_losses(m), sizeof r->loss);
    lp_metric mt = {.kind = LP_METRIC_MEAN_LOSS};
    double met[B];
    cr_assert_eq(lp_model_grad(m, tok, B, T, &mt, HOOKS, met), LP_OK, "%s", lp_last_error());
    for (int b = 0; b < B; b++) r->metric[b] = (float)met[b];
    for (int h = 0; h < NH; h++) {
        lp_tensor t;
        cr_assert_eq(lp_grad_get(m, HOOK[h], &t), LP_OK, "%s", lp_last_error());
        r->n[h] = (size_t)lp_shape_numel(t.shape, t.ndim);
        r->grad[h] = malloc(r->n[h] * sizeof(float));
        memcpy(r->grad[h], t.data, r->n[h] * sizeof(float));
    }
}

static void release(result *r) {
    for (int h = 0; h < NH; h++) free(r->grad[h]);
}

/* field: 0 max_rel, 1 nmse */
static void compare(const char *tag, const result *got, const result *ref, int nmse, double budget) {
    char what[160];
    lp_cmp c[2 + NH] = {lp_compare_f(got->loss, ref->loss, B * (T - 1)), lp_compare_f(got->metric, ref->metric, B)};
    const char *names[2 + NH] = {"losses", "mean-loss metric", HOOK[0], HOOK[1], HOOK[2]};
    for (int h = 0; h < NH; h++) {
        cr_assert_eq(got->n[h], ref->n[h]);
        c[2 + h] = lp_compare_f(got->grad[h], ref->grad[h], ref->n[h]);
    }
    for (int i = 0; i < 2 + NH; i++) {
        snprintf(what, sizeof what, "%s %s", tag, names[i]);
        if (nmse) LP_EXPECT_WITHIN(what, 0, c[i], nmse, budget);
        else LP_EXPECT_WITHIN(what, 0, c[i], max_rel, budget);
    }
}

static void tokens(int32_t *t) {
    uint64_t s = 11;
    for (int i = 0; i < B * T; i++) t[i] = (int32_t)(lp_test_next(&s) % V);
}

static void padded_vs(lp_dtype dt, int chunk) {
    LP_TEST_REQUIRE_GPU();
    int32_t tok[B * T];
    tokens(tok);
    lp_model *ref_m = dt == LP_F32 ? model(LP_CPU, LP_F32) : model(LP_CUDA, dt), *m = model(LP_CUDA, dt);
    if (dt != LP_F32) ref_m->vocab_chunk_rows = -1; /* the GPU's unpadded path */
    m->vocab_chunk_rows = chunk;
    cr_assert_eq(vocab_padded(m), 256);
    cr_assert_gt(vocab_pad_rows(m, (size_t)B * T * V), 0, "the padded path is not taken");
    result ref, got;
    run(ref_m, tok, &ref);
    run(m, tok, &got);
    cr_expect_not_null(m->unembed_pad, "the padded unembedding was not used");
    cr_expect_null(ref_m->unembed_pad, "the reference used the padded unembedding");
    cr_expect_eq(lp_model_config(m)->d_vocab, V, "d_vocab is reported padded");
    char tag[64];
    snprintf(tag, sizeof tag, "%s chunk %d", lp_dtype_name(dt), chunk);
    if (dt == LP_F32) compare(tag, &got, &ref, 0, 1e-5);
    else compare(tag, &got, &ref, 1, 1e-4);
    release(&ref), release(&got);
    lp_model_free(ref_m), lp_model_free(m);
}

Test(vocab_cuda, f32_chunks_of_4) { padded_vs(LP_F32, 4); }
Test(vocab_cuda, f32_l2_chunk) { padded_vs(LP_F32, 0); }
Test(vocab_cuda, bf16_chunks_of_4) { padded_vs(LP_BF16, 4); }
Test(vocab_cuda, bf16_l2_chunk) { padded_vs(LP_BF16, 0); }
