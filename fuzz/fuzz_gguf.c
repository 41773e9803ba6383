/* fuzz_gguf.c: libFuzzer harness for the GGUF reader (host/io/gguf.c) and the CPU
 * dequantizers. Built and run by `make fuzz` (scripts/fuzz.sh) with ASan and UBSan.
 *
 * The input is opened from memory (lp_gguf_open_memory): libFuzzer's buffer is exactly the
 * input's size, so ASan sees any read past its end, which an mmap of a file would hide in
 * the zero-filled tail of the last page. A file that opens is then used the way the model
 * loader uses it: every key through every getter, the first and last element of every
 * array, every tensor found by name and dequantized (up to a size cap) to F32 and F16.
 * A refused file must leave a one-line message naming it. Any crash, sanitizer report or
 * broken invariant (__builtin_trap) is a finding. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/gguf.h"

#define NAME "fuzz.gguf"
#define MAX_DEQUANT (1 << 16) /* elements per tensor; keeps each run fast */

static volatile uint64_t sink;

static void touch(const char *s, size_t len) {
    uint64_t h = 0;
    for (size_t i = 0; i < len; i++) h = h * 31 + (unsigned char)s[i];
    sink += h;
}

static void use_key(const lp_gguf *g, const char *key) {
    int64_t v;
    double d;
    const char *s;
    size_t len;
    lp_gguf_vtype et;
    uint64_t n;
    if (!lp_gguf_has(g, key)) __builtin_trap();
    if (lp_gguf_get_int(g, key, &v) == LP_OK) sink += (uint64_t)v;
    if (lp_gguf_get_float(g, key, &d) == LP_OK) sink += d == d;
    if (lp_gguf_get_str(g, key, &s, &len) == LP_OK) touch(s, len);
    if (lp_gguf_get_arr(g, key, &et, &n) != LP_OK) return;
    uint64_t idx[3] = {0, n / 2, n ? n - 1 : 0};
    for (int k = 0; k < 3; k++) {
        if (lp_gguf_arr_int(g, key, idx[k], &v) == LP_OK) sink += (uint64_t)v;
        if (lp_gguf_arr_float(g, key, idx[k], &d) == LP_OK) sink += d == d;
        if (lp_gguf_arr_str(g, key, idx[k], &s, &len) == LP_OK) touch(s, len);
    }
    if (lp_gguf_arr_int(g, key, n, &v) == LP_OK) __builtin_trap(); /* one past the end */
}

static void use_tensor(const lp_gguf *g, const lp_gguf_tensor *t, const uint8_t *data, size_t size) {
    static lp_ctx cpu;
    static int ready;
    if (!ready) {
        if (lp_ctx_init(&cpu, LP_CPU, LP_F32) != LP_OK) __builtin_trap();
        ready = 1;
    }
    if (lp_gguf_find_tensor(g, t->name) != t) __builtin_trap();
    const uint8_t *p = t->data;
    if (p < data || t->n_bytes > size || (size_t)(p - data) > size - t->n_bytes) __builtin_trap();
    if (t->n_dims < 1 || t->n_dims > 4 || t->n_bytes != lp_ggml_bytes(t->type, t->n_elems)) __builtin_trap();
    if (!lp_ggml_supported(t->type) || t->n_elems > MAX_DEQUANT) return;
    float *y = malloc((size_t)t->n_elems * sizeof *y);
    uint16_t *h = malloc((size_t)t->n_elems * sizeof *h);
    if (y && h) {
        if (lp_dequant(&cpu, y, LP_F32, t->data, t->type, t->n_elems) != LP_OK) __builtin_trap();
        if (lp_dequant(&cpu, h, LP_F16, t->data, t->type, t->n_elems) != LP_OK) __builtin_trap();
        uint32_t bits;
        memcpy(&bits, &y[t->n_elems - 1], 4);
        sink += bits + h[0];
    }
    free(y);
    free(h);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    lp_gguf *g = NULL;
    if (lp_gguf_open_memory(data, size, NAME, &g) != LP_OK) {
        const char *m = lp_last_error();
        if (g != NULL || strncmp(m, NAME ": ", strlen(NAME) + 2) != 0 || strchr(m, '\n')) __builtin_trap();
        return 0;
    }
    for (int i = 0; i < lp_gguf_n_kv(g); i++) use_key(g, lp_gguf_key_at(g, i));
    for (int i = 0; i < lp_gguf_n_tensors(g); i++) use_tensor(g, lp_gguf_tensor_at(g, i), data, size);
    lp_gguf_close(g);
    return 0;
}
