/* test_io.c: the readers refuse bad input with one line naming the file and the
 * problem: safetensors headers that lie, token files that are empty or malformed,
 * checkpoints whose tensors disagree with config.json, unknown config keys. */
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/config.h"
#include "loupe/model.h"
#include "loupe/safetensors.h"
#include "loupe/tokens.h"
#include "testutil.h"

static char dir[64];
static void mkdir_tmp(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-io-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}
static void rm_tmp(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}
TestSuite(io, .init = mkdir_tmp, .fini = rm_tmp);

static char *path_in(const char *name) {
    static char p[256];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return p;
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    cr_assert(f != NULL);
    cr_assert_eq(fwrite(data, 1, n, f), n);
    fclose(f);
}

/* A safetensors file with the given JSON header and `data` zero bytes of payload. */
static void write_st(const char *path, const char *json, size_t data) {
    size_t h = strlen(json);
    unsigned char *buf = calloc(8 + h + data + 1, 1);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)h >> (8 * i));
    memcpy(buf + 8, json, h);
    write_bytes(path, buf, 8 + h + data);
    free(buf);
}

static void expect_st_error(const char *json, size_t data, lp_status want, const char *phrase) {
    lp_st_file f;
    write_st(path_in("bad.safetensors"), json, data);
    lp_status st = lp_st_open(&f, path_in("bad.safetensors"));
    cr_expect_eq(st, want, "header %s: status %d, message: %s", json, st, lp_last_error());
    cr_expect(strstr(lp_last_error(), "bad.safetensors") != NULL, "message does not name the file: %s", lp_last_error());
    cr_expect(strstr(lp_last_error(), phrase) != NULL, "message '%s' lacks '%s'", lp_last_error(), phrase);
    cr_expect(strchr(lp_last_error(), '\n') == NULL);
}

Test(io, safetensors_round_trip) {
    float a[6] = {1, 2, 3, 4, 5, 6};
    int32_t b[2] = {7, -8};
    lp_st_spec specs[2] = {{"a", LP_F32, 2, {2, 3}}, {"b.c", LP_I32, 1, {2}}};
    const void *datas[2] = {a, b};
    const char *md[] = {"format", "pt", NULL};
    cr_assert_eq(lp_st_write(path_in("ok.safetensors"), specs, datas, 2, md), LP_OK, "%s", lp_last_error());
    cr_expect(access(path_in("ok.safetensors.tmp"), F_OK) != 0, "temporary file left behind");
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, path_in("ok.safetensors")), LP_OK, "%s", lp_last_error());
    cr_assert_eq(f.n, 2);
    const lp_st_tensor *t = lp_st_find(&f, "a");
    cr_assert(t && t->dtype == LP_F32 && t->ndim == 2 && t->shape[1] == 3);
    cr_expect(memcmp(t->data, a, sizeof a) == 0);
    cr_expect(((uintptr_t)t->data - (uintptr_t)f.map) % 8 == 0, "data section not 8-byte aligned");
    t = lp_st_find(&f, "b.c");
    cr_assert(t && memcmp(t->data, b, sizeof b) == 0);
    lp_st_close(&f);
}

Test(io, safetensors_bad_headers) {
    expect_st_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, LP_ERR_FORMAT, "truncated");
    expect_st_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, LP_ERR_FORMAT, "need 12");
    expect_st_error("{\"a\":{\"dtype\":\"Q9\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, LP_ERR_FORMAT, "unknown dtype 'Q9'");
    expect_st_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                    "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, LP_ERR_FORMAT, "overlap");
    expect_st_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, LP_ERR_FORMAT, "data_offsets");
    expect_st_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, LP_ERR_FORMAT, "shape");
    expect_st_error("{\"a\": [1, 2", 8, LP_ERR_FORMAT, "JSON");
    expect_st_error("{\"a\":{\"dtype\":\"F32\"}}", 8, LP_ERR_FORMAT, "needs dtype, shape and data_offsets");
    /* found by fuzzing: numbers past the integer range (casting them was undefined) and a
     * zero-element shape whose element count overflows */
    expect_st_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,18446744073709551616]}}", 8, LP_ERR_FORMAT, "data_offsets");
    expect_st_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[1e999],\"data_offsets\":[0,8]}}", 8, LP_ERR_FORMAT, "shape");
    expect_st_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4,0],\"data_offsets\":[0,0]}}", 8, LP_ERR_FORMAT, "shape");
    /* a header length pointing past the end of the file */
    unsigned char lie[16] = {0xff, 0xff, 0, 0, 0, 0, 0, 0, '{', '}'};
    write_bytes(path_in("bad.safetensors"), lie, 10);
    lp_st_file f;
    cr_expect_eq(lp_st_open(&f, path_in("bad.safetensors")), LP_ERR_FORMAT);
    cr_expect(strstr(lp_last_error(), "truncated") != NULL, "%s", lp_last_error());
    write_bytes(path_in("bad.safetensors"), lie, 3);
    cr_expect_eq(lp_st_open(&f, path_in("bad.safetensors")), LP_ERR_FORMAT);
    cr_expect_eq(lp_st_open(&f, path_in("missing.safetensors")), LP_ERR_IO);
}

/* Copies the fixture checkpoint with one tensor altered by `edit` (a Python-free rewrite). */
static void write_model(const char *drop, const char *reshape, const char *retype) {
    char src[256];
    snprintf(src, sizeof src, "%s/gpt2-tiny/model.safetensors", LP_FIXTURES);
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, src), LP_OK);
    lp_st_spec *specs = calloc(f.n, sizeof *specs);
    const void **datas = calloc(f.n, sizeof *datas);
    int n = 0;
    for (int i = 0; i < f.n; i++) {
        const lp_st_tensor *t = &f.tensors[i];
        if (drop && strcmp(t->name, drop) == 0) continue;
        specs[n] = (lp_st_spec){.name = t->name, .dtype = t->dtype, .ndim = t->ndim};
        memcpy(specs[n].shape, t->shape, sizeof t->shape);
        if (reshape && strcmp(t->name, reshape) == 0) { /* same bytes, shape [D*?] flattened */
            specs[n].ndim = 1;
            specs[n].shape[0] = lp_shape_numel(t->shape, t->ndim);
        }
        if (retype && strcmp(t->name, retype) == 0) { /* same bytes reinterpreted as I32 */
            specs[n].dtype = LP_I32;
        }
        datas[n++] = t->data;
    }
    char dst[256];
    snprintf(dst, sizeof dst, "%s/config.json", dir);
    char cfg[600];
    snprintf(cfg, sizeof cfg, "cp %s/gpt2-tiny/config.json %s", LP_FIXTURES, dst);
    cr_assert(system(cfg) == 0);
    cr_assert_eq(lp_st_write(path_in("model.safetensors"), specs, datas, n, NULL), LP_OK);
    free(specs);
    free(datas);
    lp_st_close(&f);
}

static void expect_load_error(lp_status want, const char *phrase) {
    lp_model *m;
    lp_status st = lp_model_load(&m, dir, LP_CPU, LP_F32);
    cr_expect_eq(st, want, "status %d: %s", st, lp_last_error());
    cr_expect(strstr(lp_last_error(), phrase) != NULL, "message '%s' lacks '%s'", lp_last_error(), phrase);
}

Test(io, checkpoint_missing_tensor) {
    write_model("transformer.h.1.mlp.c_fc.bias", NULL, NULL);
    expect_load_error(LP_ERR_NOT_FOUND, "'transformer.h.1.mlp.c_fc.bias' is missing");
}

Test(io, checkpoint_shape_mismatch) {
    write_model(NULL, "transformer.h.0.attn.c_attn.weight", NULL);
    expect_load_error(LP_ERR_SHAPE, "has shape [12288] but the config needs [64, 192]");
}

Test(io, checkpoint_wrong_dtype) {
    write_model(NULL, NULL, "transformer.wpe.weight");
    expect_load_error(LP_ERR_FORMAT, "has dtype I32");
}

Test(io, checkpoint_unsupported_architecture) {
    write_bytes(path_in("config.json"), "{\"model_type\": \"mamba\"}", 23);
    expect_load_error(LP_ERR_FORMAT, "model_type 'mamba' is not supported");
    write_bytes(path_in("config.json"), "{\"model_type\": \"gpt2\", \"n_layer\": 2}", 36);
    expect_load_error(LP_ERR_FORMAT, "\"n_embd\" is missing");
}

static void expect_tokens_error(const char *name, const void *data, size_t n, int ctx, const char *phrase) {
    write_bytes(path_in(name), data, n);
    lp_tokens t;
    lp_status st = lp_tokens_load(&t, path_in(name), ctx, 0, "uint16");
    cr_expect_neq(st, LP_OK, "%s loaded", name);
    cr_expect_eq(lp_status_exit_code(st), 2);
    cr_expect(strstr(lp_last_error(), name) != NULL && strstr(lp_last_error(), phrase) != NULL, "message '%s' lacks '%s'",
              lp_last_error(), phrase);
}

/* A .npy header for the given dict text. */
static size_t npy(unsigned char *buf, const char *dict, const void *data, size_t n) {
    size_t dl = strlen(dict), hl = (dl + 1 + 10 + 63) / 64 * 64 - 10;
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    buf[8] = hl & 0xff, buf[9] = hl >> 8;
    memset(buf + 10, ' ', hl);
    memcpy(buf + 10, dict, dl);
    buf[10 + hl - 1] = '\n';
    memcpy(buf + 10 + hl, data, n);
    return 10 + hl + n;
}

Test(io, token_files) {
    unsigned char buf[512];
    int32_t ids[6] = {1, 2, 3, 4, 5, 6};
    expect_tokens_error("empty.npy", "", 0, 4, "empty file");
    expect_tokens_error("text.npy", "hello world, not numpy", 22, 4, "bad magic");
    size_t n = npy(buf, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }", ids, 24);
    expect_tokens_error("float.npy", buf, n, 4, "is not int32");
    n = npy(buf, "{'descr': '<i4', 'fortran_order': False, 'shape': (60,), }", ids, 24);
    expect_tokens_error("short.npy", buf, n, 4, "truncated");
    n = npy(buf, "{'descr': '<i4', 'fortran_order': False, 'shape': (0,), }", ids, 0);
    expect_tokens_error("none.npy", buf, n, 4, "no tokens");
    n = npy(buf, "{'descr': '<i4', 'fortran_order': True, 'shape': (2, 3), }", ids, 24);
    expect_tokens_error("fortran.npy", buf, n, 4, "Fortran");
    n = npy(buf, "{'descr': '<i4', 'fortran", ids, 0);
    expect_tokens_error("cut.npy", buf, 20, 4, "truncated");
    int32_t neg[2] = {3, -1};
    n = npy(buf, "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }", neg, 8);
    expect_tokens_error("neg.npy", buf, n, 2, "id -1");
    expect_tokens_error("odd.bin", "abc", 3, 1, "whole number");

    /* good: flat int32 cut into rows of 4 (the tail of 2 is dropped), and vocab check */
    n = npy(buf, "{'descr': '<i4', 'fortran_order': False, 'shape': (6,), }", ids, 24);
    write_bytes(path_in("ok.npy"), buf, n);
    lp_tokens t;
    cr_assert_eq(lp_tokens_load(&t, path_in("ok.npy"), 4, 0, NULL), LP_OK, "%s", lp_last_error());
    cr_expect(t.n_seq == 1 && t.ctx == 4 && t.dropped == 2 && t.ids[3] == 4);
    cr_expect_eq(lp_tokens_check(&t, 4, "ok.npy"), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "token id 4 at row 0 position 3") != NULL, "%s", lp_last_error());
    lp_tokens_free(&t);
    /* .bin of uint16 */
    uint16_t u[4] = {9, 8, 7, 6};
    write_bytes(path_in("ok.bin"), u, 8);
    cr_assert_eq(lp_tokens_load(&t, path_in("ok.bin"), 2, 0, "uint16"), LP_OK, "%s", lp_last_error());
    cr_expect(t.n_seq == 2 && t.ids[3] == 6);
    lp_tokens_free(&t);
    /* round trip through our own writer */
    cr_assert_eq(lp_npy_write_i32(path_in("w.npy"), ids, 2, 3), LP_OK);
    cr_assert_eq(lp_tokens_load(&t, path_in("w.npy"), 0, 0, NULL), LP_OK, "%s", lp_last_error());
    cr_expect(t.n_seq == 2 && t.ctx == 3 && t.ids[5] == 6);
    lp_tokens_free(&t);
}

Test(io, config_keys_and_values) {
    static const lp_key keys[] = {
        {"cache.batch", LP_KEY_INT, "8", 1, 100, NULL, ""},
        {"model.dtype", LP_KEY_CHOICE, "f32", 0, 0, "f32|bf16", ""},
        {"train.lr", LP_KEY_FLOAT, "1e-3", 0, 1, NULL, ""},
    };
    lp_cfg c;
    lp_cfg_init(&c, keys, 3);
    cr_expect_eq(lp_cfg_int(&c, "cache.batch"), 8);
    cr_expect_eq(lp_cfg_set(&c, "cache.btach", "3", "cli"), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "unknown config key 'cache.btach'") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_cfg_set(&c, "cache.batch", "0", "cli"), LP_ERR_ARG);
    cr_expect_eq(lp_cfg_set(&c, "cache.batch", "3x", "cli"), LP_ERR_ARG);
    cr_expect_eq(lp_cfg_set(&c, "model.dtype", "f16", "cli"), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "model.dtype") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_cfg_set(&c, "train.lr", "-1", "cli"), LP_ERR_ARG);
    cr_expect_eq(lp_cfg_set(&c, "train.lr", "nan", "cli"), LP_ERR_ARG);
    cr_expect_eq(lp_cfg_set(&c, "cache.batch", "12", "cli"), LP_OK);
    write_bytes(path_in("a.ini"), "[cache]\nbatch = 5\n[model]\ndtype = bf16\n", 38);
    cr_expect_eq(lp_cfg_load_ini(&c, path_in("a.ini")), LP_OK, "%s", lp_last_error());
    cr_expect_eq(lp_cfg_int(&c, "cache.batch"), 5);
    cr_expect_str_eq(lp_cfg_str(&c, "model.dtype"), "bf16");
    write_bytes(path_in("b.ini"), "[cache]\nbath = 5\n", 17);
    cr_expect_eq(lp_cfg_load_ini(&c, path_in("b.ini")), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "b.ini") && strstr(lp_last_error(), "cache.bath"), "%s", lp_last_error());
    lp_cfg_free(&c);
}

/* The fixture checkpoint split into two shards with an index, as save_pretrained shards it:
 * the same logits, bit for bit, as the single file. */
Test(io, sharded_checkpoint_loads_like_the_single_file) {
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, LP_FIXTURES "/gpt2-tiny/model.safetensors"), LP_OK);
    lp_st_spec *specs[2] = {calloc(f.n, sizeof(lp_st_spec)), calloc(f.n, sizeof(lp_st_spec))};
    const void **datas[2] = {calloc(f.n, sizeof(void *)), calloc(f.n, sizeof(void *))};
    int n[2] = {0, 0};
    char idx[1 << 14];
    size_t o = snprintf(idx, sizeof idx, "{\"metadata\": {}, \"weight_map\": {");
    for (int i = 0; i < f.n; i++) {
        int s = i % 2;
        const lp_st_tensor *t = &f.tensors[i];
        specs[s][n[s]] = (lp_st_spec){.name = t->name, .dtype = t->dtype, .ndim = t->ndim};
        memcpy(specs[s][n[s]].shape, t->shape, sizeof t->shape);
        datas[s][n[s]++] = t->data;
        o += snprintf(idx + o, sizeof idx - o, "%s\"%s\": \"model-0000%d-of-00002.safetensors\"", i ? ", " : "", t->name, s + 1);
    }
    snprintf(idx + o, sizeof idx - o, "}}");
    cr_assert_eq(lp_st_write(path_in("model-00001-of-00002.safetensors"), specs[0], datas[0], n[0], NULL), LP_OK);
    cr_assert_eq(lp_st_write(path_in("model-00002-of-00002.safetensors"), specs[1], datas[1], n[1], NULL), LP_OK);
    write_bytes(path_in("model.safetensors.index.json"), idx, strlen(idx));
    char cmd[600];
    snprintf(cmd, sizeof cmd, "cp %s/gpt2-tiny/config.json %s/", LP_FIXTURES, dir);
    cr_assert(system(cmd) == 0);
    lp_model *a, *b;
    cr_assert_eq(lp_model_load(&a, dir, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    cr_assert_eq(lp_model_load(&b, LP_FIXTURES "/gpt2-tiny", LP_CPU, LP_F32), LP_OK);
    int32_t tok[8] = {5, 900, 3, 17, 996, 0, 42, 7};
    cr_assert_eq(lp_model_forward(a, tok, 1, 8, LP_WANT_LOGITS), LP_OK);
    cr_assert_eq(lp_model_forward(b, tok, 1, 8, LP_WANT_LOGITS), LP_OK);
    cr_expect(memcmp(lp_model_logits(a), lp_model_logits(b), 8 * 997 * sizeof(float)) == 0);
    lp_model_free(a), lp_model_free(b);
    /* an index naming a shard that is not there */
    unlink(path_in("model-00002-of-00002.safetensors"));
    cr_expect_eq(lp_model_load(&a, dir, LP_CPU, LP_F32), LP_ERR_IO);
    cr_expect(strstr(lp_last_error(), "model-00002-of-00002.safetensors: cannot open") != NULL, "%s", lp_last_error());
    for (int s = 0; s < 2; s++) free(specs[s]), free(datas[s]);
    lp_st_close(&f);
}

/* Regressions from fuzzing the .npy reader: sizes from the header are checked for overflow
 * and against the file before they size anything, and the parser never reads past the
 * header it was given. */
Test(io, npy_header_regressions) {
    unsigned char buf[512];
    int32_t ids[6] = {1, 2, 3, 4, 5, 6};
    /* 2^62 * 2^2 rows of int32: shape x itemsize wraps to 0, which used to pass the
     * truncation check and write the "rows" out of a 24-byte buffer */
    size_t n = npy(buf, "{'descr': '<i4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }", ids, 24);
    expect_tokens_error("wrap.npy", buf, n, 4, "overflows");
    n = npy(buf, "{'descr': '<i4', 'fortran_order': False, 'shape': (4294967296, 4294967297), }", ids, 24);
    expect_tokens_error("wrap2.npy", buf, n, 4, "overflows");
    n = npy(buf, "{'descr': '<i4', 'fortran_order': False, 'shape': (99999999999999999999,), }", ids, 24);
    expect_tokens_error("huge.npy", buf, n, 4, "malformed .npy header");
    /* a version 2 preamble cut short: 11 bytes, the header length field incomplete */
    expect_tokens_error("v2.npy", "\x93NUMPY\x02\x00\x10\x00\x00", 11, 4, "truncated .npy header");
    expect_tokens_error("v9.npy", "\x93NUMPY\x09\x00\x10\x00\x00\x00\x00\x00", 12, 4, "version 9");
    /* the header ends right after 'descr': (the dtype used to be read past the end) */
    unsigned char cut[] = "\x93NUMPY\x01\x00\x09\x00{'descr':";
    expect_tokens_error("descr.npy", cut, sizeof cut - 1, 4, "'descr' is not a short quoted string");
    unsigned char cut2[] = "\x93NUMPY\x01\x00\x0a\x00{'descr':'";
    expect_tokens_error("descr2.npy", cut2, sizeof cut2 - 1, 4, "'descr' is not a short quoted string");
    n = npy(buf, "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3", ids, 24);
    expect_tokens_error("shape.npy", buf, n, 4, "'shape' is not a tuple");
    /* a 2-D file with no rows, and one with rows of no tokens */
    n = npy(buf, "{'descr': '<i4', 'fortran_order': False, 'shape': (0, 3), }", ids, 0);
    expect_tokens_error("rows0.npy", buf, n, 4, "no tokens");
    n = npy(buf, "{'descr': '<i4', 'fortran_order': False, 'shape': (5, 0), }", ids, 0);
    expect_tokens_error("cols0.npy", buf, n, 4, "no tokens");
}

/* Tensors in a mapped file are where the file puts them: a safetensors header of odd
 * length leaves BF16 data at an odd address (found fuzzing store reads). Conversion must
 * not assume alignment (UBSan's alignment check fails the old loads under make SAN=1). */
Test(io, convert_from_unaligned_source) {
    unsigned char raw[1 + 3 * 4];
    uint16_t bf[3] = {0x3f80, 0xc000, 0x4040}; /* 1, -2, 3 */
    memcpy(raw + 1, bf, sizeof bf);
    float f[3];
    cr_assert_eq(lp_convert_host(f, LP_F32, raw + 1, LP_BF16, 3), LP_OK);
    cr_expect(f[0] == 1.0f && f[1] == -2.0f && f[2] == 3.0f, "%g %g %g", f[0], f[1], f[2]);
    memcpy(raw + 1, f, sizeof f);
    uint16_t back[4];
    cr_assert_eq(lp_convert_host(back, LP_BF16, raw + 1, LP_F32, 3), LP_OK);
    cr_expect(back[0] == 0x3f80 && back[1] == 0xc000 && back[2] == 0x4040);
    unsigned char out[1 + 3 * 4];
    cr_assert_eq(lp_convert_host(out + 1, LP_F32, bf, LP_BF16, 3), LP_OK); /* an unaligned destination */
    memcpy(f, out + 1, sizeof f);
    cr_expect(f[0] == 1.0f && f[1] == -2.0f && f[2] == 3.0f);
}
