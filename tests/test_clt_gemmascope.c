/* test_clt_gemmascope.c: Gemma Scope's transcoders (params.npz per layer, listed in
 * circuit-tracer's config.yaml) read as circuit-tracer 0.5.0's load_gemma_scope_transcoder
 * reads them (tests/gen/gen_clt_gemmascope_fixture.py): W_enc [d_model, d_sae] transposed,
 * JumpReLU with the threshold, no skip; encode and decode within 2e-6 of circuit-tracer's
 * float64 (the budget of test_clt.c), and every malformed file refused with one line naming
 * the file and the key (exit status 2). */
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <unistd.h>

#include "loupe/clt.h"
#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#define GS LP_FIXTURES "/clt_gemmascope"

static lp_ctx ctx;
static void init(void) { cr_assert_eq(lp_ctx_init(&ctx, LP_CPU, LP_F32), LP_OK); }
static void fini(void) { lp_ctx_free(&ctx); }

TestSuite(clt_gemmascope, .init = init, .fini = fini);

Test(clt_gemmascope, matches_circuit_tracer) {
    lp_clt *t;
    cr_assert_eq(lp_clt_load(&t, &ctx, GS), LP_OK, "%s", lp_last_error());
    cr_expect_eq(t->cfg.kind, LP_CLT_PER_LAYER);
    cr_expect_eq(t->cfg.act, LP_CLT_JUMPRELU);
    cr_expect_eq(t->cfg.n_layers, 2);
    cr_expect_eq(t->cfg.d_model, 16);
    cr_expect_eq(t->cfg.d_sae, 40);
    cr_expect_eq(t->cfg.skip, 0);
    cr_expect_str_eq(t->cfg.input_hook, "ln2.hook_normalized");
    cr_expect_str_eq(t->cfg.output_hook, "hook_mlp_out");
    cr_expect_str_eq(t->cfg.scan, "tiny-gemma-scope");
    lp_st_file ref;
    cr_assert_eq(lp_st_open(&ref, GS "/reference.safetensors"), LP_OK, "%s", lp_last_error());
    int N = 8, D = 16, S = 40;
    float f[8 * 40], y[8 * 16];
    double femax = 0, ymax = 0;
    int active = 0;
    for (int l = 0; l < 2; l++) {
        char k[32];
        snprintf(k, sizeof k, "x_%d", l);
        const float *x = lp_st_find(&ref, k)->data;
        snprintf(k, sizeof k, "feat_%d", l);
        const float *wf = lp_st_find(&ref, k)->data;
        snprintf(k, sizeof k, "recon_%d", l);
        const float *wy = lp_st_find(&ref, k)->data;
        cr_assert_eq(lp_clt_encode(t, &ctx, l, x, N, f, 0), LP_OK, "%s", lp_last_error());
        for (int i = 0; i < N * S; i++) {
            cr_expect_eq(f[i] != 0, wf[i] != 0, "layer %d feature %d: %g vs circuit-tracer's %g", l, i, f[i], wf[i]);
            femax = fmax(femax, fabs(f[i] - wf[i]) / (1 + fabs(wf[i])));
            active += wf[i] != 0;
        }
        const float *fl[2] = {NULL, NULL};
        fl[l] = f;
        cr_assert_eq(lp_clt_decode(t, &ctx, l, fl, x, N, y), LP_OK, "%s", lp_last_error());
        for (int i = 0; i < N * D; i++) ymax = fmax(ymax, fabs(y[i] - wy[i]) / (1 + fabs(wy[i])));
    }
    cr_log_info("Gemma Scope transcoders: %d active features; encode within %.2g, decode within %.2g of circuit-tracer", active, femax,
                ymax);
    cr_expect_gt(active, 100);
    cr_expect_leq(femax, 2e-6);
    cr_expect_leq(ymax, 2e-6);
    lp_st_close(&ref);
    lp_clt_free(t, &ctx);
}

/* A fixture path made absolute (the config lies elsewhere); other paths as they are. */
static const char *abs_of(const char *p, char *buf) {
    if (strncmp(p, LP_FIXTURES, strlen(LP_FIXTURES)) != 0) return p;
    cr_assert(realpath(p, buf), "%s", p);
    return buf;
}

/* A set of two layers in dir: layer 0 from `first`, layer 1 from `second` (NULL: the good
 * layer 1); relative paths are the config's directory's. */
static lp_status load_with(const char *dir, const char *first, const char *second) {
    char cfg[1200], path[300], a[PATH_MAX], b[PATH_MAX];
    first = abs_of(first, a);
    second = abs_of(second ? second : GS "/layer_1/params.npz", b);
    snprintf(cfg, sizeof cfg,
             "model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n"
             "scan: x\ntranscoders:\n  - %s\n  - %s\n",
             first, second);
    snprintf(path, sizeof path, "%s/config.yaml", dir);
    cr_assert_eq(lp_write_file_atomic(path, cfg, strlen(cfg)), LP_OK);
    lp_clt *t = NULL;
    lp_status st = lp_clt_load(&t, &ctx, dir);
    lp_clt_free(t, &ctx);
    return st;
}

Test(clt_gemmascope, refuses_bad_files_naming_file_and_key) {
    char dir[] = "/tmp/lp_gsXXXXXX", trunc[300];
    cr_assert(mkdtemp(dir));
    /* a truncated archive, and a safetensors layer among .npz ones */
    size_t n;
    char *b = lp_read_file(GS "/layer_0/params.npz", &n);
    cr_assert(b);
    snprintf(trunc, sizeof trunc, "%s/trunc.npz", dir);
    cr_assert_eq(lp_write_file_atomic(trunc, b, n / 2), LP_OK);
    free(b);
    static const struct { const char *file, *phrase; } cases[] = {
        {GS "/bad/no_threshold.npz", "no_threshold.npz: tensor 'threshold' [40] is missing"},
        {GS "/bad/enc_untransposed.npz", "enc_untransposed.npz: tensor 'W_enc' has shape [40, 16], expected [16, 40]"},
        {GS "/bad/compressed.npz", "compressed.npz: entry 'W_enc.npy' is compressed"},
        {GS "/bad/nan.npz", "nan.npz: tensor 'W_dec'"},
        {GS "/bad/int_bias.npz", "int_bias.npz: entry 'b_enc'"},
        {"missing/params.npz", "missing/params.npz: no such file"},
        {"trunc.npz", "trunc.npz: "},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        lp_status st = load_with(dir, cases[c].file, NULL);
        cr_expect_eq(lp_status_exit_code(st), 2, "case %zu (%s): status %d: %s", c, cases[c].file, st, lp_last_error());
        cr_expect(strstr(lp_last_error(), cases[c].phrase), "case %zu: '%s' lacks '%s'", c, lp_last_error(), cases[c].phrase);
        cr_expect(!strchr(lp_last_error(), '\n'), "case %zu: not one line", c);
        cr_log_info("%s", lp_last_error());
    }
    /* every layer in one format */
    lp_status st = load_with(dir, GS "/layer_0/params.npz", LP_FIXTURES "/graph/transcoders/layer_1.safetensors");
    cr_expect_eq(lp_status_exit_code(st), 2);
    cr_expect(strstr(lp_last_error(), "layer_1.safetensors: a safetensors file among .npz files"), "%s", lp_last_error());
    /* the good pair loads from a config elsewhere, by absolute paths */
    cr_expect_eq(load_with(dir, GS "/layer_0/params.npz", NULL), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_remove_tree(dir), LP_OK);
}
