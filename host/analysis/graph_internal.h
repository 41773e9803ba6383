/* graph_internal.h: an attribution graph JSON as the page writer reads it
 * (host/analysis/graph_json.c checks and indexes it; graph_page.c writes the page). */
#ifndef LOUPE_GRAPH_INTERNAL_H
#define LOUPE_GRAPH_INTERNAL_H

#include <cjson/cJSON.h>

#include "loupe/graph_page.h"

enum { GRAPH_EMBEDDING, GRAPH_FEATURE, GRAPH_ERROR, GRAPH_LOGIT };

typedef struct graph_doc {
    const char *name;        /* names the input in messages */
    cJSON *root;
    const cJSON *meta, *nodes, *tokens;
    const char *slug, *scan, *prompt;
    int n_nodes, n_links, n_tokens;
    int max_layer;           /* largest feature or error layer; -1: none */
    const char **id;         /* [n_nodes] node_id (inside root) */
    int *layer, *ctx;        /* [n_nodes]; layer -1 is "E" */
    unsigned char *kind;     /* [n_nodes] GRAPH_* */
    int *src, *dst;          /* [n_links] node indices */
    double *w;               /* [n_links] */
    unsigned char *shared;   /* [n_nodes] 1: another node has this node_id (an error and a
                              * layer-0 feature: circuit-tracer's "0_{layer}_{pos}") */
    int n_ambiguous;         /* link ends naming a shared id with no *_index to choose */
    int *slot;               /* node id hash table */
    size_t cap;
} graph_doc;

/* Parses and checks json[0..n); on failure g still needs graph_doc_free. */
lp_status graph_doc_parse(graph_doc *g, const char *json, size_t n, const char *name);
void graph_doc_info(const graph_doc *g, lp_graph_info *info);
void graph_doc_free(graph_doc *g);
/* The index of the (first, in document order) node with this node_id, or -1. */
int graph_find(const graph_doc *g, const char *id);

#endif
