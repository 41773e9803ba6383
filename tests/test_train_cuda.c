/* test_train_cuda.c: train-sae end to end on the GPU against the CPU: a few steps of every
 * architecture from the same activation store, seed and settings, then the saved SAEs
 * compared weight by weight and the reports' losses compared. Both run in F32 (SAE
 * training keeps F32 master weights on either device; the GPU's bf16 encoder copy is
 * turned off here); the GPU's sums differ from the
 * CPU's only in order (cuBLAS, block reductions, atomics), so after STEPS Adam steps the
 * weights agree within an nmse of 1e-8 (measured ~1e-14 for standard, topk and jumprelu)
 * and the last window's mse within 1e-4 relative. The data are continuous (no ties), so
 * TopK selects the same latents on both sides. BatchTopK cuts the whole batch at one
 * threshold, and a pre-activation within rounding of it may be kept on one side only
 * (the L0s differ in the fourth digit): each such token changes one latent's gradient,
 * so its budget is an nmse of 1e-6 (measured 7e-8 on the emulator); its mse stays within
 * 1e-4 (measured 5e-5).
 * Also `cache` (lp_cache_run): the store a random Llama writes on the GPU against the CPU's,
 * every hook, in F32 (nmse 1e-10: a forward's activations, measured ~1e-14) and BF16 (the
 * same activations rounded once more: nmse 1e-4).
 * Without a GPU every test skips, saying why (LOUPE_REQUIRE_GPU=1 turns the skip into a
 * failure); the emulated build (build/emu/) runs it on the CPU emulator. */
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/safetensors.h"
#include "loupe/sae.h"
#include "loupe/sae_train.h"
#include "loupe/store.h"
#include "testutil.h"

static char dir[64];
static void mk(void) {
    snprintf(dir, sizeof dir, "/tmp/loupe-train-cuda-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}
static void rm(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
}
TestSuite(train_cuda, .init = mk, .fini = rm, .timeout = 600);

#define HOOK "blocks.0.hook_resid_post"
enum { NSEQ = 32, CTX = 32, D = 16, S = 48, BATCH = 128, STEPS = 6 };

static void write_store(const char *path) {
    mkdir(path, 0755);
    const size_t n = (size_t)NSEQ * CTX * D;
    float *x = lp_test_rand(n, 17, -1, 1);
    for (size_t i = 0; i < n; i += 3) x[i] *= 4.0f; /* some structure: uneven column scales */
    int32_t *tok = calloc((size_t)NSEQ * CTX, sizeof(int32_t));
    lp_st_spec specs[2] = {{.name = "tokens", .dtype = LP_I32, .ndim = 2, .shape = {NSEQ, CTX}},
                           {.name = HOOK, .dtype = LP_F32, .ndim = 3, .shape = {NSEQ, CTX, D}}};
    const void *datas[2] = {tok, x};
    char p[256];
    snprintf(p, sizeof p, "%s/shard-00000.safetensors", path);
    cr_assert_eq(lp_st_write(p, specs, datas, 2, NULL), LP_OK, "%s", lp_last_error());
    free(tok), free(x);
}

static void train(lp_ctx *c, lp_sae_arch arch, const char *store, const char *out, lp_sae_train_report *rep) {
    lp_sae_train_cfg t;
    lp_sae_train_defaults(&t);
    t.store = store, t.out = out;
    snprintf(t.sae.hook_name, sizeof t.sae.hook_name, HOOK);
    t.sae.arch = arch, t.sae.d_sae = S, t.sae.k = 4;
    t.tokens = STEPS * BATCH, t.batch_tokens = BATCH, t.lr = 3e-3, t.l1_coefficient = 0.1, t.l0_coefficient = 0.01;
    t.encoder_bf16 = 0; /* the F32 encoder GEMM on both devices (tests/test_sae_train_bf16_cuda.c checks the bf16 one) */
    cr_assert_eq(lp_sae_train(&t, c, rep), LP_OK, "%s: %s", lp_sae_arch_name(arch), lp_last_error());
}

static void compare(const char *what, const float *got, const float *ref, size_t n, double budget) {
    lp_cmp r = lp_compare_f(got, ref, n);
    fprintf(stderr, "  %-34s nmse %.3e of %.1e\n", what, r.nmse, budget);
    cr_expect(r.nmse <= budget, "%s: nmse %.3e exceeds %.1e", what, r.nmse, budget);
}

Test(train_cuda, every_architecture_matches_the_cpu) {
    LP_TEST_REQUIRE_GPU();
    char store[128];
    snprintf(store, sizeof store, "%s/store", dir);
    write_store(store);
    lp_ctx cpu, gpu;
    cr_assert_eq(lp_ctx_init(&cpu, LP_CPU, LP_F32), LP_OK);
    cr_assert_eq(lp_ctx_init(&gpu, LP_CUDA, LP_F32), LP_OK, "%s", lp_last_error());
    const lp_sae_arch archs[] = {LP_SAE_STANDARD, LP_SAE_TOPK, LP_SAE_BATCHTOPK, LP_SAE_JUMPRELU};
    for (int a = 0; a < 4; a++) {
        const char *name = lp_sae_arch_name(archs[a]);
        const double budget = archs[a] == LP_SAE_BATCHTOPK ? 1e-6 : 1e-8;
        char out_c[128], out_g[128], what[96];
        snprintf(out_c, sizeof out_c, "%s/%s-cpu", dir, name);
        snprintf(out_g, sizeof out_g, "%s/%s-gpu", dir, name);
        lp_sae_train_report rc, rg;
        train(&cpu, archs[a], store, out_c, &rc);
        train(&gpu, archs[a], store, out_g, &rg);
        cr_expect_eq(rg.steps, rc.steps, "%s: %lld steps on the GPU, %lld on the CPU", name, (long long)rg.steps,
                     (long long)rc.steps);
        const double rel = fabs(rg.mse - rc.mse) / fmax(fabs(rc.mse), 1e-30);
        fprintf(stderr, "  %-10s mse cpu %.6g gpu %.6g (rel %.2e of 1e-4), L0 %.3f / %.3f\n", name, rc.mse, rg.mse, rel,
                rc.l0, rg.l0);
        cr_expect(rel <= 1e-4, "%s: last-window mse %.8g on the GPU, %.8g on the CPU", name, rg.mse, rc.mse);
        lp_sae *sc, *sg; /* both loaded on the CPU for the comparison */
        cr_assert_eq(lp_sae_load(&sc, &cpu, out_c), LP_OK, "%s", lp_last_error());
        cr_assert_eq(lp_sae_load(&sg, &cpu, out_g), LP_OK, "%s", lp_last_error());
        cr_assert_eq(sg->n_floats, sc->n_floats);
        snprintf(what, sizeof what, "%s W_enc", name);
        compare(what, sg->W_enc, sc->W_enc, (size_t)D * S, budget);
        snprintf(what, sizeof what, "%s W_dec", name);
        compare(what, sg->W_dec, sc->W_dec, (size_t)S * D, budget);
        snprintf(what, sizeof what, "%s b_enc", name);
        compare(what, sg->b_enc, sc->b_enc, S, budget);
        snprintf(what, sizeof what, "%s b_dec", name);
        compare(what, sg->b_dec, sc->b_dec, D, budget);
        if (sc->threshold) {
            snprintf(what, sizeof what, "%s threshold", name);
            compare(what, sg->threshold, sc->threshold, S, budget);
        }
        lp_sae_free(sc, &cpu);
        lp_sae_free(sg, &cpu);
    }
    lp_ctx_free(&gpu);
    lp_ctx_free(&cpu);
}

Test(train_cuda, cache_matches_the_cpu) {
    LP_TEST_REQUIRE_GPU();
    const lp_config cfg = {.arch = LP_ARCH_LLAMA, .n_layers = 2, .d_model = 32, .n_heads = 4, .n_kv_heads = 2,
                           .d_head = 8, .d_mlp = 48, .n_ctx = 16, .d_vocab = 50};
    enum { NS = 5, C = 9 };
    int32_t ids[NS * C];
    uint64_t r = 21;
    for (int i = 0; i < NS * C; i++) ids[i] = (int32_t)(lp_test_uniform(&r, 0, 1) * 50) % 50;
    lp_tokens toks = {.ids = ids, .n_seq = NS, .ctx = C};
    static const char *hooks[] = {"blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.mlp.hook_post"};
    const char *list = "blocks.0.hook_resid_post,blocks.1.attn.hook_z,blocks.1.mlp.hook_post";
    const lp_dtype dts[] = {LP_F32, LP_BF16};
    for (int di = 0; di < 2; di++) {
        char out[2][128];
        for (int dev = 0; dev < 2; dev++) {
            lp_model *m;
            cr_assert_eq(lp_model_random(&m, &cfg, 9, dev ? LP_CUDA : LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
            snprintf(out[dev], sizeof out[dev], "%s/store-%s-%s", dir, lp_dtype_name(dts[di]), dev ? "gpu" : "cpu");
            lp_cache_opts o = {.out = out[dev], .hooks = list, .dtype = dts[di], .batch = 2, .shard_sequences = 3};
            lp_cache_report rep;
            cr_assert_eq(lp_cache_run(m, &toks, &o, &rep), LP_OK, "%s", lp_last_error());
            cr_expect_eq(rep.n_tokens, NS * C);
            lp_model_free(m);
        }
        for (int h = 0; h < 3; h++) {
            lp_store *sc, *sg;
            cr_assert_eq(lp_store_open(&sc, out[0], hooks[h]), LP_OK, "%s", lp_last_error());
            cr_assert_eq(lp_store_open(&sg, out[1], hooks[h]), LP_OK, "%s", lp_last_error());
            const int64_t n = lp_store_n_tokens(sc);
            const int d = lp_store_d(sc);
            cr_assert_eq(lp_store_n_tokens(sg), n);
            cr_assert_eq(lp_store_d(sg), d);
            float *a = malloc((size_t)n * d * sizeof(float)), *b = malloc((size_t)n * d * sizeof(float));
            cr_assert_eq(lp_store_read(sc, 0, n, a), LP_OK, "%s", lp_last_error());
            cr_assert_eq(lp_store_read(sg, 0, n, b), LP_OK, "%s", lp_last_error());
            const double budget = dts[di] == LP_F32 ? 1e-10 : 1e-4;
            lp_cmp c = lp_compare_f(b, a, (size_t)n * d);
            fprintf(stderr, "  cache %s %-26s nmse %.3e of %.0e\n", lp_dtype_name(dts[di]), hooks[h], c.nmse, budget);
            cr_expect(c.nmse <= budget, "cache %s %s: nmse %.3e", lp_dtype_name(dts[di]), hooks[h], c.nmse);
            free(a), free(b);
            lp_store_close(sc), lp_store_close(sg);
        }
    }
}
