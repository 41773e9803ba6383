/* fuzz_safetensors.c: libFuzzer harness for the safetensors reader (host/io/safetensors.c).
 * Built and run by `make fuzz` (scripts/fuzz.sh) with ASan and UBSan.
 *
 * The reader only opens paths, so each input is written to a file in the harness's
 * directory on /dev/shm (fuzz_util.h) and opened. A file that opens must describe tensors
 * that lie inside the mapping with sizes that match their shapes; every byte of every tensor is read, and each
 * is found again by name. A refused file must leave a one-line message naming it. */
#include "fuzz_util.h"
#include "loupe/safetensors.h"

static volatile uint64_t sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_file("input.safetensors", data, size);
    lp_st_file f;
    if (lp_st_open(&f, path) != LP_OK) {
        if (strncmp(lp_last_error(), path, strlen(path)) != 0) __builtin_trap();
        fuzz_check_error(path);
        return 0;
    }
    const uint8_t *lo = f.map, *hi = lo + f.size;
    for (int i = 0; i < f.n; i++) {
        const lp_st_tensor *t = &f.tensors[i];
        const uint8_t *p = t->data;
        if (p < lo || p > hi || t->nbytes > (size_t)(hi - p)) __builtin_trap();
        if ((size_t)lp_shape_numel(t->shape, t->ndim) * lp_dtype_size(t->dtype) != t->nbytes) __builtin_trap();
        if (lp_st_find(&f, t->name) == NULL) __builtin_trap();
        uint64_t h = 0;
        for (size_t j = 0; j < t->nbytes; j++) h += p[j];
        sink += h;
    }
    lp_st_close(&f);
    return 0;
}
