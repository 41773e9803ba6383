/* sae_read.h: internal to the SAE files (sae.c, sae_read.c, sae_files.c, sae_npz.c,
 * sae_save.c): the parameter carving, the helpers every reader shares, and the Gemma Scope
 * reader that lp_sae_load calls. */
#ifndef LOUPE_SAE_READ_H
#define LOUPE_SAE_READ_H

#include <cjson/cJSON.h>
#include <stddef.h>

#include "loupe/sae.h"
#include "loupe/safetensors.h"

/* ---- sae.c ---- */

/* Points the parameter pointers into base (device or host memory) in the documented
 * order and returns the float count; with base NULL only the count. */
size_t sae_carve(lp_sae *s, float *base);

/* ---- sae_read.c ---- */

/* dir/name, malloc'ed (NULL when out of memory). */
char *sae_join(const char *dir, const char *name);
int sae_is_file(const char *path);
int sae_ends_with(const char *s, const char *suffix);
/* The message of the last error, prefixed: "path: <message>" (the record is reused). */
lp_status sae_prefix_error(lp_status st, const char *path);

/* The tensors of one weights file (safetensors, or the .npy entries of an .npz). */
typedef struct src_set {
    const char *path;          /* for messages */
    const lp_st_tensor *t;
    int n;
    size_t file_bytes;         /* the weights file's size: all its tensors can hold */
} src_set;

/* The tensor called name, or NULL. */
const lp_st_tensor *sae_src_find(const src_set *s, const char *name);
/* Element i of t (F32, F64, F16 or BF16) as a double; NaN for other dtypes. */
double sae_load_elem(const lp_st_tensor *t, size_t i);
/* Copies tensor `name` (shape [rows] or [rows, cols] as it is stored) into dst as F32,
 * transposed to [cols, rows] if `transpose`. Names the tensor, its shape and the
 * expected one on failure; refuses NaN and Inf. `what` explains the expected dims. */
lp_status sae_take(const src_set *s, const char *name, int ndim, int64_t rows, int64_t cols, int transpose, float *dst,
                   const char *what);
/* The first of `names` (NULL-terminated) present in s (NULL if none). */
const char *sae_pick(const src_set *s, const char *const *names);

/* Allocates the SAE for cfg on c, fills a host image through fill(), checks and copies it
 * over. The image uses the same carving as the device memory; `where` names the source. */
typedef lp_status (*fill_fn)(lp_sae *host, const src_set *s, const void *arg);
lp_status sae_build(lp_sae **out, lp_ctx *c, const lp_sae_cfg *cfg, const src_set *s, fill_fn fill, const void *arg,
                    const char *where);

/* cfg.json fields; errors name path and key. */
lp_status sae_json_int(const cJSON *o, const char *key, const char *path, int required, int dflt, int *out);
lp_status sae_json_bool(const cJSON *o, const char *key, const char *path, int dflt, int *out);
/* A string field copied into dst[n] ("" when absent or null). */
lp_status sae_json_str(const cJSON *o, const char *key, const char *path, char *dst, size_t n);
/* metadata.key if cfg.json has it there, else the top-level key (SAELens before 6.0). */
const cJSON *sae_meta_or_top(const cJSON *root, const char *key);

/* ---- sae_npz.c ---- */

/* A numpy savez archive mapped whole: its stored .npy entries as tensors (names without
 * ".npy"; data points into the mapping). Compressed entries are refused. */
typedef struct npz_file {
    void *map;
    size_t size;
    lp_st_tensor *t;
    int n;
} npz_file;
lp_status sae_npz_open(npz_file *z, const char *path);
void sae_npz_close(npz_file *z);

/* A Gemma Scope params.npz or params.safetensors. */
lp_status sae_load_gemmascope(lp_sae **out, lp_ctx *ctx, const char *path);

#endif
