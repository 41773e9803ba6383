/* test_tokenizer.c: the byte-level BPE tokenizer against Hugging Face `tokenizers` 0.20.3.
 *
 * - Five small tokenizers trained by tests/gen/gen_tokenizer_fixture.py, one per
 *   pre-tokenizer family (gpt2, llama3, qwen2, smollm2) plus "flags" (every added-token
 *   flag, NFC in a Sequence, contiguous Digits, an EOS template): every corpus string, and
 *   the whole corpus joined by newlines, must give exactly the reference ids; decoding them
 *   must give tokenizers' decode(ids, skip_special_tokens=False).
 * - The real SmolLM2 vocabulary read from models/SmolLM2-135M-Instruct.Q4_1.gguf (`make
 *   model` fetches it) against ids that tokenizers gave for the same vocabulary and merges
 *   with SmolLM2's pre-tokenizer.
 * - Bad input: each malformed or unsupported tokenizer.json or GGUF and invalid UTF-8 text
 *   fails with LP_ERR_FORMAT and one line naming the file or offset and the problem. */
#include <cjson/cJSON.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loupe/gguf.h"
#include "loupe/safetensors.h"
#include "loupe/tokenizer.h"
#include "testutil.h"

#define TOK_DIR LP_FIXTURES "/tokenizer"
#define MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"

#define OK(expr)                                                                            \
    do {                                                                                    \
        lp_status s_ = (expr);                                                              \
        cr_assert_eq(s_, LP_OK, "%s: %s: %s", #expr, lp_status_name(s_), lp_last_error());  \
    } while (0)

static cJSON *read_json(const char *path) {
    size_t n;
    char *buf = lp_read_file(path, &n);
    cr_assert(buf != NULL, "cannot read %s", path);
    cJSON *j = cJSON_ParseWithLength(buf, n);
    free(buf);
    cr_assert(j != NULL, "%s is not JSON", path);
    return j;
}

/* The corpus strings (none holds a NUL) and, joined by "\n", the long text. */
typedef struct { char **s; int n; char *joined; } corpus;

static corpus load_corpus(void) {
    cJSON *j = read_json(TOK_DIR "/corpus.json");
    const cJSON *list = cJSON_GetObjectItem(j, "strings"), *e;
    corpus c = {calloc((size_t)cJSON_GetArraySize(list), sizeof(char *)), 0, NULL};
    size_t total = 1;
    cJSON_ArrayForEach(e, list) {
        c.s[c.n++] = strdup(e->valuestring);
        total += strlen(e->valuestring) + 1;
    }
    cJSON_Delete(j);
    c.joined = calloc(total, 1);
    for (int i = 0; i < c.n; i++) {
        if (i) strcat(c.joined, "\n");
        strcat(c.joined, c.s[i]);
    }
    return c;
}
static void free_corpus(corpus *c) {
    for (int i = 0; i < c->n; i++) free(c->s[i]);
    free(c->s), free(c->joined);
}

/* Printable form of a corpus string for failure messages. */
static const char *show(const char *s) {
    static char buf[160];
    size_t k = 0;
    for (; *s && k + 8 < sizeof buf; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '\n') k += (size_t)snprintf(buf + k, sizeof buf - k, "\\n");
        else if (c < 0x20 || c == 0x7f) k += (size_t)snprintf(buf + k, sizeof buf - k, "\\x%02x", c);
        else buf[k++] = (char)c;
    }
    buf[k] = 0;
    return buf;
}

/* Compares ids with the reference; on a mismatch reports the first differing position. */
static int same_ids(const char *what, int index, const char *text, const int32_t *ids, size_t n, const cJSON *ref) {
    size_t m = (size_t)cJSON_GetArraySize(ref);
    for (size_t i = 0; i < n || i < m; i++) {
        int have = i < n ? ids[i] : -1;
        int want = i < m ? (int)cJSON_GetArrayItem(ref, (int)i)->valuedouble : -1;
        if (have != want) {
            cr_expect_fail("%s: string %d \"%s\": first difference at position %zu: loupe %d (%s), tokenizers %d (%s); "
                           "%zu ids vs %zu",
                           what, index, show(text), i, have, have >= 0 ? "id" : "past the end", want,
                           want >= 0 ? "id" : "past the end", n, m);
            return 0;
        }
    }
    return 1;
}

static int valid_utf8(const char *s, size_t n) { /* enough for this test: no overlong/surrogate checks */
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t len = c < 0x80 ? 1 : c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
        if (!len || i + len > n) return 0;
        for (size_t j = 1; j < len; j++)
            if (((unsigned char)s[i + j] & 0xC0) != 0x80) return 0;
        i += len;
    }
    return 1;
}

/* Every corpus string and the joined text through `tk` against ids.json at ids_path. */
static void check_against(const char *what, const lp_tokenizer *tk, const char *ids_path) {
    corpus c = load_corpus();
    cJSON *ref = read_json(ids_path);
    const cJSON *all = cJSON_GetObjectItem(ref, "ids"), *decoded = cJSON_GetObjectItem(ref, "decoded");
    cr_assert_eq(cJSON_GetArraySize(all), c.n, "%s: %d reference rows for %d corpus strings", ids_path,
                 cJSON_GetArraySize(all), c.n);
    int good = 0, round_trips = 0, lossy = 0;
    for (int i = 0; i < c.n; i++) {
        int32_t *ids;
        size_t n;
        OK(lp_tokenize(tk, c.s[i], strlen(c.s[i]), &ids, &n));
        good += same_ids(what, i, c.s[i], ids, n, cJSON_GetArrayItem(all, i));
        char *back;
        size_t len;
        OK(lp_detokenize(tk, ids, n, &back, &len));
        const char *want = cJSON_GetArrayItem(decoded, i)->valuestring;
        if (valid_utf8(back, len)) {
            cr_expect(len == strlen(want) && memcmp(back, want, len) == 0,
                      "%s: string %d: detokenize gives \"%s\"", what, i, show(back));
            cr_expect(strcmp(want, c.s[i]) != 0 || strcmp(back, c.s[i]) == 0);
            round_trips += strcmp(back, c.s[i]) == 0;
        } else {
            /* not UTF-8: bytes the vocabulary lacks were dropped, or an added token made of
             * byte-alphabet characters ("caf\u00e9") went through the byte map, as tokenizers'
             * ByteLevel decoder does; tokenizers' decode shows U+FFFD there, loupe the raw bytes */
            cr_expect(strstr(want, "\xef\xbf\xbd") != NULL, "%s: string %d: detokenize gives invalid UTF-8", what, i);
            lossy++;
        }
        free(back);
        free(ids);
    }
    int32_t *ids;
    size_t n;
    OK(lp_tokenize(tk, c.joined, strlen(c.joined), &ids, &n));
    int joined_ok = same_ids(what, -1, "(the corpus joined by newlines)", ids, n, cJSON_GetObjectItem(ref, "joined_ids"));
    free(ids);
    /* NUL_TEXT of the generator: NULs are ordinary characters */
    static const char nul_text[] = "a\0b\0\0 c <|endoftext|>\0";
    OK(lp_tokenize(tk, nul_text, sizeof nul_text - 1, &ids, &n));
    same_ids(what, -2, "(text with NULs)", ids, n, cJSON_GetObjectItem(ref, "nul_text_ids"));
    free(ids);
    OK(lp_tokenize(tk, c.joined, strlen(c.joined), &ids, &n));
    fprintf(stderr, "  %-14s %d/%d strings identical, joined text (%zu bytes, %zu ids) %s; %d round trips exact, %d lossy\n",
            what, good, c.n, strlen(c.joined), n, joined_ok ? "identical" : "DIFFERS", round_trips, lossy);
    free(ids);
    cJSON_Delete(ref);
    free_corpus(&c);
}

static void check_fixture(const char *name) {
    char path[256], ids[256];
    snprintf(path, sizeof path, "%s/%s", TOK_DIR, name);
    snprintf(ids, sizeof ids, "%s/%s/ids.json", TOK_DIR, name);
    lp_tokenizer *tk;
    OK(lp_tokenizer_load(&tk, path)); /* a directory holding tokenizer.json */
    check_against(name, tk, ids);
    lp_tokenizer_free(tk);
}

Test(tokenizer, gpt2) { check_fixture("gpt2"); }
Test(tokenizer, llama3) { check_fixture("llama3"); }
Test(tokenizer, qwen2) { check_fixture("qwen2"); }
Test(tokenizer, smollm2) { check_fixture("smollm2"); }
Test(tokenizer, flags) { check_fixture("flags"); }

static int id_of(const lp_tokenizer *tk, const char *tok) {
    for (int i = 0; i < lp_tokenizer_vocab_size(tk); i++)
        if (lp_tokenizer_token(tk, i) && strcmp(lp_tokenizer_token(tk, i), tok) == 0) return i;
    return -1;
}

Test(tokenizer, bos_eos_and_vocab) {
    lp_tokenizer *tk;
    OK(lp_tokenizer_from_json(&tk, TOK_DIR "/llama3/tokenizer.json"));
    cr_expect_eq(lp_tokenizer_bos(tk), id_of(tk, "<|begin_of_text|>"));
    cr_expect_eq(lp_tokenizer_eos(tk), id_of(tk, "<|eot_id|>"));
    cr_expect_gt(lp_tokenizer_bos(tk), 0);
    int32_t *ids;
    size_t n;
    OK(lp_tokenize(tk, "", 0, &ids, &n)); /* the template applies to empty text too */
    cr_expect(n == 1 && ids[0] == lp_tokenizer_bos(tk));
    free(ids);
    lp_tokenizer_free(tk);

    OK(lp_tokenizer_from_json(&tk, TOK_DIR "/qwen2/tokenizer.json"));
    cr_expect_eq(lp_tokenizer_bos(tk), -1, "qwen2's config names no bos_token");
    cr_expect_eq(lp_tokenizer_eos(tk), id_of(tk, "<|im_end|>"));
    cr_expect_eq(lp_tokenizer_vocab_size(tk), 3003);
    cr_expect_str_eq(lp_tokenizer_token(tk, 3001), "<|im_start|>");
    cr_expect_null(lp_tokenizer_token(tk, 3003));
    cr_expect_null(lp_tokenizer_token(tk, -1));
    OK(lp_tokenize(tk, "", 0, &ids, &n));
    cr_expect_eq(n, 0);
    cr_expect_not_null(ids);
    free(ids);
    int32_t bad[] = {5, 3003};
    char *text;
    size_t len;
    cr_expect_eq(lp_detokenize(tk, bad, 2, &text, &len), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "id 3003 at position 1") != NULL, "%s", lp_last_error());
    lp_tokenizer_free(tk);

    OK(lp_tokenizer_from_json(&tk, TOK_DIR "/flags/tokenizer.json")); /* no tokenizer_config bos */
    cr_expect_eq(lp_tokenizer_eos(tk), id_of(tk, "<|endoftext|>"));
    cr_expect_eq(lp_tokenizer_bos(tk), -1);
    lp_tokenizer_free(tk);
}

static void require_model(void) {
    struct stat sb;
    if (stat(MODEL, &sb) != 0) cr_skip_test("%s is absent (make model fetches it)", MODEL);
}

Test(tokenizer, smollm2_gguf) {
    require_model();
    lp_tokenizer *tk;
    OK(lp_tokenizer_load(&tk, MODEL));
    cr_expect_eq(lp_tokenizer_vocab_size(tk), 49152);
    cr_expect_eq(lp_tokenizer_bos(tk), 1);
    cr_expect_eq(lp_tokenizer_eos(tk), 2);
    cr_expect_str_eq(lp_tokenizer_token(tk, 2), "<|im_end|>");
    check_against("smollm2-gguf", tk, TOK_DIR "/smollm2-gguf-ids.json");
    lp_tokenizer_free(tk);
}

/* ---- bad input ---- */

static char dir[64];
static void mkdir_tmp(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-tok-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}
static void rm_tmp(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}
TestSuite(tokenizer_bad, .init = mkdir_tmp, .fini = rm_tmp);

static const char *path_in(const char *name) {
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

/* A minimal tokenizer.json; each %s is replaced by the given part (or the default). */
static const char *MODEL_OK = "{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2,\"\xc4\xa0\":3},\"merges\":[\"a b\"]}";
static const char *PRE_OK = "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true}";

static void write_json(const char *model, const char *normalizer, const char *pre, const char *post) {
    char buf[4096];
    snprintf(buf, sizeof buf,
             "{\"version\":\"1.0\",\"added_tokens\":[],\"model\":%s,\"normalizer\":%s,\"pre_tokenizer\":%s,"
             "\"post_processor\":%s,\"decoder\":{\"type\":\"ByteLevel\"}}",
             model ? model : MODEL_OK, normalizer ? normalizer : "null", pre ? pre : PRE_OK, post ? post : "null");
    write_bytes(path_in("tokenizer.json"), buf, strlen(buf));
}

static void expect_json_error(const char *phrase) {
    lp_tokenizer *tk = (lp_tokenizer *)1;
    lp_status st = lp_tokenizer_from_json(&tk, path_in("tokenizer.json"));
    cr_expect_eq(st, LP_ERR_FORMAT, "status %s: %s", lp_status_name(st), lp_last_error());
    cr_expect_null(tk);
    cr_expect(strstr(lp_last_error(), "tokenizer.json") != NULL, "message does not name the file: %s", lp_last_error());
    cr_expect(strstr(lp_last_error(), phrase) != NULL, "message '%s' lacks '%s'", lp_last_error(), phrase);
    cr_expect(strchr(lp_last_error(), '\n') == NULL);
}

Test(tokenizer_bad, minimal_file_works) {
    write_json(NULL, NULL, NULL, NULL);
    lp_tokenizer *tk;
    OK(lp_tokenizer_load(&tk, path_in("tokenizer.json")));
    int32_t *ids;
    size_t n;
    /* "c" is not in this vocabulary and there is no unk token: tokenizers drops it */
    OK(lp_tokenize(tk, "abcab a", 7, &ids, &n));
    cr_expect(n == 4 && ids[0] == 2 && ids[1] == 2 && ids[2] == 3 && ids[3] == 0, "got %zu ids", n);
    free(ids);
    lp_tokenizer_free(tk);
}

Test(tokenizer_bad, not_json) {
    write_bytes(path_in("tokenizer.json"), "{\"model\": [1, 2", 15);
    expect_json_error("not a JSON object");
}

Test(tokenizer_bad, unknown_model_type) {
    write_json("{\"type\":\"WordPiece\",\"vocab\":{\"a\":0}}", NULL, NULL, NULL);
    expect_json_error("model.type 'WordPiece' is not supported");
}

Test(tokenizer_bad, byte_fallback) {
    write_json("{\"type\":\"BPE\",\"byte_fallback\":true,\"vocab\":{\"a\":0},\"merges\":[]}", NULL, NULL, NULL);
    expect_json_error("byte_fallback");
}

Test(tokenizer_bad, unknown_pre_tokenizer) {
    write_json(NULL, NULL, "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Metaspace\"}]}", NULL);
    expect_json_error("type 'Metaspace' is not supported");
}

Test(tokenizer_bad, no_byte_level) {
    write_json(NULL, NULL, "{\"type\":\"Digits\",\"individual_digits\":true}", NULL);
    expect_json_error("no ByteLevel step");
}

Test(tokenizer_bad, split_behavior) {
    write_json(NULL, NULL,
               "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\s+\"},"
               "\"behavior\":\"Removed\",\"invert\":false},{\"type\":\"ByteLevel\",\"use_regex\":false}]}",
               NULL);
    expect_json_error("Split.behavior 'Removed' is not supported");
}

Test(tokenizer_bad, bad_regex) {
    write_json(NULL, NULL,
               "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(ab\"},"
               "\"behavior\":\"Isolated\",\"invert\":false},{\"type\":\"ByteLevel\",\"use_regex\":false}]}",
               NULL);
    expect_json_error("cannot compile the pattern '(ab'");
}

Test(tokenizer_bad, unsupported_normalizer) {
    write_json(NULL, "{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"NFC\"},{\"type\":\"NFKC\"}]}", NULL, NULL);
    expect_json_error("normalizer.normalizers[] type 'NFKC' is not supported");
}

Test(tokenizer_bad, unsupported_post_processor) {
    write_json(NULL, NULL, NULL, "{\"type\":\"RobertaProcessing\",\"sep\":[\"a\",0],\"cls\":[\"b\",1]}");
    expect_json_error("post_processor type 'RobertaProcessing' is not supported");
}

Test(tokenizer_bad, merge_of_unknown_token) {
    write_json("{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2},\"merges\":[\"a b\",\"a zz\"]}", NULL, NULL, NULL);
    expect_json_error("model.merges[1] names 'zz', which is not in the vocabulary");
    write_json("{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2},\"merges\":[[\"b\",\"a\"]]}", NULL, NULL, NULL);
    expect_json_error("model.merges[0] makes 'ba', which is not in the vocabulary");
    write_json("{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2},\"merges\":[\"a b c\"]}", NULL, NULL, NULL);
    expect_json_error("not two tokens separated by one space");
}

Test(tokenizer_bad, bad_vocab) {
    write_json("{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":0},\"merges\":[]}", NULL, NULL, NULL);
    expect_json_error("gives id 0 to both");
    write_json("{\"type\":\"BPE\",\"vocab\":{\"a\":-3},\"merges\":[]}", NULL, NULL, NULL);
    expect_json_error("model.vocab['a'] is not a token id");
}

Test(tokenizer_bad, missing_file) {
    lp_tokenizer *tk;
    cr_expect_eq(lp_tokenizer_load(&tk, path_in("nothing.json")), LP_ERR_IO);
    cr_expect(strstr(lp_last_error(), "nothing.json") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_tokenizer_load(&tk, dir), LP_ERR_IO); /* a directory without tokenizer.json */
    cr_expect(strstr(lp_last_error(), "has no tokenizer.json") != NULL, "%s", lp_last_error());
}

static void expect_utf8_error(const lp_tokenizer *tk, const char *text, size_t n, const char *phrase) {
    int32_t *ids = (int32_t *)1;
    size_t k = 7;
    cr_expect_eq(lp_tokenize(tk, text, n, &ids, &k), LP_ERR_FORMAT);
    cr_expect(ids == NULL && k == 0);
    cr_expect(strstr(lp_last_error(), phrase) != NULL, "message '%s' lacks '%s'", lp_last_error(), phrase);
}

Test(tokenizer_bad, invalid_utf8) {
    lp_tokenizer *tk;
    OK(lp_tokenizer_load(&tk, TOK_DIR "/gpt2"));
    expect_utf8_error(tk, "ab\xff", 3, "byte 0xff at offset 2");
    expect_utf8_error(tk, "caf\xc3", 4, "offset 3");           /* truncated */
    expect_utf8_error(tk, "x\xed\xa0\x80y", 5, "offset 1");     /* a surrogate */
    expect_utf8_error(tk, "\xc0\xaf", 2, "offset 0");           /* overlong */
    expect_utf8_error(tk, "ok \xf4\x90\x80\x80", 7, "offset 3"); /* past U+10FFFF */
    expect_utf8_error(tk, "\xe2\x82x", 3, "not valid UTF-8");
    int32_t *ids;
    size_t n;
    OK(lp_tokenize(tk, "a\0b", 3, &ids, &n)); /* NUL is valid UTF-8 */
    cr_expect_eq(n, 3);
    free(ids);
    lp_tokenizer_free(tk);
}

/* ---- GGUF files written here: header, metadata, no tensors ---- */

typedef struct { unsigned char *b; size_t n, cap; } gbuf;
static void put(gbuf *g, const void *p, size_t n) {
    if (g->n + n > g->cap) {
        g->cap = 2 * (g->n + n) + 256;
        g->b = realloc(g->b, g->cap);
    }
    memcpy(g->b + g->n, p, n);
    g->n += n;
}
static void put_u32(gbuf *g, uint32_t v) { put(g, &v, 4); }
static void put_u64(gbuf *g, uint64_t v) { put(g, &v, 8); }
static void put_str(gbuf *g, const char *s) {
    put_u64(g, strlen(s));
    put(g, s, strlen(s));
}
static void kv_str(gbuf *g, const char *key, const char *v) {
    put_str(g, key);
    put_u32(g, LP_GGUF_STRING);
    put_str(g, v);
}
static void kv_strs(gbuf *g, const char *key, const char **v, int n) {
    put_str(g, key);
    put_u32(g, LP_GGUF_ARRAY);
    put_u32(g, LP_GGUF_STRING);
    put_u64(g, (uint64_t)n);
    for (int i = 0; i < n; i++) put_str(g, v[i]);
}
static void kv_i32s(gbuf *g, const char *key, const int32_t *v, int n) {
    put_str(g, key);
    put_u32(g, LP_GGUF_ARRAY);
    put_u32(g, LP_GGUF_I32);
    put_u64(g, (uint64_t)n);
    put(g, v, 4 * (size_t)n);
}

/* model, pre (NULL: absent); tokens a, b, ab, Ġ, <|ctl|> (control), merge "a b". */
static const char *write_gguf(const char *model, const char *pre, int add_bos) {
    gbuf g = {0};
    put(&g, "GGUF", 4);
    put_u32(&g, 3);
    put_u64(&g, 0);
    put_u64(&g, (uint64_t)(3 + (pre != NULL) + 3 + add_bos));
    const char *toks[] = {"a", "b", "ab", "\xc4\xa0", "<|ctl|>"}, *merges[] = {"a b"};
    int32_t types[] = {1, 1, 1, 1, 3};
    kv_str(&g, "tokenizer.ggml.model", model);
    kv_strs(&g, "tokenizer.ggml.tokens", toks, 5);
    kv_i32s(&g, "tokenizer.ggml.token_type", types, 5);
    kv_strs(&g, "tokenizer.ggml.merges", merges, 1);
    if (pre) kv_str(&g, "tokenizer.ggml.pre", pre);
    put_str(&g, "tokenizer.ggml.bos_token_id");
    put_u32(&g, LP_GGUF_U32);
    put_u32(&g, 4);
    put_str(&g, "general.alignment");
    put_u32(&g, LP_GGUF_U32);
    put_u32(&g, 32);
    if (add_bos) {
        put_str(&g, "tokenizer.ggml.add_bos_token");
        put_u32(&g, LP_GGUF_BOOL);
        put(&g, "\1", 1);
    }
    while (g.n % 32) put(&g, "", 1);
    write_bytes(path_in("t.gguf"), g.b, g.n);
    free(g.b);
    return path_in("t.gguf");
}

static void expect_gguf_error(const char *phrase) {
    lp_tokenizer *tk;
    lp_status st = lp_tokenizer_load(&tk, path_in("t.gguf"));
    cr_expect_eq(st, LP_ERR_FORMAT, "status %s: %s", lp_status_name(st), lp_last_error());
    cr_expect(strstr(lp_last_error(), "t.gguf") != NULL, "message does not name the file: %s", lp_last_error());
    cr_expect(strstr(lp_last_error(), phrase) != NULL, "message '%s' lacks '%s'", lp_last_error(), phrase);
}

Test(tokenizer_bad, gguf_small) {
    write_gguf("gpt2", "smollm", 1);
    lp_tokenizer *tk;
    OK(lp_tokenizer_load(&tk, path_in("t.gguf")));
    int32_t *ids;
    size_t n;
    OK(lp_tokenize(tk, "ab<|ctl|> ab", 12, &ids, &n));
    cr_expect(n == 5 && ids[0] == 4 && ids[1] == 2 && ids[2] == 4 && ids[3] == 3 && ids[4] == 2, "got %zu ids", n);
    char *text;
    size_t len;
    OK(lp_detokenize(tk, ids, n, &text, &len));
    cr_expect_str_eq(text, "<|ctl|>ab<|ctl|> ab");
    free(text);
    free(ids);
    lp_tokenizer_free(tk);
}

Test(tokenizer_bad, gguf_sentencepiece) {
    write_gguf("llama", "default", 0);
    expect_gguf_error("only byte-level BPE");
}

Test(tokenizer_bad, gguf_unknown_pre) {
    write_gguf("gpt2", "chatglm-bpe", 0);
    expect_gguf_error("tokenizer.ggml.pre 'chatglm-bpe' is not supported");
}

/* cJSON passes any bytes through: a vocabulary key or added token that is not UTF-8 is
 * refused at load (the decoder walks token text character by character). */
Test(tokenizer_bad, vocab_key_not_utf8) {
    write_json("{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2,\"\xc4\xa0\":3,\"x\xf0\":4},\"merges\":[\"a b\"]}", NULL, NULL,
               NULL); /* a 4-byte lead at the end: decoding it used to read past the string */
    expect_json_error("the model.vocab key of id 4 is not valid UTF-8 (byte 0xf0 at offset 1)");
    write_json("{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"\xed\xa0\x80\":1},\"merges\":[]}", NULL, NULL, NULL); /* a surrogate */
    expect_json_error("the model.vocab key of id 1 is not valid UTF-8");
    char buf[1024];
    snprintf(buf, sizeof buf, "{\"added_tokens\":[{\"content\":\"<|\xff|>\",\"special\":true}],\"model\":%s,\"pre_tokenizer\":%s}",
             MODEL_OK, PRE_OK);
    write_bytes(path_in("tokenizer.json"), buf, strlen(buf));
    expect_json_error("an added_tokens content is not valid UTF-8");
}

/* A sparse id would size the id tables by a number, not by the file. */
Test(tokenizer_bad, vocab_id_beyond_the_file) {
    write_json("{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":60000000},\"merges\":[]}", NULL, NULL, NULL);
    expect_json_error("model.vocab['b'] = 60000000 is beyond any dense vocabulary");
}

/* ---- many added tokens ---- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The fixture's tokenizer.json with N_MANY more added tokens "<extra_i>", all in the
 * same first-byte bucket and each longer than or as long as the one before (the worst
 * order for a per-token scan or an insertion sort): it loads in linear time (it once took
 * minutes), each gets the next id, and the longest match wins. */
#define N_MANY 100000
static void many_added_tokens(const char *fixture) {
    char src[256];
    snprintf(src, sizeof src, TOK_DIR "/%s/tokenizer.json", fixture);
    cJSON *j = read_json(src), *added = cJSON_GetObjectItemCaseSensitive(j, "added_tokens");
    cr_assert(cJSON_IsArray(added));
    for (int i = 0; i < N_MANY; i++) {
        char content[32];
        snprintf(content, sizeof content, "<extra_%d>", i);
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "id", 0); /* ignored: tokenizers gives the next free id */
        cJSON_AddStringToObject(e, "content", content);
        cJSON_AddBoolToObject(e, "single_word", 0), cJSON_AddBoolToObject(e, "lstrip", 0);
        cJSON_AddBoolToObject(e, "rstrip", 0), cJSON_AddBoolToObject(e, "normalized", 0);
        cJSON_AddBoolToObject(e, "special", 1);
        cJSON_AddItemToArray(added, e);
    }
    char *txt = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    write_bytes(path_in("tokenizer.json"), txt, strlen(txt));
    free(txt);
    double t0 = now_s();
    lp_tokenizer *tk;
    OK(lp_tokenizer_from_json(&tk, path_in("tokenizer.json")));
    double dt = now_s() - t0;
    cr_expect(dt < 5.0, "%s: %d added tokens took %.2f s to load", fixture, N_MANY, dt);
    fprintf(stderr, "tokenizer %s + %d added tokens: loaded in %.3f s\n", fixture, N_MANY, dt);
    int first = lp_tokenizer_vocab_size(tk) - N_MANY;
    cr_expect_str_eq(lp_tokenizer_token(tk, first), "<extra_0>");
    cr_expect_str_eq(lp_tokenizer_token(tk, first + N_MANY - 1), "<extra_99999>");
    int32_t *ids;
    size_t n;
    const char text[] = "<extra_1><extra_12345><extra_99999>";
    OK(lp_tokenize(tk, text, sizeof text - 1, &ids, &n));
    size_t k = n >= 3 ? n - 3 : 0; /* after a BOS the template may add */
    cr_expect(n >= 3 && ids[k] == first + 1 && ids[k + 1] == first + 12345 && ids[k + 2] == first + 99999,
              "%s: %zu ids, the last %d %d %d", fixture, n, n >= 3 ? ids[k] : -1, n >= 3 ? ids[k + 1] : -1, n >= 3 ? ids[k + 2] : -1);
    free(ids);
    lp_tokenizer_free(tk);
}

Test(tokenizer_bad, a_hundred_thousand_added_tokens_load_in_linear_time) { many_added_tokens("gpt2"); }
Test(tokenizer_bad, a_hundred_thousand_added_tokens_load_in_linear_time_spm) { many_added_tokens("gemma"); }
