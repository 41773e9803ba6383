/* dist.c: the one place that speaks MPI and NCCL (dist.h). Built with LOUPE_MPI when the
 * build found mpicc, and with LOUPE_NCCL when it also found NCCL for a CUDA build; without
 * them every collective over more than one rank is refused, and a world of one needs none. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>

#include "dist/dist_internal.h"

/* The size the launcher announced (0: no launcher variable is set): mpirun's, PMI's, or srun's
 * for this job step (not SLURM_NTASKS, which an allocation sets before any srun). */
static int launched_size(const char **var) {
    static const char *vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"};
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) {
        const char *s = getenv(vars[i]);
        if (s && *s) return *var = vars[i], atoi(s);
    }
    return 0;
}

int lp_dist_have_mpi(void) { return LOUPE_MPI; }
int lp_dist_local_rank(const lp_dist *d) { return d ? d->local_rank : 0; }

int lp_dist_rank(const lp_dist *d) { return d ? d->rank : 0; }
int lp_dist_size(const lp_dist *d) { return d ? d->size : 1; }
int lp_dist_tp_size(const lp_dist *d) { return d ? d->tp : 1; }
int lp_dist_dp_size(const lp_dist *d) { return d ? d->dp : 1; }
int lp_dist_tp_rank(const lp_dist *d) { return d ? d->rank % d->tp : 0; }
int lp_dist_dp_rank(const lp_dist *d) { return d ? d->rank / d->tp : 0; }
int lp_dist_group_rank(const lp_dist *d, lp_dist_group g) {
    return g == LP_DIST_TP ? lp_dist_tp_rank(d) : g == LP_DIST_DP ? lp_dist_dp_rank(d) : lp_dist_rank(d);
}
int lp_dist_group_size(const lp_dist *d, lp_dist_group g) {
    return g == LP_DIST_TP ? lp_dist_tp_size(d) : g == LP_DIST_DP ? lp_dist_dp_size(d) : lp_dist_size(d);
}

void lp_dist_counts_get(const lp_dist *d, lp_dist_counts *out) {
    if (d) *out = d->counts;
    else memset(out, 0, sizeof *out);
}
void lp_dist_counts_reset(lp_dist *d) {
    if (d) memset(&d->counts, 0, sizeof d->counts);
}

double dist_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

lp_status lp_dist_set_timeout(lp_dist *d, double seconds) {
    if (!(seconds > 0) || !isfinite(seconds))
        LP_FAIL(LP_ERR_ARG, "dist.timeout_s = %g: must be a finite number of seconds above 0", seconds);
    if (d) d->timeout_s = seconds;
    return LP_OK;
}
double lp_dist_timeout(const lp_dist *d) { return d ? d->timeout_s : LP_DIST_DEFAULT_TIMEOUT_S; }
int lp_dist_failed(const lp_dist *d) { return d ? d->failed : 0; }

int lp_dist_uses_nccl(const lp_dist *d, lp_dist_group g) {
    if (!d || g < LP_DIST_WORLD || g > LP_DIST_DP || dist_gsize(d, g) <= 1) return 0;
#if LOUPE_NCCL
    return d->nccl_ok[g] == 1 ? 1 : d->nccl_ok[g] == 0 ? -1 : 0;
#else
    return 0;
#endif
}

void lp_dist_abort(lp_dist *d, int code) {
#if LOUPE_MPI
    int inited = 0, fin = 0;
    MPI_Initialized(&inited);
    if (inited) MPI_Finalized(&fin);
    if (d && d->size > 1 && inited && !fin) MPI_Abort(MPI_COMM_WORLD, code ? code : 1);
#else
    (void)d, (void)code;
#endif
}

/* Splits the world into tp and dp; the refusal names the keys a user sets. */
static lp_status choose_sizes(int world, int *tp, int *dp) {
    if (*tp <= 0 && *dp <= 0) *dp = world, *tp = 1;
    else if (*tp <= 0) *tp = world % *dp ? 0 : world / *dp;
    else if (*dp <= 0) *dp = world % *tp ? 0 : world / *tp;
    if (*tp <= 0 || *dp <= 0 || (long)*tp * *dp != world)
        LP_FAIL(LP_ERR_ARG, "dist.tp=%d x dist.dp=%d: their product must equal the number of processes (%d)", *tp, *dp,
                world);
    return LP_OK;
}

lp_status lp_dist_init(lp_dist **out, int tp, int dp) {
    *out = NULL;
    lp_dist *d = calloc(1, sizeof *d);
    if (!d) LP_FAIL(LP_ERR_OOM, "dist: out of host memory");
    d->timeout_s = LP_DIST_DEFAULT_TIMEOUT_S;
    const char *var = "";
    int launched = launched_size(&var);
#if LOUPE_MPI
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited && launched <= 0 && (tp > 1 || dp > 1)) {
        free(d);
        LP_FAIL(LP_ERR_ARG, "dist.tp=%d, dist.dp=%d ask for %d processes, but no launcher started them (mpirun -np N or "
                "srun -n N)", tp, dp, (tp > 1 ? tp : 1) * (dp > 1 ? dp : 1));
    }
    if (!inited && launched > 0) {
        int provided;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
            free(d);
            LP_FAIL(LP_ERR_INTERNAL, "dist: MPI_Init_thread failed");
        }
        d->own_mpi = inited = 1;
    }
    for (int g = 0; g < 3; g++) d->comm[g] = MPI_COMM_NULL;
    if (inited) {
        MPI_Comm_rank(MPI_COMM_WORLD, &d->rank);
        MPI_Comm_size(MPI_COMM_WORLD, &d->size);
        if (d->size > 1) { /* the ranks on this machine, each its own GPU where it has enough */
            MPI_Comm node;
            if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, d->rank, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
                MPI_Comm_rank(node, &d->local_rank);
                MPI_Comm_free(&node);
            }
            lp_ctx_set_local_rank(d->local_rank);
        }
        /* a launcher whose process manager this MPI does not speak (srun --mpi=none, or
         * pmi2 to an MPI built for PMIx only) can leave each process a world of one: all of
         * them would then run the whole job as rank 0, each writing the same outputs */
        if (d->own_mpi && launched > 1 && d->size != launched) {
            int size = d->size;
            lp_dist_finalize(d);
            LP_FAIL(LP_ERR_ARG, "dist: the launcher started %d processes (%s), but MPI sees a world of %d: the launcher and this "
                    "MPI did not connect (under srun, pass --mpi=pmix, or the plugin the site's MPI is built for)", launched, var,
                    size);
        }
    } else {
        d->rank = 0, d->size = 1;
    }
#else
    (void)var;
    if (launched > 1 || tp > 1 || dp > 1) {
        free(d);
        LP_FAIL(LP_ERR_ARG, "dist: %d processes asked for (dist.tp=%d, dist.dp=%d, launcher %d), but this loupe was built "
                "without MPI (install mpicc and rebuild)", launched > 1 ? launched : tp * dp, tp, dp, launched);
    }
    d->rank = 0, d->size = 1;
#endif
    d->tp = tp, d->dp = dp;
    lp_status st = choose_sizes(d->size, &d->tp, &d->dp);
    if (st) {
        lp_dist_finalize(d);
        return st;
    }
#if LOUPE_MPI
    if (d->size > 1) {
        MPI_Comm_dup(MPI_COMM_WORLD, &d->comm[LP_DIST_WORLD]);
        /* ranks of one TP group are contiguous: r = dp_rank * tp + tp_rank */
        MPI_Comm_split(MPI_COMM_WORLD, lp_dist_dp_rank(d), lp_dist_tp_rank(d), &d->comm[LP_DIST_TP]);
        MPI_Comm_split(MPI_COMM_WORLD, lp_dist_tp_rank(d), lp_dist_dp_rank(d), &d->comm[LP_DIST_DP]);
        /* a lost peer comes back as an error to report (and end the job on), not an abort
         * inside MPI that names nothing loupe was doing */
        for (int g = 0; g < 3; g++)
            if (d->comm[g] != MPI_COMM_NULL) MPI_Comm_set_errhandler(d->comm[g], MPI_ERRORS_RETURN);
    }
#endif
    *out = d;
    return LP_OK;
}

void lp_dist_finalize(lp_dist *d) {
    if (!d) return;
#if LOUPE_NCCL
    for (int i = 0; i < LP_DIST_MAX_STARTED; i++) { /* the started collectives' events */
        if (d->req[i].ready) cudaEventDestroy(d->req[i].ready);
        if (d->req[i].done) cudaEventDestroy(d->req[i].done);
    }
    for (int g = 0; g < 3; g++) {
        if (d->nccl_ok[g] != 1) continue;
        /* a nonblocking communicator finalizes in the background; one that cannot within
         * the timeout (a peer gone) is aborted by nccl_wait */
        if (d->failed) {
            ncclCommAbort(d->nccl[g]);
            continue;
        }
        ncclCommFinalize(d->nccl[g]);
        if (dist_nccl_wait(d, g, NULL, NULL, "finalize") == LP_OK) ncclCommDestroy(d->nccl[g]);
    }
#endif
#if LOUPE_MPI
    /* after a lost peer, MPI's shutdown would wait for it: the process ends without it and
     * the launcher ends the job */
    for (int g = 0; !d->failed && g < 3; g++)
        if (d->comm[g] != MPI_COMM_NULL) MPI_Comm_free(&d->comm[g]);
    if (d->own_mpi && !d->failed) {
        int fin = 0;
        MPI_Finalized(&fin);
        if (!fin) MPI_Finalize();
    }
#endif
#if LOUPE_NCCL
    if (d->side) cudaStreamDestroy(d->side); /* after the communicators that ran on it */
#endif
    for (int i = 0; i < LP_DIST_MAX_STARTED; i++) free(d->req[i].stage);
    free(d->stage);
    free(d);
}

int dist_gsize(const lp_dist *d, lp_dist_group g) { return lp_dist_group_size(d, g); }

#if LOUPE_MPI
MPI_Datatype dist_mpi_type(lp_dtype dt) {
    switch (dt) {
    case LP_F32: return MPI_FLOAT;
    case LP_F64: return MPI_DOUBLE;
    case LP_I32: return MPI_INT32_T;
    case LP_I64: return MPI_INT64_T;
    case LP_U64: return MPI_UINT64_T;
    default: return MPI_DATATYPE_NULL;
    }
}

/* The world rank of group g's rank j (r = dp_rank * tp + tp_rank). */
static int world_of(const lp_dist *d, lp_dist_group g, int j) {
    return g == LP_DIST_TP ? lp_dist_dp_rank(d) * d->tp + j : g == LP_DIST_DP ? j * d->tp + lp_dist_tp_rank(d) : j;
}

void dist_others(const lp_dist *d, lp_dist_group g, char *buf, size_t n) {
    int p = dist_gsize(d, g), me = lp_dist_group_rank(d, g), k = 0;
    size_t o = (size_t)snprintf(buf, n, p == 2 ? "rank" : "ranks");
    for (int j = 0; j < p && o < n; j++) {
        if (j == me) continue;
        if (k == 8) {
            snprintf(buf + o, n - o, " and %d more", p - 1 - k);
            break;
        }
        o += (size_t)snprintf(buf + o, n - o, "%s %d", k++ ? "," : "", world_of(d, g, j));
    }
}

/* Once a collective has failed the groups are out of step (a request may still be pending
 * on a dead peer): nothing more is sent, the job must end. */
lp_status dist_usable(const lp_dist *d, const char *what) {
    if (d->failed) LP_FAIL(LP_ERR_PEER, "dist: %s refused: an earlier collective lost a rank of the job", what);
    return LP_OK;
}

/* Waits for a nonblocking collective until it completes, MPI reports a peer gone, or the
 * job's timeout passes: a crashed, killed or stopped rank never leaves this one waiting.
 * It spins for the first millisecond (a tensor-parallel all-reduce completes in
 * microseconds), then naps a little longer each time (a rank that waits for one doing
 * slow work alone, or sharing its core, should not take the CPU from it). */
lp_status dist_wait_mpi(lp_dist *d, lp_dist_group g, MPI_Request *rq, const char *what) {
    double t0 = dist_now();
    long nap_ns = 20000;
    char who[160];
    for (;;) {
        int done = 0, rc = MPI_Test(rq, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            char err[MPI_MAX_ERROR_STRING] = "";
            int len = 0;
            MPI_Error_string(rc, err, &len);
            d->failed = 1, dist_others(d, g, who, sizeof who);
            LP_FAIL(LP_ERR_PEER, "%s failed: lost contact with %s (MPI: %s)", what, who, err);
        }
        if (done) return LP_OK;
        double t = dist_now() - t0;
        if (t > d->timeout_s) {
            d->failed = 1, dist_others(d, g, who, sizeof who);
            LP_FAIL(LP_ERR_PEER, "no answer from %s within %g s in %s (dist.timeout_s)", who, d->timeout_s, what);
        }
        if (t < 1e-3) continue;
        struct timespec ts = {0, nap_ns};
        nanosleep(&ts, NULL);
        if (nap_ns < 500000) nap_ns *= 2;
    }
}
#define MPI_START(call, what)                                                                         \
    do {                                                                                              \
        if ((call) != MPI_SUCCESS) {                                                                  \
            d->failed = 1;                                                                            \
            LP_FAIL(LP_ERR_PEER, "dist: %s could not start (MPI): a rank of the job is gone", (what)); \
        }                                                                                             \
    } while (0)
#endif

static __attribute__((unused)) lp_status no_mpi(const char *what) {
    LP_FAIL(LP_ERR_ARG, "dist: %s over more than one process needs MPI (this build has none)", what);
}

static lp_status allreduce_op(lp_dist *d, lp_dist_group g, void *buf, size_t n, lp_dtype dt, int max) {
    if (dist_gsize(d, g) <= 1 || n == 0) return LP_OK;
#if LOUPE_MPI
    LP_CHECK(dist_usable(d, "all-reduce"));
    MPI_Datatype t = dist_mpi_type(dt);
    if (t == MPI_DATATYPE_NULL) LP_FAIL(LP_ERR_ARG, "dist: all-reduce of %s is not supported", lp_dtype_name(dt));
    double t0 = dist_now();
    for (size_t o = 0; o < n;) { /* MPI counts are int */
        int c = n - o > (size_t)1 << 30 ? 1 << 30 : (int)(n - o);
        MPI_Request rq;
        MPI_START(MPI_Iallreduce(MPI_IN_PLACE, (char *)buf + o * lp_dtype_size(dt), c, t, max ? MPI_MAX : MPI_SUM,
                                 d->comm[g], &rq), "all-reduce");
        LP_CHECK(dist_wait_mpi(d, g, &rq, "all-reduce"));
        o += c;
    }
    d->counts.allreduce++;
    d->counts.allreduce_bytes += n * lp_dtype_size(dt);
    d->counts.seconds += dist_now() - t0;
    return LP_OK;
#else
    return no_mpi("all-reduce");
#endif
}

lp_status lp_dist_allreduce_sum(lp_dist *d, lp_dist_group g, void *buf, size_t n, lp_dtype dt) {
    return allreduce_op(d, g, buf, n, dt, 0);
}
lp_status lp_dist_allreduce_max(lp_dist *d, lp_dist_group g, void *buf, size_t n, lp_dtype dt) {
    return allreduce_op(d, g, buf, n, dt, 1);
}

lp_status lp_dist_allgather(lp_dist *d, lp_dist_group g, const void *send, void *recv, size_t bytes) {
    int p = dist_gsize(d, g);
    if (p <= 1) {
        if (send != recv && bytes) memmove(recv, send, bytes);
        return LP_OK;
    }
#if LOUPE_MPI
    LP_CHECK(dist_usable(d, "all-gather"));
    if (bytes > (size_t)1 << 30) LP_FAIL(LP_ERR_ARG, "dist: all-gather of %zu bytes per rank is too large", bytes);
    double t0 = dist_now();
    int r = lp_dist_group_rank(d, g);
    const void *s = send == (char *)recv + (size_t)r * bytes ? MPI_IN_PLACE : send;
    MPI_Request rq;
    MPI_START(MPI_Iallgather(s, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, d->comm[g], &rq), "all-gather");
    LP_CHECK(dist_wait_mpi(d, g, &rq, "all-gather"));
    d->counts.allgather++;
    d->counts.allgather_bytes += bytes;
    d->counts.seconds += dist_now() - t0;
    return LP_OK;
#else
    return no_mpi("all-gather");
#endif
}

lp_status lp_dist_broadcast(lp_dist *d, lp_dist_group g, void *buf, size_t bytes, int root) {
    if (dist_gsize(d, g) <= 1 || bytes == 0) return LP_OK;
#if LOUPE_MPI
    LP_CHECK(dist_usable(d, "broadcast"));
    double t0 = dist_now();
    for (size_t o = 0; o < bytes;) {
        int c = bytes - o > (size_t)1 << 30 ? 1 << 30 : (int)(bytes - o);
        MPI_Request rq;
        MPI_START(MPI_Ibcast((char *)buf + o, c, MPI_BYTE, root, d->comm[g], &rq), "broadcast");
        LP_CHECK(dist_wait_mpi(d, g, &rq, "broadcast"));
        o += c;
    }
    d->counts.broadcast++;
    d->counts.broadcast_bytes += bytes;
    d->counts.seconds += dist_now() - t0;
    return LP_OK;
#else
    return no_mpi("broadcast");
#endif
}

lp_status lp_dist_barrier(lp_dist *d, lp_dist_group g) {
    if (dist_gsize(d, g) <= 1) return LP_OK;
#if LOUPE_MPI
    LP_CHECK(dist_usable(d, "barrier"));
    double t0 = dist_now();
    MPI_Request rq;
    MPI_START(MPI_Ibarrier(d->comm[g], &rq), "barrier");
    LP_CHECK(dist_wait_mpi(d, g, &rq, "barrier"));
    d->counts.barrier++;
    d->counts.seconds += dist_now() - t0;
    return LP_OK;
#else
    return no_mpi("barrier");
#endif
}

#if LOUPE_MPI
/* Point-to-point pieces of at most 1 GiB (MPI counts are int) between a rank and root, each
 * under the job's timeout like the collectives. */
static lp_status p2p_pieces(lp_dist *d, lp_dist_group g, char *buf, size_t bytes, int peer, int send) {
    for (size_t o = 0; o < bytes;) {
        int c = bytes - o > (size_t)1 << 30 ? 1 << 30 : (int)(bytes - o);
        MPI_Request rq;
        if (send) MPI_START(MPI_Isend(buf + o, c, MPI_BYTE, peer, 0, d->comm[g], &rq), "gather (send)");
        else MPI_START(MPI_Irecv(buf + o, c, MPI_BYTE, peer, 0, d->comm[g], &rq), "gather (receive)");
        LP_CHECK(dist_wait_mpi(d, g, &rq, send ? "gather (send)" : "gather (receive)"));
        o += c;
    }
    return LP_OK;
}

/* Root receives every rank's bytes in rank order into one buffer. */
static lp_status gather_at_root(lp_dist *d, lp_dist_group g, const void *send, size_t bytes, const uint64_t *all,
                                void **recv, size_t *counts) {
    int p = dist_gsize(d, g), me = lp_dist_group_rank(d, g);
    size_t total = 0;
    for (int r = 0; r < p; r++) counts[r] = all[r], total += all[r];
    char *buf = malloc(total ? total : 1), *at = buf;
    /* without the buffer the senders are left waiting: the failing rank's exit ends the job */
    if (!buf) LP_FAIL(LP_ERR_OOM, "dist: out of host memory for a gather of %zu bytes", total);
    lp_status st = LP_OK;
    for (int r = 0; st == LP_OK && r < p; at += all[r], r++) {
        if (r == me) memcpy(at, send, bytes);
        else st = p2p_pieces(d, g, at, all[r], r, 0);
    }
    if (st == LP_OK) *recv = buf;
    else free(buf);
    return st;
}
#endif

lp_status lp_dist_gather(lp_dist *d, lp_dist_group g, const void *send, size_t bytes, void **recv, size_t *counts, int root) {
    int p = dist_gsize(d, g), me = lp_dist_group_rank(d, g);
    *recv = NULL;
    if (p <= 1) {
        counts[0] = bytes;
        if (!(*recv = malloc(bytes ? bytes : 1))) LP_FAIL(LP_ERR_OOM, "dist: out of host memory for %zu bytes", bytes);
        if (bytes) memcpy(*recv, send, bytes);
        return LP_OK;
    }
#if LOUPE_MPI
    LP_CHECK(dist_usable(d, "gather"));
    double t0 = dist_now();
    uint64_t mine = bytes, *all = me == root ? malloc((size_t)p * sizeof *all) : NULL;
    if (me == root && !all) LP_FAIL(LP_ERR_OOM, "dist: out of host memory");
    MPI_Request rq;
    lp_status st = LP_OK;
    if (MPI_Igather(&mine, 1, MPI_UINT64_T, all, 1, MPI_UINT64_T, root, d->comm[g], &rq) != MPI_SUCCESS)
        d->failed = 1, st = LP_ERR(LP_ERR_PEER, "dist: gather (sizes) could not start (MPI): a rank of the job is gone");
    if (st == LP_OK) st = dist_wait_mpi(d, g, &rq, "gather (sizes)");
    if (st == LP_OK && me != root) st = p2p_pieces(d, g, (char *)send, bytes, root, 1);
    if (st == LP_OK && me == root) st = gather_at_root(d, g, send, bytes, all, recv, counts);
    free(all);
    d->counts.gather++;
    d->counts.gather_bytes += bytes;
    d->counts.seconds += dist_now() - t0;
    return st;
#else
    (void)me, (void)send, (void)counts, (void)root;
    return no_mpi("gather");
#endif
}

/* ---- device buffers ---- */

lp_status dist_grow(void **p, size_t *have, size_t bytes) {
    if (bytes <= *have) return LP_OK;
    void *q = realloc(*p, bytes);
    if (!q) LP_FAIL(LP_ERR_OOM, "dist: %zu bytes of host staging", bytes);
    *p = q, *have = bytes;
    return LP_OK;
}
static lp_status stage(lp_dist *d, size_t bytes) { return dist_grow(&d->stage, &d->stage_bytes, bytes); }

#if LOUPE_NCCL
/* A communicator that failed or never answered is aborted (NCCL's own way out of a
 * collective a peer never joins); the job must end. */
void dist_nccl_drop(lp_dist *d, lp_dist_group g) {
    d->failed = 1;
    ncclCommAbort(d->nccl[g]);
    d->nccl_ok[g] = -1;
}

lp_status dist_nccl_wait(lp_dist *d, lp_dist_group g, cudaStream_t s, cudaEvent_t ev, const char *what) {
    double t0 = dist_now();
    char who[160];
    for (;;) {
        ncclResult_t e = ncclSuccess;
        if (ncclCommGetAsyncError(d->nccl[g], &e) != ncclSuccess) e = ncclInternalError;
        if (e != ncclSuccess && e != ncclInProgress) {
            dist_nccl_drop(d, g), dist_others(d, g, who, sizeof who);
            LP_FAIL(LP_ERR_PEER, "%s failed: lost contact with %s (NCCL: %s)", what, who, ncclGetErrorString(e));
        }
        if (e == ncclSuccess) {
            cudaError_t q = ev ? cudaEventQuery(ev) : s ? cudaStreamQuery(s) : cudaSuccess;
            if (q == cudaSuccess) return LP_OK;
            if (q != cudaErrorNotReady) {
                dist_nccl_drop(d, g);
                LP_FAIL(LP_ERR_CUDA, "dist: %s: %s", what, cudaGetErrorString(q));
            }
        }
        if (dist_now() - t0 > d->timeout_s) {
            dist_nccl_drop(d, g), dist_others(d, g, who, sizeof who);
            LP_FAIL(LP_ERR_PEER, "no answer from %s within %g s in NCCL %s (dist.timeout_s)", who, d->timeout_s, what);
        }
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
}

/* NCCL for group g (*use = 1): created on first use, by every rank of the group at once
 * (the first collective is collective), with the id broadcast over MPI. Not used (*use = 0,
 * host staging instead) when two ranks of the group share a GPU, which NCCL does not allow.
 * Every exchange here is bounded by the timeout like any other collective. */
static lp_status nccl_setup(lp_dist *d, lp_dist_group g, lp_ctx *c, int *use) {
    int p = dist_gsize(d, g), dev = c->cuda_device, clash = 0, len;
    char bus[32] = {0}, host[MPI_MAX_PROCESSOR_NAME + 1] = {0}, mine[96] = {0};
    if (cudaDeviceGetPCIBusId(bus, sizeof bus, dev) != cudaSuccess) snprintf(bus, sizeof bus, "device %d", dev);
    MPI_Get_processor_name(host, &len);
    snprintf(mine, sizeof mine, "%.63s|%.31s", host, bus);
    char *all = calloc((size_t)p, 96);
    if (!all) LP_FAIL(LP_ERR_OOM, "dist: out of host memory");
    lp_status st = lp_dist_allgather(d, g, mine, all, 96);
    for (int i = 0; st == LP_OK && i < p; i++)
        if (i != lp_dist_group_rank(d, g) && strcmp(all + i * 96, mine) == 0) clash = 1;
    free(all);
    LP_CHECK(st);
    int ok = !clash;
    ncclUniqueId id;
    if (ok && lp_dist_group_rank(d, g) == 0) ok = ncclGetUniqueId(&id) == ncclSuccess;
    LP_CHECK(allreduce_op(d, g, &ok, 1, LP_I32, 0));
    ok = ok == p;
    if (ok) {
        LP_CHECK(lp_dist_broadcast(d, g, &id, sizeof id, 0));
        ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
        cfg.blocking = 0; /* so that a peer lost during the init cannot hold this rank */
        ncclResult_t r = ncclCommInitRankConfig(&d->nccl[g], p, id, lp_dist_group_rank(d, g), &cfg);
        ok = r == ncclSuccess || r == ncclInProgress;
        if (ok) LP_CHECK(dist_nccl_wait(d, g, NULL, NULL, "init"));
        int all_ok = ok;
        LP_CHECK(allreduce_op(d, g, &all_ok, 1, LP_I32, 0));
        if (ok && all_ok != p) ncclCommDestroy(d->nccl[g]);
        ok = all_ok == p;
    }
    d->nccl_ok[g] = ok ? 1 : -1;
    *use = ok;
    return LP_OK;
}

lp_status dist_nccl_for(lp_dist *d, lp_dist_group g, lp_ctx *c, int *use) {
    *use = d->nccl_ok[g] == 1;
    if (d->nccl_ok[g]) return LP_OK;
    /* the set-up's own exchanges are not the caller's collectives (lp_dist_counts): only
     * their time counts, as time spent inside the caller's first collective */
    lp_dist_counts before = d->counts;
    lp_status st = nccl_setup(d, g, c, use);
    before.seconds = d->counts.seconds;
    d->counts = before;
    return st;
}

/* Queues one NCCL collective (the call may return in progress) and waits for it. */
static lp_status nccl_run(lp_dist *d, lp_dist_group g, lp_ctx *c, ncclResult_t r, const char *what, size_t n) {
    if (r != ncclSuccess && r != ncclInProgress) {
        dist_nccl_drop(d, g);
        LP_FAIL(LP_ERR_CUDA, "dist: NCCL %s of %zu values failed: %s", what, n, ncclGetErrorString(r));
    }
    return dist_nccl_wait(d, g, (cudaStream_t)c->stream, NULL, what);
}
#endif

lp_status dist_to_stage(lp_ctx *c, float *h, const void *buf, size_t n) {
    if (c->dtype == LP_F32) return lp_ctx_to_host(c, h, buf, n * 4);
    LP_CHECK(lp_ctx_to_host(c, h + n, buf, n * lp_dtype_size(c->dtype)));
    return lp_convert_host(h, LP_F32, h + n, c->dtype, n);
}
lp_status dist_from_stage(lp_ctx *c, void *buf, const float *h, size_t n) {
    if (c->dtype == LP_F32) return lp_ctx_to_device(c, buf, h, n * 4);
    return lp_ctx_upload_f32(c, buf, h, n);
}

lp_status lp_dist_allreduce_sum_dev(lp_dist *d, lp_dist_group g, lp_ctx *c, void *buf, size_t n) {
    if (dist_gsize(d, g) <= 1 || n == 0) return LP_OK;
    if (c->device == LP_CPU) return lp_dist_allreduce_sum(d, g, buf, n, LP_F32);
#if LOUPE_NCCL
    int use;
    LP_CHECK(dist_nccl_for(d, g, c, &use));
    if (use) {
        double t0 = dist_now();
        ncclDataType_t t = c->dtype == LP_BF16 ? ncclBfloat16 : ncclFloat32;
        LP_CHECK(nccl_run(d, g, c, ncclAllReduce(buf, buf, n, t, ncclSum, d->nccl[g], (cudaStream_t)c->stream), "all-reduce", n));
        d->counts.allreduce++;
        d->counts.allreduce_bytes += n * lp_dtype_size(c->dtype);
        d->counts.seconds += dist_now() - t0;
        return LP_OK;
    }
#endif
    LP_CHECK(stage(d, n * 6));
    LP_CHECK(dist_to_stage(c, d->stage, buf, n));
    LP_CHECK(lp_dist_allreduce_sum(d, g, d->stage, n, LP_F32));
    return dist_from_stage(c, buf, d->stage, n);
}

lp_status lp_dist_allgather_dev(lp_dist *d, lp_dist_group g, lp_ctx *c, const void *send, void *recv, size_t n) {
    int p = dist_gsize(d, g);
    size_t es = lp_dtype_size(c->dtype);
    if (p <= 1) return send == recv || n == 0 ? LP_OK : lp_ctx_copy(c, recv, send, n * es);
    if (c->device == LP_CPU) return lp_dist_allgather(d, g, send, recv, n * es);
#if LOUPE_NCCL
    int use;
    LP_CHECK(dist_nccl_for(d, g, c, &use));
    if (use) {
        double t0 = dist_now();
        ncclDataType_t t = c->dtype == LP_BF16 ? ncclBfloat16 : ncclFloat32;
        LP_CHECK(nccl_run(d, g, c, ncclAllGather(send, recv, n, t, d->nccl[g], (cudaStream_t)c->stream), "all-gather", n));
        d->counts.allgather++;
        d->counts.allgather_bytes += n * es;
        d->counts.seconds += dist_now() - t0;
        return LP_OK;
    }
#endif
    LP_CHECK(stage(d, n * es * (p + 1)));
    char *mine = (char *)d->stage + n * es * p;
    LP_CHECK(lp_ctx_to_host(c, mine, send, n * es));
    LP_CHECK(lp_dist_allgather(d, g, mine, d->stage, n * es));
    return lp_ctx_to_device(c, recv, d->stage, n * es * p);
}

lp_status lp_dist_broadcast_dev(lp_dist *d, lp_dist_group g, lp_ctx *c, void *buf, size_t n, int root) {
    size_t es = lp_dtype_size(c->dtype);
    if (dist_gsize(d, g) <= 1 || n == 0) return LP_OK;
    if (c->device == LP_CPU) return lp_dist_broadcast(d, g, buf, n * es, root);
#if LOUPE_NCCL
    int use;
    LP_CHECK(dist_nccl_for(d, g, c, &use));
    if (use) {
        double t0 = dist_now();
        LP_CHECK(nccl_run(d, g, c, ncclBroadcast(buf, buf, n * es, ncclUint8, root, d->nccl[g], (cudaStream_t)c->stream),
                          "broadcast", n));
        d->counts.broadcast++;
        d->counts.broadcast_bytes += n * es;
        d->counts.seconds += dist_now() - t0;
        return LP_OK;
    }
#endif
    LP_CHECK(stage(d, n * es));
    if (lp_dist_group_rank(d, g) == root) LP_CHECK(lp_ctx_to_host(c, d->stage, buf, n * es));
    LP_CHECK(lp_dist_broadcast(d, g, d->stage, n * es, root));
    return lp_ctx_to_device(c, buf, d->stage, n * es);
}
