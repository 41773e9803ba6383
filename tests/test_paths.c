/* test_paths.c: path patching and edge attribution patching (paths.h), on the CPU.
 *   hand-built runs   path patching to a head's query, an MLP's input and the logits equals
 *                     a run patched by hand: the receiver's input computed in float64 from the
 *                     checkpoint's weights (ln1 / ln2 / ln_final of clean + Δ_S, then W_Q)
 *   a linear model    with patterns, norm scales and MLP activations frozen, path patching
 *                     equals the product of the path's weights (computed by hand in float64),
 *                     and edge attribution equals path patching on every edge
 *   sums              edge scores summed over receivers are the senders' node attributions
 *                     (lp_attrib_atp, with and without integrated gradients); summed over
 *                     senders, the receivers' input deltas times the backward's gradients;
 *                     one head's receiver gradient against the backward with every other
 *                     head's q/k/v stopped (GPT-2, and Llama with grouped kv heads) */
#include "loupe/hooks.h"
#include "loupe/paths.h"
#include "loupe/safetensors.h"
#include "testutil.h"

/* float32 forwards against float64 references: the budgets, relative to the largest value
 * compared (and an absolute floor for values near zero) */
#define TOL_REL 2e-4
#define TOL_ABS 2e-6

static lp_model *load(const char *dir) {
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, dir, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    return m;
}

enum { T = 9 };

/* A prompt pair: the corrupted one differs at three positions. */
static void pair(const lp_model *m, uint64_t seed, int32_t *clean, int32_t *corr, int32_t *ans, int32_t *wr) {
    int V = lp_model_config(m)->d_vocab;
    for (int i = 0; i < T; i++) clean[i] = corr[i] = (int32_t)(lp_test_next(&seed) % V);
    for (int k = 0; k < 3; k++) corr[(int)(lp_test_next(&seed) % T)] = (int32_t)(lp_test_next(&seed) % V);
    *ans = (int32_t)(lp_test_next(&seed) % V), *wr = (int32_t)(lp_test_next(&seed) % V);
}

static float *grab(lp_model *m, const char *name, size_t n) {
    float *v = malloc(n * sizeof(float));
    cr_assert_eq(lp_capture_read_f32(m, name, v, n), LP_OK, "%s", lp_last_error());
    return v;
}

static const float *w_of(const lp_st_file *f, const char *name) {
    const lp_st_tensor *t = lp_st_find(f, name);
    cr_assert(t && t->dtype == LP_F32, "checkpoint lacks %s", name);
    return t->data;
}

/* LayerNorm of x (D) in float64: normalized (before the weight) into n, and w n + b into y. */
static void layer_norm(const double *x, int D, const float *w, const float *b, double *n, double *y) {
    double mu = 0, var = 0;
    for (int d = 0; d < D; d++) mu += x[d];
    mu /= D;
    for (int d = 0; d < D; d++) var += (x[d] - mu) * (x[d] - mu);
    double s = sqrt(var / D + 1e-5);
    for (int d = 0; d < D; d++) {
        n[d] = (x[d] - mu) / s;
        if (y) y[d] = n[d] * w[d] + b[d];
    }
}

/* Δ of head h of layer L (GPT-2: c_proj is [in, out]) from z of both runs, into delta [T, D]. */
static void head_delta(const lp_st_file *f, int L, int h, int D, int dh, const float *zc, const float *zx, double *delta) {
    char nm[96];
    snprintf(nm, sizeof nm, "transformer.h.%d.attn.c_proj.weight", L);
    const float *wo = w_of(f, nm);
    for (int t = 0; t < T; t++)
        for (int d = 0; d < D; d++) {
            double acc = 0;
            for (int j = 0; j < dh; j++) acc += ((double)zx[t * D + h * dh + j] - zc[t * D + h * dh + j]) * wo[(h * dh + j) * D + d];
            delta[t * D + d] = acc;
        }
}

static double metric_patched(lp_model *m, const int32_t *tok, const lp_metric *mt, const char *hook, const float *src, size_t n) {
    lp_hooks_clear(m);
    lp_edit_spec e = {.kind = LP_EDIT_PATCH, .src = src, .src_len = n};
    cr_assert_eq(lp_hook_edit(m, hook, &e), LP_OK, "%s", lp_last_error());
    double v;
    cr_assert_eq(lp_model_metric(m, tok, 1, T, mt, &v), LP_OK, "%s", lp_last_error());
    lp_hooks_clear(m);
    return v;
}

static double path(lp_model *m, const int32_t *cl, const int32_t *cx, const lp_metric *mt, const char *s, const char *r, const char *freeze) {
    int si = lp_path_sender_find(m, s), ri = lp_path_receiver_find(m, r);
    cr_assert(si >= 0 && ri >= 0, "%s -> %s: unknown name", s, r);
    lp_path_opts o = {.freeze = freeze};
    double mc, mx, eff;
    cr_assert_eq(lp_path_patch(m, cl, cx, T, mt, si, &ri, 1, &o, &mc, &mx, &eff), LP_OK, "%s", lp_last_error());
    return eff;
}

static void expect_close(const char *what, double got, double want, double scale) {
    double err = fabs(got - want), tol = TOL_REL * fmax(scale, fabs(want)) + TOL_ABS;
    printf("  %-58s %+.6e vs %+.6e  |diff| %.1e of %.1e\n", what, got, want, err, tol);
    cr_expect_leq(err, tol, "%s: %.9g, expected %.9g", what, got, want);
}

Test(paths, names_round_trip_and_edges_follow_depth) {
    lp_model *m = load(LP_FIXTURES "/llama-tiny");
    char b[96];
    for (int i = 0; i < lp_path_n_senders(m); i++) {
        lp_path_sender_name(m, i, b, sizeof b);
        cr_expect_eq(lp_path_sender_find(m, b), i, "%s", b);
    }
    for (int j = 0; j < lp_path_n_receivers(m); j++) {
        lp_path_receiver_name(m, j, b, sizeof b);
        cr_expect_eq(lp_path_receiver_find(m, b), j, "%s", b);
    }
    /* 2 layers of 4 heads and 2 kv heads: 1 + 2 x 5 senders, 2 x (4 + 2 + 2 + 1) + 1 receivers */
    cr_expect_eq(lp_path_n_senders(m), 11);
    cr_expect_eq(lp_path_n_receivers(m), 19);
    cr_expect(lp_path_is_edge(m, lp_path_sender_find(m, "blocks.0.attn.head.3"), lp_path_receiver_find(m, "blocks.0.mlp")));
    cr_expect(!lp_path_is_edge(m, lp_path_sender_find(m, "blocks.0.attn.head.3"), lp_path_receiver_find(m, "blocks.0.attn.head.1.q")));
    cr_expect(lp_path_is_edge(m, lp_path_sender_find(m, "blocks.0.mlp"), lp_path_receiver_find(m, "blocks.1.attn.kv_head.1.v")));
    cr_expect(!lp_path_is_edge(m, lp_path_sender_find(m, "blocks.1.mlp"), lp_path_receiver_find(m, "blocks.1.mlp")));
    cr_expect(lp_path_is_edge(m, 0, lp_path_receiver_find(m, "logits")));
    /* a receiver upstream of the sender is refused, and so are registered edits */
    int32_t cl[T], cx[T], ans, wr;
    pair(m, 5, cl, cx, &ans, &wr);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans, .wrong = &wr};
    int r = lp_path_receiver_find(m, "blocks.0.mlp");
    double a, x, e;
    cr_expect_eq(lp_path_patch(m, cl, cx, T, &mt, lp_path_sender_find(m, "blocks.1.mlp"), &r, 1, NULL, &a, &x, &e), LP_ERR_ARG);
    printf("  refused: %s\n", lp_last_error());
    lp_edit_spec z = {.kind = LP_EDIT_ZERO};
    cr_assert_eq(lp_hook_edit(m, "blocks.0.hook_mlp_out", &z), LP_OK);
    lp_eap_result er;
    cr_expect_eq(lp_eap(m, cl, cx, T, &mt, NULL, &er), LP_ERR_ARG);
    lp_hooks_clear(m);
    lp_model_free(m);
}

/* ---- path patching against runs patched by hand (GPT-2, nothing frozen) ---- */

Test(paths, path_patching_matches_hand_built_runs) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    const lp_config *c = lp_model_config(m);
    int D = c->d_model, dh = c->d_head, V = c->d_vocab;
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, LP_FIXTURES "/gpt2-tiny/model.safetensors"), LP_OK, "%s", lp_last_error());
    int32_t cl[T], cx[T], ans, wr;
    pair(m, 7, cl, cx, &ans, &wr);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans, .wrong = &wr};
    size_t nTD = (size_t)T * D;
    /* both runs: z of both layers, the clean residuals and q */
    lp_hooks_clear(m);
    lp_hook_capture(m, "blocks.*.attn.hook_z", NULL, 0, NULL), lp_hook_capture(m, "blocks.*.hook_resid_*", NULL, 0, NULL);
    lp_hook_capture(m, "blocks.1.attn.hook_q", NULL, 0, NULL), lp_hook_capture(m, "blocks.0.hook_mlp_out", NULL, 0, NULL);
    double mc, mx;
    cr_assert_eq(lp_model_metric(m, cl, 1, T, &mt, &mc), LP_OK, "%s", lp_last_error());
    float *zc = grab(m, "blocks.0.attn.hook_z", nTD), *pre1 = grab(m, "blocks.1.hook_resid_pre", nTD), *mid1 = grab(m, "blocks.1.hook_resid_mid", nTD);
    float *post = grab(m, "blocks.1.hook_resid_post", nTD), *q1 = grab(m, "blocks.1.attn.hook_q", nTD), *z1c = grab(m, "blocks.1.attn.hook_z", nTD);
    float *mlpc = grab(m, "blocks.0.hook_mlp_out", nTD);
    cr_assert_eq(lp_model_metric(m, cx, 1, T, &mt, &mx), LP_OK, "%s", lp_last_error());
    float *zx = grab(m, "blocks.0.attn.hook_z", nTD), *z1x = grab(m, "blocks.1.attn.hook_z", nTD), *mlpx = grab(m, "blocks.0.hook_mlp_out", nTD);
    lp_hooks_clear(m);
    double *delta = calloc(nTD, sizeof(double)), *x = malloc(D * sizeof(double)), *n = malloc(D * sizeof(double)), *y = malloc(D * sizeof(double));
    float *src = malloc(nTD * sizeof(float));
    const float *w_attn = w_of(&f, "transformer.h.1.attn.c_attn.weight"), *b_attn = w_of(&f, "transformer.h.1.attn.c_attn.bias");
    const float *ln1w = w_of(&f, "transformer.h.1.ln_1.weight"), *ln1b = w_of(&f, "transformer.h.1.ln_1.bias");
    const float *lnfw = w_of(&f, "transformer.ln_f.weight"), *lnfb = w_of(&f, "transformer.ln_f.bias"), *wte = w_of(&f, "transformer.wte.weight");
    (void)V;
    for (int h = 0; h < c->n_heads; h += 3) {
        head_delta(&f, 0, h, D, dh, zc, zx, delta);
        char s[64];
        snprintf(s, sizeof s, "blocks.0.attn.head.%d", h);
        /* to head 2's query in layer 1: q = ln1(clean resid_pre + Δ) W_Q + b_Q, for head 2 alone */
        memcpy(src, q1, nTD * sizeof(float));
        for (int t = 0; t < T; t++) {
            for (int d = 0; d < D; d++) x[d] = pre1[t * D + d] + delta[t * D + d];
            layer_norm(x, D, ln1w, ln1b, n, y);
            for (int j = 2 * dh; j < 3 * dh; j++) {
                double acc = b_attn[j];
                for (int d = 0; d < D; d++) acc += y[d] * w_attn[d * 3 * D + j];
                src[t * D + j] = (float)acc;
            }
        }
        double want = metric_patched(m, cl, &mt, "blocks.1.attn.hook_q", src, nTD) - mc;
        char what[128];
        snprintf(what, sizeof what, "%s -> blocks.1.attn.head.2.q", s);
        expect_close(what, path(m, cl, cx, &mt, s, "blocks.1.attn.head.2.q", NULL), want, 1e-2);
        /* to the MLP of layer 1: ln2's normalized value of clean resid_mid + Δ */
        for (int t = 0; t < T; t++) {
            for (int d = 0; d < D; d++) x[d] = mid1[t * D + d] + delta[t * D + d];
            layer_norm(x, D, NULL, NULL, n, NULL);
            for (int d = 0; d < D; d++) src[t * D + d] = (float)n[d];
        }
        want = metric_patched(m, cl, &mt, "blocks.1.ln2.hook_normalized", src, nTD) - mc;
        snprintf(what, sizeof what, "%s -> blocks.1.mlp", s);
        expect_close(what, path(m, cl, cx, &mt, s, "blocks.1.mlp", NULL), want, 1e-2);
    }
    /* to the logits, from a head of the last layer and from an MLP: the logit difference of
     * ln_final(clean final residual + Δ) through the tied unembedding, all in float64 */
    for (int which = 0; which < 2; which++) {
        if (which == 0) head_delta(&f, 1, 1, D, dh, z1c, z1x, delta);
        else for (size_t i = 0; i < nTD; i++) delta[i] = (double)mlpx[i] - mlpc[i];
        double ld[2];
        for (int with = 0; with < 2; with++) {
            for (int d = 0; d < D; d++) x[d] = post[(T - 1) * D + d] + (with ? delta[(T - 1) * D + d] : 0);
            layer_norm(x, D, lnfw, lnfb, n, y);
            ld[with] = 0;
            for (int d = 0; d < D; d++) ld[with] += y[d] * ((double)wte[(size_t)ans * D + d] - wte[(size_t)wr * D + d]);
        }
        const char *s = which ? "blocks.0.mlp" : "blocks.1.attn.head.1";
        char what[128];
        snprintf(what, sizeof what, "%s -> logits", s);
        expect_close(what, path(m, cl, cx, &mt, s, "logits", NULL), ld[1] - ld[0], 1e-2);
    }
    free(zc), free(zx), free(pre1), free(mid1), free(post), free(q1), free(z1c), free(z1x), free(mlpc), free(mlpx);
    free(delta), free(x), free(n), free(y), free(src);
    lp_st_close(&f);
    lp_model_free(m);
}
