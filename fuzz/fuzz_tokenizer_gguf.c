/* fuzz_tokenizer_gguf.c: libFuzzer harness for the GGUF tokenizer path: the GGUF reader
 * (host/io/gguf.c, from memory so ASan sees reads past the input) and the tokenizer built
 * from its tokenizer.ggml.* metadata (host/io/tokenizer.c). A tokenizer that loads encodes and
 * decodes a fixed text; a refusal leaves one line naming the file. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "loupe/gguf.h"
#include "loupe/tokenizer.h"

#define NAME "fuzz-tokenizer.gguf"

static volatile uint64_t sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    lp_gguf *g;
    if (lp_gguf_open_memory(data, size, NAME, &g) != LP_OK) {
        fuzz_check_error(NAME);
        return 0;
    }
    lp_tokenizer *tk;
    if (lp_tokenizer_from_gguf(&tk, g) != LP_OK) {
        fuzz_check_error(NAME);
        lp_gguf_close(g);
        return 0;
    }
    static const char text[] = "Hello world, 123 caf\xc3\xa9 <|im_start|>user\n x";
    int32_t *ids = NULL;
    size_t n = 0;
    if (lp_tokenize(tk, text, sizeof text - 1, &ids, &n) == LP_OK) {
        char *back = NULL;
        size_t len = 0;
        if (lp_detokenize(tk, ids, n, &back, &len) == LP_OK) sink += len;
        else fuzz_check_error(NULL);
        free(back);
    } else {
        fuzz_check_error(NULL);
    }
    free(ids);
    lp_tokenizer_free(tk);
    lp_gguf_close(g);
    return 0;
}
