/* test_gguf_corrupt.c: the GGUF reader on corrupt copies of small.gguf
 * (tests/gen/gen_gguf_fixture.py), one mutation each (bad magic and version, absurd
 * counts, lengths past the end, misaligned or overlapping tensors, unknown types, bad
 * dims, duplicate names, every truncation): each fails with one line naming the file and
 * the problem. */
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/gguf.h"
#include "loupe/safetensors.h"
#include "gguf_test.h"
#include "testutil.h"

#define GGUF_DIR LP_FIXTURES "/gguf"

/* ---- corrupt files ---- */

static char dir[64];
static void mkdir_tmp(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-gguf-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}
static void rm_tmp(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}

typedef struct buf {
    uint8_t *p;
    size_t n;
} buf;

static buf small_bytes(void) {
    buf b;
    b.p = (uint8_t *)lp_read_file(GGUF_DIR "/small.gguf", &b.n);
    cr_assert(b.p != NULL);
    return b;
}

static const char *bad_path(void) {
    static char p[128];
    snprintf(p, sizeof p, "%s/bad.gguf", dir);
    return p;
}

static lp_status open_bytes(const uint8_t *p, size_t n, lp_gguf **g) {
    FILE *f = fopen(bad_path(), "wb");
    cr_assert(f != NULL);
    cr_assert_eq(fwrite(p, 1, n, f), n);
    fclose(f);
    *g = NULL;
    return lp_gguf_open(bad_path(), g);
}

/* Opens the mutated bytes and expects failure with want and a message naming the file
 * and containing phrase. */
static void expect_bad(buf b, lp_status want, const char *phrase, const char *mutation) {
    lp_gguf *g;
    lp_status st = open_bytes(b.p, b.n, &g);
    const char *m = lp_last_error();
    cr_expect_eq(st, want, "%s: status %s, want %s (%s)", mutation, lp_status_name(st), lp_status_name(want), m);
    cr_expect(g == NULL, "%s: handle set on failure", mutation);
    if (st == LP_OK) lp_gguf_close(g);
    cr_expect(strstr(m, "bad.gguf") != NULL, "%s: message does not name the file: %s", mutation, m);
    cr_expect(strstr(m, phrase) != NULL, "%s: message '%s' lacks '%s'", mutation, m, phrase);
    cr_expect(strchr(m, '\n') == NULL, "%s: message is not one line", mutation);
}

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* Position just after a length-prefixed string (a key or tensor name) in the file. */
static size_t after_str(buf b, const char *s) {
    size_t n = strlen(s);
    uint8_t pat[128];
    put64(pat, n);
    memcpy(pat + 8, s, n);
    uint8_t *at = memmem(b.p, b.n, pat, n + 8);
    cr_assert(at != NULL, "'%s' not found in small.gguf", s);
    return (size_t)(at - b.p) + 8 + n;
}

/* Field positions of a tensor info: n_dims, ne[d], type, offset. */
static size_t ti_ndims(buf b, const char *name) { return after_str(b, name); }
static size_t ti_ne(buf b, const char *name, int d) { return after_str(b, name) + 4 + 8 * d; }
static size_t ti_type(buf b, const char *name) {
    size_t p = after_str(b, name);
    uint32_t nd;
    memcpy(&nd, b.p + p, 4);
    return p + 4 + 8 * nd;
}
static size_t ti_offset(buf b, const char *name) { return ti_type(b, name) + 4; }

TestSuite(gguf_corrupt, .init = mkdir_tmp, .fini = rm_tmp);

Test(gguf_corrupt, header) {
    buf b = small_bytes();
    buf c = {malloc(b.n), b.n};
#define FRESH() memcpy(c.p, b.p, b.n)
    FRESH(), c.p[0] = 'X';
    expect_bad(c, LP_ERR_FORMAT, "not a GGUF file", "bad magic");
    FRESH(), put32(c.p + 4, 1);
    expect_bad(c, LP_ERR_FORMAT, "version 1", "version 1");
    FRESH(), put32(c.p + 4, 4);
    expect_bad(c, LP_ERR_FORMAT, "unknown GGUF version 4", "version 4");
    FRESH(), put32(c.p + 4, 0x03000000u);
    expect_bad(c, LP_ERR_FORMAT, "big-endian", "byte-swapped version");
    FRESH(), put64(c.p + 8, 1ull << 40);
    expect_bad(c, LP_ERR_FORMAT, "absurd tensor count", "huge tensor count");
    FRESH(), put64(c.p + 8, UINT64_MAX);
    expect_bad(c, LP_ERR_FORMAT, "absurd tensor count", "tensor count 2^64-1");
    FRESH(), put64(c.p + 16, 1ull << 40);
    expect_bad(c, LP_ERR_FORMAT, "absurd metadata count", "huge kv count");
    FRESH(), put64(c.p + 16, 400); /* fits the 13-byte minimum, but the pairs are not there */
    expect_bad(c, LP_ERR_FORMAT, "bad.gguf", "kv count too large");
    FRESH(), put64(c.p + 8, 12); /* one tensor info more than the file holds */
    expect_bad(c, LP_ERR_FORMAT, "bad.gguf", "tensor count one too large");
    c.n = 0;
    expect_bad(c, LP_ERR_FORMAT, "not a GGUF file", "empty file");
    c.n = 20;
    expect_bad(c, LP_ERR_FORMAT, "truncated", "short header");
    free(b.p), free(c.p);
}

Test(gguf_corrupt, metadata) {
    buf b = small_bytes();
    buf c = {malloc(b.n), b.n};
    FRESH(), put64(c.p + 24, 1ull << 40); /* the first key's length */
    expect_bad(c, LP_ERR_FORMAT, "runs past the end", "key length past EOF");
    FRESH(), put64(c.p + 24, UINT64_MAX);
    expect_bad(c, LP_ERR_FORMAT, "runs past the end", "key length 2^64-1");
    size_t v = after_str(b, "test.string");
    FRESH(), put64(c.p + v + 4, b.n);
    expect_bad(c, LP_ERR_FORMAT, "string length", "string value past EOF");
    cr_expect(strstr(lp_last_error(), "'test.string'") != NULL, "%s", lp_last_error());
    v = after_str(b, "test.arr_i32");
    FRESH(), put64(c.p + v + 8, 1ull << 40);
    expect_bad(c, LP_ERR_FORMAT, "runs past the end", "i32 array past EOF");
    cr_expect(strstr(lp_last_error(), "'test.arr_i32'") != NULL, "%s", lp_last_error());
    FRESH(), put64(c.p + v + 8, (1ull << 62) + 1); /* count * 4 would wrap */
    expect_bad(c, LP_ERR_FORMAT, "runs past the end", "i32 array count that overflows");
    FRESH(), put32(c.p + v + 4, 99);
    expect_bad(c, LP_ERR_FORMAT, "unknown value type 99", "array of unknown type");
    FRESH(), put32(c.p + v + 4, LP_GGUF_ARRAY); /* its ints now read as nested array headers */
    expect_bad(c, LP_ERR_FORMAT, "'test.arr_i32'", "nested array garbage");
    v = after_str(b, "test.arr_str");
    FRESH(), put64(c.p + v + 8, UINT64_MAX / 2);
    expect_bad(c, LP_ERR_FORMAT, "runs past the end", "string array count past EOF");
    FRESH(), put64(c.p + v + 12 + 8 + 1 + 8, 1ull << 40); /* the 2nd element's length */
    expect_bad(c, LP_ERR_FORMAT, "string length", "string element past EOF");
    v = after_str(b, "test.u8");
    FRESH(), put32(c.p + v, 99);
    expect_bad(c, LP_ERR_FORMAT, "unknown value type 99", "unknown value type");
    cr_expect(strstr(lp_last_error(), "'test.u8'") != NULL, "%s", lp_last_error());
    FRESH(), memcpy(c.p + after_str(b, "test.i16") - 3, "u16", 3);
    expect_bad(c, LP_ERR_FORMAT, "duplicate key 'test.u16'", "duplicate key");
    FRESH(), c.p[after_str(b, "test.i16") - 1] = 0;
    expect_bad(c, LP_ERR_FORMAT, "NUL", "NUL in a key");
    v = after_str(b, "general.alignment");
    FRESH(), put32(c.p + v + 4, 48);
    expect_bad(c, LP_ERR_FORMAT, "not a power of two", "alignment 48");
    FRESH(), put32(c.p + v + 4, 0);
    expect_bad(c, LP_ERR_FORMAT, "not a power of two", "alignment 0");
    FRESH(), put32(c.p + v, LP_GGUF_F32);
    expect_bad(c, LP_ERR_FORMAT, "'general.alignment' is f32", "alignment as f32");
    free(b.p), free(c.p);
}

Test(gguf_corrupt, tensor_infos) {
    buf b = small_bytes();
    buf c = {malloc(b.n), b.n};
    lp_gguf *g;
    FRESH(), put32(c.p + ti_ndims(b, "t.q8_0"), 0);
    expect_bad(c, LP_ERR_FORMAT, "tensor 't.q8_0' has 0 dimensions", "n_dims 0");
    FRESH(), put32(c.p + ti_ndims(b, "t.q8_0"), 5);
    expect_bad(c, LP_ERR_FORMAT, "5 dimensions", "n_dims 5");
    FRESH(), put64(c.p + ti_ne(b, "t.f32", 1), 0);
    expect_bad(c, LP_ERR_FORMAT, "dimension 1 of size 0", "zero dim");
    FRESH(), put64(c.p + ti_ne(b, "t.f32", 0), 1ull << 63);
    expect_bad(c, LP_ERR_FORMAT, "must be positive", "dim 2^63");
    FRESH(), put64(c.p + ti_ne(b, "t.f32", 0), 1ull << 62); /* x 3 rows: > 2^63 elements */
    expect_bad(c, LP_ERR_FORMAT, "overflows", "element count overflow");
    FRESH(), put64(c.p + ti_ne(b, "t.f32", 0), 1ull << 61), put64(c.p + ti_ne(b, "t.f32", 1), 2);
    expect_bad(c, LP_ERR_FORMAT, "size that overflows", "byte size overflow");
    FRESH(), put64(c.p + ti_ne(b, "t.f32", 0), 1ull << 40);
    expect_bad(c, LP_ERR_FORMAT, "extends past the end", "huge but valid shape");
    FRESH(), put64(c.p + ti_ne(b, "t.q8_0", 0), 48);
    expect_bad(c, LP_ERR_FORMAT, "not a multiple of the Q8_0 block of 32", "row not whole blocks");
    FRESH(), put32(c.p + ti_type(b, "t.q8_0"), 99);
    expect_bad(c, LP_ERR_FORMAT, "tensor 't.q8_0' has unknown ggml type id 99", "unknown type id");
    FRESH(), put32(c.p + ti_type(b, "t.q8_0"), 4);
    expect_bad(c, LP_ERR_FORMAT, "unknown ggml type id 4", "removed type id");
    FRESH(), put32(c.p + ti_type(b, "t.q8_0"), 0x80000000u);
    expect_bad(c, LP_ERR_FORMAT, "unknown ggml type id 2147483648", "type id above INT_MAX");
    uint64_t off;
    memcpy(&off, b.p + ti_offset(b, "t.q8_0"), 8);
    FRESH(), put64(c.p + ti_offset(b, "t.q8_0"), off + 1);
    expect_bad(c, LP_ERR_FORMAT, "not a multiple of the alignment 64", "misaligned offset");
    cr_expect(strstr(lp_last_error(), "'t.q8_0'") != NULL, "%s", lp_last_error());
    FRESH(), put64(c.p + ti_offset(b, "t.q8_0"), 1ull << 40);
    expect_bad(c, LP_ERR_FORMAT, "extends past the end", "offset past EOF");
    FRESH(), put64(c.p + ti_offset(b, "t.q8_0"), UINT64_MAX - 63);
    expect_bad(c, LP_ERR_FORMAT, "extends past the end", "offset near 2^64");
    memcpy(&off, b.p + ti_offset(b, "t.q4_0"), 8);
    FRESH(), put64(c.p + ti_offset(b, "t.q4_1"), off);
    expect_bad(c, LP_ERR_FORMAT, "overlap", "overlapping tensors");
    cr_expect(strstr(lp_last_error(), "'t.q4_0'") && strstr(lp_last_error(), "'t.q4_1'"), "%s", lp_last_error());
    FRESH(), memcpy(c.p + after_str(b, "t.q4_1") - 1, "0", 1);
    expect_bad(c, LP_ERR_FORMAT, "duplicate tensor name 't.q4_0'", "duplicate tensor name");
    FRESH(), c.p[after_str(b, "t.q4_1") - 2] = 0;
    expect_bad(c, LP_ERR_FORMAT, "NUL", "NUL in a tensor name");
    /* a name with a newline and a quote, in an error: escaped, one line */
    FRESH(), memcpy(c.p + after_str(b, "t.q8_0") - 6, "\n'", 2), put32(c.p + ti_type(b, "t.q8_0"), 99);
    expect_bad(c, LP_ERR_FORMAT, "tensor '\\x0a\\x27q8_0'", "control bytes in a name");
    /* a known type loupe cannot dequantize (IQ4_NL has Q4_0's block size): opens; refused at use */
    FRESH(), put32(c.p + ti_type(b, "t.q4_0"), 20);
    cr_assert_eq(open_bytes(c.p, c.n, &g), LP_OK, "%s", lp_last_error());
    const lp_gguf_tensor *t = lp_gguf_find_tensor(g, "t.q4_0");
    cr_expect(t->type == 20 && !lp_ggml_supported(t->type) && t->n_bytes == 3 * 18);
    float y[96];
    expect_err(lp_dequant(cpu(), y, LP_F32, t->data, t->type, t->n_elems), LP_ERR_ARG, "IQ4_NL");
    lp_gguf_close(g);
    free(b.p), free(c.p);
}

/* Every truncation of small.gguf fails, except those that only drop the padding after the
 * last tensor's data. */
Test(gguf_corrupt, every_truncation) {
    buf b = small_bytes();
    lp_gguf *g;
    OK(open_bytes(b.p, b.n, &g));
    /* the data section starts at the first multiple of 64 after the last tensor info */
    const size_t data0 = (ti_offset(b, "t.4d") + 8 + 63) / 64 * 64;
    size_t end = 0;
    for (int i = 0; i < lp_gguf_n_tensors(g); i++) {
        const lp_gguf_tensor *t = lp_gguf_tensor_at(g, i);
        if (data0 + t->offset + t->n_bytes > end) end = data0 + (size_t)t->offset + t->n_bytes;
    }
    lp_gguf_close(g);
    cr_assert(end < b.n, "small.gguf has padding after its last tensor");
    size_t failed = 0;
    for (size_t n = 0; n < b.n; n++) {
        lp_status st = open_bytes(b.p, n, &g);
        if (n < end) {
            if (st == LP_OK) {
                cr_expect_fail("truncated to %zu of %zu bytes (data ends at %zu) but opened", n, b.n, end);
                lp_gguf_close(g);
                continue;
            }
            failed++;
            cr_expect_eq(st, LP_ERR_FORMAT, "truncated to %zu: %s", n, lp_last_error());
            cr_expect(strstr(lp_last_error(), "bad.gguf") != NULL, "%s", lp_last_error());
            cr_expect(strstr(lp_last_error(), "truncated") || strstr(lp_last_error(), "past the end") ||
                          strstr(lp_last_error(), "not a GGUF file"), "truncated to %zu: %s", n, lp_last_error());
        } else {
            cr_expect_eq(st, LP_OK, "truncated to %zu (only padding lost): %s", n, lp_last_error());
            if (st == LP_OK) lp_gguf_close(g);
        }
    }
    fprintf(stderr, "  every truncation: %zu of %zu lengths refused, data ends at %zu\n", failed, b.n, end);
    free(b.p);
}

Test(gguf_corrupt, not_a_file) {
    lp_gguf *g = (lp_gguf *)1;
    expect_err(lp_gguf_open("/nonexistent/model.gguf", &g), LP_ERR_IO, "/nonexistent/model.gguf: cannot open");
    cr_expect(g == NULL);
    expect_err(lp_gguf_open(dir, &g), LP_ERR_IO, "not a regular file");
}
