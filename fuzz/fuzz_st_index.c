/* fuzz_st_index.c: libFuzzer harness for the sharded-checkpoint index reader
 * (lp_st_set_open, host/io/safetensors.c) on its own, with real shards beside it.
 *
 * The input is split at FUZZ_SEP into model.safetensors.index.json and two shard files,
 * a.safetensors and b.safetensors. A set that opens has every tensor inside its shard's
 * mapping and found again by name; a refusal leaves one line naming a file there. */
#include "fuzz_util.h"
#include "loupe/safetensors.h"

static volatile uint64_t sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *part[3];
    size_t len[3];
    fuzz_split(data, size, part, len, 3);
    char dir[256];
    fuzz_path(dir, sizeof dir, "idx/");
    dir[strlen(dir) - 1] = 0;
    fuzz_file("idx/model.safetensors.index.json", part[0], len[0]);
    fuzz_file("idx/a.safetensors", part[1], len[1]);
    fuzz_file("idx/b.safetensors", part[2], len[2]);
    lp_st_set s;
    if (lp_st_set_open(&s, dir) != LP_OK) {
        fuzz_check_error(dir);
        return 0;
    }
    for (int i = 0; i < s.n; i++) {
        const lp_st_file *f = &s.files[i];
        const uint8_t *lo = f->map, *hi = lo + f->size;
        for (int j = 0; j < f->n; j++) {
            const lp_st_tensor *t = &f->tensors[j];
            const uint8_t *p = t->data;
            if (p < lo || p > hi || t->nbytes > (size_t)(hi - p)) __builtin_trap();
            if (!lp_st_set_find(&s, t->name, NULL)) __builtin_trap();
            if (t->nbytes) sink += p[0] + p[t->nbytes - 1];
        }
    }
    lp_st_set_close(&s);
    return 0;
}
