/* fuzz_tokenizer_json.c: libFuzzer harness for the tokenizer.json reader and the
 * tokenizer_config.json beside it (host/io/tokenizer.c).
 *
 * The input is split at FUZZ_SEP into tokenizer.json, tokenizer_config.json (absent when
 * the input has no second part) and a text. A tokenizer that loads encodes the text (and
 * the text as raw bytes, which may be invalid UTF-8); every id must be inside the
 * vocabulary and decode. A refused file leaves one line naming it. */
#include "fuzz_util.h"
#include "loupe/tokenizer.h"

static volatile uint64_t sink;

static void round_trip(const lp_tokenizer *tk, const char *text, size_t n) {
    int32_t *ids = NULL;
    size_t n_ids = 0;
    if (lp_tokenize(tk, text, n, &ids, &n_ids) != LP_OK) {
        fuzz_check_error(NULL);
        return;
    }
    char *back = NULL;
    size_t len = 0;
    if (lp_detokenize(tk, ids, n_ids, &back, &len) == LP_OK) {
        for (size_t i = 0; i < len; i++) sink += (unsigned char)back[i];
    } else {
        fuzz_check_error(NULL);
    }
    free(back);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *part[3];
    size_t len[3];
    int n = fuzz_split(data, size, part, len, 3);
    const char *path = fuzz_file("tokenizer.json", part[0], len[0]);
    if (n >= 2) fuzz_file("tokenizer_config.json", part[1], len[1]);
    else fuzz_unlink("tokenizer_config.json");
    lp_tokenizer *tk;
    if (lp_tokenizer_from_json(&tk, path) != LP_OK) {
        fuzz_check_error(fuzz_dir());
        return 0;
    }
    static const char fixed[] = "Hello world, 123 <|endoftext|> caf\xc3\xa9  \n\t x";
    round_trip(tk, fixed, sizeof fixed - 1);
    round_trip(tk, (const char *)part[2], len[2]);
    lp_tokenizer_free(tk);
    return 0;
}
