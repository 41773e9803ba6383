// nccl.cpp: the emulated NCCL of nccl.h over MPI. See nccl.h for the contract it keeps.
//
// A communicator comes about in two steps, both nonblocking and polled: every rank sends
// (its rank, its world rank, the id's tag) to the id's creator in MPI_COMM_WORLD, which
// answers each with the world rank of every communicator rank; then they create the MPI
// communicator of exactly those ranks (MPI_Comm_create_group, collective over them alone:
// only the group's ranks call the init, as with NCCL). A collective is the MPI nonblocking
// collective on that communicator, polled: by the call itself on a blocking communicator,
// by ncclCommGetAsyncError on a nonblocking one, and either way abandoned once
// ncclCommAbort was called (an atomic flag: the aborting thread calls no MPI).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include "nccl.h"

#include <mpi.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <random>
#include <thread>
#include <vector>

namespace {

const char kMagic[8] = "lpemuNC";
struct id_body {
    char magic[8];
    int root;       // the creator's rank in MPI_COMM_WORLD
    int pad;
    uint64_t nonce; // tells communicators apart (and picks their tag)
};
static_assert(sizeof(id_body) <= NCCL_UNIQUE_ID_BYTES, "id too large");

enum class op { none, init, coll, finalize };

} // namespace

struct ncclComm {
    int nranks = 0, rank = 0, device = 0, blocking = 1;
    std::atomic<int> state{ncclSuccess};
    std::atomic<int> aborted{0};
    std::atomic<int> marked{0}; // `stream` is marked busy (lp_emu::stream_nccl_pending)
    std::atomic<std::thread::id> owner; // the thread that started the operation in progress
    MPI_Comm comm = MPI_COMM_NULL;
    op pending = op::none;
    const char *what = "";
    // the init
    int root = 0, me = 0, tag = 0, stage = 0;
    uint64_t nonce = 0;
    int msg[4] = {0, 0, 0, 0};
    std::vector<int> inbox, members;
    std::vector<MPI_Request> rqs;
    // the collective in progress
    MPI_Request rq = MPI_REQUEST_NULL;
    cudaStream_t stream = nullptr;
    std::vector<float> wide; // BF16 summed in float
    uint16_t *narrow = nullptr;
    size_t n = 0;
    char err[256] = "";
};

namespace {

void note(ncclComm *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void note(ncclComm *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
}

// Misuse of the API (what real NCCL leaves undefined or would crash on): reported, as the
// emulator reports a kernel's misuse.
[[noreturn]] void misuse(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void misuse(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loupe CUDA emulator (NCCL): ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; // NaN stays NaN
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

void unmark(ncclComm *c) {
    if (c->marked.exchange(0)) lp_emu::stream_nccl_pending(c->stream, -1);
}

// The operation in progress ends with r (unless an abort already set the state).
void end_op(ncclComm *c, ncclResult_t r) {
    unmark(c);
    c->pending = op::none;
    int want = ncclInProgress;
    c->state.compare_exchange_strong(want, r);
}

ncclResult_t mpi_failed(ncclComm *c, int rc, const char *what) {
    char s[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, s, &len);
    note(c, "%s: MPI: %s", what, s);
    end_op(c, ncclSystemError);
    return ncclSystemError;
}

void make_comm(ncclComm *c) {
    MPI_Group world, g;
    MPI_Comm_group(MPI_COMM_WORLD, &world);
    MPI_Group_incl(world, c->nranks, c->members.data(), &g);
    int rc = MPI_Comm_create_group(MPI_COMM_WORLD, g, c->tag, &c->comm);
    MPI_Group_free(&g);
    MPI_Group_free(&world);
    if (rc != MPI_SUCCESS) {
        mpi_failed(c, rc, "init (MPI_Comm_create_group)");
        return;
    }
    MPI_Comm_set_errhandler(c->comm, MPI_ERRORS_RETURN);
    end_op(c, ncclSuccess);
}

// The creator has every rank's message: the communicator's world ranks, checked.
bool gather_members(ncclComm *c) {
    c->members.assign(c->nranks, -1);
    c->members[c->rank] = c->me;
    for (int i = 0; i + 1 < c->nranks; i++) {
        const int *m = &c->inbox[4 * i];
        uint64_t nonce = (uint64_t)(uint32_t)m[2] | (uint64_t)(uint32_t)m[3] << 32;
        if (nonce != c->nonce || m[0] < 0 || m[0] >= c->nranks || c->members[m[0]] != -1) {
            note(c, "init: world rank %d joined as rank %d of %d, or with another id", m[1], m[0], c->nranks);
            return false;
        }
        c->members[m[0]] = m[1];
    }
    return true;
}

void init_step(ncclComm *c) {
    int done = 0;
    int rc = c->rqs.empty() ? MPI_SUCCESS : MPI_Testall((int)c->rqs.size(), c->rqs.data(), &done, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS) {
        mpi_failed(c, rc, "init");
        return;
    }
    if (!c->rqs.empty() && !done) return;
    c->rqs.clear();
    if (c->me == c->root && c->stage == 0 && c->nranks > 1) { // answer every rank
        if (!gather_members(c)) {
            end_op(c, ncclInvalidUsage);
            return;
        }
        c->stage = 1;
        for (int r = 0; r < c->nranks; r++) {
            if (r == c->rank) continue;
            c->rqs.emplace_back();
            MPI_Isend(c->members.data(), c->nranks, MPI_INT, c->members[r], c->tag, MPI_COMM_WORLD, &c->rqs.back());
        }
        return;
    }
    if (c->me != c->root && c->members[c->rank] != c->me) {
        note(c, "init: the id's creator (world rank %d) placed world rank %d at rank %d", c->root, c->members[c->rank], c->rank);
        end_op(c, ncclInvalidUsage);
        return;
    }
    make_comm(c);
}

void coll_step(ncclComm *c) {
    int done = 0, rc = MPI_Test(&c->rq, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) {
        mpi_failed(c, rc, c->what);
        return;
    }
    if (!done) return;
    for (size_t i = 0; c->narrow && i < c->n; i++) c->narrow[i] = f32_to_bf16(c->wide[i]);
    c->narrow = nullptr;
    end_op(c, ncclSuccess);
}

// Advances the operation in progress (only on the thread that started it: MPI is called
// from one thread).
void progress(ncclComm *c) {
    if (std::this_thread::get_id() != c->owner.load()) return; // (another thread reads the state only)
    if (c->state.load() != ncclInProgress || c->pending == op::none) return;
    if (c->aborted.load()) {
        note(c, "%s: the communicator was aborted", c->what);
        end_op(c, ncclRemoteError);
        return;
    }
    if (c->pending == op::init) init_step(c);
    else if (c->pending == op::coll) coll_step(c);
    else end_op(c, ncclSuccess); // finalize: every collective has completed already
}

// A blocking communicator's call waits here until done, failed or aborted.
ncclResult_t settle(ncclComm *c) {
    progress(c);
    if (!c->blocking) return (ncclResult_t)c->state.load();
    long nap = 1000;
    while (c->state.load() == ncclInProgress) {
        struct timespec ts = {0, nap};
        nanosleep(&ts, nullptr);
        if (nap < 200000) nap *= 2;
        progress(c);
    }
    return (ncclResult_t)c->state.load();
}

// Every call but the state query and the abort: the communicator must be usable and idle.
ncclResult_t enter(ncclComm *c, const char *what) {
    if (!c) misuse("%s: NULL communicator", what);
    if (c->aborted.load()) misuse("%s: communicator %p used after ncclCommAbort", what, (void *)c);
    int s = c->state.load();
    if (s == ncclInProgress)
        misuse("%s: communicator %p still reports ncclInProgress for its %s (poll ncclCommGetAsyncError until it "
               "is done first)", what, (void *)c, c->what);
    if (s != ncclSuccess) return (ncclResult_t)s;
    c->owner = std::this_thread::get_id();
    c->what = what;
    return ncclSuccess;
}

// Starts collective `what` (MPI request in c->rq) on `stream`.
ncclResult_t started(ncclComm *c, int rc, cudaStream_t stream) {
    c->state.store(ncclInProgress);
    c->pending = op::coll;
    if (rc != MPI_SUCCESS) return mpi_failed(c, rc, c->what);
    c->stream = stream;
    lp_emu::stream_nccl_pending(stream, +1);
    c->marked.store(1);
    return settle(c);
}

MPI_Datatype mpi_type(ncclDataType_t t, size_t *size) {
    switch (t) {
    case ncclInt8: return *size = 1, MPI_INT8_T;
    case ncclUint8: return *size = 1, MPI_UINT8_T;
    case ncclInt32: return *size = 4, MPI_INT32_T;
    case ncclUint32: return *size = 4, MPI_UINT32_T;
    case ncclInt64: return *size = 8, MPI_INT64_T;
    case ncclUint64: return *size = 8, MPI_UINT64_T;
    case ncclFloat32: return *size = 4, MPI_FLOAT;
    case ncclFloat64: return *size = 8, MPI_DOUBLE;
    case ncclBfloat16: return *size = 2, MPI_FLOAT; // widened
    default: return *size = 0, MPI_DATATYPE_NULL;
    }
}

} // namespace

extern "C" {

ncclResult_t ncclGetVersion(int *version) {
    *version = NCCL_VERSION_CODE;
    return ncclSuccess;
}

const char *ncclGetErrorString(ncclResult_t r) {
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
    }
}

const char *ncclGetLastError(ncclComm_t c) { return c ? c->err : ""; }

ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    int inited = 0, fin = 0;
    MPI_Initialized(&inited);
    if (inited) MPI_Finalized(&fin);
    if (!inited || fin) misuse("ncclGetUniqueId: MPI is not initialized (the emulated NCCL runs over MPI)");
    id_body b;
    memset(&b, 0, sizeof b);
    memcpy(b.magic, kMagic, sizeof kMagic);
    MPI_Comm_rank(MPI_COMM_WORLD, &b.root);
    std::random_device rd;
    b.nonce = ((uint64_t)rd() << 32 | rd()) ^ (uint64_t)getpid() ^ (uint64_t)time(nullptr) << 20;
    memset(id, 0, sizeof *id);
    memcpy(id->internal, &b, sizeof b);
    return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t *out, int nranks, ncclUniqueId commId, int rank, ncclConfig_t *config) {
    id_body b;
    memcpy(&b, commId.internal, sizeof b);
    if (!out || memcmp(b.magic, kMagic, sizeof kMagic) != 0 || nranks < 1 || rank < 0 || rank >= nranks)
        misuse("ncclCommInitRankConfig: rank %d of %d, or an id ncclGetUniqueId did not make", rank, nranks);
    if (config && config->magic != 0xcafebeef) misuse("ncclCommInitRankConfig: config not set from NCCL_CONFIG_INITIALIZER");
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) misuse("ncclCommInitRankConfig: MPI is not initialized");
    ncclComm *c = new ncclComm;
    c->nranks = nranks, c->rank = rank;
    c->blocking = !config || config->blocking == NCCL_CONFIG_UNDEF_INT || config->blocking != 0;
    cudaGetDevice(&c->device);
    c->root = b.root, c->nonce = b.nonce;
    MPI_Comm_rank(MPI_COMM_WORLD, &c->me);
    int *ub = nullptr, flag = 0;
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &ub, &flag);
    int top = flag && ub && *ub > 1 ? (*ub < (1 << 30) ? *ub : (1 << 30)) : 32767;
    c->tag = 1 + (int)(b.nonce % (uint64_t)(top - 1));
    c->owner = std::this_thread::get_id();
    c->what = "init";
    c->pending = op::init;
    c->state.store(ncclInProgress);
    *out = c;
    if (nranks == 1) {
        c->members.assign(1, c->me);
    } else if (c->me == b.root) {
        c->inbox.assign(4 * (size_t)(nranks - 1), 0);
        c->rqs.resize((size_t)nranks - 1);
        for (int i = 0; i + 1 < nranks; i++)
            MPI_Irecv(&c->inbox[4 * (size_t)i], 4, MPI_INT, MPI_ANY_SOURCE, c->tag, MPI_COMM_WORLD, &c->rqs[i]);
    } else {
        c->msg[0] = rank, c->msg[1] = c->me, c->msg[2] = (int)(uint32_t)b.nonce, c->msg[3] = (int)(uint32_t)(b.nonce >> 32);
        c->members.assign(nranks, -1);
        c->rqs.resize(2);
        MPI_Isend(c->msg, 4, MPI_INT, b.root, c->tag, MPI_COMM_WORLD, &c->rqs[0]);
        MPI_Irecv(c->members.data(), nranks, MPI_INT, b.root, c->tag, MPI_COMM_WORLD, &c->rqs[1]);
    }
    return settle(c);
}

ncclResult_t ncclCommInitRank(ncclComm_t *out, int nranks, ncclUniqueId commId, int rank) {
    return ncclCommInitRankConfig(out, nranks, commId, rank, nullptr);
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t *e) {
    if (!c || !e) return ncclInvalidArgument;
    progress(c);
    *e = (ncclResult_t)c->state.load();
    return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t c, int *count) {
    *count = c->nranks;
    return ncclSuccess;
}
ncclResult_t ncclCommUserRank(const ncclComm_t c, int *rank) {
    *rank = c->rank;
    return ncclSuccess;
}

// From any thread: a wait in progress ends with ncclRemoteError. The communicator's memory
// is kept (another thread may still be inside a call on it); any later call but the state
// query is a misuse, as on NCCL, which frees it.
ncclResult_t ncclCommAbort(ncclComm_t c) {
    if (!c) return ncclSuccess;
    if (c->aborted.exchange(1)) misuse("ncclCommAbort: communicator %p aborted twice", (void *)c);
    unmark(c);
    c->state.store(ncclRemoteError);
    return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t c) {
    ncclResult_t r = enter(c, "finalize");
    if (r != ncclSuccess) return r;
    if (c->blocking) return ncclSuccess;
    c->pending = op::finalize;
    c->state.store(ncclInProgress);
    return ncclInProgress; // as NCCL: done at the next ncclCommGetAsyncError
}

ncclResult_t ncclCommDestroy(ncclComm_t c) {
    if (!c) return ncclSuccess;
    if (c->aborted.load()) misuse("ncclCommDestroy: communicator %p was aborted (ncclCommAbort frees it)", (void *)c);
    if (c->state.load() == ncclInProgress) misuse("ncclCommDestroy: communicator %p still reports ncclInProgress", (void *)c);
    int fin = 0;
    MPI_Finalized(&fin);
    if (c->comm != MPI_COMM_NULL && !fin) MPI_Comm_free(&c->comm);
    delete c;
    return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, ncclDataType_t type, ncclRedOp_t redop, ncclComm_t c,
                           cudaStream_t stream) {
    ncclResult_t r = enter(c, "all-reduce");
    if (r != ncclSuccess) return r;
    size_t es;
    MPI_Datatype t = mpi_type(type, &es);
    MPI_Op mop = redop == ncclSum ? MPI_SUM : redop == ncclProd ? MPI_PROD : redop == ncclMax ? MPI_MAX : redop == ncclMin ? MPI_MIN : MPI_OP_NULL;
    if (t == MPI_DATATYPE_NULL || mop == MPI_OP_NULL) misuse("ncclAllReduce: data type %d or operation %d not emulated", type, redop);
    if (count > INT_MAX) misuse("ncclAllReduce: %zu values (the emulator's MPI counts are int)", count);
    lp_emu::check_stream_use(stream, "ncclAllReduce");
    lp_emu::check_device_range(send, count * es, "ncclAllReduce send buffer");
    lp_emu::check_device_range(recv, count * es, "ncclAllReduce receive buffer");
    void *buf = recv;
    if (type == ncclBfloat16) {
        c->wide.resize(count);
        for (size_t i = 0; i < count; i++) c->wide[i] = bf16_to_f32(((const uint16_t *)send)[i]);
        buf = c->wide.data(), c->narrow = (uint16_t *)recv, c->n = count;
    } else if (send != recv) {
        memmove(recv, send, count * es);
    }
    return started(c, MPI_Iallreduce(MPI_IN_PLACE, buf, (int)count, t, mop, c->comm, &c->rq), stream);
}

ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, ncclDataType_t type, ncclComm_t c, cudaStream_t stream) {
    ncclResult_t r = enter(c, "all-gather");
    if (r != ncclSuccess) return r;
    size_t es;
    if (mpi_type(type, &es) == MPI_DATATYPE_NULL) misuse("ncclAllGather: data type %d not emulated", type);
    size_t bytes = count * es;
    if (bytes * c->nranks > INT_MAX) misuse("ncclAllGather: %zu bytes per rank (the emulator's MPI counts are int)", bytes);
    lp_emu::check_stream_use(stream, "ncclAllGather");
    lp_emu::check_device_range(send, bytes, "ncclAllGather send buffer");
    lp_emu::check_device_range(recv, bytes * c->nranks, "ncclAllGather receive buffer");
    const void *s = send == (const char *)recv + bytes * c->rank ? MPI_IN_PLACE : send;
    return started(c, MPI_Iallgather(s, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, c->comm, &c->rq), stream);
}

ncclResult_t ncclBroadcast(const void *send, void *recv, size_t count, ncclDataType_t type, int root, ncclComm_t c,
                           cudaStream_t stream) {
    ncclResult_t r = enter(c, "broadcast");
    if (r != ncclSuccess) return r;
    size_t es;
    if (mpi_type(type, &es) == MPI_DATATYPE_NULL) misuse("ncclBroadcast: data type %d not emulated", type);
    size_t bytes = count * es;
    if (bytes > INT_MAX || root < 0 || root >= c->nranks) misuse("ncclBroadcast: %zu bytes from rank %d of %d", bytes, root, c->nranks);
    lp_emu::check_stream_use(stream, "ncclBroadcast");
    if (c->rank == root) lp_emu::check_device_range(send, bytes, "ncclBroadcast send buffer");
    lp_emu::check_device_range(recv, bytes, "ncclBroadcast receive buffer");
    if (c->rank == root && send != recv) memmove(recv, send, bytes);
    return started(c, MPI_Ibcast(recv, (int)bytes, MPI_BYTE, root, c->comm, &c->rq), stream);
}

} // extern "C"
