// cuda_bf16.h (emulated): __nv_bfloat16 as its 16 bits, with the conversions loupe's
// kernels use (round to nearest even, NaN kept quiet, like the device's cvt.rn.bf16.f32).
#pragma once
#include <stdint.h>
#include <string.h>

struct __nv_bfloat16 {
    unsigned short x;
};
typedef __nv_bfloat16 nv_bfloat16;

inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    __nv_bfloat16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.x = (unsigned short)((u >> 16) | 0x40); // quiet NaN
        return b;
    }
    u += 0x7fffu + ((u >> 16) & 1);
    b.x = (unsigned short)(u >> 16);
    return b;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { __nv_bfloat16 b; b.x = v; return b; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }
