/* test_lines.c: the line formats a user hands to loupe, and what each refuses:
 *   INI configs  lines of any length (a long comment's tail never becomes a key, a long
 *                value works), LF / CRLF / CR-only endings, a BOM, inline comments as
 *                inih read them, keys set twice, NUL bytes, a directory given as a config;
 *                every committed config in configs/ still loads
 *   JSONL pairs  NUL bytes, two objects on a line, trailing text, ids that are not
 *                integer literals (3.7, 3.0, 1e2), out of the vocabulary, longer than the
 *                context, wrong types, and 100k ids parsed in one linear pass
 *   text files   invalid UTF-8 refused with the file and byte offset
 * Library calls are checked directly; the CLI checks (exit 2, one stderr line naming the
 * file and line) run build/loupe (or $LOUPE_CLI). */
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "loupe/config.h"
#include "loupe/pairs.h"
#include "loupe/textfile.h"
#include "loupe/tokenizer.h"
#include "testutil.h"

#define MODEL LP_FIXTURES "/gpt2-tiny" /* n_ctx 32, vocab 997, no tokenizer */
#define GPT2_TOK LP_FIXTURES "/tokenizer/gpt2/tokenizer.json"

/* ---- INI ---- */

static const lp_key g_keys[] = {
    {"model.path", LP_KEY_STR, NULL, 0, 0, NULL, ""},
    {"cache.out", LP_KEY_STR, NULL, 0, 0, NULL, ""},
    {"cache.hooks", LP_KEY_STR, NULL, 0, 0, NULL, ""},
    {"cache.batch", LP_KEY_INT, "8", 1, 1 << 20, NULL, ""},
    {"cache.dtype", LP_KEY_CHOICE, "f32", 0, 0, "f32|bf16", ""},
};
#define N_KEYS ((int)(sizeof g_keys / sizeof *g_keys))

/* Parses text as "t.ini" into c (initialised here); returns the status. */
static lp_status ini(lp_cfg *c, const char *text, size_t len) {
    lp_cfg_init(c, g_keys, N_KEYS);
    return lp_cfg_parse_buffer(c, text, len, "t.ini");
}
#define INI(c, lit) ini((c), (lit), sizeof(lit) - 1)

static void expect_ini_error(const char *text, size_t len, const char *phrase) {
    lp_cfg c;
    lp_status st = ini(&c, text, len);
    cr_expect_neq(st, LP_OK, "accepted: %.80s", text);
    cr_expect(strstr(lp_last_error(), phrase) != NULL, "'%s' lacks '%s'", lp_last_error(), phrase);
    lp_cfg_free(&c);
}

Test(ini, a_long_comment_never_becomes_a_key) {
    /* inih cut this line at 200 bytes and read its tail as `out = /elsewhere` */
    char text[1024];
    int n = snprintf(text, sizeof text, "[cache]\nout = here\n; %0300d out = /elsewhere\n# %0300d batch = 3\n", 0, 0);
    lp_cfg c;
    cr_assert_eq(ini(&c, text, (size_t)n), LP_OK, "%s", lp_last_error());
    cr_expect_str_eq(lp_cfg_str(&c, "cache.out"), "here");
    cr_expect_eq(lp_cfg_int(&c, "cache.batch"), 8);
    lp_cfg_free(&c);
}

Test(ini, a_5000_byte_value_works) {
    size_t cap = 8192, n = 0;
    char *text = malloc(cap), *want = malloc(cap);
    size_t w = 0;
    for (int i = 0; w < 5000; i++) w += (size_t)sprintf(want + w, "%sblocks.%d.hook_resid_post", i ? "," : "", i % 12);
    n = (size_t)snprintf(text, cap, "[cache]\nhooks = %s\nbatch = 4\n", want);
    lp_cfg c;
    cr_assert_eq(ini(&c, text, n), LP_OK, "%s", lp_last_error());
    cr_expect_str_eq(lp_cfg_str(&c, "cache.hooks"), want);
    cr_expect_eq(lp_cfg_int(&c, "cache.batch"), 4);
    lp_cfg_free(&c);
    free(text), free(want);
}

Test(ini, line_endings_bom_and_inih_syntax) {
    const char *texts[] = {
        "[cache]\nout = a b\nbatch = 4\n",                 /* LF */
        "[cache]\r\nout = a b\r\nbatch = 4\r\n",           /* CRLF */
        "[cache]\rout = a b\rbatch = 4\r",                 /* CR only: inih read one line */
        "\xEF\xBB\xBF[cache]\nout = a b\nbatch = 4",       /* BOM, no final newline */
        "  [ cache ]  ; c\n\tout: a b ; comment\n  batch=4\n", /* indented, `:`, inline ; */
    };
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        lp_cfg c;
        cr_assert_eq(ini(&c, texts[i], strlen(texts[i])), LP_OK, "text %zu: %s", i, lp_last_error());
        cr_expect_str_eq(lp_cfg_str(&c, "cache.out"), "a b", "text %zu", i);
        cr_expect_eq(lp_cfg_int(&c, "cache.batch"), 4, "text %zu", i);
        lp_cfg_free(&c);
    }
    /* as inih: ";" ends a value only after a blank; "#" never does */
    lp_cfg c;
    cr_assert_eq(INI(&c, "[cache]\nout = a;b # c\n"), LP_OK, "%s", lp_last_error());
    cr_expect_str_eq(lp_cfg_str(&c, "cache.out"), "a;b # c");
    lp_cfg_free(&c);
    /* an empty file, or only a BOM, sets nothing */
    cr_expect_eq(INI(&c, ""), LP_OK);
    cr_expect_eq(lp_cfg_str(&c, "cache.out"), NULL);
    lp_cfg_free(&c);
    cr_expect_eq(INI(&c, "\xEF\xBB\xBF"), LP_OK);
    lp_cfg_free(&c);
    /* an empty value is a value */
    cr_expect_eq(INI(&c, "[cache]\nout =\n"), LP_OK);
    cr_expect_str_eq(lp_cfg_str(&c, "cache.out"), "");
    lp_cfg_free(&c);
}

Test(ini, errors_name_the_file_and_line) {
    const char dup[] = "[cache]\nbatch = 2\n; c\n\n[model]\n[cache]\nbatch = 3\n";
    expect_ini_error(dup, sizeof dup - 1, "t.ini:7: 'cache.batch' is set twice (lines 2 and 7)");
    const char dup_cr[] = "[cache]\rout = a\r\rout = b\r";
    expect_ini_error(dup_cr, sizeof dup_cr - 1, "t.ini:4: 'cache.out' is set twice (lines 2 and 4)");
    const char nul[] = "[cache]\nout = a\0b\n";
    expect_ini_error(nul, sizeof nul - 1, "t.ini:2: a NUL byte at column 8");
    const char bad[] = "[cache]\nout = a\nthis line has no separator\n";
    expect_ini_error(bad, sizeof bad - 1, "t.ini:3: malformed line");
    const char nokey[] = "[cache]\n = a\n";
    expect_ini_error(nokey, sizeof nokey - 1, "t.ini:2: malformed line: no key");
    const char sec[] = "[cache] out = a\n";
    expect_ini_error(sec, sizeof sec - 1, "t.ini:1: malformed section header");
    const char open[] = "\n[cache\n";
    expect_ini_error(open, sizeof open - 1, "t.ini:2: malformed section header");
    const char unknown[] = "[cache]\n\n\nhoooks = x\n";
    expect_ini_error(unknown, sizeof unknown - 1, "t.ini:4: unknown config key 'cache.hoooks'");
    const char value[] = "[cache]\nbatch = 8.5\n";
    expect_ini_error(value, sizeof value - 1, "t.ini:2: cache.batch = '8.5' is not an integer");
    /* an indented line is a line of its own, not inih's continuation of the value above */
    const char cont[] = "[cache]\nout = a\n    more words\n";
    expect_ini_error(cont, sizeof cont - 1, "t.ini:3: malformed line");
}

Test(ini, files_directories_and_missing_paths) {
    char dir[] = "/tmp/loupe-ini-XXXXXX";
    cr_assert(mkdtemp(dir));
    lp_cfg c;
    lp_cfg_init(&c, g_keys, N_KEYS);
    cr_expect_eq(lp_cfg_load_ini(&c, dir), LP_ERR_IO);
    cr_expect(strstr(lp_last_error(), "is a directory") && strstr(lp_last_error(), dir), "%s", lp_last_error());
    char p[256];
    snprintf(p, sizeof p, "%s/none.ini", dir);
    cr_expect_eq(lp_cfg_load_ini(&c, p), LP_ERR_IO);
    cr_expect(strstr(lp_last_error(), p) && strstr(lp_last_error(), "No such file"), "%s", lp_last_error());
    snprintf(p, sizeof p, "%s/cr.ini", dir);
    FILE *f = fopen(p, "wb");
    fputs("[cache]\rbatch = 5\r", f);
    fclose(f);
    cr_expect_eq(lp_cfg_load_ini(&c, p), LP_OK, "%s", lp_last_error());
    cr_expect_eq(lp_cfg_int(&c, "cache.batch"), 5);
    lp_cfg_free(&c);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}

/* ---- JSONL prompt pairs ---- */

static lp_pair_opts g_po = {.file = "p.jsonl", .d_vocab = 997, .n_ctx = 32};

static lp_status pair(const char *line, lp_pair *p) { return lp_pair_parse_line(&g_po, line, strlen(line), 3, p); }

static void expect_pair_error(const char *line, size_t len, const char *phrase) {
    lp_pair p;
    lp_status st = lp_pair_parse_line(&g_po, line, len, 3, &p);
    cr_expect_neq(st, LP_OK, "accepted: %.100s", line);
    cr_expect(strncmp(lp_last_error(), "p.jsonl:3: ", 11) == 0, "'%s' does not start with the file and line", lp_last_error());
    cr_expect(strstr(lp_last_error(), phrase) != NULL, "'%s' lacks '%s'", lp_last_error(), phrase);
    cr_expect(p.clean == NULL && p.corrupted == NULL && p.T == 0);
}
#define BAD(lit, phrase) expect_pair_error((lit), sizeof(lit) - 1, (phrase))

Test(pairs, id_lists_and_single_ids) {
    lp_pair p;
    cr_assert_eq(pair("{\"clean\": [1, 2, 3], \"corrupted\": [1, 5, 3], \"answer\": 7, \"wrong_answer\": [8], \"meta\": {\"w\": 0.5}}", &p), LP_OK,
                 "%s", lp_last_error());
    cr_expect_eq(p.T, 3);
    cr_expect(p.clean[0] == 1 && p.clean[2] == 3 && p.corrupted[1] == 5 && p.answer == 7 && p.wrong == 8);
    lp_pair_free(&p);
    /* blank lines (CRLF's CR included) give nothing */
    cr_expect_eq(pair("  \r", &p), LP_OK);
    cr_expect_eq(p.T, 0);
    /* -0 is the integer 0; a CRLF line end is whitespace */
    cr_assert_eq(pair("{\"clean\": [-0, 996], \"corrupted\": [0, 995], \"answer\": 0, \"wrong_answer\": 996}\r", &p), LP_OK, "%s", lp_last_error());
    cr_expect(p.clean[0] == 0 && p.clean[1] == 996);
    lp_pair_free(&p);
    /* pad_left pads the shorter with its own first token */
    g_po.pad_left = 1;
    cr_assert_eq(pair("{\"clean\": [1, 2, 3], \"corrupted\": [5, 6], \"answer\": 7, \"wrong_answer\": 8}", &p), LP_OK, "%s", lp_last_error());
    cr_expect(p.T == 3 && p.corrupted[0] == 5 && p.corrupted[1] == 5 && p.corrupted[2] == 6);
    lp_pair_free(&p);
    g_po.pad_left = 0;
}

/* An empty prompt has no first token to pad with (pad_left once padded with an
 * uninitialised one: fuzz/corpus/pairs/regress-pad-left-empty-clean) and no last position
 * to score: a bad line, under either alignment, before any padding. */
Test(pairs, an_empty_prompt_is_a_bad_line_before_any_padding) {
    for (int pad = 0; pad < 2; pad++) {
        g_po.pad_left = pad;
        BAD("{\"clean\": [], \"corrupted\": [2, 1, 1], \"answer\": 3, \"wrong_answer\": 4}", "'clean' gives no tokens");
        BAD("{\"clean\": [2, 1, 1], \"corrupted\": [], \"answer\": 3, \"wrong_answer\": 4}", "'corrupted' gives no tokens");
        BAD("{\"clean\": [], \"corrupted\": [], \"answer\": 3, \"wrong_answer\": 4}", "'clean' gives no tokens");
    }
    g_po.pad_left = 0;
    /* text that tokenizes to nothing (GPT-2 adds no BOS) */
    lp_tokenizer *tk;
    cr_assert_eq(lp_tokenizer_from_json(&tk, GPT2_TOK), LP_OK, "%s", lp_last_error());
    lp_pair_opts o = {.file = "p.jsonl", .tk = tk, .d_vocab = 3000, .n_ctx = 12, .pad_left = 1};
    lp_pair p;
    const char empty[] = "{\"clean\": \"When Mary\", \"corrupted\": \"\", \"answer\": \" the\", \"wrong_answer\": \" a\"}";
    cr_expect_eq(lp_pair_parse_line(&o, empty, sizeof empty - 1, 2, &p), LP_ERR_ARG);
    cr_expect(strcmp(lp_last_error(), "p.jsonl:2: 'corrupted' gives no tokens") == 0, "%s", lp_last_error());
    cr_expect(p.clean == NULL && p.corrupted == NULL && p.T == 0);
    lp_tokenizer_free(tk);
}

Test(pairs, refuses_what_it_cannot_read_exactly) {
    BAD("{\"clean\": [1, 2], \"corrupted\": [1,\0 2], \"answer\": 7, \"wrong_answer\": 8}", "a NUL byte at column 35");
    BAD("{\"clean\": [1], \"corrupted\": [2], \"answer\": 7, \"wrong_answer\": 8}{\"clean\": [1]}", "a second JSON value at column 65");
    BAD("{\"clean\": [1], \"corrupted\": [2], \"answer\": 7, \"wrong_answer\": 8} {}", "a second JSON value at column 66");
    BAD("{\"clean\": [1], \"corrupted\": [2], \"answer\": 7, \"wrong_answer\": 8} x", "text after the JSON object at column 66");
    BAD("{\"clean\": [1], \"corrupted\": [2]", "not valid JSON");
    BAD("[1, 2]", "not a JSON object");
    /* ids must be integer literals: cJSON alone would give 3 for 3.0 and 3.0000000000000001 */
    BAD("{\"clean\": [1, 2, 3.7], \"corrupted\": [1, 2, 3], \"answer\": 7, \"wrong_answer\": 8}", "'clean'[2]: 3.7 is not an integer token id");
    BAD("{\"clean\": [1, 2, 3], \"corrupted\": [1, 3.0, 3], \"answer\": 7, \"wrong_answer\": 8}", "'corrupted'[1]: 3.0 is not an integer token id");
    BAD("{\"clean\": [1, 2, 3], \"corrupted\": [1, 3.0000000000000001, 3], \"answer\": 7, \"wrong_answer\": 8}",
        "'corrupted'[1]: 3.0000000000000001 is not");
    BAD("{\"clean\": [1], \"corrupted\": [2], \"answer\": 1e2, \"wrong_answer\": 8}", "'answer': 1e2 is not an integer token id");
    BAD("{\"clean\": [1], \"corrupted\": [2], \"answer\": [7], \"wrong_answer\": [8E0]}", "'wrong_answer'[0]: 8E0 is not");
    /* a non-integer elsewhere (metadata) is not an id; the ids after it are still checked each by its own literal */
    lp_pair p;
    cr_expect_eq(pair("{\"w\": [0.5, {\"x\": 1.5}], \"clean\": [1, 2], \"corrupted\": [1, 3], \"answer\": 7, \"wrong_answer\": 8, \"z\": 2.5}", &p), LP_OK,
                 "%s", lp_last_error());
    lp_pair_free(&p);
    BAD("{\"w\": [0.5, 1.5], \"clean\": [1, 2, 4.0], \"corrupted\": [1, 3, 4], \"answer\": 7, \"wrong_answer\": 8}", "'clean'[2]: 4.0 is not");
    BAD("{\"clean\": [1, 997], \"corrupted\": [1, 2], \"answer\": 7, \"wrong_answer\": 8}", "'clean'[1]: token id 997 is not in [0, 997)");
    BAD("{\"clean\": [1, 2], \"corrupted\": [-1, 2], \"answer\": 7, \"wrong_answer\": 8}", "'corrupted'[0]: token id -1 is not in [0, 997)");
    BAD("{\"clean\": [1], \"corrupted\": [2], \"answer\": 99999999999999999999, \"wrong_answer\": 8}", "'answer': token id 1e+20 is not in");
    BAD("{\"clean\": [1, \"a\"], \"corrupted\": [1, 2], \"answer\": 7, \"wrong_answer\": 8}", "'clean'[1]: not a token id");
    BAD("{\"clean\": true, \"corrupted\": [1, 2], \"answer\": 7, \"wrong_answer\": 8}", "'clean' must be text or a list of token ids");
    BAD("{\"clean\": [1], \"corrupted\": [2], \"answer\": [7, 9], \"wrong_answer\": 8}", "'answer' is 2 tokens, not one");
    BAD("{\"clean\": [1], \"corrupted\": [2], \"answer\": 7}", "missing \"wrong_answer\"");
    BAD("{\"clean\": [1], \"clean\": [3], \"corrupted\": [2], \"answer\": 7, \"wrong_answer\": 8}", "\"clean\" is given twice");
    BAD("{\"clean\": [1, 2], \"corrupted\": [1], \"answer\": 7, \"wrong_answer\": 8}", "clean is 2 tokens and corrupted 1");
    BAD("{\"clean\": \"text\", \"corrupted\": [1], \"answer\": 7, \"wrong_answer\": 8}", "'clean' is text but the model has no tokenizer");
}

/* A line of n ids: {"clean": [..n..], "corrupted": [..n..], "answer": 1, "wrong_answer": 2}. */
static char *long_line(size_t n, size_t *len) {
    char *s = malloc(16 * n + 128);
    cr_assert(s);
    size_t o = (size_t)sprintf(s, "{\"clean\": [");
    for (int f = 0; f < 2; f++) {
        for (size_t i = 0; i < n; i++) o += (size_t)sprintf(s + o, "%s%zu", i ? ", " : "", (i * 7919 + (size_t)f) % 997);
        o += (size_t)sprintf(s + o, f ? "], " : "], \"corrupted\": [");
    }
    o += (size_t)sprintf(s + o, "\"answer\": 1, \"wrong_answer\": 2}");
    *len = o;
    return s;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* 100k ids: refused against a context of 32 before any list is built, parsed when the
 * context allows them. Walking the arrays by index made this quadratic (19 s); the times
 * are printed, not asserted (speed lives in benchmarks). */
Test(pairs, long_id_lists_are_linear) {
    size_t len;
    char *s = long_line(100000, &len);
    lp_pair p;
    double t0 = now();
    cr_expect_eq(lp_pair_parse_line(&g_po, s, len, 3, &p), LP_ERR_ARG);
    double t1 = now();
    cr_expect(strstr(lp_last_error(), "the prompts are 100000 tokens; the model's context is 32 ('clean')"), "%s", lp_last_error());
    lp_pair_opts big = g_po;
    big.n_ctx = 100000;
    cr_assert_eq(lp_pair_parse_line(&big, s, len, 3, &p), LP_OK, "%s", lp_last_error());
    double t2 = now();
    cr_expect_eq(p.T, 100000);
    cr_expect(p.clean[99999] == (int32_t)((99999ull * 7919) % 997) && p.corrupted[99999] == (int32_t)((99999ull * 7919 + 1) % 997));
    lp_pair_free(&p);
    free(s);
    size_t len1 = len;
    /* a 15 MB line */
    s = long_line(1500000, &len);
    double t3 = now();
    cr_expect_eq(lp_pair_parse_line(&g_po, s, len, 3, &p), LP_ERR_ARG);
    double t4 = now();
    fprintf(stderr, "pairs: a 100k-id line (%.1f MB) refused in %.3f s, parsed in %.3f s; a %.1f MB line refused in %.3f s\n", len1 / 1e6,
            t1 - t0, t2 - t1, len / 1e6, t4 - t3);
    free(s);
}

Test(pairs, text_fields_through_the_tokenizer) {
    lp_tokenizer *tk;
    cr_assert_eq(lp_tokenizer_from_json(&tk, GPT2_TOK), LP_OK, "%s", lp_last_error());
    lp_pair_opts o = {.file = "p.jsonl", .tk = tk, .d_vocab = 3000, .n_ctx = 12};
    lp_pair p;
    const char ok[] = "{\"clean\": \"When Mary and John\", \"corrupted\": \"When John and Mary\", \"answer\": \" the\", \"wrong_answer\": \" a\"}";
    cr_assert_eq(lp_pair_parse_line(&o, ok, sizeof ok - 1, 1, &p), LP_OK, "%s", lp_last_error());
    int32_t *ids;
    size_t n;
    cr_assert_eq(lp_tokenize(tk, "When Mary and John", 18, &ids, &n), LP_OK);
    cr_expect(p.T == (int)n && memcmp(p.clean, ids, n * sizeof *ids) == 0, "T %d, %zu tokens", p.T, n);
    free(ids);
    cr_expect_neq(p.answer, p.wrong);
    lp_pair_free(&p);
    const char nul[] = "{\"clean\": \"When Mary\\u0000 and John\", \"corrupted\": \"When John and Mary\", \"answer\": \" the\", \"wrong_answer\": \" a\"}";
    cr_expect_neq(lp_pair_parse_line(&o, nul, sizeof nul - 1, 1, &p), LP_OK);
    cr_expect(strstr(lp_last_error(), "p.jsonl:1: a \\u0000 (NUL) escape in a string at column 21"), "%s", lp_last_error());
    const char utf[] = "{\"clean\": \"When \xff Mary\", \"corrupted\": \"When John\", \"answer\": \" the\", \"wrong_answer\": \" a\"}";
    cr_expect_neq(lp_pair_parse_line(&o, utf, sizeof utf - 1, 1, &p), LP_OK);
    cr_expect(strstr(lp_last_error(), "p.jsonl:1: 'clean': not valid UTF-8: byte 0xff at offset 5"), "%s", lp_last_error());
    const char lng[] = "{\"clean\": \"a a a a a a a a a a a a a a a\", \"corrupted\": \"a a a a a a a a a a a a a a a\", \"answer\": \" the\", \"wrong_answer\": \" a\"}";
    cr_expect_neq(lp_pair_parse_line(&o, lng, sizeof lng - 1, 1, &p), LP_OK);
    cr_expect(strstr(lp_last_error(), "tokens; the model's context is 12 ('clean')"), "%s", lp_last_error());
    lp_tokenizer_free(tk);
}

/* ---- UTF-8 ---- */

Test(text, utf8_check_names_the_offset) {
    const struct { const char *s; size_t n, bad; } c[] = {
        {"plain", 5, 5},
        {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", 14, 14},
        {"ab\xff", 3, 2},
        {"\xc0\x80", 2, 0},             /* overlong NUL */
        {"x\xed\xa0\x80", 4, 1},        /* a surrogate */
        {"xy\xf4\x90\x80\x80", 6, 2},   /* past U+10FFFF */
        {"abc\xe2\x82", 5, 3},          /* cut short at the end */
        {"a\0b", 3, 3},                 /* NUL is valid UTF-8 */
    };
    for (size_t i = 0; i < sizeof c / sizeof *c; i++) cr_expect_eq(lp_utf8_invalid_at(c[i].s, c[i].n), c[i].bad, "case %zu", i);
    cr_expect_eq(lp_utf8_check("ab\xff", 3, "book.txt"), LP_ERR_FORMAT);
    cr_expect_str_eq(lp_last_error(), "book.txt: not valid UTF-8: byte 0xff at offset 2");
}

/* ---- through the CLI ---- */

static char dir[64];
#include "clitest.h"

static void mk(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-lines-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}
static void rm(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
}
TestSuite(cli_lines, .init = mk, .fini = rm, .timeout = 120);


static const char *tmp(const char *name) {
    static char p[4][256];
    static int i;
    i = (i + 1) % 4;
    snprintf(p[i], sizeof p[i], "%s/%s", dir, name);
    return p[i];
}

static void write_file(const char *path, const char *text, size_t n) {
    FILE *f = fopen(path, "wb");
    cr_assert(f);
    cr_assert_eq(fwrite(text, 1, n, f), n);
    fclose(f);
}

/* Exit 2 and exactly one line on stderr holding every phrase (NULL-terminated list). */
static void expect_one_line(int rc, const char *const *phrases) {
    cr_expect_eq(rc, 2, "exit %d; stderr: %s", rc, err_txt);
    for (int i = 0; phrases[i]; i++) cr_expect(strstr(err_txt, phrases[i]) != NULL, "stderr '%s' lacks '%s'", err_txt, phrases[i]);
    char *nl = strchr(err_txt, '\n');
    cr_expect(nl && nl[1] == 0, "stderr is not one line: '%s'", err_txt);
}

Test(cli_lines, configs_long_lines_cr_endings_directories) {
    /* a long comment whose tail reads as a key, then 5000 bytes of hooks: the cache goes
     * where cache.out says, with every hook */
    size_t cap = 16384, o = 0;
    char *text = malloc(cap);
    o += (size_t)snprintf(text + o, cap - o, "[model]\npath = " MODEL "\n[data]\ntokens = " MODEL "/tokens.npy\n[cache]\n");
    o += (size_t)snprintf(text + o, cap - o, "; %0300d out = %s\nout = %s\nhooks = ", 0, tmp("evil"), tmp("store"));
    for (int i = 0; o < 5200; i++) o += (size_t)snprintf(text + o, cap - o, "%sblocks.%d.hook_resid_post", i ? "," : "", i % 2);
    o += (size_t)snprintf(text + o, cap - o, ",blocks.1.attn.hook_z\n");
    write_file(tmp("long.ini"), text, o);
    free(text);
    cr_assert_eq(loupe("cache %s", tmp("long.ini")), 0, "%s", err_txt);
    cr_expect(strstr(out_txt, "cached 3 hooks") != NULL, "%s", out_txt);
    struct stat sb;
    cr_expect(stat(tmp("store"), &sb) == 0, "no store at cache.out");
    cr_expect(stat(tmp("evil"), &sb) != 0, "the comment's tail was read as cache.out");
    /* CR-only line endings */
    const char cr[] = "[model]\rpath = " MODEL "\r";
    write_file(tmp("cr.ini"), cr, sizeof cr - 1);
    cr_expect_eq(loupe("info %s", tmp("cr.ini")), 0, "%s", err_txt);
    /* a directory given as the config */
    cr_assert(mkdir(tmp("d.ini"), 0755) == 0);
    expect_one_line(loupe("info %s", tmp("d.ini")), (const char *[]){tmp("d.ini"), ": is a directory", NULL});
    /* a key set twice */
    const char dup[] = "[model]\npath = " MODEL "\n\n[model]\npath = " MODEL "\n";
    write_file(tmp("dup.ini"), dup, sizeof dup - 1);
    expect_one_line(loupe("info %s", tmp("dup.ini")), (const char *[]){"dup.ini:5: 'model.path' is set twice (lines 2 and 5)", NULL});
}

/* Every committed config still reads: the config loads before the flags, so an unknown
 * flag is the first (and only) complaint. */
Test(cli_lines, committed_configs_read) {
    const char *cfgs[] = {"attrib_factual", "attrib_ioi", "cache_gpt2", "cache_smollm2", "sae_batchtopk",
                          "sae_jumprelu", "sae_standard", "sae_topk", "transcoder_topk"};
    for (size_t i = 0; i < sizeof cfgs / sizeof *cfgs; i++)
        expect_one_line(loupe("info configs/%s.ini --no.such_key=1", cfgs[i]), (const char *[]){"unknown config key 'no.such_key'", NULL});
}

Test(cli_lines, text_files_and_pair_files) {
    /* invalid UTF-8 in a text file: named with the byte offset, before any tokenizer */
    write_file(tmp("bad.txt"), "hello \xff world", 13);
    expect_one_line(loupe("tokenize " MODEL " --text %s --out x.npy", tmp("bad.txt")),
                    (const char *[]){tmp("bad.txt"), ": not valid UTF-8: byte 0xff at offset 6", NULL});
    expect_one_line(loupe("tokenize " MODEL " --text %s --out x.npy", dir), (const char *[]){": is a directory, not a text file", NULL});
    expect_one_line(loupe("generate " MODEL " --prompt '%s'", "ab\xff"), (const char *[]){"gen.prompt: not valid UTF-8: byte 0xff at offset 2", NULL});
    /* pairs: every bad line listed with its number, on one line naming the file */
    const char pairs[] = "{\"clean\": [1, 2], \"corrupted\": [1,\0 2], \"answer\": 7, \"wrong_answer\": 8}\n"
                         "\n"
                         "{\"clean\": [1], \"corrupted\": [2], \"answer\": 7, \"wrong_answer\": 8}{\"clean\": [1]}\n"
                         "{\"clean\": [1, 3.7], \"corrupted\": [1, 2], \"answer\": 7, \"wrong_answer\": 8}\r\n"
                         "{\"clean\": [1, 2000], \"corrupted\": [1, 2], \"answer\": 7, \"wrong_answer\": 8}\n";
    write_file(tmp("p.jsonl"), pairs, sizeof pairs - 1);
    int rc = loupe("attribute " MODEL " --attrib.pairs=%s --attrib.out=%s", tmp("p.jsonl"), tmp("atp"));
    expect_one_line(rc, (const char *[]){tmp("p.jsonl"), "4 bad lines", "line 1 (a NUL byte at column 35)", "line 3 (a second JSON value at column 65",
                                         "line 4 ('clean'[1]: 3.7 is not an integer token id)", "line 5 ('clean'[1]: token id 2000 is not in [0, 997))", NULL});
    cr_expect(strstr(out_txt, "0 pairs done") != NULL, "%s", out_txt);
    expect_one_line(loupe("attribute " MODEL " --attrib.pairs=%s --attrib.out=%s", dir, tmp("atp")),
                    (const char *[]){": is a directory, not a pairs file", NULL});
}
