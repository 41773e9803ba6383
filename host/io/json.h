/* json.h: reading JSON files (host/io/json.c): a whole file parsed, and typed,
 * range-checked reads of configuration values, each failure one line naming the file and
 * the key. */
#ifndef LOUPE_IO_JSON_H
#define LOUPE_IO_JSON_H

#include <cjson/cJSON.h>

#include "loupe/status.h"

/* The JSON in the file at path, parsed (any type; cJSON_Delete it), or NULL when the file
 * cannot be read (*absent = 1, errno says why) or is not JSON (*absent = 0). Records no
 * error: for the files whose absence or damage the caller words itself (a store's
 * meta.json, a checkpoint's state.json, tokenizer_config.json, a safetensors index). */
cJSON *json_load(const char *path, int *absent);
/* Reads and parses path into a JSON object (*root; cJSON_Delete it). */
lp_status jcfg_open(const char *path, cJSON **root);
/* An integer in [lo, hi] at key; absent or null: dflt, or a failure when dflt < 0. */
lp_status jcfg_int(const char *path, const cJSON *o, const char *key, int lo, int hi, int dflt, int *out);
/* A finite number in (lo, hi) (both open) at key; absent or null: dflt, or a failure when
 * dflt is NaN. `where` prefixes the key in messages ("rope_parameters." or ""). */
lp_status jcfg_num(const char *path, const cJSON *o, const char *where, const char *key, double lo, double hi, double dflt,
                     double *out);
/* true/false at key; absent or null: dflt. */
lp_status jcfg_bool(const char *path, const cJSON *o, const char *key, int dflt, int *out);
/* A string at key (*out points into o); absent or null: dflt. */
lp_status jcfg_str(const char *path, const cJSON *o, const char *where, const char *key, const char *dflt, const char **out);

#endif
