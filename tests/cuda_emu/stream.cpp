// stream.cpp: the emulator's streams and events, and the device's PCI bus id. Every call
// completes in program order (emu.cpp), so streams and events only carry their device, and
// a stream the NCCL calls still in progress on it (nccl.cpp): work queued behind one is a
// misuse reported here.
#include "cuda_runtime.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>

struct lp_emu_stream {
    int device;
    std::atomic<int> nccl_pending;
};
struct lp_emu_event { int device; };

static int current_device() {
    int d = 0;
    cudaGetDevice(&d);
    return d;
}
static cudaError_t error(cudaError_t e) {
    lp_emu::set_error(e);
    return e;
}

namespace lp_emu {
static std::atomic<int> g_null_nccl_pending; // the legacy default stream's

static std::atomic<int> &nccl_pending_of(cudaStream_t s) { return s ? s->nccl_pending : g_null_nccl_pending; }

void check_stream_use(cudaStream_t s, const char *what) {
    const int dev = current_device();
    if (s && s->device != dev) fail("%s: stream of device %d used while device %d is current", what, s->device, dev);
    if (nccl_pending_of(s).load() > 0)
        fail("%s: stream %p used while an NCCL call on it still reports ncclInProgress (poll "
             "ncclCommGetAsyncError until ncclSuccess first: on a GPU the collective may not be enqueued yet)",
             what, (void *)s);
}
void stream_nccl_pending(cudaStream_t s, int delta) { nccl_pending_of(s) += delta; }
} // namespace lp_emu

using lp_emu::check_stream_use;

cudaError_t cudaDeviceGetPCIBusId(char *bus, int len, int dev) {
    int count = 0;
    cudaGetDeviceCount(&count);
    if (!bus || len <= 0 || dev < 0 || dev >= count) return error(cudaErrorInvalidValue);
    long n = -1;
    const char *e = getenv("LOUPE_EMU_PCI_BUS");
    static const char *ranks[] = {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"};
    for (size_t i = 0; !e && i < sizeof ranks / sizeof *ranks; i++) e = getenv(ranks[i]);
    if (e && *e) n = strtol(e, nullptr, 10) + (getenv("LOUPE_EMU_PCI_BUS") ? 0 : 1);
    if (n < 0) n = 256 + getpid() % 0xfff00; // no launcher: the process id keeps processes apart
    snprintf(bus, (size_t)len, "%04lx:%02lx:%02x.0", (n >> 8) & 0xffff, n & 0xff, dev);
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) {
    (void)flags;
    *s = new lp_emu_stream{current_device(), {0}};
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) { delete s; return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t s) { check_stream_use(s, "cudaStreamSynchronize"); return cudaSuccess; }
cudaError_t cudaStreamQuery(cudaStream_t s) { check_stream_use(s, "cudaStreamQuery"); return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags) {
    (void)flags;
    check_stream_use(s, "cudaStreamWaitEvent");
    if (!e) return error(cudaErrorInvalidResourceHandle);
    return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t *e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags) {
    (void)flags;
    *e = new lp_emu_event{current_device()};
    return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    check_stream_use(s, "cudaEventRecord");
    if (!e) return error(cudaErrorInvalidResourceHandle);
    const int dev = current_device();
    if (e->device != dev) lp_emu::fail("cudaEventRecord: event of device %d while device %d is current", e->device, dev);
    return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) { return e ? cudaSuccess : cudaErrorInvalidResourceHandle; }
cudaError_t cudaEventSynchronize(cudaEvent_t e) { return e ? cudaSuccess : cudaErrorInvalidResourceHandle; }
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    (void)a;
    (void)b;
    *ms = 0.0f; // no timing: the emulator says nothing about performance
    return cudaSuccess;
}
