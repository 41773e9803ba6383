// nccl_check: the emulated NCCL's own checks (nccl.h), under mpirun -np 2 (driven by
// tests/test_dist_cuda.c as build/emu/dist_nccl_emu):
//   - on a blocking and on a nonblocking communicator of both ranks: F32 and BF16 sums,
//     all-gather (apart and in place) and broadcast, exact; on the nonblocking one a
//     collective whose peer comes late returns ncclInProgress, and ncclCommGetAsyncError
//     says so until it is done; finalize and destroy;
//   - a communicator of one rank, initialized by that rank alone;
//   - a collective whose peer never comes ends with ncclRemoteError once another thread
//     calls ncclCommAbort.
// Rank 0 prints the verdict line "nccl_emu: ..." and then ends the job (rank 1 is left
// waiting on purpose), so the exit status is not 0.
#define OMPI_SKIP_MPICXX 1
#include "nccl.h"

#include <mpi.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include <thread>
#include <vector>

static int g_rank, g_fail;

#define CHECK(cond, ...)                                     \
    do {                                                     \
        if (!(cond)) {                                       \
            fprintf(stderr, "rank %d: ", g_rank);            \
            fprintf(stderr, __VA_ARGS__);                    \
            fputc('\n', stderr);                             \
            g_fail++;                                        \
        }                                                    \
    } while (0)

static double now_s() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Polls the communicator until its operation is done.
static ncclResult_t settle(ncclComm_t c, ncclResult_t r) {
    while (r == ncclInProgress) {
        if (ncclCommGetAsyncError(c, &r) != ncclSuccess) return ncclInternalError;
        usleep(100);
    }
    return r;
}

static ncclComm_t make(int nranks, int rank, int root_here, int blocking, ncclUniqueId *shared) {
    ncclUniqueId id;
    if (root_here) ncclGetUniqueId(&id);
    if (shared) {
        if (root_here) *shared = id;
        MPI_Bcast(shared, sizeof *shared, MPI_BYTE, 0, MPI_COMM_WORLD);
        id = *shared;
    }
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = blocking;
    ncclComm_t c = nullptr;
    ncclResult_t r = ncclCommInitRankConfig(&c, nranks, id, rank, &cfg);
    if (c) r = settle(c, r);
    CHECK(r == ncclSuccess, "init (blocking %d): %s", blocking, ncclGetErrorString(r));
    return c;
}

static uint16_t bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16); // the values here are exact in BF16
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void collectives(ncclComm_t c, int blocking, cudaStream_t s) {
    const int n = 1000, P = 2;
    std::vector<float> h(n), all(P * n);
    std::vector<uint16_t> hb(n);
    float *x, *g;
    uint16_t *xb;
    cudaMalloc((void **)&x, n * 4), cudaMalloc((void **)&g, P * n * 4), cudaMalloc((void **)&xb, n * 2);
    for (int i = 0; i < n; i++) h[i] = (float)(g_rank * 3 + i), hb[i] = bf16((float)(g_rank + i % 100));
    cudaMemcpy(x, h.data(), n * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(xb, hb.data(), n * 2, cudaMemcpyHostToDevice);
    if (!blocking && g_rank == 1) usleep(200000); // rank 0's call cannot be done at once
    ncclResult_t r = ncclAllReduce(x, x, n, ncclFloat32, ncclSum, c, s);
    if (!blocking && g_rank == 0) {
        CHECK(r == ncclInProgress, "nonblocking all-reduce with its peer late: %s, not in progress", ncclGetErrorString(r));
        ncclResult_t e;
        ncclCommGetAsyncError(c, &e);
        CHECK(e == ncclInProgress, "state while the peer is late: %s", ncclGetErrorString(e));
    }
    CHECK(settle(c, r) == ncclSuccess, "all-reduce (blocking %d)", blocking);
    cudaMemcpy(h.data(), x, n * 4, cudaMemcpyDeviceToHost);
    int bad = 0;
    for (int i = 0; i < n; i++) bad += h[i] != (float)(3 + 2 * i);
    CHECK(bad == 0, "F32 sums (blocking %d): %d wrong", blocking, bad);
    CHECK(settle(c, ncclAllReduce(xb, xb, n, ncclBfloat16, ncclSum, c, s)) == ncclSuccess, "BF16 all-reduce");
    cudaMemcpy(hb.data(), xb, n * 2, cudaMemcpyDeviceToHost);
    bad = 0;
    for (int i = 0; i < n; i++) bad += from_bf16(hb[i]) != (float)(1 + 2 * (i % 100));
    CHECK(bad == 0, "BF16 sums (blocking %d): %d wrong", blocking, bad);
    for (int in_place = 0; in_place < 2; in_place++) {
        for (int i = 0; i < n; i++) h[i] = (float)(g_rank * 10000 + i);
        float *src = in_place ? g + g_rank * n : x;
        cudaMemcpy(src, h.data(), n * 4, cudaMemcpyHostToDevice);
        CHECK(settle(c, ncclAllGather(src, g, n, ncclFloat32, c, s)) == ncclSuccess, "all-gather");
        cudaMemcpy(all.data(), g, P * n * 4, cudaMemcpyDeviceToHost);
        bad = 0;
        for (int i = 0; i < P * n; i++) bad += all[i] != (float)(i / n * 10000 + i % n);
        CHECK(bad == 0, "all-gather (blocking %d, in place %d): %d wrong", blocking, in_place, bad);
    }
    CHECK(settle(c, ncclBroadcast(x, x, n * 4, ncclUint8, 1, c, s)) == ncclSuccess, "broadcast");
    cudaMemcpy(h.data(), x, n * 4, cudaMemcpyDeviceToHost);
    bad = 0;
    for (int i = 0; i < n; i++) bad += h[i] != (float)(10000 + i);
    CHECK(bad == 0, "broadcast from rank 1 (blocking %d): %d wrong", blocking, bad);
    cudaFree(x), cudaFree(g), cudaFree(xb);
}

int main(int argc, char **argv) {
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    cudaStream_t s;
    cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    ncclUniqueId id;
    for (int blocking = 1; blocking >= 0; blocking--) {
        ncclComm_t c = make(2, g_rank, g_rank == 0, blocking, &id);
        if (!c) continue;
        collectives(c, blocking, s);
        CHECK(settle(c, ncclCommFinalize(c)) == ncclSuccess, "finalize");
        ncclCommDestroy(c);
    }
    // each rank alone: only it initializes its communicator
    ncclComm_t one = make(1, 0, 1, 0, nullptr);
    if (one) {
        float h[4] = {1, 2, 3, 4}, *x;
        cudaMalloc((void **)&x, sizeof h);
        cudaMemcpy(x, h, sizeof h, cudaMemcpyHostToDevice);
        CHECK(settle(one, ncclAllReduce(x, x, 4, ncclFloat32, ncclSum, one, s)) == ncclSuccess, "all-reduce of one rank");
        cudaMemcpy(h, x, sizeof h, cudaMemcpyDeviceToHost);
        CHECK(h[0] == 1 && h[3] == 4, "a sum over one rank changed the values");
        cudaFree(x);
        ncclCommDestroy(one);
    }
    int bad = g_fail;
    MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    // rank 1 never joins this one; a second thread of rank 0 aborts the communicator
    ncclComm_t c = make(2, g_rank, g_rank == 0, 1, &id);
    if (g_rank == 1) {
        sleep(20); // rank 0 ends the job
        return 1;
    }
    float *x;
    cudaMalloc((void **)&x, 64);
    std::thread watchdog([c] {
        usleep(300000);
        ncclCommAbort(c);
    });
    double t0 = now_s();
    ncclResult_t r = ncclAllReduce(x, x, 16, ncclFloat32, ncclSum, c, s), e = ncclSuccess;
    double dt = now_s() - t0;
    watchdog.join();
    ncclCommGetAsyncError(c, &e);
    CHECK(r == ncclRemoteError && e == ncclRemoteError, "abort from another thread: the call gave %s, the state %s",
          ncclGetErrorString(r), ncclGetErrorString(e));
    CHECK(dt >= 0.29 && dt < 2.0, "the aborted call returned after %.2f s (abort at 0.3 s)", dt);
    cudaStreamSynchronize(s); // the stream is usable again
    printf("nccl_emu: %s (%d failure(s) over all ranks; the aborted call returned after %.2f s)\n",
           bad + g_fail ? "FAILED" : "all ok", bad + g_fail, dt);
    fflush(stdout);
    MPI_Abort(MPI_COMM_WORLD, 3);
    return 1;
}
