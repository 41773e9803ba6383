/* test_lens.c: the logit lens and direct logit attribution against TransformerLens 3.x, on the
 * CPU (F32).
 *
 * Fixtures: tests/fixtures/lens/NAME.safetensors (tests/gen/gen_lens_fixture.py, pinned in
 * tests/gen/requirements-tl.txt: transformer-lens 3.9.0): HookedTransformer built from the
 * committed gpt2-tiny (LayerNorm, learned positions, b_O) and llama-tiny (RMSNorm, GQA 4/2)
 * checkpoints, the final norm folded into W_U by fold_ln, run in float64 on three prompts each
 * (the last position and an inner one; a logit difference and a single logit). Recorded:
 * accumulated_resid(incl_mid=True), its logit lens with the cached final-norm scale
 * (apply_ln_to_stack) and recomputed (accumulated_resid(apply_ln=True)), decompose_resid and
 * stack_head_results with apply_ln=True, and logit_attrs of the components, the heads and
 * each layer's b_O in both modes.
 *
 * Every array must be within the model tests' budget (nmse <= 1e-9, as test_tl.c); the run's
 * metric within 1e-4 of TransformerLens's; and loupe's own components (plus the final norm's
 * bias and b_U) must add up to its own run's metric within 1e-4, through the components and
 * through the heads. */
#include <cjson/cJSON.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loupe/hooks.h"
#include "loupe/lens.h"
#include "loupe/pairs.h"
#include "loupe/safetensors.h"
#include "testutil.h"

static const double LENS_NMSE = 1e-9;
static const double METRIC_ABS = 1e-4;
static const double SUM_ABS = 1e-4;
enum { N_CASES = 3 };

static lp_model *load(const char *name) {
    char d[512];
    snprintf(d, sizeof d, "%s/%s", LP_FIXTURES, name);
    lp_model *m;
    cr_assert_eq(lp_model_load(&m, d, LP_CPU, LP_F32), LP_OK, "%s: %s", name, lp_last_error());
    return m;
}

static void open_ref(lp_st_file *ref, const char *name) {
    char p[512];
    snprintf(p, sizeof p, "%s/lens/%s.safetensors", LP_FIXTURES, name);
    cr_assert_eq(lp_st_open(ref, p), LP_OK, "%s", lp_last_error());
}

static const lp_st_tensor *R(const lp_st_file *ref, int k, const char *key) {
    char nm[96];
    snprintf(nm, sizeof nm, "case%d.%s", k, key);
    const lp_st_tensor *t = lp_st_find(ref, nm);
    cr_assert(t != NULL, "%s: no %s", ref->path, nm);
    return t;
}

static int I(const lp_st_file *ref, int k, const char *key) { return *(const int32_t *)R(ref, k, key)->data; }

/* a (n floats) against the fixture's key, which must hold n values. */
static void expect_close(const char *name, int k, const lp_st_file *ref, const char *key, const float *a, size_t n) {
    const lp_st_tensor *t = R(ref, k, key);
    cr_assert_eq(t->nbytes / 4, n, "%s case%d %s: %zu values, TransformerLens %zu", name, k, key, n, t->nbytes / 4);
    char what[128];
    snprintf(what, sizeof what, "%s case%d %s", name, k, key);
    LP_EXPECT_WITHIN(what, 0, lp_compare_f(a, t->data, n), nmse, LENS_NMSE);
}

/* The answer's rank and probability and the top token of each lens entry, from the fixture's logits. */
static void expect_lens_rows(const char *name, int k, const lp_st_file *ref, const char *key, const lp_lens *r, int mode) {
    const float *L = R(ref, k, key)->data;
    int V = r->d_vocab;
    for (int i = 0; i < r->n_stack; i++) {
        const float *row = L + (size_t)i * V;
        double mx = row[0], z = 0;
        int rank = 0, top = 0;
        for (int v = 0; v < V; v++) top = row[v] > row[top] ? v : top, mx = row[v] > mx ? row[v] : mx;
        for (int v = 0; v < V; v++) z += exp(row[v] - mx), rank += row[v] > row[r->answer];
        double p = exp(row[r->answer] - mx) / z, metric = row[r->answer] - (r->wrong >= 0 ? row[r->wrong] : 0.0);
        cr_expect_eq(r->lens_rank[mode][i], rank, "%s case%d %s[%d]: answer rank %d, TransformerLens %d", name, k, key, i, r->lens_rank[mode][i], rank);
        cr_expect_eq(r->top_ids[mode][(size_t)i * r->top_k], top, "%s case%d %s[%d]: top token %d, TransformerLens %d", name, k, key, i,
                     r->top_ids[mode][(size_t)i * r->top_k], top);
        cr_expect(fabs(r->lens_prob[mode][i] - p) <= 1e-5 * (p > 1 ? p : 1), "%s case%d %s[%d]: prob %g, TransformerLens %g", name, k, key, i,
                  r->lens_prob[mode][i], p);
        cr_expect(fabs(r->lens_metric[mode][i] - metric) <= METRIC_ABS, "%s case%d %s[%d]: metric %g, TransformerLens %g", name, k, key, i,
                  r->lens_metric[mode][i], metric);
        for (int j = 1; j < r->top_k; j++) /* the top tokens by falling probability */
            cr_expect(r->top_prob[mode][(size_t)i * r->top_k + j] <= r->top_prob[mode][(size_t)i * r->top_k + j - 1]);
    }
}

static void one_case(const char *name, lp_lens_ctx *lx, const lp_st_file *ref, int k) {
    const lp_st_tensor *tok = R(ref, k, "tokens");
    lp_lens_opts o = {.pos = I(ref, k, "pos"), .answer = I(ref, k, "answer"), .wrong = I(ref, k, "wrong"), .top_k = 5, .keep_logits = 1};
    lp_lens r;
    cr_assert_eq(lp_lens_run(lx, tok->data, (int)tok->shape[0], &o, &r), LP_OK, "%s", lp_last_error());
    int D = r.d_model, V = r.d_vocab, LH = r.n_layers * r.n_heads;
    expect_close(name, k, ref, "resid", r.resid, (size_t)r.n_stack * D);
    expect_close(name, k, ref, "lens_cached", r.lens_logits[LP_LENS_CACHED], (size_t)r.n_stack * V);
    expect_close(name, k, ref, "lens_recomputed", r.lens_logits[LP_LENS_RECOMPUTED], (size_t)r.n_stack * V);
    expect_close(name, k, ref, "decomp_ln", r.comp_ln, (size_t)r.n_comp * D);
    expect_close(name, k, ref, "heads_ln", r.head_ln, (size_t)LH * D);
    static const char *const mode_name[LP_LENS_MODES] = {"cached", "recomputed"};
    for (int mode = 0; mode < LP_LENS_MODES; mode++) {
        char key[64];
        snprintf(key, sizeof key, "attr_comp_%s", mode_name[mode]);
        expect_close(name, k, ref, key, r.comp[mode], (size_t)r.n_comp);
        snprintf(key, sizeof key, "attr_head_%s", mode_name[mode]);
        expect_close(name, k, ref, key, r.head[mode], (size_t)LH);
        snprintf(key, sizeof key, "attr_bias_%s", mode_name[mode]);
        expect_close(name, k, ref, key, r.bias[mode], (size_t)r.n_layers);
        snprintf(key, sizeof key, "lens_%s", mode_name[mode]);
        expect_lens_rows(name, k, ref, key, &r, mode);
    }
    double metric = *(const float *)R(ref, k, "metric")->data, ubias = *(const float *)R(ref, k, "unembed_bias")->data;
    fprintf(stderr, "  %s case%d: metric %.6f (TransformerLens %.6f); sums off by %.2e (components), %.2e (heads)\n", name, k, r.metric,
            metric, r.comp_sum_err, r.head_sum_err);
    cr_expect(fabs(r.metric - metric) <= METRIC_ABS, "%s case%d: metric %.6f, TransformerLens %.6f", name, k, r.metric, metric);
    cr_expect(fabs(r.unembed_bias - ubias) <= METRIC_ABS, "%s case%d: unembed bias %.6f, TransformerLens %.6f", name, k, r.unembed_bias, ubias);
    cr_expect(r.comp_sum_err <= SUM_ABS, "%s case%d: components + biases miss the metric by %.3e", name, k, r.comp_sum_err);
    cr_expect(r.head_sum_err <= SUM_ABS, "%s case%d: heads + b_O + the rest miss the metric by %.3e", name, k, r.head_sum_err);
    /* the sums, done here from the arrays (not only the library's own report) */
    double s = r.unembed_bias;
    for (int i = 0; i < r.n_comp; i++) s += r.comp[LP_LENS_CACHED][i];
    cr_expect(fabs(s - r.metric) <= SUM_ABS, "%s case%d: components sum to %.6f, metric %.6f", name, k, s, r.metric);
    lp_lens_free(&r);
}

static void parity(const char *name) {
    lp_st_file ref;
    open_ref(&ref, name);
    lp_model *m = load(name);
    lp_lens_ctx *lx;
    cr_assert_eq(lp_lens_open(&lx, m), LP_OK, "%s", lp_last_error());
    for (int k = 0; k < N_CASES; k++) one_case(name, lx, &ref, k);
    lp_lens_close(lx);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(lens, gpt2_tiny) { parity("gpt2-tiny"); }
Test(lens, llama_tiny_gqa) { parity("llama-tiny"); }

/* The fixture tells the modes apart: the cached and recomputed lenses differ far beyond the
 * budget before the last entry (where both are the run's logits), and so do the attributions. */
Test(lens, modes_are_discriminated) {
    static const char *const names[] = {"gpt2-tiny", "llama-tiny"};
    for (int f = 0; f < 2; f++) {
        lp_st_file ref;
        open_ref(&ref, names[f]);
        const lp_st_tensor *a = R(&ref, 0, "lens_cached"), *b = R(&ref, 0, "lens_recomputed");
        size_t n_first = a->nbytes / 4 - (size_t)a->shape[1];
        lp_cmp c = lp_compare_f(a->data, b->data, n_first);
        cr_expect_gt(c.nmse, 1e3 * LENS_NMSE, "%s: the two lenses agree (nmse %.3e)", names[f], c.nmse);
        a = R(&ref, 0, "attr_comp_cached"), b = R(&ref, 0, "attr_comp_recomputed");
        c = lp_compare_f(a->data, b->data, a->nbytes / 4);
        cr_expect_gt(c.nmse, 1e3 * LENS_NMSE, "%s: the two attributions agree (nmse %.3e)", names[f], c.nmse);
        lp_st_close(&ref);
    }
}

/* Without an answer the run's own top token is the answer; its rank at final_post is 0. */
Test(lens, default_answer_is_the_top_token) {
    lp_st_file ref;
    open_ref(&ref, "gpt2-tiny");
    lp_model *m = load("gpt2-tiny");
    lp_lens_ctx *lx;
    cr_assert_eq(lp_lens_open(&lx, m), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *tok = R(&ref, 1, "tokens"), *lens = R(&ref, 1, "lens_recomputed");
    lp_lens_opts o = {.pos = I(&ref, 1, "pos"), .answer = -1, .wrong = -1, .top_k = 3};
    lp_lens r;
    cr_assert_eq(lp_lens_run(lx, tok->data, (int)tok->shape[0], &o, &r), LP_OK, "%s", lp_last_error());
    const float *last = (const float *)lens->data + (size_t)(r.n_stack - 1) * r.d_vocab;
    int top = 0;
    for (int v = 0; v < r.d_vocab; v++) top = last[v] > last[top] ? v : top;
    cr_expect_eq(r.answer, top);
    cr_expect_eq(r.answer_given, 0);
    cr_expect_eq(r.lens_rank[LP_LENS_RECOMPUTED][r.n_stack - 1], 0);
    cr_expect_eq(r.top_ids[LP_LENS_CACHED][(size_t)(r.n_stack - 1) * 3], top);
    cr_expect(r.comp_sum_err <= SUM_ABS);
    char b[32];
    cr_expect_str_eq(lp_lens_stack_label(&r, 3, b, sizeof b), "1_mid");
    cr_expect_str_eq(lp_lens_stack_label(&r, r.n_stack - 1, b, sizeof b), "final_post");
    cr_expect_str_eq(lp_lens_comp_label(&r, 1, b, sizeof b), "pos_embed");
    cr_expect_str_eq(lp_lens_comp_label(&r, 5, b, sizeof b), "1_mlp_out");
    cr_expect_str_eq(lp_lens_head_label(&r, 6, b, sizeof b), "L1H2");
    lp_lens_free(&r);
    /* the hooks the lens set are gone again */
    for (int id = 0; id < lp_hook_count(m); id++) cr_expect(!lp_hook_is_captured(m, id), "%s is still captured", lp_hook_name(m, id));
    lp_lens_close(lx);
    lp_model_free(m);
    lp_st_close(&ref);
}

Test(lens, bad_options_are_refused) {
    lp_model *m = load("llama-tiny");
    lp_lens_ctx *lx;
    cr_assert_eq(lp_lens_open(&lx, m), LP_OK, "%s", lp_last_error());
    int32_t tok[4] = {1, 2, 3, 4}, bad[2] = {1, 1000};
    lp_lens r;
    lp_lens_opts o = {.pos = 4, .answer = 5, .wrong = -1};
    cr_expect_eq(lp_lens_run(lx, tok, 4, &o, &r), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "position 4") != NULL, "%s", lp_last_error());
    o.pos = -1, o.answer = 1000;
    cr_expect_eq(lp_lens_run(lx, tok, 4, &o, &r), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "answer 1000") != NULL, "%s", lp_last_error());
    o.answer = 5, o.wrong = -2;
    cr_expect_eq(lp_lens_run(lx, tok, 4, &o, &r), LP_ERR_ARG);
    o.wrong = -1;
    cr_expect_eq(lp_lens_run(lx, bad, 2, &o, &r), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "tokens[1] = 1000") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_lens_run(lx, tok, 0, &o, &r), LP_ERR_ARG);
    o.top_k = 1001;
    cr_expect_eq(lp_lens_run(lx, tok, 4, &o, &r), LP_ERR_ARG);
    lp_lens_close(lx);
    lp_model_free(m);
}

/* ---- the prompts file's lines ---- */

static const lp_pair_opts g_po = {.file = "p.jsonl", .tk = NULL, .d_vocab = 100, .n_ctx = 8};

static lp_status prompt(const char *line, lp_prompt *p) { return lp_prompt_parse_line(&g_po, line, strlen(line), 4, p); }

static void refused(const char *line, lp_status want, const char *msg) {
    lp_prompt p;
    cr_expect_eq(prompt(line, &p), want, "%s: %s", line, lp_last_error());
    cr_expect(strstr(lp_last_error(), msg) != NULL, "%s: '%s' lacks '%s'", line, lp_last_error(), msg);
    cr_expect(strncmp(lp_last_error(), "p.jsonl:4: ", 11) == 0, "%s", lp_last_error());
    cr_expect(p.ids == NULL);
}

Test(lens, prompt_lines) {
    lp_prompt p;
    cr_assert_eq(prompt("{\"prompt\": [3, 4, 5], \"answer\": 7, \"wrong_answer\": [8], \"position\": -2}", &p), LP_OK, "%s", lp_last_error());
    cr_expect_eq(p.T, 3);
    cr_expect_eq(p.ids[2], 5);
    cr_expect_eq(p.pos, 1);
    cr_expect_eq(p.answer, 7);
    cr_expect_eq(p.wrong, 8);
    lp_prompt_free(&p);
    cr_assert_eq(prompt("{\"prompt\": [3, 4], \"other\": 1}", &p), LP_OK, "%s", lp_last_error());
    cr_expect_eq(p.pos, 1);
    cr_expect_eq(p.answer, -1);
    cr_expect_eq(p.wrong, -1);
    lp_prompt_free(&p);
    cr_assert_eq(prompt("   ", &p), LP_OK);
    cr_expect_eq(p.T, 0);
    refused("{\"answer\": 3}", LP_ERR_FORMAT, "missing \"prompt\"");
    refused("{\"prompt\": [1], \"wrong_answer\": 3}", LP_ERR_FORMAT, "without \"answer\"");
    refused("{\"prompt\": [1, 2], \"position\": 2}", LP_ERR_ARG, "'position' 2 is outside the prompt of 2 tokens");
    refused("{\"prompt\": [1, 2], \"position\": -3}", LP_ERR_ARG, "outside the prompt");
    refused("{\"prompt\": [1, 2], \"position\": 1.0}", LP_ERR_FORMAT, "'position': 1.0 is not an integer");
    refused("{\"prompt\": [1, 2], \"position\": \"1\"}", LP_ERR_FORMAT, "'position' must be an integer");
    refused("{\"prompt\": [1, 2], \"answer\": 100}", LP_ERR_ARG, "'answer': token id 100 is not in [0, 100)");
    refused("{\"prompt\": [1, 2], \"answer\": [1, 2]}", LP_ERR_ARG, "'answer' is 2 tokens, not one");
    refused("{\"prompt\": []}", LP_ERR_ARG, "'prompt' gives no tokens");
    refused("{\"prompt\": [1,2,3,4,5,6,7,8,9]}", LP_ERR_ARG, "the model's context is 8");
    refused("{\"prompt\": \"text\"}", LP_ERR_ARG, "no tokenizer");
    refused("{\"prompt\": [1]} {\"prompt\": [2]}", LP_ERR_FORMAT, "one prompt per line");
    refused("{\"prompt\": [1], \"prompt\": [2]}", LP_ERR_FORMAT, "given twice");
    refused("[1, 2]", LP_ERR_FORMAT, "not a JSON object");
    lp_prompt q;
    static const char nul[] = "{\"prompt\": [1]}\0";
    cr_expect_eq(lp_prompt_parse_line(&g_po, nul, sizeof nul - 1, 4, &q), LP_ERR_FORMAT);
    cr_expect(strstr(lp_last_error(), "NUL byte") != NULL, "%s", lp_last_error());
}

/* ---- `loupe lens` (build/loupe, or $LOUPE_CLI) ---- */

static char g_dir[64], g_err[1 << 14], g_out[1 << 16];

static void cli_mk(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/loupe-lens-XXXXXX");
    cr_assert(mkdtemp(g_dir) != NULL);
}
static void cli_rm(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    cr_expect(system(cmd) == 0);
}
TestSuite(lens_cli, .init = cli_mk, .fini = cli_rm, .timeout = 60);

static void slurp(const char *path, char *buf, size_t n) {
    FILE *f = fopen(path, "rb");
    size_t k = f ? fread(buf, 1, n - 1, f) : 0;
    buf[k] = 0;
    if (f) fclose(f);
}

static const char *at(const char *name) {
    static char p[4][256];
    static int i;
    i = (i + 1) % 4;
    snprintf(p[i], sizeof p[i], "%s/%s", g_dir, name);
    return p[i];
}

static void put(const char *name, const char *text) {
    FILE *f = fopen(at(name), "wb");
    cr_assert(f);
    fputs(text, f);
    fclose(f);
}

/* `loupe lens MODEL --lens.prompts=DIR/p.jsonl --lens.out=DIR/out EXTRA`: the exit status. */
static int lens_cmd(const char *model, const char *extra) {
    const char *bin = getenv("LOUPE_CLI") ? getenv("LOUPE_CLI") : "build/loupe";
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s lens %s/%s --lens.prompts=%s --lens.out=%s %s >%s 2>%s", bin, LP_FIXTURES, model, at("p.jsonl"), at("out"), extra,
             at("out.txt"), at("err.txt"));
    int rc = system(cmd);
    slurp(at("out.txt"), g_out, sizeof g_out);
    slurp(at("err.txt"), g_err, sizeof g_err);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* The fixture's first two cases as a prompts file; the outputs against TransformerLens. */
Test(lens_cli, writes_jsonl_and_safetensors) {
    lp_st_file ref;
    open_ref(&ref, "gpt2-tiny");
    char text[2048];
    size_t o = 0;
    for (int k = 0; k < 2; k++) {
        const lp_st_tensor *tok = R(&ref, k, "tokens");
        o += snprintf(text + o, sizeof text - o, "%s{\"prompt\": [", k ? "\n\n" : "");
        for (int t = 0; t < tok->shape[0]; t++) o += snprintf(text + o, sizeof text - o, "%s%d", t ? ", " : "", ((const int32_t *)tok->data)[t]);
        o += snprintf(text + o, sizeof text - o, "], \"answer\": %d, \"position\": %d", I(&ref, k, "answer"), I(&ref, k, "pos"));
        if (I(&ref, k, "wrong") >= 0) o += snprintf(text + o, sizeof text - o, ", \"wrong_answer\": [%d]", I(&ref, k, "wrong"));
        o += snprintf(text + o, sizeof text - o, "}");
    }
    put("p.jsonl", text);
    cr_assert_eq(lens_cmd("gpt2-tiny", "--lens.top_k=4 --lens.top=3"), 0, "%s", g_err);
    cr_expect(strstr(g_out, "lens: 2 prompts") != NULL, "%s", g_out);
    /* lens.jsonl: one line per prompt, the lines of the file named */
    static char lines[1 << 16];
    slurp(at("out/lens.jsonl"), lines, sizeof lines);
    char *save = NULL, *ln = strtok_r(lines, "\n", &save);
    for (int k = 0; k < 2; k++, ln = strtok_r(NULL, "\n", &save)) {
        cr_assert(ln, "lens.jsonl has %d lines", k);
        cJSON *j = cJSON_Parse(ln);
        cr_assert(j, "line %d is not JSON", k);
        cr_expect_eq(cJSON_GetObjectItem(j, "line")->valueint, 1 + 2 * k);
        cr_expect_eq(cJSON_GetObjectItem(j, "position")->valueint, I(&ref, k, "pos"));
        double v = cJSON_GetObjectItem(j, "value")->valuedouble, want = *(const float *)R(&ref, k, "metric")->data;
        cr_expect(fabs(v - want) <= METRIC_ABS, "prompt %d: value %f, TransformerLens %f", k, v, want);
        cr_expect_str_eq(cJSON_GetObjectItem(j, "metric")->valuestring, I(&ref, k, "wrong") >= 0 ? "logit_diff" : "logit");
        cJSON *lens = cJSON_GetObjectItem(j, "lens");
        cr_expect_eq(cJSON_GetArraySize(lens), 5);
        cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetArrayItem(lens, 4), "recomputed"), "top")), 4);
        cJSON *dla = cJSON_GetObjectItem(j, "dla");
        cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(dla, "components")), 6);
        cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(dla, "top_heads")), 3);
        cr_expect(cJSON_GetObjectItem(dla, "sum_error")->valuedouble <= SUM_ABS);
        cJSON_Delete(j);
    }
    cr_expect(ln == NULL, "lens.jsonl has more than 2 lines");
    /* lens.safetensors: the arrays */
    lp_st_file st;
    cr_assert_eq(lp_st_open(&st, at("out/lens.safetensors")), LP_OK, "%s", lp_last_error());
    static const char *const keys[][2] = {{"attr_comp.cached", "attr_comp_cached"}, {"attr_comp.recomputed", "attr_comp_recomputed"},
                                          {"attr_head.cached", "attr_head_cached"}, {"attr_head.recomputed", "attr_head_recomputed"},
                                          {"attr_bias.cached", "attr_bias_cached"}};
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
            char nm[96];
            snprintf(nm, sizeof nm, "prompt%06d.%s", k, keys[i][0]);
            const lp_st_tensor *t = lp_st_find(&st, nm);
            cr_assert(t, "lens.safetensors lacks %s", nm);
            expect_close("lens.safetensors", k, &ref, keys[i][1], t->data, t->nbytes / 4);
        }
    const lp_st_tensor *h = lp_st_find(&st, "prompt000001.attr_head.cached"), *ids = lp_st_find(&st, "prompt000000.top_ids.recomputed");
    cr_assert(h && ids);
    cr_expect(h->ndim == 2 && h->shape[0] == 2 && h->shape[1] == 4);
    cr_expect(ids->dtype == LP_I32 && ids->ndim == 2 && ids->shape[0] == 5 && ids->shape[1] == 4);
    lp_st_close(&st);
    lp_st_close(&ref);
    /* --json: the last line is one object */
    cr_assert_eq(lens_cmd("gpt2-tiny", "--json"), 0, "%s", g_err);
    cJSON *j = cJSON_Parse(strrchr(g_out, '{'));
    cr_assert(j, "%s", g_out);
    cr_expect_eq(cJSON_GetObjectItem(j, "n_prompts")->valueint, 2);
    cJSON_Delete(j);
}

/* Bad input: exit 2, one line naming the file, line and field; nothing is written. */
static void expect_refused(const char *model, const char *text, const char *phrase) {
    put("p.jsonl", text);
    int rc = lens_cmd(model, "");
    cr_expect_eq(rc, 2, "exit %d for %s; stderr: %s", rc, text, g_err);
    cr_expect(strstr(g_err, phrase) != NULL, "stderr '%s' lacks '%s'", g_err, phrase);
    char *nl = strchr(g_err, '\n');
    cr_expect(nl && nl[1] == 0, "stderr is not one line: '%s'", g_err);
    struct stat sb;
    cr_expect(stat(at("out"), &sb) != 0, "%s was created", at("out"));
}

Test(lens_cli, bad_input_is_one_line_and_exit_2) {
    char p[512];
    snprintf(p, sizeof p, "%s:2: 'answer': token id 5000 is not in [0, 997)", at("p.jsonl"));
    expect_refused("gpt2-tiny", "{\"prompt\": [1, 2]}\n{\"prompt\": [1, 2], \"answer\": 5000}\n", p);
    snprintf(p, sizeof p, "%s:1: 'position' 3 is outside the prompt of 3 tokens", at("p.jsonl"));
    expect_refused("gpt2-tiny", "{\"prompt\": [1, 2, 3], \"position\": 3}\n", p);
    snprintf(p, sizeof p, "%s: no prompts", at("p.jsonl"));
    expect_refused("gpt2-tiny", "", p);
    expect_refused("gpt2-tiny", "\n  \n", p);
    char big[512];
    size_t o = snprintf(big, sizeof big, "{\"prompt\": [1");
    for (int i = 1; i < 33; i++) o += snprintf(big + o, sizeof big - o, ", 1");
    snprintf(big + o, sizeof big - o, "]}\n");
    snprintf(p, sizeof p, "%s:1: the prompts are 33 tokens; the model's context is 32 ('prompt')", at("p.jsonl"));
    expect_refused("gpt2-tiny", big, p);
    expect_refused("gpt2-tiny", "{\"prompt\": [1], \"answer\": 3, \"wrong_answer\": 1.5}\n", "'wrong_answer': 1.5 is not an integer token id");
    expect_refused("llama-tiny", "{\"prompt\": \"no tokenizer here\"}\n", "'prompt' is text but the model has no tokenizer");
    put("p.jsonl", "{\"prompt\": [1]}\n");
    cr_expect_eq(lens_cmd("gpt2-tiny", "--lens.top_k=998"), 2, "%s", g_err);
    cr_expect(strstr(g_err, "lens.top_k: 998 is more than the vocabulary of 997") != NULL, "%s", g_err);
    unlink(at("p.jsonl"));
    cr_expect_eq(lens_cmd("gpt2-tiny", ""), 2, "%s", g_err);
    cr_expect(strstr(g_err, "cannot read the prompts file") != NULL, "%s", g_err);
}

/* ---- from an activation store ---- */

/* `loupe ARGS`: the exit status, stdout and stderr in g_out and g_err. */
static int loupe_cmd(const char *args) {
    const char *bin = getenv("LOUPE_CLI") ? getenv("LOUPE_CLI") : "build/loupe";
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s %s >%s 2>%s", bin, args, at("out.txt"), at("err.txt"));
    int rc = system(cmd);
    slurp(at("out.txt"), g_out, sizeof g_out);
    slurp(at("err.txt"), g_err, sizeof g_err);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

#define GPT2_TINY LP_FIXTURES "/gpt2-tiny"
#define ALL_HOOKS                                                                                                           \
    "hook_embed,hook_pos_embed,blocks.*.hook_resid_pre,blocks.*.hook_resid_mid,blocks.*.hook_resid_post,blocks.*.hook_attn_out," \
    "blocks.*.hook_mlp_out,blocks.*.attn.hook_z,ln_final.hook_scale"

static void cache(const char *store, const char *hooks) {
    char args[1024];
    snprintf(args, sizeof args, "cache --model.path=" GPT2_TINY " --data.tokens=" GPT2_TINY "/tokens.npy --cache.out=%s --cache.hooks='%s'",
             at(store), hooks);
    cr_assert_eq(loupe_cmd(args), 0, "%s", g_err);
}

/* Every array of prompt k in a against b: floats within a relative 1e-4, integers equal;
 * with nan_ok, a's NaN floats and -1 integers (what a store lacked) are skipped. */
static void same_arrays(const lp_st_file *a, const lp_st_file *b, int k, int nan_ok) {
    static const char *const arr[] = {"tokens", "position", "answer", "wrong_answer", "metric", "unembed_bias", "lens_metric.cached",
                                      "lens_metric.recomputed", "lens_prob.cached", "lens_prob.recomputed", "lens_rank.cached",
                                      "lens_rank.recomputed", "top_ids.cached", "top_ids.recomputed", "top_prob.cached",
                                      "top_prob.recomputed", "attr_comp.cached", "attr_comp.recomputed", "attr_head.cached",
                                      "attr_head.recomputed", "attr_bias.cached", "attr_bias.recomputed"};
    for (size_t i = 0; i < sizeof arr / sizeof *arr; i++) {
        char nm[96];
        snprintf(nm, sizeof nm, "prompt%06d.%s", k, arr[i]);
        const lp_st_tensor *x = lp_st_find(a, nm), *y = lp_st_find(b, nm);
        cr_assert(x && y, "%s is missing", nm);
        cr_assert(x->nbytes == y->nbytes && x->dtype == y->dtype, "%s: shapes differ", nm);
        for (size_t e = 0; e < x->nbytes / 4; e++) {
            if (x->dtype == LP_I32) {
                if (nan_ok && ((const int32_t *)x->data)[e] == -1) continue; /* an entry the store did not hold */
                cr_expect_eq(((const int32_t *)x->data)[e], ((const int32_t *)y->data)[e], "%s[%zu]", nm, e);
                continue;
            }
            float u = ((const float *)x->data)[e], v = ((const float *)y->data)[e];
            if (nan_ok && isnan(u)) continue;
            cr_expect(fabsf(u - v) <= 1e-4f * fmaxf(1.0f, fabsf(v)), "%s[%zu]: store %g, prompt %g", nm, e, u, v);
        }
    }
}

/* A store with every hook the lens reads gives the lens of the same prompts; a store of
 * resid_post alone gives the recomputed lens of the entries it holds and NaN elsewhere. */
Test(lens_cli, from_a_store_equals_the_prompts) {
    cache("all", ALL_HOOKS);
    /* the store's sequences as a prompts file (tokens.npy is [2, 16]) */
    lp_st_file toks;
    char tpath[256], text[2048], args[1024];
    snprintf(tpath, sizeof tpath, "%s/shard-00000.safetensors", at("all"));
    cr_assert_eq(lp_st_open(&toks, tpath), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *t = lp_st_find(&toks, "tokens");
    cr_assert(t && t->ndim == 2 && t->shape[0] == 2);
    size_t o = 0;
    for (int k = 0; k < 2; k++) {
        o += snprintf(text + o, sizeof text - o, "{\"prompt\": [");
        for (int i = 0; i < t->shape[1]; i++)
            o += snprintf(text + o, sizeof text - o, "%s%d", i ? ", " : "", ((const int32_t *)t->data)[k * t->shape[1] + i]);
        o += snprintf(text + o, sizeof text - o, "], \"position\": 5%s}\n", k ? ", \"answer\": 7, \"wrong_answer\": 9" : "");
    }
    lp_st_close(&toks);
    put("p.jsonl", text);
    cr_assert_eq(lens_cmd("gpt2-tiny", "--lens.top_k=5"), 0, "%s", g_err);
    cr_assert_eq(rename(at("out"), at("want")), 0);
    lp_st_file want, got;
    cr_assert_eq(lp_st_open(&want, at("want/lens.safetensors")), LP_OK, "%s", lp_last_error());
    /* sequence 0 with the default answer, sequence 1 with an answer and a wrong one */
    for (int k = 0; k < 2; k++) {
        snprintf(args, sizeof args, "lens " GPT2_TINY " --data.store=%s --lens.out=%s --lens.top_k=5 --lens.position=5%s", at("all"), at("out"),
                 k ? " --lens.answer=7 --lens.wrong_answer=9" : "");
        cr_assert_eq(loupe_cmd(args), 0, "%s", g_err);
        cr_expect(strstr(g_out, "lens: 2 sequences") != NULL, "%s", g_out);
        cr_assert_eq(lp_st_open(&got, at("out/lens.safetensors")), LP_OK, "%s", lp_last_error());
        same_arrays(&got, &want, k, 0);
        lp_st_close(&got);
    }
    /* lens.jsonl names the sequence */
    static char lines[1 << 17];
    slurp(at("out/lens.jsonl"), lines, sizeof lines);
    cJSON *j = cJSON_Parse(lines);
    cr_assert(j);
    cr_expect_eq(cJSON_GetObjectItem(j, "sequence")->valueint, 0);
    cr_expect(cJSON_GetObjectItem(j, "line") == NULL);
    cJSON_Delete(j);
    /* resid_post alone: 1_pre and final_post recomputed as the prompts' lens, the rest NaN */
    cache("post", "blocks.*.hook_resid_post");
    snprintf(args, sizeof args, "lens " GPT2_TINY " --data.store=%s --lens.out=%s --lens.top_k=5 --lens.position=5", at("post"), at("out"));
    cr_assert_eq(loupe_cmd(args), 0, "%s", g_err);
    cr_assert_eq(lp_st_open(&got, at("out/lens.safetensors")), LP_OK, "%s", lp_last_error());
    same_arrays(&got, &want, 0, 1);
    const lp_st_tensor *lm = lp_st_find(&got, "prompt000000.lens_metric.recomputed"), *lc = lp_st_find(&got, "prompt000000.lens_metric.cached");
    const lp_st_tensor *ac = lp_st_find(&got, "prompt000000.attr_comp.recomputed");
    cr_assert(lm && lc && ac && lm->shape[0] == 5);
    const float *m = lm->data;
    cr_expect(isnan(m[0]) && isnan(m[1]) && !isnan(m[2]) && isnan(m[3]) && !isnan(m[4]), "held entries: %g %g %g %g %g", m[0], m[1], m[2],
              m[3], m[4]);
    for (int i = 0; i < 5; i++) cr_expect(isnan(((const float *)lc->data)[i]), "cached entry %d without ln_final.hook_scale", i);
    cr_expect(isnan(((const float *)ac->data)[0]), "components without hook_embed");
    lp_st_close(&got);
    lp_st_close(&want);
}

Test(lens_cli, bad_stores_are_refused) {
    char args[1024];
    cache("pre", "blocks.0.hook_resid_pre,ln_final.hook_scale");
    snprintf(args, sizeof args, "lens " GPT2_TINY " --data.store=%s --lens.out=%s", at("pre"), at("out"));
    cr_expect_eq(loupe_cmd(args), 2, "%s", g_err);
    cr_expect(strstr(g_err, "no blocks.1.hook_resid_post") != NULL, "%s", g_err);
    cache("post", "blocks.*.hook_resid_post");
    /* another model than the one the store was cached from */
    snprintf(args, sizeof args, "lens " LP_FIXTURES "/llama-tiny --data.store=%s --lens.out=%s", at("post"), at("out"));
    cr_expect_eq(loupe_cmd(args), 2, "%s", g_err);
    cr_expect(strstr(g_err, "was cached from") != NULL, "%s", g_err);
    snprintf(args, sizeof args, "lens " GPT2_TINY " --data.store=%s --lens.out=%s --lens.position=16", at("post"), at("out"));
    cr_expect_eq(loupe_cmd(args), 2, "%s", g_err);
    cr_expect(strstr(g_err, "lens.position: 16 is outside the stored sequences of 16 tokens") != NULL, "%s", g_err);
    snprintf(args, sizeof args, "lens " GPT2_TINY " --data.store=%s --lens.out=%s --lens.answer=997", at("post"), at("out"));
    cr_expect_eq(loupe_cmd(args), 2, "%s", g_err);
    cr_expect(strstr(g_err, "lens.answer: 997 is not a token id") != NULL, "%s", g_err);
    snprintf(args, sizeof args, "lens " GPT2_TINY " --data.store=%s --lens.prompts=%s --lens.out=%s", at("post"), at("p.jsonl"), at("out"));
    cr_expect_eq(loupe_cmd(args), 2, "%s", g_err);
    cr_expect(strstr(g_err, "lens.prompts or data.store") != NULL, "%s", g_err);
    snprintf(args, sizeof args, "lens " GPT2_TINY " --data.store=%s/nothing --lens.out=%s", g_dir, at("out"));
    cr_expect_eq(loupe_cmd(args), 2, "%s", g_err);
    struct stat sb;
    cr_expect(stat(at("out"), &sb) != 0, "%s was created", at("out"));
}
