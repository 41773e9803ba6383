/* quant.c: lp_dequant, the one dispatch point of the block dequantizers (host/ops/cpu/dequant.c
 * and kernels/dequant.cu). An op, below the GGUF reader that uses it; the ggml type table it
 * checks against is ggml_types.c. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/gguf.h"
#include "ops/ops_internal.h"

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
    if (c->device != LP_CPU) return cuda_dequant(c, dst, dst_dtype, src, type, n);

    if (dst_dtype == LP_F32) {
        cpu_dequant(dst, src, type, n);
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
        cpu_dequant(tmp, (const uint8_t *)src + (size_t)(i / blk) * bb, type, m);
        if (dst_dtype == LP_BF16)
            lp_convert_host(out + i, LP_BF16, tmp, LP_F32, (size_t)m);
        else /* lp_convert_host has no F32 -> F16 */
            for (int64_t j = 0; j < m; j++) out[i + j] = lp_f32_to_f16(tmp[j]);
    }
    free(tmp);
    return LP_OK;
}
