/* probe_data.c: what a probe trains on: label files (.npy of integers), the store's
 * hooks that a spec names, and the labelled rows of one hook gathered from the store. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fnmatch.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/probe.h"
#include "loupe/safetensors.h"
#include "loupe/store.h"
#include "io/json.h"
#include "io/npy.h"

/* ---- .npy labels ---- */

typedef struct { const char *descr; int size, is_signed; } int_type;
static const int_type g_int_types[] = {
    {"|i1", 1, 1}, {"<i2", 2, 1}, {"<i4", 4, 1}, {"<i8", 8, 1}, {"|u1", 1, 0},
    {"<u2", 2, 0}, {"<u4", 4, 0}, {"<u8", 8, 0}, {"|b1", 1, 0},
};

static int64_t read_int(const unsigned char *p, const int_type *t) {
    switch (t->size) {
    case 1: return t->is_signed ? (int64_t)(int8_t)p[0] : (int64_t)p[0];
    case 2: { uint16_t v; memcpy(&v, p, 2); return t->is_signed ? (int64_t)(int16_t)v : (int64_t)v; }
    case 4: { uint32_t v; memcpy(&v, p, 4); return t->is_signed ? (int64_t)(int32_t)v : (int64_t)v; }
    default: { uint64_t v; memcpy(&v, p, 8); return t->is_signed || v <= INT64_MAX ? (int64_t)v : INT64_MAX; }
    }
}

/* The label file's header (io/npy.h, the one .npy parser): an integer or bool element
 * type, 1-D or 2-D; *ty, *nd, dims and *data_off on success. */
static lp_status npy_header(const unsigned char *buf, size_t n, const char *path, const int_type **ty, int *nd, int64_t dims[2],
                            size_t *data_off) {
    lp_npy h;
    LP_CHECK(npy_parse_buf(buf, n, path, &h));
    *ty = NULL;
    for (size_t i = 0; i < sizeof g_int_types / sizeof *g_int_types; i++)
        if (strcmp(h.descr, g_int_types[i].descr) == 0 ||
            (g_int_types[i].size == 1 && h.descr[0] == '<' && strcmp(h.descr + 1, g_int_types[i].descr + 1) == 0))
            *ty = &g_int_types[i];
    if (!*ty)
        LP_FAIL(LP_ERR_FORMAT, "%s: labels have dtype %s; integer class labels are needed (int8..int64, uint8..uint64 or bool)",
                path, h.descr);
    if (h.ndim != 1 && h.ndim != 2)
        LP_FAIL(LP_ERR_SHAPE, "%s: labels must be [n_seq] (per sequence) or [n_seq, ctx] (per token), not %d-D", path, h.ndim);
    *nd = h.ndim;
    dims[0] = h.shape[0], dims[1] = h.ndim == 2 ? h.shape[1] : 0;
    *data_off = h.data_off;
    return LP_OK;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The distinct label values, sorted, become the classes; y holds class indices. */
static lp_status make_classes(lp_probe_labels *l, const int64_t *v, int64_t n, const char *path) {
    int64_t *u = malloc(((size_t)n + 1) * sizeof *u), nu = 0;
    if (!u) LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    for (int64_t i = 0; i < n; i++)
        if (v[i] >= 0) u[nu++] = v[i];
    qsort(u, (size_t)nu, sizeof *u, cmp_i64);
    int64_t k = 0;
    for (int64_t i = 0; i < nu; i++)
        if (k == 0 || u[i] != u[k - 1]) u[k++] = u[i];
    if (k < 2) {
        long long only = k ? (long long)u[0] : -1;
        free(u);
        if (k == 0) LP_FAIL(LP_ERR_ARG, "%s: no labelled rows (every label is -1)", path);
        LP_FAIL(LP_ERR_ARG, "%s: only one class (label %lld) is present; a probe needs at least 2", path, only);
    }
    if (k > 1 << 16) {
        free(u);
        LP_FAIL(LP_ERR_ARG, "%s: %lld distinct labels; at most 65536 classes are supported", path, (long long)k);
    }
    l->n_classes = (int)k;
    l->classes = u;
    l->count = calloc((size_t)k, sizeof *l->count);
    if (!l->count) LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    for (int64_t i = 0; i < n; i++) {
        if (v[i] < 0) { l->y[i] = -1; continue; }
        const int64_t *hit = bsearch(&v[i], u, (size_t)k, sizeof *u, cmp_i64);
        l->y[i] = (int32_t)(hit - u);
        l->count[l->y[i]]++;
    }
    return LP_OK;
}

lp_status lp_probe_labels_load(lp_probe_labels *l, const char *path) {
    memset(l, 0, sizeof *l);
    size_t n;
    unsigned char *buf = (unsigned char *)lp_read_file(path, &n);
    if (!buf) LP_FAIL(LP_ERR_IO, "%s: cannot read: %s", path, strerror(errno));
    const int_type *ty = NULL;
    int nd = -1;
    int64_t dims[2] = {0, 0};
    size_t off = 0;
    int64_t *v = NULL;
    lp_status st = npy_header(buf, n, path, &ty, &nd, dims, &off);
    int64_t count = nd == 2 ? dims[0] * dims[1] : dims[0];
    if (st == LP_OK && (dims[0] == 0 || (nd == 2 && dims[1] == 0)))
        st = LP_ERR(LP_ERR_SHAPE, "%s: the label array is empty", path);
    else if (st == LP_OK && (nd == 2 && dims[1] > INT32_MAX))
        st = LP_ERR(LP_ERR_SHAPE, "%s: rows of %lld labels are too long", path, (long long)dims[1]);
    else if (st == LP_OK && (size_t)count > (n - off) / (size_t)ty->size)
        st = LP_ERR(LP_ERR_FORMAT, "%s: truncated: shape needs %lld labels, the file has room for %zu", path,
                          (long long)count, (n - off) / (size_t)ty->size);
    if (st == LP_OK && (!(v = malloc((size_t)count * sizeof *v)) || !(l->y = malloc((size_t)count * sizeof *l->y))))
        st = LP_ERR(LP_ERR_OOM, "%s: out of memory", path);
    for (int64_t i = 0; st == LP_OK && i < count; i++) {
        v[i] = read_int(buf + off + (size_t)i * ty->size, ty);
        if (v[i] < -1 || v[i] > INT32_MAX)
            st = LP_ERR(LP_ERR_ARG, "%s: label %lld at index %lld; labels are classes >= 0, or -1 for no label", path,
                              (long long)v[i], (long long)i);
    }
    if (st == LP_OK) {
        l->n_seq = dims[0];
        l->ctx = nd == 2 ? (int)dims[1] : 0;
        st = make_classes(l, v, count, path);
    }
    free(v);
    free(buf);
    if (st != LP_OK) lp_probe_labels_free(l);
    return st;
}

void lp_probe_labels_free(lp_probe_labels *l) {
    free(l->y), free(l->classes), free(l->count);
    memset(l, 0, sizeof *l);
}

/* ---- the store's hooks ---- */

/* Every hook in the store: meta.json's list (the model's order), or without one the
 * tensors of the first shard. */
static lp_status all_hooks(const char *dir, char ***names, int *n) {
    char path[1200];
    *names = NULL, *n = 0;
    snprintf(path, sizeof path, "%s/meta.json", dir);
    int absent;
    cJSON *j = json_load(path, &absent);
    const cJSON *hooks = cJSON_GetObjectItemCaseSensitive(j, "hooks"), *h;
    int cap = cJSON_IsArray(hooks) ? cJSON_GetArraySize(hooks) : 0;
    lp_st_file f = {0};
    if (!cap) { /* no usable meta.json: the first shard's tensors */
        snprintf(path, sizeof path, "%s/shard-00000.safetensors", dir);
        lp_status st = lp_st_open(&f, path);
        if (st != LP_OK) {
            cJSON_Delete(j);
            return st == LP_ERR_IO ? LP_ERR(LP_ERR_IO, "%s: no shards (is it an activation store?)", dir) : st;
        }
        cap = f.n;
    }
    *names = calloc((size_t)cap + 1, sizeof **names);
    lp_status st = *names ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK && f.n == 0) {
        cJSON_ArrayForEach(h, hooks) {
            const cJSON *nm = cJSON_GetObjectItemCaseSensitive(h, "name");
            if (cJSON_IsString(nm)) (*names)[(*n)++] = strdup(nm->valuestring);
        }
    }
    for (int i = 0; st == LP_OK && i < f.n; i++)
        if (strcmp(f.tensors[i].name, "tokens") != 0) (*names)[(*n)++] = strdup(f.tensors[i].name);
    for (int i = 0; st == LP_OK && i < *n; i++)
        if (!(*names)[i]) st = LP_ERR(LP_ERR_OOM, "out of memory");
    lp_st_close(&f);
    cJSON_Delete(j);
    return st;
}

void lp_probe_hooks_free(char **names, int n) {
    for (int i = 0; names && i < n; i++) free(names[i]);
    free(names);
}

lp_status lp_probe_store_hooks(const char *store, const char *spec, char ***names, int *n) {
    char **all;
    int n_all;
    *names = NULL, *n = 0;
    LP_CHECK(all_hooks(store, &all, &n_all));
    unsigned char *pick = calloc((size_t)n_all + 1, 1);
    char *s = strdup(spec), *save = NULL;
    lp_status st = pick && s ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    for (char *tok = s ? strtok_r(s, ",", &save) : NULL; tok && st == LP_OK; tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ') tok++;
        for (char *end = tok + strlen(tok); end > tok && end[-1] == ' ';) *--end = 0;
        if (!*tok) continue;
        /* a glob leaves out the attention patterns and scores: they are not per token */
        int hits = 0, glob = strpbrk(tok, "*?[") != NULL;
        for (int i = 0; i < n_all; i++)
            if (fnmatch(tok, all[i], 0) == 0 && !(glob && (strstr(all[i], "hook_pattern") || strstr(all[i], "hook_attn_scores"))))
                pick[i] = 1, hits++;
        if (!hits)
            st = LP_ERR(LP_ERR_NOT_FOUND, "probe.hooks: '%s' matches no hook in the store %s (it holds %d: %s%s)", tok,
                              store, n_all, n_all ? all[0] : "none", n_all > 1 ? ", ..." : "");
    }
    int k = 0;
    for (int i = 0; i < n_all; i++)
        if (pick && pick[i]) all[k++] = all[i];
        else free(all[i]);
    if (st == LP_OK && k == 0) st = LP_ERR(LP_ERR_ARG, "probe.hooks: no hooks given");
    free(pick), free(s);
    if (st != LP_OK) {
        lp_probe_hooks_free(all, k);
        return st;
    }
    *names = all, *n = k;
    return LP_OK;
}

/* ---- rows ---- */

/* The store's context: the tokens tensor of its first shard, [n_seq, ctx]. */
static lp_status store_context(const char *dir, int *ctx) {
    char path[1200];
    snprintf(path, sizeof path, "%s/shard-00000.safetensors", dir);
    lp_st_file f;
    LP_CHECK(lp_st_open(&f, path));
    const lp_st_tensor *t = lp_st_find(&f, "tokens");
    *ctx = t && t->ndim == 2 ? (int)t->shape[1] : -1;
    lp_st_close(&f);
    if (*ctx < 0) LP_FAIL(LP_ERR_FORMAT, "%s: no 'tokens' tensor [n_seq, ctx] (is it an activation store?)", path);
    return LP_OK;
}

void lp_probe_rows_free(lp_probe_rows *r) {
    free(r->x), free(r->y), free(r->seq);
    memset(r, 0, sizeof *r);
}

/* Checks the store against the labels; *n_rows receives the labelled rows. */
static lp_status check_store(const lp_store *s, const char *store, const char *hook, const lp_probe_labels *l, const char *lp,
                             int tok_ctx, int64_t *n_rows) {
    int ctx = lp_store_context(s);
    if (ctx != tok_ctx)
        LP_FAIL(LP_ERR_SHAPE, "%s: hook '%s' is not per token ([n_seq, %d, ...]); probes read per-token hooks such as hook_resid_post", store,
                hook, tok_ctx);
    int64_t n_seq = lp_store_n_tokens(s) / ctx;
    if (n_seq == 0) LP_FAIL(LP_ERR_FORMAT, "%s: the store is empty (no sequences)", store);
    if (n_seq != l->n_seq)
        LP_FAIL(LP_ERR_SHAPE, "%s: %lld rows of labels, but the store %s has %lld sequences", lp, (long long)l->n_seq, store, (long long)n_seq);
    if (l->ctx && l->ctx != ctx)
        LP_FAIL(LP_ERR_SHAPE, "%s: per-token labels of %d positions, but the store %s has sequences of %d", lp, l->ctx, store, ctx);
    *n_rows = 0;
    for (int64_t i = 0; i < l->n_seq * (l->ctx ? l->ctx : 1); i++) *n_rows += l->y[i] >= 0;
    return LP_OK;
}

static lp_status finite_row(const float *v, int d, const char *store, const char *hook, int64_t seq, int pos) {
    for (int j = 0; j < d; j++)
        if (!isfinite(v[j]))
            LP_FAIL(LP_ERR_FORMAT, "%s: hook '%s' holds a non-finite value (%g) at sequence %lld, position %d, element %d", store, hook, v[j],
                    (long long)seq, pos, j);
    return LP_OK;
}

lp_status lp_probe_gather(const char *store, const char *hook, const lp_probe_labels *l, const char *labels_path, int pool_mean,
                          int position, lp_probe_rows *r) {
    memset(r, 0, sizeof *r);
    int tok_ctx;
    LP_CHECK(store_context(store, &tok_ctx));
    lp_store *s;
    LP_CHECK(lp_store_open(&s, store, hook));
    int64_t n_rows = 0;
    lp_status st = check_store(s, store, hook, l, labels_path, tok_ctx, &n_rows);
    int ctx = tok_ctx, d = lp_store_d(s), pos = position < 0 ? ctx + position : position;
    if (st == LP_OK && !l->ctx && !pool_mean && (pos < 0 || pos >= ctx))
        st = LP_ERR(LP_ERR_ARG, "probe.position: %d is outside sequences of %d tokens", position, ctx);
    float *buf = NULL;
    if (st == LP_OK) {
        r->d = d, r->n = n_rows;
        r->x = malloc((size_t)n_rows * d * sizeof *r->x);
        r->y = malloc((size_t)n_rows * sizeof *r->y);
        r->seq = malloc((size_t)n_rows * sizeof *r->seq);
        buf = malloc((size_t)ctx * d * sizeof *buf);
        if (!r->x || !r->y || !r->seq || !buf)
            st = LP_ERR(LP_ERR_OOM, "%s: out of memory for %lld rows of %d values of '%s'", store, (long long)n_rows, d, hook);
    }
    int64_t k = 0;
    for (int64_t q = 0; st == LP_OK && q < l->n_seq; q++) {
        const int32_t *lab = l->y + q * (l->ctx ? l->ctx : 1);
        if (!l->ctx && lab[0] < 0) continue;
        int one = !l->ctx && !pool_mean; /* just one position of this sequence */
        st = lp_store_read(s, q * ctx + (one ? pos : 0), one ? 1 : ctx, buf);
        for (int p = 0; st == LP_OK && p < (one ? 1 : ctx); p++) st = finite_row(buf + (size_t)p * d, d, store, hook, q, one ? pos : p);
        if (st != LP_OK) break;
        if (l->ctx) { /* per token: each labelled position is a row */
            for (int p = 0; p < ctx; p++) {
                if (lab[p] < 0) continue;
                for (int j = 0; j < d; j++) r->x[(size_t)k * d + j] = buf[(size_t)p * d + j];
                r->y[k] = lab[p], r->seq[k++] = q;
            }
            continue;
        }
        double *xr = r->x + (size_t)k * d;
        for (int j = 0; j < d; j++) xr[j] = one ? buf[j] : 0;
        for (int p = 0; !one && p < ctx; p++)
            for (int j = 0; j < d; j++) xr[j] += buf[(size_t)p * d + j];
        for (int j = 0; !one && j < d; j++) xr[j] /= ctx;
        r->y[k] = lab[0], r->seq[k++] = q;
    }
    free(buf);
    lp_store_close(s);
    if (st != LP_OK) lp_probe_rows_free(r);
    return st;
}
