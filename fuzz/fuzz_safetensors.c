/* fuzz_safetensors.c: libFuzzer harness for the safetensors reader (host/safetensors.c).
 * Built and run by `make fuzz` (scripts/fuzz.sh) with ASan and UBSan.
 *
 * The reader only opens paths, so each input is written to a temporary file (on /dev/shm
 * when it exists) and opened. A file that opens must describe tensors that lie inside the
 * mapping with sizes that match their shapes; every byte of every tensor is read, and each
 * is found again by name. A refused file must leave a one-line message naming it. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/safetensors.h"

static char path[128];
static volatile uint64_t sink;

static void write_input(const uint8_t *data, size_t size) {
    if (!path[0])
        snprintf(path, sizeof path, "%s/loupe-fuzz-%d.safetensors", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp",
                 (int)getpid());
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) abort();
    for (size_t off = 0; off < size;) {
        ssize_t w = write(fd, data + off, size - off);
        if (w <= 0) abort();
        off += (size_t)w;
    }
    close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    write_input(data, size);
    lp_st_file f;
    if (lp_st_open(&f, path) != LP_OK) {
        const char *m = lp_last_error();
        if (strncmp(m, path, strlen(path)) != 0 || strchr(m, '\n')) __builtin_trap();
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
