/* async_check: run under mpirun -np P. The started all-reduce of dist.h on host memory:
 * sums exact (integers in floats) with work between the start and the wait and the waits in
 * another order than the starts; LP_DIST_MAX_STARTED in flight at once and the next one
 * refused; a group of one starts nothing; the counters count each once. With --timeout
 * (P = 2): rank 1 never joins, and rank 0's wait must fail with LP_ERR_PEER within
 * dist.timeout_s (0.5 s here), naming rank 1 and the key, after which a start is refused at
 * once; rank 0 then ends the job (lp_dist_abort). Prints one verdict line on rank 0; exit
 * status 0 when every rank agrees. Driven by tests/test_dist.c.
 * Usage: async_check [--timeout] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "loupe/dist.h"

static int g_fail, g_rank;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (!(cond)) {                                                    \
            fprintf(stderr, "rank %d: ", g_rank);                         \
            fprintf(stderr, __VA_ARGS__);                                 \
            fprintf(stderr, " (%s)\n", lp_last_error());                  \
            g_fail++;                                                     \
        }                                                                 \
    } while (0)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* x[i] = rank * k + i: the sum over P ranks is k P (P - 1) / 2 + P i, exact in float32 */
static void fill(float *x, size_t n, int k) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(g_rank * k + (int)(i % 4096));
}
static void check_sum(const float *x, size_t n, int k, int P, const char *what) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (x[i] != (float)(k * P * (P - 1) / 2 + P * (int)(i % 4096))) bad++;
    CHECK(bad == 0, "%s: %zu of %zu sums wrong", what, bad, n);
}

static void sums(lp_dist *d, lp_ctx *c) {
    int P = lp_dist_tp_size(d);
    size_t n = 1 << 20, m = 1000;
    float *a = malloc(n * sizeof(float)), *b = malloc(m * sizeof(float)), *w = malloc(n * sizeof(float));
    fill(a, n, 3), fill(b, m, -5);
    lp_dist_counts_reset(d);
    lp_dist_req *ra, *rb;
    CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, a, n, &ra) == LP_OK && ra, "start a");
    CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, b, m, &rb) == LP_OK && rb, "start b");
    for (size_t i = 0; i < n; i++) w[i] = (float)i * 0.5f; /* work while the sums travel */
    CHECK(lp_dist_wait(d, rb) == LP_OK, "wait b");
    CHECK(lp_dist_wait(d, ra) == LP_OK, "wait a");
    check_sum(a, n, 3, P, "1M values, waited second");
    check_sum(b, m, -5, P, "1000 values, waited first");
    lp_dist_counts k;
    lp_dist_counts_get(d, &k);
    CHECK(k.allreduce == 2 && k.allreduce_bytes == (n + m) * sizeof(float), "counted %llu all-reduces of %llu bytes, not 2 of %zu",
          (unsigned long long)k.allreduce, (unsigned long long)k.allreduce_bytes, (n + m) * sizeof(float));
    /* a group of one: nothing started, nothing counted, the buffer as it was */
    fill(b, m, 0); /* x[i] = i on every rank */
    lp_dist_counts_reset(d);
    CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_DP, c, b, m, &rb) == LP_OK && !rb, "group of one started something");
    CHECK(lp_dist_wait(d, rb) == LP_OK, "wait for nothing");
    check_sum(b, m, 0, 1, "group of one");
    lp_dist_counts_get(d, &k);
    CHECK(k.allreduce == 0, "group of one counted %llu all-reduces", (unsigned long long)k.allreduce);
    free(a), free(b), free(w);
}

/* LP_DIST_MAX_STARTED in flight, the next refused (LP_ERR_ARG), then all waited for. */
static void limit(lp_dist *d, lp_ctx *c) {
    enum { K = LP_DIST_MAX_STARTED, M = 64 };
    float x[K + 1][M];
    lp_dist_req *r[K + 1];
    for (int j = 0; j <= K; j++) fill(x[j], M, j);
    for (int j = 0; j < K; j++) CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, x[j], M, &r[j]) == LP_OK, "start %d", j);
    lp_status st = lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, x[K], M, &r[K]);
    CHECK(st == LP_ERR_ARG && !r[K] && strstr(lp_last_error(), "started"), "start %d of %d in flight: status %d", K + 1, K, st);
    for (int j = K - 1; j >= 0; j--) CHECK(lp_dist_wait(d, r[j]) == LP_OK, "wait %d", j);
    for (int j = 0; j < K; j++) check_sum(x[j], M, j, lp_dist_tp_size(d), "one of the most in flight");
    /* the slots are free again */
    CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, x[K], M, &r[K]) == LP_OK && lp_dist_wait(d, r[K]) == LP_OK,
          "a start after the waits");
    check_sum(x[K], M, K, lp_dist_tp_size(d), "after the waits");
}

/* Rank 1 never joins: rank 0 fails within the timeout, then refuses at once. */
static void timeout(lp_dist *d, lp_ctx *c) {
    float x[16];
    fill(x, 16, 1);
    if (g_rank != 0) {
        sleep(20); /* silent: rank 0's lp_dist_abort ends this process */
        return;
    }
    CHECK(lp_dist_set_timeout(d, 0.5) == LP_OK, "timeout");
    lp_dist_req *r;
    CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, x, 16, &r) == LP_OK, "start");
    double t0 = now_s();
    lp_status st = lp_dist_wait(d, r);
    double dt = now_s() - t0;
    char msg[512];
    snprintf(msg, sizeof msg, "%s", lp_last_error());
    CHECK(st == LP_ERR_PEER && strstr(msg, "rank 1") && strstr(msg, "dist.timeout_s"), "wait: status %d", st);
    CHECK(dt >= 0.5 && dt < 3.0, "the wait took %.2f s with a 0.5 s timeout", dt);
    CHECK(lp_dist_failed(d), "the job is not marked failed");
    t0 = now_s();
    st = lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, x, 16, &r);
    CHECK(st == LP_ERR_PEER && now_s() - t0 < 0.1, "a start after the failure: status %d", st);
    printf("async_check: timeout: %s (wait failed after %.2f s: %s)\n", g_fail ? "FAILED" : "ok", dt, msg);
    fflush(stdout);
    lp_dist_abort(d, g_fail ? 1 : 3);
}

int main(int argc, char **argv) {
    lp_dist *d;
    if (lp_dist_init(&d, 0, 1) != LP_OK) {
        fprintf(stderr, "async_check: %s\n", lp_last_error());
        return 2;
    }
    g_rank = lp_dist_rank(d);
    lp_ctx c;
    if (lp_ctx_init(&c, LP_CPU, LP_F32) != LP_OK) return 2;
    if (argc > 1 && strcmp(argv[1], "--timeout") == 0) {
        timeout(d, &c);
        return 1; /* not reached on rank 0 */
    }
    sums(d, &c);
    limit(d, &c);
    int64_t bad = g_fail;
    lp_dist_allreduce_sum(d, LP_DIST_WORLD, &bad, 1, LP_I64);
    if (g_rank == 0)
        printf("async_check: TP=%d: %s (%lld failure(s) over all ranks)\n", lp_dist_tp_size(d), bad ? "FAILED" : "all sums exact",
               (long long)bad);
    lp_ctx_free(&c);
    lp_dist_finalize(d);
    return bad ? 1 : 0;
}
