/* graph_page.h: a self-contained HTML page for one attribution graph in the JSON that
 * circuit-tracer's create_graph_files writes and Neuronpedia's graph viewer reads
 * ({metadata, qParams, nodes, links}; Neuronpedia's graph-schema.json, draft-07).
 *
 * The page loads nothing: the graph, the script and the styles are inline. It draws the
 * nodes by layer (rows: embeddings at the bottom, then each transcoder layer, logits on
 * top) and prompt position (columns, the prompt's tokens along the bottom); node radius
 * grows with influence, colour by kind (embedding, feature, error, logit); links are drawn
 * with width by |weight| and colour by sign. Hovering shows a node's details; clicking
 * one highlights its ancestors and descendants. Once drawn, <body> carries
 * data-nodes-drawn and data-links-drawn (the SVG elements made).
 *
 * Before writing, the graph is checked (lp_graph_check): the schema's required keys and
 * types, unique node ids, links between known nodes with finite weights, positions
 * inside the prompt. A refusal is one line naming the graph and the key.
 * One id clash is allowed: circuit-tracer's error id "0_{layer}_{pos}" is also the id of
 * layer 0's feature {layer} at {pos}. The page keys nodes by index, so both are drawn; a
 * link naming such an id goes to the node of its optional "source_index" / "target_index"
 * (an index into nodes, checked to carry that id; loupe's graph JSON writes them on those
 * links only), else to the first node of that id (n_ambiguous counts those ends). */
#ifndef LOUPE_GRAPH_PAGE_H
#define LOUPE_GRAPH_PAGE_H

#include <stddef.h>

#include "loupe/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lp_graph_info {
    int n_nodes, n_links, n_tokens;
    int n_features, n_errors, n_embeddings, n_logits;
    int n_layers;          /* rows between embeddings and logits: 1 + the largest feature/error layer */
    int n_shared;          /* nodes whose node_id another node has (see above) */
    int n_ambiguous;       /* link ends naming such an id without an index: drawn to the first */
} lp_graph_info;

/* Checks the graph JSON text json[0..n) (UTF-8, not necessarily NUL-terminated); `name`
 * names it in messages (a path, or "graph JSON"). info (may be NULL) gets the counts.
 * LP_ERR_FORMAT on any problem. */
lp_status lp_graph_check(const char *json, size_t n, const char *name, lp_graph_info *info);

/* Checks the graph and writes the page to html_path atomically (temporary file, rename).
 * Messages name the input as "graph JSON". */
lp_status lp_graph_page_write(const char *json, size_t n, const char *html_path);

/* The same from a file: messages name graph_path. info (may be NULL) gets the counts. */
lp_status lp_graph_page_write_file(const char *graph_path, const char *html_path, lp_graph_info *info);

#ifdef __cplusplus
}
#endif
#endif
