/* bench_forward.c: forward-pass throughput of a GPT-2-small-shaped model (random
 * weights), without capture and with all 13 residual streams captured to host memory.
 *
 * Each section validates before it times (captured and uncaptured runs give the same
 * logits; the GPU agrees with the CPU), warms up, and prints tokens/s beside the ceiling
 * measured in the same run: the GEMM rate of this machine (OpenBLAS sgemm on the CPU,
 * cuBLAS bf16 on the GPU) and, on the GPU, device-to-host copy bandwidth.
 *   build/bench_forward [--cpu-batch B --cpu-seq T] [--gpu-batch B --gpu-seq T] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "loupe/hooks.h"
#include "loupe/model.h"
#include "loupe/ops.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define CHECK(x)                                                                               \
    do {                                                                                       \
        lp_status s_ = (x);                                                                    \
        if (s_ != LP_OK) {                                                                     \
            fprintf(stderr, "bench_forward: %s (%s)\n", lp_last_error(), lp_last_error_where()); \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

static const lp_config GPT2_SMALL = {.arch = LP_ARCH_GPT2, .n_layers = 12, .d_model = 768, .n_heads = 12, .d_mlp = 3072,
                                     .n_ctx = 1024, .d_vocab = 50257};

/* Matmul FLOPs of one forward per token (weights and unembedding) plus causal attention. */
static double flops_per_token(const lp_config *c, int T) {
    double D = c->d_model, F = c->d_mlp;
    double per_layer = 2 * (4 * D * D + 2 * D * F) + 2 * 2 * D * (T + 1) / 2.0; /* QK^T and PV over ~T/2 keys */
    return c->n_layers * per_layer + 2 * D * c->d_vocab;
}

/* GEMM rate of the context, GFLOP/s, on an n x n x n product. */
static double gemm_rate(lp_ctx *c, int n, int reps) {
    size_t bytes = (size_t)n * n * lp_dtype_size(c->dtype);
    void *a, *b, *o;
    CHECK(lp_ctx_alloc(c, bytes, &a));
    CHECK(lp_ctx_alloc(c, bytes, &b));
    CHECK(lp_ctx_alloc(c, bytes, &o));
    CHECK(lp_ctx_memset0(c, a, bytes));
    CHECK(lp_ctx_memset0(c, b, bytes));
    CHECK(lp_matmul(c, o, a, b, NULL, n, n, n, 0)); /* warm-up */
    CHECK(lp_ctx_sync(c));
    double t0 = now();
    for (int i = 0; i < reps; i++) CHECK(lp_matmul(c, o, a, b, NULL, n, n, n, 0));
    CHECK(lp_ctx_sync(c));
    double dt = now() - t0;
    lp_ctx_release(c, a), lp_ctx_release(c, b), lp_ctx_release(c, o);
    return 2.0 * n * n * n * reps / dt / 1e9;
}

static void tokens(int32_t *t, size_t n, int V) {
    uint64_t s = 42;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        t[i] = (int32_t)((s >> 33) % V);
    }
}

/* Seconds per forward (median of reps after a warm-up). */
static double time_forward(lp_model *m, const int32_t *tok, int B, int T, int reps) {
    CHECK(lp_model_forward(m, tok, B, T, LP_WANT_LOSS));
    double best[16], t;
    for (int r = 0; r < reps; r++) {
        t = now();
        CHECK(lp_model_forward(m, tok, B, T, LP_WANT_LOSS));
        best[r] = now() - t;
    }
    for (int i = 0; i < reps; i++) /* sort for the median */
        for (int j = i + 1; j < reps; j++)
            if (best[j] < best[i]) t = best[i], best[i] = best[j], best[j] = t;
    return best[reps / 2];
}

static double mean_loss(lp_model *m, int B, int T) {
    const float *l = lp_model_losses(m);
    double s = 0;
    for (int i = 0; i < B * (T - 1); i++) s += l[i];
    return s / (B * (T - 1));
}

static void capture_residuals(lp_model *m) {
    /* 13 residual streams: the input of every block and the output of the last */
    CHECK(lp_hook_capture(m, "blocks.*.hook_resid_pre", NULL, 0, NULL));
    CHECK(lp_hook_capture(m, "blocks.11.hook_resid_post", NULL, 0, NULL));
}

static void section(const char *title, lp_device dev, lp_dtype dt, int B, int T, int reps) {
    lp_model *m;
    CHECK(lp_model_random(&m, &GPT2_SMALL, 1, dev, dt));
    int32_t *tok = malloc((size_t)B * T * 4);
    tokens(tok, (size_t)B * T, GPT2_SMALL.d_vocab);

    /* validate: the loss is finite and near ln(V) for small random weights, and capturing
     * 13 residual streams leaves it unchanged */
    CHECK(lp_model_forward(m, tok, B, T, LP_WANT_LOSS));
    double plain = mean_loss(m, B, T);
    capture_residuals(m);
    CHECK(lp_model_forward(m, tok, B, T, LP_WANT_LOSS));
    double captured = mean_loss(m, B, T);
    if (!isfinite(plain) || fabs(plain - log(GPT2_SMALL.d_vocab)) > 1.0 || plain != captured) {
        fprintf(stderr, "bench_forward: validation failed: loss %.6f plain, %.6f with capture (ln V = %.3f)\n", plain, captured,
                log(GPT2_SMALL.d_vocab));
        exit(1);
    }
    size_t dev_bytes_cap = lp_model_device_bytes(m);
    double t_cap = time_forward(m, tok, B, T, reps);
    lp_hooks_clear(m);
    double t_plain = time_forward(m, tok, B, T, reps);
    size_t dev_bytes = lp_model_device_bytes(m);

    double gemm = gemm_rate(lp_model_ctx(m), dev == LP_CUDA ? 8192 : 1024, dev == LP_CUDA ? 20 : 3);
    double fl = flops_per_token(&GPT2_SMALL, T), tps = B * T / t_plain, tps_cap = B * T / t_cap;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("%s: GPT-2 small shape, batch %d x %d, %s\n", title, B, T, dt == LP_BF16 ? "bf16" : "f32");
    printf("  validated: loss %.4f (ln V = %.4f), identical with 13 residual streams captured\n", plain, log(GPT2_SMALL.d_vocab));
    printf("  no capture:        %10.0f tokens/s  (%6.1f GFLOP/s, %4.1f%% of the %.0f GFLOP/s GEMM ceiling)\n", tps, tps * fl / 1e9,
           100 * tps * fl / 1e9 / gemm, gemm);
    printf("  13 streams to host:%10.0f tokens/s  (capture costs %.1f%%)\n", tps_cap, 100 * (1 - tps_cap / tps));
    if (dev == LP_CUDA)
        printf("  device memory held: %.1f MiB without capture, %.1f MiB with\n", dev_bytes / 1048576.0, dev_bytes_cap / 1048576.0);
    else
        printf("  peak resident memory: %.1f MiB (weights and activations %.1f MiB)\n", ru.ru_maxrss / 1024.0, dev_bytes / 1048576.0);
    free(tok);
    lp_model_free(m);
}

/* The GPU forward must agree with the CPU before it is timed. */
static void validate_gpu(lp_dtype dt, double budget) {
    const int B = 2, T = 64;
    lp_model *cpu, *gpu;
    CHECK(lp_model_random(&cpu, &GPT2_SMALL, 1, LP_CPU, LP_F32));
    CHECK(lp_model_random(&gpu, &GPT2_SMALL, 1, LP_CUDA, dt));
    int32_t tok[B * T];
    tokens(tok, B * T, GPT2_SMALL.d_vocab);
    CHECK(lp_model_forward(cpu, tok, B, T, LP_WANT_LOGITS));
    CHECK(lp_model_forward(gpu, tok, B, T, LP_WANT_LOGITS));
    const float *a = lp_model_logits(gpu), *r = lp_model_logits(cpu);
    double maxd = 0, maxr = 0;
    for (size_t i = 0; i < (size_t)B * T * GPT2_SMALL.d_vocab; i++) {
        if (!isfinite(a[i])) maxd = INFINITY;
        maxd = fmax(maxd, fabs(a[i] - r[i]));
        maxr = fmax(maxr, fabs(r[i]));
    }
    printf("  GPU %s logits vs CPU: max relative error %.2e (budget %.0e)\n", dt == LP_BF16 ? "bf16" : "f32", maxd / maxr, budget);
    if (!(maxd / maxr <= budget)) {
        fprintf(stderr, "bench_forward: GPU validation failed\n");
        exit(1);
    }
    lp_model_free(cpu);
    lp_model_free(gpu);
}

static void copy_bandwidth(void) {
    lp_ctx c;
    CHECK(lp_ctx_init(&c, LP_CUDA, LP_BF16));
    size_t bytes = 256u << 20;
    void *d, *h;
    CHECK(lp_ctx_alloc(&c, bytes, &d));
    CHECK(lp_ctx_alloc_host(&c, bytes, &h));
    CHECK(lp_ctx_to_host(&c, h, d, bytes));
    double t0 = now();
    for (int i = 0; i < 5; i++) CHECK(lp_ctx_to_host(&c, h, d, bytes));
    double gbs = 5.0 * bytes / (now() - t0) / 1e9;
    printf("  device-to-host copy ceiling: %.1f GB/s (pinned)\n", gbs);
    lp_ctx_release(&c, d);
    lp_ctx_release_host(&c, h);
    lp_ctx_free(&c);
}

int main(int argc, char **argv) {
    int cb = 1, ct = 256, gb = 16, gt = 1024;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--cpu-batch")) cb = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--cpu-seq")) ct = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--gpu-batch")) gb = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--gpu-seq")) gt = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: bench_forward [--cpu-batch B] [--cpu-seq T] [--gpu-batch B] [--gpu-seq T]\n");
            return 2;
        }
    }
    section("CPU", LP_CPU, LP_F32, cb, ct, 3);
    char why[256];
    if (!lp_cuda_available(why, sizeof why)) {
        printf("GPU: skipped: %s\n", why);
        return 0;
    }
    validate_gpu(LP_F32, 1e-3);
    validate_gpu(LP_BF16, 5e-2);
    copy_bandwidth();
    section("GPU", LP_CUDA, LP_BF16, gb, gt, 5);
    printf("  target (H100/H200): >= 1.5M tokens/s without capture, capture <= 15%%\n");
    return 0;
}
