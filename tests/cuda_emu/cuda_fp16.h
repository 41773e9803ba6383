// cuda_fp16.h (emulated): __half as its 16 bits, with exact IEEE binary16 conversions
// (round to nearest even; subnormals, infinities and NaN), written out rather than relying
// on the host compiler's _Float16.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

struct __half {
    unsigned short x;
};

inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16;
    const int e = (h.x >> 10) & 31;
    const uint32_t m = h.x & 1023u;
    float f;
    if (e == 0) {
        f = ldexpf((float)m, -24); // zero and subnormals
        return sign ? -f : f;
    }
    uint32_t u = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((uint32_t)(e - 15 + 127) << 23) | (m << 13));
    memcpy(&f, &u, 4);
    return f;
}
inline __half __float2half_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    __half h;
    if (a > 0x7f800000u) { h.x = (unsigned short)(sign | 0x7e00u); return h; }
    if (a >= 0x477ff000u) { h.x = (unsigned short)(sign | 0x7c00u); return h; } // rounds to inf
    if (a < 0x38800000u) { // below the smallest normal: a multiple of 2^-24
        const float v = fabsf(f) * 16777216.0f; // exact scaling
        const float r = nearbyintf(v);            // current mode: nearest even
        h.x = (unsigned short)(sign | (uint32_t)r);
        return h;
    }
    uint32_t v = a - ((uint32_t)(127 - 15) << 23);
    v += 0xfffu + ((v >> 13) & 1);
    h.x = (unsigned short)(sign | (v >> 13));
    return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half __ushort_as_half(unsigned short v) { __half h; h.x = v; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
