/* clt_yaml.c: circuit-tracer's config.yaml for a transcoder set, read with libyaml and
 * written by hand (a flat mapping of quoted scalars). Only the keys circuit-tracer reads
 * (model_kind, feature_input_hook, feature_output_hook, scan, model_name, transcoders)
 * and loupe's own (activation_function, k, skip) are looked at; others are ignored as
 * circuit-tracer ignores them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "sae/clt_internal.h"

static lp_status copy_scalar(const yaml_node_t *v, const char *path, const char *key, char *dst, size_t n) {
    if (!v || v->type != YAML_SCALAR_NODE) LP_FAIL(LP_ERR_FORMAT, "%s: key '%s' must be a string", path, key);
    if (v->data.scalar.length >= n)
        LP_FAIL(LP_ERR_FORMAT, "%s: key '%s' is %zu bytes long (at most %zu)", path, key, v->data.scalar.length, n - 1);
    memcpy(dst, v->data.scalar.value, v->data.scalar.length);
    dst[v->data.scalar.length] = 0;
    if (strlen(dst) != v->data.scalar.length) LP_FAIL(LP_ERR_FORMAT, "%s: key '%s' holds a NUL byte", path, key);
    return LP_OK;
}

/* scan may be a string or a list of strings (circuit-tracer allows both): a list is
 * joined with commas. */
static lp_status read_scan(yaml_document_t *d, const yaml_node_t *v, const char *path, char *dst, size_t n) {
    if (v->type != YAML_SEQUENCE_NODE) return copy_scalar(v, path, "scan", dst, n);
    dst[0] = 0;
    for (yaml_node_item_t *it = v->data.sequence.items.start; it < v->data.sequence.items.top; it++) {
        char one[256];
        LP_CHECK(copy_scalar(yaml_document_get_node(d, *it), path, "scan", one, sizeof one));
        size_t k = strlen(dst);
        if (k + strlen(one) + 2 > n) LP_FAIL(LP_ERR_FORMAT, "%s: key 'scan' is too long", path);
        snprintf(dst + k, n - k, "%s%s", k ? "," : "", one);
    }
    return LP_OK;
}

static lp_status read_list(yaml_document_t *d, const yaml_node_t *v, const char *path, clt_yaml *y) {
    if (v->type != YAML_SEQUENCE_NODE) LP_FAIL(LP_ERR_FORMAT, "%s: key 'transcoders' must be a list of paths", path);
    if (y->paths) LP_FAIL(LP_ERR_FORMAT, "%s: key 'transcoders' appears twice", path);
    int n = (int)(v->data.sequence.items.top - v->data.sequence.items.start);
    if (n <= 0 || n > 4096) LP_FAIL(LP_ERR_FORMAT, "%s: key 'transcoders' has %d entries (1..4096)", path, n);
    y->paths = calloc((size_t)n, sizeof *y->paths);
    if (!y->paths) LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    y->n_paths = n;
    for (int i = 0; i < n; i++) {
        const yaml_node_t *e = yaml_document_get_node(d, v->data.sequence.items.start[i]);
        char p[1024];
        LP_CHECK(copy_scalar(e, path, "transcoders", p, sizeof p));
        if (!strncmp(p, "hf://", 5))
            LP_FAIL(LP_ERR_FORMAT, "%s: transcoders[%d] = '%s' is on the Hugging Face hub; download it and list the local file",
                    path, i, p);
        if (!(y->paths[i] = strdup(p))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    }
    return LP_OK;
}

static lp_status read_int(const yaml_node_t *v, const char *path, const char *key, int lo, int hi, int *out) {
    char s[32], *end;
    LP_CHECK(copy_scalar(v, path, key, s, sizeof s));
    if (!strcmp(s, "true")) s[0] = '1', s[1] = 0;
    if (!strcmp(s, "false")) s[0] = '0', s[1] = 0;
    long x = strtol(s, &end, 10);
    if (end == s || *end || x < lo || x > hi) LP_FAIL(LP_ERR_FORMAT, "%s: key '%s' = '%s' is not an integer in %d..%d", path, key, s, lo, hi);
    *out = (int)x;
    return LP_OK;
}

static lp_status read_key(yaml_document_t *d, const char *key, const yaml_node_t *v, const char *path, clt_yaml *y) {
    lp_clt_cfg *c = &y->cfg;
    char s[64];
    if (!strcmp(key, "model_kind")) {
        LP_CHECK(copy_scalar(v, path, key, s, sizeof s));
        int k = lp_clt_kind_parse(s);
        if (k < 0) LP_FAIL(LP_ERR_FORMAT, "%s: model_kind '%s' is not transcoder_set or cross_layer_transcoder", path, s);
        c->kind = k, y->has_kind = 1;
    } else if (!strcmp(key, "feature_input_hook")) {
        LP_CHECK(copy_scalar(v, path, key, c->input_hook, sizeof c->input_hook));
    } else if (!strcmp(key, "feature_output_hook")) {
        LP_CHECK(copy_scalar(v, path, key, c->output_hook, sizeof c->output_hook));
    } else if (!strcmp(key, "model_name")) {
        LP_CHECK(copy_scalar(v, path, key, c->model_name, sizeof c->model_name));
    } else if (!strcmp(key, "scan")) {
        LP_CHECK(read_scan(d, v, path, c->scan, sizeof c->scan));
    } else if (!strcmp(key, "activation_function")) {
        LP_CHECK(copy_scalar(v, path, key, s, sizeof s));
        int a = lp_clt_act_parse(s);
        if (a < 0) LP_FAIL(LP_ERR_FORMAT, "%s: activation_function '%s' is not relu, jumprelu or topk", path, s);
        y->act = a, y->has_act = 1;
    } else if (!strcmp(key, "k")) {
        LP_CHECK(read_int(v, path, key, 1, 1 << 30, &c->k));
    } else if (!strcmp(key, "transcoders")) {
        LP_CHECK(read_list(d, v, path, y));
    }
    return LP_OK;
}

lp_status clt_yaml_parse(const char *text, size_t n, const char *path, clt_yaml *y) {
    memset(y, 0, sizeof *y);
    yaml_parser_t p;
    yaml_document_t d;
    if (!yaml_parser_initialize(&p)) LP_FAIL(LP_ERR_OOM, "%s: out of memory for the YAML parser", path);
    yaml_parser_set_input_string(&p, (const unsigned char *)text, n);
    if (!yaml_parser_load(&p, &d)) {
        lp_status st = LP_ERR(LP_ERR_FORMAT, "%s: not YAML (%s at line %zu)", path, p.problem ? p.problem : "error",
                              p.problem_mark.line + 1);
        yaml_parser_delete(&p);
        return st;
    }
    yaml_parser_delete(&p);
    lp_status st = LP_OK;
    yaml_node_t *root = yaml_document_get_root_node(&d);
    if (!root || root->type != YAML_MAPPING_NODE) {
        st = LP_ERR(LP_ERR_FORMAT, "%s: not a YAML mapping of keys", path);
        goto done;
    }
    for (yaml_node_pair_t *q = root->data.mapping.pairs.start; st == LP_OK && q < root->data.mapping.pairs.top; q++) {
        yaml_node_t *k = yaml_document_get_node(&d, q->key), *v = yaml_document_get_node(&d, q->value);
        if (!k || !v || k->type != YAML_SCALAR_NODE) continue;
        st = read_key(&d, (const char *)k->data.scalar.value, v, path, y);
    }
done:
    yaml_document_delete(&d);
    if (st != LP_OK) clt_yaml_free(y);
    return st;
}

void clt_yaml_free(clt_yaml *y) {
    for (int i = 0; i < y->n_paths; i++) free(y->paths[i]);
    free(y->paths);
    y->paths = NULL, y->n_paths = 0;
}

/* A double-quoted YAML scalar. */
static void put_str(char *buf, size_t n, size_t *k, const char *key, const char *v) {
    *k += (size_t)snprintf(buf + *k, *k < n ? n - *k : 0, "%s: \"", key);
    for (const unsigned char *s = (const unsigned char *)v; *s; s++) {
        if (*s == '"' || *s == '\\') *k += (size_t)snprintf(buf + *k, *k < n ? n - *k : 0, "\\%c", *s);
        else if (*s < 0x20) *k += (size_t)snprintf(buf + *k, *k < n ? n - *k : 0, "\\x%02x", *s);
        else *k += (size_t)snprintf(buf + *k, *k < n ? n - *k : 0, "%c", *s);
    }
    *k += (size_t)snprintf(buf + *k, *k < n ? n - *k : 0, "\"\n");
}

lp_status clt_yaml_write(const lp_clt_cfg *c, const char *path) {
    char buf[4096];
    size_t k = 0, n = sizeof buf;
    k += (size_t)snprintf(buf, n, "# a transcoder set in circuit-tracer's layout (written by loupe)\n");
    put_str(buf, n, &k, "model_kind", c->kind == LP_CLT_CROSS_LAYER ? "cross_layer_transcoder" : "transcoder_set");
    put_str(buf, n, &k, "feature_input_hook", c->input_hook);
    put_str(buf, n, &k, "feature_output_hook", c->output_hook);
    put_str(buf, n, &k, "model_name", c->model_name);
    put_str(buf, n, &k, "scan", c->scan);
    put_str(buf, n, &k, "activation_function", c->act == LP_CLT_JUMPRELU ? "jump_relu" : lp_clt_act_name(c->act));
    if (c->act == LP_CLT_TOPK && k < n) k += (size_t)snprintf(buf + k, n - k, "k: %d\n", c->k);
    if (k >= n) LP_FAIL(LP_ERR_ARG, "%s: the config does not fit in %zu bytes", path, n);
    return lp_write_file_atomic(path, buf, k);
}
