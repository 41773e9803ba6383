/* graph_json.c: reading an attribution graph JSON (circuit-tracer's create_graph_files,
 * Neuronpedia's graph-schema.json) into the arrays the page needs, with every check the
 * page relies on: the schema's required keys and their types, node ids that are unique
 * (but for circuit-tracer's one clash: an error "0_{layer}_{pos}" and the layer-0 feature
 * of that index and position), links whose ends are node ids, finite weights, layers and
 * positions the page can place. The page keys nodes by index: a link end naming a shared
 * id is the node its optional source_index / target_index gives (loupe writes them for
 * such links), else the first node of that id (counted in n_ambiguous).
 * Each refusal is one line: "NAME: key path: what is wrong". */
#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "analysis/graph_internal.h"
#include "loupe/textfile.h"

/* Layers beyond this are not a transformer's; the page makes a row per layer. */
#define GRAPH_MAX_LAYER 65535

static uint64_t fnv1a(const char *s) {
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

/* Open addressing over node indices; slot -1 is empty. cap is a power of two > 2n. Two
 * nodes may share an id only when one is an error and the other a feature. */
static lp_status ids_build(graph_doc *g) {
    size_t cap = 16;
    while (cap < 2 * (size_t)g->n_nodes + 1) cap *= 2;
    g->slot = malloc(cap * sizeof *g->slot);
    if (!g->slot) LP_FAIL(LP_ERR_OOM, "%s: out of memory for %d node ids", g->name, g->n_nodes);
    memset(g->slot, 0xff, cap * sizeof *g->slot);
    g->cap = cap;
    for (int i = 0; i < g->n_nodes; i++) {
        size_t k = fnv1a(g->id[i]) & (cap - 1);
        for (; g->slot[k] >= 0; k = (k + 1) & (cap - 1)) {
            int j = g->slot[k];
            if (strcmp(g->id[j], g->id[i]) != 0) continue;
            int pair = (g->kind[i] == GRAPH_ERROR && g->kind[j] == GRAPH_FEATURE) || (g->kind[i] == GRAPH_FEATURE && g->kind[j] == GRAPH_ERROR);
            if (!pair || g->shared[j])
                LP_FAIL(LP_ERR_FORMAT, "%s: nodes[%d].node_id: \"%.80s\" is also nodes[%d]'s", g->name, i, g->id[i], j);
            g->shared[i] = g->shared[j] = 1;
        }
        g->slot[k] = i;
    }
    return LP_OK;
}

int graph_find(const graph_doc *g, const char *id) {
    for (size_t k = fnv1a(id) & (g->cap - 1); g->slot[k] >= 0; k = (k + 1) & (g->cap - 1))
        if (strcmp(g->id[g->slot[k]], id) == 0) return g->slot[k];
    return -1;
}

static int is_int(const cJSON *v) {
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble == floor(v->valuedouble);
}

static const char *type_name(const cJSON *v) {
    if (!v) return "missing";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsArray(v)) return "an array";
    return "an object";
}

/* A member that must be a string (the schema's required ones). */
static lp_status need_str(const graph_doc *g, const cJSON *o, const char *where, int i, const char *key, const char **out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsString(v)) {
        if (i >= 0) LP_FAIL(LP_ERR_FORMAT, "%s: %s[%d].%s: must be a string, is %s", g->name, where, i, key, type_name(v));
        LP_FAIL(LP_ERR_FORMAT, "%s: %s.%s: must be a string, is %s", g->name, where, key, type_name(v));
    }
    *out = v->valuestring;
    return LP_OK;
}

/* An optional member: absent, or a number (or null where allowed). */
static lp_status opt_num(const graph_doc *g, const cJSON *o, int i, const char *key, int null_ok) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || (null_ok && cJSON_IsNull(v))) return LP_OK;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        LP_FAIL(LP_ERR_FORMAT, "%s: nodes[%d].%s: must be a finite number%s, is %s", g->name, i, key, null_ok ? " or null" : "",
                type_name(v));
    return LP_OK;
}

static int kind_of(const char *feature_type) {
    if (strcmp(feature_type, "embedding") == 0) return GRAPH_EMBEDDING;
    if (strcmp(feature_type, "logit") == 0) return GRAPH_LOGIT;
    if (strcmp(feature_type, "mlp reconstruction error") == 0) return GRAPH_ERROR;
    return GRAPH_FEATURE; /* "cross layer transcoder", "transcoder", ... */
}

/* layer: "E" (embeddings), or a layer number as a string or an integer. -1 stands for "E". */
static lp_status parse_layer(const graph_doc *g, const cJSON *v, int i, int *layer) {
    if (cJSON_IsString(v) && strcmp(v->valuestring, "E") == 0) { *layer = -1; return LP_OK; }
    long long L = -1;
    if (cJSON_IsString(v)) {
        const char *s = v->valuestring;
        char *end;
        if (*s >= '0' && *s <= '9' && strlen(s) <= 6) L = strtoll(s, &end, 10), L = *end ? -1 : L;
    } else if (is_int(v) && v->valuedouble >= 0 && v->valuedouble <= GRAPH_MAX_LAYER) {
        L = (long long)v->valuedouble;
    } else if (!cJSON_IsNumber(v)) {
        LP_FAIL(LP_ERR_FORMAT, "%s: nodes[%d].layer: must be a string or an integer, is %s", g->name, i, type_name(v));
    }
    if (L < 0 || L > GRAPH_MAX_LAYER)
        LP_FAIL(LP_ERR_FORMAT, "%s: nodes[%d].layer: must be \"E\" or a layer number 0..%d", g->name, i, GRAPH_MAX_LAYER);
    *layer = (int)L;
    return LP_OK;
}

static lp_status check_node(graph_doc *g, const cJSON *o, int i) {
    if (!cJSON_IsObject(o)) LP_FAIL(LP_ERR_FORMAT, "%s: nodes[%d]: must be an object, is %s", g->name, i, type_name(o));
    const char *ft, *s;
    LP_CHECK(need_str(g, o, "nodes", i, "node_id", &g->id[i]));
    LP_CHECK(need_str(g, o, "nodes", i, "feature_type", &ft));
    LP_CHECK(need_str(g, o, "nodes", i, "jsNodeId", &s));
    LP_CHECK(need_str(g, o, "nodes", i, "clerp", &s));
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(o, "feature");
    if (!f || !(cJSON_IsNull(f) || is_int(f)))
        LP_FAIL(LP_ERR_FORMAT, "%s: nodes[%d].feature: must be an integer or null, is %s", g->name, i,
                cJSON_IsNumber(f) ? "not an integer" : type_name(f));
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(o, "ctx_idx");
    if (!is_int(c)) LP_FAIL(LP_ERR_FORMAT, "%s: nodes[%d].ctx_idx: must be an integer, is %s", g->name, i, cJSON_IsNumber(c) ? "not an integer" : type_name(c));
    if (c->valuedouble < 0 || c->valuedouble >= g->n_tokens)
        LP_FAIL(LP_ERR_FORMAT, "%s: nodes[%d].ctx_idx: %.0f is outside the prompt's %d tokens (metadata.prompt_tokens)", g->name, i,
                c->valuedouble, g->n_tokens);
    g->ctx[i] = (int)c->valuedouble;
    const cJSON *l = cJSON_GetObjectItemCaseSensitive(o, "layer");
    if (!l) LP_FAIL(LP_ERR_FORMAT, "%s: nodes[%d].layer: missing", g->name, i);
    LP_CHECK(parse_layer(g, l, i, &g->layer[i]));
    g->kind[i] = (unsigned char)kind_of(ft);
    if (g->layer[i] < 0 && g->kind[i] != GRAPH_EMBEDDING)
        LP_FAIL(LP_ERR_FORMAT, "%s: nodes[%d].layer: \"E\" is the embeddings' layer, but feature_type is \"%.40s\"", g->name, i, ft);
    LP_CHECK(opt_num(g, o, i, "influence", 1));
    LP_CHECK(opt_num(g, o, i, "activation", 1));
    LP_CHECK(opt_num(g, o, i, "token_prob", 0));
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "is_target_logit");
    if (t && !cJSON_IsBool(t)) LP_FAIL(LP_ERR_FORMAT, "%s: nodes[%d].is_target_logit: must be a boolean, is %s", g->name, i, type_name(t));
    return LP_OK;
}

/* Link i's end `key` (source / target) naming id: its node index into *out. */
static lp_status link_end(graph_doc *g, const cJSON *o, int i, const char *key, const char *id, int *out) {
    if ((*out = graph_find(g, id)) < 0) LP_FAIL(LP_ERR_FORMAT, "%s: links[%d].%s: \"%.80s\" is not a node_id of nodes", g->name, i, key, id);
    char ik[16];
    snprintf(ik, sizeof ik, "%s_index", key);
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, ik);
    if (!x) {
        g->n_ambiguous += g->shared[*out];
        return LP_OK;
    }
    if (!is_int(x) || x->valuedouble < 0 || x->valuedouble >= g->n_nodes)
        LP_FAIL(LP_ERR_FORMAT, "%s: links[%d].%s: must be an index into nodes (0..%d)", g->name, i, ik, g->n_nodes - 1);
    int k = (int)x->valuedouble;
    if (strcmp(g->id[k], id) != 0)
        LP_FAIL(LP_ERR_FORMAT, "%s: links[%d].%s: nodes[%d] is \"%.80s\", not the %s \"%.80s\"", g->name, i, ik, k, g->id[k], key, id);
    *out = k;
    return LP_OK;
}

static lp_status check_link(graph_doc *g, const cJSON *o, int i) {
    if (!cJSON_IsObject(o)) LP_FAIL(LP_ERR_FORMAT, "%s: links[%d]: must be an object, is %s", g->name, i, type_name(o));
    const char *s, *t;
    LP_CHECK(need_str(g, o, "links", i, "source", &s));
    LP_CHECK(need_str(g, o, "links", i, "target", &t));
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(o, "weight");
    if (!cJSON_IsNumber(w) || !isfinite(w->valuedouble))
        LP_FAIL(LP_ERR_FORMAT, "%s: links[%d].weight: must be a finite number, is %s", g->name, i, type_name(w));
    LP_CHECK(link_end(g, o, i, "source", s, &g->src[i]));
    LP_CHECK(link_end(g, o, i, "target", t, &g->dst[i]));
    g->w[i] = w->valuedouble;
    return LP_OK;
}

static lp_status check_meta(graph_doc *g) {
    const cJSON *m = g->meta;
    LP_CHECK(need_str(g, m, "metadata", -1, "slug", &g->slug));
    LP_CHECK(need_str(g, m, "metadata", -1, "scan", &g->scan));
    LP_CHECK(need_str(g, m, "metadata", -1, "prompt", &g->prompt));
    g->tokens = cJSON_GetObjectItemCaseSensitive(m, "prompt_tokens");
    if (!cJSON_IsArray(g->tokens)) LP_FAIL(LP_ERR_FORMAT, "%s: metadata.prompt_tokens: must be an array, is %s", g->name, type_name(g->tokens));
    int k = 0;
    for (const cJSON *t = g->tokens->child; t; t = t->next, k++)
        if (!cJSON_IsString(t)) LP_FAIL(LP_ERR_FORMAT, "%s: metadata.prompt_tokens[%d]: must be a string, is %s", g->name, k, type_name(t));
    g->n_tokens = k;
    const cJSON *th = cJSON_GetObjectItemCaseSensitive(m, "node_threshold");
    if (th && !cJSON_IsNull(th) && !(cJSON_IsNumber(th) && isfinite(th->valuedouble)))
        LP_FAIL(LP_ERR_FORMAT, "%s: metadata.node_threshold: must be a number, is %s", g->name, type_name(th));
    return LP_OK;
}

static lp_status top_member(graph_doc *g, const char *key, int array, const cJSON **out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(g->root, key);
    if (array ? !cJSON_IsArray(v) : !cJSON_IsObject(v))
        LP_FAIL(LP_ERR_FORMAT, "%s: %s: must be %s, is %s", g->name, key, array ? "an array" : "an object", type_name(v));
    *out = v;
    return LP_OK;
}

static int count(const cJSON *a) {
    int n = 0;
    for (const cJSON *c = a->child; c; c = c->next) n++;
    return n;
}

lp_status graph_doc_parse(graph_doc *g, const char *json, size_t n, const char *name) {
    memset(g, 0, sizeof *g);
    g->name = name;
    LP_CHECK(lp_utf8_check(json, n, name));
    const char *end = NULL;
    g->root = cJSON_ParseWithLengthOpts(json, n, &end, 0);
    if (!g->root) {
        size_t at = end && end >= json ? (size_t)(end - json) : 0;
        LP_FAIL(LP_ERR_FORMAT, "%s: not valid JSON (near byte %zu)", name, at);
    }
    size_t at = (size_t)(end - json);
    while (at < n && (json[at] == ' ' || json[at] == '\t' || json[at] == '\n' || json[at] == '\r')) at++;
    if (at < n) LP_FAIL(LP_ERR_FORMAT, "%s: more after the JSON value (byte %zu)", name, at);
    if (!cJSON_IsObject(g->root)) LP_FAIL(LP_ERR_FORMAT, "%s: must be a JSON object with metadata, qParams, nodes and links", name);
    const cJSON *q, *nodes, *links;
    LP_CHECK(top_member(g, "metadata", 0, &g->meta));
    LP_CHECK(top_member(g, "qParams", 0, &q));
    LP_CHECK(top_member(g, "nodes", 1, &nodes));
    LP_CHECK(top_member(g, "links", 1, &links));
    LP_CHECK(check_meta(g));
    int nn = count(nodes), nl = count(links);
    if (nn > INT_MAX / 4 || nl > INT_MAX / 4) LP_FAIL(LP_ERR_FORMAT, "%s: too many nodes or links", name);
    g->n_nodes = nn, g->n_links = nl, g->nodes = nodes;
    g->id = calloc((size_t)nn + 1, sizeof *g->id);
    g->layer = calloc((size_t)nn + 1, sizeof *g->layer);
    g->ctx = calloc((size_t)nn + 1, sizeof *g->ctx);
    g->kind = calloc((size_t)nn + 1, 1);
    g->shared = calloc((size_t)nn + 1, 1);
    g->src = calloc((size_t)nl + 1, sizeof *g->src);
    g->dst = calloc((size_t)nl + 1, sizeof *g->dst);
    g->w = calloc((size_t)nl + 1, sizeof *g->w);
    if (!g->id || !g->layer || !g->ctx || !g->kind || !g->shared || !g->src || !g->dst || !g->w)
        LP_FAIL(LP_ERR_OOM, "%s: out of memory for %d nodes and %d links", name, nn, nl);
    int i = 0;
    for (const cJSON *o = nodes->child; o; o = o->next, i++) LP_CHECK(check_node(g, o, i));
    LP_CHECK(ids_build(g));
    i = 0;
    for (const cJSON *o = links->child; o; o = o->next, i++) LP_CHECK(check_link(g, o, i));
    g->max_layer = -1;
    for (i = 0; i < nn; i++)
        if (g->kind[i] == GRAPH_FEATURE || g->kind[i] == GRAPH_ERROR) g->max_layer = g->layer[i] > g->max_layer ? g->layer[i] : g->max_layer;
    return LP_OK;
}

void graph_doc_info(const graph_doc *g, lp_graph_info *info) {
    memset(info, 0, sizeof *info);
    info->n_nodes = g->n_nodes, info->n_links = g->n_links, info->n_tokens = g->n_tokens;
    info->n_layers = g->max_layer + 1;
    info->n_ambiguous = g->n_ambiguous;
    for (int i = 0; i < g->n_nodes; i++) info->n_shared += g->shared[i];
    for (int i = 0; i < g->n_nodes; i++) {
        switch (g->kind[i]) {
        case GRAPH_EMBEDDING: info->n_embeddings++; break;
        case GRAPH_FEATURE: info->n_features++; break;
        case GRAPH_ERROR: info->n_errors++; break;
        default: info->n_logits++;
        }
    }
}

void graph_doc_free(graph_doc *g) {
    cJSON_Delete(g->root);
    free(g->id), free(g->layer), free(g->ctx), free(g->kind), free(g->shared);
    free(g->src), free(g->dst), free(g->w), free(g->slot);
    memset(g, 0, sizeof *g);
}

lp_status lp_graph_check(const char *json, size_t n, const char *name, lp_graph_info *info) {
    graph_doc g;
    lp_status st = graph_doc_parse(&g, json, n, name ? name : "graph JSON");
    if (st == LP_OK && info) graph_doc_info(&g, info);
    graph_doc_free(&g);
    return st;
}
