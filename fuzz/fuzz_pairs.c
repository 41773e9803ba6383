/* fuzz_pairs.c: libFuzzer harness for the prompt files of `loupe attribute` / `loupe patch`
 * (lp_pair_parse_line, host/io/pairs.c, padding included) and `loupe lens`
 * (lp_prompt_parse_line), and for the output directory a sweep resumes from
 * (sweep_out_open: results.jsonl cut back to whole lines, scores files reconciled with it),
 * which is static in the CLI: the harness includes host/cli/sweep_out.c.
 *
 * The first input byte picks the mode: bit 0 pad_left (attrib.align), bit 1 lens prompts
 * instead of pairs. The rest is split at FUZZ_SEP into the prompts file, results.jsonl and
 * scores-atp-000000.safetensors (left out when empty). Each line of the prompts file is
 * parsed the way the CLI does. The vocabulary is the byte-level BPE of
 * fuzz/corpus/tokenizer_json/seed-plain.json (6 tokens, no BOS), the context 16 tokens.
 * What is kept must have ids inside the vocabulary and a length in [1, 16]; an empty
 * prompt (an empty id list or empty text) is refused before any padding; a refusal is one
 * line starting "FILE:LINE: ". */
#include <cjson/cJSON.h>

#include "../host/cli/sweep_out.c"
#include "fuzz_util.h"
#include "loupe/pairs.h"

#define VOCAB 6
#define CTX 16

static const char TOKENIZER[] =
    "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2,\"\xc4\xa0\":3,\"c\":4,\"<|endoftext|>\":5},"
    "\"merges\":[\"a b\"]},\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true},"
    "\"added_tokens\":[{\"content\":\"<|endoftext|>\",\"special\":true}]}";

static int ids_ok(const int32_t *ids, int T) {
    for (int t = 0; t < T; t++)
        if (ids[t] < 0 || ids[t] >= VOCAB) return 0;
    return 1;
}

/* A field of the line that is an empty prompt: [] or "" (this tokenizer adds no BOS). */
static int has_empty_prompt(const char *line, size_t n, const char *const *fields, int nf) {
    cJSON *j = cJSON_ParseWithLength(line, n);
    int empty = 0;
    for (int i = 0; i < nf && j; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, fields[i]);
        empty |= (cJSON_IsArray(v) && !v->child) || (cJSON_IsString(v) && !v->valuestring[0]);
    }
    cJSON_Delete(j);
    return empty;
}

static void check_refusal(const char *path, int line_no) {
    fuzz_check_error(path);
    char at[600];
    snprintf(at, sizeof at, "%s:%d: ", path, line_no);
    if (strncmp(lp_last_error(), at, strlen(at)) != 0) __builtin_trap();
}

static int blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!strchr(" \t\r\n", s[i])) return 0;
    return 1;
}

/* One line as a pair (lens == 0) or a lens prompt; returns 1 when it counts as an entry
 * (a pair or a bad line), 0 when blank. */
static int one_line(const lp_pair_opts *po, int lens, const char *ln, size_t n, int line_no) {
    static const char *const pair_fields[] = {"clean", "corrupted"}, *const prompt_fields[] = {"prompt"};
    if (lens) {
        lp_prompt q;
        if (lp_prompt_parse_line(po, ln, n, line_no, &q) != LP_OK) {
            check_refusal(po->file, line_no);
            return 1;
        }
        if (q.T == 0) {
            if (!blank(ln, n)) __builtin_trap();
            return 0;
        }
        if (q.T < 1 || q.T > CTX || !ids_ok(q.ids, q.T) || q.pos < 0 || q.pos >= q.T || q.answer < -1 || q.answer >= VOCAB ||
            q.wrong < -1 || q.wrong >= VOCAB || (q.wrong >= 0 && q.answer < 0) || has_empty_prompt(ln, n, prompt_fields, 1))
            __builtin_trap();
        lp_prompt_free(&q);
        return 1;
    }
    lp_pair q;
    if (lp_pair_parse_line(po, ln, n, line_no, &q) != LP_OK) {
        check_refusal(po->file, line_no);
        return 1;
    }
    if (q.T == 0) {
        if (!blank(ln, n)) __builtin_trap();
        return 0;
    }
    if (q.T < 1 || q.T > CTX || !ids_ok(q.clean, q.T) || !ids_ok(q.corrupted, q.T) || q.answer < 0 || q.answer >= VOCAB ||
        q.wrong < 0 || q.wrong >= VOCAB || has_empty_prompt(ln, n, pair_fields, 2))
        __builtin_trap();
    lp_pair_free(&q);
    return 1;
}

/* The resumed output directory: results.jsonl (and a scores file) against n_max pairs. */
static void resume(const uint8_t *results, size_t nr, const uint8_t *scores, size_t ns, int n_max) {
    char dir[512];
    fuzz_path(dir, sizeof dir, "out/x");
    dir[strlen(dir) - 2] = 0;
    nftw(dir, fuzz_rm, 16, FTW_DEPTH | FTW_PHYS); /* the last input's files */
    mkdir(dir, 0700);
    const char *path = fuzz_file("out/results.jsonl", results, nr);
    if (ns) fuzz_file("out/scores-atp-000000.safetensors", scores, ns);
    static const char *const methods[] = {"atp", NULL};
    sweep_out r;
    lp_status st = sweep_out_open(&r, dir, n_max, methods);
    if (st != LP_OK) {
        fuzz_check_error(dir);
    } else {
        size_t len;
        char *txt = lp_read_file(path, &len); /* what is left is whole lines */
        if (!txt || (len && txt[len - 1] != '\n')) __builtin_trap();
        free(txt);
    }
    sweep_out_close(&r, st);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static lp_tokenizer *tk;
    if (!tk && lp_tokenizer_from_json(&tk, fuzz_file("tok/tokenizer.json", TOKENIZER, sizeof TOKENIZER - 1)) != LP_OK) abort();
    if (size < 1) return 0;
    const uint8_t *part[3];
    size_t len[3];
    fuzz_split(data + 1, size - 1, part, len, 3);
    const char *path = fuzz_file("pairs.jsonl", part[0], len[0]);
    lp_pair_opts po = {.file = path, .tk = tk, .d_vocab = VOCAB, .n_ctx = CTX, .pad_left = data[0] & 1};
    int lens = (data[0] >> 1) & 1, line = 0, entries = 0;
    const char *txt = (const char *)part[0];
    for (size_t pos = 0; pos < len[0];) { /* as host/cli/attrib.c reads the file */
        const char *ln = txt + pos, *nl = memchr(ln, '\n', len[0] - pos);
        size_t n = nl ? (size_t)(nl - ln) : len[0] - pos;
        pos += n + 1;
        entries += one_line(&po, lens, ln, n, ++line);
    }
    resume(part[1], len[1], part[2], len[2], entries);
    return 0;
}
