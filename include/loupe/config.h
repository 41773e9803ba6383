/* config.h: job configuration as `section.key = value`, from an INI file and from
 * `--section.key=value` flags (flags win). Every key a command accepts is declared in
 * a table with its type, default and bounds; an unknown key or a bad value is an error
 * naming the key (and file:line for INI input) before any work starts. */
#ifndef LOUPE_CONFIG_H
#define LOUPE_CONFIG_H

#include <stddef.h>

#include "loupe/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lp_key_type { LP_KEY_STR, LP_KEY_INT, LP_KEY_FLOAT, LP_KEY_CHOICE } lp_key_type;

typedef struct lp_key {
    const char *name;    /* "cache.batch" */
    lp_key_type type;
    const char *def;     /* default as text; NULL: required when the command needs it */
    double min, max;     /* bounds for INT and FLOAT */
    const char *choices; /* "|"-separated, for CHOICE */
    const char *help;
} lp_key;

#define LP_CFG_MAX_KEYS 256 /* a command table longer than this fails to compile (see host/cli/main.c) */
typedef struct lp_cfg {
    const lp_key *keys;
    int n;
    char *val[LP_CFG_MAX_KEYS];
    char origin[LP_CFG_MAX_KEYS][256]; /* where each value came from ("file.ini:12"), for messages */
} lp_cfg;

/* Every key at its default (LP_ERR_OOM, c emptied, if a default cannot be copied). */
lp_status lp_cfg_init(lp_cfg *c, const lp_key *keys, int n);
void lp_cfg_free(lp_cfg *c);
/* Sets key = value, checking the key exists and the value parses and is in bounds. */
lp_status lp_cfg_set(lp_cfg *c, const char *key, const char *value, const char *origin);
/* An INI file: [section] headers, `key = value` (or `key: value`) lines setting
 * "section.key", whole-line ; and # comments, " ;" inline comments; LF, CRLF or CR line
 * endings, lines of any length. Errors name the file and line: a malformed line, a key
 * set twice in the file, a NUL byte, an unknown key or bad value; a directory or
 * unreadable path fails naming the path. An empty file sets nothing. */
lp_status lp_cfg_load_ini(lp_cfg *c, const char *path);
/* The same for text[0..len) already in memory (need not be NUL-terminated); name stands
 * for the file in messages. */
lp_status lp_cfg_parse_buffer(lp_cfg *c, const char *text, size_t len, const char *name);
/* Fails naming the first of the listed keys that has no value. */
lp_status lp_cfg_require(const lp_cfg *c, const char *const *keys);
const char *lp_cfg_str(const lp_cfg *c, const char *key); /* NULL when unset */
long lp_cfg_int(const lp_cfg *c, const char *key);
double lp_cfg_float(const lp_cfg *c, const char *key);

#ifdef __cplusplus
}
#endif
#endif
