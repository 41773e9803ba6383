/* sae_read.c: what the SAE readers share (see sae_read.h): tensors of any float dtype
 * copied into the F32 parameter image with shape and finiteness checks, the image built
 * and moved to the device, cfg.json fields read with errors that name the file and key. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/output.h"
#include "loupe/sae.h"
#include "loupe/safetensors.h"
#include "io/npy.h"
#include "sae/sae_read.h"

/* ---- small helpers ---- */

char *sae_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int sae_is_file(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

int sae_ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* The message of the last error, prefixed: "path: <message>" (the record is reused). */
lp_status sae_prefix_error(lp_status st, const char *path) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", lp_last_error());
    return LP_ERR(st, "%s: %s", path, msg);
}

/* ---- reading tensors ---- */

const lp_st_tensor *sae_src_find(const src_set *s, const char *name) {
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->t[i].name, name) == 0) return &s->t[i];
    return NULL;
}

double sae_load_elem(const lp_st_tensor *t, size_t i) {
    const unsigned char *p = (const unsigned char *)t->data;
    switch (t->dtype) {
    case LP_F32: { float v; memcpy(&v, p + 4 * i, 4); return v; }
    case LP_F64: { double v; memcpy(&v, p + 8 * i, 8); return v; }
    case LP_BF16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return lp_bf16_to_f32(v); }
    case LP_F16: { uint16_t v; memcpy(&v, p + 2 * i, 2); return lp_f16_to_f32(v); }
    default: return NAN;
    }
}

/* Copies tensor `name` (shape [rows] or [rows, cols] as it is stored) into dst as F32,
 * transposed to [cols, rows] if `transpose`. Names the tensor, its shape and the
 * expected one on failure; refuses NaN and Inf. `what` explains the expected dims. */
lp_status sae_take(const src_set *s, const char *name, int ndim, int64_t rows, int64_t cols, int transpose,
                      float *dst, const char *what) {
    const lp_st_tensor *t = sae_src_find(s, name);
    char got[96], want[96];
    int64_t wshape[2] = {rows, cols};
    lp_shape_str(wshape, ndim, want, sizeof want);
    if (!t) LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' %s is missing", s->path, name, want);
    if (t->dtype != LP_F32 && t->dtype != LP_F64 && t->dtype != LP_BF16 && t->dtype != LP_F16)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has dtype %s (expected F32, F64, F16 or BF16)", s->path, name,
                lp_dtype_name(t->dtype));
    if (t->ndim != ndim || t->shape[0] != rows || (ndim == 2 && t->shape[1] != cols))
        LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has shape %s, expected %s %s", s->path, name,
                lp_shape_str(t->shape, t->ndim, got, sizeof got), want, what);
    size_t n = (size_t)rows * (size_t)(ndim == 2 ? cols : 1);
    for (size_t i = 0; i < n; i++) {
        double v = sae_load_elem(t, i);
        if (!isfinite(v) || !isfinite((float)v)) {
            if (ndim == 2)
                LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has a non-finite value (%g) at [%zu, %zu]", s->path, name, v,
                        i / (size_t)cols, i % (size_t)cols);
            LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has a non-finite value (%g) at [%zu]", s->path, name, v, i);
        }
        if (transpose) dst[(i % (size_t)cols) * (size_t)rows + i / (size_t)cols] = (float)v;
        else dst[i] = (float)v;
    }
    return LP_OK;
}

/* The first of `names` present in s (NULL if none). */
const char *sae_pick(const src_set *s, const char *const *names) {
    for (int i = 0; names[i]; i++)
        if (sae_src_find(s, names[i])) return names[i];
    return NULL;
}

/* Every weight matrix is read from a tensor of 2 bytes an element or more, so sizes (from
 * cfg.json) that need more than the weights file holds are bad input: refused before the
 * allocation they would size, which could otherwise ask for terabytes. */
static lp_status check_fits(const lp_sae_cfg *cfg, const src_set *s, const char *where) {
    double need = 2.0 * ((double)cfg->d_in * cfg->d_sae + (double)cfg->d_sae * cfg->d_out +
                         (cfg->skip ? (double)cfg->d_in * cfg->d_out : 0));
    if (need > (double)s->file_bytes)
        LP_FAIL(LP_ERR_FORMAT, "%s: d_in = %d, d_sae = %d, d_out = %d need %.0f weight bytes or more, but %s has %zu",
                where, cfg->d_in, cfg->d_sae, cfg->d_out, need, s->path, s->file_bytes);
    return LP_OK;
}

lp_status sae_build(lp_sae **out, lp_ctx *c, const lp_sae_cfg *cfg, const src_set *s, fill_fn fill, const void *arg,
                       const char *where) {
    lp_status st = lp_sae_cfg_check(cfg);
    if (st != LP_OK) return sae_prefix_error(st == LP_ERR_ARG ? LP_ERR_FORMAT : st, where);
    LP_CHECK(check_fits(cfg, s, where));
    lp_sae host = {.cfg = *cfg};
    host.n_floats = sae_carve(&host, NULL);
    float *img = calloc(host.n_floats ? host.n_floats : 1, sizeof *img);
    if (!img) LP_FAIL(LP_ERR_OOM, "%s: out of host memory for %zu parameters", where, host.n_floats);
    sae_carve(&host, img);
    lp_sae *dev = NULL;
    LP_TRY(st, done, fill(&host, s, arg));
    LP_TRY(st, done, lp_sae_alloc(&dev, cfg, c));
    LP_TRY(st, done, lp_ctx_to_device(c, dev->mem, img, host.n_floats * sizeof(float)));
    *out = dev;
    dev = NULL;
done:
    lp_sae_free(dev, c);
    free(img);
    return st;
}

/* ---- JSON fields ---- */

lp_status sae_json_int(const cJSON *o, const char *key, const char *path, int required, int dflt, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        if (required) LP_FAIL(LP_ERR_FORMAT, "%s: field '%s' is missing", path, key);
        *out = dflt;
        return LP_OK;
    }
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= -2147483648.0 && v->valuedouble <= 2147483647.0) ||
        v->valuedouble != (double)(int)v->valuedouble)
        LP_FAIL(LP_ERR_FORMAT, "%s: field '%s' is not an integer", path, key);
    *out = (int)v->valuedouble;
    return LP_OK;
}

lp_status sae_json_bool(const cJSON *o, const char *key, const char *path, int dflt, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) *out = dflt;
    else if (cJSON_IsBool(v)) *out = cJSON_IsTrue(v);
    else LP_FAIL(LP_ERR_FORMAT, "%s: field '%s' is not true or false", path, key);
    return LP_OK;
}

/* A string field copied into dst[n] ("" when absent or null). */
lp_status sae_json_str(const cJSON *o, const char *key, const char *path, char *dst, size_t n) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    dst[0] = 0;
    if (!v || cJSON_IsNull(v)) return LP_OK;
    if (!cJSON_IsString(v)) LP_FAIL(LP_ERR_FORMAT, "%s: field '%s' is not a string", path, key);
    if (strlen(v->valuestring) >= n)
        LP_FAIL(LP_ERR_FORMAT, "%s: field '%s' is longer than %zu bytes", path, key, n - 1);
    memcpy(dst, v->valuestring, strlen(v->valuestring) + 1);
    return LP_OK;
}

/* metadata.key if cfg.json has it there, else the top-level key (SAELens before 6.0). */
const cJSON *sae_meta_or_top(const cJSON *root, const char *key) {
    const cJSON *md = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    if (cJSON_IsObject(md) && cJSON_GetObjectItemCaseSensitive(md, key)) return md;
    return root;
}
