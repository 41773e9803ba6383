/* tokens.c: reading token ids from .npy and raw .bin files (see tokens.h).
 * The .npy header is a Python dict literal; we accept exactly the keys numpy writes
 * ('descr', 'fortran_order', 'shape') and refuse anything we cannot read faithfully. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/safetensors.h"
#include "loupe/tokens.h"
#include "io/npy.h"

typedef struct { const char *npy, *bin; lp_dtype dt; } id_type;
static const id_type g_types[] = {
    {"<i4", "int32", LP_I32}, {"<i8", "int64", LP_I64}, {"<u2", "uint16", LP_U16}, {"<u4", "uint32", LP_U32},
};

static lp_status convert_ids(lp_tokens *t, const char *path, const unsigned char *src, lp_dtype dt, int64_t n) {
    t->ids = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    if (!t->ids) LP_FAIL(LP_ERR_OOM, "%s: out of memory for %lld tokens", path, (long long)n);
    for (int64_t i = 0; i < n; i++) {
        int64_t v;
        switch (dt) {
        case LP_I32: { int32_t x; memcpy(&x, src + 4 * i, 4); v = x; break; }
        case LP_I64: { int64_t x; memcpy(&x, src + 8 * i, 8); v = x; break; }
        case LP_U16: { uint16_t x; memcpy(&x, src + 2 * i, 2); v = x; break; }
        default: { uint32_t x; memcpy(&x, src + 4 * i, 4); v = x; break; }
        }
        if (v < 0 || v > INT32_MAX) {
            free(t->ids);
            t->ids = NULL;
            LP_FAIL(LP_ERR_FORMAT, "%s: token %lld has id %lld, outside [0, 2^31)", path, (long long)i, (long long)v);
        }
        t->ids[i] = (int32_t)v;
    }
    return LP_OK;
}

static lp_status shape_rows(lp_tokens *t, const char *path, int64_t n, int64_t rows, int64_t cols, int context,
                            int strict) {
    if (n == 0) LP_FAIL(LP_ERR_FORMAT, "%s: contains no tokens", path);
    if (rows >= 0) { /* 2-D file: rows as stored */
        if (strict && context > 0 && cols != context)
            LP_FAIL(LP_ERR_SHAPE, "%s: rows have %lld tokens but data.context is %d", path, (long long)cols, context);
        if (cols > INT32_MAX) LP_FAIL(LP_ERR_SHAPE, "%s: rows of %lld tokens are too long", path, (long long)cols);
        t->n_seq = rows, t->ctx = (int)cols;
        return LP_OK;
    }
    if (context <= 0) LP_FAIL(LP_ERR_ARG, "%s: a flat token file needs data.context", path);
    if (!strict && n < context) context = (int)n; /* a stream shorter than the default row length is one row */
    t->ctx = context;
    t->n_seq = n / context;
    t->dropped = n % context;
    if (t->n_seq == 0)
        LP_FAIL(LP_ERR_FORMAT, "%s: %lld tokens do not fill one row of data.context = %d", path, (long long)n, context);
    return LP_OK;
}

lp_status lp_tokens_load(lp_tokens *t, const char *path, int context, int strict_context, const char *bin_dtype) {
    memset(t, 0, sizeof *t);
    size_t n;
    unsigned char *buf = (unsigned char *)lp_read_file(path, &n);
    if (!buf) LP_FAIL(LP_ERR_IO, "%s: cannot read: %s", path, strerror(errno));
    lp_status st = LP_OK;
    size_t len = strlen(path);
    if (len > 4 && strcmp(path + len - 4, ".bin") == 0) {
        const id_type *ty = NULL;
        for (size_t i = 0; i < sizeof g_types / sizeof *g_types; i++)
            if (bin_dtype && strcmp(bin_dtype, g_types[i].bin) == 0) ty = &g_types[i];
        if (!ty) st = LP_ERR(LP_ERR_ARG, "data.token_dtype: '%s' is not one of int32, int64, uint16, uint32", bin_dtype ? bin_dtype : "");
        else if (n % lp_dtype_size(ty->dt) != 0)
            st = LP_ERR(LP_ERR_FORMAT, "%s: %zu bytes is not a whole number of %s ids", path, n, ty->bin);
        else if ((st = shape_rows(t, path, (int64_t)(n / lp_dtype_size(ty->dt)), -1, 0, context, strict_context)) == LP_OK)
            st = convert_ids(t, path, buf, ty->dt, t->n_seq * t->ctx);
        free(buf);
        if (st != LP_OK) lp_tokens_free(t);
        return st;
    }
    /* .npy */
    lp_npy h;
    const id_type *ty = NULL;
    size_t need;
    st = npy_parse_buf(buf, n, path, &h);
    for (size_t i = 0; st == LP_OK && i < sizeof g_types / sizeof *g_types; i++)
        if (strcmp(h.descr, g_types[i].npy) == 0) ty = &g_types[i];
    if (st != LP_OK) {
    } else if (!ty) {
        st = LP_ERR(LP_ERR_FORMAT, "%s: dtype '%s' is not int32, int64, uint16 or uint32", path, h.descr);
    } else if (h.ndim != 1 && h.ndim != 2) {
        st = LP_ERR(LP_ERR_SHAPE, "%s: token array must be 1-D or 2-D, not %d-D", path, h.ndim);
    } else if ((st = npy_data_bytes(&h, lp_dtype_size(ty->dt), path, &need)) == LP_OK) {
        /* the product fits: need (bytes) is at least the element count */
        int64_t count = h.ndim == 1 ? h.shape[0] : h.shape[0] * h.shape[1];
        if ((st = shape_rows(t, path, count, h.ndim == 2 ? h.shape[0] : -1, h.ndim == 2 ? h.shape[1] : 0, context,
                             strict_context)) == LP_OK)
            st = convert_ids(t, path, buf + h.data_off, ty->dt, t->n_seq * t->ctx);
    }
    free(buf);
    if (st != LP_OK) lp_tokens_free(t);
    return st;
}

lp_status lp_tokens_check(const lp_tokens *t, int vocab, const char *path) {
    for (int64_t i = 0; i < t->n_seq * t->ctx; i++)
        if (t->ids[i] >= vocab)
            LP_FAIL(LP_ERR_ARG, "%s: token id %d at row %lld position %lld is not below the vocabulary size %d", path,
                    t->ids[i], (long long)(i / t->ctx), (long long)(i % t->ctx), vocab);
    return LP_OK;
}

void lp_tokens_free(lp_tokens *t) {
    free(t->ids);
    memset(t, 0, sizeof *t);
}

lp_status lp_npy_write_i32(const char *path, const int32_t *ids, int64_t n_seq, int ctx) {
    char dict[128], shape[48];
    if (n_seq < 0) snprintf(shape, sizeof shape, "(%d,)", ctx); /* a flat stream */
    else snprintf(shape, sizeof shape, "(%lld, %d)", (long long)n_seq, ctx);
    int dl = snprintf(dict, sizeof dict, "{'descr': '<i4', 'fortran_order': False, 'shape': %s, }", shape);
    if (n_seq < 0) n_seq = 1;
    size_t hlen = (size_t)(dl + 1 + 10 + 63) / 64 * 64 - 10; /* data 64-byte aligned, header ends in \n */
    size_t nbytes = (size_t)n_seq * ctx * 4;
    unsigned char *buf = malloc(10 + hlen + nbytes);
    if (!buf) LP_FAIL(LP_ERR_OOM, "out of memory");
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    buf[8] = (unsigned char)(hlen & 0xff), buf[9] = (unsigned char)(hlen >> 8);
    memset(buf + 10, ' ', hlen);
    memcpy(buf + 10, dict, (size_t)dl);
    buf[10 + hlen - 1] = '\n';
    memcpy(buf + 10 + hlen, ids, nbytes);
    lp_status st = lp_write_file_atomic(path, buf, 10 + hlen + nbytes);
    free(buf);
    return st;
}

lp_status lp_tokens_from_stream(lp_tokens *t, const int32_t *ids, size_t n, int ctx, int max_ctx, int32_t bos,
                                const char *path) {
    memset(t, 0, sizeof *t);
    int lead = bos >= 0; /* rows begin with BOS, then ctx - 1 tokens of the stream */
    if (ctx == 0) ctx = n + (size_t)lead <= (size_t)max_ctx ? (int)n + lead : max_ctx;
    if (ctx > max_ctx) LP_FAIL(LP_ERR_ARG, "data.context %d exceeds the model's context of %d", ctx, max_ctx);
    if (ctx < 2) LP_FAIL(LP_ERR_ARG, "%s: rows of %d token(s) leave nothing to predict", path, ctx);
    size_t per = (size_t)(ctx - lead);
    if (n / per == 0) LP_FAIL(LP_ERR_ARG, "%s: %zu tokens do not fill one row of %d", path, n, ctx);
    t->ctx = ctx, t->n_seq = (int64_t)(n / per), t->dropped = (int64_t)(n % per);
    if (!(t->ids = malloc((size_t)t->n_seq * (size_t)ctx * sizeof *t->ids)))
        LP_FAIL(LP_ERR_OOM, "%s: out of memory for %lld rows of %d tokens", path, (long long)t->n_seq, ctx);
    for (int64_t r = 0; r < t->n_seq; r++) {
        int32_t *row = t->ids + r * ctx;
        if (lead) row[0] = bos;
        memcpy(row + lead, ids + (size_t)r * per, per * sizeof *ids);
    }
    return LP_OK;
}
