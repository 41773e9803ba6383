/* test_graph_schema.c: the graph JSON loupe writes validates against Neuronpedia's
 * graph-schema.json (draft-07, the committed copy in tests/fixtures/graph_page), checked by
 * scripts/validate-graph-json.py with Python's jsonschema (Debian: python3-jsonschema).
 * Graphs built here: the Llama fixture's full graph (its error ids clash with two layer-0
 * features, so its links carry source_index / target_index), its cross-layer transcoder
 * graph, and Gemma 2 with Gemma Scope-sited transcoders. Without jsonschema the test skips
 * saying so; with it, an invalid graph fails. A graph with a required key removed must be
 * found invalid (the check can fail). */
#include <cjson/cJSON.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loupe/clt.h"
#include "loupe/graph.h"
#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "loupe/textfile.h"
#include "testutil.h"

#define SCHEMA LP_FIXTURES "/graph_page/graph-schema.json"
#define VALIDATE "python3 scripts/validate-graph-json.py " SCHEMA " "

static void write_graph(const char *model, const char *tcdir, const char *ref_path, const char *slug, const char *out) {
    lp_st_file ref;
    lp_model *m;
    lp_ctx c;
    lp_clt *tc;
    cr_assert_eq(lp_st_open(&ref, ref_path), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_load(&m, model, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    cr_assert_eq(lp_clt_load(&tc, &c, tcdir), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *tok = lp_st_find(&ref, "tokens");
    lp_graph_opts o = lp_graph_defaults();
    lp_graph *g;
    cr_assert_eq(lp_graph_build(&g, m, tc, tok->data, (int)tok->shape[0], &o), LP_OK, "%s", lp_last_error());
    lp_graph_json_opts jo = {.slug = slug, .scan = tc->cfg.scan, .prompt = "a prompt"};
    cr_assert_eq(lp_graph_write_json(g, &jo, out), LP_OK, "%s", lp_last_error());
    lp_graph_free(g);
    lp_clt_free(tc, &c);
    lp_model_free(m);
    lp_ctx_free(&c);
    lp_st_close(&ref);
}

/* Runs the validator on the files: its exit status (0 valid, 1 invalid), its output in out. */
static int validate(const char *dir, const char *files, char *out, size_t n) {
    char cmd[2048], log[300];
    snprintf(log, sizeof log, "%s/validate.txt", dir);
    snprintf(cmd, sizeof cmd, VALIDATE "%s > %s 2>&1", files, log);
    int rc = system(cmd);
    rc = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
    char *t;
    size_t tn;
    out[0] = 0;
    if (lp_text_read(log, "log", &t, &tn) == LP_OK) snprintf(out, n, "%s", t), free(t);
    return rc;
}

Test(graph_schema, loupe_graph_json_validates, .timeout = 120) {
    char dir[] = "/tmp/lp_graph_schemaXXXXXX", a[300], b[300], c[300], bad[300], files[1300], log[8192];
    cr_assert(mkdtemp(dir));
    if (system("python3 -c 'import jsonschema' >/dev/null 2>&1") != 0) {
        lp_remove_tree(dir);
        cr_skip_test("python3's jsonschema module is missing (Debian: apt-get install python3-jsonschema): the schema is not checked");
    }
    snprintf(a, sizeof a, "%s/llama.json", dir);
    snprintf(b, sizeof b, "%s/llama-clt.json", dir);
    snprintf(c, sizeof c, "%s/gemma2.json", dir);
    write_graph(LP_FIXTURES "/graph/model", LP_FIXTURES "/graph/transcoders", LP_FIXTURES "/graph/reference.safetensors", "llama", a);
    write_graph(LP_FIXTURES "/graph/model", LP_FIXTURES "/graph/clt", LP_FIXTURES "/graph/reference.safetensors", "llama-clt", b);
    write_graph(LP_FIXTURES "/graph_gemma/gemma2/model", LP_FIXTURES "/graph_gemma/gemma2/scope",
                LP_FIXTURES "/graph_gemma/reference.safetensors", "gemma2", c);
    char *t;
    size_t n;
    cr_assert_eq(lp_text_read(a, "graph", &t, &n), LP_OK);
    cr_assert(strstr(t, "\"source_index\"") || strstr(t, "\"target_index\""), "the Llama graph was expected to carry the clash's indices");
    free(t);
    snprintf(files, sizeof files, "%s %s %s", a, b, c);
    int rc = validate(dir, files, log, sizeof log);
    cr_log_info("%s", log);
    cr_assert_eq(rc, 0, "loupe's graph JSON does not validate against graph-schema.json:\n%s", log);

    /* the check can fail: the same graph without its qParams */
    cr_assert_eq(lp_text_read(a, "graph", &t, &n), LP_OK);
    cJSON *j = cJSON_ParseWithLength(t, n);
    free(t);
    cr_assert(j);
    cJSON_DeleteItemFromObject(j, "qParams");
    char *s = cJSON_Print(j);
    cJSON_Delete(j);
    snprintf(bad, sizeof bad, "%s/bad.json", dir);
    cr_assert_eq(lp_write_file_atomic(bad, s, strlen(s)), LP_OK);
    free(s);
    rc = validate(dir, bad, log, sizeof log);
    cr_expect_eq(rc, 1, "a graph without qParams passed: %s", log);
    cr_expect(strstr(log, "'qParams' is a required property"), "%s", log);
    cr_assert_eq(lp_remove_tree(dir), LP_OK);
}
