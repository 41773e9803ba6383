/* ggml_types.c: the ggml type table: names, block sizes, and which types loupe
 * dequantizes (declared in loupe/gguf.h). An op-level table, below the GGUF reader that
 * uses it, because the dequantizers (host/ops/quant.c, kernels/dequant.cu) need it too and
 * must not reach up into io/; a file of its own, so that the dispatch in quant.c and the
 * CUDA dequantizer both call it without calling each other. */
#include <stdint.h>
#include <stdio.h>

#include "loupe/gguf.h"

static const struct {
    const char *name;
    int blk, bytes; /* 0 when the type is unknown (removed or never assigned) */
} TYPES[] = {
    [0] = {"F32", 1, 4},        [1] = {"F16", 1, 2},           [2] = {"Q4_0", 32, 18},
    [3] = {"Q4_1", 32, 20},     [6] = {"Q5_0", 32, 22},        [7] = {"Q5_1", 32, 24},
    [8] = {"Q8_0", 32, 34},     [9] = {"Q8_1", 32, 36},        [10] = {"Q2_K", 256, 84},
    [11] = {"Q3_K", 256, 110},  [12] = {"Q4_K", 256, 144},     [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},  [15] = {"Q8_K", 256, 292},     [16] = {"IQ2_XXS", 256, 66},
    [17] = {"IQ2_XS", 256, 74}, [18] = {"IQ3_XXS", 256, 98},   [19] = {"IQ1_S", 256, 50},
    [20] = {"IQ4_NL", 32, 18},  [21] = {"IQ3_S", 256, 110},    [22] = {"IQ2_S", 256, 82},
    [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},          [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},       [27] = {"I64", 1, 8},          [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", 256, 56},  [30] = {"BF16", 1, 2},         [31] = {"Q4_0_4_4", 32, 18},
    [32] = {"Q4_0_4_8", 32, 18}, [33] = {"Q4_0_8_8", 32, 18},  [34] = {"TQ1_0", 256, 54},
    [35] = {"TQ2_0", 256, 66},  [39] = {"MXFP4", 32, 17},
};
#define N_TYPES (int)(sizeof TYPES / sizeof TYPES[0])

static int known(int type) { return type >= 0 && type < N_TYPES && TYPES[type].blk > 0; }

const char *lp_ggml_type_name(int type) {
    static _Thread_local char buf[32];
    if (known(type)) return TYPES[type].name;
    snprintf(buf, sizeof buf, "type %d", type);
    return buf;
}

int lp_ggml_supported(int type) {
    switch (type) {
    case LP_GGML_F32: case LP_GGML_F16: case LP_GGML_BF16: case LP_GGML_Q8_0: case LP_GGML_Q4_0:
    case LP_GGML_Q4_1: case LP_GGML_Q5_0: case LP_GGML_Q4_K: case LP_GGML_Q5_K: case LP_GGML_Q6_K:
        return 1;
    default:
        return 0;
    }
}

int lp_ggml_block_elems(int type) { return known(type) ? TYPES[type].blk : 0; }
size_t lp_ggml_block_bytes(int type) { return known(type) ? (size_t)TYPES[type].bytes : 0; }

size_t lp_ggml_bytes(int type, int64_t n) {
    if (!known(type) || n < 0 || n % TYPES[type].blk) return 0;
    uint64_t blocks = (uint64_t)(n / TYPES[type].blk), bytes;
    if (__builtin_mul_overflow(blocks, (uint64_t)TYPES[type].bytes, &bytes) || bytes > SIZE_MAX) return 0;
    return (size_t)bytes;
}
