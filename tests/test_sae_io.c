/* test_sae_io.c: SAE files (host/sae/) against the projects that define them.
 *
 * - SAELens 6.5.3 wrote saelens_*: each loads, and a float64 reference encode/decode of
 *   the loaded parameters (below) matches SAELens's own outputs recorded by
 *   tests/gen/gen_sae_fixture.py; so do the Gemma Scope (params.npz, params.safetensors)
 *   and sparsify fixtures (orientation: encoder.weight is transposed on load).
 * - loupe_written/ is what lp_sae_save writes from fixed weights (regenerate with
 *   LOUPE_WRITE_SAE_FIXTURE=1); a fresh save must reproduce it, and SAELens's outputs on it
 *   (recorded by the generator) must equal loupe's unfolded SAE on scaled inputs.
 * - save -> load is exact; the scale folds as SAELens's fold_activation_norm_scaling_factor
 *   (a transcoder: its input side only);
 *   batchtopk saves as jumprelu with its global threshold. Bad input: test_sae_io_bad.c.
 *
 * Budgets (max |diff| / max |ref|): the reference encode here and SAELens both compute in
 * float64 from the same float32 numbers: 1e-9 (seen: ~1e-16). Where the float32 parameters
 * were rescaled (folding) the rounding of W * s is visible: 1e-6 (seen: ~1e-7). The inputs
 * keep every latent's selection 1e-3 away from a tie or threshold. */
#include "sae_io_test.h"

static const double REF_MAX_REL = 1e-9;    /* float64 against float64 */
static const double FOLD_MAX_REL = 1e-6;   /* float32 rounding of folded parameters */

/* ---- a host copy of the parameters ---- */

typedef struct host_sae {
    lp_sae s; /* cfg and pointers into img */
    float *img;
} host_sae;

static host_sae host_copy(const lp_sae *d) {
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
static lp_sae *make_sae(lp_sae_cfg cfg, uint64_t seed) {
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

static lp_sae_cfg mkcfg(lp_sae_arch arch, int d_in, int d_sae, int d_out, int k, int apply, int skip) {
    lp_sae_cfg c = {.arch = arch, .d_in = d_in, .d_sae = d_sae, .d_out = d_out, .k = k,
                    .apply_b_dec_to_input = apply, .skip = skip, .jumprelu_bandwidth = 0.05f, .normalize = "none",
                    .model_name = "gpt2", .hook_name = "blocks.1.hook_resid_post", .context_size = 128};
    if (d_out != d_in || skip) snprintf(c.hook_name_out, sizeof c.hook_name_out, "blocks.1.hook_mlp_out");
    return c;
}

/* ---- the float64 reference: encode, decode, forward of the four architectures ---- */

/* pre[N,S] = (x * xs - b_dec?) W_enc + b_enc for x [N, d_in] */
static void ref_pre(const lp_sae *h, const float *x, int N, double xs, double *pre) {
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
static void keep_top(double *v, size_t n, size_t keep) {
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

static double *ref_encode(const lp_sae *h, const float *x, int N, double xs) {
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
static double out_scale(const lp_sae_cfg *c, double xs) {
    return c->d_out != c->d_in || c->hook_name_out[0] ? 1.0 : xs;
}

/* out[N, d_out] = (f W_dec + b_dec) / ys */
static double *ref_decode(const lp_sae *h, const double *f, int N, double ys) {
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
static double *ref_forward(const lp_sae *h, const float *x, int N, double xs) {
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
static lp_cmp compare_d(const double *a, const double *ref, size_t n) {
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

static const lp_st_tensor *ref_t(const lp_st_file *f, const char *name, lp_dtype dt, int64_t rows, int64_t cols) {
    const lp_st_tensor *t = lp_st_find(f, name);
    cr_assert(t != NULL, "%s: no tensor %s", f->path, name);
    cr_assert(t->dtype == dt && t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols,
              "%s: %s has the wrong dtype or shape", f->path, name);
    return t;
}

static double *ref_f64(const lp_st_file *f, const char *name, int64_t rows, int64_t cols) {
    const lp_st_tensor *t = ref_t(f, name, LP_F64, rows, cols);
    double *v = malloc(t->nbytes);
    memcpy(v, t->data, t->nbytes);
    return v;
}

static float *ref_x(const lp_st_file *f, const char *prefix, int d_in, int *N) {
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
static void expect_outputs(const lp_st_file *ref, const char *prefix, const lp_sae *h, double xs, double budget) {
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

/* ---- the config and the allocation ---- */

Test(sae_io, arch_names) {
    for (int a = 0; a < 4; a++) cr_expect_eq(lp_sae_arch_parse(lp_sae_arch_name((lp_sae_arch)a)), a);
    cr_expect_str_eq(lp_sae_arch_name(LP_SAE_BATCHTOPK), "batchtopk");
    cr_expect_eq(lp_sae_arch_parse("gated"), -1);
    cr_expect_eq(lp_sae_arch_parse(NULL), -1);
    cr_expect_str_eq(lp_sae_arch_name((lp_sae_arch)42), "unknown");
}

static void expect_cfg_error(lp_sae_cfg c, const char *phrase) {
    lp_status st = lp_sae_cfg_check(&c);
    cr_expect_eq(st, LP_ERR_ARG, "expected a rejection mentioning '%s'", phrase);
    cr_expect(strstr(lp_last_error(), phrase) != NULL, "message '%s' lacks '%s'", lp_last_error(), phrase);
    lp_sae *s = (lp_sae *)1;
    cr_expect_eq(lp_sae_alloc(&s, &c, &ctx), LP_ERR_ARG);
    cr_expect(s == NULL);
}

Test(sae_io, cfg_check) {
    lp_sae_cfg ok = mkcfg(LP_SAE_TOPK, 16, 64, 16, 4, 1, 0);
    cr_expect_eq(lp_sae_cfg_check(&ok), LP_OK, "%s", lp_last_error());
    lp_sae_cfg c;
    c = ok, c.d_in = 0; expect_cfg_error(c, "d_in");
    c = ok, c.d_sae = -1; expect_cfg_error(c, "d_sae");
    c = ok, c.d_out = 0; expect_cfg_error(c, "d_out");
    c = ok, c.k = 0; expect_cfg_error(c, "k = 0");
    c = ok, c.k = 65; expect_cfg_error(c, "k = 65");
    c = ok, c.arch = LP_SAE_BATCHTOPK, c.k = 0; expect_cfg_error(c, "batchtopk");
    c = ok, c.arch = (lp_sae_arch)9; expect_cfg_error(c, "architecture");
    c = ok, snprintf(c.normalize, sizeof c.normalize, "layer_norm"); expect_cfg_error(c, "normalize");
    c = ok, c.apply_b_dec_to_input = 2; expect_cfg_error(c, "apply_b_dec_to_input");
    c = ok, c.d_out = 24; expect_cfg_error(c, "apply_b_dec_to_input");
    c = ok, c.skip = 3; expect_cfg_error(c, "skip");
    c = ok, c.jumprelu_bandwidth = NAN; expect_cfg_error(c, "jumprelu_bandwidth");
    c = ok, c.context_size = -1; expect_cfg_error(c, "context_size");
    c = ok, memset(c.hook_name, 'a', sizeof c.hook_name); expect_cfg_error(c, "hook_name");
    c = ok, c.d_in = c.d_out = 1 << 30, c.d_sae = 1 << 30; expect_cfg_error(c, "too large");
    c = ok, c.arch = LP_SAE_STANDARD, c.k = 0; /* k is only read for topk and batchtopk */
    cr_expect_eq(lp_sae_cfg_check(&c), LP_OK, "%s", lp_last_error());
}

Test(sae_io, alloc_layout) {
    lp_sae_cfg c = mkcfg(LP_SAE_JUMPRELU, 16, 64, 24, 0, 0, 1);
    lp_sae *s;
    cr_assert_eq(lp_sae_alloc(&s, &c, &ctx), LP_OK, "%s", lp_last_error());
    float *b = s->mem;
    cr_expect(s->W_enc == b);
    cr_expect(s->b_enc == b + 16 * 64);
    cr_expect(s->W_dec == s->b_enc + 64);
    cr_expect(s->b_dec == s->W_dec + 64 * 24);
    cr_expect(s->threshold == s->b_dec + 24);
    cr_expect(s->W_skip == s->threshold + 64);
    cr_expect_eq(s->n_floats, (size_t)(16 * 64 + 64 + 64 * 24 + 24 + 64 + 16 * 24));
    cr_expect_eq(s->device, LP_CPU);
    for (size_t i = 0; i < s->n_floats; i++) cr_assert(b[i] == 0.0f, "not zeroed at %zu", i);
    lp_sae_free(s, &ctx);
    c = mkcfg(LP_SAE_STANDARD, 16, 64, 16, 0, 1, 0);
    cr_assert_eq(lp_sae_alloc(&s, &c, &ctx), LP_OK);
    cr_expect(s->threshold == NULL && s->W_skip == NULL);
    cr_expect_eq(s->n_floats, (size_t)(16 * 64 * 2 + 64 + 16));
    lp_sae_free(s, &ctx);
    lp_sae_free(NULL, &ctx);
}

/* ---- fixtures written by SAELens, Gemma Scope conventions and sparsify ---- */

static lp_st_file g_ref;
static void open_ref(const char *path) { cr_assert_eq(lp_st_open(&g_ref, path), LP_OK, "%s", lp_last_error()); }

typedef struct saelens_case {
    const char *name;
    lp_sae_arch arch;
    int d_in, d_sae, d_out, k, apply, skip;
    const char *hook, *hook_out;
} saelens_case;

static const saelens_case g_saelens[] = {
    {"saelens_standard", LP_SAE_STANDARD, 16, 64, 16, 0, 1, 0, "blocks.1.hook_resid_post", ""},
    {"saelens_topk", LP_SAE_TOPK, 24, 64, 24, 4, 1, 0, "blocks.2.hook_resid_post", ""},
    {"saelens_jumprelu", LP_SAE_JUMPRELU, 32, 64, 32, 0, 0, 0, "blocks.0.hook_mlp_out", ""},
    {"saelens_skip_transcoder", LP_SAE_STANDARD, 16, 64, 24, 0, 0, 1, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"},
    {"saelens_jumprelu_transcoder", LP_SAE_JUMPRELU, 16, 64, 16, 0, 0, 0, "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"},
};

static void expect_cfg(const lp_sae_cfg *c, const saelens_case *w) {
    cr_expect_eq(c->arch, w->arch, "%s: arch %d", w->name, c->arch);
    cr_expect(c->d_in == w->d_in && c->d_sae == w->d_sae && c->d_out == w->d_out, "%s: dims %d %d %d", w->name, c->d_in,
              c->d_sae, c->d_out);
    if (w->arch == LP_SAE_TOPK) cr_expect_eq(c->k, w->k, "%s: k", w->name);
    cr_expect_eq(c->apply_b_dec_to_input, w->apply, "%s: apply_b_dec_to_input", w->name);
    cr_expect_eq(c->skip, w->skip, "%s: skip", w->name);
    cr_expect_str_eq(c->hook_name, w->hook, "%s", w->name);
    cr_expect_str_eq(c->hook_name_out, w->hook_out, "%s", w->name);
    cr_expect_str_eq(c->normalize, "none");
}

Test(sae_io, saelens_fixtures) {
    open_ref(SAE_FIX "/reference.safetensors");
    for (size_t i = 0; i < sizeof g_saelens / sizeof *g_saelens; i++) {
        const saelens_case *w = &g_saelens[i];
        char dir[256];
        snprintf(dir, sizeof dir, "%s/%s", SAE_FIX, w->name);
        lp_sae *s = load_ok(dir);
        expect_cfg(&s->cfg, w);
        cr_expect_str_eq(s->cfg.model_name, "gpt2");
        cr_expect_eq(s->cfg.context_size, 128);
        host_sae h = host_copy(s);
        expect_outputs(&g_ref, w->name, &h.s, 1.0, REF_MAX_REL);
        free(h.img);
        lp_sae_free(s, &ctx);
    }
    lp_st_close(&g_ref);
}

/* SAELens 5.x wrote every field at the top level (no metadata) and k in
 * activation_fn_kwargs; the generator checked that SAELens 6.5.3 reads it as saelens_topk. */
Test(sae_io, saelens_pre6_layout) {
    open_ref(SAE_FIX "/reference.safetensors");
    lp_sae *s = load_ok(SAE_FIX "/saelens_v5_topk");
    expect_cfg(&s->cfg, &g_saelens[1]);
    cr_expect_eq(s->cfg.context_size, 128);
    host_sae h = host_copy(s);
    expect_outputs(&g_ref, "saelens_topk", &h.s, 1.0, REF_MAX_REL);
    free(h.img);
    lp_sae_free(s, &ctx);
    lp_st_close(&g_ref);
}

static int same_params(const lp_sae *a, const lp_sae *b) {
    if (a->n_floats != b->n_floats) return 0;
    host_sae x = host_copy(a), y = host_copy(b);
    int same = memcmp(x.img, y.img, a->n_floats * sizeof(float)) == 0;
    free(x.img), free(y.img);
    return same;
}

Test(sae_io, gemmascope) {
    open_ref(SAE_FIX "/reference.safetensors");
    const char *paths[] = {SAE_FIX "/gemmascope_npz", SAE_FIX "/gemmascope_npz/params.npz", SAE_FIX "/gemmascope_st",
                           SAE_FIX "/gemmascope_st/params.safetensors"};
    lp_sae *first = NULL;
    for (int i = 0; i < 4; i++) {
        lp_sae *s = load_ok(paths[i]);
        cr_expect_eq(s->cfg.arch, LP_SAE_JUMPRELU);
        cr_expect(s->cfg.d_in == 16 && s->cfg.d_sae == 64 && s->cfg.d_out == 16, "%s: dims", paths[i]);
        cr_expect_eq(s->cfg.apply_b_dec_to_input, 0);
        host_sae h = host_copy(s);
        expect_outputs(&g_ref, "gemmascope", &h.s, 1.0, REF_MAX_REL);
        free(h.img);
        if (!first) first = s;
        else {
            cr_expect(same_params(first, s), "%s: parameters differ from %s", paths[i], paths[0]);
            lp_sae_free(s, &ctx);
        }
    }
    lp_sae_free(first, &ctx);
    lp_st_close(&g_ref);
}

Test(sae_io, sparsify) {
    open_ref(SAE_FIX "/reference.safetensors");
    lp_sae *s = load_ok(SAE_FIX "/sparsify/layers.3");
    saelens_case w = {"sparsify_sae", LP_SAE_TOPK, 16, 64, 16, 4, 1, 0, "blocks.3.hook_resid_post", ""};
    expect_cfg(&s->cfg, &w);
    cr_expect_str_eq(s->cfg.model_name, "EleutherAI/pythia-70m");
    cr_expect_eq(s->cfg.context_size, 64);
    host_sae h = host_copy(s);
    expect_outputs(&g_ref, "sparsify_sae", &h.s, 1.0, REF_MAX_REL);
    free(h.img);
    lp_sae_free(s, &ctx);
    /* a transcoder with a skip connection: no b_dec subtraction, W_skip transposed */
    s = load_ok(SAE_FIX "/sparsify/layers.3.mlp/");
    cr_expect_eq(s->cfg.arch, LP_SAE_TOPK);
    cr_expect(s->cfg.skip == 1 && s->cfg.apply_b_dec_to_input == 0 && s->cfg.d_out == 16 && s->cfg.k == 4);
    h = host_copy(s);
    expect_outputs(&g_ref, "sparsify_transcoder", &h.s, 1.0, REF_MAX_REL);
    free(h.img);
    lp_sae_free(s, &ctx);
    /* the weights file named directly */
    s = load_ok(SAE_FIX "/sparsify/layers.3/sae.safetensors");
    cr_expect_eq(s->cfg.k, 4);
    lp_sae_free(s, &ctx);
    lp_st_close(&g_ref);
}

/* ---- saving ---- */

static cJSON *read_cfg(const char *dir) {
    char p[512];
    snprintf(p, sizeof p, "%s/cfg.json", dir);
    size_t n;
    char *txt = lp_read_file(p, &n);
    cr_assert(txt != NULL, "cannot read %s", p);
    cJSON *j = cJSON_ParseWithLength(txt, n);
    free(txt);
    cr_assert(cJSON_IsObject(j), "%s: not JSON", p);
    return j;
}

static const char *jstr(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : "";
}

/* No "*.tmp*" entries in dir or in its parent. */
static void expect_no_tmp(const char *dir) {
    char parent[512];
    snprintf(parent, sizeof parent, "%s", dir);
    char *sl = strrchr(parent, '/');
    if (sl) *sl = 0;
    const char *dirs[2] = {dir, parent};
    for (int i = 0; i < 2; i++) {
        DIR *d = opendir(dirs[i]);
        if (!d) continue;
        struct dirent *e;
        while ((e = readdir(d)))
            cr_expect(strstr(e->d_name, ".tmp") == NULL, "%s: temporary %s left behind", dirs[i], e->d_name);
        closedir(d);
    }
}

static void expect_same_cfg(const lp_sae_cfg *a, const lp_sae_cfg *b, const char *what) {
    cr_expect(a->arch == b->arch && a->d_in == b->d_in && a->d_sae == b->d_sae && a->d_out == b->d_out, "%s: arch/dims", what);
    if (a->arch == LP_SAE_TOPK || a->arch == LP_SAE_BATCHTOPK) cr_expect_eq(a->k, b->k, "%s: k", what);
    cr_expect(a->apply_b_dec_to_input == b->apply_b_dec_to_input && a->skip == b->skip, "%s: flags", what);
    cr_expect_str_eq(a->model_name, b->model_name, "%s", what);
    cr_expect_str_eq(a->hook_name, b->hook_name, "%s", what);
    cr_expect_str_eq(a->hook_name_out, b->hook_name_out, "%s", what);
    cr_expect_eq(a->context_size, b->context_size, "%s", what);
    if (a->arch == LP_SAE_JUMPRELU) cr_expect(a->jumprelu_bandwidth == b->jumprelu_bandwidth, "%s: bandwidth", what);
}

Test(sae_io, round_trip_exact) {
    struct { lp_sae_cfg c; const char *arch; } cases[] = {
        {mkcfg(LP_SAE_STANDARD, 16, 64, 16, 0, 1, 0), "standard"},
        {mkcfg(LP_SAE_TOPK, 24, 48, 24, 5, 0, 0), "topk"},
        {mkcfg(LP_SAE_JUMPRELU, 32, 64, 32, 0, 1, 0), "jumprelu"},
        {mkcfg(LP_SAE_STANDARD, 16, 64, 24, 0, 0, 1), "skip_transcoder"},
        {mkcfg(LP_SAE_JUMPRELU, 16, 32, 16, 0, 0, 0), "jumprelu"}, /* hook_name_out empty below */
        {mkcfg(LP_SAE_TOPK, 16, 64, 20, 3, 0, 0), "topk_transcoder"},
        {mkcfg(LP_SAE_JUMPRELU, 16, 64, 12, 0, 0, 1), "jumprelu_skip_transcoder"},
    };
    cases[2].c.jumprelu_bandwidth = 0.001f;
    cases[2].c.context_size = 0;
    cases[2].c.model_name[0] = 0;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        lp_sae *s = make_sae(cases[i].c, 100 + i);
        char name[32];
        snprintf(name, sizeof name, "nested/rt%zu", i);
        char *dir = in_tmp(name);
        cr_assert_eq(lp_sae_save(s, &ctx, dir, 1.0f), LP_OK, "%s", lp_last_error());
        expect_no_tmp(dir);
        cJSON *j = read_cfg(dir);
        cr_expect_str_eq(jstr(j, "architecture"), cases[i].arch, "case %zu", i);
        cr_expect_str_eq(jstr(j, "normalize_activations"), "none");
        cr_expect_str_eq(jstr(cJSON_GetObjectItemCaseSensitive(j, "metadata"), "sae_lens_version"), "6.5.3");
        cJSON_Delete(j);
        lp_sae *t = load_ok(dir);
        expect_same_cfg(&s->cfg, &t->cfg, dir);
        cr_expect(same_params(s, t), "%s: parameters changed in the round trip", dir);
        lp_sae_free(s, &ctx);
        lp_sae_free(t, &ctx);
    }
}

/* Folding a scale s: the saved SAE takes raw x. encode'(x) = encode(x s) and
 * decode'(f) = decode(f) / s, as SAELens's fold_activation_norm_scaling_factor gives; a
 * transcoder, trained to predict its raw target, keeps decode'(f) = decode(f) and
 * forward'(x) = forward(x s) (W_skip scaled). */
Test(sae_io, scale_folding) {
    lp_sae_cfg cases[] = {
        mkcfg(LP_SAE_STANDARD, 16, 64, 16, 0, 1, 0),
        mkcfg(LP_SAE_TOPK, 16, 64, 16, 4, 1, 0),
        mkcfg(LP_SAE_JUMPRELU, 16, 64, 16, 0, 1, 0),
        mkcfg(LP_SAE_STANDARD, 16, 64, 24, 0, 0, 1),
    };
    const float scales[] = {2.5f, 0.3f};
    const int N = 16;
    float *x = lp_test_rand((size_t)N * 16, 7, -1.5f, 1.5f);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        for (int si = 0; si < 2; si++) {
            lp_sae_cfg c = cases[i];
            snprintf(c.normalize, sizeof c.normalize, "expected_average_only_in");
            lp_sae *s = make_sae(c, 200 + i);
            char name[32];
            snprintf(name, sizeof name, "fold%zu_%d", i, si);
            char *dir = in_tmp(name);
            cr_assert_eq(lp_sae_save(s, &ctx, dir, scales[si]), LP_OK, "%s", lp_last_error());
            cJSON *j = read_cfg(dir);
            cr_expect_str_eq(jstr(j, "normalize_activations"), "none", "the folded file takes raw activations");
            cJSON_Delete(j);
            lp_sae *t = load_ok(dir);
            host_sae ho = host_copy(s), hf = host_copy(t);
            /* threshold and b_enc unchanged */
            cr_expect(memcmp(ho.s.b_enc, hf.s.b_enc, c.d_sae * sizeof(float)) == 0, "%s: b_enc changed", dir);
            if (ho.s.threshold) cr_expect(memcmp(ho.s.threshold, hf.s.threshold, c.d_sae * sizeof(float)) == 0);
            if (out_scale(&c, 2.0) == 1.0) /* a transcoder's output side is untouched */
                cr_expect(memcmp(ho.s.W_dec, hf.s.W_dec, ((size_t)c.d_sae * c.d_out + c.d_out) * sizeof(float)) == 0,
                          "%s: W_dec or b_dec changed", dir);
            double *fo = ref_encode(&ho.s, x, N, scales[si]), *ff = ref_encode(&hf.s, x, N, 1.0);
            char what[96];
            snprintf(what, sizeof what, "fold %s s=%g encode", lp_sae_arch_name(c.arch), scales[si]);
            LP_EXPECT_WITHIN(what, 200 + i, compare_d(ff, fo, (size_t)N * c.d_sae), max_rel, FOLD_MAX_REL);
            double *dO = ref_decode(&ho.s, fo, N, out_scale(&c, scales[si])), *dF = ref_decode(&hf.s, fo, N, 1.0);
            snprintf(what, sizeof what, "fold %s s=%g decode", lp_sae_arch_name(c.arch), scales[si]);
            LP_EXPECT_WITHIN(what, 200 + i, compare_d(dF, dO, (size_t)N * c.d_out), max_rel, FOLD_MAX_REL);
            double *yO = ref_forward(&ho.s, x, N, scales[si]), *yF = ref_forward(&hf.s, x, N, 1.0);
            snprintf(what, sizeof what, "fold %s s=%g forward", lp_sae_arch_name(c.arch), scales[si]);
            LP_EXPECT_WITHIN(what, 200 + i, compare_d(yF, yO, (size_t)N * c.d_out), max_rel, FOLD_MAX_REL);
            free(fo), free(ff), free(dO), free(dF), free(yO), free(yF), free(ho.img), free(hf.img);
            lp_sae_free(s, &ctx);
            lp_sae_free(t, &ctx);
        }
    free(x);
}

/* SAELens transcoders never subtract b_dec: a transcoder with apply_b_dec_to_input is
 * written with b_enc - b_dec W_enc instead, which encodes the same. */
Test(sae_io, transcoder_b_dec_folded_into_b_enc) {
    lp_sae_cfg c = mkcfg(LP_SAE_JUMPRELU, 16, 64, 16, 0, 1, 0);
    snprintf(c.hook_name_out, sizeof c.hook_name_out, "blocks.1.hook_mlp_out");
    lp_sae *s = make_sae(c, 300);
    char *dir = in_tmp("tc_apply");
    cr_assert_eq(lp_sae_save(s, &ctx, dir, 1.0f), LP_OK, "%s", lp_last_error());
    cJSON *j = read_cfg(dir);
    cr_expect_str_eq(jstr(j, "architecture"), "jumprelu_transcoder");
    cr_expect(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(j, "apply_b_dec_to_input")));
    cJSON_Delete(j);
    lp_sae *t = load_ok(dir);
    cr_expect_eq(t->cfg.apply_b_dec_to_input, 0);
    const int N = 16;
    float *x = lp_test_rand((size_t)N * 16, 8, -1.5f, 1.5f);
    host_sae ho = host_copy(s), hf = host_copy(t);
    double *a = ref_forward(&ho.s, x, N, 1.0), *b = ref_forward(&hf.s, x, N, 1.0);
    LP_EXPECT_WITHIN("transcoder b_dec fold forward", 300, compare_d(b, a, (size_t)N * 16), max_rel, FOLD_MAX_REL);
    free(a), free(b), free(x), free(ho.img), free(hf.img);
    lp_sae_free(s, &ctx);
    lp_sae_free(t, &ctx);
}

Test(sae_io, batchtopk_saves_as_jumprelu) {
    lp_sae_cfg c = mkcfg(LP_SAE_BATCHTOPK, 16, 64, 16, 4, 1, 0);
    lp_sae *s = make_sae(c, 400);
    host_sae h = host_copy(s);
    /* the global threshold lives in threshold[0]; the rest is ignored on save */
    h.s.threshold[0] = 0.625f;
    cr_assert_eq(lp_ctx_to_device(&ctx, s->mem, h.img, s->n_floats * sizeof(float)), LP_OK);
    char *dir = in_tmp("btk");
    cr_assert_eq(lp_sae_save(s, &ctx, dir, 1.0f), LP_OK, "%s", lp_last_error());
    cJSON *j = read_cfg(dir);
    cr_expect_str_eq(jstr(j, "architecture"), "jumprelu");
    cr_expect(cJSON_GetObjectItemCaseSensitive(j, "k") == NULL, "SAELens's JumpReLU config has no k");
    cJSON_Delete(j);
    lp_sae *t = load_ok(dir);
    cr_expect_eq(t->cfg.arch, LP_SAE_JUMPRELU);
    host_sae g = host_copy(t);
    for (int i = 0; i < 64; i++) cr_expect(g.s.threshold[i] == 0.625f, "threshold[%d] = %g", i, (double)g.s.threshold[i]);
    cr_expect(memcmp(g.img, h.img, (s->n_floats - 64) * sizeof(float)) == 0, "W_enc, b_enc, W_dec, b_dec changed");
    /* the exported JumpReLU keeps the latents whose pre-activation passes the threshold */
    const int N = 8;
    float *x = lp_test_rand((size_t)N * 16, 9, -1.5f, 1.5f);
    h.s.cfg.arch = LP_SAE_JUMPRELU;
    for (int i = 1; i < 64; i++) h.s.threshold[i] = 0.625f;
    double *a = ref_encode(&h.s, x, N, 1.0), *b = ref_encode(&g.s, x, N, 1.0);
    LP_EXPECT_WITHIN("batchtopk as jumprelu", 400, compare_d(b, a, (size_t)N * 64), max_abs, 0);
    free(a), free(b), free(x), free(h.img), free(g.img);
    lp_sae_free(s, &ctx);
    lp_sae_free(t, &ctx);
}

/* The committed loupe_written/: (a) a fresh save of the same fixed SAEs reproduces it;
 * (b) SAELens, loading it, computed what loupe's unfolded SAE computes on x * scale. */
typedef struct written_case {
    const char *name;
    lp_sae_cfg cfg;
    float scale;
    uint64_t seed;
} written_case;

static lp_sae *written_sae(const written_case *w) {
    lp_sae *s = make_sae(w->cfg, w->seed);
    if (w->cfg.arch == LP_SAE_BATCHTOPK) {
        host_sae h = host_copy(s);
        for (int i = 0; i < w->cfg.d_sae; i++) h.s.threshold[i] = 0.6f;
        cr_assert_eq(lp_ctx_to_device(&ctx, s->mem, h.img, s->n_floats * sizeof(float)), LP_OK);
        free(h.img);
    }
    return s;
}

static int files_equal(const char *a, const char *b) {
    size_t na, nb;
    char *x = lp_read_file(a, &na), *y = lp_read_file(b, &nb);
    int eq = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x), free(y);
    return eq;
}

Test(sae_io, loupe_written) {
    written_case cases[5] = {
        {"standard", mkcfg(LP_SAE_STANDARD, 16, 64, 16, 0, 1, 0), 2.5f, 500},
        {"topk", mkcfg(LP_SAE_TOPK, 16, 64, 16, 4, 1, 0), 0.75f, 510},
        {"batchtopk", mkcfg(LP_SAE_BATCHTOPK, 16, 64, 16, 4, 0, 0), 1.5f, 520},
        {"skip_transcoder", mkcfg(LP_SAE_STANDARD, 16, 64, 24, 0, 0, 1), 4.0f, 530},
        {"jumprelu_transcoder", mkcfg(LP_SAE_JUMPRELU, 16, 64, 16, 0, 1, 0), 1.5f, 540},
    };
    snprintf(cases[0].cfg.normalize, sizeof cases[0].cfg.normalize, "expected_average_only_in");
    snprintf(cases[4].cfg.hook_name, sizeof cases[4].cfg.hook_name, "blocks.0.ln2.hook_normalized");
    snprintf(cases[4].cfg.hook_name_out, sizeof cases[4].cfg.hook_name_out, "blocks.0.hook_mlp_out");
    snprintf(cases[3].cfg.hook_name, sizeof cases[3].cfg.hook_name, "blocks.1.ln2.hook_normalized");
    const char *w = getenv("LOUPE_WRITE_SAE_FIXTURE");
    int write = w && strcmp(w, "1") == 0;
    lp_st_file ref = {0};
    if (!write) {
        lp_status st = lp_st_open(&ref, SAE_FIX "/loupe_written/reference.safetensors");
        cr_assert_eq(st, LP_OK, "%s (regenerate: python3 tests/gen/gen_sae_fixture.py tests/fixtures/sae --loupe-test build/test_sae_io)",
                     lp_last_error());
    }
    for (int i = 0; i < 5; i++) {
        lp_sae *s = written_sae(&cases[i]);
        char committed[256];
        snprintf(committed, sizeof committed, "%s/loupe_written/%s", SAE_FIX, cases[i].name);
        if (write) {
            cr_assert_eq(lp_sae_save(s, &ctx, committed, cases[i].scale), LP_OK, "%s", lp_last_error());
            fprintf(stderr, "  wrote %s\n", committed);
            lp_sae_free(s, &ctx);
            continue;
        }
        /* (a) byte-identical weights, the same cfg.json */
        char *fresh = in_tmp(cases[i].name), a[512], b[512];
        cr_assert_eq(lp_sae_save(s, &ctx, fresh, cases[i].scale), LP_OK, "%s", lp_last_error());
        snprintf(a, sizeof a, "%s/sae_weights.safetensors", fresh);
        snprintf(b, sizeof b, "%s/sae_weights.safetensors", committed);
        cr_expect(files_equal(a, b), "%s differs from %s", a, b);
        cJSON *ja = read_cfg(fresh), *jb = read_cfg(committed);
        cr_expect(cJSON_Compare(ja, jb, 1), "%s/cfg.json differs from %s/cfg.json", fresh, committed);
        cJSON_Delete(ja), cJSON_Delete(jb);
        /* (b) SAELens's outputs on the committed files = the unfolded SAE on x * scale */
        host_sae h = host_copy(s);
        if (h.s.cfg.arch == LP_SAE_BATCHTOPK) h.s.cfg.arch = LP_SAE_JUMPRELU; /* as exported */
        expect_outputs(&ref, cases[i].name, &h.s, cases[i].scale, FOLD_MAX_REL);
        /* and loupe reads its own file back to the same function */
        lp_sae *t = load_ok(committed);
        host_sae g = host_copy(t);
        expect_outputs(&ref, cases[i].name, &g.s, 1.0, REF_MAX_REL);
        free(h.img), free(g.img);
        lp_sae_free(t, &ctx);
        lp_sae_free(s, &ctx);
    }
    if (!write) lp_st_close(&ref);
}

Test(sae_io, save_replaces_atomically) {
    char *dir = in_tmp("replace");
    lp_sae *a = make_sae(mkcfg(LP_SAE_TOPK, 16, 64, 16, 4, 1, 0), 600);
    lp_sae *b = make_sae(mkcfg(LP_SAE_JUMPRELU, 16, 32, 16, 0, 0, 0), 601);
    cr_assert_eq(lp_sae_save(a, &ctx, dir, 1.0f), LP_OK, "%s", lp_last_error());
    char notes[512];
    snprintf(notes, sizeof notes, "%s/notes.txt", dir);
    FILE *fp = fopen(notes, "w");
    cr_assert(fp);
    fputs("kept\n", fp);
    fclose(fp);
    cr_assert_eq(lp_sae_save(b, &ctx, dir, 1.0f), LP_OK, "%s", lp_last_error());
    expect_no_tmp(dir);
    cr_expect(access(notes, F_OK) == 0, "save removed a file it does not own");
    lp_sae *t = load_ok(dir);
    cr_expect_eq(t->cfg.arch, LP_SAE_JUMPRELU);
    cr_expect(same_params(b, t));
    lp_sae_free(t, &ctx);
    /* a failed save leaves nothing under the final name */
    host_sae h = host_copy(b);
    h.s.W_dec[5] = NAN;
    cr_assert_eq(lp_ctx_to_device(&ctx, b->mem, h.img, b->n_floats * sizeof(float)), LP_OK);
    char *bad = in_tmp("never");
    cr_expect_eq(lp_sae_save(b, &ctx, bad, 1.0f), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "W_dec") && strstr(lp_last_error(), "non-finite"), "%s", lp_last_error());
    cr_expect(access(bad, F_OK) != 0, "a failed save created %s", bad);
    cr_expect_eq(lp_sae_save(a, &ctx, in_tmp("x"), 0.0f), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "scale") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_sae_save(a, &ctx, in_tmp("x"), INFINITY), LP_ERR_ARG);
    /* the parent is a file */
    char *file = in_tmp("afile");
    fp = fopen(file, "w");
    fclose(fp);
    char under[512];
    snprintf(under, sizeof under, "%s/sae", file);
    cr_expect_eq(lp_sae_save(a, &ctx, under, 1.0f), LP_ERR_IO);
    cr_expect(strstr(lp_last_error(), "afile") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_sae_save(a, &ctx, file, 1.0f), LP_ERR_IO);
    expect_no_tmp(in_tmp("x"));
    free(h.img);
    lp_sae_free(a, &ctx);
    lp_sae_free(b, &ctx);
}

/* An older layout loupe also reads: a TopK SAE that calls itself "standard" with
 * activation_fn_str "topk", and the hook under its pre-6.0 name hook_point. */
Test(sae_io, saelens_oldest_layout) {
    char *d = cfg_variant("saelens_v5_topk", "cfg.json", "sae_weights.safetensors", "v3", "architecture", "\"standard\"", 0);
    char p[512];
    snprintf(p, sizeof p, "%s/cfg.json", d);
    size_t n;
    char *txt = lp_read_file(p, &n);
    cJSON *j = cJSON_ParseWithLength(txt, n);
    free(txt);
    cJSON_DeleteItemFromObjectCaseSensitive(j, "hook_name");
    cJSON_AddStringToObject(j, "hook_point", "blocks.2.hook_resid_post");
    char *out = cJSON_Print(j);
    cJSON_Delete(j);
    write_text(p, out);
    free(out);
    lp_sae *s = load_ok(d);
    expect_cfg(&s->cfg, &g_saelens[1]);
    lp_sae_free(s, &ctx);
}

/* A SAELens BatchTopK training checkpoint: architecture batchtopk and a scalar
 * topk_threshold instead of threshold; loupe reads it as batchtopk with the threshold in
 * every latent. */
Test(sae_io, saelens_batchtopk_checkpoint) {
    char *d = cfg_variant("saelens_standard", "cfg.json", "sae_weights.safetensors", "btk_ckpt", "architecture",
                          "\"batchtopk\"", 1);
    char p[512];
    snprintf(p, sizeof p, "%s/cfg.json", d);
    size_t n;
    char *txt = lp_read_file(p, &n);
    cJSON *j = cJSON_ParseWithLength(txt, n);
    free(txt);
    cJSON_AddNumberToObject(j, "k", 4);
    char *out = cJSON_Print(j);
    cJSON_Delete(j);
    write_text(p, out);
    free(out);
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, SAE_FIX "/saelens_standard/sae_weights.safetensors"), LP_OK);
    lp_st_spec specs[8];
    const void *datas[8];
    int m = 0;
    for (int i = 0; i < f.n; i++) {
        specs[m] = (lp_st_spec){.name = f.tensors[i].name, .dtype = f.tensors[i].dtype, .ndim = f.tensors[i].ndim};
        memcpy(specs[m].shape, f.tensors[i].shape, sizeof f.tensors[i].shape);
        datas[m++] = f.tensors[i].data;
    }
    double thr = 0.375; /* SAELens keeps it in float64 */
    specs[m] = (lp_st_spec){.name = "topk_threshold", .dtype = LP_F64, .ndim = 0};
    datas[m++] = &thr;
    snprintf(p, sizeof p, "%s/sae_weights.safetensors", d);
    cr_assert_eq(lp_st_write(p, specs, datas, m, NULL), LP_OK, "%s", lp_last_error());
    lp_st_close(&f);
    lp_sae *s = load_ok(d);
    cr_expect_eq(s->cfg.arch, LP_SAE_BATCHTOPK);
    cr_expect_eq(s->cfg.k, 4);
    host_sae h = host_copy(s);
    for (int i = 0; i < 64; i++) cr_expect(h.s.threshold[i] == 0.375f, "threshold[%d] = %g", i, (double)h.s.threshold[i]);
    free(h.img);
    lp_sae_free(s, &ctx);
}
