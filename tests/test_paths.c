/* test_paths.c: path patching and edge attribution patching (paths.h), on the CPU.
 *   hand-built runs   path patching to a head's query, an MLP's input and the logits equals
 *                     a run patched by hand: the receiver's input computed in float64 from the
 *                     checkpoint's weights (ln1 / ln2 / ln_final of clean + Δ_S, then W_Q)
 *   a linear model    with patterns, norm scales and MLP activations frozen, path patching
 *                     equals the product of the path's weights (computed by hand in float64),
 *                     and edge attribution equals path patching on every edge
 *   command line      both sweeps' files equal the library's results; restarts resume or refuse
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

/* ---- a model made linear: patterns, norm scales and MLP activations frozen ---- */

#define FREEZE "blocks.*.attn.hook_pattern,*hook_scale,blocks.*.mlp.hook_post"

typedef struct lin {
    const lp_st_file *f;
    int D, H, dh;
    float *A[2], *s1[2], *sf; /* frozen patterns [H, T, T] and scales [T] */
} lin;

/* The frozen norm as the linear map it has become (biases cancel in differences). */
static void lin_ln(const double *v, int D, const float *w, double s, double *out) {
    double mu = 0;
    for (int d = 0; d < D; d++) mu += v[d];
    mu /= D;
    for (int d = 0; d < D; d++) out[d] = w[d] * (v[d] - mu) / s;
}

/* Δ of head h of layer L from the change dpre [T, D] of its residual input: ln1, W_V, the
 * frozen pattern, W_O. */
static void lin_head(const lin *l, int L, int h, const double *dpre, double *out) {
    int D = l->D, dh = l->dh;
    char nm[96];
    snprintf(nm, sizeof nm, "transformer.h.%d.ln_1.weight", L);
    const float *lw = w_of(l->f, nm);
    snprintf(nm, sizeof nm, "transformer.h.%d.attn.c_attn.weight", L);
    const float *wa = w_of(l->f, nm);
    snprintf(nm, sizeof nm, "transformer.h.%d.attn.c_proj.weight", L);
    const float *wo = w_of(l->f, nm);
    double u[64], v[T][16], z[16];
    cr_assert(D <= 64 && dh <= 16);
    for (int t = 0; t < T; t++) {
        lin_ln(dpre + t * D, D, lw, l->s1[L][t], u);
        for (int j = 0; j < dh; j++) {
            v[t][j] = 0;
            for (int d = 0; d < D; d++) v[t][j] += u[d] * wa[d * 3 * D + 2 * D + h * dh + j];
        }
    }
    for (int t = 0; t < T; t++) {
        for (int j = 0; j < dh; j++) {
            z[j] = 0;
            for (int k = 0; k < T; k++) z[j] += l->A[L][(h * T + t) * T + k] * v[k][j];
        }
        for (int d = 0; d < D; d++) {
            out[t * D + d] = 0;
            for (int j = 0; j < dh; j++) out[t * D + d] += z[j] * wo[(h * dh + j) * D + d];
        }
    }
}

static double lin_logits(const lin *l, const double *dfin, int32_t ans, int32_t wr) {
    const float *w = w_of(l->f, "transformer.ln_f.weight"), *wte = w_of(l->f, "transformer.wte.weight");
    double u[64], acc = 0;
    lin_ln(dfin + (T - 1) * l->D, l->D, w, l->sf[T - 1], u);
    for (int d = 0; d < l->D; d++) acc += u[d] * ((double)wte[(size_t)ans * l->D + d] - wte[(size_t)wr * l->D + d]);
    return acc;
}

Test(paths, a_linear_model_gives_the_product_of_the_path_weights) {
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    const lp_config *c = lp_model_config(m);
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, LP_FIXTURES "/gpt2-tiny/model.safetensors"), LP_OK, "%s", lp_last_error());
    lin l = {.f = &f, .D = c->d_model, .H = c->n_heads, .dh = c->d_head};
    int D = l.D;
    int32_t cl[T], cx[T], ans, wr;
    pair(m, 9, cl, cx, &ans, &wr);
    cx[T - 1] = (cl[T - 1] + 1) % c->d_vocab; /* so that the embeddings' direct path to the logits carries something */
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans, .wrong = &wr};
    /* the frozen values: the clean run's */
    lp_hooks_clear(m);
    lp_hook_capture(m, "blocks.*.attn.hook_pattern", NULL, 0, NULL), lp_hook_capture(m, "*hook_scale", NULL, 0, NULL);
    double mc;
    cr_assert_eq(lp_model_metric(m, cl, 1, T, &mt, &mc), LP_OK, "%s", lp_last_error());
    for (int L = 0; L < 2; L++) {
        char nm[96];
        snprintf(nm, sizeof nm, "blocks.%d.attn.hook_pattern", L);
        l.A[L] = grab(m, nm, (size_t)l.H * T * T);
        snprintf(nm, sizeof nm, "blocks.%d.ln1.hook_scale", L);
        l.s1[L] = grab(m, nm, T);
    }
    l.sf = grab(m, "ln_final.hook_scale", T);
    lp_hooks_clear(m);
    /* the embeddings' change (the positions' cancels) and, by hand, every path from it */
    const float *wte = w_of(&f, "transformer.wte.weight");
    size_t nTD = (size_t)T * D;
    double *demb = calloc(nTD, sizeof(double)), *d0[4], *pre1 = calloc(nTD, sizeof(double)), *r = calloc(nTD, sizeof(double));
    for (int t = 0; t < T; t++)
        for (int d = 0; d < D; d++) demb[t * D + d] = pre1[t * D + d] = (double)wte[(size_t)cx[t] * D + d] - wte[(size_t)cl[t] * D + d];
    for (int h = 0; h < l.H; h++) {
        d0[h] = calloc(nTD, sizeof(double));
        lin_head(&l, 0, h, demb, d0[h]);
        for (size_t i = 0; i < nTD; i++) pre1[i] += d0[h][i]; /* the MLP adds nothing: its activation is frozen */
    }
    char s[64], rv[64], what[160];
    /* head (0, h) -> head (1, 2)'s values -> logits: the product along that one path */
    for (int h = 0; h < l.H; h++) {
        lin_head(&l, 1, 2, d0[h], r);
        snprintf(s, sizeof s, "blocks.0.attn.head.%d", h);
        snprintf(what, sizeof what, "%s -> blocks.1.attn.head.2.v (frozen)", s);
        expect_close(what, path(m, cl, cx, &mt, s, "blocks.1.attn.head.2.v", FREEZE), lin_logits(&l, r, ans, wr), 1e-2);
    }
    /* head (1, h) -> logits: its direct effect, the sum of every path into it */
    for (int h = 0; h < l.H; h++) {
        lin_head(&l, 1, h, pre1, r);
        snprintf(s, sizeof s, "blocks.1.attn.head.%d", h);
        snprintf(what, sizeof what, "%s -> logits (frozen)", s);
        expect_close(what, path(m, cl, cx, &mt, s, "logits", FREEZE), lin_logits(&l, r, ans, wr), 1e-2);
    }
    expect_close("embed -> logits (frozen)", path(m, cl, cx, &mt, "embed", "logits", FREEZE), lin_logits(&l, demb, ans, wr), 1e-2);
    /* where everything is linear, edge attribution is exact: it equals path patching on every
     * edge, and queries and keys (patterns frozen) carry nothing */
    lp_path_opts o = {.freeze = FREEZE};
    lp_eap_result er;
    cr_assert_eq(lp_eap(m, cl, cx, T, &mt, &o, &er), LP_OK, "%s", lp_last_error());
    double worst = 0, scale = 0, qk = 0;
    int n_edges = 0;
    for (int i = 0; i < er.n_senders; i++)
        for (int j = 0; j < er.n_receivers; j++) {
            if (!lp_path_is_edge(m, i, j)) {
                cr_expect_eq(er.scores[(size_t)i * er.n_receivers + j], 0.0f);
                continue;
            }
            lp_path_sender_name(m, i, s, sizeof s), lp_path_receiver_name(m, j, rv, sizeof rv);
            double pp = path(m, cl, cx, &mt, s, rv, FREEZE), e = er.scores[(size_t)i * er.n_receivers + j];
            size_t n = strlen(rv);
            if (rv[n - 1] == 'q' || rv[n - 1] == 'k') qk = fmax(qk, fmax(fabs(pp), fabs(e)));
            worst = fmax(worst, fabs(pp - e)), scale = fmax(scale, fabs(pp)), n_edges++;
        }
    printf("  linear model: %d edges, max |EAP - path patching| %.2e (max |effect| %.2e); q/k edges at most %.1e\n", n_edges, worst, scale, qk);
    cr_expect_gt(scale, 1e-2);
    cr_expect_leq(worst, TOL_REL * scale + TOL_ABS);
    cr_expect_leq(qk, TOL_ABS);
    lp_eap_result_free(&er);
    for (int h = 0; h < l.H; h++) free(d0[h]);
    free(demb), free(pre1), free(r), free(l.A[0]), free(l.A[1]), free(l.s1[0]), free(l.s1[1]), free(l.sf);
    lp_st_close(&f);
    lp_model_free(m);
}

/* ---- edge scores summed over receivers and over senders ---- */

static double dot_diff(const float *x, const float *c, const float *g, const float *g2, size_t n) {
    double acc = 0;
    for (size_t i = 0; i < n; i++) acc += ((double)x[i] - c[i]) * ((double)g[i] - (g2 ? g2[i] : 0));
    return acc;
}

/* Σ over receivers: the senders' node attributions (lp_attrib_atp at the clean run, or with
 * the same integrated gradients), in the noising sign. */
static void sender_sums(const char *dir, int ig) {
    lp_model *m = load(dir);
    const lp_config *c = lp_model_config(m);
    int H = c->n_heads;
    int32_t cl[T], cx[T], ans, wr;
    pair(m, 13, cl, cx, &ans, &wr);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans, .wrong = &wr};
    lp_path_opts o = {.ig_steps = ig, .ig_batch = 2};
    lp_eap_result er;
    cr_assert_eq(lp_eap(m, cl, cx, T, &mt, &o, &er), LP_OK, "%s", lp_last_error());
    lp_attrib_opts ao = {.kinds = 1u << LP_NODE_Z | 1u << LP_NODE_MLP_OUT | 1u << LP_NODE_RESID_PRE, .grad_at_clean = 1, .ig_steps = ig};
    lp_pair_result pr;
    cr_assert_eq(lp_attrib_atp(m, cl, cx, 1, T, &mt, &ao, &pr), LP_OK, "%s", lp_last_error());
    double *got = calloc(er.n_senders, sizeof(double)), *want = calloc(er.n_senders, sizeof(double)), scale = 0, worst = 0;
    for (int i = 0; i < er.n_senders; i++) {
        for (int j = 0; j < er.n_receivers; j++) got[i] += er.scores[(size_t)i * er.n_receivers + j];
        char s[64];
        lp_path_sender_name(m, i, s, sizeof s);
        int L = -1, h = -1;
        for (int t = 0; t < T; t++) {
            if (i == 0) want[i] -= pr.s[LP_NODE_RESID_PRE].v[t];
            else if (sscanf(s, "blocks.%d.attn.head.%d", &L, &h) == 2) want[i] -= pr.s[LP_NODE_Z].v[((size_t)L * T + t) * H + h];
            else if (sscanf(s, "blocks.%d.mlp", &L) == 1) want[i] -= pr.s[LP_NODE_MLP_OUT].v[(size_t)L * T + t];
        }
        scale = fmax(scale, fabs(want[i]));
    }
    for (int i = 0; i < er.n_senders; i++) worst = fmax(worst, fabs(got[i] - want[i]));
    printf("  %-11s ig_steps %d: %d senders, max |Σ_R EAP(S->R) - node attribution of S| %.2e (max |node| %.2e)\n", strstr(dir, "llama") ? "llama-tiny" : "gpt2-tiny",
           ig, er.n_senders, worst, scale);
    cr_expect_gt(scale, 1e-2);
    cr_expect_leq(worst, TOL_REL * scale + TOL_ABS, "sender sums disagree with the node attributions by %.3e", worst);
    free(got), free(want);
    lp_pair_result_free(&pr);
    lp_eap_result_free(&er);
    lp_model_free(m);
}

Test(paths, edge_scores_sum_to_the_senders_node_scores) {
    sender_sums(LP_FIXTURES "/gpt2-tiny", 0);
    sender_sums(LP_FIXTURES "/llama-tiny", 0);
    sender_sums(LP_FIXTURES "/gpt2-tiny", 3);
    sender_sums(LP_FIXTURES "/llama-tiny", 3);
}

/* Σ over senders: each receiver's input delta times its gradient. Per layer, the heads'
 * receivers together against resid_pre's gradient less resid_mid's (what skips them), the MLP
 * against resid_mid's less resid_post's, the logits against the last resid_post's. One head's
 * receiver alone against the backward with every other head's q, k and v stopped. */
static void receiver_sums(const char *dir, const char *const *one, int n_one) {
    lp_model *m = load(dir);
    const lp_config *c = lp_model_config(m);
    int nL = c->n_layers, D = c->d_model;
    size_t nTD = (size_t)T * D;
    int32_t cl[T], cx[T], ans, wr;
    pair(m, 17, cl, cx, &ans, &wr);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans, .wrong = &wr};
    lp_eap_result er;
    cr_assert_eq(lp_eap(m, cl, cx, T, &mt, NULL, &er), LP_OK, "%s", lp_last_error());
    int nr = er.n_receivers;
    double *rs = calloc(nr, sizeof(double));
    for (int i = 0; i < er.n_senders; i++)
        for (int j = 0; j < nr; j++) rs[j] += er.scores[(size_t)i * nr + j];
    /* both runs' residuals, and the clean run's gradients there */
    float *x[3][4], *cv[3][4], *g[3][4];
    static const char *const site[3] = {"hook_resid_pre", "hook_resid_mid", "hook_resid_post"};
    char nm[96];
    double met;
    for (int run = 0; run < 2; run++) {
        lp_hooks_clear(m);
        lp_hook_capture(m, "blocks.*.hook_resid_*", NULL, 0, NULL);
        if (run == 0) cr_assert_eq(lp_model_metric(m, cx, 1, T, &mt, &met), LP_OK, "%s", lp_last_error());
        else cr_assert_eq(lp_model_grad(m, cl, 1, T, &mt, "blocks.*.hook_resid_*", &met), LP_OK, "%s", lp_last_error());
        for (int k = 0; k < 3; k++)
            for (int L = 0; L < nL; L++) {
                snprintf(nm, sizeof nm, "blocks.%d.%s", L, site[k]);
                float *v = grab(m, nm, nTD);
                if (run == 0) {
                    x[k][L] = v;
                    continue;
                }
                cv[k][L] = v;
                lp_tensor t;
                cr_assert_eq(lp_grad_get(m, nm, &t), LP_OK, "%s", lp_last_error());
                g[k][L] = malloc(nTD * sizeof(float));
                memcpy(g[k][L], t.data, nTD * sizeof(float));
            }
    }
    lp_hooks_clear(m);
    double worst = 0, scale = 0, got[16], want[16];
    int n = 0, per = c->n_heads + 2 * c->n_kv_heads + 1;
    for (int L = 0; L < nL; L++) {
        got[n] = 0;
        for (int j = L * per; j < L * per + per - 1; j++) got[n] += rs[j];
        want[n++] = dot_diff(x[0][L], cv[0][L], g[0][L], g[1][L], nTD);
        got[n] = rs[L * per + per - 1], want[n++] = dot_diff(x[1][L], cv[1][L], g[1][L], g[2][L], nTD);
    }
    got[n] = rs[nr - 1], want[n++] = dot_diff(x[2][nL - 1], cv[2][nL - 1], g[2][nL - 1], NULL, nTD);
    /* single head receivers of the last layer: the other heads' q/k/v patched with their own
     * values (the forward unchanged, their gradients stopped) */
    for (int i = 0; i < n_one; i++) {
        int j = lp_path_receiver_find(m, one[i]), L = nL - 1, h;
        char kind = one[i][strlen(one[i]) - 1];
        cr_assert(j >= 0 && sscanf(one[i], "blocks.%*d.attn.%*[a-z_].%d", &h) == 1, "%s", one[i]);
        lp_hooks_clear(m);
        snprintf(nm, sizeof nm, "blocks.%d.attn.hook_[qkv]", L);
        lp_hook_capture(m, nm, NULL, 0, NULL);
        cr_assert_eq(lp_model_metric(m, cl, 1, T, &mt, &met), LP_OK);
        float *own[3];
        static const char qkv[3] = {'q', 'k', 'v'};
        for (int p = 0; p < 3; p++) {
            snprintf(nm, sizeof nm, "blocks.%d.attn.hook_%c", L, qkv[p]);
            int64_t sh[LP_MAX_DIMS];
            int nd = lp_hook_shape(m, lp_hook_find(m, nm), 1, T, sh);
            size_t cnt = (size_t)lp_shape_numel(sh, nd);
            own[p] = grab(m, nm, cnt);
            int others[64], no = 0;
            for (int q = 0; q < sh[2]; q++)
                if (qkv[p] != kind || q != h) others[no++] = q;
            lp_edit_spec e = {.kind = LP_EDIT_PATCH, .src = own[p], .src_len = cnt, .heads = others, .nheads = no};
            if (no) cr_assert_eq(lp_hook_edit(m, nm, &e), LP_OK, "%s", lp_last_error());
        }
        snprintf(nm, sizeof nm, "blocks.%d.hook_resid_pre,blocks.%d.hook_resid_mid", L, L);
        cr_assert_eq(lp_model_grad(m, cl, 1, T, &mt, nm, &met), LP_OK, "%s", lp_last_error());
        lp_tensor gp, gm;
        snprintf(nm, sizeof nm, "blocks.%d.hook_resid_pre", L);
        cr_assert_eq(lp_grad_get(m, nm, &gp), LP_OK);
        snprintf(nm, sizeof nm, "blocks.%d.hook_resid_mid", L);
        cr_assert_eq(lp_grad_get(m, nm, &gm), LP_OK);
        char what[128];
        snprintf(what, sizeof what, "%s %s: Σ_S EAP vs Δinput . stopped backward", strstr(dir, "llama") ? "llama" : "gpt2", one[i]);
        expect_close(what, rs[j], dot_diff(x[0][L], cv[0][L], gp.data, gm.data, nTD), 1e-2);
        for (int p = 0; p < 3; p++) free(own[p]);
        lp_hooks_clear(m);
    }
    for (int i = 0; i < n; i++) scale = fmax(scale, fabs(want[i]));
    for (int i = 0; i < n; i++) worst = fmax(worst, fabs(got[i] - want[i]));
    printf("  %-11s %d receiver sums: max |Σ_S EAP(S->R) - Δinput . gradient| %.2e (max %.2e)\n", strstr(dir, "llama") ? "llama-tiny" : "gpt2-tiny", n, worst,
           scale);
    cr_expect_gt(scale, 1e-2);
    cr_expect_leq(worst, TOL_REL * scale + TOL_ABS, "receiver sums disagree by %.3e", worst);
    for (int k = 0; k < 3; k++)
        for (int L = 0; L < nL; L++) free(x[k][L]), free(cv[k][L]), free(g[k][L]);
    free(rs);
    lp_eap_result_free(&er);
    lp_model_free(m);
}

Test(paths, edge_scores_sum_to_the_receivers_input_attributions) {
    const char *g[] = {"blocks.1.attn.head.2.q", "blocks.1.attn.head.0.k", "blocks.1.attn.head.3.v"};
    receiver_sums(LP_FIXTURES "/gpt2-tiny", g, 3);
    const char *l[] = {"blocks.1.attn.head.1.q", "blocks.1.attn.kv_head.1.k", "blocks.1.attn.kv_head.0.v"};
    receiver_sums(LP_FIXTURES "/llama-tiny", l, 3);
}

/* ---- the command line: both sweeps, resumed, their files against the library ---- */

#include <cjson/cJSON.h>
#include <sys/wait.h>

static int run_cli(const char *dir, const char *args) {
    char cmd[2048];
    const char *bin = getenv("LOUPE_CLI") ? getenv("LOUPE_CLI") : "build/loupe";
    snprintf(cmd, sizeof cmd, "%s %s --model.device=cpu >%s/out.txt 2>%s/err.txt", bin, args, dir, dir);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static const float *scores_of(lp_st_file *f, const char *path, const char *name, int64_t n) {
    cr_assert_eq(lp_st_open(f, path), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *t = lp_st_find(f, name);
    cr_assert(t && lp_shape_numel(t->shape, t->ndim) == n, "%s: no %s of %lld values", path, name, (long long)n);
    return t->data;
}

Test(paths, cli_sweeps_match_the_library_and_resume, .timeout = 120) {
    char dir[64] = "/tmp/loupe-paths-XXXXXX", p[256], args[1024];
    cr_assert(mkdtemp(dir) != NULL);
    lp_model *m = load(LP_FIXTURES "/gpt2-tiny");
    int32_t cl[2][T], cx[2][T], ans[2], wr[2];
    snprintf(p, sizeof p, "%s/pairs.jsonl", dir);
    FILE *f = fopen(p, "w");
    for (int k = 0; k < 2; k++) {
        pair(m, 40 + k, cl[k], cx[k], &ans[k], &wr[k]);
        fprintf(f, "{\"clean\": [");
        for (int t = 0; t < T; t++) fprintf(f, "%s%d", t ? "," : "", cl[k][t]);
        fprintf(f, "], \"corrupted\": [");
        for (int t = 0; t < T; t++) fprintf(f, "%s%d", t ? "," : "", cx[k][t]);
        fprintf(f, "], \"answer\": %d, \"wrong_answer\": %d}\n", ans[k], wr[k]);
    }
    fclose(f);
    /* edge attribution: each pair's edges as the library gives them; circuit.json their mean */
    snprintf(args, sizeof args, "attribute " LP_FIXTURES "/gpt2-tiny --attrib.pairs=%s/pairs.jsonl --attrib.out=%s/eap --attrib.edges=true --attrib.top_edges=5",
             dir, dir);
    cr_assert_eq(run_cli(dir, args), 0);
    int ns = lp_path_n_senders(m), nr = lp_path_n_receivers(m);
    double *mean = calloc((size_t)ns * nr, sizeof(double)), worst = 0;
    for (int k = 0; k < 2; k++) {
        lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans[k], .wrong = &wr[k]};
        lp_eap_result er;
        cr_assert_eq(lp_eap(m, cl[k], cx[k], T, &mt, NULL, &er), LP_OK, "%s", lp_last_error());
        char path[300], name[64];
        snprintf(path, sizeof path, "%s/eap/scores-eap-%06d.safetensors", dir, k), snprintf(name, sizeof name, "pair%06d.eap.edges", k);
        lp_st_file sf;
        const float *v = scores_of(&sf, path, name, (int64_t)ns * nr);
        for (int i = 0; i < ns * nr; i++) worst = fmax(worst, fabs(v[i] - er.scores[i])), mean[i] += er.scores[i] / 2;
        lp_st_close(&sf);
        lp_eap_result_free(&er);
    }
    cr_expect_leq(worst, 1e-6, "the sweep's edge scores differ from lp_eap's by %.3e", worst);
    snprintf(p, sizeof p, "%s/eap/circuit.json", dir);
    size_t len;
    char *txt = lp_read_file(p, &len);
    cJSON *j = cJSON_Parse(txt);
    const cJSON *edges = cJSON_GetObjectItem(j, "edges"), *e0 = cJSON_GetArrayItem(edges, 0);
    cr_assert(e0, "circuit.json has no edges");
    cr_expect_eq(cJSON_GetObjectItem(j, "n_pairs")->valueint, 2);
    cr_expect_eq(cJSON_GetArraySize(edges), 5);
    int si = lp_path_sender_find(m, cJSON_GetObjectItem(e0, "source")->valuestring);
    int rj = lp_path_receiver_find(m, cJSON_GetObjectItem(e0, "receiver")->valuestring);
    double best = 0;
    for (int i = 0; i < ns * nr; i++) best = fmax(best, fabs(mean[i]));
    cr_assert(si >= 0 && rj >= 0);
    expect_close("circuit.json's top edge: its score, the mean of lp_eap's", cJSON_GetObjectItem(e0, "score")->valuedouble, mean[(size_t)si * nr + rj], 1e-2);
    cr_expect_float_eq(fabs(mean[(size_t)si * nr + rj]), best, 1e-9, "the top edge is not the largest by |mean|");
    cJSON_Delete(j), free(txt), free(mean);
    snprintf(p, sizeof p, "%s/eap/circuit.html", dir);
    txt = lp_read_file(p, &len);
    cr_expect(txt && strstr(txt, "<svg") && strstr(txt, "</html>") && !strstr(txt, "src=") && !strstr(txt, "href="), "circuit.html is not a page with an SVG");
    free(txt);
    /* a restart does nothing; one with other settings is refused */
    cr_expect_eq(run_cli(dir, args), 0);
    snprintf(p, sizeof p, "%s/out.txt", dir);
    txt = lp_read_file(p, &len);
    cr_expect(txt && strstr(txt, "0 pairs done (2 already"), "restart: %s", txt);
    free(txt);
    strcat(args, " --attrib.ig_steps=2");
    cr_expect_eq(run_cli(dir, args), 2);
    /* path patching: the effects as lp_path_patch gives them */
    snprintf(args, sizeof args, "patch " LP_FIXTURES "/gpt2-tiny --attrib.pairs=%s/pairs.jsonl --attrib.out=%s/pp --patch.kind=path "
             "--path.sender=blocks.0.attn.head.1,embed --path.receivers=blocks.1.attn.head.0.q,blocks.1.mlp,logits", dir, dir);
    cr_assert_eq(run_cli(dir, args), 0);
    int snd[2] = {lp_path_sender_find(m, "blocks.0.attn.head.1"), 0};
    int rcv[3] = {lp_path_receiver_find(m, "blocks.1.attn.head.0.q"), lp_path_receiver_find(m, "blocks.1.mlp"), lp_path_receiver_find(m, "logits")};
    for (int k = 0; k < 2; k++) {
        lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = &ans[k], .wrong = &wr[k]};
        char path[300], name[64];
        snprintf(path, sizeof path, "%s/pp/scores-path-%06d.safetensors", dir, k), snprintf(name, sizeof name, "pair%06d.path.effect", k);
        lp_st_file sf;
        const float *v = scores_of(&sf, path, name, 2);
        for (int i = 0; i < 2; i++) {
            double a, b, eff;
            cr_assert_eq(lp_path_patch(m, cl[k], cx[k], T, &mt, snd[i], rcv, 3, NULL, &a, &b, &eff), LP_OK, "%s", lp_last_error());
            cr_expect_float_eq(v[i], eff, 1e-6 + 1e-6 * fabs(eff), "pair %d sender %d: %g vs %g", k, i, v[i], eff);
        }
        lp_st_close(&sf);
    }
    snprintf(args, sizeof args, "patch " LP_FIXTURES "/gpt2-tiny --attrib.pairs=%s/pairs.jsonl --attrib.out=%s/pp2 --patch.kind=path "
             "--path.sender=blocks.1.mlp --path.receivers=blocks.1.attn.head.0.q", dir, dir);
    cr_expect_eq(run_cli(dir, args), 2, "a receiver upstream of the sender is bad usage");
    lp_model_free(m);
    snprintf(args, sizeof args, "rm -rf %s", dir);
    cr_expect(system(args) == 0);
}
