/* gemma_test.h: what test_gemma.c (CPU) and test_gemma_cuda.c share: the tiny Gemma 2 and
 * Gemma 3 fixtures, the budgets, and the comparisons of logits, loss, every hook's value and
 * the loss's gradient at every hook against TransformerLens / Hugging Face in float64, on
 * either device. The fixtures, the flattening convention of q_norm / k_norm and every budget
 * with its reason are described at the top of test_gemma.c. */
#ifndef LOUPE_GEMMA_TEST_H
#define LOUPE_GEMMA_TEST_H

#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "loupe/safetensors.h"
#include "testutil.h"

static const double LOGITS_MAX_REL = 1e-4;
static const double HOOK_NMSE = 1e-9;
static const double LOSS_ABS = 1e-4;
static const double GRAD_NMSE = 1e-9;

/* What each fixture's config.json says (tests/gen/gen_gemma_fixture.py SPECS). */
typedef struct tiny {
    const char *name;
    int n_layers, qk_norm, hooks_per_block;
} tiny;

static const tiny GEMMA2 = {"gemma2-tiny", 3, 0, 24};
static const tiny GEMMA3 = {"gemma3-tiny", 6, 1, 28};
enum { D_MODEL = 36, N_HEADS = 4, N_KV = 2, D_HEAD = 8, D_MLP = 40, N_CTX = 64, D_VOCAB = 131 };

static inline void open_ref(lp_st_file *ref, const tiny *f) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s/reference.safetensors", LP_FIXTURES, f->name);
    cr_assert_eq(lp_st_open(ref, p), LP_OK, "%s", lp_last_error());
}

static inline const lp_st_tensor *R(const lp_st_file *ref, const char *name) {
    const lp_st_tensor *t = lp_st_find(ref, name);
    cr_assert(t != NULL, "reference tensor %s missing from %s", name, ref->path);
    return t;
}

static inline lp_model *load(const tiny *f, lp_device dev) {
    char d[512];
    snprintf(d, sizeof d, "%s/%s", LP_FIXTURES, f->name);
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, d, dev, LP_F32), LP_OK, "%s: %s", f->name, lp_last_error());
    return m;
}

/* Reference keys that are not hooks. */
static inline int is_meta_key(const char *k) {
    return strcmp(k, "tokens") == 0 || strcmp(k, "logits") == 0 || strcmp(k, "loss") == 0 || strncmp(k, "grad.", 5) == 0;
}

static inline int tl_flattens(const char *hook) { return strstr(hook, ".q_norm.") != NULL || strstr(hook, ".k_norm.") != NULL; }

/* loupe's shape of hook `h` (shape[0..nd)) against TransformerLens's r, flattening as above. */
static inline void expect_shape(const char *what, const char *h, const int64_t *shape, int nd, const lp_st_tensor *r, int B, int T) {
    if (tl_flattens(h)) {
        cr_expect(nd == 4 && r->ndim == 2, "%s: rank %d, TransformerLens %d (expected [B, T, H, x] and [B*T*H, x])", what, nd, r->ndim);
        if (nd != 4 || r->ndim != 2) return;
        cr_expect(shape[0] == B && shape[1] == T && shape[0] * shape[1] * shape[2] == r->shape[0] && shape[3] == r->shape[1],
                  "%s: [%lld, %lld, %lld, %lld], TransformerLens [%lld, %lld]", what, (long long)shape[0], (long long)shape[1],
                  (long long)shape[2], (long long)shape[3], (long long)r->shape[0], (long long)r->shape[1]);
        return;
    }
    cr_expect_eq(nd, r->ndim, "%s: rank %d, TransformerLens %d", what, nd, r->ndim);
    for (int d = 0; d < nd && d < r->ndim; d++)
        cr_expect_eq(shape[d], r->shape[d], "%s: dim %d = %lld, TransformerLens %lld", what, d, (long long)shape[d],
                     (long long)r->shape[d]);
}

/* Mean next-token loss of the last forward over every predicted position. */
static inline double mean_loss(lp_model *m, int B, int T) {
    const float *l = lp_model_losses(m);
    cr_assert(l != NULL);
    double s = 0;
    for (int i = 0; i < B * (T - 1); i++) s += l[i];
    return s / (B * (T - 1));
}

/* ---- logits, loss and every hook's value ---- */

static inline void parity(const tiny *f, lp_device dev) {
    lp_st_file ref;
    open_ref(&ref, f);
    lp_model *m = load(f, dev);
    const lp_st_tensor *tok = R(&ref, "tokens");
    cr_assert_eq(tok->dtype, LP_I32);
    int B = (int)tok->shape[0], T = (int)tok->shape[1];
    cr_assert_eq(lp_hook_capture(m, "*", NULL, 0, NULL), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_forward(m, tok->data, B, T, LP_WANT_LOGITS | LP_WANT_LOSS), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *lg = R(&ref, "logits");
    char what[192];
    snprintf(what, sizeof what, "%s%s logits", f->name, dev == LP_CUDA ? " cuda" : "");
    cr_assert(lp_model_logits(m) != NULL, "%s: no logits", f->name);
    LP_EXPECT_WITHIN(what, 0, lp_compare_f(lp_model_logits(m), lg->data, lg->nbytes / 4), max_rel, LOGITS_MAX_REL);
    double want = *(const float *)R(&ref, "loss")->data, got = mean_loss(m, B, T);
    fprintf(stderr, "  %-40s loss %.6f, reference %.6f\n", f->name, got, want);
    cr_expect(fabs(got - want) <= LOSS_ABS, "%s: loss %.6f, reference %.6f", f->name, got, want);
    int compared = 0;
    for (int id = 0; id < lp_hook_count(m); id++) {
        const char *h = lp_hook_name(m, id);
        const lp_st_tensor *r = lp_st_find(&ref, h);
        if (!r) continue; /* reported by same_hooks */
        snprintf(what, sizeof what, "%s%s %s", f->name, dev == LP_CUDA ? " cuda" : "", h);
        int64_t shape[LP_MAX_DIMS];
        int nd = lp_hook_shape(m, id, B, T, shape);
        expect_shape(what, h, shape, nd, r, B, T);
        lp_tensor t;
        cr_assert_eq(lp_capture_get(m, h, &t), LP_OK, "%s: %s", what, lp_last_error());
        cr_assert_eq(t.dtype, LP_F32, "%s: capture dtype", what);
        expect_shape(what, h, t.shape, t.ndim, r, B, T);
        cr_assert_eq((size_t)lp_shape_numel(t.shape, t.ndim), r->nbytes / 4, "%s: %lld values, TransformerLens %zu", what,
                     (long long)lp_shape_numel(t.shape, t.ndim), r->nbytes / 4);
        LP_EXPECT_WITHIN(what, 0, lp_compare_f(t.data, r->data, r->nbytes / 4), nmse, HOOK_NMSE);
        compared++;
    }
    cr_expect_eq(compared, lp_hook_count(m), "%s: compared %d of %d hooks", f->name, compared, lp_hook_count(m));
    lp_model_free(m);
    lp_st_close(&ref);
}

/* ---- the loss's gradient at every hook ---- */

/* The reference gradient at blocks.L.ln1.hook_normalized and ln1.hook_scale. TransformerLens
 * applies ln1 three times, to the query, key and value inputs (components/transformer_block.py),
 * so those hooks fire three times and run_with_cache keeps the last backward call's gradient:
 * the query path's alone, not the loss's gradient there (test_gemma.c checks the fixture is
 * so). The whole gradient, the one loupe gives, is formed here from the fixture: at each
 * position, with g_q, g_k, g_v the gradients at attn.hook_q, hook_k, hook_v (complete: each of
 * those hooks fires once) and n, s ln1's hook_normalized and hook_scale,
 *   dn = (1 + w_ln1) * (W_Q^T g_q + W_K^T g_k + W_V^T g_v),   ds = -sum_i dn_i n_i / s
 * (HF's q_proj/k_proj/v_proj weights [out, d_model] from the checkpoint; Gemma's RMSNorm
 * multiplies by 1 + w). With only_q set, the W_K and W_V terms are left out: what the fixture
 * holds. In double from the float32-stored values: torch autograd's sum of the three calls is
 * matched to max_rel 4e-8 (dn) and 9e-8 (ds). */
static inline void ln1_grad_reference(const tiny *f, const lp_st_file *ref, int L, int only_q, double *dn, double *ds, size_t N) {
    char p[512], k[192];
    snprintf(p, sizeof p, "%s/%s/model.safetensors", LP_FIXTURES, f->name);
    lp_st_file w;
    cr_assert_eq(lp_st_open(&w, p), LP_OK, "%s", lp_last_error());
    snprintf(k, sizeof k, "model.layers.%d.input_layernorm.weight", L);
    const lp_st_tensor *lw = R(&w, k);
    cr_assert(lw->dtype == LP_F32 && lw->nbytes == D_MODEL * sizeof(float), "%s: %s", p, k);
    const float *ln_w = lw->data;
    memset(dn, 0, N * D_MODEL * sizeof(double));
    static const char *const proj[] = {"q", "k", "v"};
    for (int x = 0; x < (only_q ? 1 : 3); x++) {
        snprintf(k, sizeof k, "model.layers.%d.self_attn.%s_proj.weight", L, proj[x]);
        const lp_st_tensor *W = R(&w, k);
        snprintf(k, sizeof k, "grad.blocks.%d.attn.hook_%s", L, proj[x]);
        const lp_st_tensor *g = R(ref, k);
        size_t out = (size_t)W->shape[0];
        cr_assert(W->dtype == LP_F32 && W->shape[1] == D_MODEL && g->nbytes == N * out * sizeof(float), "%s", k);
        const float *Wv = W->data, *gv = g->data;
        for (size_t r = 0; r < N; r++)
            for (size_t j = 0; j < out; j++) {
                double gj = gv[r * out + j];
                for (int i = 0; i < D_MODEL; i++) dn[r * D_MODEL + i] += gj * Wv[j * D_MODEL + i];
            }
    }
    for (size_t r = 0; r < N; r++)
        for (int i = 0; i < D_MODEL; i++) dn[r * D_MODEL + i] *= 1.0 + ln_w[i];
    snprintf(k, sizeof k, "blocks.%d.ln1.hook_normalized", L);
    const float *n = R(ref, k)->data;
    snprintf(k, sizeof k, "blocks.%d.ln1.hook_scale", L);
    const float *s = R(ref, k)->data;
    for (size_t r = 0; r < N; r++) {
        double t = 0;
        for (int i = 0; i < D_MODEL; i++) t += dn[r * D_MODEL + i] * n[r * D_MODEL + i];
        ds[r] = -t / s[r];
    }
    lp_st_close(&w);
}

/* The layer of a blocks.L.ln1.hook_normalized / ln1.hook_scale hook, else -1. */
static inline int ln1_layer(const char *h) {
    int L, len = 0;
    char rest[64];
    if (sscanf(h, "blocks.%d.ln1.%63s%n", &L, rest, &len) == 2 && h[len] == '\0' &&
        (strcmp(rest, "hook_normalized") == 0 || strcmp(rest, "hook_scale") == 0))
        return L;
    return -1;
}

/* nmse of got / B against want[0..n), leaving out the pattern's entries outside the window
 * (scores: the fixture's attn.hook_attn_scores of the layer, -inf there; NULL: keep all). */
static inline void expect_grad(const char *what, const float *got, int B, const double *want, size_t n, const float *scores) {
    float *a = malloc(n * sizeof(float));
    double *b = malloc(n * sizeof(double));
    cr_assert(a && b);
    size_t kept = 0;
    for (size_t i = 0; i < n; i++) {
        if (scores && isinf(scores[i])) continue;
        a[kept] = got[i] / B;
        b[kept++] = want[i];
    }
    cr_assert(kept > 0, "%s: nothing to compare", what);
    LP_EXPECT_WITHIN(what, 0, lp_compare(a, b, kept), nmse, GRAD_NMSE);
    free(a), free(b);
}

/* The reference gradient at hook h (n values) into want; the pattern's mask into *scores. */
static inline void grad_reference(const tiny *f, const lp_st_file *ref, const char *h, const lp_st_tensor *r, double *want,
                                  size_t n, const float **scores) {
    *scores = NULL;
    int L = ln1_layer(h);
    if (L >= 0) {
        size_t N = r->shape[0] * r->shape[1];
        double *dn = malloc(N * D_MODEL * sizeof(double)), *ds = malloc(N * sizeof(double));
        cr_assert(dn && ds);
        ln1_grad_reference(f, ref, L, 0, dn, ds, N);
        memcpy(want, strstr(h, "hook_scale") ? ds : dn, n * sizeof(double));
        free(dn), free(ds);
        return;
    }
    const float *rv = r->data;
    for (size_t i = 0; i < n; i++) want[i] = rv[i];
    const char *pat = strstr(h, ".attn.hook_pattern");
    if (pat) {
        char k[192];
        snprintf(k, sizeof k, "%.*s.attn.hook_attn_scores", (int)(pat - h), h);
        const lp_st_tensor *sc = R(ref, k);
        cr_assert_eq(sc->nbytes, r->nbytes);
        *scores = sc->data;
    }
}

static inline void gradients(const tiny *f, lp_device dev) {
    lp_st_file ref;
    open_ref(&ref, f);
    lp_model *m = load(f, dev);
    const lp_st_tensor *tok = R(&ref, "tokens");
    int B = (int)tok->shape[0], T = (int)tok->shape[1];
    lp_metric mt = {.kind = LP_METRIC_MEAN_LOSS};
    double met[8];
    cr_assert(B <= 8);
    cr_assert_eq(lp_model_grad(m, tok->data, B, T, &mt, "*", met), LP_OK, "%s: %s", f->name, lp_last_error());
    double mean = 0, want = *(const float *)R(&ref, "loss")->data;
    for (int b = 0; b < B; b++) mean += met[b] / B;
    cr_expect(fabs(mean - want) <= LOSS_ABS, "%s: mean-loss metric %.6f, reference loss %.6f", f->name, mean, want);
    int checked = 0;
    for (int id = 0; id < lp_hook_count(m); id++) {
        const char *h = lp_hook_name(m, id);
        char key[192], what[192];
        snprintf(key, sizeof key, "grad.%s", h);
        const lp_st_tensor *r = lp_st_find(&ref, key);
        if (!r) continue; /* reported by same_hooks */
        snprintf(what, sizeof what, "%s%s d loss / d %s", f->name, dev == LP_CUDA ? " cuda" : "", h);
        lp_tensor g;
        cr_assert_eq(lp_grad_get(m, h, &g), LP_OK, "%s: %s", what, lp_last_error());
        cr_assert_eq(g.dtype, LP_F32, "%s: gradient dtype", what);
        expect_shape(what, h, g.shape, g.ndim, r, B, T);
        size_t n = r->nbytes / 4;
        cr_assert_eq((size_t)lp_shape_numel(g.shape, g.ndim), n, "%s: %lld values, TransformerLens %zu", what,
                     (long long)lp_shape_numel(g.shape, g.ndim), n);
        double *want = malloc(n * sizeof(double));
        cr_assert(want != NULL);
        const float *scores;
        grad_reference(f, &ref, h, r, want, n, &scores);
        expect_grad(what, g.data, B, want, n, scores);
        free(want);
        checked++;
    }
    cr_expect_eq(checked, lp_hook_count(m), "%s: gradients at %d of %d hooks", f->name, checked, lp_hook_count(m));
    lp_model_free(m);
    lp_st_close(&ref);
}

#endif
