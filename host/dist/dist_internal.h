/* dist_internal.h: what the files of host/dist/ share: the job (struct lp_dist), the wait
 * for an MPI request under the job's timeout, the NCCL communicators and the host staging of
 * device buffers (dist.c), used by the started collectives of dist_async.c. */
#ifndef LOUPE_DIST_INTERNAL_H
#define LOUPE_DIST_INTERNAL_H

#include "loupe/dist.h"

#ifndef LOUPE_MPI
#define LOUPE_MPI 0
#endif
#if LOUPE_MPI
#include <mpi.h>
#endif
#if LOUPE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#endif

/* One started collective (lp_dist_allreduce_sum_dev_start): what lp_dist_wait finishes. */
typedef enum req_kind {
    REQ_FREE = 0,
    REQ_MPI,   /* MPI_Iallreduce in place on host memory */
    REQ_STAGE, /* MPI_Iallreduce on a host copy of device memory, copied back at the wait */
    REQ_NCCL,  /* ncclAllReduce on the job's communication stream, `done` recorded after it */
} req_kind;

struct lp_dist_req {
    req_kind kind;
    lp_dist_group g;
    lp_ctx *c;
    void *buf;             /* the caller's buffer */
    size_t n;              /* its elements (of c->dtype) */
#if LOUPE_MPI
    MPI_Request rq;
#endif
#if LOUPE_NCCL
    cudaEvent_t ready, done; /* on the compute stream before; on the communication stream after */
#endif
    void *stage;           /* REQ_STAGE: this request's own host copy (grows, kept) */
    size_t stage_bytes;
};

struct lp_dist {
    int rank, size, tp, dp;
    int local_rank;        /* among the job's processes on this machine (its GPU: lp_ctx_set_local_rank) */
    int own_mpi;           /* lp_dist_init initialized MPI, so finalize ends it */
    double timeout_s;      /* the longest any collective waits for the other ranks */
    int failed;            /* a collective timed out or lost a peer: the job must end */
#if LOUPE_MPI
    MPI_Comm comm[3];      /* world, tp, dp (MPI_COMM_NULL for a group of one) */
#endif
#if LOUPE_NCCL
    ncclComm_t nccl[3];
    int nccl_ok[3];        /* the group's ranks each drive their own GPU */
    cudaStream_t side;     /* started NCCL collectives run here, beside the compute stream */
#endif
    void *stage;           /* host staging of device buffers (grows, kept) */
    size_t stage_bytes;
    struct lp_dist_req req[LP_DIST_MAX_STARTED];
    lp_dist_counts counts;
};

double dist_now(void);
/* Refuses every collective once one has failed (the groups are out of step). */
lp_status dist_usable(const lp_dist *d, const char *what);
/* The size of group g (1: every call over it is a no-op). */
int dist_gsize(const lp_dist *d, lp_dist_group g);
/* Device buffer (n elements of c->dtype) <-> host F32 at h, which holds 6 bytes per value
 * (BF16 is widened through the raw values placed after the n floats). */
lp_status dist_to_stage(lp_ctx *c, float *h, const void *buf, size_t n);
lp_status dist_from_stage(lp_ctx *c, void *buf, const float *h, size_t n);
/* Grows a host buffer *p of *have bytes to at least `bytes` (kept for later calls). */
lp_status dist_grow(void **p, size_t *have, size_t bytes);

#if LOUPE_MPI
MPI_Datatype dist_mpi_type(lp_dtype dt);
/* Waits for request rq of a collective over g until it completes, MPI reports a peer gone,
 * or the job's timeout passes (then LP_ERR_PEER naming `what` and the ranks waited for,
 * and the job is marked failed). */
lp_status dist_wait_mpi(lp_dist *d, lp_dist_group g, MPI_Request *rq, const char *what);
/* "rank 1" or "ranks 1, 2, 3": the world ranks this rank waits for in group g. */
void dist_others(const lp_dist *d, lp_dist_group g, char *buf, size_t n);
#endif
#if LOUPE_NCCL
/* Whether group g talks through NCCL (*use = 1; created on first use by every rank of the
 * group at once) or through host staging and MPI (*use = 0: ranks sharing a GPU). */
lp_status dist_nccl_for(lp_dist *d, lp_dist_group g, lp_ctx *c, int *use);
/* Waits, within the job's timeout, until group g's communicator has taken what it was
 * given (it runs nonblocking, so its init and calls may return in progress) and then until
 * event ev (when not NULL), else stream s (when not NULL), has run it; a lost peer aborts
 * the communicator (LP_ERR_PEER). */
lp_status dist_nccl_wait(lp_dist *d, lp_dist_group g, cudaStream_t s, cudaEvent_t ev, const char *what);
/* Marks the job failed and aborts group g's communicator. */
void dist_nccl_drop(lp_dist *d, lp_dist_group g);
#endif

#endif
