/* tensor.c: dtype tables, host dtype conversion, and the execution context
 * (allocation and copies on the context's device). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/device.h"
#include "loupe/tensor.h"

static const struct { const char *name; size_t size; } g_dtypes[LP_DTYPE_COUNT] = {
    [LP_F32] = {"F32", 4},  [LP_BF16] = {"BF16", 2}, [LP_F16] = {"F16", 2}, [LP_F64] = {"F64", 8},
    [LP_I8] = {"I8", 1},    [LP_U8] = {"U8", 1},     [LP_I16] = {"I16", 2}, [LP_U16] = {"U16", 2},
    [LP_I32] = {"I32", 4},  [LP_U32] = {"U32", 4},   [LP_I64] = {"I64", 8}, [LP_U64] = {"U64", 8},
    [LP_BOOL] = {"BOOL", 1},
};

size_t lp_dtype_size(lp_dtype dt) { return (unsigned)dt < LP_DTYPE_COUNT ? g_dtypes[dt].size : 0; }
const char *lp_dtype_name(lp_dtype dt) { return (unsigned)dt < LP_DTYPE_COUNT ? g_dtypes[dt].name : "?"; }
int lp_dtype_parse(const char *name) {
    for (int i = 0; i < LP_DTYPE_COUNT; i++)
        if (strcmp(name, g_dtypes[i].name) == 0) return i;
    return -1;
}

int64_t lp_shape_numel(const int64_t *shape, int ndim) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

const char *lp_shape_str(const int64_t *shape, int ndim, char *buf, size_t n) {
    size_t o = 0;
    o += snprintf(buf + o, n - o, "[");
    for (int i = 0; i < ndim && o < n; i++)
        o += snprintf(buf + o, n - o, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (o < n) snprintf(buf + o, n - o, "]");
    return buf;
}

uint16_t lp_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

float lp_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float lp_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float f;
    if (exp == 0) {
        f = ldexpf((float)man, -24); /* zero or subnormal */
        return sign ? -f : f;
    }
    uint32_t u = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    memcpy(&f, &u, 4);
    return f;
}

/* float to IEEE half, round to nearest even (what __float2half_rn does on the GPU). */
uint16_t lp_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)(u >> 16 & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00 | (uint16_t)(a >> 13 & 0x3ff); /* NaN stays NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00;                             /* >= 65520: inf */
    if (a >= 0x38800000u) {                                                 /* normal half */
        uint32_t v = a - 0x38000000u;                                       /* rebias 127 -> 15 */
        v += 0xfffu + (v >> 13 & 1u);
        return sign | (uint16_t)(v >> 13);
    }
    if (a < 0x33000000u) return sign; /* below 2^-25 (or a tie at it): zero */
    const uint32_t m = (a & 0x7fffffu) | 0x800000u, shift = 126 - (a >> 23); /* 14..24 */
    uint32_t q = m >> shift, rest = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (q & 1))) q++;
    return sign | (uint16_t)q;
}

/* Element loads and stores through memcpy: src is often a tensor inside a mapped file,
 * where nothing aligns it (a safetensors header's length need not be a multiple of 4). */
static inline uint16_t ld16(const void *p, size_t i) {
    uint16_t v;
    memcpy(&v, (const char *)p + 2 * i, 2);
    return v;
}
static inline float ldf(const void *p, size_t i) {
    float v;
    memcpy(&v, (const char *)p + 4 * i, 4);
    return v;
}
static inline void st16(void *p, size_t i, uint16_t v) { memcpy((char *)p + 2 * i, &v, 2); }
static inline void stf(void *p, size_t i, float v) { memcpy((char *)p + 4 * i, &v, 4); }

lp_status lp_convert_host(void *dst, lp_dtype dt, const void *src, lp_dtype st, size_t n) {
    if (dt == st) {
        memcpy(dst, src, n * lp_dtype_size(dt));
        return LP_OK;
    }
    if (dt == LP_F32 && st == LP_BF16) {
        for (size_t i = 0; i < n; i++) stf(dst, i, lp_bf16_to_f32(ld16(src, i)));
    } else if (dt == LP_F32 && st == LP_F16) {
        for (size_t i = 0; i < n; i++) stf(dst, i, lp_f16_to_f32(ld16(src, i)));
    } else if (dt == LP_BF16 && st == LP_F32) {
        for (size_t i = 0; i < n; i++) st16(dst, i, lp_f32_to_bf16(ldf(src, i)));
    } else if (dt == LP_F16 && st == LP_F32) {
        for (size_t i = 0; i < n; i++) st16(dst, i, lp_f32_to_f16(ldf(src, i)));
    } else if (dt == LP_BF16 && st == LP_F16) {
        for (size_t i = 0; i < n; i++) st16(dst, i, lp_f32_to_bf16(lp_f16_to_f32(ld16(src, i))));
    } else {
        LP_FAIL(LP_ERR_ARG, "cannot convert %s to %s", lp_dtype_name(st), lp_dtype_name(dt));
    }
    return LP_OK;
}

static int g_local_rank; /* lp_ctx_set_local_rank: set once, when the job starts */

void lp_ctx_set_local_rank(int local_rank) { g_local_rank = local_rank > 0 ? local_rank : 0; }

lp_status lp_ctx_init(lp_ctx *c, lp_device dev, lp_dtype dtype) {
    memset(c, 0, sizeof *c);
    c->device = dev;
    c->dtype = dtype;
    if (dev == LP_CPU) {
        if (dtype != LP_F32) LP_FAIL(LP_ERR_ARG, "the CPU engine computes in f32 only (asked for %s)", lp_dtype_name(dtype));
        return LP_OK;
    }
    if (dtype != LP_F32 && dtype != LP_BF16)
        LP_FAIL(LP_ERR_ARG, "the CUDA engine computes in f32 or bf16 (asked for %s)", lp_dtype_name(dtype));
    int n = g_local_rank ? cuda_device_count(NULL, 0) : 0;
    c->cuda_device = n > 0 ? g_local_rank % n : 0; /* one GPU per rank of a node */
    return cuda_ctx_init(c);
}

void lp_ctx_free(lp_ctx *c) {
    if (c->device == LP_CUDA) cuda_ctx_free(c);
    memset(c, 0, sizeof *c);
}

lp_status lp_ctx_alloc(lp_ctx *c, size_t bytes, void **p) {
    if (c->device == LP_CUDA) {
        LP_CHECK(cuda_alloc(c, bytes, p));
    } else {
        *p = NULL;
        if (posix_memalign(p, 64, bytes ? (bytes + 63) / 64 * 64 : 64) != 0)
            LP_FAIL(LP_ERR_OOM, "out of host memory allocating %zu bytes", bytes);
    }
    c->n_allocs++;
    return LP_OK;
}

void lp_ctx_release(lp_ctx *c, void *p) {
    if (!p) return;
    if (c->device == LP_CUDA) cuda_release(c, p);
    else free(p);
}

lp_status lp_ctx_alloc_host(lp_ctx *c, size_t bytes, void **p) {
    if (c->device == LP_CUDA) return cuda_alloc_host(c, bytes, p);
    return lp_ctx_alloc(c, bytes, p);
}

void lp_ctx_release_host(lp_ctx *c, void *p) {
    if (!p) return;
    if (c->device == LP_CUDA) cuda_release_host(c, p);
    else free(p);
}

lp_status lp_ctx_memset0(lp_ctx *c, void *p, size_t bytes) {
    if (c->device == LP_CUDA) return cuda_memset0(c, p, bytes);
    memset(p, 0, bytes);
    return LP_OK;
}

lp_status lp_ctx_to_device(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    if (c->device == LP_CUDA) return cuda_to_device(c, dst, src, bytes);
    memmove(dst, src, bytes);
    return LP_OK;
}

lp_status lp_ctx_to_host(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    c->n_d2h++; /* counted on the CPU too, so a CPU run shows what a GPU run would wait for */
    if (c->device == LP_CUDA) return cuda_to_host(c, dst, src, bytes);
    memmove(dst, src, bytes);
    return LP_OK;
}

lp_status lp_ctx_copy(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    if (c->device == LP_CUDA) return cuda_copy(c, dst, src, bytes);
    memmove(dst, src, bytes);
    return LP_OK;
}

lp_status lp_ctx_to_device_async(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    if (c->device == LP_CUDA) return cuda_to_device_async(c, dst, src, bytes);
    memmove(dst, src, bytes);
    return LP_OK;
}

lp_status lp_ctx_wait_copies(lp_ctx *c) { return c->device == LP_CUDA ? cuda_wait_copies(c) : LP_OK; }

lp_status lp_ctx_to_host_async(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    if (c->device == LP_CUDA) return cuda_to_host_async(c, dst, src, bytes);
    memmove(dst, src, bytes);
    return LP_OK;
}

lp_status lp_ctx_sync(lp_ctx *c) { return c->device == LP_CUDA ? cuda_sync(c) : LP_OK; }

int lp_cuda_available(char *why, size_t n) {
    int count = cuda_device_count(why, n);
    if (count <= 0 && why && n && !why[0]) snprintf(why, n, "no CUDA device found");
    return count > 0;
}

lp_status lp_ctx_upload_f32(lp_ctx *c, void *dst, const float *src, size_t n) {
    if (c->dtype == LP_F32) return lp_ctx_to_device(c, dst, src, n * sizeof(float));
    size_t bytes = n * lp_dtype_size(c->dtype);
    void *conv = malloc(bytes ? bytes : 1);
    if (!conv) LP_FAIL(LP_ERR_OOM, "out of host memory converting %zu values", n);
    lp_status st = lp_convert_host(conv, c->dtype, src, LP_F32, n);
    if (st == LP_OK) st = lp_ctx_to_device(c, dst, conv, bytes);
    free(conv);
    return st;
}
