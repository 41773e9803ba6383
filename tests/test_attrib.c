/* test_attrib.c: gradients at hooks and attribution vs exact patching, on the CPU.
 *   finite differences   the backward's gradient at hooks of every kind against central
 *                        differences of the metric with that activation perturbed (GPT-2
 *                        and Llama fixtures; the unembed hooks under every metric)
 *   linear               where the metric is linear in the nodes, attribution patching
 *                        equals exact patching
 *   self-patching        patching the corrupted run with its own values changes nothing
 *   PyTorch              gradients at every hook and the exact-patching grid match torch
 *                        autograd in float64 (tests/gen/gen_attrib_fixture.py) */
#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "loupe/safetensors.h"
#include "testutil.h"

static lp_model *load(const char *dir) {
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, dir, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    return m;
}

static void tokens(int32_t *t, int n, int V, uint64_t seed) {
    for (int i = 0; i < n; i++) t[i] = (int32_t)(lp_test_next(&seed) % (uint64_t)V);
}

/* Metric with hook `name` patched to act + delta at flat index i (row-major, all rows). */
static double metric_with(lp_model *m, const int32_t *tok, int B, int T, const lp_metric *mt, const char *name, const float *act, size_t n,
                          size_t i, float delta) {
    float *src = malloc(n * sizeof(float));
    memcpy(src, act, n * sizeof(float));
    src[i] += delta;
    lp_hooks_clear(m);
    lp_edit_spec e = {.kind = LP_EDIT_PATCH, .src = src, .src_len = n};
    cr_assert_eq(lp_hook_edit(m, name, &e), LP_OK, "%s", lp_last_error());
    double met[8], sum = 0;
    cr_assert_eq(lp_model_metric(m, tok, B, T, mt, met), LP_OK, "%s", lp_last_error());
    for (int b = 0; b < B; b++) sum += met[b];
    lp_hooks_clear(m);
    free(src);
    return sum;
}

/* kind: the metric (a direction metric reads unembed.hook_out along a random direction). */
static void fd_check_metric(const char *dir, const char *const *hooks, int nh, lp_metric_kind kind) {
    lp_model *m = load(dir);
    enum { B = 2, T = 9 };
    int V = lp_model_config(m)->d_vocab;
    int32_t tok[B * T], ans[B], wr[B];
    tokens(tok, B * T, V, 11);
    tokens(ans, B, V, 12);
    tokens(wr, B, V, 13);
    float *direction = lp_test_rand(V, 14, -1, 1);
    lp_metric mt = {.kind = kind, .answer = ans, .wrong = wr, .hook = "unembed.hook_out", .direction = direction};
    static const char *const kind_name[] = {"logit-diff", "logprob", "mean-loss", "direction"};
    for (int h = 0; h < nh; h++) {
        /* the activation (unperturbed) and the backward's gradient there */
        lp_hooks_clear(m);
        cr_assert_eq(lp_hook_capture(m, hooks[h], NULL, 0, NULL), LP_OK, "%s", lp_last_error());
        double met[B];
        cr_assert_eq(lp_model_grad(m, tok, B, T, &mt, hooks[h], met), LP_OK, "%s", lp_last_error());
        lp_tensor a, g;
        cr_assert_eq(lp_capture_get(m, hooks[h], &a), LP_OK);
        cr_assert_eq(lp_grad_get(m, hooks[h], &g), LP_OK, "%s", lp_last_error());
        size_t n = (size_t)lp_shape_numel(a.shape, a.ndim);
        float *act = malloc(n * sizeof(float)), *grad = malloc(n * sizeof(float));
        memcpy(act, a.data, n * sizeof(float));
        memcpy(grad, g.data, n * sizeof(float));
        double gmax = 0, worst = 0;
        for (size_t i = 0; i < n; i++) gmax = fmax(gmax, fabs(grad[i]));
        /* the largest gradients and some random entries */
        uint64_t s = 99 + h;
        for (int k = 0; k < 12; k++) {
            size_t i = 0;
            if (k < 4) {
                for (size_t j = 0; j < n; j++)
                    if (fabs(grad[j]) > fabs(grad[i]) && (k == 0 || fabs(grad[j]) < gmax * (1 - 0.1 * k))) i = j;
            } else {
                i = (size_t)(lp_test_next(&s) % n);
            }
            if (strstr(hooks[h], "hook_pattern") && act[i] == 0) continue; /* masked entries */
            float d = 1e-2f * fmaxf(1.0f, fabsf(act[i]));
            double fd = (metric_with(m, tok, B, T, &mt, hooks[h], act, n, i, d) - metric_with(m, tok, B, T, &mt, hooks[h], act, n, i, -d)) / (2.0 * d);
            worst = fmax(worst, fabs(fd - grad[i]) / gmax);
        }
        printf("  %-12s %-10s %-32s max |fd - grad| / max |grad| %.2e of 2e-2\n", strstr(dir, "llama") ? "llama-tiny" : "gpt2-tiny",
               kind_name[kind], hooks[h], worst);
        cr_expect_leq(worst, 2e-2, "%s (%s metric): finite differences disagree (%.3e)", hooks[h], kind_name[kind], worst);
        cr_expect_gt(gmax, 0, "%s (%s metric): the gradient is zero everywhere", hooks[h], kind_name[kind]);
        free(act), free(grad);
    }
    free(direction);
    lp_model_free(m);
}

static void fd_check(const char *dir, const char *const *hooks, int nh) { fd_check_metric(dir, hooks, nh, LP_METRIC_LOGIT_DIFF); }

Test(attrib, gradients_match_finite_differences_gpt2) {
    const char *hooks[] = {"hook_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale", "blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_q",
                           "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern",
                           "blocks.0.attn.hook_z", "blocks.0.hook_attn_out", "blocks.1.hook_resid_mid", "blocks.0.mlp.hook_pre",
                           "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post", "ln_final.hook_normalized",
                           "unembed.hook_in", "unembed.hook_out"};
    fd_check(LP_FIXTURES "/gpt2-tiny", hooks, sizeof hooks / sizeof *hooks);
}

Test(attrib, gradients_match_finite_differences_llama) {
    const char *hooks[] = {"hook_embed", "blocks.0.attn.hook_q", "blocks.0.attn.hook_rot_q", "blocks.1.attn.hook_rot_k", "blocks.0.attn.hook_v",
                           "blocks.1.attn.hook_pattern", "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_pre_linear", "blocks.1.mlp.hook_post",
                           "blocks.1.ln2.hook_normalized", "blocks.1.ln2.hook_scale", "blocks.0.hook_resid_mid", "ln_final.hook_scale",
                           "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"};
    fd_check(LP_FIXTURES "/llama-tiny", hooks, sizeof hooks / sizeof *hooks);
}

/* The unembedding's gradients under every metric: whole logits (unembed.hook_out's gradient
 * on all rows, the mean loss's chunks, a direction entering at the logits) and the gradient
 * flowing on from there into the final norm and the last block. */
Test(attrib, unembed_gradients_match_finite_differences_every_metric) {
    const char *hooks[] = {"unembed.hook_out", "unembed.hook_in", "ln_final.hook_normalized", "blocks.1.hook_resid_post"};
    for (int k = LP_METRIC_LOGPROB; k <= LP_METRIC_DIRECTION; k++) {
        fd_check_metric(LP_FIXTURES "/gpt2-tiny", hooks, 4, (lp_metric_kind)k);
        fd_check_metric(LP_FIXTURES "/llama-tiny", hooks, 4, (lp_metric_kind)k);
    }
}

/* metric = resid_post of the last layer . direction is linear in that layer's mlp_out and
 * resid_post: there the first-order estimate is exact. */
Test(attrib, attribution_equals_exact_patching_where_the_metric_is_linear) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    const lp_config *c = lp_model_config(m);
    enum { T = 8 };
    int32_t clean[T], corr[T];
    tokens(clean, T, c->d_vocab, 21);
    tokens(corr, T, c->d_vocab, 22);
    float *dir = lp_test_rand(c->d_model, 23, -1, 1);
    char hook[64];
    snprintf(hook, sizeof hook, "blocks.%d.hook_resid_post", c->n_layers - 1);
    lp_metric mt = {.kind = LP_METRIC_DIRECTION, .hook = hook, .direction = dir};
    lp_attrib_opts o = {.kinds = 1u << LP_NODE_MLP_OUT | 1u << LP_NODE_RESID_POST, .patch_batch = 4};
    lp_pair_result atp, ex;
    cr_assert_eq(lp_attrib_atp(m, clean, corr, 1, T, &mt, &o, &atp), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_attrib_exact(m, clean, corr, T, &mt, &o, &ex), LP_OK, "%s", lp_last_error());
    int kinds[2] = {LP_NODE_MLP_OUT, LP_NODE_RESID_POST};
    for (int k = 0; k < 2; k++) {
        const lp_node_scores *a = &atp.s[kinds[k]], *e = &ex.s[kinds[k]];
        double worst = 0, mx = 0;
        /* the last layer's nodes: where the metric is linear */
        int L = c->n_layers - 1;
        for (int t = 0; t < T; t++) {
            double x = a->v[L * T + t], y = e->v[L * T + t];
            worst = fmax(worst, fabs(x - y)), mx = fmax(mx, fabs(y));
        }
        printf("  linear metric, %-16s last layer: max |AtP - exact| %.2e (max |exact| %.2e)\n", lp_node_kind_name(kinds[k]), worst, mx);
        cr_expect_gt(mx, 1e-3);
        cr_expect_leq(worst, 1e-4 * mx + 1e-5, "%s: AtP %.6g vs exact", lp_node_kind_name(kinds[k]), worst);
    }
    lp_pair_result_free(&atp), lp_pair_result_free(&ex);
    free(dir);
    lp_model_free(m);
}

Test(attrib, patching_with_its_own_values_changes_nothing) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    enum { T = 8 };
    int32_t tok[T], ans = 5, wr = 7;
    tokens(tok, T, lp_model_config(m)->d_vocab, 31);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans, .wrong = &wr};
    lp_attrib_opts o = {.patch_batch = 8};
    lp_pair_result ex, atp;
    cr_assert_eq(lp_attrib_exact(m, tok, tok, T, &mt, &o, &ex), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_attrib_atp(m, tok, tok, 1, T, &mt, &o, &atp), LP_OK, "%s", lp_last_error());
    double worst = 0, aw = 0;
    for (int k = 0; k < LP_NODE_KINDS; k++) {
        size_t n = (size_t)ex.s[k].shape[0] * ex.s[k].shape[1] * (ex.s[k].ndim == 3 ? ex.s[k].shape[2] : 1);
        for (size_t i = 0; i < n; i++) worst = fmax(worst, fabs(ex.s[k].v[i])), aw = fmax(aw, fabs(atp.s[k].v[i]));
    }
    printf("  self-patching: max |metric change| %.2e over every node; attribution %.2e\n", worst, aw);
    cr_expect_leq(worst, 1e-5, "patching with its own values moved the metric by %.3e", worst);
    cr_expect_eq(aw, 0.0);
    lp_pair_result_free(&ex), lp_pair_result_free(&atp);
    lp_model_free(m);
}

/* ---- against torch autograd in float64 (tests/gen/gen_attrib_fixture.py) ---- */

static void torch_check(const char *model_dir, const char *fixture) {
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, fixture), LP_OK, "%s", lp_last_error());
    lp_model *m = load(model_dir);
    const lp_config *c = lp_model_config(m);
    const lp_st_tensor *tc = lp_st_find(&f, "tokens.clean"), *tx = lp_st_find(&f, "tokens.corrupted");
    const lp_st_tensor *ta = lp_st_find(&f, "answer"), *tw = lp_st_find(&f, "wrong");
    cr_assert(tc && tx && ta && tw);
    int B = (int)tc->shape[0], T = (int)tc->shape[1];
    const int32_t *clean = tc->data, *corr = tx->data;
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ta->data, .wrong = tw->data};
    /* gradients at every hook (ours are of the sum over rows, the fixture's of the mean) */
    double met[8];
    lp_hooks_clear(m);
    cr_assert_eq(lp_model_grad(m, corr, B, T, &mt, "*", met), LP_OK, "%s", lp_last_error());
    const double *mref = lp_st_find(&f, "metric.corrupted")->data;
    cr_expect(fabs((met[0] + met[1]) / 2 - mref[0]) < 1e-4, "metric %.6f vs %.6f", (met[0] + met[1]) / 2, mref[0]);
    int checked = 0;
    double worst = 0;
    char worst_name[128] = "";
    for (int id = 0; id < lp_hook_count(m); id++) {
        const char *h = lp_hook_name(m, id);
        /* the fixture predates the unembed hooks: their gradients are checked against
         * finite differences above, under every metric */
        if (!lp_test_hf_key(h) || strcmp(h, "unembed.hook_out") == 0) continue;
        char key[160];
        snprintf(key, sizeof key, "grad.%s", h);
        const lp_st_tensor *r = lp_st_find(&f, key);
        cr_assert(r, "fixture lacks %s", key);
        lp_tensor g;
        cr_assert_eq(lp_grad_get(m, h, &g), LP_OK, "%s", lp_last_error());
        size_t n = (size_t)lp_shape_numel(r->shape, r->ndim);
        cr_assert_eq((size_t)lp_shape_numel(g.shape, g.ndim), n, "%s: shape", h);
        const float *a = g.data, *b = r->data;
        int pattern = strstr(h, "hook_pattern") != NULL;
        double num = 0, den = 0;
        for (size_t i = 0; i < n; i++) {
            if (pattern && (i % T) > (i / T) % T) continue; /* above the diagonal the pattern is 0 whatever its gradient */
            double d = a[i] / B - b[i];
            num += d * d, den += (double)b[i] * b[i];
        }
        double nmse = den > 0 ? num / den : num;
        if (nmse > worst) worst = nmse, snprintf(worst_name, sizeof worst_name, "%s", h);
        cr_expect_leq(nmse, 1e-9, "%s: gradient nmse %.3e", h, nmse);
        checked++;
    }
    printf("  %-10s gradients at %d hooks vs torch float64: worst nmse %.2e (%s) of 1e-9\n", strstr(model_dir, "llama") ? "llama-tiny" : "gpt2-tiny",
           checked, worst, worst_name);
    /* the exact-patching grid and attribution patching, row by row then averaged */
    lp_attrib_opts o = {.patch_batch = 16};
    lp_pair_result ex[8], atp[8];
    int32_t ans1, wr1;
    for (int b = 0; b < B; b++) {
        ans1 = ((const int32_t *)ta->data)[b], wr1 = ((const int32_t *)tw->data)[b];
        lp_metric m1 = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans1, .wrong = &wr1};
        cr_assert_eq(lp_attrib_exact(m, clean + b * T, corr + b * T, T, &m1, &o, &ex[b]), LP_OK, "%s", lp_last_error());
    }
    cr_assert_eq(lp_attrib_atp(m, clean, corr, B, T, &mt, &o, atp), LP_OK, "%s", lp_last_error());
    for (int k = 0; k < LP_NODE_KINDS; k++) {
        char key[96];
        snprintf(key, sizeof key, "patch.%s", lp_node_kind_name(k));
        const lp_st_tensor *pr = lp_st_find(&f, key);
        snprintf(key, sizeof key, "atp.%s", lp_node_kind_name(k));
        const lp_st_tensor *ar = lp_st_find(&f, key);
        cr_assert(pr && ar, "fixture lacks %s", key);
        size_t n = (size_t)lp_shape_numel(pr->shape, pr->ndim);
        double we = 0, wa = 0, mxe = 0, mxa = 0;
        for (size_t i = 0; i < n; i++) {
            double e = 0, a = 0;
            for (int b = 0; b < B; b++) e += ex[b].s[k].v[i] / B, a += atp[b].s[k].v[i] / B;
            double re = ((const double *)pr->data)[i] - mref[0], ra = ((const double *)ar->data)[i];
            we = fmax(we, fabs(e - re)), wa = fmax(wa, fabs(a - ra)), mxe = fmax(mxe, fabs(re)), mxa = fmax(mxa, fabs(ra));
        }
        printf("    %-20s exact patching max err %.2e (max %.2e); attribution max err %.2e (max %.2e)\n", lp_node_kind_name(k), we, mxe, wa, mxa);
        cr_expect_leq(we, 1e-4 * mxe + 1e-5, "%s: exact patching differs by %.3e", lp_node_kind_name(k), we);
        cr_expect_leq(wa, 1e-4 * mxa + 1e-5, "%s: attribution differs by %.3e", lp_node_kind_name(k), wa);
    }
    for (int b = 0; b < B; b++) lp_pair_result_free(&ex[b]), lp_pair_result_free(&atp[b]);
    lp_model_free(m);
    lp_st_close(&f);
    (void)c;
}

Test(attrib, gpt2_matches_torch_autograd) { torch_check(LP_FIXTURES "/gpt2-tiny", LP_FIXTURES "/attrib/gpt2-tiny.safetensors"); }
Test(attrib, llama_matches_torch_autograd) { torch_check(LP_FIXTURES "/llama-tiny", LP_FIXTURES "/attrib/llama-tiny.safetensors"); }

/* ---- SAE latents as nodes ---- */
#include "loupe/sae.h"
#include "loupe/sae_train.h"
#include "loupe/store.h"
#include "loupe/tokens.h"

/* Latent attributions plus the error node sum to the hook's own attribution (whose
 * gradient the tests above check against torch and finite differences). */
Test(attrib, sae_latents_as_nodes) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    /* a small TopK SAE trained live on the model's fixture tokens */
    lp_tokens toks;
    cr_assert_eq(lp_tokens_load(&toks, LP_FIXTURES "/gpt2-tiny/tokens.npy", 0, 0, "int32"), LP_OK);
    char out[64];
    snprintf(out, sizeof out, "/tmp/loupe-attrib-sae-XXXXXX");
    cr_assert(mkdtemp(out));
    lp_ctx c;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    lp_sae_train_cfg t;
    lp_sae_train_defaults(&t);
    t.out = out;
    snprintf(t.sae.hook_name, sizeof t.sae.hook_name, "blocks.0.hook_resid_post");
    t.sae.arch = LP_SAE_TOPK, t.sae.d_sae = 128, t.sae.k = 8, t.tokens = 1024, t.batch_tokens = 32, t.shuffle_tokens = 32;
    lp_live *live;
    cr_assert_eq(lp_live_open(&live, m, toks.ids, toks.n_seq, toks.ctx, 2), LP_OK);
    lp_sae_train_report rep;
    cr_assert_eq(lp_sae_train_live(&t, 1, live, &c, &rep), LP_OK, "%s", lp_last_error());
    lp_live_close(live);
    lp_sae *s;
    cr_assert_eq(lp_sae_load(&s, &c, out), LP_OK, "%s", lp_last_error());
    /* the hook's attribution from the node grid, and the latents' */
    enum { T = 8 };
    int32_t clean[T], corr[T], ans = 5, wr = 9;
    tokens(clean, T, lp_model_config(m)->d_vocab, 41);
    memcpy(corr, clean, sizeof clean);
    corr[3] = (corr[3] + 17) % lp_model_config(m)->d_vocab;
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans, .wrong = &wr};
    lp_attrib_opts o = {.kinds = 1u << LP_NODE_RESID_POST};
    lp_pair_result grid;
    cr_assert_eq(lp_attrib_atp(m, clean, corr, 1, T, &mt, &o, &grid), LP_OK, "%s", lp_last_error());
    double hook_total = 0;
    for (int p = 0; p < T; p++) hook_total += grid.s[LP_NODE_RESID_POST].v[0 * T + p]; /* layer 0 */
    lp_sae_attrib sa;
    cr_assert_eq(lp_attrib_sae(m, s, &c, clean, corr, 1, T, &mt, 10, &sa), LP_OK, "%s", lp_last_error());
    double err_total = 0;
    for (int p = 0; p < T; p++) err_total += sa.error_atp[p];
    printf("  SAE nodes at blocks.0.hook_resid_post: latents + error %.6f vs the hook's attribution %.6f (error node %.4f); top latent %d at "
           "pos %d: %.4f\n",
           sa.total_atp, hook_total, err_total, sa.n_top ? sa.top[0].latent : -1, sa.n_top ? sa.top[0].pos : -1, sa.n_top ? sa.top[0].atp : 0);
    cr_expect(fabs(sa.total_atp - hook_total) <= 1e-4 * (1 + fabs(hook_total)), "%.6f vs %.6f", sa.total_atp, hook_total);
    cr_expect_gt(sa.n_top, 0);
    cr_expect_eq(sa.metric_corrupted, grid.metric_corrupted);
    /* a second request reuses the buffers the first sized (kept on the SAE) and agrees */
    void *runner = s->runner_cache, *scratch = s->scratch;
    lp_sae_attrib sb;
    cr_assert_eq(lp_attrib_sae(m, s, &c, clean, corr, 1, T, &mt, 10, &sb), LP_OK, "%s", lp_last_error());
    cr_expect(runner && s->runner_cache == runner && s->scratch == scratch, "the second request allocated again");
    cr_expect_eq(sb.total_atp, sa.total_atp);
    lp_sae_attrib_free(&sb);
    /* an edit the caller registered would be discarded by the method's own forwards: refused */
    lp_edit_spec z = {.kind = LP_EDIT_ZERO};
    cr_assert_eq(lp_hook_edit(m, "blocks.1.hook_mlp_out", &z), LP_OK);
    cr_expect_eq(lp_attrib_sae(m, s, &c, clean, corr, 1, T, &mt, 10, &sb), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "blocks.1.hook_mlp_out has an edit registered"), "%s", lp_last_error());
    lp_hooks_clear(m);
    lp_sae_attrib_free(&sa);
    lp_pair_result_free(&grid);
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
    lp_tokens_free(&toks);
    lp_model_free(m);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", out);
    cr_expect(system(cmd) == 0);
}

/* Integrated gradients along the embedding path are complete: at the first residual stream
 * (a linear function of the embedding) the attributions sum to metric(clean) -
 * metric(corrupted), up to the quadrature error of the steps. */
Test(attrib, integrated_gradients_are_complete) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    enum { T = 8 };
    int32_t clean[T], corr[T], ans = 5, wr = 9;
    tokens(clean, T, lp_model_config(m)->d_vocab, 51);
    memcpy(corr, clean, sizeof clean);
    corr[2] = (corr[2] + 100) % lp_model_config(m)->d_vocab, corr[5] = (corr[5] + 7) % lp_model_config(m)->d_vocab;
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans, .wrong = &wr};
    double plain_err = 0;
    for (int steps = 0; steps <= 32; steps += 32) {
        lp_attrib_opts o = {.kinds = 1u << LP_NODE_RESID_PRE, .ig_steps = steps};
        lp_pair_result r;
        cr_assert_eq(lp_attrib_atp(m, clean, corr, 1, T, &mt, &o, &r), LP_OK, "%s", lp_last_error());
        double sum = 0, want = r.metric_clean - r.metric_corrupted;
        for (int p = 0; p < T; p++) sum += r.s[LP_NODE_RESID_PRE].v[p]; /* layer 0 */
        double err = fabs(sum - want);
        printf("  %s: sum over blocks.0.hook_resid_pre %.5f vs metric difference %.5f (error %.2e)\n",
               steps ? "integrated gradients, 32 steps" : "attribution patching          ", sum, want, err);
        if (!steps) plain_err = err;
        else cr_expect_leq(err, 0.02 * fabs(want) + 1e-4, "IG sums to %.5f, not %.5f", sum, want);
        if (steps) cr_expect_lt(err, plain_err, "integrated gradients should beat the first-order estimate");
        if (steps) { /* the steps batched 5 per forward (the last chunk shorter) give the same scores */
            lp_attrib_opts o5 = o;
            o5.ig_batch = 5;
            lp_pair_result r5;
            cr_assert_eq(lp_attrib_atp(m, clean, corr, 1, T, &mt, &o5, &r5), LP_OK, "%s", lp_last_error());
            double d = 0;
            for (int p = 0; p < 2 * T; p++) d = fmax(d, fabs(r5.s[LP_NODE_RESID_PRE].v[p] - r.s[LP_NODE_RESID_PRE].v[p]));
            printf("  integrated gradients, 5 steps per forward vs all 32 in one: max difference %.2e\n", d);
            cr_expect_leq(d, 1e-4, "batching the steps changed the scores by %.3e", d);
            lp_pair_result_free(&r5);
        }
        lp_pair_result_free(&r);
    }
    lp_model_free(m);
}

/* ---- weight gradients: finite differences on the weights themselves ---- */
#include "model/model_internal.h"

static void weight_fd(const char *dir, const char *const *names, int nn) {
    lp_model *m = load(dir);
    enum { B = 2, T = 7 };
    int V = lp_model_config(m)->d_vocab;
    int32_t tok[B * T], ans[B], wr[B];
    tokens(tok, B * T, V, 61);
    tokens(ans, B, V, 62);
    tokens(wr, B, V, 63);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wr};
    char list[512] = "";
    for (int i = 0; i < nn; i++) snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? "," : "", names[i]);
    double met[B];
    cr_assert_eq(lp_model_grad(m, tok, B, T, &mt, list, met), LP_OK, "%s", lp_last_error());
    for (int i = 0; i < nn; i++) {
        lp_tensor g;
        cr_assert_eq(lp_grad_get(m, names[i], &g), LP_OK, "%s", lp_last_error());
        size_t n = (size_t)g.shape[0] * g.shape[1];
        float *grad = malloc(n * sizeof(float));
        memcpy(grad, g.data, n * sizeof(float));
        int idx = -1;
        for (int p = 0; p < m->w.n; p++)
            if (!strcmp(m->w.params[p].name, names[i])) idx = p;
        cr_assert(idx >= 0);
        float *w = param_ptr(m, idx); /* F32 on the CPU: perturb an entry in place */
        double gmax = 0, worst = 0;
        for (size_t j = 0; j < n; j++) gmax = fmax(gmax, fabs(grad[j]));
        uint64_t s = 7 + i;
        for (int k = 0; k < 10; k++) {
            size_t j = 0;
            if (k < 3) {
                for (size_t q = 0; q < n; q++)
                    if (fabs(grad[q]) > fabs(grad[j])) j = q;
                if (k) j = (j + k * 37) % n;
            } else {
                j = (size_t)(lp_test_next(&s) % n);
            }
            float keep = w[j], d = 1e-2f * fmaxf(0.1f, fabsf(keep));
            double mp[B], mm[B];
            w[j] = keep + d;
            cr_assert_eq(lp_model_metric(m, tok, B, T, &mt, mp), LP_OK);
            w[j] = keep - d;
            cr_assert_eq(lp_model_metric(m, tok, B, T, &mt, mm), LP_OK);
            w[j] = keep;
            double fd = ((mp[0] + mp[1]) - (mm[0] + mm[1])) / (2.0 * d);
            worst = fmax(worst, fabs(fd - grad[j]) / gmax);
        }
        printf("  %-12s weight %-20s max |fd - grad| / max |grad| %.2e of 2e-2\n", strstr(dir, "llama") ? "llama-tiny" : "gpt2-tiny", names[i], worst);
        cr_expect_leq(worst, 2e-2, "%s: %.3e", names[i], worst);
        free(grad);
    }
    lp_model_free(m);
}

Test(attrib, weight_gradients_match_finite_differences) {
    const char *g2[] = {"blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.1.attn.W_V", "blocks.1.attn.W_O", "blocks.0.mlp.W_in", "blocks.1.mlp.W_out"};
    weight_fd(LP_FIXTURES "/gpt2-tiny", g2, 6);
    const char *ll[] = {"blocks.0.attn.W_Q", "blocks.1.attn.W_K", "blocks.0.attn.W_V", "blocks.1.attn.W_O", "blocks.0.mlp.W_gate", "blocks.1.mlp.W_in",
                        "blocks.0.mlp.W_out"};
    weight_fd(LP_FIXTURES "/llama-tiny", ll, 7);
}
