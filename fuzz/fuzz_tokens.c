/* fuzz_tokens.c: libFuzzer harness for the token-file reader (host/io/tokens.c): .npy
 * headers and data, and raw .bin streams in each id type.
 *
 * The first input byte picks the file kind and the row length: bits 0-2 choose .npy or
 * .bin with int32/int64/uint16/uint32 ids (or a dtype that is refused), bit 3 strict data.context, the next byte the
 * context (0-255). The rest is the file. A file that loads must hold n_seq rows of ctx ids
 * inside [0, 2^31), all readable; a refused one leaves one line naming the file. */
#include "fuzz_util.h"
#include "loupe/tokens.h"

static volatile uint64_t sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    static const char *const bin_types[] = {"int32", "int64", "uint16", "uint32", "int8"};
    int kind = data[0] & 7, strict = data[0] >> 3 & 1, context = data[1];
    const char *name = kind == 0 || kind > 5 ? "t.npy" : "t.bin";
    const char *path = fuzz_file(name, data + 2, size - 2);
    lp_tokens t;
    lp_status st = lp_tokens_load(&t, path, context, strict, kind >= 1 && kind <= 5 ? bin_types[kind - 1] : NULL);
    if (st != LP_OK) {
        fuzz_check_error(kind == 5 ? NULL : path); /* "int8" is refused by its key, data.token_dtype */
        return 0;
    }
    if (t.n_seq <= 0 || t.ctx <= 0 || !t.ids) __builtin_trap();
    uint64_t h = 0;
    for (int64_t i = 0; i < t.n_seq * t.ctx; i++) {
        if (t.ids[i] < 0) __builtin_trap();
        h += (uint64_t)t.ids[i];
    }
    sink += h;
    if (lp_tokens_check(&t, 1000, path) != LP_OK) fuzz_check_error(path);
    lp_tokens_free(&t);
    return 0;
}
