/* bench_sae.c: SAE training and encoding throughput.
 *
 * Training runs the real trainer (lp_sae_train) on a synthetic activation store, so the
 * figure includes data loading, shuffling, AuxK and the dead-latent bookkeeping. Before
 * timing, each section validates: the loss falls and ends finite, and on the GPU a short
 * run agrees with the CPU. Throughput is printed beside the GEMM rate measured in the same
 * run (OpenBLAS sgemm on the CPU; cuBLAS bf16 and f32 on the GPU). On the GPU the trainer
 * keeps F32 master weights and runs the encoder GEMM on a bf16 copy of W_enc (fp32 sums),
 * so the bf16 rate is its ceiling there; TopK is also timed with the F32 encoder GEMM, and
 * the two runs' explained variances must agree within 0.02 (the bf16 copy's budget).
 * On a GPU it also trains from a live GPT-2-small-shaped forward, end to end.
 * On the CPU, SAELens's training step (bench/peers/saelens_train.py, when sae-lens is
 * installed) runs on the same shape and threads right after each loupe figure, and the ratio
 * is printed: both medians of three timed runs.
 *   build/bench_sae [--cpu-d 256 --cpu-sae 4096 --cpu-batch 1024] [--steps N] [--arch topk|standard] [--no-peer] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loupe/model.h"
#include "loupe/ops.h"
#include "loupe/safetensors.h"
#include "loupe/sae.h"
#include "loupe/sae_train.h"
#include "sae/sae_internal.h"

#define CHECK(x)                                                                                \
    do {                                                                                        \
        lp_status s_ = (x);                                                                     \
        if (s_ != LP_OK) {                                                                      \
            fprintf(stderr, "bench_sae: %s (%s)\n", lp_last_error(), lp_last_error_where());    \
            exit(1);                                                                            \
        }                                                                                       \
    } while (0)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static char g_dir[64];

/* A store of n_seq x 128 tokens of d sparse superposed features (so SAEs have something
 * to find). */
static void write_store(const char *path, int n_seq, int d) {
    int ctx = 128;
    size_t n = (size_t)n_seq * ctx;
    float *x = calloc(n * d, sizeof(float));
    int32_t *tok = calloc(n, sizeof(int32_t));
    int nf = 4 * d;
    float *dirs = malloc((size_t)nf * d * sizeof(float));
    uint64_t s = 1;
    for (size_t i = 0; i < (size_t)nf * d; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        dirs[i] = ((float)(s >> 40) / 16777216.0f - 0.5f);
    }
    for (size_t t = 0; t < n; t++)
        for (int j = 0; j < 8; j++) { /* 8 active features per token */
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            int f = (int)((s >> 33) % nf);
            float a = 0.5f + (float)((s >> 20) & 1023) / 1024.0f;
            for (int k = 0; k < d; k++) x[t * d + k] += a * dirs[(size_t)f * d + k];
        }
    mkdir(path, 0755);
    lp_st_spec specs[2] = {{.name = "tokens", .dtype = LP_I32, .ndim = 2, .shape = {n_seq, ctx}},
                           {.name = "blocks.0.hook_resid_post", .dtype = LP_F32, .ndim = 3, .shape = {n_seq, ctx, d}}};
    const void *datas[2] = {tok, x};
    char p[256];
    snprintf(p, sizeof p, "%s/shard-00000.safetensors", path);
    CHECK(lp_st_write(p, specs, datas, 2, NULL));
    free(x), free(tok), free(dirs);
}

static double gemm_rate(lp_device dev, lp_dtype dt, int n, int reps) {
    lp_ctx c;
    CHECK(lp_ctx_init(&c, dev, dt));
    size_t bytes = (size_t)n * n * lp_dtype_size(dt);
    void *a, *b, *o;
    CHECK(lp_ctx_alloc(&c, bytes, &a));
    CHECK(lp_ctx_alloc(&c, bytes, &b));
    CHECK(lp_ctx_alloc(&c, bytes, &o));
    CHECK(lp_ctx_memset0(&c, a, bytes));
    CHECK(lp_ctx_memset0(&c, b, bytes));
    CHECK(lp_matmul(&c, o, a, b, NULL, n, n, n, 0));
    CHECK(lp_ctx_sync(&c));
    double t0 = now();
    for (int i = 0; i < reps; i++) CHECK(lp_matmul(&c, o, a, b, NULL, n, n, n, 0));
    CHECK(lp_ctx_sync(&c));
    double r = 2.0 * n * n * n * reps / (now() - t0) / 1e9;
    lp_ctx_release(&c, a), lp_ctx_release(&c, b), lp_ctx_release(&c, o);
    lp_ctx_free(&c);
    return r;
}

/* Dense FLOPs per training token: the encoder GEMM forward and its weight gradient
 * (sparse for topk), the decoder forward and its two gradients (dense for standard: five
 * GEMMs of 2 D S each; no input gradient, as b_dec's goes through d b_enc). */
static double train_flops(lp_sae_arch a, double D, double S, double K) {
    if (a == LP_SAE_TOPK) return 2 * D * S + 3 * 2 * K * D + 2 * K * D;
    return 10 * D * S;
}

static void train_cfg(lp_sae_train_cfg *t, const char *store, const char *out, lp_sae_arch a, int S, int batch, int steps) {
    lp_sae_train_defaults(t);
    t->store = store, t->out = out;
    snprintf(t->sae.hook_name, sizeof t->sae.hook_name, "blocks.0.hook_resid_post");
    t->sae.arch = a, t->sae.d_sae = S, t->sae.k = 32;
    t->batch_tokens = batch, t->tokens = (int64_t)steps * batch, t->log_every = steps;
    t->shuffle_tokens = 16 * (int64_t)batch, t->l1_coefficient = 1.0, t->lr = 1e-3;
    snprintf(t->b_dec_init, sizeof t->b_dec_init, "mean");
}

static int g_arch = -1, g_peer = 1; /* -1: both architectures */

static double median3(const double *v) {
    double a = v[0], b = v[1], c = v[2];
    if (a > b) { double t = a; a = b; b = t; }
    if (b > c) b = c;
    return a > b ? a : b;
}

/* SAELens's training step on the same shape and thread count (bench/peers/saelens_train.py,
 * run by LOUPE_PYTHON or python3), its tokens/s; 0 when it is not installed. */
static double peer_tps(const char *arch, int D, int S, int batch, int steps) {
    const char *py = getenv("LOUPE_PYTHON") ? getenv("LOUPE_PYTHON") : "python3";
    const char *thr = getenv("OPENBLAS_NUM_THREADS") ? getenv("OPENBLAS_NUM_THREADS") : "";
    char cmd[512], line[512];
    long nthr = thr[0] ? atol(thr) : sysconf(_SC_NPROCESSORS_ONLN);
    snprintf(cmd, sizeof cmd, "OMP_NUM_THREADS=%ld %s bench/peers/saelens_train.py --arch %s --d-in %d --d-sae %d --batch %d --steps %d 2>&1",
             nthr, py, arch, D, S, batch, steps);
    fflush(stdout);
    FILE *f = popen(cmd, "r");
    double tps = 0;
    while (f && fgets(line, sizeof line, f)) {
        const char *p = strstr(line, " threads: ");
        if (p && strstr(line, "tokens/s")) tps = atof(p + 10);
    }
    int rc = f ? pclose(f) : -1;
    if (tps <= 0) printf("  SAELens %s: not run (%s exited with %d; install tests/gen/requirements-sae.txt or set LOUPE_PYTHON)\n", arch, py, rc);
    return tps;
}

static void section(const char *title, lp_device dev, int D, int S, int batch, int steps) {
    char store[128], out[128];
    snprintf(store, sizeof store, "%s/store-%d", g_dir, D);
    struct stat sb;
    int n_seq = (int)((16 * (int64_t)batch + 127) / 128);
    if (stat(store, &sb) != 0) write_store(store, n_seq, D);
    lp_ctx c;
    CHECK(lp_ctx_init(&c, dev, LP_F32));
    double gemm32 = gemm_rate(dev, LP_F32, dev == LP_CUDA ? 8192 : 1024, dev == LP_CUDA ? 10 : 3);
    double gemm16 = dev == LP_CUDA ? gemm_rate(dev, LP_BF16, 8192, 20) : 0;
    printf("%s: d_in %d, d_sae %d, batch %d tokens, F32 master weights%s\n", title, D, S, batch,
           dev == LP_CUDA ? ", encoder GEMM on a bf16 copy (fp32 sums)" : "");
    if (dev == LP_CPU) printf("  OPENBLAS_THREAD_TIMEOUT=%s (loupe train-sae sets 20 when unset)\n", getenv("OPENBLAS_THREAD_TIMEOUT"));
    lp_sae_arch archs[2] = {LP_SAE_TOPK, LP_SAE_STANDARD};
    for (int a = 0; a < 2; a++) {
        if (g_arch >= 0 && archs[a] != (lp_sae_arch)g_arch) continue;
        /* validate: a short run must reduce the loss and stay finite */
        lp_sae_train_cfg t;
        lp_sae_train_report rep;
        snprintf(out, sizeof out, "%s/v-%d-%d-%d", g_dir, D, a, dev);
        train_cfg(&t, store, out, archs[a], S, batch, 4);
        t.log_every = 1;
        CHECK(lp_sae_train(&t, &c, &rep));
        double first_ev = rep.explained_variance;
        /* the median of three runs of `steps` steps, each from the same initialisation */
        double tps[3];
        for (int i = 0; i < 3; i++) {
            snprintf(out, sizeof out, "%s/t-%d-%d-%d", g_dir, D, a, dev);
            train_cfg(&t, store, out, archs[a], S, batch, steps);
            t.checkpoint_every = 0;
            CHECK(lp_sae_train(&t, &c, &rep));
            tps[i] = rep.tokens_per_s;
            char rm[256];
            if (i < 2) snprintf(rm, sizeof rm, "rm -rf %s", out), (void)!system(rm);
        }
        double med = median3(tps);
        if (!isfinite(rep.mse) || !(rep.explained_variance > first_ev)) {
            fprintf(stderr, "bench_sae: validation failed: %s explained variance %.4f after %d steps (%.4f after 4)\n",
                    lp_sae_arch_name(archs[a]), rep.explained_variance, steps, first_ev);
            exit(1);
        }
        double fl = train_flops(archs[a], D, S, 32) * med / 1e9, ceil_rate = gemm16 > 0 ? gemm16 : gemm32;
        printf("  train %-9s %10.0f tokens/s  (median of 3 x %d steps; %.1f GFLOP/s dense-equivalent: %.1f%% of the %.0f GFLOP/s f32 GEMM rate",
               lp_sae_arch_name(archs[a]), med, steps, fl, 100 * fl / gemm32, gemm32);
        if (gemm16 > 0) printf(", %.1f%% of the %.0f bf16 rate", 100 * fl / gemm16, gemm16);
        printf("); encoder GEMM alone allows %.0f tokens/s at the %s rate; validated: EV %.3f, L0 %.1f after %d steps (EV %.3f after 4)\n",
               ceil_rate * 1e9 / (2.0 * D * S), gemm16 > 0 ? "bf16" : "f32", rep.explained_variance, rep.l0, steps, first_ev);
        if (dev == LP_CUDA) {
            const double target = archs[a] == LP_SAE_TOPK ? 8e6 : 2.5e6;
            printf("  target     %-9s %10.0f tokens/s  (H100/H200, bf16): %s (%.2fx of it)\n", lp_sae_arch_name(archs[a]), target,
                   med >= target ? "met" : "NOT met", med / target);
        }
        if (dev == LP_CUDA && archs[a] == LP_SAE_TOPK) { /* the same run with the F32 encoder GEMM */
            double ev16 = rep.explained_variance;
            snprintf(out, sizeof out, "%s/f32-%d-%d", g_dir, D, a);
            train_cfg(&t, store, out, archs[a], S, batch, steps);
            t.encoder_bf16 = 0;
            CHECK(lp_sae_train(&t, &c, &rep));
            printf("  train %-9s %10.0f tokens/s  with the F32 encoder GEMM (one run of %d steps): EV %.3f against %.3f with bf16 (budget 0.02)\n",
                   lp_sae_arch_name(archs[a]), rep.tokens_per_s, steps, rep.explained_variance, ev16);
            if (!(fabs(rep.explained_variance - ev16) <= 0.02)) {
                fprintf(stderr, "bench_sae: validation failed: the bf16 encoder's EV %.4f is off the F32 one's %.4f\n", ev16,
                        rep.explained_variance);
                exit(1);
            }
        }
        if (dev == LP_CPU && g_peer) {
            double p = peer_tps(archs[a] == LP_SAE_TOPK ? "topk" : "standard", D, S, batch, steps);
            if (p > 0) printf("  SAELens   %-9s %10.0f tokens/s  (same run, same threads): loupe / SAELens = %.2fx\n",
                              lp_sae_arch_name(archs[a]), p, med / p);
        }
        fflush(stdout);
    }
    /* encode only: the forward of a trained topk SAE on device-resident tokens */
    if (g_arch == LP_SAE_STANDARD) {
        lp_ctx_free(&c);
        return;
    }
    lp_sae *s;
    snprintf(out, sizeof out, "%s/t-%d-0-%d", g_dir, D, dev);
    CHECK(lp_sae_load(&s, &c, out));
    sae_runner *r;
    CHECK(sae_runner_new(&r, s, &c, batch, 0, 0));
    CHECK(sae_runner_forward(r, batch, 0));
    CHECK(lp_ctx_sync(&c));
    int reps = dev == LP_CUDA ? 50 : 5;
    double t0 = now();
    for (int i = 0; i < reps; i++) CHECK(sae_runner_forward(r, batch, 0));
    CHECK(lp_ctx_sync(&c));
    double tps = (double)batch * reps / (now() - t0), fl = 2.0 * D * S * tps / 1e9;
    printf("  encode topk      %10.0f tokens/s  (%.1f GFLOP/s: %.1f%% of the f32 GEMM rate)\n", tps, fl, 100 * fl / gemm32);
    sae_runner_free(r);
    lp_sae_free(s, &c);
    lp_ctx_free(&c);
}

/* The GPU must agree with the CPU on a short run before it is timed. */
static void validate_gpu(void) {
    char store[128], a[128], b[128];
    snprintf(store, sizeof store, "%s/store-64", g_dir);
    write_store(store, 32, 64);
    lp_ctx cc, gc;
    CHECK(lp_ctx_init(&cc, LP_CPU, LP_F32));
    CHECK(lp_ctx_init(&gc, LP_CUDA, LP_F32));
    double worst = 0;
    for (int arch = 0; arch < 2; arch++) {
        lp_sae_train_cfg t;
        lp_sae_train_report rep;
        snprintf(a, sizeof a, "%s/vc-%d", g_dir, arch);
        snprintf(b, sizeof b, "%s/vg-%d", g_dir, arch);
        train_cfg(&t, store, a, arch ? LP_SAE_STANDARD : LP_SAE_TOPK, 256, 256, 5);
        t.encoder_bf16 = 0; /* the F32 path against the CPU; section() checks the bf16 one */
        CHECK(lp_sae_train(&t, &cc, &rep));
        t.out = b;
        CHECK(lp_sae_train(&t, &gc, &rep));
        lp_sae *x, *y;
        CHECK(lp_sae_load(&x, &cc, a));
        CHECK(lp_sae_load(&y, &cc, b));
        double d = 0, m = 0;
        for (size_t i = 0; i < x->n_floats; i++) {
            float p = ((float *)x->mem)[i], q = ((float *)y->mem)[i];
            d = fmax(d, fabs(p - q)), m = fmax(m, fabs(p));
        }
        worst = fmax(worst, d / m);
        lp_sae_free(x, &cc), lp_sae_free(y, &cc);
    }
    printf("  GPU vs CPU after 5 training steps: max |difference| / max |weight| %.2e (budget 1e-3)\n", worst);
    if (!(worst <= 1e-3)) {
        fprintf(stderr, "bench_sae: GPU validation failed\n");
        exit(1);
    }
    lp_ctx_free(&cc), lp_ctx_free(&gc);
}

/* End to end: a TopK SAE trained from a live GPT-2-small-shaped forward (random bf16
 * weights) at the middle of the residual stream. */
static void live_section(void) {
    lp_config g = {.arch = LP_ARCH_GPT2, .n_layers = 12, .d_model = 768, .n_heads = 12, .d_mlp = 3072, .n_ctx = 1024, .d_vocab = 50257};
    lp_model *m;
    CHECK(lp_model_random(&m, &g, 1, LP_CUDA, LP_BF16));
    int n_seq = 64, ctx = 1024;
    int32_t *tok = malloc((size_t)n_seq * ctx * sizeof(int32_t));
    uint64_t s = 3;
    for (size_t i = 0; i < (size_t)n_seq * ctx; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((s >> 33) % g.d_vocab);
    }
    lp_live *live;
    CHECK(lp_live_open(&live, m, tok, n_seq, ctx, 16));
    lp_ctx c;
    CHECK(lp_ctx_init(&c, LP_CUDA, LP_F32));
    lp_sae_train_cfg t;
    char out[128];
    snprintf(out, sizeof out, "%s/live", g_dir);
    train_cfg(&t, NULL, out, LP_SAE_TOPK, 24576, 4096, 64);
    snprintf(t.sae.hook_name, sizeof t.sae.hook_name, "blocks.6.hook_resid_post");
    t.shuffle_tokens = 16 * 4096;
    lp_sae_train_report rep;
    CHECK(lp_sae_train_live(&t, 1, live, &c, &rep));
    printf("  live GPT-2-small forward (bf16) -> topk SAE on blocks.6.hook_resid_post: %.0f tokens/s end to end (EV %.3f)\n",
           rep.tokens_per_s, rep.explained_variance);
    lp_live_close(live);
    lp_ctx_free(&c);
    lp_model_free(m);
    free(tok);
}

int main(int argc, char **argv) {
    int cd = 256, cs = 4096, cb = 1024, steps = 20, cpu = 1;
    /* what loupe train-sae runs under (host/cli/main.c: train_blas_env), unless set already */
    if (!getenv("OPENBLAS_THREAD_TIMEOUT") && setenv("OPENBLAS_THREAD_TIMEOUT", "20", 1) == 0) execv("/proc/self/exe", argv);
    for (int i = 1; i < argc; i++) {
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--gpu-only")) cpu = 0; /* the offline GPU check's time budget */
        else if (val && !strcmp(argv[i], "--cpu-d")) cd = atoi(val), i++;
        else if (val && !strcmp(argv[i], "--cpu-sae")) cs = atoi(val), i++;
        else if (val && !strcmp(argv[i], "--cpu-batch")) cb = atoi(val), i++;
        else if (val && !strcmp(argv[i], "--steps")) steps = atoi(val), i++;
        else if (val && !strcmp(argv[i], "--arch")) g_arch = !strcmp(val, "topk") ? LP_SAE_TOPK : LP_SAE_STANDARD, i++;
        else if (!strcmp(argv[i], "--no-peer")) g_peer = 0;
        else {
            fprintf(stderr, "usage: bench_sae [--gpu-only] [--cpu-d D] [--cpu-sae S] [--cpu-batch B] [--steps N] [--arch topk|standard] [--no-peer]\n");
            return 2;
        }
    }
    snprintf(g_dir, sizeof g_dir, "/tmp/loupe-bench-sae-XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    if (cpu) section("CPU", LP_CPU, cd, cs, cb, steps);
    char why[256];
    if (lp_cuda_available(why, sizeof why)) {
        validate_gpu();
        section("GPU", LP_CUDA, 768, 24576, 4096, 100);
        live_section();
    } else {
        printf("GPU: skipped: %s\n", why);
    }
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "bench_sae: could not remove %s\n", g_dir);
    return 0;
}
