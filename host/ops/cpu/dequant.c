/* dequant.c: CPU reference of the ggml block formats that loupe reads from GGUF files
 * (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K, Q6_K), one block at a time.
 *
 * Written from the ggml block definitions; each formula is checked bit for bit against
 * gguf-py's dequantizer by tests/test_gguf.c (fixtures from tests/gen/gen_gguf_fixture.py),
 * and kernels/dequant.cu is checked bit for bit against this file. Bit-exactness needs the
 * same fp32 operations in the same order, with no fused multiply-add: GCC does not
 * contract in ISO C mode (-std=c11) and the pragma below tells clang the same.
 *
 * Block layouts (little-endian; "half" is an IEEE fp16 scale):
 *   Q8_0  32 elems, 34 bytes: half d; int8 q[32]                  x = d*q
 *   Q4_0  32 elems, 18 bytes: half d; u8 qs[16]                   x = d*(q-8)
 *   Q4_1  32 elems, 20 bytes: half d, m; u8 qs[16]                x = d*q + m
 *         (element j < 16 is the low nibble of qs[j], element j + 16 its high nibble)
 *   Q5_0  32 elems, 22 bytes: half d; u8 qh[4]; u8 qs[16]         x = d*(q-16)
 *         (low 4 bits as in Q4_0; bit j of the little-endian u32 qh is element j's fifth)
 *   Q4_K 256 elems, 144 bytes: half d, dmin; u8 scales[12]; u8 qs[128]
 *         8 sub-blocks of 32 with 6-bit scale sc and min m each:   x = (d*sc)*q - dmin*m
 *   Q5_K 256 elems, 176 bytes: as Q4_K plus u8 qh[32] (bit s of qh[l] is the fifth bit
 *         of element l of sub-block s) before qs
 *   Q6_K 256 elems, 210 bytes: u8 ql[128]; u8 qh[64]; int8 scales[16]; half d
 *         16 sub-blocks of 16:                                     x = (d*sc)*(q-32) */
#include <string.h>

#include "loupe/gguf.h"
#include "ops/ops_internal.h"

#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* IEEE half to float, exact for every input (subnormals normalised, inf and NaN kept). */
static inline float half(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | man << 13;
    } else if (exp) {
        u = sign | (exp + 112) << 23 | man << 13;
    } else if (!man) {
        u = sign;
    } else {
        uint32_t e = 113;
        while (!(man & 0x400u)) man <<= 1, e--;
        u = sign | e << 23 | (man & 0x3ffu) << 13;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void dq_f16(float *y, const uint8_t *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = half(rd16(x + 2 * i));
}

static void dq_bf16(float *y, const uint8_t *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)rd16(x + 2 * i) << 16;
        memcpy(&y[i], &u, 4);
    }
}

static void dq_q8_0(float *y, const uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 34, y += 32) {
        const float d = half(rd16(b));
        const int8_t *q = (const int8_t *)(b + 2);
        for (int j = 0; j < 32; j++) y[j] = d * (float)q[j];
    }
}

static void dq_q4_0(float *y, const uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 18, y += 32) {
        const float d = half(rd16(b));
        const uint8_t *qs = b + 2;
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((qs[j] & 0xF) - 8);
            y[j + 16] = d * (float)((qs[j] >> 4) - 8);
        }
    }
}

static void dq_q5_0(float *y, const uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 22, y += 32) {
        const float d = half(rd16(b));
        const uint32_t qh = (uint32_t)b[2] | (uint32_t)b[3] << 8 | (uint32_t)b[4] << 16 | (uint32_t)b[5] << 24;
        const uint8_t *qs = b + 6;
        for (int j = 0; j < 16; j++) {
            const int lo = (qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
            const int hi = (qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = d * (float)(lo - 16);
            y[j + 16] = d * (float)(hi - 16);
        }
    }
}

static void dq_q4_1(float *y, const uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 20, y += 32) {
        const float d = half(rd16(b)), m = half(rd16(b + 2));
        const uint8_t *qs = b + 4;
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)(qs[j] & 0xF) + m;
            y[j + 16] = d * (float)(qs[j] >> 4) + m;
        }
    }
}

/* The 6-bit scale and min of sub-block s (0..7) of a Q4_K / Q5_K block, packed in 12
 * bytes: s < 4 keeps both in the low 6 bits of bytes s and s + 4; s >= 4 keeps the low 4
 * bits in byte s + 4 and the high 2 bits in the top bits of bytes s - 4 and s. */
static inline void k_scale_min(const uint8_t *q, int s, int *sc, int *m) {
    if (s < 4) {
        *sc = q[s] & 63;
        *m = q[s + 4] & 63;
    } else {
        *sc = (q[s + 4] & 0xF) | (q[s - 4] >> 6) << 4;
        *m = (q[s + 4] >> 4) | (q[s] >> 6) << 4;
    }
}

static void dq_q4_k(float *y, const uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 144, y += 256) {
        const float d = half(rd16(b)), dmin = half(rd16(b + 2));
        const uint8_t *scales = b + 4, *qs = b + 16;
        for (int s = 0; s < 8; s++) { /* sub-block s: nibble s&1 of qs[32*(s/2) + l] */
            int sc, m;
            k_scale_min(scales, s, &sc, &m);
            const float ds = d * (float)sc, dm = dmin * (float)m;
            const uint8_t *q = qs + 32 * (s / 2);
            const int shift = 4 * (s & 1);
            for (int l = 0; l < 32; l++) y[32 * s + l] = ds * (float)((q[l] >> shift) & 0xF) - dm;
        }
    }
}

static void dq_q5_k(float *y, const uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 176, y += 256) {
        const float d = half(rd16(b)), dmin = half(rd16(b + 2));
        const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + 48;
        for (int s = 0; s < 8; s++) {
            int sc, m;
            k_scale_min(scales, s, &sc, &m);
            const float ds = d * (float)sc, dm = dmin * (float)m;
            const uint8_t *q = qs + 32 * (s / 2);
            const int shift = 4 * (s & 1);
            for (int l = 0; l < 32; l++) {
                const int v = ((q[l] >> shift) & 0xF) | ((qh[l] >> s) & 1) << 4;
                y[32 * s + l] = ds * (float)v - dm;
            }
        }
    }
}

/* Q6_K: two halves of 128 elements; in half h, element 32*k + l (k = 0..3, l = 0..31)
 * takes its low 4 bits from ql[64*h + 32*(k&1) + l] (low nibble for k < 2, high for
 * k >= 2) and its top 2 bits from bits 2k..2k+1 of qh[32*h + l]; scale = element / 16. */
static void dq_q6_k(float *y, const uint8_t *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 210, y += 256) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = half(rd16(b + 208));
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < 32; l++) {
                    const int e = 128 * h + 32 * k + l;
                    const int lo = (ql[64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 0xF;
                    const int hi = (qh[32 * h + l] >> (2 * k)) & 3;
                    y[e] = d * (float)sc[e / 16] * (float)((lo | hi << 4) - 32);
                }
    }
}

void cpu_dequant(float *dst, const void *src, int type, int64_t n) {
    const uint8_t *x = src;
    switch (type) {
    case LP_GGML_F32: memcpy(dst, src, (size_t)n * sizeof(float)); break;
    case LP_GGML_F16: dq_f16(dst, x, n); break;
    case LP_GGML_BF16: dq_bf16(dst, x, n); break;
    case LP_GGML_Q8_0: dq_q8_0(dst, x, n / 32); break;
    case LP_GGML_Q4_0: dq_q4_0(dst, x, n / 32); break;
    case LP_GGML_Q4_1: dq_q4_1(dst, x, n / 32); break;
    case LP_GGML_Q5_0: dq_q5_0(dst, x, n / 32); break;
    case LP_GGML_Q4_K: dq_q4_k(dst, x, n / 256); break;
    case LP_GGML_Q5_K: dq_q5_k(dst, x, n / 256); break;
    case LP_GGML_Q6_K: dq_q6_k(dst, x, n / 256); break;
    default: break; /* lp_dequant refuses other types before calling */
    }
}
