/* test_tokenizer_spm.c: SentencePiece-style BPE with byte fallback (Gemma) against Hugging
 * Face `tokenizers`, and rows of a text that start with BOS.
 *
 * - tests/fixtures/tokenizer/gemma: a small tokenizer.json in Gemma's layout (byte fallback
 *   happens: its alphabet is small); every corpus string, the corpus joined by newlines and
 *   a text with NULs must give exactly the ids of tests/gen/gen_gemma_tokenizer_fixture.py,
 *   and decoding must give tokenizers' decode (where that is valid UTF-8).
 * - The real Gemma 3 vocabulary from models/gemma-3-270m-q4_k_m.gguf (`make model-gemma`)
 *   against the ids tokenizers gives with the tokenizer transformers converts from it
 *   (skipped, saying so, when the file is absent).
 * - Round trips, a 100 KB text as one BPE word, a small Gemma GGUF written here (spaces
 *   respelled, user-defined and control tokens, byte fallback, merges ranked by id), and
 *   layouts that are refused by name.
 * - lp_tokens_from_stream: rows [BOS] + context - 1 tokens, or the plain cut. */
#include <cjson/cJSON.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loupe/safetensors.h"
#include "loupe/tokenizer.h"
#include "loupe/tokens.h"
#include "testutil.h"

#define TOK_DIR LP_FIXTURES "/tokenizer"
#define GEMMA_GGUF "models/gemma-3-270m-q4_k_m.gguf"

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

/* The first difference between ids and the reference list, or -1 when equal. */
static long first_diff(const int32_t *ids, size_t n, const cJSON *ref) {
    size_t m = (size_t)cJSON_GetArraySize(ref);
    for (size_t i = 0; i < n || i < m; i++)
        if (i >= n || i >= m || ids[i] != (int32_t)cJSON_GetArrayItem(ref, (int)i)->valuedouble) return (long)i;
    return -1;
}

static int valid_utf8(const char *s, size_t n) {
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

/* Encodes text and compares with ref; returns 1 when identical. */
static int same(const lp_tokenizer *tk, const char *what, int index, const char *text, size_t len, const cJSON *ref) {
    int32_t *ids;
    size_t n;
    OK(lp_tokenize(tk, text, len, &ids, &n));
    long d = first_diff(ids, n, ref);
    if (d >= 0)
        cr_expect_fail("%s: string %d: first difference at position %ld: loupe %d, tokenizers %d (%zu ids vs %d)", what, index, d,
                       (size_t)d < n ? ids[d] : -1,
                       d < cJSON_GetArraySize(ref) ? (int)cJSON_GetArrayItem(ref, (int)d)->valuedouble : -1, n,
                       cJSON_GetArraySize(ref));
    free(ids);
    return d < 0;
}

/* The corpus through tk against ids.json: ids, joined text, NUL text, decoding, round trips. */
static void check_against(const char *what, const lp_tokenizer *tk, const char *ids_path) {
    cJSON *corpus = read_json(TOK_DIR "/corpus.json"), *ref = read_json(ids_path);
    const cJSON *strings = cJSON_GetObjectItem(corpus, "strings"), *all = cJSON_GetObjectItem(ref, "ids");
    const cJSON *decoded = cJSON_GetObjectItem(ref, "decoded");
    int n_str = cJSON_GetArraySize(strings), good = 0, round_trips = 0, bos = lp_tokenizer_bos(tk);
    cr_assert_eq(cJSON_GetArraySize(all), n_str, "%s: %d reference rows for %d strings", ids_path, cJSON_GetArraySize(all), n_str);
    size_t joined_len = 0;
    for (int i = 0; i < n_str; i++) joined_len += strlen(cJSON_GetArrayItem(strings, i)->valuestring) + 1;
    char *joined = calloc(joined_len + 1, 1);
    for (int i = 0; i < n_str; i++) {
        const char *s = cJSON_GetArrayItem(strings, i)->valuestring;
        if (i) strcat(joined, "\n");
        strcat(joined, s);
        good += same(tk, what, i, s, strlen(s), cJSON_GetArrayItem(all, i));
        int32_t *ids;
        size_t n, len;
        char *back;
        OK(lp_tokenize(tk, s, strlen(s), &ids, &n));
        OK(lp_detokenize(tk, ids, n, &back, &len));
        const char *want = cJSON_GetArrayItem(decoded, i)->valuestring;
        if (valid_utf8(back, len)) cr_expect(len == strlen(want) && memcmp(back, want, len) == 0, "%s: string %d decodes differently", what, i);
        else cr_expect(strstr(want, "\xef\xbf\xbd") != NULL, "%s: string %d decodes to invalid UTF-8", what, i);
        free(back);
        /* without the BOS the template added, decoding gives the text back: byte fallback loses nothing */
        size_t skip = n > 0 && ids[0] == bos ? 1 : 0;
        OK(lp_detokenize(tk, ids + skip, n - skip, &back, &len));
        round_trips += len == strlen(s) && memcmp(back, s, len) == 0;
        free(back);
        free(ids);
    }
    int joined_ok = same(tk, what, -1, joined, strlen(joined), cJSON_GetObjectItem(ref, "joined_ids"));
    static const char nul_text[] = "a\0b\0\0 c <|endoftext|>\0";
    int nul_ok = same(tk, what, -2, nul_text, sizeof nul_text - 1, cJSON_GetObjectItem(ref, "nul_text_ids"));
    cr_expect_eq(round_trips, n_str, "%s: %d of %d strings decode back to themselves", what, round_trips, n_str);
    fprintf(stderr, "  %-14s %d/%d strings identical, joined text (%zu bytes) %s, NUL text %s; %d/%d round trips exact\n", what,
            good, n_str, strlen(joined), joined_ok ? "identical" : "DIFFERS", nul_ok ? "identical" : "DIFFERS", round_trips, n_str);
    free(joined);
    cJSON_Delete(ref);
    cJSON_Delete(corpus);
}

Test(tokenizer_spm, gemma_fixture) {
    lp_tokenizer *tk;
    OK(lp_tokenizer_load(&tk, TOK_DIR "/gemma"));
    cr_expect_eq(lp_tokenizer_bos(tk), 2);
    cr_expect_eq(lp_tokenizer_eos(tk), 1);
    cr_expect(lp_tokenizer_adds_bos(tk));
    cr_expect_str_eq(lp_tokenizer_token(tk, 2), "<bos>");
    check_against("gemma", tk, TOK_DIR "/gemma/ids.json");
    lp_tokenizer_free(tk);
}

Test(tokenizer_spm, gemma3_gguf) {
    struct stat sb;
    if (stat(GEMMA_GGUF, &sb) != 0) cr_skip_test("%s is absent (make model-gemma fetches it)", GEMMA_GGUF);
    lp_tokenizer *tk;
    OK(lp_tokenizer_load(&tk, GEMMA_GGUF));
    cr_expect_eq(lp_tokenizer_vocab_size(tk), 262144);
    cr_expect_eq(lp_tokenizer_bos(tk), 2);
    cr_expect_eq(lp_tokenizer_eos(tk), 1);
    cr_expect(lp_tokenizer_adds_bos(tk));
    cr_expect_str_eq(lp_tokenizer_token(tk, 138), "\xe2\x96\x81\xe2\x96\x81", "the two-space token is spelled with U+2581");
    check_against("gemma3-gguf", tk, TOK_DIR "/gemma3-gguf-ids.json");
    lp_tokenizer_free(tk);
}

/* 100 KB of text with no pre-tokenizer split is one BPE word: the merge loop must be
 * O(n log n). No time limit is asserted; the time is printed. */
Test(tokenizer_spm, long_text) {
    lp_tokenizer *tk;
    OK(lp_tokenizer_load(&tk, TOK_DIR "/gemma"));
    static const char unit[] = "The quick brown fox jumps over the lazy dog; caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac   tabs\tand 12345. ";
    size_t len = 100 * 1024, k = 0;
    char *text = malloc(len + 1);
    while (k + sizeof unit - 1 <= len) memcpy(text + k, unit, sizeof unit - 1), k += sizeof unit - 1;
    len = k;
    int32_t *ids;
    size_t n, back_len;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    OK(lp_tokenize(tk, text, len, &ids, &n));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    char *back;
    OK(lp_detokenize(tk, ids + 1, n - 1, &back, &back_len));
    cr_expect(back_len == len && memcmp(back, text, len) == 0, "100 KB text does not decode back to itself");
    /* the unit repeats whole, so every repetition but the edges tokenizes alike: check one */
    int32_t *one;
    size_t n_one;
    OK(lp_tokenize(tk, unit, sizeof unit - 1, &one, &n_one));
    cr_expect_gt(n, 100 * (n_one - 1));
    fprintf(stderr, "  long text      %zu bytes -> %zu ids in %.1f ms\n", len, n,
            (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6);
    free(one), free(back), free(ids), free(text);
    lp_tokenizer_free(tk);
}

/* data.prepend_bos: a text's rows, with the BOS the Gemma tokenizer adds. */
Test(tokenizer_spm, rows_start_with_bos) {
    lp_tokenizer *tk;
    OK(lp_tokenizer_load(&tk, TOK_DIR "/gemma"));
    static const char text[] = "It is not the critic who counts; not the man who points out how the strong man stumbles.";
    int32_t *ids, bos = lp_tokenizer_bos(tk);
    size_t n;
    OK(lp_tokenize(tk, text, sizeof text - 1, &ids, &n));
    cr_assert(lp_tokenizer_adds_bos(tk) && ids[0] == bos && n > 20, "%zu ids", n);
    const int32_t *stream = ids + 1; /* the text without the tokenizer's BOS */
    size_t m = n - 1;
    lp_tokens t;
    OK(lp_tokens_from_stream(&t, stream, m, 8, 1024, bos, "text"));
    cr_expect_eq(t.ctx, 8);
    cr_expect_eq(t.n_seq, (int64_t)(m / 7));
    cr_expect_eq(t.dropped, (int64_t)(m % 7));
    for (int64_t r = 0; r < t.n_seq; r++) {
        cr_expect_eq(t.ids[r * 8], bos, "row %lld does not start with BOS", (long long)r);
        cr_expect(memcmp(t.ids + r * 8 + 1, stream + r * 7, 7 * sizeof *stream) == 0, "row %lld", (long long)r);
    }
    lp_tokens_free(&t);
    /* context 0: one row, BOS and the whole text, when it fits */
    OK(lp_tokens_from_stream(&t, stream, m, 0, 1024, bos, "text"));
    cr_expect(t.n_seq == 1 && t.ctx == (int)n && t.dropped == 0 && memcmp(t.ids, ids, n * sizeof *ids) == 0);
    lp_tokens_free(&t);
    /* no BOS: the stream as the tokenizer gave it, cut into rows of 8 (the rows before data.prepend_bos) */
    OK(lp_tokens_from_stream(&t, ids, n, 8, 1024, -1, "text"));
    cr_expect(t.n_seq == (int64_t)(n / 8) && t.dropped == (int64_t)(n % 8) && memcmp(t.ids, ids, (size_t)t.n_seq * 8 * sizeof *ids) == 0);
    lp_tokens_free(&t);
    cr_expect_eq(lp_tokens_from_stream(&t, stream, m, 1, 1024, bos, "text"), LP_ERR_ARG); /* BOS alone predicts nothing */
    cr_expect(strstr(lp_last_error(), "leave nothing to predict") != NULL, "%s", lp_last_error());
    cr_expect_eq(lp_tokens_from_stream(&t, stream, m, 2048, 1024, bos, "text"), LP_ERR_ARG);
    cr_expect_eq(lp_tokens_from_stream(&t, stream, 3, 8, 1024, bos, "text"), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "text: 3 tokens do not fill one row of 8") != NULL, "%s", lp_last_error());
    free(ids);
    lp_tokenizer_free(tk);

    /* the byte-level tokenizers: GPT-2's and SmolLM2's add no BOS (data.prepend_bos auto is
     * off for them); Llama 3's template does */
    static const struct { const char *dir; int adds; } byte_level[] = {{"gpt2", 0}, {"smollm2", 0}, {"qwen2", 0}, {"llama3", 1}};
    for (size_t i = 0; i < sizeof byte_level / sizeof *byte_level; i++) {
        char path[256];
        snprintf(path, sizeof path, "%s/%s", TOK_DIR, byte_level[i].dir);
        OK(lp_tokenizer_load(&tk, path));
        cr_expect_eq(lp_tokenizer_adds_bos(tk), byte_level[i].adds, "%s", byte_level[i].dir);
        lp_tokenizer_free(tk);
    }
}

/* ---- a small Gemma GGUF written here, and layouts that are refused ---- */

static char dir[64];
static void mkdir_tmp(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-spm-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}
static void rm_tmp(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}
static const char *path_in(const char *name) {
    static char p[256];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return p;
}

typedef struct { unsigned char *b; size_t n, cap; } gbuf;
static void put(gbuf *g, const void *p, size_t n) {
    if (g->n + n > g->cap) g->cap = 2 * (g->n + n) + 256, g->b = realloc(g->b, g->cap);
    memcpy(g->b + g->n, p, n);
    g->n += n;
}
static void put_u32(gbuf *g, uint32_t v) { put(g, &v, 4); }
static void put_u64(gbuf *g, uint64_t v) { put(g, &v, 8); }
static void put_str(gbuf *g, const char *s) { put_u64(g, strlen(s)), put(g, s, strlen(s)); }
static void kv_u32(gbuf *g, const char *key, uint32_t v) { put_str(g, key), put_u32(g, LP_GGUF_U32), put_u32(g, v); }

/* Gemma's layout in miniature: control, user-defined ("\n", and "  " stored with spaces),
 * one byte token, no merge list. */
static void write_gemma_gguf(const char *arch) {
    static const char *toks[] = {"<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "\xe2\x96\x81", "ab", "\xe2\x96\x81" "a",
                                 "\xe2\x96\x81" "ab", "  ", "\n", "<0x63>", "<start>"};
    static const int32_t types[] = {3, 3, 3, 2, 1, 1, 1, 1, 1, 1, 4, 4, 6, 3};
    gbuf g = {0};
    put(&g, "GGUF", 4), put_u32(&g, 3), put_u64(&g, 0), put_u64(&g, 7);
    put_str(&g, "general.architecture"), put_u32(&g, LP_GGUF_STRING), put_str(&g, arch);
    put_str(&g, "tokenizer.ggml.model"), put_u32(&g, LP_GGUF_STRING), put_str(&g, "llama");
    put_str(&g, "tokenizer.ggml.tokens"), put_u32(&g, LP_GGUF_ARRAY), put_u32(&g, LP_GGUF_STRING), put_u64(&g, 14);
    for (int i = 0; i < 14; i++) put_str(&g, toks[i]);
    put_str(&g, "tokenizer.ggml.token_type"), put_u32(&g, LP_GGUF_ARRAY), put_u32(&g, LP_GGUF_I32), put_u64(&g, 14);
    put(&g, types, sizeof types);
    kv_u32(&g, "tokenizer.ggml.bos_token_id", 2), kv_u32(&g, "tokenizer.ggml.eos_token_id", 1);
    kv_u32(&g, "tokenizer.ggml.unknown_token_id", 3);
    while (g.n % 32) put(&g, "", 1);
    FILE *f = fopen(path_in("g.gguf"), "wb");
    cr_assert(f && fwrite(g.b, 1, g.n, f) == g.n);
    fclose(f);
    free(g.b);
}

TestSuite(tokenizer_spm_files, .init = mkdir_tmp, .fini = rm_tmp);

Test(tokenizer_spm_files, small_gemma_gguf) {
    write_gemma_gguf("gemma3");
    lp_tokenizer *tk;
    OK(lp_tokenizer_load(&tk, path_in("g.gguf")));
    cr_expect_str_eq(lp_tokenizer_token(tk, 10), "\xe2\x96\x81\xe2\x96\x81");
    /* "ab ab  c\n<start>d" -> ab|▁ab|▁▁|c|\n|<start>|d: "ab" (id 7) merges before "▁a" (8), so
     * ▁ + ab makes ▁ab (9); ▁▁ is the respelled "  " (10); c falls back to <0x63>; "\n" and
     * <start> are matched whole; d has no byte token: unk. BOS by default. transformers'
     * GGUF conversion of the same metadata gives these ids and this decoding. */
    static const char text[] = "ab ab  c\n<start>d";
    static const int32_t want[] = {2, 7, 9, 10, 12, 11, 13, 3};
    int32_t *ids;
    size_t n, len;
    OK(lp_tokenize(tk, text, sizeof text - 1, &ids, &n));
    cr_assert_eq(n, 8);
    for (int i = 0; i < 8; i++) cr_expect_eq(ids[i], want[i], "id %d: %d, want %d", i, ids[i], want[i]);
    char *back;
    OK(lp_detokenize(tk, ids + 1, n - 1, &back, &len));
    cr_expect_str_eq(back, "ab ab  c\n<start><unk>");
    free(back), free(ids);
    lp_tokenizer_free(tk);

    write_gemma_gguf("llama"); /* Llama 2's SentencePiece layout (Metaspace, scores) is another */
    cr_expect_eq(lp_tokenizer_load(&tk, path_in("g.gguf")), LP_ERR_FORMAT);
    cr_expect(strstr(lp_last_error(), "g.gguf") && strstr(lp_last_error(), "Gemma only"), "%s", lp_last_error());
}

/* The Gemma fixture with one field replaced must be refused, naming the file and field. */
static void expect_refused(const char *field, const char *value, const char *phrase) {
    cJSON *j = read_json(TOK_DIR "/gemma/tokenizer.json");
    cJSON_ReplaceItemInObjectCaseSensitive(j, field, cJSON_Parse(value));
    char *s = cJSON_PrintUnformatted(j);
    FILE *f = fopen(path_in("tokenizer.json"), "w");
    fputs(s, f);
    fclose(f);
    free(s);
    cJSON_Delete(j);
    lp_tokenizer *tk = (lp_tokenizer *)1;
    cr_expect_eq(lp_tokenizer_load(&tk, path_in("tokenizer.json")), LP_ERR_FORMAT, "%s", field);
    cr_expect_null(tk);
    cr_expect(strstr(lp_last_error(), "tokenizer.json") && strstr(lp_last_error(), phrase), "'%s' lacks '%s'", lp_last_error(), phrase);
}

Test(tokenizer_spm_files, refused_layouts) {
    expect_refused("pre_tokenizer", "{\"type\":\"Metaspace\",\"replacement\":\"\\u2581\",\"prepend_scheme\":\"first\",\"split\":false}",
                   "pre_tokenizer type 'Metaspace' is not supported");
    expect_refused("normalizer", "{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Prepend\",\"prepend\":\"\\u2581\"}]}",
                   "normalizer.normalizers[] type 'Prepend' is not supported");
    expect_refused("decoder", "{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"ByteFallback\"},{\"type\":\"Strip\"}]}",
                   "decoder step 'Strip' is not supported");
    expect_refused("pre_tokenizer", "{\"type\":\"Split\",\"pattern\":{\"Regex\":\" \"},\"behavior\":\"Isolated\",\"invert\":false}",
                   "pre_tokenizer Split.pattern must be a non-empty String");
    expect_refused("post_processor", "{\"type\":\"RobertaProcessing\"}", "post_processor type 'RobertaProcessing'");
    expect_refused("decoder", "null", "has no decoder");
}
