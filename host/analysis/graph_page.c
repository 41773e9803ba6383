/* graph_page.c: the self-contained HTML page of an attribution graph (the page itself is in
 * graph_page_html.h). The checked graph is re-encoded into a compact JSON the page's
 * script reads (links as node indices), made safe inside <script>, and written with the
 * page atomically. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "analysis/graph_internal.h"
#include "analysis/graph_page_html.h"
#include "loupe/output.h"
#include "loupe/textfile.h"

/* The shortest of %.15g..%.17g that reads back as v: the page holds the graph's numbers
 * exactly (cJSON's own printing stops at 15 digits when they agree within an epsilon). */
static cJSON *exact_num(double v) {
    char b[40];
    for (int p = 15; p <= 17; p++) {
        snprintf(b, sizeof b, "%.*g", p, v);
        if (strtod(b, NULL) == v) break;
    }
    return cJSON_CreateRaw(b);
}

static cJSON *num_or_null(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? exact_num(v->valuedouble) : cJSON_CreateNull();
}

/* circuit-tracer names a logit node 'Output "TOKEN" (p=0.123)' (its clerp); the token is
 * what lies between the first '"' and the last '" (p='. NULL when the clerp is not that. */
static char *logit_token(const char *clerp) {
    static const char pre[] = "Output \"";
    if (strncmp(clerp, pre, sizeof pre - 1) != 0) return NULL;
    const char *s = clerp + sizeof pre - 1, *e = NULL;
    for (const char *p = s; (p = strstr(p, "\" (p=")); p++) e = p;
    if (!e) return NULL;
    char *t = malloc((size_t)(e - s) + 1);
    if (t) memcpy(t, s, (size_t)(e - s)), t[e - s] = 0;
    return t;
}

/* A feature's index in its transcoder: circuit-tracer's node_id is LAYER_INDEX_POS (its
 * "feature" field is a Cantor pairing of layer and index). -1 when the id is not that. */
static long long feature_index(const char *id, int layer, int ctx) {
    long long L, f, c;
    int used = -1;
    if (sscanf(id, "%lld_%lld_%lld%n", &L, &f, &c, &used) != 3 || used != (int)strlen(id)) return -1;
    return L == layer && c == ctx && f >= 0 ? f : -1;
}

static cJSON *node_json(const graph_doc *g, const cJSON *o, int i) {
    cJSON *n = cJSON_CreateObject();
    const char *clerp = cJSON_GetObjectItemCaseSensitive(o, "clerp")->valuestring;
    cJSON_AddStringToObject(n, "id", g->id[i]);
    cJSON_AddNumberToObject(n, "k", g->kind[i]);
    cJSON_AddNumberToObject(n, "l", g->layer[i]);
    cJSON_AddNumberToObject(n, "c", g->ctx[i]);
    cJSON_AddStringToObject(n, "ft", cJSON_GetObjectItemCaseSensitive(o, "feature_type")->valuestring);
    cJSON_AddItemToObject(n, "f", num_or_null(o, "feature"));
    cJSON_AddItemToObject(n, "inf", num_or_null(o, "influence"));
    cJSON_AddItemToObject(n, "act", num_or_null(o, "activation"));
    cJSON_AddStringToObject(n, "cl", clerp);
    if (g->kind[i] == GRAPH_FEATURE) {
        long long f = feature_index(g->id[i], g->layer[i], g->ctx[i]);
        if (f >= 0) cJSON_AddNumberToObject(n, "fi", (double)f);
    } else if (g->kind[i] == GRAPH_LOGIT) {
        cJSON_AddItemToObject(n, "p", num_or_null(o, "token_prob"));
        cJSON_AddBoolToObject(n, "t", cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(o, "is_target_logit")));
        char *tok = logit_token(clerp);
        if (tok) cJSON_AddStringToObject(n, "tok", tok);
        free(tok);
    }
    return n;
}

/* The page's data: {slug, scan, prompt, tokens, threshold, rows, nodes, links, pinned}. */
static cJSON *page_data(const graph_doc *g) {
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "slug", g->slug);
    cJSON_AddStringToObject(d, "scan", g->scan);
    cJSON_AddStringToObject(d, "prompt", g->prompt);
    cJSON_AddItemToObject(d, "tokens", cJSON_Duplicate(g->tokens, 1));
    cJSON_AddItemToObject(d, "threshold", num_or_null(g->meta, "node_threshold"));
    cJSON_AddNumberToObject(d, "layers", g->max_layer + 1);
    cJSON *nodes = cJSON_AddArrayToObject(d, "nodes");
    int i = 0;
    for (const cJSON *o = g->nodes->child; o; o = o->next, i++) cJSON_AddItemToArray(nodes, node_json(g, o, i));
    cJSON *links = cJSON_AddArrayToObject(d, "links");
    for (i = 0; i < g->n_links; i++) {
        cJSON_AddItemToArray(links, cJSON_CreateNumber(g->src[i]));
        cJSON_AddItemToArray(links, cJSON_CreateNumber(g->dst[i]));
        cJSON_AddItemToArray(links, exact_num(g->w[i]));
    }
    cJSON *pinned = cJSON_AddArrayToObject(d, "pinned");
    const cJSON *q = cJSON_GetObjectItemCaseSensitive(g->root, "qParams");
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(q, "pinnedIds");
    for (const cJSON *e = cJSON_IsArray(p) ? p->child : NULL; e; e = e->next) {
        int k = cJSON_IsString(e) ? graph_find(g, e->valuestring) : -1;
        if (k >= 0) cJSON_AddItemToArray(pinned, cJSON_CreateNumber(k));
    }
    return d;
}

/* JSON text that is safe inside <script>: '<', '>' and '&' (only ever inside strings in
 * JSON text) become \u escapes, so no "</script>" or "<!--" can form, and U+2028/U+2029
 * too. Returns a new buffer. */
static char *script_safe(const char *s) {
    size_t n = strlen(s), extra = 0;
    for (size_t i = 0; i < n; i++) extra += (s[i] == '<' || s[i] == '>' || s[i] == '&') ? 5 : 0;
    for (size_t i = 0; i + 2 < n; i++) extra += ((unsigned char)s[i] == 0xE2 && (unsigned char)s[i + 1] == 0x80 && ((unsigned char)s[i + 2] & 0xFE) == 0xA8) ? 3 : 0;
    char *o = malloc(n + extra + 1), *w = o;
    if (!o) return NULL;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '<' || c == '>' || c == '&') w += sprintf(w, "\\u%04x", c);
        else if (c == 0xE2 && i + 2 < n && (unsigned char)s[i + 1] == 0x80 && ((unsigned char)s[i + 2] & 0xFE) == 0xA8)
            w += sprintf(w, "\\u%04x", 0x2000 + ((unsigned char)s[i + 2] - 0x80)), i += 2;
        else *w++ = (char)c;
    }
    *w = 0;
    return o;
}

static char *html_escape(const char *s) {
    size_t n = 0;
    for (const char *p = s; *p; p++) n += *p == '<' || *p == '>' ? 4 : *p == '&' ? 5 : *p == '"' ? 6 : 1;
    char *o = malloc(n + 1), *w = o;
    if (!o) return NULL;
    for (; *s; s++) {
        const char *e = *s == '<' ? "&lt;" : *s == '>' ? "&gt;" : *s == '&' ? "&amp;" : *s == '"' ? "&quot;" : NULL;
        if (e) w = stpcpy(w, e);
        else *w++ = *s;
    }
    *w = 0;
    return o;
}

static lp_status write_page(const graph_doc *g, const char *html_path) {
    cJSON *d = page_data(g);
    char *txt = d ? cJSON_PrintUnformatted(d) : NULL;
    cJSON_Delete(d);
    char *safe = txt ? script_safe(txt) : NULL, *title = html_escape(g->slug[0] ? g->slug : "attribution graph");
    free(txt);
    lp_status st = LP_OK;
    char *page = NULL;
    size_t n = 0;
    if (safe && title) {
        n = strlen(g_graph_page_head) + strlen(title) + strlen(g_graph_page_mid) + strlen(safe) + strlen(g_graph_page_tail);
        if ((page = malloc(n + 1))) stpcpy(stpcpy(stpcpy(stpcpy(stpcpy(page, g_graph_page_head), title), g_graph_page_mid), safe), g_graph_page_tail);
    }
    if (!page) st = LP_ERR(LP_ERR_OOM, "%s: out of memory for the page of %s", html_path, g->name);
    else st = lp_write_file_atomic(html_path, page, n);
    free(page), free(safe), free(title);
    return st;
}

static lp_status page_from_text(const char *json, size_t n, const char *name, const char *html_path, lp_graph_info *info) {
    graph_doc g;
    lp_status st = graph_doc_parse(&g, json, n, name);
    if (st == LP_OK && info) graph_doc_info(&g, info);
    if (st == LP_OK) st = write_page(&g, html_path);
    graph_doc_free(&g);
    return st;
}

lp_status lp_graph_page_write(const char *json, size_t n, const char *html_path) {
    return page_from_text(json, n, "graph JSON", html_path, NULL);
}

lp_status lp_graph_page_write_file(const char *graph_path, const char *html_path, lp_graph_info *info) {
    char *buf;
    size_t n;
    LP_CHECK(lp_text_read(graph_path, "graph JSON", &buf, &n));
    lp_status st = page_from_text(buf, n, graph_path, html_path, info);
    free(buf);
    return st;
}
