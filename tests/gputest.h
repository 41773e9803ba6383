/* gputest.h: what the CUDA op tests share: a GPU context per activation dtype whose test
 * buffers carry guard zones (checked by gpu_done), uploads and downloads in the activation
 * dtype, the CPU twin's context, and inputs rounded to what the device holds. */
#ifndef LOUPE_GPUTEST_H
#define LOUPE_GPUTEST_H

#include "testutil.h"

#define OK(expr)                                                                            \
    do {                                                                                    \
        lp_status s_ = (expr);                                                              \
        cr_assert_eq(s_, LP_OK, "%s: %s: %s", #expr, lp_status_name(s_), lp_last_error());  \
    } while (0)

/* Under the CPU emulator (build/emu/, tests/cuda_emu/) every GPU thread is a fiber and
 * each warp collective a rendezvous, and under compute-sanitizer a kernel runs 10-100 times
 * slower, so a case over millions of elements or a 1000-token attention costs minutes.
 * Those builds define LOUPE_TEST_SMALL, and EMU_CAP(n, cap) shrinks such sizes to cap, chosen
 * per case so that the same code paths run (several blocks, partial chunks, rows too long
 * for shared memory stay too long); LONG_T caps attention lengths at 130 (five 32-key
 * chunks, the last partial). The plain GPU build keeps every size as written; tolerances
 * are the same everywhere. */
#ifdef LOUPE_TEST_SMALL
#define EMU_CAP(n, cap) ((n) > (cap) ? (cap) : (n))
#else
#define EMU_CAP(n, cap) (n)
#endif
#define LONG_T(n) EMU_CAP(n, 130)

/* ---- a GPU context whose buffers carry guard zones ---- */
#define GUARD 256 /* bytes each side; keeps the 256-byte alignment of cudaMalloc */
#define GUARD_BYTE 0xA5
#define MAX_BUFS 24

typedef struct gpu {
    lp_ctx c;
    lp_dtype dt;
    int n;
    struct { unsigned char *base; size_t bytes; } buf[MAX_BUFS];
} gpu;

/* One CUDA context per dtype for the whole test process (creating a cuBLAS handle per
 * case would dominate the run time); buffers are per case. */
static inline void gpu_init(gpu *g, lp_dtype dt) {
    static lp_ctx ctx[2];
    static int ready[2];
    const int i = dt == LP_BF16;
    if (!ready[i]) {
        OK(lp_ctx_init(&ctx[i], LP_CUDA, dt));
        ready[i] = 1;
    }
    memset(g, 0, sizeof *g);
    g->c = ctx[i];
    g->dt = dt;
}

static inline void *gpu_alloc(gpu *g, size_t bytes) {
    cr_assert(g->n < MAX_BUFS, "too many test buffers");
    size_t total = bytes + 2 * GUARD;
    void *base;
    OK(lp_ctx_alloc(&g->c, total, &base));
    unsigned char *fill = malloc(total);
    cr_assert(fill != NULL);
    memset(fill, GUARD_BYTE, total);
    OK(lp_ctx_to_device(&g->c, base, fill, total));
    free(fill);
    g->buf[g->n].base = base;
    g->buf[g->n].bytes = bytes;
    g->n++;
    return (unsigned char *)base + GUARD;
}

static inline size_t act_bytes(const gpu *g, size_t n) { return n * lp_dtype_size(g->dt); }

/* Uploads n floats as the context's activation dtype (already rounded: see round_act). */
static inline void *gpu_put_act(gpu *g, const float *x, size_t n) {
    void *d = gpu_alloc(g, act_bytes(g, n));
    void *h = malloc(act_bytes(g, n) + 1);
    cr_assert(h != NULL);
    OK(lp_convert_host(h, g->dt, x, LP_F32, n));
    OK(lp_ctx_to_device(&g->c, d, h, act_bytes(g, n)));
    free(h);
    return d;
}

static inline void *gpu_put(gpu *g, const void *x, size_t bytes) {
    void *d = gpu_alloc(g, bytes);
    OK(lp_ctx_to_device(&g->c, d, x, bytes));
    return d;
}

static inline float *gpu_get_act(gpu *g, const void *d, size_t n) {
    void *h = malloc(act_bytes(g, n) + 1);
    float *out = malloc(n * sizeof(float) + 1);
    cr_assert(h && out);
    OK(lp_ctx_to_host(&g->c, h, d, act_bytes(g, n)));
    OK(lp_convert_host(out, LP_F32, h, g->dt, n));
    free(h);
    return out;
}

/* Checks every guard zone and frees the buffers (the context stays for the next case). */
static inline void gpu_done(gpu *g, const char *what) {
    for (int i = 0; i < g->n; i++) {
        size_t total = g->buf[i].bytes + 2 * GUARD;
        unsigned char *h = malloc(total);
        cr_assert(h != NULL);
        OK(lp_ctx_to_host(&g->c, h, g->buf[i].base, total));
        size_t bad = 0;
        for (size_t j = 0; j < GUARD; j++) {
            bad += h[j] != GUARD_BYTE;
            bad += h[GUARD + g->buf[i].bytes + j] != GUARD_BYTE;
        }
        cr_expect(bad == 0, "%s: %zu guard bytes around buffer %d (%zu bytes) were overwritten",
                  what, bad, i, g->buf[i].bytes);
        free(h);
        lp_ctx_release(&g->c, g->buf[i].base);
    }
    g->n = 0;
}

static inline lp_ctx *cpu(void) {
    static lp_ctx c;
    static int ready;
    if (!ready) {
        OK(lp_ctx_init(&c, LP_CPU, LP_F32));
        ready = 1;
    }
    return &c;
}

/* Rounds host values to what the device will hold, so the CPU sees the same inputs. */
static inline void round_act(lp_dtype dt, float *x, size_t n) {
    if (dt != LP_BF16) return;
    for (size_t i = 0; i < n; i++) x[i] = lp_bf16_to_f32(lp_f32_to_bf16(x[i]));
}

static inline float *rand_act(lp_dtype dt, size_t n, uint64_t seed, float lo, float hi) {
    float *x = lp_test_rand(n, seed, lo, hi);
    round_act(dt, x, n);
    return x;
}

static inline float *zeros(size_t n) {
    float *x = calloc(n ? n : 1, sizeof(float));
    cr_assert(x != NULL);
    return x;
}

/* n bytes back from the device (malloc'ed). */
static inline void *gpu_get(gpu *g, const void *d, size_t bytes) {
    void *h = malloc(bytes ? bytes : 1);
    cr_assert(h != NULL);
    OK(lp_ctx_to_host(&g->c, h, d, bytes));
    return h;
}

#endif
