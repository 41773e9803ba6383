/* vmath.h: the exponential the CPU ops' element-wise loops share, written so that the
 * compiler vectorizes the loops around it (libm's expf and tanhf are calls the loops cannot
 * vectorize, and cost more than the GEMMs' share of a forward would leave them).
 *
 * vexpf is Cephes' expf: a degree-6 polynomial on [-ln2/2, ln2/2] after the reduction
 * x = n ln2 + r, with a relative error within 2 ulp of float over its whole range; below
 * -87.3 (where exp would be subnormal) it gives 0, above 88.7 infinity, and a NaN stays NaN. Branch-free, so that a loop of it vectorizes.
 *
 * LP_VEC marks a function whose loop is worth a wider vector unit than the baseline build
 * targets: the loader picks the AVX-512 or AVX2 clone where the CPU has one (the results are
 * the same: every clone rounds each operation the same way, without contraction). */
#ifndef LOUPE_OPS_CPU_VMATH_H
#define LOUPE_OPS_CPU_VMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define LP_VEC __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LP_VEC
#endif

static inline float vexpf(float x) {
    const float hi = 88.7228391f, lo = -87.3365448f;
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc; /* NaN passes both tests unchanged */
    /* n = round(x / ln2), by the 1.5 * 2^23 trick (round to nearest, vectorizable) */
    float n = xc * 1.44269504088896341f + 12582912.0f;
    n -= 12582912.0f;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    int32_t e = ((int32_t)(n == n ? n : 0.0f) + 127) << 23; /* 2^n; n is in [-126, 128] here (NaN: any) */
    float two_n;
    memcpy(&two_n, &e, sizeof two_n);
    /* 2^128 is not a float: the top of the range takes 2^127 * 2 */
    y = n > 127.5f ? y * 2.0f : y;
    two_n = n > 127.5f ? 1.70141183e38f : two_n;
    y *= two_n;
    y = x > hi ? INFINITY : y;
    return x < lo ? 0.0f : y;
}

/* 1 / (1 + exp(-z)), which saturates to 0 and 1 without a NaN. */
static inline float vsigmoidf(float z) { return 1.0f / (1.0f + vexpf(-z)); }

/* The largest of x[0..n) (-INFINITY for n = 0; NaNs are passed over), in 16 lanes. */
static inline float vmaxf(const float *x, size_t n) {
    float lane[16];
    for (int j = 0; j < 16; j++) lane[j] = -INFINITY;
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
    float mx = -INFINITY;
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    for (int j = 0; j < 16; j++) mx = lane[j] > mx ? lane[j] : mx;
    return mx;
}

/* y[i] = exp(x[i] - shift) (y may be x, or NULL: not kept) and their sum, accumulated in 16
 * float lanes over blocks of 256 and in double across blocks. */
static inline double vexp_sum(float *y, const float *x, float shift, size_t n) {
    double total = 0;
    for (size_t b = 0; b < n; b += 256) {
        size_t e = n - b < 256 ? n : b + 256, i = b;
        float lane[16] = {0}, rest = 0;
        for (; i + 16 <= e; i += 16)
            for (int j = 0; j < 16; j++) {
                float v = vexpf(x[i + j] - shift);
                if (y) y[i + j] = v;
                lane[j] += v;
            }
        for (; i < e; i++) {
            float v = vexpf(x[i] - shift);
            if (y) y[i] = v;
            rest += v;
        }
        for (int j = 0; j < 16; j++) rest += lane[j];
        total += rest;
    }
    return total;
}

/* exp in double, branch-free like vexpf: x = n ln2 + r with ln2 in two parts, then
 * Taylor's series of exp(r) to r^13 (|r| <= ln2/2: the rest is below 1e-17 relative), within
 * about 1 ulp of double. Below -708 it gives 0, above 709 infinity, a NaN stays NaN. */
static inline double vexpd(double x) {
    const double hi = 709.0, lo = -708.0;
    double xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    /* n = round(x / ln2) by adding 1.5 * 2^52, whose low mantissa bits then hold n itself:
     * 2^n is formed from those bits with 64-bit integer adds and shifts, which vectorize
     * (a double-to-int64 conversion has no vector form before AVX-512DQ, and kept every loop
     * around this function scalar) */
    double t = xc * 1.4426950408889634 + 6755399441055744.0;
    uint64_t tb;
    memcpy(&tb, &t, sizeof tb);
    double n = t - 6755399441055744.0;
    double r = xc - n * 6.93147180369123816490e-01;
    r = r - n * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;                    /* 1/13! */
    p = p * r + 1.0 / 479001600.0;                     /* 1/12! */
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uint64_t e = (tb + 1023) << 52; /* 2^n, n in [-1022, 1023] here (NaN: any) */
    double two_n;
    memcpy(&two_n, &e, sizeof two_n);
    double y = p * two_n;
    y = x > hi ? INFINITY : y;
    return x < lo ? 0.0 : y;
}

#endif
