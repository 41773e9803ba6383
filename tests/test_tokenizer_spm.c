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
