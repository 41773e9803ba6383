/* bench_attrib.c: attribution patching over the whole node grid (prompt pairs per second,
 * and its cost in forward-pass equivalents measured against a plain forward in the same
 * run), and exact patching (nodes per second), on a GPT-2-small-shaped model with random
 * weights and on SmolLM2-135M when `make model` has fetched it.
 *
 * Before timing, the metric the attribution run reports must equal a plain forward's (the
 * gradients themselves are checked against torch and finite differences in the tests).
 * Target: attribution patching <= 3.5 forward-pass equivalents per pair. The pairs differ from
 * position T/2 on (one token changed, as in the TransformerLens peer): the figure is the one
 * with their common prefix shared (lp_attrib_opts.prefix_share, the CLI's default), and the
 * figure without it is printed beside it. On the CPU the
 * TransformerLens loop of bench/peers/tl_attrib.py runs right after loupe on the same shape with
 * the same thread count, and the ratio is printed (target >= 2x; --no-peer: not run).
 *   build/bench_attrib [--seq T] [--pairs B] [--no-peer]
 *
 * Tensor parallelism: `mpirun -np N build/bench_attrib --tp N [--seq T] [--pairs B]` (N = 1
 * without mpirun) runs the CPU GPT-2-small section on the model split over N ranks (each its
 * slice's random weights) and adds, from rank 0, the collectives of one attribution-patching
 * call: all-reduces and all-gathers, the bytes each rank contributed per layer and the time
 * spent inside them (dist.h's counters). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "loupe/attrib.h"
#include "loupe/dist.h"
#include "loupe/hooks.h"
#include "loupe/model.h"
#include "peer.h"

#define CHECK(x)                                                                                 \
    do {                                                                                         \
        lp_status s_ = (x);                                                                      \
        if (s_ != LP_OK) {                                                                       \
            fprintf(stderr, "bench_attrib: %s (%s)\n", lp_last_error(), lp_last_error_where());  \
            exit(1);                                                                             \
        }                                                                                        \
    } while (0)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void fill(int32_t *t, size_t n, int V, uint64_t s) {
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        t[i] = (int32_t)((s >> 33) % V);
    }
}

/* Seconds per call of attribution patching over reps calls. */
static double time_atp(lp_model *m, const int32_t *clean, const int32_t *corr, int B, int T, const lp_metric *mt,
                       const lp_attrib_opts *o, lp_pair_result *res, int reps) {
    double t0 = now();
    for (int r = 0; r < reps; r++) {
        CHECK(lp_attrib_atp(m, clean, corr, B, T, mt, o, res));
        for (int b = 0; b < B; b++) lp_pair_result_free(&res[b]);
    }
    return (now() - t0) / reps;
}

static double section(const char *what, lp_model *m, int B, int T) {
    const lp_config *c = lp_model_config(m);
    int32_t *clean = malloc((size_t)B * T * 4), *corr = malloc((size_t)B * T * 4), ans[64], wr[64];
    fill(clean, (size_t)B * T, c->d_vocab, 1);
    memcpy(corr, clean, (size_t)B * T * 4);
    for (int b = 0; b < B; b++) corr[(size_t)b * T + T / 2] = (clean[(size_t)b * T + T / 2] + 1) % c->d_vocab; /* one token changed */
    fill(ans, B, c->d_vocab, 2);
    fill(wr, B, c->d_vocab, 3);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wr};
    lp_attrib_opts o = {.patch_batch = 32};
    lp_pair_result *res = calloc(B, sizeof *res);
    /* validate: the metrics agree with a plain forward */
    double met[64];
    lp_hooks_clear(m);
    CHECK(lp_model_metric(m, corr, B, T, &mt, met));
    lp_attrib_opts os = o;
    os.prefix_share = 1;
    CHECK(lp_attrib_atp(m, clean, corr, B, T, &mt, &os, res));
    for (int b = 0; b < B; b++)
        if (!(fabs(res[b].metric_corrupted - met[b]) <= 1e-3 * (1 + fabs(met[b])))) {
            fprintf(stderr, "bench_attrib: validation failed: metric %.6f vs %.6f\n", res[b].metric_corrupted, met[b]);
            exit(1);
        }
    for (int b = 0; b < B; b++) lp_pair_result_free(&res[b]);
    /* a plain forward of the B pairs' one side */
    lp_hooks_clear(m);
    CHECK(lp_model_forward(m, corr, B, T, 0));
    int reps = 3;
    double t0 = now();
    for (int r = 0; r < reps; r++) CHECK(lp_model_metric(m, corr, B, T, &mt, met));
    double fwd = (now() - t0) / reps;
    /* with the pairs' common prefix shared (the default: the pairs differ from T/2 on, so the
     * gradient's run and its backward cover half the positions where the model allows it),
     * and with both runs whole */
    lp_attrib_opts shared = o;
    shared.prefix_share = 1;
    double atp = time_atp(m, clean, corr, B, T, &mt, &shared, res, reps);
    double atp_full = time_atp(m, clean, corr, B, T, &mt, &o, res, reps);
    /* exact patching: one pair, the residual stream grid */
    lp_attrib_opts ox = {.kinds = 1u << LP_NODE_RESID_PRE, .patch_batch = 32};
    lp_pair_result ex;
    t0 = now();
    CHECK(lp_attrib_exact(m, clean, corr, T, &mt, &ox, &ex));
    double exs = now() - t0;
    size_t nodes = (size_t)ex.s[LP_NODE_RESID_PRE].shape[0] * ex.s[LP_NODE_RESID_PRE].shape[1];
    lp_pair_result_free(&ex);
    printf("%s: %d pairs x %d tokens\n", what, B, T);
    printf("  attribution patching, whole grid: %8.2f pairs/s = %.2f forward-pass equivalents per pair (target <= 3.5)\n", B / atp,
           atp / fwd);
    printf("    the same, prefix not shared (attrib.prefix_share=false): %8.2f pairs/s = %.2f forward-pass equivalents per pair\n",
           B / atp_full, atp_full / fwd);
    printf("  exact patching, hook_resid_pre grid: %8.1f nodes/s (%zu nodes of one pair)\n", nodes / exs, nodes);
    free(clean), free(corr), free(res);
    return B / atp;
}

/* --tp N: the CPU section over N tensor-parallel ranks; rank 0 prints. */
static int tp_bench(int tp, int B, int T, const lp_config *g) {
    lp_dist *d;
    CHECK(lp_dist_init(&d, tp, 1));
    if (lp_dist_rank(d) != 0 && !freopen("/dev/null", "w", stdout)) return 1;
    lp_model *m;
    CHECK(lp_model_random_dist(&m, g, 1, LP_CPU, LP_F32, d));
    char what[96];
    snprintf(what, sizeof what, "CPU GPT-2 small shape, TP=%d", tp);
    section(what, m, B, T);
    /* the collectives of one attribution-patching call over the whole grid */
    int32_t *clean = malloc((size_t)B * T * 4), *corr = malloc((size_t)B * T * 4), ans[64], wr[64];
    fill(clean, (size_t)B * T, g->d_vocab, 1);
    fill(corr, (size_t)B * T, g->d_vocab, 4);
    fill(ans, B, g->d_vocab, 2);
    fill(wr, B, g->d_vocab, 3);
    lp_metric mt = {.kind = LP_METRIC_LOGIT_DIFF, .answer = ans, .wrong = wr};
    lp_attrib_opts o = {.patch_batch = 32};
    lp_pair_result *res = calloc(B, sizeof *res);
    lp_hooks_clear(m);
    CHECK(lp_dist_barrier(d, LP_DIST_WORLD));
    lp_dist_counts_reset(d);
    double t0 = now();
    CHECK(lp_attrib_atp(m, clean, corr, B, T, &mt, &o, res));
    double secs = now() - t0;
    lp_dist_counts k;
    lp_dist_counts_get(d, &k);
    int L = g->n_layers;
    printf("  one attribution-patching call (%d pairs): %.0f all-reduces, %.0f all-gathers; per layer %.2f MiB all-reduced and "
           "%.2f MiB gathered by each rank\n", B, (double)k.allreduce, (double)k.allgather, k.allreduce_bytes / 1048576.0 / L,
           k.allgather_bytes / 1048576.0 / L);
    printf("  time in collectives: %.1f ms of %.1f ms (%.1f%%)\n", k.seconds * 1e3, secs * 1e3, 100 * k.seconds / secs);
    for (int b = 0; b < B; b++) lp_pair_result_free(&res[b]);
    free(res), free(clean), free(corr);
    lp_model_free(m);
    lp_dist_finalize(d);
    return 0;
}

int main(int argc, char **argv) {
    int T = 64, B = 4, cpu = 1, peer = 1, tp = 0;
    for (int i = 1; i < argc; i++) {
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--gpu-only")) cpu = 0; /* the offline GPU check's time budget */
        else if (!strcmp(argv[i], "--no-peer")) peer = 0;
        else if (val && !strcmp(argv[i], "--seq")) T = atoi(val), i++;
        else if (val && !strcmp(argv[i], "--pairs")) B = atoi(val), i++;
        else if (val && !strcmp(argv[i], "--tp")) tp = atoi(val), i++;
        else {
            fprintf(stderr, "usage: bench_attrib [--gpu-only] [--seq T] [--pairs B] [--no-peer] [--tp N]\n");
            return 2;
        }
    }
    if (B > 64) B = 64;
    lp_config g = {.arch = LP_ARCH_GPT2, .n_layers = 12, .d_model = 768, .n_heads = 12, .d_mlp = 3072, .n_ctx = 1024, .d_vocab = 50257};
    if (tp > 0) return tp_bench(tp, B, T, &g);
    char why[256];
    int gpu = lp_cuda_available(why, sizeof why);
    lp_model *m;
    if (cpu) {
        CHECK(lp_model_random(&m, &g, 1, LP_CPU, LP_F32));
        double pps = section("CPU GPT-2 small shape", m, B, T);
        lp_model_free(m);
        char args[128];
        snprintf(args, sizeof args, "--device cpu --pairs %d --seq %d", B, T);
        double tl = peer ? peer_run("tl_attrib.py", args, "pairs/s") : 0;
        if (tl > 0) printf("  loupe / TransformerLens (%d threads each): %.2fx (target >= 2x)\n", peer_threads(), pps / tl);
    }
    FILE *f = cpu ? fopen("models/SmolLM2-135M-Instruct.Q4_1.gguf", "rb") : NULL;
    if (f) {
        fclose(f);
        CHECK(lp_model_load(&m, "models/SmolLM2-135M-Instruct.Q4_1.gguf", LP_CPU, LP_F32));
        section("CPU SmolLM2-135M", m, B, T);
        lp_model_free(m);
    }
    if (!gpu) {
        printf("GPU: skipped: %s\n", why);
        return 0;
    }
    int seqs[2] = {64, 512};
    for (int s = 0; s < 2; s++) {
        CHECK(lp_model_random(&m, &g, 1, LP_CUDA, LP_F32));
        char what[64];
        snprintf(what, sizeof what, "GPU GPT-2 small shape (f32)");
        section(what, m, 8, seqs[s]);
        lp_model_free(m);
    }
    printf("  (TransformerLens attribution-patching loop on the same GPU: bench/peers/, by hand)\n");
    return 0;
}
