/* graph_json.c: the graph JSON circuit-tracer's create_graph_files writes and the
 * circuit-tracer / Neuronpedia viewer reads: metadata, qParams, the pruned nodes (those with
 * a kept edge, and every embedding and logit) and the kept links, with its node ids:
 *   feature  "{layer}_{feature}_{pos}"  jsNodeId "{layer}_{feature}-0", feature = cantor(layer, feature)
 *   error    "0_{layer}_{pos}"          jsNodeId "{layer}_{pos}-0", feature -1
 *            (the id of layer 0's feature {layer} at {pos} too, when both are kept: the links
 *            to such a shared id also carry "source_index" / "target_index", the node's
 *            index in "nodes", which the schema allows and viewers that key by id ignore)
 *   token    "E_{token id}_{pos}"       jsNodeId "E_{token id}-{pos}", layer "E"
 *   logit    "{n_layers + 1}_{token id}_{T - 1}"  jsNodeId "L_{token id}-{T - 1}"
 * and graph-metadata.json, the list of graphs in a directory. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/graph.h"
#include "loupe/output.h"

static void node_ids(const lp_graph *g, int64_t i, char *id, char *js, size_t n, int *layer, int *pos, long long *feature) {
    int64_t nf = g->n_features, err1 = nf + (int64_t)g->n_layers * g->T, tok1 = err1 + g->T;
    if (i < nf) {
        const int32_t *a = g->active + 3 * (size_t)g->selected[i];
        long long x = a[0], y = a[2];
        *layer = a[0], *pos = a[1], *feature = (x + y) * (x + y + 1) / 2 + y;
        snprintf(id, n, "%d_%d_%d", a[0], a[2], a[1]);
        snprintf(js, n, "%d_%d-0", a[0], a[2]);
    } else if (i < err1) {
        *layer = (int)((i - nf) / g->T), *pos = (int)((i - nf) % g->T), *feature = -1;
        snprintf(id, n, "0_%d_%d", *layer, *pos);
        snprintf(js, n, "%d_%d-0", *layer, *pos);
    } else if (i < tok1) {
        *pos = (int)(i - err1), *layer = -1, *feature = *pos;
        int tok = g->tokens ? g->tokens[*pos] : 0;
        snprintf(id, n, "E_%d_%d", tok, *pos);
        snprintf(js, n, "E_%d-%d", tok, *pos);
    } else {
        int k = (int)(i - tok1);
        *layer = g->n_layers + 1, *pos = g->T - 1, *feature = g->logit_ids[k];
        snprintf(id, n, "%d_%d_%d", *layer, g->logit_ids[k], *pos);
        snprintf(js, n, "L_%d-%d", g->logit_ids[k], *pos);
    }
}

static cJSON *node_json(const lp_graph *g, int64_t i, const lp_graph_json_opts *o) {
    char id[64], js[64], lay[16];
    int layer, pos;
    long long feature;
    node_ids(g, i, id, js, sizeof id, &layer, &pos, &feature);
    int64_t nf = g->n_features, err1 = nf + (int64_t)g->n_layers * g->T, tok1 = err1 + g->T;
    int is_logit = i >= tok1, k = (int)(i - tok1);
    if (layer < 0) snprintf(lay, sizeof lay, "E");
    else snprintf(lay, sizeof lay, "%d", layer);
    cJSON *n = cJSON_CreateObject();
    cJSON_AddStringToObject(n, "node_id", id);
    cJSON_AddNumberToObject(n, "feature", (double)feature);
    cJSON_AddStringToObject(n, "layer", lay);
    cJSON_AddNumberToObject(n, "ctx_idx", pos);
    cJSON_AddStringToObject(n, "feature_type", i < nf ? "cross layer transcoder" : i < err1 ? "mlp reconstruction error"
                                                 : i < tok1 ? "embedding" : "logit");
    cJSON_AddNumberToObject(n, "token_prob", is_logit ? g->logit_probs[k] : 0.0);
    cJSON_AddBoolToObject(n, "is_target_logit", is_logit && k == 0);
    cJSON_AddNumberToObject(n, "run_idx", 0);
    cJSON_AddNumberToObject(n, "reverse_ctx_idx", 0);
    cJSON_AddStringToObject(n, "jsNodeId", js);
    if (is_logit) {
        char clerp[256];
        const char *s = o && o->logit_str ? o->logit_str[k] : NULL;
        char fall[32];
        if (!s) snprintf(fall, sizeof fall, "<%d>", g->logit_ids[k]), s = fall;
        snprintf(clerp, sizeof clerp, "Output \"%s\" (p=%.3f)", s, g->logit_probs[k]);
        cJSON_AddStringToObject(n, "clerp", clerp);
        cJSON_AddNullToObject(n, "influence");
    } else {
        cJSON_AddStringToObject(n, "clerp", "");
        cJSON_AddNumberToObject(n, "influence", g->cumulative_scores[i]);
    }
    if (i < nf) cJSON_AddNumberToObject(n, "activation", g->act_values[g->selected[i]]);
    else cJSON_AddNullToObject(n, "activation");
    return n;
}

static cJSON *metadata_json(const lp_graph *g, const lp_graph_json_opts *o, float node_threshold) {
    cJSON *m = cJSON_CreateObject(), *toks = cJSON_CreateArray();
    cJSON_AddStringToObject(m, "slug", o && o->slug ? o->slug : "graph");
    cJSON_AddStringToObject(m, "scan", o && o->scan ? o->scan : "");
    cJSON_AddItemToObject(m, "transcoder_list", cJSON_CreateArray());
    for (int t = 0; t < g->T; t++) {
        char b[32];
        if (!(o && o->token_str)) snprintf(b, sizeof b, "<%d>", g->tokens ? g->tokens[t] : 0);
        cJSON_AddItemToArray(toks, cJSON_CreateString(o && o->token_str ? o->token_str[t] : b));
    }
    cJSON_AddItemToObject(m, "prompt_tokens", toks);
    cJSON_AddStringToObject(m, "prompt", o && o->prompt ? o->prompt : "");
    char thr[32]; /* the float as written in the config (0.8, not 0.800000011920929) */
    snprintf(thr, sizeof thr, "%.7g", node_threshold);
    cJSON_AddNumberToObject(m, "node_threshold", strtod(thr, NULL));
    cJSON_AddNumberToObject(m, "schema_version", 1);
    return m;
}

/* The kept links (targets in order, sources ascending); used[] marks their ends. With
 * widx (each written node's index in "nodes"; shared[]: its node_id is another written
 * node's too), a link to a shared id also carries source_index / target_index. */
static void add_links(const lp_graph *g, cJSON *links, uint8_t *used, const int64_t *widx, const uint8_t *shared) {
    int64_t N = g->n_nodes, src_end = N - g->n_logits;
    char sid[64], tid[64], js[64];
    int layer, pos;
    long long feat;
    for (int64_t i = 0; i < N; i++)
        for (int64_t e = g->row_ptr[i]; e < g->row_ptr[i + 1]; e++) {
            int64_t s = g->col[e];
            if (!g->edge_mask[e] || !g->node_mask[i] || !g->node_mask[s] || s >= src_end) continue;
            used[i] = used[s] = 1;
            if (!links) continue;
            node_ids(g, s, sid, js, sizeof sid, &layer, &pos, &feat);
            node_ids(g, i, tid, js, sizeof tid, &layer, &pos, &feat);
            cJSON *l = cJSON_CreateObject();
            cJSON_AddStringToObject(l, "source", sid);
            cJSON_AddStringToObject(l, "target", tid);
            cJSON_AddNumberToObject(l, "weight", g->val[e]);
            if (shared[s]) cJSON_AddNumberToObject(l, "source_index", (double)widx[s]);
            if (shared[i]) cJSON_AddNumberToObject(l, "target_index", (double)widx[i]);
            cJSON_AddItemToArray(links, l);
        }
}

/* circuit-tracer's error id "0_{L}_{p}" is also the id of layer 0's feature L at p: marks
 * the written nodes whose id another written node has. */
static void mark_shared(const lp_graph *g, const int64_t *widx, uint8_t *shared) {
    for (int64_t i = 0; i < g->n_features; i++) {
        const int32_t *a = g->active + 3 * (size_t)g->selected[i];
        if (widx[i] < 0 || a[0] != 0 || a[2] >= g->n_layers) continue;
        int64_t e = lp_graph_error_node(g, a[2], a[1]);
        if (widx[e] >= 0) shared[i] = shared[e] = 1;
    }
}

lp_status lp_graph_write_json(const lp_graph *g, const lp_graph_json_opts *o, const char *path) {
    if (!g->node_mask || !g->edge_mask) LP_FAIL(LP_ERR_ARG, "%s: the graph has not been pruned", path);
    int64_t N = g->n_nodes;
    int64_t tok0 = N - g->n_logits - g->T;
    uint8_t *used = calloc(N, 1), *shared = calloc(N, 1);
    int64_t *widx = calloc(N + 1, sizeof *widx);
    cJSON *root = cJSON_CreateObject(), *q = cJSON_CreateObject(), *nodes = cJSON_CreateArray(), *links = cJSON_CreateArray();
    if (!used || !shared || !widx || !root || !q || !nodes || !links) {
        free(used), free(shared), free(widx), cJSON_Delete(root), cJSON_Delete(q), cJSON_Delete(nodes), cJSON_Delete(links);
        LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    }
    add_links(g, NULL, used, NULL, NULL);
    for (int64_t i = 0, k = 0; i < N; i++) widx[i] = g->node_mask[i] && (used[i] || i >= tok0) ? k++ : -1;
    mark_shared(g, widx, shared);
    add_links(g, links, used, widx, shared);
    for (int64_t i = 0; i < N; i++)
        if (g->node_mask[i] && (used[i] || i >= tok0)) cJSON_AddItemToArray(nodes, node_json(g, i, o));
    cJSON_AddItemToObject(root, "metadata", metadata_json(g, o, g->node_threshold));
    cJSON_AddItemToObject(q, "pinnedIds", cJSON_CreateArray());
    cJSON_AddItemToObject(q, "supernodes", cJSON_CreateArray());
    cJSON_AddStringToObject(q, "linkType", "both");
    cJSON_AddStringToObject(q, "clickedId", "");
    cJSON_AddStringToObject(q, "sg_pos", "");
    cJSON_AddItemToObject(root, "qParams", q);
    cJSON_AddItemToObject(root, "nodes", nodes);
    cJSON_AddItemToObject(root, "links", links);
    char *txt = cJSON_Print(root);
    cJSON_Delete(root);
    free(used), free(shared), free(widx);
    if (!txt) LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    lp_status st = lp_write_file_atomic(path, txt, strlen(txt));
    free(txt);
    return st;
}

lp_status lp_graph_metadata_add(const char *dir, const lp_graph_json_opts *o, const lp_graph *g) {
    char path[4096];
    snprintf(path, sizeof path, "%s/graph-metadata.json", dir);
    cJSON *root = NULL;
    FILE *f = fopen(path, "rb");
    if (f) {
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        fseek(f, 0, SEEK_SET);
        char *b = n >= 0 ? malloc(n + 1) : NULL;
        if (b && fread(b, 1, n, f) == (size_t)n) b[n] = 0, root = cJSON_Parse(b);
        free(b);
        fclose(f);
        if (!root || !cJSON_IsArray(cJSON_GetObjectItem(root, "graphs"))) {
            cJSON_Delete(root);
            LP_FAIL(LP_ERR_FORMAT, "%s: not a graph-metadata file ({\"graphs\": [...]})", path);
        }
    } else {
        root = cJSON_CreateObject();
        cJSON_AddItemToObject(root, "graphs", cJSON_CreateArray());
    }
    cJSON *gs = cJSON_GetObjectItem(root, "graphs");
    const char *slug = o && o->slug ? o->slug : "graph";
    for (int i = cJSON_GetArraySize(gs) - 1; i >= 0; i--) { /* the same slug is replaced */
        cJSON *s = cJSON_GetObjectItem(cJSON_GetArrayItem(gs, i), "slug");
        if (cJSON_IsString(s) && !strcmp(s->valuestring, slug)) cJSON_DeleteItemFromArray(gs, i);
    }
    cJSON_AddItemToArray(gs, metadata_json(g, o, g->node_threshold));
    char *txt = cJSON_Print(root);
    cJSON_Delete(root);
    if (!txt) LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    lp_status st = lp_write_file_atomic(path, txt, strlen(txt));
    free(txt);
    return st;
}
