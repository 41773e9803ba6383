/* test_ops_epilogue_cuda.c: the GEMMs with a cuBLASLt epilogue on the GPU against the CPU, in
 * F32 and BF16: lp_matmul_gelu (pre = x @ W + bias, post = gelu(pre); GPT-2's MLP) with and
 * without a bias, in both weight layouts, over widths that cuBLASLt's auxiliary output takes
 * (a multiple of 8) and widths it refuses (then the GEMM and the GELU kernel run instead);
 * pre must also equal lp_matmul's output (the bias epilogue of the same GEMM). Budgets:
 * ops_cuda_budget.h. Without a GPU every test skips. */
#include "loupe/ops.h"
#include "gputest.h"
#include "ops_cuda_budget.h"

Test(epilogue_cuda, matmul_gelu) {
    LP_TEST_REQUIRE_GPU();
    static const int shapes[][3] = {{1, 16, 8}, {33, 64, 96}, {31, 40, 33}, {EMU_CAP(1000, 70), 128, 3072 / 16}};
    for (int di = 0; di < 2; di++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
            for (int wt = 0; wt < 2; wt++)
                for (int with_bias = 0; with_bias < 2; with_bias++) {
                    const lp_dtype dt = DTYPES[di];
                    const int N = shapes[si][0], K = shapes[si][1], M = shapes[si][2];
                    const uint64_t seed = 15000 + si * 8 + wt * 2 + with_bias;
                    float *x = rand_act(dt, (size_t)N * K, seed, -1, 1), *w = rand_act(dt, (size_t)K * M, seed + 1, -0.3f, 0.3f);
                    float *b = with_bias ? rand_act(dt, (size_t)M, seed + 2, -1, 1) : NULL;
                    float *rpre = zeros((size_t)N * M), *rpost = zeros((size_t)N * M);
                    OK(lp_matmul_gelu(cpu(), rpost, rpre, x, w, b, N, K, M, wt));
                    gpu g;
                    gpu_init(&g, dt);
                    void *d_x = gpu_put_act(&g, x, (size_t)N * K), *d_w = gpu_put_act(&g, w, (size_t)K * M);
                    void *d_b = b ? gpu_put_act(&g, b, (size_t)M) : NULL;
                    void *d_pre = gpu_alloc(&g, act_bytes(&g, (size_t)N * M)), *d_post = gpu_alloc(&g, act_bytes(&g, (size_t)N * M));
                    void *d_mm = gpu_alloc(&g, act_bytes(&g, (size_t)N * M));
                    OK(lp_matmul_gelu(&g.c, d_post, d_pre, d_x, d_w, d_b, N, K, M, wt));
                    OK(lp_matmul(&g.c, d_mm, d_x, d_w, d_b, N, K, M, wt));
                    float *pre = gpu_get_act(&g, d_pre, (size_t)N * M), *post = gpu_get_act(&g, d_post, (size_t)N * M);
                    float *mm = gpu_get_act(&g, d_mm, (size_t)N * M);
                    char label[96];
                    snprintf(label, sizeof label, "N=%d K=%d M=%d w_trans=%d bias=%d", N, K, M, wt, with_bias);
                    expect_close(OP_MATMUL, dt, label, seed, pre, rpre, (size_t)N * M);
                    expect_close(OP_MATMUL_GELU, dt, label, seed, post, rpost, (size_t)N * M);
                    size_t diff = 0;
                    for (size_t i = 0; i < (size_t)N * M; i++) diff += pre[i] != mm[i];
                    cr_expect(diff == 0, "%s %s: pre differs from lp_matmul in %zu places", label, lp_dtype_name(dt), diff);
                    gpu_done(&g, label);
                    free(x), free(w), free(b), free(rpre), free(rpost), free(pre), free(post), free(mm);
                }
}
