/* test_dashboard.c: feature dashboards against the numpy brute force of
 * tests/gen/gen_dashboard_fixture.py (exact: the fixture's numbers are dyadic, so every
 * activation and logit is exact in float32), the bad inputs of `loupe dashboard`, the
 * escaping and self-containment of the HTML page, the Neuronpedia batch JSON, and (with
 * Debian's chromium installed) that the page renders in a headless browser. */
#include <cjson/cJSON.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loupe/dashboard.h"
#include "loupe/safetensors.h"
#include "loupe/textfile.h"
#include "testutil.h"

#define FIX LP_FIXTURES "/dashboard"

static cJSON *load_json(const char *path) {
    size_t n;
    char *t = lp_read_file(path, &n);
    cr_assert(t, "cannot read %s", path);
    cJSON *j = cJSON_ParseWithLength(t, n);
    free(t);
    cr_assert(j, "%s does not parse", path);
    return j;
}

static const cJSON *get(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    cr_assert(v, "expected.json lacks '%s'", k);
    return v;
}
static double num(const cJSON *o, const char *k) { return get(o, k)->valuedouble; }
static const cJSON *at(const cJSON *a, int i) { return cJSON_GetArrayItem(a, i); }

typedef struct unembed {
    lp_st_file f;
    const float *W_U, *ln_w;
} unembed;

static void load_unembed(unembed *u) {
    cr_assert_eq(lp_st_open(&u->f, FIX "/unembed.safetensors"), LP_OK, "%s", lp_last_error());
    u->W_U = lp_st_find(&u->f, "W_U")->data;
    u->ln_w = lp_st_find(&u->f, "ln_final_w")->data;
}

static void opts_from(lp_dash_opts *o, const cJSON *jo, int32_t *lat, const unembed *u) {
    lp_dash_defaults(o);
    const cJSON *l = get(jo, "latents");
    o->n_latents = cJSON_GetArraySize(l);
    for (int i = 0; i < o->n_latents; i++) lat[i] = at(l, i)->valueint;
    o->latents = lat, o->store = FIX "/store";
    o->top = (int)num(jo, "top"), o->left = (int)num(jo, "left"), o->right = (int)num(jo, "right");
    o->samples = (int)num(jo, "samples"), o->n_logits = (int)num(jo, "n_logits");
    o->skip_positions = (int)num(jo, "skip_positions"), o->seed = (uint64_t)num(jo, "seed");
    o->batch_tokens = (int)num(jo, "batch_tokens");
    o->W_U = u->W_U, o->ln_final_w = u->ln_w, o->d_vocab = 128;
}

/* [token, value, start, [tokens], [acts]] against an example */
static void check_example(const lp_dash_example *x, const cJSON *e, const char *what, int latent, int i) {
    cr_expect_eq(x->token, (int64_t)at(e, 0)->valuedouble, "latent %d %s %d: token %lld, numpy %.0f", latent, what, i,
                 (long long)x->token, at(e, 0)->valuedouble);
    cr_expect_eq(x->value, (float)at(e, 1)->valuedouble, "latent %d %s %d: value %g, numpy %g", latent, what, i, x->value,
                 at(e, 1)->valuedouble);
    cr_expect_eq(x->start, at(e, 2)->valueint, "latent %d %s %d: start", latent, what, i);
    const cJSON *tk = at(e, 3), *ac = at(e, 4);
    cr_assert_eq(x->len, cJSON_GetArraySize(tk), "latent %d %s %d: context length %d", latent, what, i, x->len);
    for (int q = 0; q < x->len; q++) {
        cr_expect_eq(x->tokens[q], at(tk, q)->valueint, "latent %d %s %d: token %d", latent, what, i, q);
        cr_expect_eq(x->acts[q], (float)at(ac, q)->valuedouble, "latent %d %s %d: act %d: %g vs %g", latent, what, i, q, x->acts[q],
                     at(ac, q)->valuedouble);
    }
}

static void check_latent(const lp_dash_latent *l, const cJSON *e, int64_t counted) {
    int s = (int)num(e, "latent");
    cr_assert_eq(l->latent, s);
    cr_expect_eq(l->fires, (int64_t)num(e, "fires"), "latent %d: fires %lld, numpy %.0f", s, (long long)l->fires, num(e, "fires"));
    cr_expect_eq(l->density, (double)l->fires / (double)counted);
    cr_expect_eq(l->max, (float)num(e, "max"), "latent %d: max", s);
    cr_expect_eq(l->n_bins, (int)num(e, "n_bins"), "latent %d: n_bins %d, numpy %d", s, l->n_bins, (int)num(e, "n_bins"));
    if (l->fires) cr_expect_eq(l->hist_exp, (int)num(e, "hist_exp"), "latent %d: bin width 2^%d", s, l->hist_exp);
    for (int b = 0; b < l->n_bins; b++)
        cr_expect_eq(l->hist[b], (int64_t)at(get(e, "hist"), b)->valuedouble, "latent %d: bin %d", s, b);
    const cJSON *top = get(e, "top"), *bands = get(e, "bands");
    cr_assert_eq(l->n_top, cJSON_GetArraySize(top), "latent %d: %d top examples", s, l->n_top);
    for (int i = 0; i < l->n_top; i++) check_example(&l->top[i], at(top, i), "top", s, i);
    cr_assert_eq(l->n_bands, cJSON_GetArraySize(bands), "latent %d: %d bands", s, l->n_bands);
    for (int b = 0; b < l->n_bands; b++) {
        const cJSON *B = at(bands, b), *ex = at(B, 3);
        cr_expect_eq(l->bands[b].lo, (float)at(B, 0)->valuedouble, "latent %d band %d lo", s, b);
        cr_expect_eq(l->bands[b].hi, (float)at(B, 1)->valuedouble, "latent %d band %d hi", s, b);
        cr_expect_eq(l->bands[b].count, (int64_t)at(B, 2)->valuedouble, "latent %d band %d count", s, b);
        cr_assert_eq(l->bands[b].n, cJSON_GetArraySize(ex), "latent %d band %d: %d samples", s, b, l->bands[b].n);
        for (int i = 0; i < l->bands[b].n; i++) check_example(&l->bands[b].ex[i], at(ex, i), "band sample", s, b * 100 + i);
    }
    cr_assert_eq(l->n_logits, cJSON_GetArraySize(get(e, "pos_ids")));
    for (int i = 0; i < l->n_logits; i++) {
        cr_expect_eq(l->pos_ids[i], at(get(e, "pos_ids"), i)->valueint, "latent %d: top logit %d", s, i);
        cr_expect_eq(l->neg_ids[i], at(get(e, "neg_ids"), i)->valueint, "latent %d: bottom logit %d", s, i);
        cr_expect_eq(l->pos_vals[i], (float)at(get(e, "pos_vals"), i)->valuedouble, "latent %d: top logit value %d", s, i);
        cr_expect_eq(l->neg_vals[i], (float)at(get(e, "neg_vals"), i)->valuedouble, "latent %d: bottom logit value %d", s, i);
    }
    cr_expect_eq(l->logit_lo, (float)num(e, "logit_lo"));
    cr_expect_eq(l->logit_hi, (float)num(e, "logit_hi"));
    for (int b = 0; b < LP_DASH_LOGIT_BINS; b++)
        cr_expect_eq(l->logit_hist[b], (int64_t)at(get(e, "logit_hist"), b)->valuedouble, "latent %d: logit bin %d", s, b);
}

static lp_dash *run_case(int k, lp_sae **sae, lp_ctx *c, unembed *u, cJSON **root) {
    *root = load_json(FIX "/expected.json");
    const cJSON *cs = at(get(*root, "cases"), k);
    char path[256];
    snprintf(path, sizeof path, FIX "/%s", get(cs, "sae")->valuestring);
    cr_assert_eq(lp_ctx_init(c, LP_CPU, LP_F32), LP_OK);
    cr_assert_eq(lp_sae_load(sae, c, path), LP_OK, "%s", lp_last_error());
    load_unembed(u);
    static int32_t lat[64];
    lp_dash_opts o;
    opts_from(&o, get(cs, "opts"), lat, u);
    lp_dash *d = NULL;
    cr_assert_eq(lp_dash_run(*sae, c, &o, &d), LP_OK, "%s", lp_last_error());
    return d;
}

static void check_case(int k) {
    lp_sae *s;
    lp_ctx c;
    unembed u;
    cJSON *root;
    lp_dash *d = run_case(k, &s, &c, &u, &root);
    const cJSON *cs = at(get(root, "cases"), k), *lats = get(cs, "latents");
    int skip = (int)num(get(cs, "opts"), "skip_positions");
    cr_assert_eq(d->n, cJSON_GetArraySize(lats));
    cr_expect_eq(d->n_tokens, 12 * 16);
    cr_expect_eq(d->n_counted, 12 * (16 - skip));
    for (int j = 0; j < d->n; j++) check_latent(&d->lat[j], at(lats, j), d->n_counted);
    lp_dash_free(d);
    cJSON_Delete(root);
    lp_st_close(&u.f);
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
}

Test(dashboard, standard_subset_of_latents_matches_numpy) { check_case(0); }
Test(dashboard, jumprelu_matches_numpy) { check_case(1); }
Test(dashboard, topk_all_latents_matches_numpy) { check_case(2); }

Test(dashboard, latent_lists) {
    int32_t *v;
    int n;
    cr_assert_eq(lp_dash_parse_latents("0-3,7,9-10", 12, "dash.latents", &v, &n), LP_OK, "%s", lp_last_error());
    int want[] = {0, 1, 2, 3, 7, 9, 10};
    cr_assert_eq(n, 7);
    for (int i = 0; i < n; i++) cr_expect_eq(v[i], want[i]);
    free(v);
    cr_assert_eq(lp_dash_parse_latents("all", 5, "dash.latents", &v, &n), LP_OK);
    cr_expect_eq(n, 5);
    free(v);
    cr_expect_eq(lp_dash_parse_latents("3,12", 12, "dash.latents", &v, &n), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "dash.latents") && strstr(lp_last_error(), "d_sae = 12"), "%s", lp_last_error());
    cr_expect_eq(lp_dash_parse_latents("1,1", 12, "dash.latents", &v, &n), LP_ERR_ARG);
    cr_expect_eq(lp_dash_parse_latents("5-2", 12, "dash.latents", &v, &n), LP_ERR_ARG);
    cr_expect_eq(lp_dash_parse_latents("x", 12, "dash.latents", &v, &n), LP_ERR_ARG);
}

Test(dashboard, bad_inputs_name_the_key_or_file) {
    lp_ctx c;
    lp_sae *s;
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    cr_assert_eq(lp_sae_load(&s, &c, FIX "/sae_standard"), LP_OK, "%s", lp_last_error());
    int32_t lat[] = {0, 12};
    lp_dash_opts o;
    lp_dash_defaults(&o);
    o.store = FIX "/store", o.latents = lat, o.n_latents = 2;
    lp_dash *d = NULL;
    cr_expect_eq(lp_dash_run(s, &c, &o, &d), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "dash.latents") && strstr(lp_last_error(), "12"), "%s", lp_last_error());
    o.n_latents = 1;
    char empty[] = "/tmp/lp_dash_emptyXXXXXX";
    cr_assert(mkdtemp(empty));
    o.store = empty;
    cr_expect_eq(lp_status_exit_code(lp_dash_run(s, &c, &o, &d)), 2);
    cr_expect(strstr(lp_last_error(), empty), "%s", lp_last_error());
    rmdir(empty);
    o.store = FIX "/store", o.hook = "blocks.1.hook_resid_post";
    cr_expect_eq(lp_dash_run(s, &c, &o, &d), LP_ERR_NOT_FOUND);
    cr_expect(strstr(lp_last_error(), "blocks.1.hook_resid_post"), "%s", lp_last_error());
    o.hook = NULL, o.skip_positions = 16;
    cr_expect_eq(lp_dash_run(s, &c, &o, &d), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "dash.skip_positions"), "%s", lp_last_error());
    lp_sae_free(s, &c);
    lp_sae_cfg cf = {.arch = LP_SAE_STANDARD, .d_in = 4, .d_sae = 8, .d_out = 4};
    strcpy(cf.normalize, "none");
    strcpy(cf.hook_name, "blocks.0.hook_resid_post");
    cr_assert_eq(lp_sae_alloc(&s, &cf, &c), LP_OK, "%s", lp_last_error());
    o.skip_positions = 0;
    cr_expect_eq(lp_dash_run(s, &c, &o, &d), LP_ERR_SHAPE);
    cr_expect(strstr(lp_last_error(), "d_in is 4"), "%s", lp_last_error());
    cr_expect(d == NULL);
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
}

/* ---- the outputs ---- */

static char *slurp_all(const char *path) {
    size_t n;
    char *t = lp_read_file(path, &n);
    cr_assert(t, "cannot read %s", path);
    return t;
}

static int count_of(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p++) n++;
    return n;
}

static int contexts_shown(const lp_dash_latent *l) {
    int n = l->n_top;
    for (int b = 0; b < l->n_bands; b++) n += l->bands[b].n;
    return n;
}

#define TITLE "t</script><b>&\"x"

/* Writes the topk case's page with the GPT-2 test tokenizer (whose ids below 94 are
 * ASCII characters: the store spells "</script><b>&..." in one sequence). */
static lp_dash *write_page(char *dir, lp_sae **s, lp_ctx *c, unembed *u, cJSON **root, lp_tokenizer **tk) {
    cr_assert(mkdtemp(dir));
    lp_dash *d = run_case(2, s, c, u, root);
    cr_assert_eq(lp_tokenizer_load(tk, LP_FIXTURES "/tokenizer/gpt2/tokenizer.json"), LP_OK, "%s", lp_last_error());
    char path[256];
    snprintf(path, sizeof path, "%s/dashboard.html", dir);
    cr_assert_eq(lp_dash_write_html(d, *tk, TITLE, path), LP_OK, "%s", lp_last_error());
    snprintf(path, sizeof path, "%s/batch-0.json", dir);
    cr_assert_eq(lp_dash_write_neuronpedia(d, *tk, "tiny", 0, "sae_topk", 0, d->n, path), LP_OK, "%s", lp_last_error());
    return d;
}

static void cleanup(char *dir, lp_dash *d, lp_sae *s, lp_ctx *c, unembed *u, cJSON *root, lp_tokenizer *tk) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect_eq(system(cmd), 0);
    lp_dash_free(d);
    cJSON_Delete(root);
    lp_st_close(&u->f);
    lp_sae_free(s, c);
    lp_ctx_free(c);
    lp_tokenizer_free(tk);
}

Test(dashboard, html_is_self_contained_and_escaped) {
    char dir[] = "/tmp/lp_dash_htmlXXXXXX", path[256];
    lp_sae *s;
    lp_ctx c;
    unembed u;
    cJSON *root;
    lp_tokenizer *tk;
    lp_dash *d = write_page(dir, &s, &c, &u, &root, &tk);
    snprintf(path, sizeof path, "%s/dashboard.html", dir);
    char *h = slurp_all(path);
    static const char *const banned[] = {"http", "src=", "href=", "url(", "@import", "<link", "<iframe", "<img", "//"};
    for (size_t i = 0; i < sizeof banned / sizeof *banned; i++) cr_expect(!strstr(h, banned[i]), "the page contains '%s'", banned[i]);
    cr_expect_eq(count_of(h, "</script>"), 2, "a token or the title closed a script element");
    cr_expect(strstr(h, "<title>t&lt;/script&gt;&lt;b&gt;&amp;&quot;x</title>"), "the title is not escaped");
    const char *open = "<script type=\"application/json\" id=\"dash-data\">";
    char *a = strstr(h, open);
    cr_assert(a);
    a += strlen(open);
    char *b = strstr(a, "</script>");
    cr_assert(b);
    *b = 0;
    cr_expect(!strchr(a, '<') && !strchr(a, '>'), "raw '<' or '>' inside the data");
    cJSON *j = cJSON_Parse(a);
    cr_assert(j, "the inline data is not JSON");
    cr_expect_str_eq(cJSON_GetObjectItem(j, "title")->valuestring, TITLE);
    cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(j, "latents")), 12);
    const cJSON *v = cJSON_GetObjectItem(j, "vocab");
    cr_expect_str_eq(cJSON_GetObjectItem(v, "27")->valuestring, "<", "GPT-2 id 27 is '<'");
    cr_expect_str_eq(cJSON_GetObjectItem(v, "5")->valuestring, "&");
    cJSON_Delete(j);
    free(h);
    cleanup(dir, d, s, &c, &u, root, tk);
}

Test(dashboard, neuronpedia_batch_json) {
    char dir[] = "/tmp/lp_dash_npXXXXXX", path[256];
    lp_sae *s;
    lp_ctx c;
    unembed u;
    cJSON *root;
    lp_tokenizer *tk;
    lp_dash *d = write_page(dir, &s, &c, &u, &root, &tk);
    snprintf(path, sizeof path, "%s/batch-0.json", dir);
    cJSON *j = load_json(path);
    cr_expect_str_eq(cJSON_GetObjectItem(j, "model_id")->valuestring, "tiny");
    cr_expect_str_eq(cJSON_GetObjectItem(j, "sae_set")->valuestring, "sae_topk");
    const cJSON *fs = cJSON_GetObjectItem(j, "features");
    cr_assert_eq(cJSON_GetArraySize(fs), d->n);
    for (int i = 0; i < d->n; i++) {
        const lp_dash_latent *l = &d->lat[i];
        const cJSON *f = at(fs, i), *acts = cJSON_GetObjectItem(f, "activations");
        cr_expect_eq(cJSON_GetObjectItem(f, "feature_index")->valueint, l->latent);
        cr_expect_eq(cJSON_GetObjectItem(f, "frac_nonzero")->valuedouble, l->density);
        const cJSON *hh = cJSON_GetObjectItem(f, "freq_hist_data_bar_heights"), *hv = cJSON_GetObjectItem(f, "freq_hist_data_bar_values");
        cr_assert_eq(cJSON_GetArraySize(hh), l->n_bins);
        for (int b = 0; b < l->n_bins; b++) {
            cr_expect_eq((int64_t)at(hh, b)->valuedouble, l->hist[b]);
            cr_expect(fabs(at(hv, b)->valuedouble - (b + 0.5) * ldexp(1, l->hist_exp)) <= 6e-4, "bar value %d", b);
        }
        cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(f, "logits_hist_data_bar_heights")), LP_DASH_LOGIT_BINS);
        const cJSON *ps = cJSON_GetObjectItem(f, "pos_str"), *pv = cJSON_GetObjectItem(f, "pos_values");
        cr_assert_eq(cJSON_GetArraySize(ps), l->n_logits);
        for (int k = 0; k < l->n_logits; k++) {
            char *txt;
            size_t n;
            cr_assert_eq(lp_detokenize(tk, &l->pos_ids[k], 1, &txt, &n), LP_OK);
            if (l->pos_ids[k] < 94) cr_expect_str_eq(at(ps, k)->valuestring, txt); /* ASCII ids decode whole */
            free(txt);
            cr_expect(fabs(at(pv, k)->valuedouble - l->pos_vals[k]) <= 6e-4);
        }
        cr_assert_eq(cJSON_GetArraySize(acts), contexts_shown(l));
        if (l->n_top) {
            const cJSON *a0 = at(acts, 0);
            cr_expect_eq(cJSON_GetObjectItem(a0, "bin_min")->valuedouble, -1);
            cr_expect(fabs(cJSON_GetObjectItem(a0, "bin_max")->valuedouble - l->max) <= 6e-4, "bin_max %g, max %g", cJSON_GetObjectItem(a0, "bin_max")->valuedouble, l->max);
            cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(a0, "tokens")), l->top[0].len);
            cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(a0, "values")), l->top[0].len);
        }
    }
    cJSON_Delete(j);
    cleanup(dir, d, s, &c, &u, root, tk);
}

/* Debian's chromium, headless, loads the page from a file URL with every host mapped
 * nowhere and the proxy pointed at a closed port; the dumped DOM must show the latent list
 * and the first latent's contexts drawn by the page's own script. */
Test(dashboard, html_renders_in_headless_chromium, .timeout = 120) {
    if (system("command -v chromium >/dev/null 2>&1") != 0) cr_skip_test("chromium is not installed (Debian: apt-get install chromium)");
    char dir[] = "/tmp/lp_dash_renderXXXXXX", cmd[1024], path[256];
    lp_sae *s;
    lp_ctx c;
    unembed u;
    cJSON *root;
    lp_tokenizer *tk;
    lp_dash *d = write_page(dir, &s, &c, &u, &root, &tk);
    snprintf(cmd, sizeof cmd,
             "timeout 90 chromium --headless --no-sandbox --disable-gpu --disable-extensions --no-first-run "
             "--host-resolver-rules='MAP * ~NOTFOUND' --proxy-server=127.0.0.1:9 --user-data-dir=%s/profile "
             "--dump-dom file://%s/dashboard.html > %s/dom.html 2>/dev/null", dir, dir, dir);
    cr_assert_eq(system(cmd), 0, "chromium failed: %s", cmd);
    snprintf(path, sizeof path, "%s/dom.html", dir);
    char *dom = slurp_all(path), want[96];
    snprintf(want, sizeof want, "data-rendered=\"%d\"", d->n);
    cr_expect(strstr(dom, want), "the rendered DOM lacks %s", want);
    snprintf(want, sizeof want, "data-contexts=\"%d\"", contexts_shown(&d->lat[0]));
    cr_expect(strstr(dom, want), "the rendered DOM lacks %s", want);
    cr_expect(strstr(dom, "<svg"), "no histogram drawn");
    free(dom);
    cleanup(dir, d, s, &c, &u, root, tk);
}

/* ---- the command ---- */

static char g_err[4096];

static int loupe(const char *fmt, ...) {
    char args[2048], cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    const char *bin = getenv("LOUPE_CLI") ? getenv("LOUPE_CLI") : "build/loupe";
    snprintf(cmd, sizeof cmd, "%s %s >/dev/null 2>/tmp/lp_dash_err.%d", bin, args, (int)getpid());
    int rc = system(cmd);
    snprintf(cmd, sizeof cmd, "/tmp/lp_dash_err.%d", (int)getpid());
    FILE *f = fopen(cmd, "r");
    size_t n = f ? fread(g_err, 1, sizeof g_err - 1, f) : 0;
    g_err[n] = 0;
    if (f) fclose(f);
    unlink(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static void expect_bad(int rc, const char *phrase) {
    cr_expect_eq(rc, 2, "exit %d; stderr: %s", rc, g_err);
    cr_expect(strstr(g_err, phrase), "stderr '%s' lacks '%s'", g_err, phrase);
    char *nl = strchr(g_err, '\n');
    cr_expect(nl && nl[1] == 0, "stderr is not one line: '%s'", g_err);
}

Test(dashboard, command_writes_outputs_and_refuses_bad_input) {
    char dir[] = "/tmp/lp_dash_cliXXXXXX", p[256];
    cr_assert(mkdtemp(dir));
    int rc = loupe("dashboard " FIX "/sae_topk --data.store=" FIX "/store --dash.out=%s/out --dash.latents=0-5 --dash.np_batch=4", dir);
    cr_assert_eq(rc, 0, "%s", g_err);
    static const char *const files[] = {"dashboard.html", "batch-0.json", "batch-1.json"};
    for (int i = 0; i < 3; i++) {
        struct stat sb;
        snprintf(p, sizeof p, "%s/out/%s", dir, files[i]);
        cr_expect(stat(p, &sb) == 0 && sb.st_size > 0, "%s is missing", p);
    }
    snprintf(p, sizeof p, "%s/out/batch-2.json", dir);
    cr_expect(access(p, F_OK) != 0, "6 latents, 4 per batch: two files");
    expect_bad(loupe("dashboard " FIX "/sae_topk --data.store=" FIX "/store --dash.out=%s/o2 --dash.latents=3-12", dir), "dash.latents");
    cr_expect(strstr(g_err, "d_sae = 12"), "%s", g_err);
    snprintf(p, sizeof p, "%s/empty", dir);
    mkdir(p, 0755);
    expect_bad(loupe("dashboard " FIX "/sae_topk --data.store=%s --dash.out=%s/o3", p, dir), p);
    expect_bad(loupe("dashboard " FIX "/sae_topk --data.store=" FIX "/store --data.hook=blocks.9.hook_resid_post --dash.out=%s/o4", dir),
               "blocks.9.hook_resid_post");
    snprintf(p, sizeof p, "rm -rf %s", dir);
    cr_expect_eq(system(p), 0);
}
