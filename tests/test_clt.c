/* Transcoder sets in circuit-tracer's layout (clt.h) against circuit-tracer 0.5.0 itself
 * (tests/gen/gen_clt_fixture.py):
 * - the four committed sets (per-layer ReLU with skip, per-layer JumpReLU, CLT ReLU, CLT
 *   JumpReLU) load, and loupe's encode (pre-activations and features) and decode (every
 *   target layer, all earlier layers' features) match circuit-tracer's float64 outputs;
 * - a feature's encoder row and decoder vectors are the files' W_enc[f] and W_dec[f, j - l];
 * - loupe_written/ is what lp_clt_save writes from those sets (a fresh save is
 *   byte-identical), and circuit-tracer, loading it, computed the same outputs (regenerate
 *   with: python3 tests/gen/gen_clt_fixture.py tests/fixtures/clt --loupe-test build/test_clt);
 * - bad files are refused with the file and key named; TopK (loupe's own) round-trips. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/attrib.h"
#include "loupe/clt.h"
#include "loupe/hooks.h"
#include "loupe/model.h"
#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#define CLT_FIX LP_FIXTURES "/clt"
/* float32 against circuit-tracer's float64 on the same float32 parameters: a dot product of
 * 64 (encode) or up to 2 x 96 + 64 (decode) terms of size ~1 */
#define REF_MAX_ABS 2e-6

static lp_ctx ctx;
static char tmp[256];

static void setup(void) {
    cr_assert_eq(lp_ctx_init(&ctx, LP_CPU, LP_F32), LP_OK);
    snprintf(tmp, sizeof tmp, "/tmp/loupe-test-clt-XXXXXX");
    cr_assert(mkdtemp(tmp));
}
static void teardown(void) {
    lp_remove_tree(tmp);
    lp_ctx_free(&ctx);
}
TestSuite(clt, .init = setup, .fini = teardown);

static const char *const g_sets[4] = {"plt_relu_skip", "plt_jumprelu", "clt_relu", "clt_jumprelu"};

static lp_clt *load_ok(const char *dir) {
    lp_clt *t = NULL;
    cr_assert_eq(lp_clt_load(&t, &ctx, dir), LP_OK, "%s: %s", dir, lp_last_error());
    return t;
}

/* ref[name.what] as doubles (F64 or F32 in the file), checked to have n elements */
static double *ref_get(const lp_st_file *f, const char *name, const char *what, size_t n) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", name, what);
    const lp_st_tensor *t = lp_st_find(f, key);
    cr_assert(t, "%s: no %s", f->path, key);
    size_t es = t->dtype == LP_F64 ? 8 : 4;
    cr_assert_eq(t->nbytes, n * es, "%s: %s has %zu bytes, expected %zu", f->path, key, t->nbytes, n * es);
    double *d = malloc(n * sizeof *d);
    for (size_t i = 0; i < n; i++) {
        if (es == 8) memcpy(&d[i], (const char *)t->data + 8 * i, 8);
        else {
            float v;
            memcpy(&v, (const char *)t->data + 4 * i, 4);
            d[i] = v;
        }
    }
    return d;
}

/* Encode every layer and decode every target of t on name.x; compare with ref. */
static void expect_outputs(lp_clt *t, const lp_st_file *ref, const char *name) {
    int L = t->cfg.n_layers, D = t->cfg.d_model, S = t->cfg.d_sae;
    size_t N = lp_st_find(ref, "plt_relu_skip.x")->shape[1];
    double *x64 = ref_get(ref, name, "x", L * N * D), *pre = ref_get(ref, name, "pre", L * N * S);
    double *enc = ref_get(ref, name, "encode", L * N * S), *dec = ref_get(ref, name, "decode", L * N * D);
    float *x = malloc(L * N * D * sizeof *x), *f = malloc(L * N * S * sizeof *f), *p = malloc(N * S * sizeof *p);
    float *y = malloc(N * D * sizeof *y);
    for (size_t i = 0; i < L * N * D; i++) x[i] = (float)x64[i];
    const float *fl[64];
    char what[160];
    for (int l = 0; l < L; l++) {
        cr_assert_eq(lp_clt_encode(t, &ctx, l, x + l * N * D, (int)N, p, 1), LP_OK, "%s", lp_last_error());
        cr_assert_eq(lp_clt_encode(t, &ctx, l, x + l * N * D, (int)N, f + l * N * S, 0), LP_OK, "%s", lp_last_error());
        snprintf(what, sizeof what, "%s layer %d pre", name, l);
        LP_EXPECT_WITHIN(what, 0, lp_compare(p, pre + l * N * S, N * S), max_abs, REF_MAX_ABS);
        snprintf(what, sizeof what, "%s layer %d encode", name, l);
        LP_EXPECT_WITHIN(what, 0, lp_compare(f + l * N * S, enc + l * N * S, N * S), max_abs, REF_MAX_ABS);
        fl[l] = f + l * N * S;
    }
    for (int j = 0; j < L; j++) {
        cr_assert_eq(lp_clt_decode(t, &ctx, j, fl, x + j * N * D, (int)N, y), LP_OK, "%s", lp_last_error());
        snprintf(what, sizeof what, "%s layer %d decode", name, j);
        LP_EXPECT_WITHIN(what, 0, lp_compare(y, dec + j * N * D, N * D), max_abs, REF_MAX_ABS);
    }
    free(x64), free(pre), free(enc), free(dec), free(x), free(f), free(p), free(y);
}

static lp_st_file open_ref(const char *path) {
    lp_st_file f = {0};
    cr_assert_eq(lp_st_open(&f, path), LP_OK, "%s (regenerate: python3 tests/gen/gen_clt_fixture.py tests/fixtures/clt "
                                               "--loupe-test build/test_clt)", lp_last_error());
    return f;
}

Test(clt, circuit_tracer_sets) {
    lp_st_file ref = open_ref(CLT_FIX "/reference.safetensors");
    for (int i = 0; i < 4; i++) {
        char dir[256];
        snprintf(dir, sizeof dir, CLT_FIX "/%s", g_sets[i]);
        lp_clt *t = load_ok(dir);
        cr_expect_eq(t->cfg.kind, i < 2 ? LP_CLT_PER_LAYER : LP_CLT_CROSS_LAYER, "%s kind", g_sets[i]);
        cr_expect_eq(t->cfg.act, i % 2 ? LP_CLT_JUMPRELU : LP_CLT_RELU, "%s activation", g_sets[i]);
        cr_expect_eq(t->cfg.skip, i == 0, "%s skip", g_sets[i]);
        cr_expect_eq(t->cfg.n_layers, 2);
        cr_expect_eq(t->cfg.d_model, 64);
        cr_expect_str_eq(t->cfg.input_hook, "mlp.hook_in");
        cr_expect_str_eq(t->cfg.output_hook, "mlp.hook_out");
        expect_outputs(t, &ref, g_sets[i]);
        lp_clt_free(t, &ctx);
    }
    lp_st_close(&ref);
}

/* The accessors against the files' own tensors. */
Test(clt, feature_vectors) {
    lp_clt *t = load_ok(CLT_FIX "/clt_relu");
    int D = t->cfg.d_model, S = t->cfg.d_sae, L = t->cfg.n_layers;
    for (int l = 0; l < L; l++) {
        char path[256], key[32];
        lp_st_file fe = {0}, fd = {0};
        snprintf(path, sizeof path, CLT_FIX "/clt_relu/W_enc_%d.safetensors", l);
        cr_assert_eq(lp_st_open(&fe, path), LP_OK);
        snprintf(path, sizeof path, CLT_FIX "/clt_relu/W_dec_%d.safetensors", l);
        cr_assert_eq(lp_st_open(&fd, path), LP_OK);
        snprintf(key, sizeof key, "W_enc_%d", l);
        const float *we = lp_st_find(&fe, key)->data;
        snprintf(key, sizeof key, "W_dec_%d", l);
        const float *wd = lp_st_find(&fd, key)->data;
        for (int f = 0; f < S; f += 7) {
            cr_expect(memcmp(lp_clt_enc_vec(t, l, f), we + (size_t)f * D, D * 4) == 0, "enc (%d, %d)", l, f);
            for (int j = 0; j < L; j++) {
                const float *v = lp_clt_dec_vec(t, l, f, j);
                if (j < l) {
                    cr_expect_null(v, "dec (%d, %d) -> %d must not exist", l, f, j);
                    continue;
                }
                cr_expect(memcmp(v, wd + ((size_t)f * (L - l) + (j - l)) * D, D * 4) == 0, "dec (%d, %d) -> %d", l, f, j);
            }
        }
        lp_st_close(&fe), lp_st_close(&fd);
    }
    cr_expect_null(lp_clt_enc_vec(t, 0, S));
    cr_expect_null(lp_clt_dec_vec(t, 0, 0, L));
    lp_clt_free(t, &ctx);
    t = load_ok(CLT_FIX "/plt_jumprelu");
    cr_expect_null(lp_clt_dec_vec(t, 0, 0, 1), "a per-layer feature writes only its own layer");
    cr_expect_not_null(lp_clt_dec_vec(t, 1, 0, 1));
    char hk[64];
    cr_expect_eq(lp_clt_hook_name(t, 1, 0, hk, sizeof hk), LP_OK);
    cr_expect_str_eq(hk, "blocks.1.mlp.hook_in");
    cr_expect_eq(lp_clt_hook_name(t, 1, 1, hk, sizeof hk), LP_OK);
    cr_expect_str_eq(hk, "blocks.1.hook_mlp_out");
    snprintf(t->cfg.input_hook, sizeof t->cfg.input_hook, "ln2.hook_normalized");
    cr_expect_eq(lp_clt_hook_name(t, 0, 0, hk, sizeof hk), LP_OK);
    cr_expect_str_eq(hk, "blocks.0.ln2.hook_normalized");
    lp_clt_free(t, &ctx);
}

static int files_equal(const char *a, const char *b) {
    size_t na, nb;
    char *x = lp_read_file(a, &na), *y = lp_read_file(b, &nb);
    int eq = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x), free(y);
    return eq;
}

Test(clt, loupe_written) {
    const char *w = getenv("LOUPE_WRITE_CLT_FIXTURE");
    int write = w && strcmp(w, "1") == 0;
    lp_st_file ref = {0};
    if (!write) ref = open_ref(CLT_FIX "/loupe_written/reference.safetensors");
    lp_st_file ref_x = open_ref(CLT_FIX "/reference.safetensors");
    for (int i = 0; i < 4; i++) {
        char src[256], committed[256], fresh[512];
        snprintf(src, sizeof src, CLT_FIX "/%s", g_sets[i]);
        snprintf(committed, sizeof committed, CLT_FIX "/loupe_written/%s", g_sets[i]);
        lp_clt *t = load_ok(src);
        if (write) {
            lp_remove_tree(committed);
            cr_assert_eq(lp_clt_save(t, &ctx, committed), LP_OK, "%s", lp_last_error());
            fprintf(stderr, "  wrote %s\n", committed);
            lp_clt_free(t, &ctx);
            continue;
        }
        snprintf(fresh, sizeof fresh, "%s/%s", tmp, g_sets[i]);
        cr_assert_eq(lp_clt_save(t, &ctx, fresh), LP_OK, "%s", lp_last_error());
        const char *files[] = {"config.yaml", "layer_0.safetensors", "layer_1.safetensors", "W_enc_0.safetensors",
                               "W_enc_1.safetensors", "W_dec_0.safetensors", "W_dec_1.safetensors"};
        for (int k = 0; k < 7; k++) {
            if ((k >= 1 && k <= 2) != (i < 2) && k > 0) continue;
            char a[768], b[512];
            snprintf(a, sizeof a, "%s/%s", fresh, files[k]);
            snprintf(b, sizeof b, "%s/%s", committed, files[k]);
            cr_expect(files_equal(a, b), "%s differs from %s", a, b);
        }
        /* circuit-tracer's outputs on loupe's files, and loupe reading its own files */
        lp_clt *u = load_ok(committed);
        cr_expect_eq(u->n_floats, t->n_floats);
        cr_expect(memcmp(u->mem, t->mem, t->n_floats * 4) == 0, "%s: reading loupe's files changed the parameters", g_sets[i]);
        char name[64];
        snprintf(name, sizeof name, "%s", g_sets[i]);
        expect_outputs(u, &ref_x, name);
        /* and what circuit-tracer computed on loupe's files is the same as on its own */
        int L = t->cfg.n_layers, D = t->cfg.d_model;
        size_t N = lp_st_find(&ref_x, "plt_relu_skip.x")->shape[1];
        double *a = ref_get(&ref, name, "decode", L * N * D), *b = ref_get(&ref_x, name, "decode", L * N * D);
        cr_expect(memcmp(a, b, L * N * D * 8) == 0, "%s: circuit-tracer decodes loupe's files differently", name);
        free(a), free(b);
        lp_clt_free(u, &ctx);
        lp_clt_free(t, &ctx);
    }
    if (!write) lp_st_close(&ref);
    lp_st_close(&ref_x);
}

/* blocks.L.mlp.hook_in (circuit-tracer's ReplacementMLP.hook_in) on the tiny Llama: absent
 * until asked for; its value is ln2.hook_normalized times ln2's weight (the MLP's input) and
 * the gradient there, times that weight, is the gradient at ln2.hook_normalized. */
Test(clt, mlp_hook_in) {
    lp_model *m = NULL;
    cr_assert_eq(lp_model_load(&m, LP_FIXTURES "/llama-tiny", LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    int n0 = lp_hook_count(m);
    cr_expect_eq(lp_hook_find(m, "blocks.1.mlp.hook_in"), -1, "HookedTransformer's table has no mlp.hook_in");
    cr_assert_eq(lp_hooks_add_mlp_in(m), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_hooks_add_mlp_in(m), LP_OK);
    cr_expect_eq(lp_hook_count(m), n0 + 2);
    cr_assert_geq(lp_hook_find(m, "blocks.1.mlp.hook_in"), 0);
    lp_st_file wf = {0};
    cr_assert_eq(lp_st_open(&wf, LP_FIXTURES "/llama-tiny/model.safetensors"), LP_OK);
    const lp_st_tensor *wt = lp_st_find(&wf, "model.layers.1.post_attention_layernorm.weight");
    cr_assert(wt && wt->dtype == LP_F32 && wt->shape[0] == 64);
    const float *w = wt->data;
    int32_t tok[7] = {1, 17, 300, 42, 999, 5, 64};
    cr_assert_eq(lp_hook_capture(m, "blocks.1.mlp.hook_in", NULL, 0, NULL), LP_OK);
    cr_assert_eq(lp_hook_capture(m, "blocks.1.ln2.hook_normalized", NULL, 0, NULL), LP_OK);
    lp_metric met = {.kind = LP_METRIC_LOGPROB, .answer = (int32_t[]){7}};
    double mv;
    cr_assert_eq(lp_model_grad(m, tok, 1, 7, &met, "blocks.1.mlp.hook_in,blocks.1.ln2.hook_normalized", &mv), LP_OK, "%s",
                 lp_last_error());
    lp_tensor a, b, ga, gb;
    cr_assert_eq(lp_capture_get(m, "blocks.1.mlp.hook_in", &a), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_capture_get(m, "blocks.1.ln2.hook_normalized", &b), LP_OK);
    cr_assert_eq(lp_grad_get(m, "blocks.1.mlp.hook_in", &ga), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_grad_get(m, "blocks.1.ln2.hook_normalized", &gb), LP_OK);
    double ref[7 * 64], gref[7 * 64];
    for (int i = 0; i < 7 * 64; i++) {
        ref[i] = (double)((const float *)b.data)[i] * w[i % 64];
        gref[i] = (double)((const float *)ga.data)[i] * w[i % 64];
    }
    LP_EXPECT_WITHIN("mlp.hook_in = normalized * w", 0, lp_compare(a.data, ref, 7 * 64), max_rel, 1e-6);
    LP_EXPECT_WITHIN("grad normalized = grad mlp.hook_in * w", 0, lp_compare(gb.data, gref, 7 * 64), max_rel, 1e-5);
    lp_st_close(&wf);
    lp_model_free(m);
}

/* A copy of a committed set in tmp/NAME, with config.yaml replaced when yaml is given. */
static char *copy_set(const char *set, const char *name, const char *yaml) {
    static char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", tmp, name);
    cr_assert_eq(lp_mkdir_p(dir), LP_OK);
    const char *files[] = {"config.yaml", "layer_0.safetensors", "layer_1.safetensors", "W_enc_0.safetensors",
                           "W_enc_1.safetensors", "W_dec_0.safetensors", "W_dec_1.safetensors"};
    for (int k = 0; k < 7; k++) {
        char a[512], b[700];
        snprintf(a, sizeof a, CLT_FIX "/%s/%s", set, files[k]);
        snprintf(b, sizeof b, "%s/%s", dir, files[k]);
        size_t n;
        char *d = lp_read_file(a, &n);
        if (!d) continue;
        cr_assert_eq(lp_write_file_atomic(b, d, n), LP_OK);
        free(d);
    }
    if (yaml) {
        char b[700];
        snprintf(b, sizeof b, "%s/config.yaml", dir);
        cr_assert_eq(lp_write_file_atomic(b, yaml, strlen(yaml)), LP_OK);
    }
    return dir;
}

static void expect_refused(const char *dir, lp_status want, const char *must_say) {
    lp_clt *t = NULL;
    lp_status st = lp_clt_load(&t, &ctx, dir);
    cr_expect_eq(st, want, "%s: status %d, expected %d (%s)", dir, st, want, lp_last_error());
    cr_expect(strstr(lp_last_error(), must_say), "%s: the error '%s' does not say '%s'", dir, lp_last_error(), must_say);
    cr_expect_null(t);
    cr_expect_eq(lp_status_exit_code(st), 2);
}

/* A tensor written in place of one the set holds (the same file otherwise). */
static void replace_tensor(const char *path, const char *name, int ndim, int64_t d0, int64_t d1) {
    lp_st_file f = {0};
    cr_assert_eq(lp_st_open(&f, path), LP_OK);
    lp_st_spec sp[16];
    const void *da[16];
    float *big = calloc((size_t)(d0 * (d1 ? d1 : 1)), 4);
    for (int i = 0; i < f.n; i++) {
        sp[i] = (lp_st_spec){f.tensors[i].name, f.tensors[i].dtype, f.tensors[i].ndim, {0}};
        memcpy(sp[i].shape, f.tensors[i].shape, sizeof sp[i].shape);
        da[i] = f.tensors[i].data;
        if (!strcmp(f.tensors[i].name, name)) sp[i].ndim = ndim, sp[i].shape[0] = d0, sp[i].shape[1] = d1, da[i] = big;
    }
    char tmpf[700];
    snprintf(tmpf, sizeof tmpf, "%s.new", path);
    cr_assert_eq(lp_st_write(tmpf, sp, da, f.n, NULL), LP_OK, "%s", lp_last_error());
    lp_st_close(&f);
    cr_assert_eq(rename(tmpf, path), 0);
    free(big);
}

Test(clt, bad_files_refused) {
    char p[700];
    char *d = copy_set("plt_jumprelu", "no_kind", "feature_input_hook: mlp.hook_in\n");
    expect_refused(d, LP_ERR_FORMAT, "model_kind");
    d = copy_set("plt_jumprelu", "bad_yaml", "model_kind: [unclosed\n");
    expect_refused(d, LP_ERR_FORMAT, "config.yaml");
    d = copy_set("plt_jumprelu", "hub", "model_kind: transcoder_set\ntranscoders:\n  - hf://org/repo/layer_0.safetensors\n");
    expect_refused(d, LP_ERR_FORMAT, "hf://");
    d = copy_set("plt_jumprelu", "topk_thr", "model_kind: transcoder_set\nactivation_function: topk\nk: 4\n");
    expect_refused(d, LP_ERR_FORMAT, "threshold");
    d = copy_set("plt_jumprelu", "wrong_shape", NULL);
    snprintf(p, sizeof p, "%s/layer_1.safetensors", d);
    replace_tensor(p, "W_dec", 2, 96, 65);
    expect_refused(d, LP_ERR_SHAPE, "W_dec");
    d = copy_set("clt_relu", "clt_dec_shape", NULL);
    snprintf(p, sizeof p, "%s/W_dec_1.safetensors", d);
    replace_tensor(p, "W_dec_1", 2, 96, 64);
    expect_refused(d, LP_ERR_SHAPE, "W_dec_1.safetensors");
    d = copy_set("clt_relu", "clt_no_dec", NULL);
    snprintf(p, sizeof p, "%s/W_dec_1.safetensors", d);
    cr_assert_eq(unlink(p), 0);
    expect_refused(d, LP_ERR_IO, "W_dec_1.safetensors");
    d = copy_set("plt_relu_skip", "skip_missing", NULL);
    snprintf(p, sizeof p, "%s/layer_1.safetensors", d);
    replace_tensor(p, "W_skip", 1, 64, 0);
    expect_refused(d, LP_ERR_SHAPE, "W_skip");
    /* a set without config.yaml reads with circuit-tracer's defaults */
    d = copy_set("clt_relu", "no_config", NULL);
    snprintf(p, sizeof p, "%s/config.yaml", d);
    cr_assert_eq(unlink(p), 0);
    lp_clt *t = load_ok(d);
    cr_expect_eq(t->cfg.kind, LP_CLT_CROSS_LAYER);
    cr_expect_str_eq(t->cfg.input_hook, "hook_resid_mid");
    lp_clt_free(t, &ctx);
}

/* TopK (loupe's file form): the k largest pre-activations per token kept as they are, the
 * rest 0, as circuit-tracer's TopK (x * gate of torch.topk's indices, no relu after it);
 * written with activation_function: topk and k, and read back to the same set. */
static void check_topk(const float *pre, const float *f, int N, int S, int K) {
    for (int n = 0; n < N; n++) {
        int kept = 0;
        for (int s = 0; s < S; s++) {
            int above = 0; /* entries ranked before s */
            for (int u = 0; u < S; u++) above += pre[n * S + u] > pre[n * S + s] || (pre[n * S + u] == pre[n * S + s] && u < s);
            float want = above < K ? pre[n * S + s] : 0;
            cr_expect_eq(f[n * S + s], want, "token %d feature %d: %g, expected %g", n, s, f[n * S + s], want);
            kept += f[n * S + s] != 0;
        }
        cr_expect_eq(kept, K);
    }
}

Test(clt, topk_round_trip) {
    lp_clt *t = load_ok(CLT_FIX "/plt_relu_skip");
    t->cfg.act = LP_CLT_TOPK, t->cfg.k = 5;
    int D = 64, S = t->cfg.d_sae, N = 4;
    float *x = lp_test_rand((size_t)N * D, 9, -2, 2), *pre = malloc((size_t)N * S * 4), *f = malloc((size_t)N * S * 4);
    cr_assert_eq(lp_clt_encode(t, &ctx, 1, x, N, pre, 1), LP_OK);
    cr_assert_eq(lp_clt_encode(t, &ctx, 1, x, N, f, 0), LP_OK, "%s", lp_last_error());
    check_topk(pre, f, N, S, 5);
    char dir[512];
    snprintf(dir, sizeof dir, "%s/topk", tmp);
    cr_assert_eq(lp_clt_save(t, &ctx, dir), LP_OK, "%s", lp_last_error());
    lp_clt *u = load_ok(dir);
    cr_expect_eq(u->cfg.act, LP_CLT_TOPK);
    cr_expect_eq(u->cfg.k, 5);
    cr_expect(memcmp(u->mem, t->mem, t->n_floats * 4) == 0);
    /* every pre-activation negative: the 5 largest still come out, negative (a relu after
     * the selection would give none) */
    for (int s = 0; s < S; s++) t->layer[1].b_enc[s] -= 100.0f;
    cr_assert_eq(lp_clt_encode(t, &ctx, 1, x, N, pre, 1), LP_OK);
    cr_assert_eq(lp_clt_encode(t, &ctx, 1, x, N, f, 0), LP_OK, "%s", lp_last_error());
    for (int i = 0; i < N * S; i++) cr_assert_lt(pre[i], 0.0f);
    check_topk(pre, f, N, S, 5);
    free(x), free(pre), free(f);
    lp_clt_free(u, &ctx);
    lp_clt_free(t, &ctx);
}
