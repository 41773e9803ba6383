/* test_attn_suffix_cuda.c: the attention of a query suffix over all keys on the GPU
 * (lp_attention_suffix and lp_attention_backward_suffix; ops.h) against their CPU twins
 * (which test_ops_suffix.c checks against the square ops), in F32 and BF16, with and without
 * the options of lp_attn_cfg (window shorter than the prefix, soft-cap, scale), GQA, one
 * query, pos0 = 0 (the square op) and a suffix longer than one 32-key chunk. Budgets of
 * ops_cuda_budget.h (the cached attention's for the forward, the fused backward's for the
 * backward). The three-step suffix ops are CPU only: the GPU refuses them. Without a GPU
 * every test skips, saying why (LOUPE_REQUIRE_GPU=1 turns the skip into a failure). */
#include "loupe/ops.h"
#include "gputest.h"
#include "ops_cuda_budget.h"

typedef struct sfx_shape { int B, Tq, pos0, H, Hkv, dh; } sfx_shape;
static const sfx_shape SHAPES[] = {
    {2, 5, 4, 4, 2, 8},   /* GQA, a middle prefix */
    {1, 1, 6, 2, 2, 33},  /* one query, dh just over a warp */
    {1, 9, 0, 2, 1, 16},  /* no prefix: the square op */
    {1, 40, 30, 3, 3, 64} /* several 32-query chunks and a long prefix */
};
static const lp_attn_cfg CFGS[] = {{0.0f, 0.0f, 0}, {0.3f, 2.0f, 5}};

static void check(lp_dtype dt, sfx_shape s, const lp_attn_cfg *cfg, uint64_t seed) {
    const int Tk = s.pos0 + s.Tq;
    const size_t nq = (size_t)s.B * s.Tq * s.H * s.dh, nk = (size_t)s.B * Tk * s.Hkv * s.dh;
    const size_t nks = (size_t)s.B * s.Tq * s.Hkv * s.dh;
    float *q = rand_act(dt, nq, seed, -3, 3), *k = rand_act(dt, nk, seed + 1, -1, 1), *v = rand_act(dt, nk, seed + 2, -1, 1);
    float *dz = rand_act(dt, nq, seed + 3, -1, 1);
    float *z = zeros(nq), *dq = zeros(nq), *dk = zeros(nks), *dv = zeros(nks);
    OK(lp_attention_suffix(cpu(), z, q, k, v, s.B, s.Tq, s.pos0, s.H, s.Hkv, s.dh, cfg));
    OK(lp_attention_backward_suffix(cpu(), dq, dk, dv, dz, q, k, v, s.B, s.Tq, s.pos0, s.H, s.Hkv, s.dh, cfg));

    gpu g;
    gpu_init(&g, dt);
    void *d_q = gpu_put_act(&g, q, nq), *d_k = gpu_put_act(&g, k, nk), *d_v = gpu_put_act(&g, v, nk), *d_dz = gpu_put_act(&g, dz, nq);
    void *d_z = gpu_alloc(&g, act_bytes(&g, nq)), *d_dq = gpu_alloc(&g, act_bytes(&g, nq));
    void *d_dk = gpu_alloc(&g, act_bytes(&g, nks)), *d_dv = gpu_alloc(&g, act_bytes(&g, nks));
    OK(lp_attention_suffix(&g.c, d_z, d_q, d_k, d_v, s.B, s.Tq, s.pos0, s.H, s.Hkv, s.dh, cfg));
    OK(lp_attention_backward_suffix(&g.c, d_dq, d_dk, d_dv, d_dz, d_q, d_k, d_v, s.B, s.Tq, s.pos0, s.H, s.Hkv, s.dh, cfg));
    float *gz = gpu_get_act(&g, d_z, nq), *gq = gpu_get_act(&g, d_dq, nq), *gk = gpu_get_act(&g, d_dk, nks);
    float *gv = gpu_get_act(&g, d_dv, nks);
    char label[128], l2[160];
    snprintf(label, sizeof label, "suffix B=%d Tq=%d pos0=%d H=%d Hkv=%d dh=%d window=%d cap=%g", s.B, s.Tq, s.pos0, s.H, s.Hkv,
             s.dh, cfg->window, cfg->softcap);
    snprintf(l2, sizeof l2, "%s z", label);
    expect_close(OP_ATTN_CACHED_CFG, dt, l2, seed, gz, z, nq);
    snprintf(l2, sizeof l2, "%s dq", label);
    expect_close(OP_ATTN_BWD_CFG, dt, l2, seed, gq, dq, nq);
    snprintf(l2, sizeof l2, "%s dk", label);
    expect_close(OP_ATTN_BWD_CFG, dt, l2, seed, gk, dk, nks);
    snprintf(l2, sizeof l2, "%s dv", label);
    expect_close(OP_ATTN_BWD_CFG, dt, l2, seed, gv, dv, nks);
    /* the three-step suffix ops have no GPU twin: refused, not run wrong */
    cr_expect_neq(lp_attn_scores_suffix(&g.c, d_dq, d_q, d_k, s.B, s.Tq, s.pos0, s.H, s.Hkv, s.dh, cfg), LP_OK);
    gpu_done(&g, label);
    free(q), free(k), free(v), free(dz), free(z), free(dq), free(dk), free(dv), free(gz), free(gq), free(gk), free(gv);
}

Test(attn_suffix_cuda, forward_and_backward_match_the_cpu) {
    LP_TEST_REQUIRE_GPU();
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof SHAPES / sizeof *SHAPES; si++)
            for (size_t ci = 0; ci < sizeof CFGS / sizeof *CFGS; ci++) check(DTYPES[di], SHAPES[si], &CFGS[ci], 1300 + si * 8 + ci);
}
