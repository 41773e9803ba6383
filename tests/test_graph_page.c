/* test_graph_page.c: the HTML page of an attribution graph, from the graph JSON that
 * circuit-tracer 0.5.0's create_graph_files wrote for a small random Llama with random
 * transcoders (tests/gen/gen_graph_page_fixture.py; it also validated that JSON against
 * Neuronpedia's graph-schema.json): the page holds the graph exactly and loads nothing;
 * malformed graphs are refused with one line naming the key; `loupe graph-page`; and, with
 * Debian's chromium, the page drawn in a headless browser (every node and link, the paths
 * of a selected node, no request leaving the page, and a screenshot showing the graph). */
#include <cjson/cJSON.h>
#include <ctype.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loupe/graph_page.h"
#include "loupe/output.h"
#include "testutil.h"

#define FIX LP_FIXTURES "/graph_page"
#define GRAPH FIX "/tiny-graph.json"

static char *slurp(const char *path, size_t *n) {
    size_t len;
    char *t = lp_read_file(path, &len);
    cr_assert(t, "cannot read %s", path);
    if (n) *n = len;
    return t;
}

static cJSON *load_graph(void) {
    size_t n;
    char *t = slurp(GRAPH, &n);
    cJSON *j = cJSON_ParseWithLength(t, n);
    free(t);
    cr_assert(j, GRAPH " does not parse");
    return j;
}

static int count_of(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p++) n++;
    return n;
}

static const cJSON *item(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    cr_assert(v, "no '%s'", k);
    return v;
}

static void tmpdir(char *dir) { cr_assert(mkdtemp(dir), "mkdtemp %s", dir); }

static void rmdir_all(const char *dir) { cr_expect_eq(lp_remove_tree(dir), LP_OK, "%s", lp_last_error()); }

/* The page's embedded data (between the data <script> tags), parsed. */
static cJSON *page_data(const char *html) {
    const char *s = strstr(html, "id=\"graph-data\">");
    cr_assert(s, "no graph-data script");
    s = strchr(s, '>') + 1;
    const char *e = strstr(s, "</script>");
    cr_assert(e);
    cJSON *d = cJSON_ParseWithLength(s, (size_t)(e - s));
    cr_assert(d, "the page's data does not parse");
    return d;
}

static int node_index(const cJSON *nodes, const char *id) {
    int i = 0;
    for (const cJSON *n = nodes->child; n; n = n->next, i++)
        if (strcmp(item(n, "node_id")->valuestring, id) == 0) return i;
    return -1;
}

static char g_page[256];

static char *write_fixture_page(char *dir) {
    tmpdir(dir);
    snprintf(g_page, sizeof g_page, "%s/graph.html", dir);
    lp_graph_info info;
    cr_assert_eq(lp_graph_page_write_file(GRAPH, g_page, &info), LP_OK, "%s", lp_last_error());
    return slurp(g_page, NULL);
}

Test(graph_page, page_holds_the_graph_and_loads_nothing) {
    char dir[] = "/tmp/lp_graph_pageXXXXXX";
    char *h = write_fixture_page(dir);
    /* nothing that can load: no URL, no src/href, no fetch; the fixture's tokens hold
     * "</script>" and "<!--", which must not survive as markup */
    static const char *const banned[] = {"://", "src=", "href=", "url(", "@import", "<link", "<iframe", "<img",
                                         "fetch(", "XMLHttpRequest", "WebSocket", "EventSource", "import(", "<!--", "sendBeacon"};
    for (size_t i = 0; i < sizeof banned / sizeof *banned; i++) cr_expect(!strstr(h, banned[i]), "the page contains '%s'", banned[i]);
    cr_expect_eq(count_of(h, "</script>"), 2, "a </script> came through from the data");
    cr_expect_eq(count_of(h, "<script"), 2);
    cr_expect(!strstr(h, "\xe2\x80\xa8"), "a raw U+2028 (a line end to older JavaScript) came through");
    cr_expect(strstr(h, "\\u2028"), "the fixture's U+2028 is not in the data as \\u2028");

    cJSON *g = load_graph(), *d = page_data(h);
    const cJSON *gn = item(g, "nodes"), *gl = item(g, "links"), *gt = item(item(g, "metadata"), "prompt_tokens");
    const cJSON *dn = item(d, "nodes"), *dl = item(d, "links"), *dt = item(d, "tokens");
    int nn = cJSON_GetArraySize(gn), nl = cJSON_GetArraySize(gl);
    cr_assert_gt(nn, 20, "the fixture is a real graph");
    cr_assert_gt(nl, 20);
    cr_assert_eq(cJSON_GetArraySize(dn), nn);
    cr_assert_eq(cJSON_GetArraySize(dl), 3 * nl);
    cr_assert_eq(cJSON_GetArraySize(dt), cJSON_GetArraySize(gt));
    for (int i = 0; i < cJSON_GetArraySize(gt); i++)
        cr_expect_str_eq(cJSON_GetArrayItem(dt, i)->valuestring, cJSON_GetArrayItem(gt, i)->valuestring, "token %d", i);
    cr_expect_str_eq(item(d, "slug")->valuestring, item(item(g, "metadata"), "slug")->valuestring);
    int i = 0, kinds[4] = {0};
    for (const cJSON *n = gn->child; n; n = n->next, i++) {
        const cJSON *p = cJSON_GetArrayItem(dn, i);
        cr_expect_str_eq(item(p, "id")->valuestring, item(n, "node_id")->valuestring);
        cr_expect_eq(item(p, "c")->valueint, item(n, "ctx_idx")->valueint);
        const char *ft = item(n, "feature_type")->valuestring;
        int k = item(p, "k")->valueint;
        kinds[k]++;
        int want = !strcmp(ft, "embedding") ? 0 : !strcmp(ft, "mlp reconstruction error") ? 2 : !strcmp(ft, "logit") ? 3 : 1;
        cr_expect_eq(k, want, "node %d (%s) is kind %d", i, ft, k);
        const cJSON *inf = item(n, "influence"), *pinf = item(p, "inf");
        if (cJSON_IsNumber(inf)) cr_expect_eq(pinf->valuedouble, inf->valuedouble, "node %d influence", i);
        else cr_expect(cJSON_IsNull(pinf));
        if (k == 1) { /* circuit-tracer's feature ids are LAYER_INDEX_POS */
            int L, f, c;
            cr_assert_eq(sscanf(item(n, "node_id")->valuestring, "%d_%d_%d", &L, &f, &c), 3);
            cr_expect_eq(item(p, "fi")->valueint, f);
            cr_expect_eq(item(p, "act")->valuedouble, item(n, "activation")->valuedouble);
        }
        if (k == 3) {
            cr_expect_eq(item(p, "p")->valuedouble, item(n, "token_prob")->valuedouble);
            char want_clerp[256];
            snprintf(want_clerp, sizeof want_clerp, "Output \"%s\" (p=", item(p, "tok")->valuestring);
            cr_expect(strncmp(item(n, "clerp")->valuestring, want_clerp, strlen(want_clerp)) == 0, "logit token '%s' from '%s'",
                      item(p, "tok")->valuestring, item(n, "clerp")->valuestring);
        }
    }
    for (int k = 0; k < 4; k++) cr_expect_gt(kinds[k], 0, "the fixture has no node of kind %d", k);
    i = 0;
    for (const cJSON *l = gl->child; l; l = l->next, i++) {
        int s = cJSON_GetArrayItem(dl, 3 * i)->valueint, t = cJSON_GetArrayItem(dl, 3 * i + 1)->valueint;
        cr_expect_str_eq(cJSON_GetArrayItem(dn, s)->child->valuestring, item(l, "source")->valuestring, "link %d source", i);
        cr_expect_str_eq(cJSON_GetArrayItem(dn, t)->child->valuestring, item(l, "target")->valuestring, "link %d target", i);
        cr_expect_eq(cJSON_GetArrayItem(dl, 3 * i + 2)->valuedouble, item(l, "weight")->valuedouble, "link %d weight", i);
    }
    cJSON_Delete(g), cJSON_Delete(d), free(h);
    rmdir_all(dir);
}

Test(graph_page, text_and_file_give_the_same_page) {
    char dir[] = "/tmp/lp_graph_textXXXXXX", p[300];
    char *h = write_fixture_page(dir);
    size_t n;
    char *txt = slurp(GRAPH, &n);
    snprintf(p, sizeof p, "%s/from_text.html", dir);
    cr_assert_eq(lp_graph_page_write(txt, n, p), LP_OK, "%s", lp_last_error());
    char *h2 = slurp(p, NULL);
    cr_expect_str_eq(h2, h);
    lp_graph_info info;
    cr_assert_eq(lp_graph_check(txt, n, "x.json", &info), LP_OK, "%s", lp_last_error());
    cJSON *g = load_graph();
    cr_expect_eq(info.n_nodes, cJSON_GetArraySize(item(g, "nodes")));
    cr_expect_eq(info.n_links, cJSON_GetArraySize(item(g, "links")));
    cr_expect_eq(info.n_features + info.n_errors + info.n_embeddings + info.n_logits, info.n_nodes);
    cr_expect_eq(info.n_embeddings, info.n_tokens, "circuit-tracer keeps every embedding node");
    cr_expect_eq(info.n_layers, 2, "the fixture's model has 2 layers");
    cJSON_Delete(g), free(txt), free(h), free(h2);
    rmdir_all(dir);
}

/* ---- refusals ---- */

typedef void (*mutate_fn)(cJSON *g);
static cJSON *nodes_of(cJSON *g) { return cJSON_GetObjectItemCaseSensitive(g, "nodes"); }
static cJSON *links_of(cJSON *g) { return cJSON_GetObjectItemCaseSensitive(g, "links"); }
static void m_no_nodes(cJSON *g) { cJSON_DeleteItemFromObject(g, "nodes"); }
static void m_no_qparams(cJSON *g) { cJSON_DeleteItemFromObject(g, "qParams"); }
static void m_links_object(cJSON *g) { cJSON_ReplaceItemInObject(g, "links", cJSON_CreateObject()); }
static void m_no_prompt(cJSON *g) { cJSON_DeleteItemFromObject(cJSON_GetObjectItem(g, "metadata"), "prompt"); }
static void m_token_number(cJSON *g) {
    cJSON_ReplaceItemInArray(cJSON_GetObjectItem(cJSON_GetObjectItem(g, "metadata"), "prompt_tokens"), 2, cJSON_CreateNumber(7));
}
static void m_dup_id(cJSON *g) {
    cJSON *n = cJSON_GetArrayItem(nodes_of(g), 3);
    cJSON_ReplaceItemInObject(n, "node_id", cJSON_CreateString(cJSON_GetArrayItem(nodes_of(g), 1)->child->valuestring));
}
static void m_unknown_source(cJSON *g) { cJSON_ReplaceItemInObject(cJSON_GetArrayItem(links_of(g), 4), "source", cJSON_CreateString("9_9_9")); }
static void m_unknown_target(cJSON *g) { cJSON_ReplaceItemInObject(cJSON_GetArrayItem(links_of(g), 2), "target", cJSON_CreateString("nope")); }
static void m_weight_string(cJSON *g) { cJSON_ReplaceItemInObject(cJSON_GetArrayItem(links_of(g), 1), "weight", cJSON_CreateString("1")); }
static void m_ctx_out(cJSON *g) { cJSON_ReplaceItemInObject(cJSON_GetArrayItem(nodes_of(g), 5), "ctx_idx", cJSON_CreateNumber(12)); }
static void m_ctx_frac(cJSON *g) { cJSON_ReplaceItemInObject(cJSON_GetArrayItem(nodes_of(g), 5), "ctx_idx", cJSON_CreateNumber(1.5)); }
static void m_layer_word(cJSON *g) { cJSON_ReplaceItemInObject(cJSON_GetArrayItem(nodes_of(g), 6), "layer", cJSON_CreateString("x1")); }
static void m_layer_huge(cJSON *g) { cJSON_ReplaceItemInObject(cJSON_GetArrayItem(nodes_of(g), 6), "layer", cJSON_CreateNumber(1e9)); }
static void m_feature_frac(cJSON *g) { cJSON_ReplaceItemInObject(cJSON_GetArrayItem(nodes_of(g), 7), "feature", cJSON_CreateNumber(2.5)); }
static void m_no_clerp(cJSON *g) { cJSON_DeleteItemFromObject(cJSON_GetArrayItem(nodes_of(g), 8), "clerp"); }
static void m_influence_str(cJSON *g) { cJSON_ReplaceItemInObject(cJSON_GetArrayItem(nodes_of(g), 9), "influence", cJSON_CreateString("0.5")); }
static void m_node_array(cJSON *g) { cJSON_ReplaceItemInArray(nodes_of(g), 10, cJSON_CreateArray()); }

Test(graph_page, refuses_malformed_graphs_with_one_line) {
    static const struct { mutate_fn f; const char *phrase; } cases[] = {
        {m_no_nodes, "x.json: nodes: must be an array, is missing"},
        {m_no_qparams, "x.json: qParams: must be an object"},
        {m_links_object, "x.json: links: must be an array, is an object"},
        {m_no_prompt, "x.json: metadata.prompt: must be a string"},
        {m_token_number, "x.json: metadata.prompt_tokens[2]: must be a string, is a number"},
        {m_dup_id, "x.json: nodes[3].node_id:"},
        {m_unknown_source, "x.json: links[4].source: \"9_9_9\" is not a node_id"},
        {m_unknown_target, "x.json: links[2].target: \"nope\" is not a node_id"},
        {m_weight_string, "x.json: links[1].weight: must be a finite number, is a string"},
        {m_ctx_out, "x.json: nodes[5].ctx_idx: 12 is outside the prompt's 12 tokens"},
        {m_ctx_frac, "x.json: nodes[5].ctx_idx: must be an integer"},
        {m_layer_word, "x.json: nodes[6].layer: must be \"E\" or a layer number"},
        {m_layer_huge, "x.json: nodes[6].layer: must be \"E\" or a layer number"},
        {m_feature_frac, "x.json: nodes[7].feature: must be an integer or null"},
        {m_no_clerp, "x.json: nodes[8].clerp: must be a string, is missing"},
        {m_influence_str, "x.json: nodes[9].influence: must be a finite number or null, is a string"},
        {m_node_array, "x.json: nodes[10]: must be an object, is an array"},
    };
    char dir[] = "/tmp/lp_graph_badXXXXXX", page[300];
    tmpdir(dir);
    snprintf(page, sizeof page, "%s/bad.html", dir);
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        cJSON *g = load_graph();
        cases[c].f(g);
        char *txt = cJSON_PrintUnformatted(g);
        cJSON_Delete(g);
        lp_status st = lp_graph_check(txt, strlen(txt), "x.json", NULL);
        cr_expect_eq(st, LP_ERR_FORMAT, "case %zu: status %d", c, st);
        cr_expect_eq(lp_status_exit_code(st), 2);
        cr_expect(strstr(lp_last_error(), cases[c].phrase), "case %zu: '%s' lacks '%s'", c, lp_last_error(), cases[c].phrase);
        cr_expect(!strchr(lp_last_error(), '\n'), "case %zu: not one line", c);
        cr_expect_neq(lp_graph_page_write(txt, strlen(txt), page), LP_OK, "case %zu", c);
        cr_expect(strstr(lp_last_error(), "graph JSON: "), "%s", lp_last_error());
        cr_expect(access(page, F_OK) != 0, "case %zu: a page was written for a refused graph", c);
        free(txt);
    }
    static const struct { const char *text; const char *phrase; } raw[] = {
        {"{\"metadata\": {", "x.json: not valid JSON"},
        {"[1, 2]", "x.json: must be a JSON object"},
        {"{\"a\": \"\xff\"}", "x.json: not valid UTF-8"},
        {"", "x.json: not valid JSON"},
        {"{} {}", "x.json: more after the JSON value (byte 3)"},
    };
    for (size_t c = 0; c < sizeof raw / sizeof *raw; c++) {
        lp_status st = lp_graph_check(raw[c].text, strlen(raw[c].text), "x.json", NULL);
        cr_expect_eq(lp_status_exit_code(st), 2, "raw %zu", c);
        cr_expect(strstr(lp_last_error(), raw[c].phrase), "raw %zu: '%s' lacks '%s'", c, lp_last_error(), raw[c].phrase);
    }
    rmdir_all(dir);
}

/* ---- the command ---- */

static char g_out[4096], g_err[4096];

static int loupe(const char *fmt, ...) {
    char args[2048], cmd[4600], o[64], e[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    const char *bin = getenv("LOUPE_CLI") ? getenv("LOUPE_CLI") : "build/loupe";
    snprintf(o, sizeof o, "/tmp/lp_gp_out.%d", (int)getpid());
    snprintf(e, sizeof e, "/tmp/lp_gp_err.%d", (int)getpid());
    snprintf(cmd, sizeof cmd, "%s %s >%s 2>%s", bin, args, o, e);
    int rc = system(cmd);
    char *const bufs[2] = {g_out, g_err};
    const char *paths[2] = {o, e};
    for (int k = 0; k < 2; k++) {
        FILE *f = fopen(paths[k], "r");
        size_t n = f ? fread(bufs[k], 1, 4095, f) : 0;
        bufs[k][n] = 0;
        if (f) fclose(f);
        unlink(paths[k]);
    }
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

Test(graph_page, command_writes_the_page_and_refuses_bad_input) {
    char dir[] = "/tmp/lp_graph_cliXXXXXX", p[300], bad[300], want[400];
    tmpdir(dir);
    cJSON *g = load_graph();
    int nn = cJSON_GetArraySize(item(g, "nodes")), nl = cJSON_GetArraySize(item(g, "links"));
    snprintf(p, sizeof p, "%s/g.html", dir);
    int rc = loupe("graph-page " GRAPH " %s", p);
    cr_assert_eq(rc, 0, "exit %d: %s", rc, g_err);
    snprintf(want, sizeof want, "%s: %d nodes (", p, nn);
    cr_expect(strstr(g_out, want), "stdout '%s' lacks '%s'", g_out, want);
    snprintf(want, sizeof want, ", %d links, 12 tokens, 2 layers\n", nl);
    cr_expect(strstr(g_out, want), "stdout '%s' lacks '%s'", g_out, want);
    struct stat sb;
    cr_expect(stat(p, &sb) == 0 && sb.st_size > 1000);
    cr_assert_eq(loupe("graph-page " GRAPH " %s --json", p), 0, "%s", g_err);
    cJSON *j = cJSON_Parse(g_out);
    cr_assert(j, "--json output '%s'", g_out);
    cr_expect_eq(item(j, "nodes")->valueint, nn);
    cr_expect_eq(item(j, "links")->valueint, nl);
    cJSON_Delete(j);
    /* a graph with a link to nowhere: exit 2, one line naming the file and the key */
    cJSON_ReplaceItemInObject(cJSON_GetArrayItem(item(g, "links"), 0), "target", cJSON_CreateString("L_nowhere"));
    char *txt = cJSON_Print(g);
    snprintf(bad, sizeof bad, "%s/bad.json", dir);
    cr_assert_eq(lp_write_file_atomic(bad, txt, strlen(txt)), LP_OK);
    free(txt);
    snprintf(p, sizeof p, "%s/bad.html", dir);
    cr_expect_eq(loupe("graph-page %s %s", bad, p), 2);
    snprintf(want, sizeof want, "loupe: %s: links[0].target: \"L_nowhere\" is not a node_id", bad);
    cr_expect(strstr(g_err, want), "stderr '%s' lacks '%s'", g_err, want);
    cr_expect_eq(count_of(g_err, "\n"), 1, "stderr is not one line: '%s'", g_err);
    cr_expect(access(p, F_OK) != 0);
    cr_expect_eq(loupe("graph-page %s/missing.json %s", dir, p), 2);
    cr_expect(strstr(g_err, "missing.json"), "%s", g_err);
    cr_expect_eq(loupe("graph-page " GRAPH), 2);
    cr_expect(strstr(g_err, "usage: loupe graph-page GRAPH.json OUT.html"), "%s", g_err);
    cJSON_Delete(g);
    rmdir_all(dir);
}

/* ---- in a browser ---- */

#define CHROMIUM                                                                                                  \
    "timeout 90 chromium --headless --no-sandbox --disable-gpu --disable-extensions --no-first-run "              \
    "--disable-background-networking --disable-component-update --disable-sync --disable-default-apps "          \
    "--host-resolver-rules='MAP * ~NOTFOUND' --proxy-server=127.0.0.1:9 "

static void need_chromium(void) {
    if (system("command -v chromium >/dev/null 2>&1") != 0) cr_skip_test("chromium is not installed (Debian: apt-get install chromium)");
}

/* Requests in a Chromium net log that a page started: the browser's own (update checks
 * and the like) have no initiating origin ("not an origin"); a page's file:// document
 * starts its requests as origin "null". */
static int page_requests(const char *netlog, char *first, size_t n) {
    size_t len;
    char *t = slurp(netlog, &len);
    cJSON *j = cJSON_ParseWithLength(t, len);
    free(t);
    cr_assert(j, "%s does not parse", netlog);
    const cJSON *types = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "constants"), "logEventTypes");
    const cJSON *start = cJSON_GetObjectItem(types, "URL_REQUEST_START_JOB");
    cr_assert(start, "%s: no URL_REQUEST_START_JOB event type", netlog);
    int k = 0;
    first[0] = 0;
    for (const cJSON *e = cJSON_GetObjectItem(j, "events")->child; e; e = e->next) {
        if (cJSON_GetObjectItem(e, "type")->valueint != start->valueint) continue;
        const cJSON *p = cJSON_GetObjectItem(e, "params"), *ini = cJSON_GetObjectItem(p, "initiator");
        const char *url = cJSON_GetStringValue(cJSON_GetObjectItem(p, "url"));
        if (!url || (cJSON_IsString(ini) && strcmp(ini->valuestring, "not an origin") == 0)) continue; /* an end event; the browser's own */
        if (!k++) snprintf(first, n, "%s", url);
    }
    cJSON_Delete(j);
    return k;
}

static char *dump_dom(const char *dir, const char *page, const char *hash, const char *tag) {
    char cmd[2048], dom[300];
    snprintf(dom, sizeof dom, "%s/dom-%s.html", dir, tag);
    snprintf(cmd, sizeof cmd, CHROMIUM "--user-data-dir=%s/profile-%s --log-net-log=%s/net-%s.json --dump-dom 'file://%s%s' > %s 2>/dev/null",
             dir, tag, dir, tag, page, hash, dom);
    cr_assert_eq(system(cmd), 0, "chromium failed: %s", cmd);
    return slurp(dom, NULL);
}

/* Ancestors (through incoming links) and descendants of node s, s included; the links
 * into an ancestor or out of a descendant. */
static void paths_of(const cJSON *g, int s, int *nodes, int *links) {
    const cJSON *gn = item(g, "nodes"), *gl = item(g, "links");
    int n = cJSON_GetArraySize(gn), m = cJSON_GetArraySize(gl);
    int *src = malloc(sizeof(int) * m), *dst = malloc(sizeof(int) * m);
    unsigned char *up = calloc(n, 1), *down = calloc(n, 1);
    for (int l = 0; l < m; l++) {
        const cJSON *L = cJSON_GetArrayItem(gl, l);
        src[l] = node_index(gn, item(L, "source")->valuestring), dst[l] = node_index(gn, item(L, "target")->valuestring);
    }
    up[s] = down[s] = 1;
    for (int changed = 1; changed;) { /* fixed point: simple and independent of the page's search */
        changed = 0;
        for (int l = 0; l < m; l++) {
            if (up[dst[l]] && !up[src[l]]) up[src[l]] = 1, changed = 1;
            if (down[src[l]] && !down[dst[l]]) down[dst[l]] = 1, changed = 1;
        }
    }
    *nodes = *links = 0;
    for (int i = 0; i < n; i++) *nodes += up[i] || down[i];
    for (int l = 0; l < m; l++) *links += up[dst[l]] || down[src[l]];
    free(src), free(dst), free(up), free(down);
}

Test(graph_page, renders_in_headless_chromium_without_requests, .timeout = 240) {
    need_chromium();
    char dir[] = "/tmp/lp_graph_renderXXXXXX", want[400], first[512];
    free(write_fixture_page(dir));
    cJSON *g = load_graph();
    const cJSON *gn = item(g, "nodes");
    int nn = cJSON_GetArraySize(gn), nl = cJSON_GetArraySize(item(g, "links"));
    char *dom = dump_dom(dir, g_page, "", "plain");
    snprintf(want, sizeof want, "data-nodes-drawn=\"%d\"", nn);
    cr_expect(strstr(dom, want), "the rendered DOM lacks %s", want);
    snprintf(want, sizeof want, "data-links-drawn=\"%d\"", nl);
    cr_expect(strstr(dom, want), "the rendered DOM lacks %s", want);
    cr_expect_eq(count_of(dom, "class=\"nd "), nn, "node elements in the DOM");
    cr_expect_eq(count_of(dom, "class=\"lk "), nl, "link elements in the DOM");
    snprintf(want, sizeof want, "%s/net-plain.json", dir);
    cr_expect_eq(page_requests(want, first, sizeof first), 0, "the page made a request: %s", first);
    free(dom);

    /* #select=ID: the page highlights the node's ancestors and descendants */
    int s = -1;
    for (int i = 0; i < nn && s < 0; i++) /* a feature in the middle layer has both */
        if (strcmp(item(cJSON_GetArrayItem(gn, i), "feature_type")->valuestring, "cross layer transcoder") == 0 &&
            strcmp(item(cJSON_GetArrayItem(gn, i), "layer")->valuestring, "1") == 0)
            s = i;
    cr_assert_geq(s, 0, "no layer-1 feature in the fixture");
    int pn, pl;
    paths_of(g, s, &pn, &pl);
    cr_assert_gt(pn, 2);
    char hash[200];
    snprintf(hash, sizeof hash, "#select=%s", item(cJSON_GetArrayItem(gn, s), "node_id")->valuestring);
    dom = dump_dom(dir, g_page, hash, "select");
    snprintf(want, sizeof want, "data-path-nodes=\"%d\"", pn);
    cr_expect(strstr(dom, want), "selecting %s: the rendered DOM lacks %s", hash, want);
    snprintf(want, sizeof want, "data-path-links=\"%d\"", pl);
    cr_expect(strstr(dom, want), "selecting %s: the rendered DOM lacks %s", hash, want);
    free(dom);

    /* the request check finds requests when a page makes them */
    char leak[300];
    snprintf(leak, sizeof leak, "%s/leak.html", dir);
    static const char page[] = "<!DOCTYPE html><html><body><img src=\"http://example.invalid/a.png\">"
                               "<script>fetch('https://example.invalid/b').catch(function () {});</script></body></html>";
    cr_assert_eq(lp_write_file_atomic(leak, page, strlen(page)), LP_OK);
    free(dump_dom(dir, leak, "", "leak"));
    snprintf(want, sizeof want, "%s/net-leak.json", dir);
    cr_expect_geq(page_requests(want, first, sizeof first), 2, "the net log check misses a page's requests");
    cr_expect(strstr(first, "example.invalid"), "%s", first);
    cJSON_Delete(g);
    rmdir_all(dir);
}

/* A screenshot of the page shows the graph: pixels in each node kind's fill colour and in
 * both link colours (scripts/png-colors.py counts them; the standard library decodes PNG).
 * LP_GRAPH_SHOT=FILE keeps the screenshot (make graph-page-shot). */
Test(graph_page, screenshot_shows_the_graph, .timeout = 180) {
    need_chromium();
    char dir[] = "/tmp/lp_graph_shotXXXXXX", cmd[2048], shot[300];
    free(write_fixture_page(dir));
    const char *keep = getenv("LP_GRAPH_SHOT");
    snprintf(shot, sizeof shot, "%s", keep && keep[0] ? keep : "");
    if (!shot[0]) snprintf(shot, sizeof shot, "%s/shot.png", dir);
    snprintf(cmd, sizeof cmd, CHROMIUM "--user-data-dir=%s/profile --window-size=1400,900 --hide-scrollbars --screenshot=%s 'file://%s' >/dev/null 2>&1",
             dir, shot, g_page);
    cr_assert_eq(system(cmd), 0, "chromium failed: %s", cmd);
    /* fills of embedding, feature, error, logit; strokes of positive and negative links
     * (at their opacity over white they are lighter: count the opaque node fills exactly
     * and the links by hue) */
    snprintf(cmd, sizeof cmd, "python3 scripts/png-colors.py %s 6b7f99 e9a03b 9c9a8a 2a9d8f blue red > %s/counts.txt", shot, dir);
    cr_assert_eq(system(cmd), 0, "%s", cmd);
    char p[300];
    snprintf(p, sizeof p, "%s/counts.txt", dir);
    char *counts = slurp(p, NULL);
    long c[6] = {0};
    cr_assert_eq(sscanf(counts, "%ld %ld %ld %ld %ld %ld", &c[0], &c[1], &c[2], &c[3], &c[4], &c[5]), 6, "counts: %s", counts);
    static const char *const what[] = {"embedding", "feature", "error", "logit", "positive link", "negative link"};
    for (int k = 0; k < 6; k++) cr_expect_gt(c[k], 20, "the screenshot has %ld pixels of %s colour", c[k], what[k]);
    free(counts);
    rmdir_all(dir);
}
