/* quant.c: the ggml type table (block sizes, names, which types loupe dequantizes) and
 * lp_dequant, the one dispatch point of the block dequantizers (host/ops/cpu/dequant.c and
 * kernels/dequant.cu). An op, below the GGUF reader that uses it: kernels/dequant.cu needs
 * the table too, and must not reach up into io/. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/gguf.h"
#include "ops/ops_internal.h"

/* ---- the ggml type table ---- */

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

/* ---- dequantization ---- */


lp_status lp_dequant(lp_ctx *c, void *dst, lp_dtype dst_dtype, const void *src, int type, int64_t n) {
    if (!c) LP_FAIL(LP_ERR_ARG, "dequant: null context");
    if (dst_dtype != LP_F32 && dst_dtype != LP_BF16 && dst_dtype != LP_F16)
        LP_FAIL(LP_ERR_ARG, "dequant: cannot write %s (F32, BF16 or F16)", lp_dtype_name(dst_dtype));
    if (!lp_ggml_supported(type))
        LP_FAIL(LP_ERR_ARG, "dequant: ggml type %s (%d) cannot be dequantized (supported: %s)",
                lp_ggml_type_name(type), type, LP_GGML_SUPPORTED_LIST);
    const int blk = lp_ggml_block_elems(type);
    if (n < 0 || n % blk)
        LP_FAIL(LP_ERR_ARG, "dequant: %lld elements is not a whole number of %s blocks (%d each)", (long long)n,
                lp_ggml_type_name(type), blk);
    if (n == 0) return LP_OK;
    if (!dst || !src) LP_FAIL(LP_ERR_ARG, "dequant: null buffer");
    if (c->device != LP_CPU) return lp_cuda_dequant(c, dst, dst_dtype, src, type, n);

    if (dst_dtype == LP_F32) {
        lp_cpu_dequant(dst, src, type, n);
        return LP_OK;
    }
    if ((type == LP_GGML_F16 && dst_dtype == LP_F16) || (type == LP_GGML_BF16 && dst_dtype == LP_BF16)) {
        memcpy(dst, src, (size_t)n * 2);
        return LP_OK;
    }
    /* through fp32 in chunks of whole blocks, so no tensor-sized scratch */
    enum { CHUNK = 16384 }; /* a multiple of every block size */
    float *tmp = malloc(CHUNK * sizeof *tmp);
    if (!tmp) LP_FAIL(LP_ERR_OOM, "dequant: out of memory");
    const size_t bb = lp_ggml_block_bytes(type);
    uint16_t *out = dst;
    for (int64_t i = 0; i < n; i += CHUNK) {
        const int64_t m = n - i < CHUNK ? n - i : CHUNK;
        lp_cpu_dequant(tmp, (const uint8_t *)src + (size_t)(i / blk) * bb, type, m);
        if (dst_dtype == LP_BF16)
            lp_convert_host(out + i, LP_BF16, tmp, LP_F32, (size_t)m);
        else /* lp_convert_host has no F32 -> F16 */
            for (int64_t j = 0; j < m; j++) out[i + j] = lp_f32_to_f16(tmp[j]);
    }
    free(tmp);
    return LP_OK;
}

