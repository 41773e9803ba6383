/* gguf.c: the GGUF reader (validate everything, then hand out pointers into the mmapped
 * file), the metadata getters, the ggml type table, and lp_dequant, the one dispatch
 * point of the block dequantizers (host/cpu/dequant.c and kernels/dequant.cu).
 *
 * GGUF v2/v3, little-endian:
 *   "GGUF" u32 version, u64 n_tensors, u64 n_kv
 *   n_kv x     { string key, u32 value type, value }
 *   n_tensors x{ string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset }
 *   padding to general.alignment (default 32), then the data section; tensor offsets
 *   are relative to its start.
 *   string = u64 length + bytes (no NUL); array = u32 element type + u64 count + elements.
 * Every count, length, dimension and offset is checked against the bytes that remain
 * before it is used, so a hostile file can make open fail but never read out of bounds.
 * Any failure is one line naming the file, the key or tensor when there is one, and the
 * problem. Tensors of types loupe cannot dequantize are accepted as long as their size is
 * known (the model loader asks lp_ggml_supported and reports them itself). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/gguf.h"
#include "ops/ops_internal.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the GGUF reader assumes a little-endian host"
#endif

#define HEADER_BYTES 24 /* magic, version, n_tensors, n_kv */
#define KV_MIN 13       /* the smallest key-value pair: key length, type, a 1-byte value */
#define TI_MIN 32       /* the smallest tensor info: name length, n_dims, one dim, type, offset */
#define MAX_NEST 4      /* arrays of arrays nested deeper than this are refused */
#define DEFAULT_ALIGNMENT 32

typedef struct kv {
    char *key;
    uint32_t type;
    const uint8_t *val;   /* scalar: the value; string: its bytes; array: the first element */
    uint64_t n;           /* string: length; array: element count */
    uint32_t elem;        /* array element type */
    const uint8_t **strs; /* string arrays: each element's length prefix, for O(1) access */
} kv;

/* Open addressing over names: each slot holds a name and its index (name NULL: empty). */
typedef struct slot {
    const char *name;
    int idx;
} slot;
typedef struct table {
    slot *slot;
    size_t mask;
} table;

struct lp_gguf {
    char *path;
    uint8_t *map;
    size_t size;
    int mapped; /* map came from mmap (lp_gguf_open), not from the caller */
    uint32_t version, alignment;
    int n_kv, n_tensors;
    kv *kvs;
    lp_gguf_tensor *tensors;
    table kv_index, tensor_index;
    size_t data_offset;
};

/* ---- small helpers ---- */

static uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static const char *vtype_name(uint32_t t) {
    static const char *names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32",
                                  "bool", "string", "array", "u64", "i64", "f64"};
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

/* Bytes of one scalar value; 0 for strings, arrays and unknown types. */
static size_t scalar_size(uint32_t t) {
    switch (t) {
    case LP_GGUF_U8: case LP_GGUF_I8: case LP_GGUF_BOOL: return 1;
    case LP_GGUF_U16: case LP_GGUF_I16: return 2;
    case LP_GGUF_U32: case LP_GGUF_I32: case LP_GGUF_F32: return 4;
    case LP_GGUF_U64: case LP_GGUF_I64: case LP_GGUF_F64: return 8;
    default: return 0;
    }
}
static int is_int(uint32_t t) { return scalar_size(t) && t != LP_GGUF_F32 && t != LP_GGUF_F64; }

/* A name from the file, printable in a one-line message: control bytes and quotes escaped,
 * cut after 80 bytes. */
typedef struct { char s[400]; } shown_buf;
static const char *shown(const char *name, shown_buf *b) {
    size_t o = 0, i = 0;
    for (; name[i] && i < 80 && o + 8 < sizeof b->s; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c < 0x20 || c == 0x7f || c == '\'' || c == '\\') o += (size_t)snprintf(b->s + o, sizeof b->s - o, "\\x%02x", c);
        else b->s[o++] = (char)c;
    }
    if (name[i]) o += (size_t)snprintf(b->s + o, sizeof b->s - o, "...");
    b->s[o] = 0;
    return b->s;
}

static uint64_t hash(const char *s) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static lp_status table_init(table *t, int n, const char *path) {
    size_t cap = 8;
    while (cap < 2 * (size_t)n) cap <<= 1;
    t->slot = calloc(cap, sizeof *t->slot);
    t->mask = cap - 1;
    if (!t->slot) LP_FAIL(LP_ERR_OOM, "%s: out of memory for an index of %d names", path, n);
    return LP_OK;
}

/* Index of name, or -1. */
static int table_find(const table *t, const char *name) {
    if (!t->slot) return -1;
    for (size_t h = hash(name) & t->mask; t->slot[h].name; h = (h + 1) & t->mask)
        if (strcmp(t->slot[h].name, name) == 0) return t->slot[h].idx;
    return -1;
}

/* Adds name (which must stay alive) unless present; returns the index already there, or -1. */
static int table_put(table *t, const char *name, int idx) {
    size_t h = hash(name) & t->mask;
    for (; t->slot[h].name; h = (h + 1) & t->mask)
        if (strcmp(t->slot[h].name, name) == 0) return t->slot[h].idx;
    t->slot[h] = (slot){name, idx};
    return -1;
}

/* ---- reading with bounds ---- */

typedef struct rd {
    const uint8_t *base;
    size_t size, pos;
    const char *path;
} rd;

static size_t left(const rd *r) { return r->size - r->pos; }

/* n bytes at the cursor, or a "truncated" error naming what was being read. */
static lp_status take(rd *r, size_t n, const char *what, const uint8_t **out) {
    if (n > left(r))
        LP_FAIL(LP_ERR_FORMAT, "%s: truncated: %s at byte %zu needs %zu bytes but only %zu remain", r->path, what,
                r->pos, n, left(r));
    *out = r->base + r->pos;
    r->pos += n;
    return LP_OK;
}
static lp_status take32(rd *r, const char *what, uint32_t *v) {
    const uint8_t *p = NULL;
    LP_CHECK(take(r, 4, what, &p));
    *v = rd32(p);
    return LP_OK;
}
static lp_status take64(rd *r, const char *what, uint64_t *v) {
    const uint8_t *p = NULL;
    LP_CHECK(take(r, 8, what, &p));
    *v = rd64(p);
    return LP_OK;
}

/* A string: its bytes and length, bounded by what remains of the file. */
static lp_status take_str(rd *r, const char *what, const uint8_t **s, uint64_t *len) {
    LP_CHECK(take64(r, what, len));
    if (*len > left(r))
        LP_FAIL(LP_ERR_FORMAT, "%s: %s: string length %llu runs past the end of the file (%zu bytes remain)", r->path,
                what, (unsigned long long)*len, left(r));
    *s = r->base + r->pos;
    r->pos += (size_t)*len;
    return LP_OK;
}

/* A key or tensor name as a C string; names with NUL bytes are refused. */
static lp_status take_name(rd *r, const char *what, char **out) {
    const uint8_t *s;
    uint64_t len;
    LP_CHECK(take_str(r, what, &s, &len));
    if (memchr(s, 0, (size_t)len)) LP_FAIL(LP_ERR_FORMAT, "%s: %s: name contains a NUL byte", r->path, what);
    if (!(*out = malloc((size_t)len + 1))) LP_FAIL(LP_ERR_OOM, "%s: out of memory", r->path);
    memcpy(*out, s, (size_t)len);
    (*out)[len] = 0;
    return LP_OK;
}

/* An array's elements (after its type and count). e is NULL for a nested array, which is
 * only skipped. */
static lp_status take_array(rd *r, kv *e, const char *key, int depth) {
    shown_buf kb;
    uint32_t elem;
    uint64_t n;
    char what[512];
    snprintf(what, sizeof what, "key '%s' (array header)", shown(key, &kb));
    LP_CHECK(take32(r, what, &elem));
    LP_CHECK(take64(r, what, &n));
    const size_t es = scalar_size(elem);
    const size_t min = es ? es : elem == LP_GGUF_STRING ? 8 : elem == LP_GGUF_ARRAY ? 12 : 1;
    if (!es && elem != LP_GGUF_STRING && elem != LP_GGUF_ARRAY)
        LP_FAIL(LP_ERR_FORMAT, "%s: key '%s' is an array of unknown value type %u", r->path, kb.s, elem);
    if (n > left(r) / min)
        LP_FAIL(LP_ERR_FORMAT,
                "%s: key '%s': array of %llu %s values runs past the end of the file (%zu bytes remain)", r->path,
                kb.s, (unsigned long long)n, vtype_name(elem), left(r));
    if (e) {
        e->elem = elem;
        e->n = n;
        e->val = r->base + r->pos;
    }
    if (es) {
        r->pos += (size_t)n * es;
    } else if (elem == LP_GGUF_STRING) {
        if (e && n && !(e->strs = malloc((size_t)n * sizeof *e->strs)))
            LP_FAIL(LP_ERR_OOM, "%s: out of memory for key '%s' (%llu strings)", r->path, kb.s, (unsigned long long)n);
        snprintf(what, sizeof what, "key '%s' (string array element)", kb.s);
        for (uint64_t i = 0; i < n; i++) {
            const uint8_t *s;
            uint64_t len;
            if (e) e->strs[i] = r->base + r->pos;
            LP_CHECK(take_str(r, what, &s, &len));
        }
    } else {
        if (depth + 1 >= MAX_NEST)
            LP_FAIL(LP_ERR_FORMAT, "%s: key '%s' has arrays nested more than %d deep", r->path, kb.s, MAX_NEST);
        for (uint64_t i = 0; i < n; i++) LP_CHECK(take_array(r, NULL, key, depth + 1));
    }
    return LP_OK;
}

static lp_status take_value(rd *r, kv *e) {
    shown_buf kb;
    char what[512];
    snprintf(what, sizeof what, "key '%s'", shown(e->key, &kb));
    LP_CHECK(take32(r, what, &e->type));
    snprintf(what, sizeof what, "the %s value of key '%s'", vtype_name(e->type), kb.s);
    if (scalar_size(e->type)) return take(r, scalar_size(e->type), what, &e->val);
    if (e->type == LP_GGUF_STRING) return take_str(r, what, &e->val, &e->n);
    if (e->type == LP_GGUF_ARRAY) return take_array(r, e, e->key, 0);
    LP_FAIL(LP_ERR_FORMAT, "%s: key '%s' has unknown value type %u", r->path, kb.s, e->type);
}

/* An integer value of any width as int64; 0 if it does not fit (u64 above INT64_MAX). */
static int int_at(uint32_t t, const uint8_t *p, int64_t *out) {
    switch (t) {
    case LP_GGUF_U8: *out = p[0]; return 1;
    case LP_GGUF_BOOL: *out = p[0] != 0; return 1;
    case LP_GGUF_I8: *out = (int8_t)p[0]; return 1;
    case LP_GGUF_U16: *out = (uint16_t)(p[0] | p[1] << 8); return 1;
    case LP_GGUF_I16: *out = (int16_t)(uint16_t)(p[0] | p[1] << 8); return 1;
    case LP_GGUF_U32: *out = rd32(p); return 1;
    case LP_GGUF_I32: *out = (int32_t)rd32(p); return 1;
    case LP_GGUF_I64: *out = (int64_t)rd64(p); return 1;
    case LP_GGUF_U64: {
        uint64_t v = rd64(p);
        if (v > INT64_MAX) return 0;
        *out = (int64_t)v;
        return 1;
    }
    }
    return 0;
}

/* ---- open ---- */

static lp_status parse_header(lp_gguf *g, rd *r) {
    const char *path = g->path;
    const uint8_t *p = r->base;
    if (r->size < 4)
        LP_FAIL(LP_ERR_FORMAT, "%s: not a GGUF file (%zu bytes, shorter than the 4-byte magic)", path, r->size);
    if (memcmp(p, "GGUF", 4) != 0)
        LP_FAIL(LP_ERR_FORMAT, "%s: not a GGUF file (bad magic: starts with %02x %02x %02x %02x, not \"GGUF\")",
                path, p[0], p[1], p[2], p[3]);
    if (r->size < HEADER_BYTES)
        LP_FAIL(LP_ERR_FORMAT, "%s: truncated: %zu bytes, shorter than the %d-byte GGUF header", path, r->size,
                HEADER_BYTES);
    g->version = rd32(p + 4);
    if (g->version == 1)
        LP_FAIL(LP_ERR_FORMAT, "%s: GGUF version 1 is not supported (only versions 2 and 3; convert the model again "
                "with a current llama.cpp)", path);
    if (g->version != 2 && g->version != 3) {
        uint32_t sw = __builtin_bswap32(g->version);
        if (sw >= 1 && sw <= 3)
            LP_FAIL(LP_ERR_FORMAT, "%s: big-endian GGUF file (version %u byte-swapped); only little-endian files "
                    "are supported", path, sw);
        LP_FAIL(LP_ERR_FORMAT, "%s: unknown GGUF version %u (supported: 2 and 3)", path, g->version);
    }
    const uint64_t n_tensors = rd64(p + 8), n_kv = rd64(p + 16);
    r->pos = HEADER_BYTES;
    const size_t rest = left(r);
    if (n_kv > rest / KV_MIN || n_kv > INT_MAX)
        LP_FAIL(LP_ERR_FORMAT, "%s: absurd metadata count %llu: a file of %zu bytes cannot hold that many key-value "
                "pairs (at least %d bytes each; truncated or corrupt?)", path, (unsigned long long)n_kv, r->size, KV_MIN);
    if (n_tensors > (rest - (size_t)n_kv * KV_MIN) / TI_MIN || n_tensors > INT_MAX)
        LP_FAIL(LP_ERR_FORMAT, "%s: absurd tensor count %llu: a file of %zu bytes cannot hold that many tensor infos "
                "besides its metadata (at least %d bytes each; truncated or corrupt?)", path,
                (unsigned long long)n_tensors, r->size, TI_MIN);
    g->n_kv = (int)n_kv;
    g->n_tensors = (int)n_tensors;
    g->kvs = calloc(n_kv ? n_kv : 1, sizeof *g->kvs);
    g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *g->tensors);
    if (!g->kvs || !g->tensors) LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    LP_CHECK(table_init(&g->kv_index, g->n_kv, path));
    return table_init(&g->tensor_index, g->n_tensors, path);
}

static lp_status parse_kvs(lp_gguf *g, rd *r) {
    char what[64];
    shown_buf kb;
    for (int i = 0; i < g->n_kv; i++) {
        kv *e = &g->kvs[i];
        snprintf(what, sizeof what, "the name of key #%d", i);
        LP_CHECK(take_name(r, what, &e->key));
        if (table_put(&g->kv_index, e->key, i) >= 0)
            LP_FAIL(LP_ERR_FORMAT, "%s: duplicate key '%s'", g->path, shown(e->key, &kb));
        LP_CHECK(take_value(r, e));
    }
    /* general.alignment: any integer type (the spec says u32), a power of two */
    g->alignment = DEFAULT_ALIGNMENT;
    int a = table_find(&g->kv_index, "general.alignment");
    if (a >= 0) {
        const kv *e = &g->kvs[a];
        int64_t v;
        if (!is_int(e->type) || e->type == LP_GGUF_BOOL || !int_at(e->type, e->val, &v))
            LP_FAIL(LP_ERR_FORMAT, "%s: key 'general.alignment' is %s, not an unsigned integer", g->path,
                    vtype_name(e->type));
        if (v <= 0 || v > (1 << 30) || (v & (v - 1)))
            LP_FAIL(LP_ERR_FORMAT, "%s: key 'general.alignment' is %lld, not a power of two (at most 2^30)", g->path,
                    (long long)v);
        g->alignment = (uint32_t)v;
    }
    return LP_OK;
}

static lp_status parse_tensor_info(lp_gguf *g, rd *r, int i) {
    lp_gguf_tensor *t = &g->tensors[i];
    const char *path = g->path;
    char what[512];
    shown_buf nb;
    snprintf(what, sizeof what, "the name of tensor #%d", i);
    LP_CHECK(take_name(r, what, (char **)&t->name));
    const char *nm = shown(t->name, &nb);
    if (table_put(&g->tensor_index, t->name, i) >= 0) LP_FAIL(LP_ERR_FORMAT, "%s: duplicate tensor name '%s'", path, nm);
    snprintf(what, sizeof what, "the info of tensor '%s'", nm);
    uint32_t n_dims, type;
    LP_CHECK(take32(r, what, &n_dims));
    if (n_dims < 1 || n_dims > 4)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has %u dimensions (1 to 4 supported)", path, nm, n_dims);
    t->n_dims = (int)n_dims;
    int64_t n_elems = 1;
    for (int d = 0; d < 4; d++) t->ne[d] = 1;
    for (int d = 0; d < t->n_dims; d++) {
        uint64_t ne;
        LP_CHECK(take64(r, what, &ne));
        if (ne == 0 || ne > INT64_MAX)
            LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has dimension %d of size %llu (must be positive and below 2^63)",
                    path, nm, d, (unsigned long long)ne);
        t->ne[d] = (int64_t)ne;
        if (__builtin_mul_overflow(n_elems, t->ne[d], &n_elems))
            LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has more than 2^63 elements (the product of its dimensions "
                    "overflows)", path, nm);
    }
    t->n_elems = n_elems;
    LP_CHECK(take32(r, what, &type));
    if (type > INT_MAX || !lp_ggml_block_elems((int)type))
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has unknown ggml type id %u, whose size loupe cannot compute", path,
                nm, type);
    t->type = (int)type;
    const int blk = lp_ggml_block_elems(t->type);
    if (t->ne[0] % blk)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has rows of %lld elements, not a multiple of the %s block of %d", path,
                nm, (long long)t->ne[0], lp_ggml_type_name(t->type), blk);
    t->n_bytes = lp_ggml_bytes(t->type, n_elems);
    if (t->n_bytes == 0)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' of %lld %s elements has a size that overflows", path, nm,
                (long long)n_elems, lp_ggml_type_name(t->type));
    LP_CHECK(take64(r, what, &t->offset));
    if (t->offset % g->alignment)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has offset %llu, not a multiple of the alignment %u (misaligned)",
                path, nm, (unsigned long long)t->offset, g->alignment);
    return LP_OK;
}

typedef struct span {
    uint64_t begin, end;
    int idx;
} span;

static int span_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

/* Places the data section and checks every tensor lies inside it, without overlaps. */
static lp_status place_tensors(lp_gguf *g, rd *r) {
    const char *path = g->path;
    shown_buf a, b;
    size_t start = (r->pos + g->alignment - 1) / g->alignment * g->alignment; /* pos <= size < 2^63 */
    if (g->n_tensors == 0) {
        g->data_offset = start < r->size ? start : r->size;
        return LP_OK;
    }
    if (start > r->size)
        LP_FAIL(LP_ERR_FORMAT, "%s: truncated: the data section would start at byte %zu but the file has %zu bytes",
                path, start, r->size);
    g->data_offset = start;
    const uint64_t data = r->size - start;
    span *sp = malloc((size_t)g->n_tensors * sizeof *sp);
    if (!sp) LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    for (int i = 0; i < g->n_tensors; i++) {
        lp_gguf_tensor *t = &g->tensors[i];
        if (t->offset > data || t->n_bytes > data - t->offset) {
            free(sp);
            LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' (%zu bytes at offset %llu) extends past the end of the file "
                    "(the data section has %llu bytes; truncated?)", path, shown(t->name, &a), t->n_bytes,
                    (unsigned long long)t->offset, (unsigned long long)data);
        }
        sp[i] = (span){t->offset, t->offset + t->n_bytes, i};
        t->data = g->map + start + t->offset;
    }
    qsort(sp, (size_t)g->n_tensors, sizeof *sp, span_cmp);
    for (int i = 1; i < g->n_tensors; i++)
        if (sp[i].begin < sp[i - 1].end) {
            const char *x = g->tensors[sp[i - 1].idx].name, *y = g->tensors[sp[i].idx].name;
            free(sp);
            LP_FAIL(LP_ERR_FORMAT, "%s: tensors '%s' and '%s' overlap in the data section", path, shown(x, &a),
                    shown(y, &b));
        }
    free(sp);
    return LP_OK;
}

static lp_status parse(lp_gguf *g) {
    rd r = {g->map, g->size, 0, g->path};
    LP_CHECK(parse_header(g, &r));
    LP_CHECK(parse_kvs(g, &r));
    for (int i = 0; i < g->n_tensors; i++) LP_CHECK(parse_tensor_info(g, &r, i));
    return place_tensors(g, &r);
}

static lp_status new_handle(const char *path, lp_gguf **out, lp_gguf **g) {
    if (!out) LP_FAIL(LP_ERR_ARG, "lp_gguf_open: null output");
    *out = NULL;
    if (!path) LP_FAIL(LP_ERR_ARG, "lp_gguf_open: null path");
    *g = calloc(1, sizeof **g);
    if (!*g || !((*g)->path = strdup(path))) {
        free(*g);
        LP_FAIL(LP_ERR_OOM, "%s: out of memory", path);
    }
    return LP_OK;
}

static lp_status finish_open(lp_gguf *g, lp_status st, lp_gguf **out) {
    if (st == LP_OK) st = parse(g);
    if (st != LP_OK) {
        lp_gguf_close(g);
        return st;
    }
    *out = g;
    return LP_OK;
}

lp_status lp_gguf_open_memory(const void *data, size_t size, const char *name, lp_gguf **out) {
    lp_gguf *g;
    LP_CHECK(new_handle(name, out, &g));
    if (!data && size) return finish_open(g, LP_ERR(LP_ERR_ARG, "%s: null data", name), out);
    g->map = (uint8_t *)data;
    g->size = size;
    return finish_open(g, LP_OK, out);
}

lp_status lp_gguf_open(const char *path, lp_gguf **out) {
    lp_gguf *g;
    LP_CHECK(new_handle(path, out, &g));
    lp_status st = LP_OK;
    int fd = open(path, O_RDONLY);
    struct stat sb;
    if (fd < 0) {
        st = LP_ERR(LP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    } else if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        st = LP_ERR(LP_ERR_IO, "%s: not a regular file", path);
    } else if ((g->size = (size_t)sb.st_size) > 0) {
        void *m = mmap(NULL, g->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED)
            st = LP_ERR(LP_ERR_IO, "%s: cannot map: %s", path, strerror(errno));
        else
            g->map = m, g->mapped = 1;
    }
    if (fd >= 0) close(fd);
    return finish_open(g, st, out);
}

void lp_gguf_close(lp_gguf *g) {
    if (!g) return;
    if (g->kvs)
        for (int i = 0; i < g->n_kv; i++) {
            free(g->kvs[i].key);
            free(g->kvs[i].strs);
        }
    if (g->tensors)
        for (int i = 0; i < g->n_tensors; i++) free((char *)g->tensors[i].name);
    free(g->kvs);
    free(g->tensors);
    free(g->kv_index.slot);
    free(g->tensor_index.slot);
    if (g->mapped) munmap(g->map, g->size);
    free(g->path);
    free(g);
}

/* ---- accessors ---- */

const char *lp_gguf_path(const lp_gguf *g) { return g->path; }
uint32_t lp_gguf_version(const lp_gguf *g) { return g->version; }
int lp_gguf_n_tensors(const lp_gguf *g) { return g->n_tensors; }
int lp_gguf_n_kv(const lp_gguf *g) { return g->n_kv; }

const lp_gguf_tensor *lp_gguf_tensor_at(const lp_gguf *g, int i) {
    return i >= 0 && i < g->n_tensors ? &g->tensors[i] : NULL;
}

const lp_gguf_tensor *lp_gguf_find_tensor(const lp_gguf *g, const char *name) {
    int i = name ? table_find(&g->tensor_index, name) : -1;
    return i >= 0 ? &g->tensors[i] : NULL;
}

const char *lp_gguf_key_at(const lp_gguf *g, int i) { return i >= 0 && i < g->n_kv ? g->kvs[i].key : NULL; }

int lp_gguf_has(const lp_gguf *g, const char *key) { return key && table_find(&g->kv_index, key) >= 0; }

/* The entry for key, or LP_ERR_NOT_FOUND naming the file and key. */
static lp_status find_kv(const lp_gguf *g, const char *key, const kv **e) {
    if (!g || !key) LP_FAIL(LP_ERR_ARG, "gguf: null file or key");
    int i = table_find(&g->kv_index, key);
    shown_buf kb;
    if (i < 0) LP_FAIL(LP_ERR_NOT_FOUND, "%s: no metadata key '%s'", g->path, shown(key, &kb));
    *e = &g->kvs[i];
    return LP_OK;
}

static lp_status wrong_type(const lp_gguf *g, const char *key, uint32_t have, const char *want) {
    shown_buf kb;
    LP_FAIL(LP_ERR_FORMAT, "%s: key '%s' is %s, expected %s", g->path, shown(key, &kb), vtype_name(have), want);
}

static lp_status get_int(const lp_gguf *g, const char *key, uint32_t t, const uint8_t *p, int64_t *out) {
    if (!is_int(t)) return wrong_type(g, key, t, "an integer");
    shown_buf kb;
    if (!int_at(t, p, out))
        LP_FAIL(LP_ERR_FORMAT, "%s: key '%s' holds %llu, which does not fit in int64", g->path, shown(key, &kb),
                (unsigned long long)rd64(p));
    return LP_OK;
}

static lp_status get_float(const lp_gguf *g, const char *key, uint32_t t, const uint8_t *p, double *out) {
    if (t == LP_GGUF_F32) {
        float f;
        memcpy(&f, p, 4);
        *out = f;
    } else if (t == LP_GGUF_F64) {
        memcpy(out, p, 8);
    } else if (t == LP_GGUF_U64) {
        *out = (double)rd64(p);
    } else if (is_int(t)) {
        int64_t v = 0;
        int_at(t, p, &v);
        *out = (double)v;
    } else {
        return wrong_type(g, key, t, "a number");
    }
    return LP_OK;
}

lp_status lp_gguf_get_int(const lp_gguf *g, const char *key, int64_t *out) {
    const kv *e;
    LP_CHECK(find_kv(g, key, &e));
    return get_int(g, key, e->type, e->val, out);
}

lp_status lp_gguf_get_float(const lp_gguf *g, const char *key, double *out) {
    const kv *e;
    LP_CHECK(find_kv(g, key, &e));
    return get_float(g, key, e->type, e->val, out);
}

lp_status lp_gguf_get_str(const lp_gguf *g, const char *key, const char **s, size_t *len) {
    const kv *e;
    LP_CHECK(find_kv(g, key, &e));
    if (e->type != LP_GGUF_STRING) return wrong_type(g, key, e->type, "a string");
    *s = (const char *)e->val;
    *len = (size_t)e->n;
    return LP_OK;
}

lp_status lp_gguf_get_arr(const lp_gguf *g, const char *key, lp_gguf_vtype *elem, uint64_t *n) {
    const kv *e;
    LP_CHECK(find_kv(g, key, &e));
    if (e->type != LP_GGUF_ARRAY) return wrong_type(g, key, e->type, "an array");
    if (elem) *elem = (lp_gguf_vtype)e->elem;
    if (n) *n = e->n;
    return LP_OK;
}

/* The array entry for key with element i in range; *p points at element i (scalars). */
static lp_status arr_elem(const lp_gguf *g, const char *key, uint64_t i, const kv **e, const uint8_t **p) {
    LP_CHECK(find_kv(g, key, e));
    shown_buf kb;
    if ((*e)->type != LP_GGUF_ARRAY) return wrong_type(g, key, (*e)->type, "an array");
    if (i >= (*e)->n)
        LP_FAIL(LP_ERR_ARG, "%s: index %llu is out of range for key '%s' (an array of %llu)", g->path,
                (unsigned long long)i, shown(key, &kb), (unsigned long long)(*e)->n);
    size_t es = scalar_size((*e)->elem);
    *p = es ? (*e)->val + (size_t)i * es : NULL;
    return LP_OK;
}

static lp_status wrong_elem(const lp_gguf *g, const char *key, uint32_t have, const char *want) {
    shown_buf kb;
    LP_FAIL(LP_ERR_FORMAT, "%s: key '%s' is an array of %s, expected %s", g->path, shown(key, &kb), vtype_name(have),
            want);
}

lp_status lp_gguf_arr_int(const lp_gguf *g, const char *key, uint64_t i, int64_t *out) {
    const kv *e;
    const uint8_t *p = NULL;
    LP_CHECK(arr_elem(g, key, i, &e, &p));
    if (!is_int(e->elem)) return wrong_elem(g, key, e->elem, "integers");
    return get_int(g, key, e->elem, p, out);
}

lp_status lp_gguf_arr_float(const lp_gguf *g, const char *key, uint64_t i, double *out) {
    const kv *e;
    const uint8_t *p = NULL;
    LP_CHECK(arr_elem(g, key, i, &e, &p));
    if (!p) return wrong_elem(g, key, e->elem, "numbers");
    return get_float(g, key, e->elem, p, out);
}

lp_status lp_gguf_arr_str(const lp_gguf *g, const char *key, uint64_t i, const char **s, size_t *len) {
    const kv *e;
    const uint8_t *p = NULL;
    LP_CHECK(arr_elem(g, key, i, &e, &p));
    if (e->elem != LP_GGUF_STRING) return wrong_elem(g, key, e->elem, "strings");
    *len = (size_t)rd64(e->strs[i]); /* bounds checked at open */
    *s = (const char *)e->strs[i] + 8;
    return LP_OK;
}

int lp_gguf_is_file(const char *path) {
    char magic[4] = {0};
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    int yes = fread(magic, 1, 4, f) == 4 && memcmp(magic, "GGUF", 4) == 0;
    fclose(f);
    return yes;
}
