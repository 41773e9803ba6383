/* dist.h: processes working together (MPI between processes, NCCL between GPUs).
 *
 *   lp_dist *d;
 *   lp_dist_init(&d, tp, dp);                 // tp * dp == world size, or refused
 *   lp_model_load_dist(&m, path, dev, dtype, d);   // model.h: each rank its TP slice
 *   ...
 *   lp_dist_finalize(d);
 *
 * All MPI and NCCL code of loupe lives behind this header (host/dist/). Every call is a
 * no-op for a single process (and for a group of one), so single-process code paths pass
 * NULL or a world of one and behave exactly as without this module: no MPI call is made
 * unless a launcher (mpirun, srun) started more than one process or MPI was already
 * initialized by the caller.
 *
 * Ranks: world rank r = dp_rank * tp + tp_rank, so the ranks of one tensor-parallel group
 * are contiguous (one node's GPUs under the usual placement).
 *
 * Where the world size comes from: MPI when the build has it (mpicc found; MPI=1 in the
 * build banner), initialized only when a launcher says it started this process
 * (OMPI_COMM_WORLD_SIZE, PMI_SIZE, or srun's SLURM_STEP_NUM_TASKS); in a build without MPI
 * those variables are read only to refuse, with a clear message, a multi-process launch.
 *
 * Buffers: the host calls take host memory and go through MPI. The tensor calls take memory
 * on a context's device: host memory through MPI on the CPU; GPU memory through NCCL when
 * the build has NCCL and every rank of the group has its own GPU, else staged through host
 * buffers and MPI (two ranks sharing one GPU, or no NCCL). */
#ifndef LOUPE_DIST_H
#define LOUPE_DIST_H

#include <stddef.h>
#include <stdint.h>
#include "loupe/status.h"
#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lp_dist lp_dist;

/* Which processes a collective spans. */
typedef enum lp_dist_group {
    LP_DIST_WORLD = 0,
    LP_DIST_TP,  /* the ranks sharing one model's tensor-parallel slices */
    LP_DIST_DP,  /* the ranks holding the same slice, each with its own data */
} lp_dist_group;

/* Starts (or joins) the job: world size and rank from MPI; tp * dp must equal the world
 * size (tp <= 0 or dp <= 0: that factor is derived from the other, both <= 0: dp = world).
 * Refused with LP_ERR_ARG naming dist.tp / dist.dp when the sizes do not divide, and when
 * more than one process is asked for in a build without MPI. Initializes MPI itself when
 * launched by mpirun/srun and nobody did (then lp_dist_finalize finalizes it). */
lp_status lp_dist_init(lp_dist **out, int tp, int dp);
/* Frees the groups (and NCCL communicators); finalizes MPI if lp_dist_init initialized it.
 * NULL: nothing. */
void lp_dist_finalize(lp_dist *d);

/* ---- faults: no collective waits forever ----
 * Every collective over more than one rank completes within the job's timeout (default
 * LP_DIST_DEFAULT_TIMEOUT_S seconds; the CLI's dist.timeout_s) or fails with LP_ERR_PEER,
 * naming the collective, the ranks it waited for and the timeout: a rank that crashed,
 * was killed or stopped answering never leaves the others waiting. A failure also comes
 * back when MPI reports a peer gone. After one such failure the job cannot go on: every
 * later collective fails at once, lp_dist_failed says so, and the caller ends the whole
 * job with lp_dist_abort (lp_dist_finalize then skips MPI's collective shutdown, which
 * would wait for the lost rank). The timeout bounds how long one rank may wait for the
 * others, so it must exceed the longest work one rank does alone between collectives
 * (rank 0 writing a shard, for one). */
#define LP_DIST_DEFAULT_TIMEOUT_S 30.0
/* seconds > 0 and finite, else LP_ERR_ARG naming dist.timeout_s. NULL d: nothing to do. */
lp_status lp_dist_set_timeout(lp_dist *d, double seconds);
double lp_dist_timeout(const lp_dist *d);
/* 1 after a collective timed out or lost a peer. */
int lp_dist_failed(const lp_dist *d);
/* Ends every process of the job with exit status `code` (MPI_Abort): the launcher (mpirun,
 * srun) takes the others down. Returns only when there is no job to end (one process, or
 * no MPI), and then the caller exits as it would have. */
void lp_dist_abort(lp_dist *d, int code);

/* A NULL d is the single process: rank 0 of size 1 in every group. */
int lp_dist_rank(const lp_dist *d);
int lp_dist_size(const lp_dist *d);
int lp_dist_tp_rank(const lp_dist *d);
int lp_dist_tp_size(const lp_dist *d);
int lp_dist_dp_rank(const lp_dist *d);
int lp_dist_dp_size(const lp_dist *d);
int lp_dist_group_rank(const lp_dist *d, lp_dist_group g);
int lp_dist_group_size(const lp_dist *d, lp_dist_group g);
/* 1 when the build has MPI (and so can run more than one process). */
int lp_dist_have_mpi(void);
/* This process's rank among the job's processes on its machine (0 for one process). A
 * CUDA context opens device local rank % the devices it sees (lp_ctx_set_local_rank). */
int lp_dist_local_rank(const lp_dist *d);

/* ---- host buffers (MPI) ----
 * dtype: LP_F32, LP_F64, LP_I32, LP_I64, LP_U64 for the sums; any dtype for the moves.
 * All are blocking (until done, or the timeout above) and must be called by every rank of
 * the group in the same order. */
lp_status lp_dist_allreduce_sum(lp_dist *d, lp_dist_group g, void *buf, size_t n, lp_dtype dt);
/* The maximum over ranks (dead-latent statistics, agreement checks). */
lp_status lp_dist_allreduce_max(lp_dist *d, lp_dist_group g, void *buf, size_t n, lp_dtype dt);
/* recv (bytes * group size) gets every rank's `bytes` of send, in group-rank order.
 * send may lie inside recv at this rank's place (in place). */
lp_status lp_dist_allgather(lp_dist *d, lp_dist_group g, const void *send, void *recv, size_t bytes);
/* buf (bytes) from group rank root to every rank of the group. */
lp_status lp_dist_broadcast(lp_dist *d, lp_dist_group g, void *buf, size_t bytes, int root);
lp_status lp_dist_barrier(lp_dist *d, lp_dist_group g);
/* Every rank's own `bytes` of send (the sizes may differ) to group rank root: there *recv
 * (malloc'ed, free it) holds the parts one after another in group-rank order and
 * counts[group size] their sizes; elsewhere *recv is NULL. Any size (sent in pieces). */
lp_status lp_dist_gather(lp_dist *d, lp_dist_group g, const void *send, size_t bytes, void **recv, size_t *counts, int root);

/* ---- buffers on a context's device (NCCL, or MPI through host buffers) ----
 * buf holds n elements of c->dtype (F32 or BF16; BF16 is summed in F32 by the host path). */
lp_status lp_dist_allreduce_sum_dev(lp_dist *d, lp_dist_group g, lp_ctx *c, void *buf, size_t n);
/* recv on c's device gets every rank's `n` elements of c->dtype, in group-rank order. */
lp_status lp_dist_allgather_dev(lp_dist *d, lp_dist_group g, lp_ctx *c, const void *send, void *recv, size_t n);
lp_status lp_dist_broadcast_dev(lp_dist *d, lp_dist_group g, lp_ctx *c, void *buf, size_t n, int root);

/* How group g moves device buffers: 1 through NCCL, 0 staged through the host (ranks of the
 * group sharing a GPU, a build without NCCL, or a group of one), -1 not known before the
 * group's first collective on a GPU (which decides it). */
int lp_dist_uses_nccl(const lp_dist *d, lp_dist_group g);

/* ---- started collectives: communication behind compute ----
 * lp_dist_allreduce_sum_dev in two halves: the start returns at once with *req, the work
 * queued on c afterwards runs while the sum travels, and lp_dist_wait ends it (after which
 * the work queued on c sees the sum). buf must not be read or written in between. The work
 * queued on c before the start produces buf: on a GPU with NCCL the all-reduce runs on a
 * stream of the job's own, ordered after an event on c's stream, and c's stream waits for
 * its end at lp_dist_wait; host memory (and device memory staged through the host: two
 * ranks on one GPU, no NCCL) goes through MPI's nonblocking all-reduce, which an MPI
 * without a progress thread advances only inside MPI calls, i.e. mostly in lp_dist_wait.
 * Every rank of the group starts the same collectives in the same order. At most
 * LP_DIST_MAX_STARTED are in flight per job (more: LP_ERR_ARG). The wait keeps the blocking
 * calls' promise: done within the job's timeout, or LP_ERR_PEER as above. Counted as one
 * all-reduce of the buffer; the seconds are those spent inside the start and the wait
 * (the communication compute did not hide). A group of one, or n == 0: *req = NULL and
 * nothing to wait for. */
#define LP_DIST_MAX_STARTED 8
typedef struct lp_dist_req lp_dist_req;
lp_status lp_dist_allreduce_sum_dev_start(lp_dist *d, lp_dist_group g, lp_ctx *c, void *buf, size_t n, lp_dist_req **req);
/* NULL req: nothing. The request is spent either way (a failure has marked the job failed). */
lp_status lp_dist_wait(lp_dist *d, lp_dist_req *req);

/* ---- what moved (for tests and benchmarks) ----
 * Every collective over a group of more than one rank counts once, with the bytes this
 * rank contributed (all-reduce: the buffer; all-gather and gather: its own part; broadcast: the
 * buffer) and the seconds it spent inside the call. Calls over a group of one count nothing. */
typedef struct lp_dist_counts {
    uint64_t allreduce, allgather, broadcast, barrier;
    uint64_t allreduce_bytes, allgather_bytes, broadcast_bytes;
    uint64_t gather, gather_bytes; /* lp_dist_gather: calls, and the bytes this rank sent */
    double seconds;
} lp_dist_counts;
void lp_dist_counts_get(const lp_dist *d, lp_dist_counts *out);
void lp_dist_counts_reset(lp_dist *d);

#ifdef __cplusplus
}
#endif
#endif
