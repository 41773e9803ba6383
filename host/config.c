/* config.c: the key table behind config.h; INI files are parsed by inih. */
#include <ini.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/config.h"

static int find(const lp_cfg *c, const char *key) {
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->keys[i].name, key) == 0) return i;
    return -1;
}

void lp_cfg_init(lp_cfg *c, const lp_key *keys, int n) {
    memset(c, 0, sizeof *c);
    c->keys = keys;
    c->n = n < LP_CFG_MAX_KEYS ? n : LP_CFG_MAX_KEYS;
    for (int i = 0; i < c->n; i++)
        if (keys[i].def) {
            c->val[i] = strdup(keys[i].def);
            snprintf(c->origin[i], sizeof c->origin[i], "default");
        }
}

void lp_cfg_free(lp_cfg *c) {
    for (int i = 0; i < c->n; i++) free(c->val[i]);
    memset(c, 0, sizeof *c);
}

static lp_status check_value(const lp_key *k, const char *v, const char *origin) {
    char *end;
    switch (k->type) {
    case LP_KEY_STR: return LP_OK;
    case LP_KEY_INT: {
        long x = strtol(v, &end, 10);
        if (end == v || *end) LP_FAIL(LP_ERR_ARG, "%s: %s = '%s' is not an integer", origin, k->name, v);
        if (x < k->min || x > k->max)
            LP_FAIL(LP_ERR_ARG, "%s: %s = %ld is outside [%.0f, %.0f]", origin, k->name, x, k->min, k->max);
        return LP_OK;
    }
    case LP_KEY_FLOAT: {
        double x = strtod(v, &end);
        if (end == v || *end || x != x) LP_FAIL(LP_ERR_ARG, "%s: %s = '%s' is not a number", origin, k->name, v);
        if (x < k->min || x > k->max) LP_FAIL(LP_ERR_ARG, "%s: %s = %g is outside [%g, %g]", origin, k->name, x, k->min, k->max);
        return LP_OK;
    }
    case LP_KEY_CHOICE: {
        size_t n = strlen(v);
        for (const char *p = k->choices; *p;) {
            const char *bar = strchr(p, '|');
            size_t len = bar ? (size_t)(bar - p) : strlen(p);
            if (len == n && strncmp(p, v, n) == 0) return LP_OK;
            p += len + (bar != NULL);
        }
        LP_FAIL(LP_ERR_ARG, "%s: %s = '%s' is not one of %s", origin, k->name, v, k->choices);
    }
    }
    return LP_OK;
}

lp_status lp_cfg_set(lp_cfg *c, const char *key, const char *value, const char *origin) {
    int i = find(c, key);
    if (i < 0) LP_FAIL(LP_ERR_ARG, "%s: unknown config key '%s'", origin, key);
    LP_CHECK(check_value(&c->keys[i], value, origin));
    free(c->val[i]);
    c->val[i] = strdup(value);
    snprintf(c->origin[i], sizeof c->origin[i], "%s", origin);
    return LP_OK;
}

typedef struct { lp_cfg *c; const char *path; lp_status st; } ini_ctx;

/* Debian's inih is built without line numbers in the handler: messages name the file and key. */
static int on_ini(void *user, const char *section, const char *name, const char *value) {
    ini_ctx *x = user;
    if (x->st != LP_OK) return 0;
    char key[256], origin[200];
    snprintf(key, sizeof key, "%s%s%s", section, section[0] ? "." : "", name);
    snprintf(origin, sizeof origin, "%s [%s]", x->path, section);
    x->st = lp_cfg_set(x->c, key, value, origin);
    return x->st == LP_OK;
}

lp_status lp_cfg_load_ini(lp_cfg *c, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) LP_FAIL(LP_ERR_IO, "%s: cannot open config file", path);
    ini_ctx x = {c, path, LP_OK};
    int rc = ini_parse_file(f, on_ini, &x);
    fclose(f);
    if (x.st != LP_OK) return x.st;
    if (rc > 0) LP_FAIL(LP_ERR_FORMAT, "%s:%d: malformed line", path, rc);
    if (rc < 0) LP_FAIL(LP_ERR_IO, "%s: cannot read config file", path);
    return LP_OK;
}

lp_status lp_cfg_require(const lp_cfg *c, const char *const *keys) {
    for (int i = 0; keys[i]; i++) {
        const char *v = lp_cfg_str(c, keys[i]);
        if (!v || !v[0]) LP_FAIL(LP_ERR_ARG, "missing config key '%s' (give --%s=... or set it in the config file)", keys[i], keys[i]);
    }
    return LP_OK;
}

const char *lp_cfg_str(const lp_cfg *c, const char *key) {
    int i = find(c, key);
    return i < 0 ? NULL : c->val[i];
}
long lp_cfg_int(const lp_cfg *c, const char *key) {
    const char *v = lp_cfg_str(c, key);
    return v ? strtol(v, NULL, 10) : 0;
}
double lp_cfg_float(const lp_cfg *c, const char *key) {
    const char *v = lp_cfg_str(c, key);
    return v ? strtod(v, NULL) : 0;
}
