/* async_check: run under mpirun -np P. The started all-reduce of dist.h: sums exact
 * (integers in floats) with work between the start and the wait and the waits in another
 * order than the starts; LP_DIST_MAX_STARTED in flight at once and the next one refused; a
 * group of one starts nothing; the counters count each once. On host memory, or with
 * --cuda on the CUDA device (NCCL when every rank has its own GPU, else staged through the
 * host), where the blocking device calls are checked too: the all-reduce (F32 and BF16),
 * all-gather and broadcast. With --timeout (P = 2): rank 1 never joins, and rank 0's wait
 * must fail with LP_ERR_PEER within dist.timeout_s (0.5 s here), naming rank 1 and the key,
 * after which a start is refused at once; rank 0 then ends the job (lp_dist_abort).
 * --timeout=blocking: the same for the blocking device all-reduce. On the device both come
 * after one that succeeded (so that the NCCL communicator exists). Prints one verdict line on rank 0; exit
 * status 0 when every rank agrees. Driven by tests/test_dist.c (host memory) and
 * tests/test_dist_cuda.c (--cuda).
 * Usage: async_check [--cuda] [--timeout[=blocking]] */
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

/* The buffer a collective takes: the host array itself on the CPU, a device copy of it
 * on CUDA (NULL if that failed). */
static float *dev_of(lp_ctx *c, float *h, size_t n) {
    if (c->device == LP_CPU) return h;
    void *p = NULL;
    if (lp_ctx_alloc(c, n * sizeof(float), &p) != LP_OK || lp_ctx_to_device(c, p, h, n * sizeof(float)) != LP_OK) {
        CHECK(0, "a device buffer of %zu values", n);
        lp_ctx_release(c, p);
        return NULL;
    }
    return p;
}
/* Its values back into h (and the device copy freed). */
static void dev_back(lp_ctx *c, float *h, float *p, size_t n) {
    if (c->device == LP_CPU || !p) return;
    CHECK(lp_ctx_to_host(c, h, p, n * sizeof(float)) == LP_OK, "copy back");
    lp_ctx_release(c, p);
}

static void sums(lp_dist *d, lp_ctx *c) {
    int P = lp_dist_tp_size(d);
    size_t n = 1 << 20, m = 1000;
    float *a = malloc(n * sizeof(float)), *b = malloc(m * sizeof(float)), *w = malloc(n * sizeof(float));
    fill(a, n, 3), fill(b, m, -5);
    float *da = dev_of(c, a, n), *db = dev_of(c, b, m);
    lp_dist_counts_reset(d);
    lp_dist_req *ra, *rb;
    CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, da, n, &ra) == LP_OK && ra, "start a");
    CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, db, m, &rb) == LP_OK && rb, "start b");
    for (size_t i = 0; i < n; i++) w[i] = (float)i * 0.5f; /* work while the sums travel */
    CHECK(lp_dist_wait(d, rb) == LP_OK, "wait b");
    CHECK(lp_dist_wait(d, ra) == LP_OK, "wait a");
    dev_back(c, a, da, n), dev_back(c, b, db, m);
    check_sum(a, n, 3, P, "1M values, waited second");
    check_sum(b, m, -5, P, "1000 values, waited first");
    lp_dist_counts k;
    lp_dist_counts_get(d, &k);
    CHECK(k.allreduce == 2 && k.allreduce_bytes == (n + m) * sizeof(float), "counted %llu all-reduces of %llu bytes, not 2 of %zu",
          (unsigned long long)k.allreduce, (unsigned long long)k.allreduce_bytes, (n + m) * sizeof(float));
    /* a group of one: nothing started, nothing counted, the buffer as it was */
    fill(b, m, 0); /* x[i] = i on every rank */
    db = dev_of(c, b, m);
    lp_dist_counts_reset(d);
    CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_DP, c, db, m, &rb) == LP_OK && !rb, "group of one started something");
    CHECK(lp_dist_wait(d, rb) == LP_OK, "wait for nothing");
    dev_back(c, b, db, m);
    check_sum(b, m, 0, 1, "group of one");
    lp_dist_counts_get(d, &k);
    CHECK(k.allreduce == 0, "group of one counted %llu all-reduces", (unsigned long long)k.allreduce);
    free(a), free(b), free(w);
}

/* LP_DIST_MAX_STARTED in flight, the next refused (LP_ERR_ARG), then all waited for. */
static void limit(lp_dist *d, lp_ctx *c) {
    enum { K = LP_DIST_MAX_STARTED, M = 64 };
    float x[K + 1][M], *dx[K + 1];
    lp_dist_req *r[K + 1];
    for (int j = 0; j <= K; j++) fill(x[j], M, j), dx[j] = dev_of(c, x[j], M);
    for (int j = 0; j < K; j++) CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, dx[j], M, &r[j]) == LP_OK, "start %d", j);
    lp_status st = lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, dx[K], M, &r[K]);
    CHECK(st == LP_ERR_ARG && !r[K] && strstr(lp_last_error(), "started"), "start %d of %d in flight: status %d", K + 1, K, st);
    for (int j = K - 1; j >= 0; j--) CHECK(lp_dist_wait(d, r[j]) == LP_OK, "wait %d", j);
    for (int j = 0; j < K; j++) dev_back(c, x[j], dx[j], M), check_sum(x[j], M, j, lp_dist_tp_size(d), "one of the most in flight");
    /* the slots are free again */
    CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, dx[K], M, &r[K]) == LP_OK && lp_dist_wait(d, r[K]) == LP_OK,
          "a start after the waits");
    dev_back(c, x[K], dx[K], M);
    check_sum(x[K], M, K, lp_dist_tp_size(d), "after the waits");
}

/* The blocking device calls (--cuda): all-reduce, all-gather and broadcast, exact. */
static void blocking(lp_dist *d, lp_ctx *c) {
    int P = lp_dist_tp_size(d), me = lp_dist_tp_rank(d);
    enum { M = 1000 };
    float x[M], *all = malloc((size_t)P * M * sizeof(float));
    fill(x, M, 7);
    float *dx = dev_of(c, x, M), *dall = NULL;
    CHECK(lp_dist_allreduce_sum_dev(d, LP_DIST_TP, c, dx, M) == LP_OK, "all-reduce");
    dev_back(c, x, dx, M);
    check_sum(x, M, 7, P, "blocking all-reduce");
    fill(x, M, 5), dx = dev_of(c, x, M);
    CHECK(lp_ctx_alloc(c, (size_t)P * M * sizeof(float), (void **)&dall) == LP_OK, "alloc");
    CHECK(lp_dist_allgather_dev(d, LP_DIST_TP, c, dx, dall, M) == LP_OK, "all-gather");
    CHECK(lp_ctx_to_host(c, all, dall, (size_t)P * M * sizeof(float)) == LP_OK, "copy back");
    size_t bad = 0;
    for (int r = 0; r < P; r++)
        for (int i = 0; i < M; i++) bad += all[(size_t)r * M + i] != (float)(r * 5 + i);
    CHECK(bad == 0, "all-gather: %zu of %d values wrong", bad, P * M);
    /* in place: this rank's part already where it belongs */
    CHECK(lp_ctx_to_device(c, dall + (size_t)me * M, x, M * sizeof(float)) == LP_OK, "copy");
    CHECK(lp_dist_allgather_dev(d, LP_DIST_TP, c, dall + (size_t)me * M, dall, M) == LP_OK, "all-gather in place");
    CHECK(lp_ctx_to_host(c, all, dall, (size_t)P * M * sizeof(float)) == LP_OK, "copy back");
    bad = 0;
    for (int r = 0; r < P; r++)
        for (int i = 0; i < M; i++) bad += all[(size_t)r * M + i] != (float)(r * 5 + i);
    CHECK(bad == 0, "all-gather in place: %zu of %d values wrong", bad, P * M);
    lp_ctx_release(c, dall);
    CHECK(lp_dist_broadcast_dev(d, LP_DIST_TP, c, dx, M, P - 1) == LP_OK, "broadcast");
    dev_back(c, x, dx, M);
    bad = 0;
    for (int i = 0; i < M; i++) bad += x[i] != (float)((P - 1) * 5 + i);
    CHECK(bad == 0, "broadcast from rank %d: %d of %d values wrong", P - 1, (int)bad, M);
    free(all);
}

/* BF16 on the device: summed in F32 and rounded once, exact for these small integers. */
static void bf16_sums(lp_dist *d) {
    lp_ctx c;
    if (lp_ctx_init(&c, LP_CUDA, LP_BF16) != LP_OK) {
        CHECK(0, "a BF16 context");
        return;
    }
    int P = lp_dist_tp_size(d);
    enum { M = 300 };
    float x[M];
    uint16_t raw[M];
    void *p = NULL;
    for (int i = 0; i < M; i++) x[i] = (float)(g_rank + i % 64) * (i % 3 ? 1.0f : -0.5f);
    CHECK(lp_ctx_alloc(&c, M * 2, &p) == LP_OK && lp_ctx_upload_f32(&c, p, x, M) == LP_OK, "upload");
    lp_dist_req *r;
    CHECK(lp_dist_allreduce_sum_dev(d, LP_DIST_TP, &c, p, M) == LP_OK, "BF16 all-reduce");
    CHECK(lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, &c, p, M, &r) == LP_OK && lp_dist_wait(d, r) == LP_OK,
          "BF16 started all-reduce");
    CHECK(lp_ctx_to_host(&c, raw, p, M * 2) == LP_OK, "copy back");
    size_t bad = 0;
    for (int i = 0; i < M; i++) {
        float want = (float)(P * (P * (P - 1) / 2 + P * (i % 64))) * (i % 3 ? 1.0f : -0.5f);
        bad += lp_bf16_to_f32(raw[i]) != want;
    }
    CHECK(bad == 0, "BF16 sums: %zu of %d wrong", bad, M);
    lp_ctx_release(&c, p);
    lp_ctx_free(&c);
}

/* Rank 1 never joins: rank 0 fails within the timeout, then refuses at once. The started
 * all-reduce fails at its wait, or on an emulated device already at its start (there an
 * NCCL call is queued only once it has run, and the start waits for the queueing); the
 * blocking one in the call. */
static void timeout(lp_dist *d, lp_ctx *c, int block) {
    float x[16], *dx;
    fill(x, 16, 1);
    dx = dev_of(c, x, 16);
    if (block || c->device == LP_CUDA) /* the device path's set-up (NCCL's communicator) done first */
        CHECK(lp_dist_allreduce_sum_dev(d, LP_DIST_TP, c, dx, 16) == LP_OK, "a first all-reduce");
    if (g_rank != 0) {
        sleep(20); /* silent: rank 0's lp_dist_abort ends this process */
        return;
    }
    CHECK(lp_dist_set_timeout(d, 0.5) == LP_OK, "timeout");
    lp_dist_req *r = NULL;
    double t0 = now_s();
    lp_status st;
    if (block) {
        st = lp_dist_allreduce_sum_dev(d, LP_DIST_TP, c, dx, 16);
    } else {
        st = lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, dx, 16, &r);
        CHECK(st == LP_OK || (c->device == LP_CUDA && st == LP_ERR_PEER), "start");
        if (st == LP_OK) t0 = now_s(), st = lp_dist_wait(d, r);
    }
    double dt = now_s() - t0;
    char msg[512];
    snprintf(msg, sizeof msg, "%s", lp_last_error());
    CHECK(st == LP_ERR_PEER && strstr(msg, "rank 1") && strstr(msg, "dist.timeout_s"), "wait: status %d", st);
    CHECK(dt >= 0.5 && dt < 3.0, "the wait took %.2f s with a 0.5 s timeout", dt);
    CHECK(lp_dist_failed(d), "the job is not marked failed");
    t0 = now_s();
    st = lp_dist_allreduce_sum_dev_start(d, LP_DIST_TP, c, dx, 16, &r);
    CHECK(st == LP_ERR_PEER && now_s() - t0 < 0.1, "a start after the failure: status %d", st);
    printf("async_check: timeout: %s (wait failed after %.2f s: %s)\n", g_fail ? "FAILED" : "ok", dt, msg);
    fflush(stdout);
    lp_dist_abort(d, g_fail ? 1 : 3);
}

int main(int argc, char **argv) {
    int cuda = 0, tmo = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--cuda") == 0) cuda = 1;
        else if (strcmp(argv[i], "--timeout") == 0) tmo = 1;
        else if (strcmp(argv[i], "--timeout=blocking") == 0) tmo = 2;
        else {
            fprintf(stderr, "usage: async_check [--cuda] [--timeout[=blocking]]\n");
            return 2;
        }
    }
    lp_dist *d;
    if (lp_dist_init(&d, 0, 1) != LP_OK) {
        fprintf(stderr, "async_check: %s\n", lp_last_error());
        return 2;
    }
    g_rank = lp_dist_rank(d);
    lp_ctx c;
    if (lp_ctx_init(&c, cuda ? LP_CUDA : LP_CPU, LP_F32) != LP_OK) {
        fprintf(stderr, "async_check: %s\n", lp_last_error());
        return 2;
    }
    if (tmo) {
        timeout(d, &c, tmo == 2);
        return 1; /* not reached on rank 0 */
    }
    sums(d, &c);
    limit(d, &c);
    if (cuda) blocking(d, &c), bf16_sums(d);
    int64_t bad = g_fail;
    lp_dist_allreduce_sum(d, LP_DIST_WORLD, &bad, 1, LP_I64);
    if (g_rank == 0)
        printf("async_check: TP=%d%s: %s (%lld failure(s) over all ranks)\n", lp_dist_tp_size(d),
               !cuda ? "" : lp_dist_uses_nccl(d, LP_DIST_TP) == 1 ? " on CUDA through NCCL" : " on CUDA through the host",
               bad ? "FAILED" : "all sums exact", (long long)bad);
    lp_ctx_free(&c);
    lp_dist_finalize(d);
    return bad ? 1 : 0;
}
