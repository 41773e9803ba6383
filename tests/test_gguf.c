/* test_gguf.c: the GGUF reader and the CPU dequantizers.
 *
 * - Dequantization against gguf-py (tests/gen/gen_gguf_fixture.py, and gen_q5_0_fixture.py
 *   for Q5_0, wrote random blocks of every supported type and gguf-py's dequantized
 *   values): F32 output must be bit-exact (same fp32 operations in the same order), and
 *   so must F16 and BF16 output against numpy's and gguf-py's round-to-nearest-even of
 *   those values.
 * - small.gguf (written by gguf.GGUFWriter): every metadata value type through the
 *   getters, the getters' errors, tensor shapes, offsets and values.
 * - Corrupt copies of small.gguf: test_gguf_corrupt.c.
 * - The real SmolLM2 GGUF when models/ has it (`make model`): counts, metadata and the
 *   first rows of two quantized tensors against gguf-py. */
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/gguf.h"
#include "loupe/safetensors.h"
#include "gguf_test.h"
#include "testutil.h"

#define GGUF_DIR LP_FIXTURES "/gguf"
#define MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"

static const char *SUPPORTED[] = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K"};
static const int SUPPORTED_ID[] = {LP_GGML_F32, LP_GGML_F16, LP_GGML_BF16, LP_GGML_Q8_0, LP_GGML_Q4_0,
                                   LP_GGML_Q4_1, LP_GGML_Q5_0, LP_GGML_Q4_K, LP_GGML_Q5_K, LP_GGML_Q6_K};
#define N_SUPPORTED 10

/* The gguf-py blocks of every supported type: quant_blocks.safetensors, and Q5_0 (added
 * later) in a file of its own with the same layout. */
typedef struct {
    lp_st_file all, q5_0;
} quant_fixtures;

static void open_quant_fixtures(quant_fixtures *q) {
    OK(lp_st_open(&q->all, GGUF_DIR "/quant_blocks.safetensors"));
    OK(lp_st_open(&q->q5_0, GGUF_DIR "/quant_blocks_q5_0.safetensors"));
}

static const lp_st_file *quant_fixture_of(const quant_fixtures *q, int type) {
    return type == LP_GGML_Q5_0 ? &q->q5_0 : &q->all;
}

static void close_quant_fixtures(quant_fixtures *q) {
    lp_st_close(&q->all);
    lp_st_close(&q->q5_0);
}

static const lp_st_tensor *st_get(const lp_st_file *f, const char *fmt, const char *arg) {
    char name[128];
    snprintf(name, sizeof name, fmt, arg);
    const lp_st_tensor *t = lp_st_find(f, name);
    cr_assert(t != NULL, "%s: no tensor '%s'", f->path, name);
    return t;
}

/* Number of positions where two arrays of 2- or 4-byte values differ bitwise; reports the first. */
static size_t bit_diffs(const char *what, const void *got, const void *want, size_t n, size_t w) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (memcmp((const char *)got + i * w, (const char *)want + i * w, w) != 0) {
            if (!bad) {
                uint32_t g = 0, e = 0;
                memcpy(&g, (const char *)got + i * w, w);
                memcpy(&e, (const char *)want + i * w, w);
                fprintf(stderr, "  %s: first difference at %zu: got 0x%x, want 0x%x\n", what, i, g, e);
            }
            bad++;
        }
    return bad;
}

/* ---- the type table ---- */

Test(gguf, type_table) {
    cr_expect_str_eq(lp_ggml_type_name(LP_GGML_Q4_K), "Q4_K");
    cr_expect_str_eq(lp_ggml_type_name(16), "IQ2_XXS");
    cr_expect_str_eq(lp_ggml_type_name(99), "type 99");
    cr_expect_str_eq(lp_ggml_type_name(-1), "type -1");
    cr_expect_str_eq(lp_ggml_type_name(4), "type 4"); /* the removed Q4_2 */
    for (int i = 0; i < N_SUPPORTED; i++) {
        cr_expect(lp_ggml_supported(SUPPORTED_ID[i]), "%s", SUPPORTED[i]);
        cr_expect_str_eq(lp_ggml_type_name(SUPPORTED_ID[i]), SUPPORTED[i]);
    }
    cr_expect(!lp_ggml_supported(LP_GGML_Q5_1) && !lp_ggml_supported(16) && !lp_ggml_supported(99));
    static const struct { int type, blk; size_t bytes; } sizes[] = {
        {LP_GGML_F32, 1, 4}, {LP_GGML_F16, 1, 2}, {LP_GGML_BF16, 1, 2}, {LP_GGML_Q8_0, 32, 34},
        {LP_GGML_Q4_0, 32, 18}, {LP_GGML_Q4_1, 32, 20}, {LP_GGML_Q5_0, 32, 22}, {LP_GGML_Q5_1, 32, 24},
        {LP_GGML_Q4_K, 256, 144},
        {LP_GGML_Q5_K, 256, 176}, {LP_GGML_Q6_K, 256, 210}, {LP_GGML_Q2_K, 256, 84}, {16, 256, 66},
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        cr_expect_eq(lp_ggml_block_elems(sizes[i].type), sizes[i].blk, "%s", lp_ggml_type_name(sizes[i].type));
        cr_expect_eq(lp_ggml_block_bytes(sizes[i].type), sizes[i].bytes, "%s", lp_ggml_type_name(sizes[i].type));
        cr_expect_eq(lp_ggml_bytes(sizes[i].type, 3 * sizes[i].blk), 3 * sizes[i].bytes);
    }
    cr_expect_eq(lp_ggml_block_elems(99), 0);
    cr_expect_eq(lp_ggml_block_bytes(99), 0);
    cr_expect_eq(lp_ggml_bytes(99, 32), 0);
    cr_expect_eq(lp_ggml_bytes(LP_GGML_Q8_0, 33), 0, "not a whole block");
    cr_expect_eq(lp_ggml_bytes(LP_GGML_Q8_0, -32), 0);
    cr_expect_eq(lp_ggml_bytes(28 /* F64 */, INT64_MAX), 0, "overflow");
    cr_expect_eq(lp_ggml_bytes(LP_GGML_F32, 0), 0);
}

/* ---- dequantization against gguf-py ---- */

Test(gguf, dequant_matches_gguf_py) {
    quant_fixtures q;
    open_quant_fixtures(&q);
    for (int i = 0; i < N_SUPPORTED; i++) {
        const lp_st_file *f = quant_fixture_of(&q, SUPPORTED_ID[i]);
        const lp_st_tensor *raw = st_get(f, "%s.raw", SUPPORTED[i]);
        const lp_st_tensor *f32 = st_get(f, "%s.f32", SUPPORTED[i]);
        const lp_st_tensor *f16 = st_get(f, "%s.f16", SUPPORTED[i]);
        const lp_st_tensor *bf16 = st_get(f, "%s.bf16", SUPPORTED[i]);
        const int64_t n = f32->shape[0];
        cr_assert_eq(lp_ggml_bytes(SUPPORTED_ID[i], n), raw->nbytes, "%s", SUPPORTED[i]);
        float *y = malloc(n * sizeof *y);
        uint16_t *h = malloc(n * sizeof *h);
        char what[64];

        OK(lp_dequant(cpu(), y, LP_F32, raw->data, SUPPORTED_ID[i], n));
        snprintf(what, sizeof what, "dequant %s -> F32 vs gguf-py", SUPPORTED[i]);
        LP_EXPECT_WITHIN(what, 0, lp_compare_f(y, f32->data, n), max_abs, 0);
        cr_expect_eq(bit_diffs(what, y, f32->data, n, 4), 0, "%s: not bit-exact", what);

        OK(lp_dequant(cpu(), h, LP_F16, raw->data, SUPPORTED_ID[i], n));
        snprintf(what, sizeof what, "dequant %s -> F16 vs numpy", SUPPORTED[i]);
        cr_expect_eq(bit_diffs(what, h, f16->data, n, 2), 0, "%s: not bit-exact", what);

        OK(lp_dequant(cpu(), h, LP_BF16, raw->data, SUPPORTED_ID[i], n));
        snprintf(what, sizeof what, "dequant %s -> BF16 vs gguf-py", SUPPORTED[i]);
        cr_expect_eq(bit_diffs(what, h, bf16->data, n, 2), 0, "%s: not bit-exact", what);
        free(y);
        free(h);
    }
    close_quant_fixtures(&q);
}

/* F16 and BF16 output go through fp32 in chunks: a tensor longer than a chunk, of each
 * type, tiled from the fixture blocks, must match the tiled expected values. */
Test(gguf, dequant_long_tensor_in_chunks) {
    quant_fixtures q;
    open_quant_fixtures(&q);
    const int reps = 41;
    for (int i = 0; i < N_SUPPORTED; i++) {
        const lp_st_file *f = quant_fixture_of(&q, SUPPORTED_ID[i]);
        const lp_st_tensor *raw = st_get(f, "%s.raw", SUPPORTED[i]);
        const lp_st_tensor *f16 = st_get(f, "%s.f16", SUPPORTED[i]);
        const lp_st_tensor *bf16 = st_get(f, "%s.bf16", SUPPORTED[i]);
        const int64_t n0 = f16->shape[0], n = n0 * reps;
        uint8_t *src = malloc(raw->nbytes * reps);
        uint16_t *want16 = malloc(n * 2), *wantb = malloc(n * 2), *h = malloc(n * 2);
        for (int r = 0; r < reps; r++) {
            memcpy(src + r * raw->nbytes, raw->data, raw->nbytes);
            memcpy(want16 + r * n0, f16->data, n0 * 2);
            memcpy(wantb + r * n0, bf16->data, n0 * 2);
        }
        char what[64];
        OK(lp_dequant(cpu(), h, LP_F16, src, SUPPORTED_ID[i], n));
        snprintf(what, sizeof what, "%s x%d -> F16", SUPPORTED[i], reps);
        cr_expect_eq(bit_diffs(what, h, want16, n, 2), 0, "%s", what);
        OK(lp_dequant(cpu(), h, LP_BF16, src, SUPPORTED_ID[i], n));
        snprintf(what, sizeof what, "%s x%d -> BF16", SUPPORTED[i], reps);
        cr_expect_eq(bit_diffs(what, h, wantb, n, 2), 0, "%s", what);
        free(src), free(want16), free(wantb), free(h);
    }
    close_quant_fixtures(&q);
}

Test(gguf, dequant_bad_arguments) {
    float y[256];
    uint8_t x[512] = {0};
    cr_expect_eq(lp_dequant(cpu(), y, LP_F32, x, 16, 256), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "IQ2_XXS") && strstr(lp_last_error(), LP_GGML_SUPPORTED_LIST), "%s",
              lp_last_error());
    cr_expect_eq(lp_dequant(cpu(), y, LP_F32, x, 99, 32), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "type 99") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_dequant(cpu(), y, LP_F32, x, LP_GGML_Q8_0, 33), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "Q8_0") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_dequant(cpu(), y, LP_F32, x, LP_GGML_Q4_K, -256), LP_ERR_ARG);
    cr_expect_eq(lp_dequant(cpu(), y, LP_I32, x, LP_GGML_Q8_0, 32), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "I32") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_dequant(cpu(), NULL, LP_F32, x, LP_GGML_Q8_0, 32), LP_ERR_ARG);
    cr_expect_eq(lp_dequant(NULL, y, LP_F32, x, LP_GGML_Q8_0, 32), LP_ERR_ARG);
    OK(lp_dequant(cpu(), NULL, LP_F32, NULL, LP_GGML_Q8_0, 0));
}

/* ---- small.gguf ---- */

static lp_gguf *open_small(void) {
    lp_gguf *g;
    OK(lp_gguf_open(GGUF_DIR "/small.gguf", &g));
    return g;
}

#define EXPECT_INT(g, key, want)                                                            \
    do {                                                                                    \
        int64_t v_ = 0;                                                                     \
        OK(lp_gguf_get_int(g, key, &v_));                                                   \
        cr_expect_eq(v_, (int64_t)(want), "%s: %lld", key, (long long)v_);                  \
    } while (0)

Test(gguf, small_metadata) {
    lp_gguf *g = open_small();
    cr_expect_eq(lp_gguf_version(g), 3);
    cr_expect_str_eq(lp_gguf_path(g), GGUF_DIR "/small.gguf");
    cr_expect_eq(lp_gguf_n_kv(g), 21, "19 test keys + general.architecture + general.alignment");
    EXPECT_INT(g, "test.u8", 200);
    EXPECT_INT(g, "test.i8", -100);
    EXPECT_INT(g, "test.u16", 60000);
    EXPECT_INT(g, "test.i16", -30000);
    EXPECT_INT(g, "test.u32", 4000000000u);
    EXPECT_INT(g, "test.i32", -2000000000);
    EXPECT_INT(g, "test.u64", 123456789012ll);
    EXPECT_INT(g, "test.i64", -(1ll << 40));
    EXPECT_INT(g, "test.bool", 1);
    EXPECT_INT(g, "test.bool_false", 0);
    EXPECT_INT(g, "general.alignment", 64);
    double d;
    OK(lp_gguf_get_float(g, "test.f32", &d));
    cr_expect_eq(d, 1.5);
    OK(lp_gguf_get_float(g, "test.f64", &d));
    cr_expect_eq(d, 3.141592653589793);
    OK(lp_gguf_get_float(g, "test.i16", &d));
    cr_expect_eq(d, -30000.0);
    OK(lp_gguf_get_float(g, "test.u64_huge", &d));
    cr_expect_eq(d, 9223372036854775813.0);
    const char *s;
    size_t len;
    OK(lp_gguf_get_str(g, "test.string", &s, &len));
    cr_expect(len == 13 && memcmp(s, "h\xc3\xa9llo w\xc3\xb6rld", 13) == 0, "%.*s", (int)len, s);
    OK(lp_gguf_get_str(g, "general.architecture", &s, &len));
    cr_expect(len == 5 && memcmp(s, "llama", 5) == 0);

    lp_gguf_vtype et;
    uint64_t n;
    int64_t v;
    OK(lp_gguf_get_arr(g, "test.arr_i32", &et, &n));
    cr_expect(et == LP_GGUF_I32 && n == 3);
    static const int64_t ints[] = {1, -2, 3};
    for (uint64_t i = 0; i < n; i++) {
        OK(lp_gguf_arr_int(g, "test.arr_i32", i, &v));
        cr_expect_eq(v, ints[i]);
        OK(lp_gguf_arr_float(g, "test.arr_i32", i, &d));
        cr_expect_eq(d, (double)ints[i]);
    }
    OK(lp_gguf_get_arr(g, "test.arr_f32", &et, &n));
    cr_expect(et == LP_GGUF_F32 && n == 2);
    OK(lp_gguf_arr_float(g, "test.arr_f32", 1, &d));
    cr_expect_eq(d, -1.25);
    OK(lp_gguf_get_arr(g, "test.arr_bool", &et, &n));
    cr_expect(et == LP_GGUF_BOOL && n == 3);
    OK(lp_gguf_arr_int(g, "test.arr_bool", 1, &v));
    cr_expect_eq(v, 0);
    OK(lp_gguf_arr_int(g, "test.arr_bool", 2, &v));
    cr_expect_eq(v, 1);
    OK(lp_gguf_get_arr(g, "test.arr_u8", &et, &n));
    cr_expect(et == LP_GGUF_U8 && n == 2);
    OK(lp_gguf_arr_int(g, "test.arr_u8", 1, &v));
    cr_expect_eq(v, 255);
    OK(lp_gguf_get_arr(g, "test.arr_str", &et, &n));
    cr_expect(et == LP_GGUF_STRING && n == 4);
    static const char *strs[] = {"a", "", "ccc", ("\xc3\xbcn\xc3\xaf" "code")};
    for (int i = 3; i >= 0; i--) { /* any order: O(1) access */
        OK(lp_gguf_arr_str(g, "test.arr_str", (uint64_t)i, &s, &len));
        cr_expect(len == strlen(strs[i]) && memcmp(s, strs[i], len) == 0, "element %d: '%.*s'", i, (int)len, s);
    }
    /* every key is listed once */
    int seen = 0;
    for (int i = 0; i < lp_gguf_n_kv(g); i++) {
        const char *k = lp_gguf_key_at(g, i);
        cr_assert(k != NULL);
        cr_expect(lp_gguf_has(g, k), "%s", k);
        seen += strncmp(k, "test.", 5) == 0;
    }
    cr_expect_eq(seen, 19);
    cr_expect(lp_gguf_key_at(g, -1) == NULL && lp_gguf_key_at(g, lp_gguf_n_kv(g)) == NULL);
    cr_expect(!lp_gguf_has(g, "test.nope"));
    lp_gguf_close(g);
}

Test(gguf, small_getter_errors) {
    lp_gguf *g = open_small();
    int64_t v;
    double d;
    const char *s;
    size_t len;
    lp_gguf_vtype et;
    uint64_t n;
    expect_err(lp_gguf_get_int(g, "test.nope", &v), LP_ERR_NOT_FOUND, "'test.nope'");
    cr_expect(strstr(lp_last_error(), "small.gguf") != NULL, "%s", lp_last_error());
    expect_err(lp_gguf_get_int(g, "test.f32", &v), LP_ERR_FORMAT, "'test.f32' is f32");
    cr_expect(strstr(lp_last_error(), "small.gguf") != NULL, "%s", lp_last_error());
    expect_err(lp_gguf_get_int(g, "test.string", &v), LP_ERR_FORMAT, "is string");
    expect_err(lp_gguf_get_int(g, "test.u64_huge", &v), LP_ERR_FORMAT, "does not fit");
    expect_err(lp_gguf_get_float(g, "test.string", &d), LP_ERR_FORMAT, "'test.string'");
    expect_err(lp_gguf_get_float(g, "test.arr_f32", &d), LP_ERR_FORMAT, "is array");
    expect_err(lp_gguf_get_str(g, "test.u8", &s, &len), LP_ERR_FORMAT, "is u8");
    expect_err(lp_gguf_get_str(g, "nope", &s, &len), LP_ERR_NOT_FOUND, "'nope'");
    expect_err(lp_gguf_get_arr(g, "test.string", &et, &n), LP_ERR_FORMAT, "expected an array");
    expect_err(lp_gguf_arr_int(g, "test.arr_i32", 3, &v), LP_ERR_ARG, "out of range");
    expect_err(lp_gguf_arr_str(g, "test.arr_str", 4, &s, &len), LP_ERR_ARG, "out of range");
    expect_err(lp_gguf_arr_str(g, "test.arr_i32", 0, &s, &len), LP_ERR_FORMAT, "array of i32");
    expect_err(lp_gguf_arr_int(g, "test.arr_f32", 0, &v), LP_ERR_FORMAT, "array of f32");
    expect_err(lp_gguf_arr_float(g, "test.arr_str", 0, &d), LP_ERR_FORMAT, "array of string");
    expect_err(lp_gguf_arr_int(g, "test.u8", 0, &v), LP_ERR_FORMAT, "expected an array");
    expect_err(lp_gguf_arr_int(g, "absent", 0, &v), LP_ERR_NOT_FOUND, "'absent'");
    lp_gguf_close(g);
}

Test(gguf, small_tensors) {
    static const struct {
        const char *name;
        int type, n_dims;
        int64_t ne[4];
    } want[] = {
        {"t.f32", LP_GGML_F32, 2, {5, 3, 1, 1}},    {"t.f16", LP_GGML_F16, 2, {8, 2, 1, 1}},
        {"t.bf16", LP_GGML_BF16, 2, {16, 4, 1, 1}}, {"t.q8_0", LP_GGML_Q8_0, 2, {64, 2, 1, 1}},
        {"t.q4_0", LP_GGML_Q4_0, 2, {32, 3, 1, 1}}, {"t.q4_1", LP_GGML_Q4_1, 2, {96, 1, 1, 1}},
        {"t.q4_k", LP_GGML_Q4_K, 2, {256, 2, 1, 1}}, {"t.q5_k", LP_GGML_Q5_K, 2, {256, 1, 1, 1}},
        {"t.q6_k", LP_GGML_Q6_K, 2, {512, 1, 1, 1}}, {"t.q5_0", LP_GGML_Q5_0, 2, {32, 1, 1, 1}},
        {"t.4d", LP_GGML_F32, 4, {2, 3, 1, 2}},
    };
    const int n_want = sizeof want / sizeof want[0];
    lp_gguf *g = open_small();
    lp_st_file ref;
    OK(lp_st_open(&ref, GGUF_DIR "/small_expected.safetensors"));
    cr_assert_eq(lp_gguf_n_tensors(g), n_want);
    for (int i = 0; i < n_want; i++) {
        const lp_gguf_tensor *t = lp_gguf_tensor_at(g, i);
        cr_assert(t != NULL);
        cr_expect_str_eq(t->name, want[i].name);
        cr_expect(lp_gguf_find_tensor(g, want[i].name) == t, "%s", want[i].name);
        cr_expect_eq(t->type, want[i].type, "%s", t->name);
        cr_expect_eq(t->n_dims, want[i].n_dims, "%s", t->name);
        for (int d = 0; d < 4; d++) cr_expect_eq(t->ne[d], want[i].ne[d], "%s ne[%d]", t->name, d);
        cr_expect_eq(t->n_elems, want[i].ne[0] * want[i].ne[1] * want[i].ne[2] * want[i].ne[3]);
        cr_expect_eq(t->n_bytes, lp_ggml_bytes(t->type, t->n_elems), "%s", t->name);
        cr_expect_eq(t->offset % 64, 0, "%s offset %llu", t->name, (unsigned long long)t->offset);
        cr_expect_eq((uintptr_t)t->data % 64, 0, "%s data not 64-byte aligned in memory", t->name);
        const lp_st_tensor *e = lp_st_find(&ref, t->name);
        cr_assert(e != NULL && e->shape[0] == t->n_elems, "%s", t->name);
        cr_assert(lp_ggml_supported(t->type), "%s", t->name);
        float *y = malloc(t->n_elems * sizeof *y);
        OK(lp_dequant(cpu(), y, LP_F32, t->data, t->type, t->n_elems));
        char what[64];
        snprintf(what, sizeof what, "small.gguf %s vs gguf-py", t->name);
        cr_expect_eq(bit_diffs(what, y, e->data, t->n_elems, 4), 0, "%s", what);
        free(y);
    }
    cr_expect(lp_gguf_tensor_at(g, -1) == NULL && lp_gguf_tensor_at(g, n_want) == NULL);
    cr_expect(lp_gguf_find_tensor(g, "t.nope") == NULL && lp_gguf_find_tensor(g, "") == NULL);
    lp_st_close(&ref);
    lp_gguf_close(g);
}

/* ---- the real model ---- */

Test(gguf, smollm2) {
    if (access(MODEL, R_OK) != 0) cr_skip_test("%s is absent (make model fetches it)", MODEL);
    lp_gguf *g;
    OK(lp_gguf_open(MODEL, &g));
    cr_expect_eq(lp_gguf_version(g), 3);
    cr_assert_eq(lp_gguf_n_tensors(g), 272);
    cr_expect_eq(lp_gguf_n_kv(g), 33);
    int count[64] = {0};
    for (int i = 0; i < 272; i++) {
        const lp_gguf_tensor *t = lp_gguf_tensor_at(g, i);
        cr_assert(t->type >= 0 && t->type < 64);
        count[t->type]++;
        cr_expect(lp_ggml_supported(t->type), "%s: %s", t->name, lp_ggml_type_name(t->type));
    }
    cr_expect_eq(count[LP_GGML_Q4_1], 210);
    cr_expect_eq(count[LP_GGML_F32], 61);
    cr_expect_eq(count[LP_GGML_Q8_0], 1);
    EXPECT_INT(g, "llama.block_count", 30);
    EXPECT_INT(g, "llama.embedding_length", 576);
    EXPECT_INT(g, "llama.attention.head_count", 9);
    EXPECT_INT(g, "llama.attention.head_count_kv", 3);
    EXPECT_INT(g, "tokenizer.ggml.eos_token_id", 2);
    double d;
    OK(lp_gguf_get_float(g, "llama.rope.freq_base", &d));
    cr_expect_eq(d, 100000.0);
    const char *s;
    size_t len;
    OK(lp_gguf_get_str(g, "tokenizer.ggml.model", &s, &len));
    cr_expect(len == 4 && memcmp(s, "gpt2", 4) == 0);
    lp_gguf_vtype et;
    uint64_t n;
    OK(lp_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n));
    cr_expect(et == LP_GGUF_STRING && n == 49152);
    static const struct { uint64_t i; const char *s; } toks[] = {
        {49151, "ectable"}, {0, "<|endoftext|>"}, {100, "t"}, {2, "<|im_end|>"}};
    for (int i = 0; i < 4; i++) {
        OK(lp_gguf_arr_str(g, "tokenizer.ggml.tokens", toks[i].i, &s, &len));
        cr_expect(len == strlen(toks[i].s) && memcmp(s, toks[i].s, len) == 0, "token %llu: '%.*s'",
                  (unsigned long long)toks[i].i, (int)len, s);
    }
    OK(lp_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n));
    cr_expect_eq(n, 48900);
    OK(lp_gguf_arr_str(g, "tokenizer.ggml.merges", 48899, &s, &len));
    cr_expect(len == 8 && memcmp(s, "ect able", 8) == 0, "last merge '%.*s'", (int)len, s);
    int64_t v;
    OK(lp_gguf_arr_int(g, "tokenizer.ggml.token_type", 0, &v));
    cr_expect_eq(v, 3);

    const lp_gguf_tensor *te = lp_gguf_find_tensor(g, "token_embd.weight");
    cr_assert(te && te->type == LP_GGML_Q8_0 && te->ne[0] == 576 && te->ne[1] == 49152);
    lp_st_file ref;
    if (lp_st_open(&ref, GGUF_DIR "/smollm2_expected.safetensors") != LP_OK) {
        lp_gguf_close(g);
        cr_assert_fail("%s", lp_last_error());
    }
    static const struct { const char *tensor, *expected; } rows[] = {
        {"token_embd.weight", "token_embd.weight.row0"},
        {"blk.0.ffn_down.weight", "blk.0.ffn_down.weight.row0"},
        {"blk.0.attn_norm.weight", "blk.0.attn_norm.weight"},
    };
    for (int i = 0; i < 3; i++) {
        const lp_gguf_tensor *t = lp_gguf_find_tensor(g, rows[i].tensor);
        const lp_st_tensor *e = lp_st_find(&ref, rows[i].expected);
        cr_assert(t && e && e->shape[0] == t->ne[0], "%s", rows[i].tensor);
        float *y = malloc(t->ne[0] * sizeof *y);
        OK(lp_dequant(cpu(), y, LP_F32, t->data, t->type, t->ne[0]));
        char what[96];
        snprintf(what, sizeof what, "SmolLM2 %s row 0 vs gguf-py", rows[i].tensor);
        LP_EXPECT_WITHIN(what, 0, lp_compare_f(y, e->data, t->ne[0]), max_abs, 0);
        cr_expect_eq(bit_diffs(what, y, e->data, t->ne[0], 4), 0, "%s", what);
        free(y);
    }
    lp_st_close(&ref);
    lp_gguf_close(g);
}

Test(gguf, open_memory) {
    size_t n;
    uint8_t *p = (uint8_t *)lp_read_file(GGUF_DIR "/small.gguf", &n);
    cr_assert(p != NULL);
    lp_gguf *g;
    OK(lp_gguf_open_memory(p, n, "mem.gguf", &g));
    cr_expect_str_eq(lp_gguf_path(g), "mem.gguf");
    cr_expect_eq(lp_gguf_n_tensors(g), 11);
    const lp_gguf_tensor *t = lp_gguf_find_tensor(g, "t.q6_k");
    cr_assert(t != NULL);
    cr_expect((const uint8_t *)t->data >= p && (const uint8_t *)t->data + t->n_bytes <= p + n);
    lp_gguf_close(g);
    p[4] = 1;
    expect_err(lp_gguf_open_memory(p, n, "mem.gguf", &g), LP_ERR_FORMAT, "mem.gguf: GGUF version 1");
    expect_err(lp_gguf_open_memory(NULL, 0, "empty.gguf", &g), LP_ERR_FORMAT, "empty.gguf: not a GGUF file");
    free(p);
}
