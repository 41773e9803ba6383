/* host/io/: the readers, above ops/: checkpoints (safetensors.c, gguf.c), arrays and token
 * files (npy.c, tokens.c), tokenizers (tokenizer*.c), INI configs (config.c), prompt pairs
 * (pairs.c) and typed JSON reads (json.c). Every reader validates what it reads and names the
 * file and key when it refuses; each has a fuzz harness in fuzz/.
 *
 * safetensors.c: the safetensors reader (validate the header, then mmap) and the
 * writer (temporary name, pwrite at known offsets, rename). See safetensors.h. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <ftw.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "io/json.h"

#define MAX_HEADER (100u << 20) /* the reference implementation's own limit */

typedef struct { size_t begin, end; int idx; } span;

static int span_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

void lp_st_close(lp_st_file *f) {
    if (f->tensors)
        for (int i = 0; i < f->n; i++) free(f->tensors[i].name);
    free(f->tensors);
    if (f->map && f->map != MAP_FAILED) munmap(f->map, f->size);
    free(f->path);
    memset(f, 0, sizeof *f);
}

/* Parses one tensor entry; on failure records an error naming path and tensor. */
static lp_status parse_entry(const char *path, const cJSON *e, size_t data_size, lp_st_tensor *t) {
    const char *nm = e->string;
    if (!cJSON_IsObject(e)) LP_FAIL(LP_ERR_FORMAT, "%s: header entry '%s' is not an object", path, nm);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *of = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt) || !cJSON_IsArray(sh) || !cJSON_IsArray(of) || cJSON_GetArraySize(of) != 2)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' needs dtype, shape and data_offsets [begin, end]", path, nm);
    int d = lp_dtype_parse(dt->valuestring);
    if (d < 0) LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has unknown dtype '%s'", path, nm, dt->valuestring);
    t->dtype = (lp_dtype)d;
    t->ndim = cJSON_GetArraySize(sh);
    if (t->ndim > LP_MAX_DIMS) LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has %d dimensions (at most %d)", path, nm, t->ndim, LP_MAX_DIMS);
    double numel = 1, mag = 1; /* mag: the product of the non-zero dims, which must fit int64 */
    for (int i = 0; i < t->ndim; i++) {
        const cJSON *v = cJSON_GetArrayItem(sh, i);
        /* range first: casting a double outside int64 (or inf) is undefined */
        if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0 && v->valuedouble < 0x1p63) ||
            v->valuedouble != (double)(int64_t)v->valuedouble)
            LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has a bad shape entry", path, nm);
        t->shape[i] = (int64_t)v->valuedouble;
        numel *= (double)t->shape[i];
        if (t->shape[i] > 0 && (mag *= (double)t->shape[i]) >= 0x1p63)
            LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has a bad shape entry (the product of its dimensions overflows)", path, nm);
    }
    double b = cJSON_GetArrayItem(of, 0)->valuedouble, en = cJSON_GetArrayItem(of, 1)->valuedouble;
    if (!cJSON_IsNumber(cJSON_GetArrayItem(of, 0)) || !cJSON_IsNumber(cJSON_GetArrayItem(of, 1)) || !(b >= 0) || en < b ||
        !(en < 0x1p64) || b != (double)(size_t)b || en != (double)(size_t)en)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has bad data_offsets", path, nm);
    if (en > (double)data_size)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' ends at byte %.0f but the data section has %zu bytes (truncated file?)",
                path, nm, en, data_size);
    double want = numel * (double)lp_dtype_size(t->dtype);
    if (want != en - b)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' spans %.0f bytes but its shape and dtype need %.0f", path, nm, en - b, want);
    t->nbytes = (size_t)(en - b);
    t->data = (const void *)(uintptr_t)(size_t)b; /* relative until the mapping is known */
    return LP_OK;
}

lp_status lp_st_open(lp_st_file *f, const char *path) {
    lp_status st = LP_OK;
    cJSON *root = NULL;
    span *spans = NULL;
    memset(f, 0, sizeof *f);
    if (!(f->path = strdup(path))) LP_TRY(st, fail, LP_ERR(LP_ERR_OOM, "%s: out of memory", path));
    int fd = open(path, O_RDONLY);
    if (fd < 0) LP_TRY(st, fail, LP_ERR(LP_ERR_IO, "%s: cannot open: %s", path, strerror(errno)));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        LP_TRY(st, fail, LP_ERR(LP_ERR_IO, "%s: not a regular file", path));
    }
    f->size = (size_t)sb.st_size;
    if (f->size < 8) {
        close(fd);
        LP_TRY(st, fail, LP_ERR(LP_ERR_FORMAT, "%s: truncated: %zu bytes, shorter than the 8-byte header length", path, f->size));
    }
    f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        LP_TRY(st, fail, LP_ERR(LP_ERR_IO, "%s: cannot map: %s", path, strerror(errno)));
    }
    const unsigned char *p = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | p[i];
    if (hlen > f->size - 8)
        LP_TRY(st, fail, LP_ERR(LP_ERR_FORMAT, "%s: truncated: header length %llu exceeds the %zu bytes that follow", path,
               (unsigned long long)hlen, f->size - 8));
    if (hlen > MAX_HEADER)
        LP_TRY(st, fail, LP_ERR(LP_ERR_FORMAT, "%s: header of %llu bytes is too large", path,
                                      (unsigned long long)hlen));
    root = cJSON_ParseWithLength((const char *)p + 8, (size_t)hlen);
    if (!cJSON_IsObject(root))
        LP_TRY(st, fail, LP_ERR(LP_ERR_FORMAT, "%s: header is not a well-formed JSON object", path));
    size_t data_off = 8 + (size_t)hlen, data_size = f->size - data_off;
    int count = 0;
    for (cJSON *e = root->child; e; e = e->next)
        if (strcmp(e->string, "__metadata__") != 0) count++;
    f->tensors = calloc(count ? count : 1, sizeof *f->tensors);
    spans = calloc(count ? count : 1, sizeof *spans);
    if (!f->tensors || !spans) LP_TRY(st, fail, LP_ERR(LP_ERR_OOM, "out of memory"));
    for (cJSON *e = root->child; e; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0) continue;
        lp_st_tensor *t = &f->tensors[f->n];
        LP_TRY(st, fail, parse_entry(path, e, data_size, t));
        if (!(t->name = strdup(e->string))) LP_TRY(st, fail, LP_ERR(LP_ERR_OOM, "%s: out of memory", path));
        spans[f->n] = (span){(size_t)(uintptr_t)t->data, (size_t)(uintptr_t)t->data + t->nbytes, f->n};
        f->n++;
    }
    qsort(spans, f->n, sizeof *spans, span_cmp);
    for (int i = 1; i < f->n; i++)
        if (spans[i].begin < spans[i - 1].end)
            LP_TRY(st, fail, LP_ERR(LP_ERR_FORMAT, "%s: tensors '%s' and '%s' overlap", path,
                                          f->tensors[spans[i - 1].idx].name, f->tensors[spans[i].idx].name));
    for (int i = 0; i < f->n; i++)
        f->tensors[i].data = p + data_off + (size_t)(uintptr_t)f->tensors[i].data;
    free(spans);
    cJSON_Delete(root);
    return LP_OK;
fail:
    free(spans);
    cJSON_Delete(root);
    lp_st_close(f);
    return st;
}

const lp_st_tensor *lp_st_find(const lp_st_file *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

/* ---- checkpoint directories ---- */

void lp_st_set_close(lp_st_set *s) {
    for (int i = 0; i < s->n; i++) lp_st_close(&s->files[i]);
    free(s->files);
    memset(s, 0, sizeof *s);
}

lp_status lp_st_set_open(lp_st_set *s, const char *dir) {
    char path[4096];
    memset(s, 0, sizeof *s);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    int absent;
    cJSON *root = json_load(path, &absent);
    if (absent) {
        if (!(s->files = calloc(1, sizeof *s->files))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", dir);
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (access(path, F_OK) != 0) {
            lp_st_set_close(s);
            LP_FAIL(LP_ERR_IO, "%s: no model.safetensors or model.safetensors.index.json", dir);
        }
        lp_status st = lp_st_open(&s->files[0], path);
        if (st != LP_OK) {
            lp_st_set_close(s);
            return st;
        }
        s->n = 1;
        return LP_OK;
    }
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(map)) {
        cJSON_Delete(root);
        LP_FAIL(LP_ERR_FORMAT, "%s: not JSON with a \"weight_map\" object", path);
    }
    int cap = cJSON_GetArraySize(map);
    s->files = calloc(cap ? cap : 1, sizeof *s->files);
    lp_status st = s->files ? LP_OK : LP_ERR(LP_ERR_OOM, "%s: out of memory", path);
    for (const cJSON *e = map->child; st == LP_OK && e; e = e->next) {
        if (!cJSON_IsString(e) || strchr(e->valuestring, '/')) {
            st = LP_ERR(LP_ERR_FORMAT, "%s: bad shard name for '%s'", path, e->string);
            break;
        }
        int seen = 0;
        char shard[4096];
        snprintf(shard, sizeof shard, "%s/%s", dir, e->valuestring);
        for (int i = 0; i < s->n && !seen; i++) seen = strcmp(s->files[i].path, shard) == 0;
        if (seen) continue;
        if ((st = lp_st_open(&s->files[s->n], shard)) != LP_OK) break;
        s->n++;
    }
    cJSON_Delete(root);
    if (st != LP_OK) lp_st_set_close(s);
    return st;
}

const lp_st_tensor *lp_st_set_find(const lp_st_set *s, const char *name, const lp_st_file **file) {
    for (int i = 0; i < s->n; i++) {
        const lp_st_tensor *t = lp_st_find(&s->files[i], name);
        if (t) {
            if (file) *file = &s->files[i];
            return t;
        }
    }
    return NULL;
}

/* ---- writing ---- */

static lp_status write_all(int fd, const void *buf, size_t n, off_t off, const char *path) {
    return lp_write_fd(fd, buf, n, (long long)off, path);
}

static void writer_free(lp_st_writer *w) {
    free(w->path);
    free(w->tmp);
    free(w->offsets);
    free(w->sizes);
    memset(w, 0, sizeof *w);
    w->fd = -1;
}

lp_status lp_st_writer_open(lp_st_writer *w, const char *path, const lp_st_spec *specs, int n,
                            const char *const *metadata) {
    memset(w, 0, sizeof *w);
    w->fd = -1;
    cJSON *root = cJSON_CreateObject();
    if (metadata && metadata[0]) {
        cJSON *md = cJSON_AddObjectToObject(root, "__metadata__");
        for (int i = 0; metadata[i] && metadata[i + 1]; i += 2) cJSON_AddStringToObject(md, metadata[i], metadata[i + 1]);
    }
    w->n = n;
    w->offsets = calloc(n ? n : 1, sizeof *w->offsets);
    w->sizes = calloc(n ? n : 1, sizeof *w->sizes);
    if (!root || !w->offsets || !w->sizes) {
        cJSON_Delete(root);
        writer_free(w);
        LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    }
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        cJSON *e = cJSON_AddObjectToObject(root, specs[i].name);
        cJSON_AddStringToObject(e, "dtype", lp_dtype_name(specs[i].dtype));
        cJSON *sh = cJSON_AddArrayToObject(e, "shape");
        for (int d = 0; d < specs[i].ndim; d++) cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)specs[i].shape[d]));
        w->sizes[i] = (size_t)lp_shape_numel(specs[i].shape, specs[i].ndim) * lp_dtype_size(specs[i].dtype);
        cJSON *of = cJSON_AddArrayToObject(e, "data_offsets");
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(of, cJSON_CreateNumber((double)(off + w->sizes[i])));
        w->offsets[i] = off;
        off += w->sizes[i];
    }
    char *json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    size_t hlen = json ? strlen(json) : 0, padded = (hlen + 7) / 8 * 8; /* keep tensor data 8-byte aligned */
    char *hdr = json ? malloc(8 + padded) : NULL;
    size_t tn = strlen(path) + 64;
    w->path = strdup(path);
    w->tmp = malloc(tn);
    if (!hdr || !w->path || !w->tmp) {
        free(json), free(hdr);
        writer_free(w);
        LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    }
    for (int i = 0; i < 8; i++) hdr[i] = (char)((uint64_t)padded >> (8 * i));
    memcpy(hdr + 8, json, hlen);
    memset(hdr + 8 + hlen, ' ', padded - hlen);
    free(json);
    for (int i = 0; i < n; i++) w->offsets[i] += 8 + padded;

    lp_tmp_name(w->tmp, tn, path); /* unique: a second run started by mistake cannot touch ours */
    w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    lp_status st = LP_OK;
    if (w->fd < 0) {
        st = LP_ERR(lp_write_status(errno), "%s: cannot create: %s", w->tmp, strerror(errno));
    } else if ((st = write_all(w->fd, hdr, 8 + padded, 0, w->tmp)) == LP_OK &&
               ftruncate(w->fd, (off_t)(8 + padded + off)) != 0) {
        st = LP_ERR(LP_ERR_WRITE, "%s: cannot size file: %s", w->tmp, strerror(errno));
    }
    free(hdr);
    if (st != LP_OK) lp_st_writer_abort(w);
    return st;
}

lp_status lp_st_writer_put(lp_st_writer *w, int idx, size_t off, const void *data, size_t bytes) {
    if (idx < 0 || idx >= w->n || off + bytes > w->sizes[idx])
        LP_FAIL(LP_ERR_INTERNAL, "%s: write outside tensor %d", w->tmp, idx);
    return write_all(w->fd, data, bytes, (off_t)(w->offsets[idx] + off), w->tmp);
}

lp_status lp_st_writer_commit(lp_st_writer *w) {
    lp_status st = LP_OK;
    int synced = fsync(w->fd) == 0, e = errno;
    if (close(w->fd) != 0 && synced) synced = 0, e = errno;
    w->fd = -1;
    if (!synced)
        st = LP_ERR(LP_ERR_WRITE, "%s: cannot flush: %s", w->tmp, strerror(e));
    else if (rename(w->tmp, w->path) != 0)
        st = LP_ERR(lp_write_status(errno), "%s: cannot rename to %s: %s", w->tmp, w->path, strerror(errno));
    if (st != LP_OK) unlink(w->tmp);
    writer_free(w);
    return st;
}

void lp_st_writer_abort(lp_st_writer *w) {
    if (w->fd >= 0) close(w->fd);
    if (w->tmp) unlink(w->tmp);
    writer_free(w);
}

lp_status lp_st_write(const char *path, const lp_st_spec *specs, const void *const *datas, int n,
                      const char *const *metadata) {
    lp_st_writer w;
    LP_CHECK(lp_st_writer_open(&w, path, specs, n, metadata));
    for (int i = 0; i < n; i++) {
        lp_status st = lp_st_writer_put(&w, i, 0, datas[i], w.sizes[i]);
        if (st != LP_OK) {
            lp_st_writer_abort(&w);
            return st;
        }
    }
    return lp_st_writer_commit(&w);
}
