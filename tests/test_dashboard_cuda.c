/* test_dashboard_cuda.c: feature dashboards with the SAE's encoder on a CUDA context
 * against the same on the CPU, for the three SAEs of the dashboard fixture (standard over a
 * subset of latents, JumpReLU, TopK over all latents; tests/gen/gen_dashboard_fixture.py).
 * The fixture's weights and activations are dyadic with few bits, so every pre-activation
 * is exact in float32 whatever the order of the sums (the GEMM is F32, never TF32: see
 * kernels/matmul.cu): the two dashboards must be equal, value for value, and test_dashboard.c
 * checks the CPU's against numpy. Without a GPU every test skips, saying why
 * (LOUPE_REQUIRE_GPU=1 turns the skip into a failure); the emulated build runs it on the
 * CPU emulator. */
#include "loupe/dashboard.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#define FIX LP_FIXTURES "/dashboard"

/* The cases' options as tests/fixtures/dashboard/expected.json holds them. */
static const struct {
    const char *sae;
    int32_t latents[12];
    int n_latents, top, left, right, samples, n_logits, skip, batch_tokens;
    uint64_t seed;
} CASE[] = {
    {"sae_standard", {0, 2, 3, 5, 7, 8, 11}, 7, 5, 3, 2, 2, 4, 1, 32, 7},
    {"sae_jumprelu", {1, 4, 6, 9, 10}, 5, 4, 2, 3, 3, 3, 0, 48, 0},
    {"sae_topk", {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, 12, 6, 4, 1, 2, 5, 0, 16, 123},
};

static lp_dash *run(int k, lp_device dev, const lp_st_file *u) {
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, dev, LP_F32), LP_OK, "%s", lp_last_error());
    char path[256];
    snprintf(path, sizeof path, FIX "/%s", CASE[k].sae);
    lp_sae *s;
    cr_assert_eq(lp_sae_load(&s, &c, path), LP_OK, "%s", lp_last_error());
    lp_dash_opts o;
    lp_dash_defaults(&o);
    o.store = FIX "/store", o.latents = CASE[k].latents, o.n_latents = CASE[k].n_latents;
    o.top = CASE[k].top, o.left = CASE[k].left, o.right = CASE[k].right, o.samples = CASE[k].samples;
    o.n_logits = CASE[k].n_logits, o.skip_positions = CASE[k].skip, o.batch_tokens = CASE[k].batch_tokens;
    o.seed = CASE[k].seed;
    o.W_U = lp_st_find(u, "W_U")->data, o.ln_final_w = lp_st_find(u, "ln_final_w")->data, o.d_vocab = 128;
    lp_dash *d = NULL;
    cr_assert_eq(lp_dash_run(s, &c, &o, &d), LP_OK, "%s", lp_last_error());
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
    return d;
}

static void same_example(const char *what, int lat, int i, const lp_dash_example *g, const lp_dash_example *c) {
    cr_expect(g->token == c->token && g->value == c->value && g->start == c->start && g->len == c->len,
              "latent %d %s %d: token %lld value %.9g start %d len %d on the GPU; %lld %.9g %d %d on the CPU", lat, what, i,
              (long long)g->token, g->value, g->start, g->len, (long long)c->token, c->value, c->start, c->len);
    if (g->len != c->len) return;
    cr_expect(memcmp(g->tokens, c->tokens, c->len * sizeof(int32_t)) == 0, "latent %d %s %d: context tokens", lat, what, i);
    cr_expect(memcmp(g->acts, c->acts, c->len * sizeof(float)) == 0, "latent %d %s %d: context activations", lat, what, i);
}

static void same_latent(const lp_dash_latent *g, const lp_dash_latent *c) {
    const int l = c->latent;
    cr_assert_eq(g->latent, l);
    cr_expect(g->fires == c->fires && g->max == c->max && g->n_bins == c->n_bins && g->hist_exp == c->hist_exp,
              "latent %d: fires %lld max %.9g bins %d on the GPU; %lld %.9g %d on the CPU", l, (long long)g->fires, g->max, g->n_bins,
              (long long)c->fires, c->max, c->n_bins);
    cr_expect(memcmp(g->hist, c->hist, sizeof c->hist) == 0, "latent %d: histogram", l);
    cr_assert_eq(g->n_top, c->n_top, "latent %d: top examples", l);
    for (int i = 0; i < c->n_top; i++) same_example("top", l, i, &g->top[i], &c->top[i]);
    cr_assert_eq(g->n_bands, c->n_bands, "latent %d: bands", l);
    for (int b = 0; b < c->n_bands; b++) {
        const lp_dash_band *gb = &g->bands[b], *cb = &c->bands[b];
        cr_expect(gb->lo == cb->lo && gb->hi == cb->hi && gb->count == cb->count, "latent %d band %d", l, b);
        cr_assert_eq(gb->n, cb->n, "latent %d band %d: samples", l, b);
        for (int i = 0; i < cb->n; i++) same_example("band sample", l, i, &gb->ex[i], &cb->ex[i]);
    }
    cr_assert_eq(g->n_logits, c->n_logits);
    const size_t n = (size_t)c->n_logits;
    cr_expect(!memcmp(g->pos_ids, c->pos_ids, n * 4) && !memcmp(g->neg_ids, c->neg_ids, n * 4) &&
                  !memcmp(g->pos_vals, c->pos_vals, n * 4) && !memcmp(g->neg_vals, c->neg_vals, n * 4),
              "latent %d: logit tables", l);
}

static void dash(int k) {
    LP_TEST_REQUIRE_GPU();
    lp_st_file u;
    cr_assert_eq(lp_st_open(&u, FIX "/unembed.safetensors"), LP_OK, "%s", lp_last_error());
    lp_dash *c = run(k, LP_CPU, &u), *g = run(k, LP_CUDA, &u);
    cr_assert_eq(g->n, c->n);
    cr_expect(g->n_tokens == c->n_tokens && g->n_counted == c->n_counted);
    int64_t fires = 0;
    for (int j = 0; j < c->n; j++) same_latent(&g->lat[j], &c->lat[j]), fires += c->lat[j].fires;
    cr_expect_gt(fires, 0, "%s: nothing fired, so nothing was compared", CASE[k].sae);
    fprintf(stderr, "  %-14s dashboard on the GPU: %d latents, %lld firings, equal to the CPU's\n", CASE[k].sae, c->n,
            (long long)fires);
    lp_dash_free(c), lp_dash_free(g);
    lp_st_close(&u);
}

Test(dashboard_cuda, standard_subset) { dash(0); }
Test(dashboard_cuda, jumprelu) { dash(1); }
Test(dashboard_cuda, topk_all_latents) { dash(2); }
