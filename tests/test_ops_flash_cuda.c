/* test_ops_flash_cuda.c: the tensor-core attention of kernels/attention_flash.cu (BF16
 * contexts, head dims that are multiples of 16 up to 256), forward and backward, against the
 * CPU attention and against the row kernels, which the dispatch takes instead for buffers that
 * are not 16-byte aligned (so the same op runs both ways here). Shapes: the head dims of the
 * models (64, 128, 256) and another (80), GQA and multi-query, T below one tile, T not a
 * multiple of the tile and T over several tiles; windows that start inside and across tiles,
 * soft-caps, custom scales. Budgets: ops_cuda_budget.h. Without a GPU every test skips. */
#include "loupe/ops.h"
#include "gputest.h"
#include "ops_cuda_budget.h"

typedef struct shape { int B, T, H, Hkv, dh; } shape;
static const shape SHAPES[] = {
    {2, EMU_CAP(300, 100), 4, 2, 64}, /* GQA; over a 64-row tile, not a multiple of it */
    {1, EMU_CAP(257, 70), 2, 1, 128}, /* multi-query */
    {1, EMU_CAP(200, 70), 2, 2, 256}, /* 32-row tiles: past two */
    {1, 37, 3, 1, 80},                /* below one tile; a head dim no model has */
    {1, 5, 2, 2, 16},
};
/* {scale, softcap, window}: the defaults; Gemma 2 (cap) with a window inside a tile; a cap
 * with a window across tiles; a window of one tile plus one; the diagonal alone. */
static const lp_attn_cfg CFGS[] = {{0, 0, 0}, {0.25f, 1.5f, 7}, {0, 2.0f, 40}, {0.2f, 0, 65}, {0.5f, 0, 1}};
#define N_SHAPES (sizeof SHAPES / sizeof *SHAPES)
#define N_CFGS (sizeof CFGS / sizeof *CFGS)

/* A copy of x at 8 bytes past a 16-byte boundary: the dispatch then takes the row kernels. */
static void *put_unaligned(gpu *g, const float *x, size_t n) {
    unsigned char *d = (unsigned char *)gpu_alloc(g, act_bytes(g, n) + 8) + 8;
    void *h = malloc(act_bytes(g, n));
    cr_assert(h != NULL);
    OK(lp_convert_host(h, g->dt, x, LP_F32, n));
    OK(lp_ctx_to_device(&g->c, d, h, act_bytes(g, n)));
    free(h);
    return d;
}
static void *alloc_unaligned(gpu *g, size_t n) { return (unsigned char *)gpu_alloc(g, act_bytes(g, n) + 8) + 8; }

typedef struct bufs { void *q, *k, *v, *dz; } bufs;

static void check(shape s, lp_attn_cfg cf, uint64_t seed) {
    const lp_dtype dt = LP_BF16;
    const size_t nq = (size_t)s.B * s.T * s.H * s.dh, nkv = (size_t)s.B * s.T * s.Hkv * s.dh;
    float *q = rand_act(dt, nq, seed, -3, 3), *k = rand_act(dt, nkv, seed + 1, -1, 1);
    float *v = rand_act(dt, nkv, seed + 2, -1, 1), *dz = rand_act(dt, nq, seed + 3, -1, 1);
    float *rz = zeros(nq), *rdq = zeros(nq), *rdk = zeros(nkv), *rdv = zeros(nkv);
    OK(lp_attention_cfg(cpu(), rz, q, k, v, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
    OK(lp_attention_backward_cfg(cpu(), rdq, rdk, rdv, dz, q, k, v, s.B, s.T, s.H, s.Hkv, s.dh, &cf));

    gpu g;
    gpu_init(&g, dt);
    const bufs a = {gpu_put_act(&g, q, nq), gpu_put_act(&g, k, nkv), gpu_put_act(&g, v, nkv), gpu_put_act(&g, dz, nq)};
    const bufs u = {put_unaligned(&g, q, nq), put_unaligned(&g, k, nkv), put_unaligned(&g, v, nkv),
                    put_unaligned(&g, dz, nq)};
    void *d_z = gpu_alloc(&g, act_bytes(&g, nq)), *d_zu = alloc_unaligned(&g, nq);
    void *d_g[3] = {gpu_alloc(&g, act_bytes(&g, nq)), gpu_alloc(&g, act_bytes(&g, nkv)), gpu_alloc(&g, act_bytes(&g, nkv))};
    void *d_gu[3] = {alloc_unaligned(&g, nq), alloc_unaligned(&g, nkv), alloc_unaligned(&g, nkv)};
    OK(lp_attention_cfg(&g.c, d_z, a.q, a.k, a.v, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
    OK(lp_attention_cfg(&g.c, d_zu, u.q, u.k, u.v, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
    OK(lp_attention_backward_cfg(&g.c, d_g[0], d_g[1], d_g[2], a.dz, a.q, a.k, a.v, s.B, s.T, s.H, s.Hkv, s.dh, &cf));
    OK(lp_attention_backward_cfg(&g.c, d_gu[0], d_gu[1], d_gu[2], u.dz, u.q, u.k, u.v, s.B, s.T, s.H, s.Hkv, s.dh,
                                 &cf));
    char label[128], l2[160];
    snprintf(label, sizeof label, "B=%d T=%d H=%d Hkv=%d dh=%d scale=%g cap=%g win=%d", s.B, s.T, s.H, s.Hkv, s.dh,
             (double)cf.scale, (double)cf.softcap, cf.window);
    float *z = gpu_get_act(&g, d_z, nq), *zu = gpu_get_act(&g, d_zu, nq);
    expect_close(OP_FLASH_FWD, dt, label, seed, z, rz, nq);
    expect_close(OP_FLASH_VS_ROWS, dt, label, seed, z, zu, nq);
    const size_t counts[3] = {nq, nkv, nkv};
    const char *names[3] = {"dq", "dk", "dv"};
    const float *refs[3] = {rdq, rdk, rdv};
    for (int o = 0; o < 3; o++) {
        float *got = gpu_get_act(&g, d_g[o], counts[o]), *rows = gpu_get_act(&g, d_gu[o], counts[o]);
        snprintf(l2, sizeof l2, "%s %s", label, names[o]);
        expect_close(OP_FLASH_BWD, dt, l2, seed, got, refs[o], counts[o]);
        expect_close(OP_FLASH_VS_ROWS, dt, l2, seed, got, rows, counts[o]);
        free(got), free(rows);
    }
    gpu_done(&g, label);
    free(q), free(k), free(v), free(dz), free(rz), free(rdq), free(rdk), free(rdv), free(z), free(zu);
}

/* On the emulator, a third of the pairs (every option and every shape still runs). */
#ifdef LOUPE_TEST_SMALL
#define PAIR_RUNS(si, ci) (((si) + (ci)) % 3 == 0)
#else
#define PAIR_RUNS(si, ci) 1
#endif

Test(flash_cuda, forward_and_backward_against_cpu_and_row_kernels) {
    LP_TEST_REQUIRE_GPU();
    for (size_t si = 0; si < N_SHAPES; si++)
        for (size_t ci = 0; ci < N_CFGS; ci++)
            if (PAIR_RUNS(si, ci)) check(SHAPES[si], CFGS[ci], 12000 + si * 16 + ci);
}
