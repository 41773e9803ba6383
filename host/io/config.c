/* config.c: the key table behind config.h, and the INI reader that fills it.
 *
 * The INI reader is our own rather than a library because Debian's inih has a
 * compile-time line limit (200 bytes) and splits a longer line silently: the tail of a
 * long comment became a live key (a cache could be sent to another directory, exit 0)
 * and a long value (a list of ten hooks) came back as a malformed line. Here the file is
 * read whole and a line may be any length; every error names the file and the line. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/config.h"
#include "loupe/textfile.h"

static int find(const lp_cfg *c, const char *key) {
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->keys[i].name, key) == 0) return i;
    return -1;
}

lp_status lp_cfg_init(lp_cfg *c, const lp_key *keys, int n) {
    memset(c, 0, sizeof *c);
    c->keys = keys;
    c->n = n < LP_CFG_MAX_KEYS ? n : LP_CFG_MAX_KEYS;
    for (int i = 0; i < c->n; i++)
        if (keys[i].def) {
            if (!(c->val[i] = strdup(keys[i].def))) {
                lp_cfg_free(c);
                LP_FAIL(LP_ERR_OOM, "%s: out of memory for its default", keys[i].name);
            }
            snprintf(c->origin[i], sizeof c->origin[i], "default");
        }
    return LP_OK;
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
    char *v = strdup(value);
    if (!v) LP_FAIL(LP_ERR_OOM, "%s: out of memory", origin);
    free(c->val[i]);
    c->val[i] = v;
    snprintf(c->origin[i], sizeof c->origin[i], "%s", origin);
    return LP_OK;
}

/* ---- INI ----
 * What the reader accepts, as inih did:
 *   [section]            keys below it are "section.key"
 *   key = value          or key: value; spaces around key and value are dropped
 *   ; comment, # comment whole lines; ";" after a space also ends a value (inline)
 * LF, CRLF and CR-only line endings and a leading UTF-8 BOM. Unlike inih, an indented
 * line is not the continuation of the previous value (inih set the key again to it),
 * a key set twice in one file is an error naming both lines, text after "]" is an
 * error, and so is a NUL byte. */

/* The next line of t[*pos..n), ending at LF, CRLF or a lone CR; false at the end. */
static int next_line(const char *t, size_t n, size_t *pos, const char **line, size_t *len) {
    if (*pos >= n) return 0;
    size_t i = *pos;
    while (i < n && t[i] != '\n' && t[i] != '\r') i++;
    *line = t + *pos, *len = i - *pos;
    if (i < n && t[i] == '\r' && i + 1 < n && t[i + 1] == '\n') i++;
    *pos = i + 1;
    return 1;
}

static int is_blank(char ch) { return ch == ' ' || ch == '\t' || ch == '\f' || ch == '\v'; }

/* Drops blanks at both ends of s[0..*n); returns the new start. */
static const char *trim(const char *s, size_t *n) {
    while (*n && is_blank(*s)) s++, (*n)--;
    while (*n && is_blank(s[*n - 1])) (*n)--;
    return s;
}

/* Length of s[0..n) before an inline comment: ";" preceded by a blank. */
static size_t before_comment(const char *s, size_t n) {
    for (size_t i = 1; i < n; i++)
        if (s[i] == ';' && is_blank(s[i - 1])) return i;
    return n;
}

typedef struct ini_state {
    lp_cfg *c;
    const char *name;
    char section[128];
    int set_at[LP_CFG_MAX_KEYS]; /* the line that set each key in this file, 0 when none */
} ini_state;

static lp_status ini_section(ini_state *x, int ln, const char *s, size_t n) {
    n = before_comment(s, n);
    s = trim(s, &n);
    if (n < 2 || s[n - 1] != ']') LP_FAIL(LP_ERR_FORMAT, "%s:%d: malformed section header (expected [name])", x->name, ln);
    size_t k = n - 2;
    const char *sec = trim(s + 1, &k);
    if (k == 0 || k >= sizeof x->section || memchr(sec, '[', k) || memchr(sec, ']', k))
        LP_FAIL(LP_ERR_FORMAT, "%s:%d: malformed section header '%.*s'", x->name, ln, (int)(n < 100 ? n : 100), s);
    memcpy(x->section, sec, k);
    x->section[k] = 0;
    return LP_OK;
}

static lp_status ini_key(ini_state *x, int ln, const char *s, size_t n) {
    n = before_comment(s, n);
    size_t ks = 0;
    while (ks < n && s[ks] != '=' && s[ks] != ':') ks++;
    if (ks >= n) LP_FAIL(LP_ERR_FORMAT, "%s:%d: malformed line (expected key = value, [section] or a ; comment)", x->name, ln);
    size_t kn = ks, vn = n - ks - 1;
    const char *k = trim(s, &kn), *v = trim(s + ks + 1, &vn);
    if (kn == 0) LP_FAIL(LP_ERR_FORMAT, "%s:%d: malformed line: no key before '%c'", x->name, ln, s[ks]);
    char *key = malloc(strlen(x->section) + kn + 2), *val = malloc(vn + 1), origin[256];
    if (!key || !val) {
        free(key), free(val);
        LP_FAIL(LP_ERR_OOM, "%s: out of memory", x->name);
    }
    sprintf(key, "%s%s%.*s", x->section, x->section[0] ? "." : "", (int)kn, k);
    memcpy(val, v, vn);
    val[vn] = 0;
    snprintf(origin, sizeof origin, "%s:%d", x->name, ln);
    int i = find(x->c, key);
    lp_status st = i >= 0 && x->set_at[i]
                       ? LP_ERR(LP_ERR_FORMAT, "%s:%d: '%s' is set twice (lines %d and %d)", x->name, ln, key,
                                      x->set_at[i], ln)
                       : lp_cfg_set(x->c, key, val, origin);
    if (st == LP_OK) x->set_at[i] = ln;
    free(key), free(val);
    return st;
}

lp_status lp_cfg_parse_buffer(lp_cfg *c, const char *text, size_t len, const char *name) {
    ini_state x = {.c = c, .name = name};
    size_t pos = len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0 ? 3 : 0;
    const char *s;
    size_t n;
    for (int ln = 1; next_line(text, len, &pos, &s, &n); ln++) {
        const char *nul = memchr(s, 0, n);
        if (nul) LP_FAIL(LP_ERR_FORMAT, "%s:%d: a NUL byte at column %zu (not a text file?)", name, ln, (size_t)(nul - s) + 1);
        s = trim(s, &n);
        if (n == 0 || *s == ';' || *s == '#') continue;
        LP_CHECK(*s == '[' ? ini_section(&x, ln, s, n) : ini_key(&x, ln, s, n));
    }
    return LP_OK;
}

lp_status lp_cfg_load_ini(lp_cfg *c, const char *path) {
    char *text;
    size_t len;
    LP_CHECK(lp_text_read(path, "config file", &text, &len));
    lp_status st = lp_cfg_parse_buffer(c, text, len, path);
    free(text);
    return st;
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
