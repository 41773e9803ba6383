/* bench_forward.c: forward-pass throughput of a GPT-2-small-shaped model (random
 * weights), without capture and with every residual stream captured to host memory; of
 * SmolLM2-135M (real weights, models/, when `make model` has fetched it); and on the GPU
 * of a Llama-3-8B-shaped model with random bf16 weights.
 *
 * Each section validates before it times (captured and uncaptured runs give the same
 * logits; the GPU agrees with the CPU), warms up, and prints tokens/s beside the ceiling
 * measured in the same run: the GEMM rate of this machine (OpenBLAS sgemm on the CPU,
 * cuBLAS bf16 on the GPU) and, on the GPU, device-to-host copy bandwidth.
 * On the CPU the PyTorch eager peer (bench/peers/torch_forward.py, torch_smollm2.py) runs right
 * after loupe with the same thread count, and the ratio is printed (--no-peer: not).
 *   build/bench_forward [--cpu-batch B --cpu-seq T] [--gpu-batch B --gpu-seq T] [--only gpt2|smollm2|llama8b] [--no-peer]
 *                       [--tp N [--tp-parts K]]
 *
 * Tensor parallelism: `mpirun -np N build/bench_forward --tp N [--cpu-batch B --cpu-seq T]`
 * (N = 1 without mpirun: the same code, one process) times the GPT-2-small shape split over
 * N ranks on the CPU and prints, on rank 0, tokens/s, the bytes each rank all-reduces per
 * layer and the time spent inside the collectives (dist.h's counters), for the plain
 * schedule and then (TP > 1) the interleaved one (--tp-parts K equal micro-batches; default
 * 0, loupe's own choice: B/4, B/2, B/4 sequences when 4 divides the batch, else halves; when
 * the parts do not divide the batch only the plain schedule runs, and it says so). The
 * scaling estimate for 8 GPUs is scripts/tp-estimate.py. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "loupe/dist.h"
#include "loupe/hooks.h"
#include "loupe/model.h"
#include "loupe/ops.h"
#include "peer.h"

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
/* Llama 3 8B: 32 layers, 4096 wide, 32 query and 8 key/value heads, SwiGLU 14336, vocab 128256 */
static const lp_config LLAMA3_8B = {.arch = LP_ARCH_LLAMA, .n_layers = 32, .d_model = 4096, .n_heads = 32, .n_kv_heads = 8,
                                    .d_head = 128, .d_mlp = 14336, .n_ctx = 8192, .d_vocab = 128256, .rope_theta = 500000};
static const char *SMOLLM2 = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/* Matmul FLOPs of one forward per token (weights and unembedding) plus causal attention. */
static double flops_per_token(const lp_config *c, int T) {
    double D = c->d_model, F = c->d_mlp, qD = (double)c->n_heads * c->d_head, kvD = (double)c->n_kv_heads * c->d_head;
    double mlp = c->arch == LP_ARCH_LLAMA ? 3 * D * F : 2 * D * F; /* gate, up, down vs in, out */
    double per_layer = 2 * (2 * D * qD + 2 * D * kvD + mlp) + 2 * 2 * qD * (T + 1) / 2.0; /* QK^T and PV over ~T/2 keys */
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

/* Fused causal attention on the GPU (BF16), forward and backward: the tensor-core kernels
 * (attention_flash.cu) against the row kernels, which the dispatch takes for buffers that are
 * not 16-byte aligned (here: the same data 8 bytes on). FLOPs: QK^T and PV over the causal
 * half, 4 B H dh T (T+1)/2; the backward's five products count 2.5 times that. */
static double time_attn(lp_ctx *c, void *const *b, int fwd, int B, int T, int H, int Hkv, int dh, int reps) {
    double best = 1e30;
    for (int r = 0; r <= reps; r++) { /* the first run warms up */
        CHECK(lp_ctx_sync(c));
        double t0 = now();
        if (fwd) CHECK(lp_attention(c, b[0], b[1], b[2], b[3], B, T, H, Hkv, dh));
        else CHECK(lp_attention_backward(c, b[5], b[6], b[7], b[4], b[1], b[2], b[3], B, T, H, Hkv, dh));
        CHECK(lp_ctx_sync(c));
        double dt = now() - t0;
        if (r > 0 && dt < best) best = dt;
    }
    return best;
}

static void attention_gpu(const char *what, int B, int T, int H, int Hkv, int dh) {
    lp_ctx c;
    CHECK(lp_ctx_init(&c, LP_CUDA, LP_BF16));
    const size_t nq = (size_t)B * T * H * dh, nkv = (size_t)B * T * Hkv * dh;
    const size_t n[8] = {nq, nq, nkv, nkv, nq, nq, nkv, nkv}; /* z q k v dz dq dk dv */
    float *h = malloc(nq * sizeof(float));
    uint64_t s = 7;
    for (size_t i = 0; i < nq; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        h[i] = (float)((s >> 40) % 2001) / 1000.0f - 1.0f;
    }
    void *base[8], *al[8], *un[8];
    for (int i = 0; i < 8; i++) {
        CHECK(lp_ctx_alloc(&c, n[i] * 2 + 16, &base[i]));
        al[i] = base[i], un[i] = (char *)base[i] + 8;
        CHECK(lp_ctx_upload_f32(&c, al[i], h, n[i]));
        CHECK(lp_ctx_upload_f32(&c, un[i], h, n[i]));
    }
    const double fl = 4.0 * B * H * dh * (double)T * (T + 1) / 2;
    const double tf = time_attn(&c, al, 1, B, T, H, Hkv, dh, 5), tr = time_attn(&c, un, 1, B, T, H, Hkv, dh, 3);
    const double bf = time_attn(&c, al, 0, B, T, H, Hkv, dh, 5), br = time_attn(&c, un, 0, B, T, H, Hkv, dh, 2);
    printf("GPU attention, %s (B=%d T=%d H=%d Hkv=%d dh=%d, bf16):\n", what, B, T, H, Hkv, dh);
    printf("  forward:  tensor cores %8.3f ms %6.1f TFLOP/s | row kernels %8.3f ms %6.1f TFLOP/s | %.1fx\n", tf * 1e3,
           fl / tf / 1e12, tr * 1e3, fl / tr / 1e12, tr / tf);
    printf("  backward: tensor cores %8.3f ms %6.1f TFLOP/s | row kernels %8.3f ms %6.1f TFLOP/s | %.1fx\n", bf * 1e3,
           2.5 * fl / bf / 1e12, br * 1e3, 2.5 * fl / br / 1e12, br / bf);
    for (int i = 0; i < 8; i++) lp_ctx_release(&c, base[i]);
    free(h);
    lp_ctx_free(&c);
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

/* Every residual stream: the input of every block and the output of the last. */
static int capture_residuals(lp_model *m) {
    char last[64];
    int n;
    CHECK(lp_hook_capture(m, "blocks.*.hook_resid_pre", NULL, 0, &n));
    snprintf(last, sizeof last, "blocks.%d.hook_resid_post", lp_model_config(m)->n_layers - 1);
    CHECK(lp_hook_capture(m, last, NULL, 0, NULL));
    return n + 1;
}

/* Times model m at B x T, plain and with every residual stream captured. random: weights
 * are random, so the loss must sit near ln V. */
static double section(const char *title, const char *what, lp_model *m, int random, int B, int T, int reps) {
    const lp_config *cf = lp_model_config(m);
    lp_ctx *ctx = lp_model_ctx(m);
    lp_device dev = ctx->device;
    int32_t *tok = malloc((size_t)B * T * 4);
    tokens(tok, (size_t)B * T, cf->d_vocab);

    /* validate: the loss is finite (near ln V for random weights), and capturing every
     * residual stream leaves it unchanged */
    CHECK(lp_model_forward(m, tok, B, T, LP_WANT_LOSS));
    double plain = mean_loss(m, B, T);
    int n_streams = capture_residuals(m);
    CHECK(lp_model_forward(m, tok, B, T, LP_WANT_LOSS));
    double captured = mean_loss(m, B, T);
    if (!isfinite(plain) || (random && fabs(plain - log(cf->d_vocab)) > 1.0) || plain != captured) {
        fprintf(stderr, "bench_forward: validation failed: loss %.6f plain, %.6f with capture (ln V = %.3f)\n", plain, captured,
                log(cf->d_vocab));
        exit(1);
    }
    size_t dev_bytes_cap = lp_model_device_bytes(m);
    double t_cap = time_forward(m, tok, B, T, reps);
    lp_hooks_clear(m);
    double t_plain = time_forward(m, tok, B, T, reps);
    size_t dev_bytes = lp_model_device_bytes(m);

    double gemm = gemm_rate(ctx, dev == LP_CUDA ? 8192 : 1024, dev == LP_CUDA ? 20 : 3);
    double fl = flops_per_token(cf, T), tps = B * T / t_plain, tps_cap = B * T / t_cap;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("%s: %s, batch %d x %d, %s\n", title, what, B, T, ctx->dtype == LP_BF16 ? "bf16" : "f32");
    char ref[64] = "";
    if (random) snprintf(ref, sizeof ref, " (random weights: ln V = %.4f)", log(cf->d_vocab));
    printf("  validated: loss %.4f%s, identical with %d residual streams captured\n", plain, ref, n_streams);
    printf("  no capture:        %10.0f tokens/s  (%6.1f GFLOP/s, %4.1f%% of the %.0f GFLOP/s GEMM rate, %s)\n", tps, tps * fl / 1e9,
           100 * tps * fl / 1e9 / gemm, gemm, dev == LP_CUDA ? (ctx->dtype == LP_BF16 ? "cuBLAS bf16" : "cuBLAS f32") : "OpenBLAS sgemm");
    printf("  %2d streams to host:%10.0f tokens/s  (capture costs %.1f%%)\n", n_streams, tps_cap, 100 * (1 - tps_cap / tps));
    if (dev == LP_CUDA)
        printf("  device memory held: %.1f MiB without capture, %.1f MiB with\n", dev_bytes / 1048576.0, dev_bytes_cap / 1048576.0);
    else
        printf("  peak resident memory: %.1f MiB (weights and activations %.1f MiB)\n", ru.ru_maxrss / 1024.0, dev_bytes / 1048576.0);
    free(tok);
    return tps;
}

/* The PyTorch eager peer of a CPU section, and loupe's ratio to it. */
static void cpu_peer(const char *script, const char *model, double tps, int B, int T) {
    char args[512];
    snprintf(args, sizeof args, "%s%s --batch %d --seq %d", model ? "--model " : "", model ? model : "", B, T);
    double peer = peer_run(script, args, "tokens/s");
    if (peer > 0)
        printf("  loupe / PyTorch eager (%d threads each): %.2fx (target >= 1.0x)\n", peer_threads(), tps / peer);
}

static double random_section(const char *title, const char *what, const lp_config *cfg, lp_device dev, lp_dtype dt, int B, int T,
                             int reps) {
    lp_model *m;
    CHECK(lp_model_random(&m, cfg, 1, dev, dt));
    double tps = section(title, what, m, 1, B, T, reps);
    lp_model_free(m);
    return tps;
}

/* The GPU forward must agree with the CPU before it is timed. */
static void validate_gpu(const char *what, const char *path, const lp_config *cfg, lp_dtype dt, double budget) {
    const int B = 2, T = 64;
    lp_model *cpu, *gpu;
    if (path) {
        CHECK(lp_model_load(&cpu, path, LP_CPU, LP_F32));
        CHECK(lp_model_load(&gpu, path, LP_CUDA, dt));
    } else {
        CHECK(lp_model_random(&cpu, cfg, 1, LP_CPU, LP_F32));
        CHECK(lp_model_random(&gpu, cfg, 1, LP_CUDA, dt));
    }
    int V = lp_model_config(cpu)->d_vocab;
    int32_t tok[B * T];
    tokens(tok, B * T, V);
    CHECK(lp_model_forward(cpu, tok, B, T, LP_WANT_LOGITS));
    CHECK(lp_model_forward(gpu, tok, B, T, LP_WANT_LOGITS));
    const float *a = lp_model_logits(gpu), *r = lp_model_logits(cpu);
    double maxd = 0, maxr = 0;
    for (size_t i = 0; i < (size_t)B * T * V; i++) {
        if (!isfinite(a[i])) maxd = INFINITY;
        maxd = fmax(maxd, fabs(a[i] - r[i]));
        maxr = fmax(maxr, fabs(r[i]));
    }
    printf("  %s: GPU %s logits vs CPU f32: max error / max |logit| %.2e (budget %.0e)\n", what, dt == LP_BF16 ? "bf16" : "f32",
           maxd / maxr, budget);
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

/* --tp N: the GPT-2-small shape over N tensor-parallel ranks (each its slice's random
 * weights), timed on every rank, reported by rank 0. */
static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

/* Times reps forwards of m with its layers in `parts` micro-batches (1: the plain
 * schedule); the counters of those forwards into *k. */
static double time_tp(lp_model *m, lp_dist *d, const int32_t *tok, int B, int T, int reps, int parts, lp_dist_counts *k,
                      double *cpu) {
    CHECK(lp_model_set_tp_overlap(m, parts));
    CHECK(lp_model_forward(m, tok, B, T, LP_WANT_LOSS)); /* warm-up */
    CHECK(lp_dist_barrier(d, LP_DIST_WORLD));
    lp_dist_counts_reset(d);
    double t0 = now(), c0 = cpu_s();
    for (int r = 0; r < reps; r++) CHECK(lp_model_forward(m, tok, B, T, LP_WANT_LOSS));
    double secs = now() - t0;
    *cpu = cpu_s() - c0;
    lp_dist_counts_get(d, k);
    return secs;
}

static void tp_report(lp_model *m, int tp, int B, int T, int reps, double secs, double cpu, const lp_dist_counts *k, int setting) {
    int L = GPT2_SMALL.n_layers, parts = lp_model_tp_overlapped(m), seqs[LP_DIST_MAX_STARTED];
    double per_layer = (double)k->allreduce_bytes / reps / L;
    if (tp == 1) printf("  schedule: one process (no collectives)\n");
    else if (parts > 1) {
        printf("  schedule: interleaved, %d micro-batches of", parts);
        lp_model_tp_parts(B, setting, seqs);
        for (int j = 0; j < parts; j++) printf("%s %d", j ? "," : "", seqs[j]);
        printf(" sequences (each all-reduce started, waited for when its part's next block needs it)\n");
    }
    else printf("  schedule: plain (each all-reduce waited for at once)\n");
    printf("  %10.0f tokens/s (%d forwards, %.3f s each)\n", (double)B * T * reps / secs, reps, secs / reps);
    printf("  per forward: %.1f all-reduces (%.2f per layer), %.1f all-gathers, %.1f broadcasts\n", (double)k->allreduce / reps,
           (double)k->allreduce / reps / L, (double)k->allgather / reps, (double)k->broadcast / reps);
    printf("  bytes per layer: %.2f MiB all-reduced by each rank (ring: %.2f MiB sent and received per rank)\n", per_layer / 1048576,
           per_layer * 2 * (tp - 1) / tp / 1048576);
    /* inside the collectives' calls: a started all-reduce counts only its start and its wait,
     * i.e. the communication compute did not hide */
    printf("  time in collectives (exposed): %.2f ms per forward, %.1f%% of the forward\n", k->seconds / reps * 1e3,
           100 * k->seconds / secs);
    /* on a shared machine a rank may get much less than its core: its CPU time per
     * forward is the figure that halves with TP=2 whatever else runs */
    printf("  rank 0: %.3f CPU-seconds per forward (on the CPU %.0f%% of the timed wall time)\n", cpu / reps, 100 * cpu / secs);
}

/* --tp N: the plain schedule, then (TP > 1, the batch a multiple of parts) the interleaved
 * one, on the same model in the same run. */
static int tp_section(int tp, int B, int T, int reps, int parts) {
    lp_dist *d;
    CHECK(lp_dist_init(&d, tp, 1));
    lp_model *m;
    CHECK(lp_model_random_dist(&m, &GPT2_SMALL, 1, LP_CPU, LP_F32, d));
    int32_t *tok = malloc((size_t)B * T * 4);
    tokens(tok, (size_t)B * T, GPT2_SMALL.d_vocab);
    CHECK(lp_model_set_tp_overlap(m, 1));
    CHECK(lp_model_forward(m, tok, B, T, LP_WANT_LOSS)); /* the check below */
    double loss = mean_loss(m, B, T);
    if (!isfinite(loss) || fabs(loss - log(GPT2_SMALL.d_vocab)) > 1.0) {
        fprintf(stderr, "bench_forward: validation failed: loss %.6f at TP=%d (ln V = %.3f)\n", loss, tp, log(GPT2_SMALL.d_vocab));
        exit(1);
    }
    int rank0 = lp_dist_rank(d) == 0;
    const char *th = getenv("OPENBLAS_NUM_THREADS");
    if (rank0) {
        printf("CPU tensor-parallel: GPT-2 small shape, random weights, batch %d x %d, f32, TP=%d (BLAS threads per rank: %s)\n", B, T,
               tp, th ? th : "OpenBLAS default");
        printf("  validated: loss %.4f (random weights: ln V = %.4f)\n", loss, log(GPT2_SMALL.d_vocab));
    }
    lp_dist_counts k;
    double cpu, secs = time_tp(m, d, tok, B, T, reps, 1, &k, &cpu);
    if (rank0) tp_report(m, tp, B, T, reps, secs, cpu, &k, 1);
    int seqs[LP_DIST_MAX_STARTED], want = lp_model_tp_parts(B, parts, seqs);
    if (rank0 && tp > 1 && parts != 1 && want == 1)
        printf("  interleaved schedule not run: batch %d does not split into %d micro-batches (--cpu-batch, --tp-parts)\n", B,
               parts ? parts : 2);
    if (tp > 1 && want > 1) {
        double plain = loss;
        double secs2 = time_tp(m, d, tok, B, T, reps, parts, &k, &cpu);
        double diff = fabs(mean_loss(m, B, T) - plain);
        if (rank0 && (lp_model_tp_overlapped(m) != want || !(diff <= 1e-5 * plain))) {
            fprintf(stderr, "bench_forward: validation failed: %d micro-batches ran (asked: %d), the loss differs by %.3g\n",
                    lp_model_tp_overlapped(m), want, diff);
            exit(1);
        }
        if (rank0) {
            tp_report(m, tp, B, T, reps, secs2, cpu, &k, parts);
            printf("  interleaved / plain: %.2fx the tokens/s (loss differs by %.2g)\n", secs / secs2, diff);
        }
    }
    free(tok);
    lp_model_free(m);
    lp_dist_finalize(d);
    return 0;
}

static int file_exists(const char *p) {
    FILE *f = fopen(p, "rb");
    if (f) fclose(f);
    return f != NULL;
}

int main(int argc, char **argv) {
    int cb = 1, ct = 256, gb = 16, gt = 1024, lb = 8, lt = 1024;
    const char *only = NULL;
    int peer = 1, tp = 0, parts = 0;
    for (int i = 1; i < argc; i++) {
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--no-peer")) peer = 0;
        else if (val && !strcmp(argv[i], "--cpu-batch")) cb = atoi(val), i++;
        else if (val && !strcmp(argv[i], "--cpu-seq")) ct = atoi(val), i++;
        else if (val && !strcmp(argv[i], "--gpu-batch")) gb = atoi(val), i++;
        else if (val && !strcmp(argv[i], "--gpu-seq")) gt = atoi(val), i++;
        else if (val && !strcmp(argv[i], "--only")) only = val, i++;
        else if (val && !strcmp(argv[i], "--tp")) tp = atoi(val), i++;
        else if (val && !strcmp(argv[i], "--tp-parts")) parts = atoi(val), i++;
        else {
            fprintf(stderr, "usage: bench_forward [--cpu-batch B] [--cpu-seq T] [--gpu-batch B] [--gpu-seq T] [--only gpt2|smollm2|llama8b] "
                            "[--no-peer] [--tp N [--tp-parts K]]\n");
            return 2;
        }
    }
    if (parts < 0 || parts > LP_DIST_MAX_STARTED) {
        fprintf(stderr, "bench_forward: --tp-parts %d: from 0 (loupe's choice) or 1 (the plain schedule) to %d\n", parts,
                LP_DIST_MAX_STARTED);
        return 2;
    }
    if (tp > 0) return tp_section(tp, cb, ct, 5, parts);
#define WANT(x) (!only || !strcmp(only, x))
    int have_smol = file_exists(SMOLLM2);
    lp_model *m;
    if (WANT("gpt2") || WANT("smollm2")) peer_print_blas();
    if (WANT("gpt2")) {
        double tps = random_section("CPU", "GPT-2 small shape, random weights", &GPT2_SMALL, LP_CPU, LP_F32, cb, ct, 3);
        if (peer) cpu_peer("torch_forward.py", NULL, tps, cb, ct);
    }
    if (WANT("smollm2")) {
        if (have_smol) {
            CHECK(lp_model_load(&m, SMOLLM2, LP_CPU, LP_F32));
            double tps = section("CPU", "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to f32)", m, 0, cb, ct, 3);
            lp_model_free(m);
            if (peer) cpu_peer("torch_smollm2.py", SMOLLM2, tps, cb, ct);
        } else {
            printf("CPU SmolLM2-135M: skipped: %s is missing (make model)\n", SMOLLM2);
        }
    }
    char why[256];
    if (!lp_cuda_available(why, sizeof why)) {
        printf("GPU: skipped: %s\n", why);
        return 0;
    }
    if (WANT("gpt2")) {
        validate_gpu("GPT-2 small shape", NULL, &GPT2_SMALL, LP_F32, 1e-3);
        validate_gpu("GPT-2 small shape", NULL, &GPT2_SMALL, LP_BF16, 5e-2);
        copy_bandwidth();
        random_section("GPU", "GPT-2 small shape, random weights", &GPT2_SMALL, LP_CUDA, LP_BF16, gb, gt, 5);
        printf("  target (H100/H200): >= 1.5M tokens/s without capture, capture <= 15%%\n");
        attention_gpu("GPT-2 small shape", 16, 1024, 12, 12, 64);
    }
    if (WANT("smollm2") && have_smol) {
        validate_gpu("SmolLM2-135M", SMOLLM2, NULL, LP_F32, 1e-3);
        validate_gpu("SmolLM2-135M", SMOLLM2, NULL, LP_BF16, 5e-2);
        CHECK(lp_model_load(&m, SMOLLM2, LP_CUDA, LP_BF16));
        section("GPU", "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to bf16)", m, 0, gb, gt, 5);
        lp_model_free(m);
    }
    if (WANT("llama8b")) {
        lp_config small = LLAMA3_8B; /* the same code paths at a size the CPU can check */
        small.n_layers = 2, small.d_model = 512, small.n_heads = 8, small.n_kv_heads = 2, small.d_head = 64, small.d_mlp = 1024,
        small.d_vocab = 4096;
        validate_gpu("Llama-3 shape, small", NULL, &small, LP_BF16, 5e-2);
        random_section("GPU", "Llama-3-8B shape, random weights", &LLAMA3_8B, LP_CUDA, LP_BF16, lb, lt, 3);
        printf("  target (H100/H200): >= 60%% of the bf16 GEMM rate\n");
        attention_gpu("Llama-3-8B shape", 2, 2048, 32, 8, 128);
        attention_gpu("Gemma head dim", 4, 1024, 8, 4, 256);
    }
    return 0;
}
