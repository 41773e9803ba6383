/* test_graph_clash.c: circuit-tracer's error id "0_{layer}_{pos}" is also the id of layer
 * 0's feature {layer} at {pos}; the fixture prompt of tests/fixtures/graph has two such
 * clashes in its pruned graph (0_1_9 and 0_2_9, in circuit-tracer's own graph-full.json
 * too). loupe's JSON keeps the ids and names the node of every link end at a shared id by
 * source_index / target_index; the page keys nodes by index, so it is written and draws
 * every node and link, each link at the node the graph has it at:
 *   - for each shared node, the sums of |weight| of the links into and out of it, as the
 *     page resolved them, equal those of its kept edges in the graph;
 *   - circuit-tracer's own JSON (no indices) still gets its page, its ambiguous link ends
 *     counted; a wrong index is refused naming the key;
 *   - Chromium draws every node and link (skipped without chromium). */
#include <cjson/cJSON.h>
#include <math.h>
#include <unistd.h>

#include "analysis/graph_internal.h"
#include "loupe/clt.h"
#include "loupe/graph.h"
#include "loupe/graph_page.h"
#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "loupe/textfile.h"
#include "testutil.h"

#define GDIR LP_FIXTURES "/graph"

static lp_graph *build(void) {
    lp_st_file ref;
    lp_model *m;
    lp_ctx c;
    lp_clt *tc;
    cr_assert_eq(lp_st_open(&ref, GDIR "/reference.safetensors"), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_load(&m, GDIR "/model", LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_ctx_init(&c, LP_CPU, LP_F32), LP_OK);
    cr_assert_eq(lp_clt_load(&tc, &c, GDIR "/transcoders"), LP_OK, "%s", lp_last_error());
    const lp_st_tensor *tok = lp_st_find(&ref, "tokens");
    lp_graph_opts o = lp_graph_defaults();
    lp_graph *g;
    cr_assert_eq(lp_graph_build(&g, m, tc, tok->data, (int)tok->shape[0], &o), LP_OK, "%s", lp_last_error());
    lp_clt_free(tc, &c);
    lp_model_free(m);
    lp_ctx_free(&c);
    lp_st_close(&ref);
    return g;
}

/* Sum of |A| over the kept edges into (in = 1) or out of node v, as the JSON holds them
 * (both ends kept; logits are never sources). */
static double kept_mass(const lp_graph *g, int64_t v, int in) {
    double s = 0;
    for (int64_t i = 0; i < g->n_nodes; i++)
        for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1]; e++) {
            int64_t src = g->col[e];
            if (!g->edge_mask[e] || !g->node_mask[i] || !g->node_mask[src] || src >= g->n_nodes - g->n_logits) continue;
            if ((in && i == v) || (!in && src == v)) s += fabs(g->val[e]);
        }
    return s;
}

/* The graph node of doc node k: a feature by (layer, pos, index), an error by (layer, pos). */
static int64_t graph_node(const lp_graph *g, const graph_doc *d, int k) {
    int L, f, p;
    cr_assert_eq(sscanf(d->id[k], "%d_%d_%d", &L, &f, &p), 3);
    if (d->kind[k] == GRAPH_ERROR) return lp_graph_error_node(g, f, p);
    for (int i = 0; i < g->n_features; i++) {
        const int32_t *a = g->active + 3 * (size_t)g->selected[i];
        if (a[0] == L && a[1] == p && a[2] == f) return i;
    }
    cr_assert_fail("%s: no such feature", d->id[k]);
    return -1;
}

static void need_chromium_or_skip(int *have) { *have = system("command -v chromium >/dev/null 2>&1") == 0; }

Test(graph_clash, page_draws_a_graph_whose_error_ids_clash, .timeout = 300) {
    lp_graph *g = build();
    char dir[] = "/tmp/lp_graph_clashXXXXXX", path[300], html[300];
    cr_assert(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/clash.json", dir);
    snprintf(html, sizeof html, "%s/clash.html", dir);
    lp_graph_json_opts jo = {.slug = "clash", .scan = "tiny-llama-plt", .prompt = ""};
    cr_assert_eq(lp_graph_write_json(g, &jo, path), LP_OK, "%s", lp_last_error());
    char *txt;
    size_t n;
    cr_assert_eq(lp_text_read(path, "graph JSON", &txt, &n), LP_OK);
    graph_doc d;
    cr_assert_eq(graph_doc_parse(&d, txt, n, path), LP_OK, "%s", lp_last_error());
    int shared = 0;
    for (int k = 0; k < d.n_nodes; k++) {
        if (!d.shared[k]) continue;
        shared++;
        int64_t v = graph_node(g, &d, k);
        double in = 0, out = 0;
        for (int l = 0; l < d.n_links; l++) in += d.dst[l] == k ? fabs(d.w[l]) : 0, out += d.src[l] == k ? fabs(d.w[l]) : 0;
        double gin = kept_mass(g, v, 1), gout = kept_mass(g, v, 0);
        cr_log_info("%s (%s): links in %.6g (graph %.6g), out %.6g (graph %.6g)", d.id[k], d.kind[k] == GRAPH_ERROR ? "error" : "feature", in,
                    gin, out, gout);
        cr_expect(fabs(in - gin) <= 1e-5 * (1 + gin), "%s: |weight| into it %.8g, the graph's %.8g", d.id[k], in, gin);
        cr_expect(fabs(out - gout) <= 1e-5 * (1 + gout), "%s: |weight| out of it %.8g, the graph's %.8g", d.id[k], out, gout);
        cr_expect_gt(in + out, 0, "%s has no links", d.id[k]);
    }
    cr_expect_eq(shared, 4, "the fixture prompt's graph has two clashes (four nodes), found %d nodes", shared);
    cr_expect_eq(d.n_ambiguous, 0, "loupe's JSON left %d link ends ambiguous", d.n_ambiguous);
    int nn = d.n_nodes, nl = d.n_links;
    graph_doc_free(&d);
    free(txt);

    lp_graph_info info;
    cr_assert_eq(lp_graph_page_write_file(path, html, &info), LP_OK, "%s", lp_last_error());
    cr_expect_eq(info.n_shared, 4);
    cr_expect_eq(info.n_ambiguous, 0);
    int have;
    need_chromium_or_skip(&have);
    if (have) {
        char cmd[1400], dom[320], want[64];
        snprintf(dom, sizeof dom, "%s/dom.html", dir);
        snprintf(cmd, sizeof cmd,
                 "timeout 90 chromium --headless --no-sandbox --disable-gpu --disable-extensions --no-first-run "
                 "--disable-background-networking --disable-component-update --disable-sync --disable-default-apps "
                 "--user-data-dir=%s/profile --dump-dom 'file://%s' > %s 2>/dev/null",
                 dir, html, dom);
        cr_assert_eq(system(cmd), 0, "chromium failed: %s", cmd);
        char *t;
        size_t tn;
        cr_assert_eq(lp_text_read(dom, "dom", &t, &tn), LP_OK);
        snprintf(want, sizeof want, "data-nodes-drawn=\"%d\"", nn);
        cr_expect(strstr(t, want), "the rendered page lacks %s", want);
        snprintf(want, sizeof want, "data-links-drawn=\"%d\"", nl);
        cr_expect(strstr(t, want), "the rendered page lacks %s", want);
        free(t);
    } else {
        cr_log_info("chromium is not installed: the drawing is not checked");
    }

    /* circuit-tracer's own JSON of this graph: the same clashes, no indices */
    snprintf(html, sizeof html, "%s/ct.html", dir);
    cr_assert_eq(lp_graph_page_write_file(GDIR "/graph-full.json", html, &info), LP_OK, "%s", lp_last_error());
    cr_expect_eq(info.n_shared, 4);
    cr_expect_gt(info.n_ambiguous, 0);
    cr_log_info("circuit-tracer's graph-full.json: %d nodes share ids, %d link ends ambiguous", info.n_shared, info.n_ambiguous);
    cr_assert_eq(lp_remove_tree(dir), LP_OK);
    lp_graph_free(g);
}

/* A source_index / target_index must be an index into nodes whose node is the link's end. */
Test(graph_clash, refuses_a_wrong_index) {
    char *txt;
    size_t n;
    cr_assert_eq(lp_text_read(GDIR "/graph-full.json", "graph JSON", &txt, &n), LP_OK);
    static const struct { const char *key; double v; const char *phrase; } cases[] = {
        {"source_index", 1e6, "x.json: links[0].source_index: must be an index into nodes"},
        {"target_index", 1.5, "x.json: links[0].target_index: must be an index into nodes"},
        {"source_index", -1, "x.json: links[0].source_index: must be an index into nodes"},
        {"target_index", 39, "x.json: links[0].target_index: nodes[39] is"}, /* a logit, not the target 0_1_9 */
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        cJSON *j = cJSON_ParseWithLength(txt, n);
        cJSON_AddNumberToObject(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "links"), 0), cases[c].key, cases[c].v);
        char *t = cJSON_PrintUnformatted(j);
        cJSON_Delete(j);
        lp_status st = lp_graph_check(t, strlen(t), "x.json", NULL);
        cr_expect_eq(lp_status_exit_code(st), 2, "case %zu", c);
        cr_expect(strstr(lp_last_error(), cases[c].phrase), "case %zu: '%s' lacks '%s'", c, lp_last_error(), cases[c].phrase);
        free(t);
    }
    free(txt);
}
