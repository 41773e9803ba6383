/* sae_ref.h: what the SAE file tests with a float64 reference (test_sae_io.c,
 * test_sae_io_fixtures.c) share: a host copy of an SAE's parameters, made-up SAEs, the
 * float64 encode/decode/forward of the four architectures written here independently of
 * host/sae/, and the comparison with outputs recorded in a reference file. Budgets: see
 * test_sae_io.c. */
#ifndef LOUPE_TEST_SAE_REF_H
#define LOUPE_TEST_SAE_REF_H

#include "sae_io_test.h"

static const double REF_MAX_REL = 1e-9;    /* float64 against float64 */
static const double FOLD_MAX_REL = 1e-6;   /* float32 rounding of folded parameters */

/* ---- a host copy of the parameters ---- */

typedef struct host_sae {
    lp_sae s; /* cfg and pointers into img */
    float *img;
} host_sae;

static inline host_sae host_copy(const lp_sae *d) {
    host_sae h = {.s = *d};
    h.img = malloc(d->n_floats * sizeof(float));
    cr_assert(h.img != NULL);
    cr_assert_eq(lp_ctx_to_host(&ctx, h.img, d->mem, d->n_floats * sizeof(float)), LP_OK);
    const float *base = d->mem;
#define REBASE(p) h.s.p = d->p ? h.img + (d->p - base) : NULL
    REBASE(W_enc); REBASE(b_enc); REBASE(W_dec); REBASE(b_dec); REBASE(threshold); REBASE(W_skip);
#undef REBASE
    h.s.mem = h.img;
    return h;
}

/* Random parameters (seeded) on the device, in ranges that give a few active latents. */
static inline lp_sae *make_sae(lp_sae_cfg cfg, uint64_t seed) {
    lp_sae *s;
    cr_assert_eq(lp_sae_alloc(&s, &cfg, &ctx), LP_OK, "%s", lp_last_error());
    host_sae h = host_copy(s);
    const lp_sae_cfg *c = &cfg;
    lp_test_fill(h.s.W_enc, (size_t)c->d_in * c->d_sae, seed + 1, -0.6f, 0.6f);
    lp_test_fill(h.s.b_enc, c->d_sae, seed + 2, -0.3f, 0.3f);
    lp_test_fill(h.s.W_dec, (size_t)c->d_sae * c->d_out, seed + 3, -0.5f, 0.5f);
    lp_test_fill(h.s.b_dec, c->d_out, seed + 4, -0.3f, 0.3f);
    if (h.s.threshold) lp_test_fill(h.s.threshold, c->d_sae, seed + 5, 0.2f, 1.0f);
    if (h.s.W_skip) lp_test_fill(h.s.W_skip, (size_t)c->d_in * c->d_out, seed + 6, -0.3f, 0.3f);
    cr_assert_eq(lp_ctx_to_device(&ctx, s->mem, h.img, s->n_floats * sizeof(float)), LP_OK);
    free(h.img);
    return s;
}

static inline lp_sae_cfg mkcfg(lp_sae_arch arch, int d_in, int d_sae, int d_out, int k, int apply, int skip) {
    lp_sae_cfg c = {.arch = arch, .d_in = d_in, .d_sae = d_sae, .d_out = d_out, .k = k,
                    .apply_b_dec_to_input = apply, .skip = skip, .jumprelu_bandwidth = 0.05f, .normalize = "none",
                    .model_name = "gpt2", .hook_name = "blocks.1.hook_resid_post", .context_size = 128};
    if (d_out != d_in || skip) snprintf(c.hook_name_out, sizeof c.hook_name_out, "blocks.1.hook_mlp_out");
    return c;
}

/* ---- the float64 reference: encode, decode, forward of the four architectures ---- */

/* pre[N,S] = (x * xs - b_dec?) W_enc + b_enc for x [N, d_in] */
static inline void ref_pre(const lp_sae *h, const float *x, int N, double xs, double *pre) {
    const lp_sae_cfg *c = &h->cfg;
    for (int n = 0; n < N; n++)
        for (int j = 0; j < c->d_sae; j++) {
            double acc = h->b_enc[j];
            for (int i = 0; i < c->d_in; i++) {
                double xi = (double)x[(size_t)n * c->d_in + i] * xs - (c->apply_b_dec_to_input ? h->b_dec[i] : 0.0);
                acc += xi * h->W_enc[(size_t)i * c->d_sae + j];
            }
            pre[(size_t)n * c->d_sae + j] = acc;
        }
}

/* Keeps the `keep` largest of v[0..n) (ties: lower index first), relu'd; zeroes the rest. */
static inline void keep_top(double *v, size_t n, size_t keep) {
    char *sel = calloc(n, 1);
    for (size_t t = 0; t < keep && t < n; t++) {
        size_t best = SIZE_MAX;
        for (size_t i = 0; i < n; i++)
            if (!sel[i] && (best == SIZE_MAX || v[i] > v[best])) best = i;
        sel[best] = 1;
    }
    for (size_t i = 0; i < n; i++) v[i] = sel[i] && v[i] > 0 ? v[i] : 0;
    free(sel);
}

static inline double *ref_encode(const lp_sae *h, const float *x, int N, double xs) {
    const lp_sae_cfg *c = &h->cfg;
    size_t S = (size_t)c->d_sae;
    double *f = malloc((size_t)N * S * sizeof *f);
    ref_pre(h, x, N, xs, f);
    switch (c->arch) {
    case LP_SAE_STANDARD:
        for (size_t i = 0; i < (size_t)N * S; i++) f[i] = f[i] > 0 ? f[i] : 0;
        break;
    case LP_SAE_TOPK:
        for (int n = 0; n < N; n++) keep_top(f + (size_t)n * S, S, (size_t)c->k);
        break;
    case LP_SAE_BATCHTOPK: /* over the whole batch: relu first, then the k * N largest */
        for (size_t i = 0; i < (size_t)N * S; i++) f[i] = f[i] > 0 ? f[i] : 0;
        keep_top(f, (size_t)N * S, (size_t)c->k * N);
        break;
    case LP_SAE_JUMPRELU: /* SAELens: relu(pre) * (pre > threshold) */
        for (size_t i = 0; i < (size_t)N * S; i++) f[i] = f[i] > h->threshold[i % S] && f[i] > 0 ? f[i] : 0;
        break;
    }
    return f;
}

/* What the unfolded SAE's outputs are divided by when its inputs were scaled by xs: an SAE
 * reconstructs its scaled input (xs); a transcoder predicts its raw target (1). */
static inline double out_scale(const lp_sae_cfg *c, double xs) {
    return c->d_out != c->d_in || c->hook_name_out[0] ? 1.0 : xs;
}

/* out[N, d_out] = (f W_dec + b_dec) / ys */
static inline double *ref_decode(const lp_sae *h, const double *f, int N, double ys) {
    const lp_sae_cfg *c = &h->cfg;
    double *out = malloc((size_t)N * c->d_out * sizeof *out);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < c->d_out; o++) {
            double acc = h->b_dec[o];
            for (int j = 0; j < c->d_sae; j++) acc += f[(size_t)n * c->d_sae + j] * h->W_dec[(size_t)j * c->d_out + o];
            out[(size_t)n * c->d_out + o] = acc / ys;
        }
    return out;
}

/* (decode(encode(x * xs)) + x xs W_skip) / out_scale */
static inline double *ref_forward(const lp_sae *h, const float *x, int N, double xs) {
    const lp_sae_cfg *c = &h->cfg;
    double ys = out_scale(c, xs);
    double *f = ref_encode(h, x, N, xs), *out = ref_decode(h, f, N, ys);
    if (h->W_skip)
        for (int n = 0; n < N; n++)
            for (int o = 0; o < c->d_out; o++) {
                double acc = 0;
                for (int i = 0; i < c->d_in; i++) acc += (double)x[(size_t)n * c->d_in + i] * xs * h->W_skip[(size_t)i * c->d_out + o];
                out[(size_t)n * c->d_out + o] += acc / ys;
            }
    free(f);
    return out;
}

/* lp_compare for double results */
static inline lp_cmp compare_d(const double *a, const double *ref, size_t n) {
    lp_cmp c = {0};
    double num = 0, den = 0, maxref = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) { c.n_bad++; continue; }
        double d = a[i] - ref[i];
        num += d * d, den += ref[i] * ref[i];
        if (fabs(ref[i]) > maxref) maxref = fabs(ref[i]);
        if (fabs(d) > c.max_abs) c.max_abs = fabs(d), c.worst = i;
    }
    c.nmse = den > 0 ? num / den : num;
    c.max_rel = maxref > 0 ? c.max_abs / maxref : c.max_abs;
    return c;
}

/* ---- reference files ---- */

static inline const lp_st_tensor *ref_t(const lp_st_file *f, const char *name, lp_dtype dt, int64_t rows, int64_t cols) {
    const lp_st_tensor *t = lp_st_find(f, name);
    cr_assert(t != NULL, "%s: no tensor %s", f->path, name);
    cr_assert(t->dtype == dt && t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols,
              "%s: %s has the wrong dtype or shape", f->path, name);
    return t;
}

static inline double *ref_f64(const lp_st_file *f, const char *name, int64_t rows, int64_t cols) {
    const lp_st_tensor *t = ref_t(f, name, LP_F64, rows, cols);
    double *v = malloc(t->nbytes);
    memcpy(v, t->data, t->nbytes);
    return v;
}

static inline float *ref_x(const lp_st_file *f, const char *prefix, int d_in, int *N) {
    char name[128];
    snprintf(name, sizeof name, "%s.x", prefix);
    const lp_st_tensor *t = lp_st_find(f, name);
    cr_assert(t && t->dtype == LP_F32 && t->ndim == 2 && t->shape[1] == d_in, "%s: bad %s", f->path, name);
    *N = (int)t->shape[0];
    float *x = malloc(t->nbytes);
    memcpy(x, t->data, t->nbytes);
    return x;
}

/* Checks h (loaded by loupe, raw inputs scaled by xs before it; outputs / out_scale) against the
 * recorded <prefix>.encode / .decode (/ .forward) of the project that wrote the file. */
static inline void expect_outputs(const lp_st_file *ref, const char *prefix, const lp_sae *h, double xs, double budget) {
    const lp_sae_cfg *c = &h->cfg;
    int N;
    float *x = ref_x(ref, prefix, c->d_in, &N);
    char name[128], what[160];
    snprintf(name, sizeof name, "%s.encode", prefix);
    double *want_f = ref_f64(ref, name, N, c->d_sae);
    double *f = ref_encode(h, x, N, xs);
    snprintf(what, sizeof what, "%s encode", prefix);
    LP_EXPECT_WITHIN(what, 0, compare_d(f, want_f, (size_t)N * c->d_sae), max_rel, budget);
    /* decode of the project's own activations */
    snprintf(name, sizeof name, "%s.decode", prefix);
    double *want_d = ref_f64(ref, name, N, c->d_out);
    double *d = ref_decode(h, want_f, N, out_scale(c, xs));
    snprintf(what, sizeof what, "%s decode", prefix);
    LP_EXPECT_WITHIN(what, 0, compare_d(d, want_d, (size_t)N * c->d_out), max_rel, budget);
    snprintf(name, sizeof name, "%s.forward", prefix);
    if (lp_st_find(ref, name)) {
        double *want_y = ref_f64(ref, name, N, c->d_out), *y = ref_forward(h, x, N, xs);
        snprintf(what, sizeof what, "%s forward", prefix);
        LP_EXPECT_WITHIN(what, 0, compare_d(y, want_y, (size_t)N * c->d_out), max_rel, budget);
        free(want_y), free(y);
    }
    free(x), free(want_f), free(f), free(want_d), free(d);
}

static inline int same_params(const lp_sae *a, const lp_sae *b) {
    if (a->n_floats != b->n_floats) return 0;
    host_sae x = host_copy(a), y = host_copy(b);
    int same = memcmp(x.img, y.img, a->n_floats * sizeof(float)) == 0;
    free(x.img), free(y.img);
    return same;
}

#endif
