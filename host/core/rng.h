/* rng.h: the small, seedable generators the engine uses, so that a seed reproduces a
 * sample, a shuffle or a random model everywhere. */
#ifndef LOUPE_RNG_H
#define LOUPE_RNG_H

#include <stdint.h>

/* splitmix64 */
static inline uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* uniform in [0, 1) with 53 bits */
static inline double rng_uniform(uint64_t *s) { return (double)(rng_next(s) >> 11) / 9007199254740992.0; }

/* The random models' weights: uniform with GPT-2's init scale (std 0.02), from a 64-bit LCG
 * (kept as it was, so that random models and the benchmarks' figures stay the same). */
static inline float rng_init_weight(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return ((float)(*s >> 40) / 16777216.0f - 0.5f) * 0.0693f;
}

/* The state rng_init_weight leaves after n more calls (jump-ahead: the affine step
 * x -> a x + c composed with itself in O(log n)); kernels/init.cu does the same on the device. */
static inline uint64_t rng_init_weight_skip(uint64_t s, uint64_t n) {
    uint64_t A = 1, C = 0, a = 6364136223846793005ull, c = 1442695040888963407ull;
    for (; n; n >>= 1) {
        if (n & 1) A *= a, C = C * a + c;
        c = c * a + c;
        a *= a;
    }
    return A * s + C;
}

#endif
