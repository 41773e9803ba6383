/* graph_page.c: `loupe graph-page GRAPH.json OUT.html [--json]`: one self-contained HTML page
 * for an attribution graph in circuit-tracer's / Neuronpedia's graph JSON (written by
 * `loupe graph` or by circuit-tracer's create_graph_files). It takes no config keys, so it
 * reads its two paths itself rather than through the common argument parser. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#include "loupe/graph_page.h"
#include "cli.h"

static const char g_graph_page_usage[] = "usage: loupe graph-page GRAPH.json OUT.html [--json]";

int cmd_graph_page(int argc, char **argv) {
    const char *in = NULL, *out = NULL;
    int json = 0;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) json = 1;
        else if (argv[i][0] == '-' && argv[i][1]) return cli_fail(LP_ERR(LP_ERR_ARG, "graph-page: unknown option '%s'; %s", argv[i], g_graph_page_usage));
        else if (!in) in = argv[i];
        else if (!out) out = argv[i];
        else return cli_fail(LP_ERR(LP_ERR_ARG, "graph-page: one graph and one output page, not '%s'; %s", argv[i], g_graph_page_usage));
    }
    if (!in || !out) return cli_fail(LP_ERR(LP_ERR_ARG, "graph-page: needs GRAPH.json and OUT.html; %s", g_graph_page_usage));
    lp_graph_info g;
    lp_status st = lp_graph_page_write_file(in, out, &g);
    if (st != LP_OK) return cli_fail(st);
    if (g.n_ambiguous) /* circuit-tracer's error/feature id clash, with no index to choose by */
        fprintf(stderr, "loupe: %s: %d link ends name an id two nodes share (an error and a layer-0 feature); drawn to the first\n", in,
                g.n_ambiguous);
    if (json) {
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "page", out);
        cJSON_AddNumberToObject(j, "nodes", g.n_nodes);
        cJSON_AddNumberToObject(j, "links", g.n_links);
        cJSON_AddNumberToObject(j, "tokens", g.n_tokens);
        cJSON_AddNumberToObject(j, "layers", g.n_layers);
        cJSON_AddNumberToObject(j, "features", g.n_features);
        cJSON_AddNumberToObject(j, "errors", g.n_errors);
        cJSON_AddNumberToObject(j, "embeddings", g.n_embeddings);
        cJSON_AddNumberToObject(j, "logits", g.n_logits);
        cJSON_AddNumberToObject(j, "shared_ids", g.n_shared);
        cJSON_AddNumberToObject(j, "ambiguous_link_ends", g.n_ambiguous);
        cli_print_json(j);
    } else {
        printf("%s: %d nodes (%d features, %d errors, %d embeddings, %d logits), %d links, %d tokens, %d layers\n", out,
               g.n_nodes, g.n_features, g.n_errors, g.n_embeddings, g.n_logits, g.n_links, g.n_tokens, g.n_layers);
    }
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "loupe: standard output: write failed\n");
        return 1;
    }
    return 0;
}
