/* dist_async.c: started collectives (dist.h): an all-reduce that travels while the caller
 * computes, and the wait that ends it under the job's timeout. The request slots live in
 * the job (no allocation per call); NCCL runs them on one stream of the job's own, so they
 * complete in the order they were started, beside the compute stream. */
#include <string.h>

#include "dist/dist_internal.h"

#if LOUPE_NCCL
#define CUDA_OK(x)                                                                              \
    do {                                                                                        \
        cudaError_t e_ = (x);                                                                   \
        if (e_ != cudaSuccess) LP_FAIL(LP_ERR_CUDA, "dist: %s: %s", #x, cudaGetErrorString(e_)); \
    } while (0)

/* ncclAllReduce on the side stream after everything queued on c's stream so far, with
 * `done` recorded after it for the wait. */
static lp_status nccl_start(lp_dist *d, lp_dist_req *r) {
    lp_ctx *c = r->c;
    if (!d->side) CUDA_OK(cudaStreamCreateWithFlags(&d->side, cudaStreamNonBlocking));
    if (!r->ready) CUDA_OK(cudaEventCreateWithFlags(&r->ready, cudaEventDisableTiming));
    if (!r->done) CUDA_OK(cudaEventCreateWithFlags(&r->done, cudaEventDisableTiming));
    CUDA_OK(cudaEventRecord(r->ready, (cudaStream_t)c->stream));
    CUDA_OK(cudaStreamWaitEvent(d->side, r->ready, 0));
    ncclDataType_t t = c->dtype == LP_BF16 ? ncclBfloat16 : ncclFloat32;
    ncclResult_t e = ncclAllReduce(r->buf, r->buf, r->n, t, ncclSum, d->nccl[r->g], d->side);
    if (e != ncclSuccess && e != ncclInProgress) {
        dist_nccl_drop(d, r->g);
        LP_FAIL(LP_ERR_CUDA, "dist: NCCL all-reduce of %zu values failed: %s", r->n, ncclGetErrorString(e));
    }
    /* a nonblocking communicator may still be queueing it: `done` must come after it */
    LP_CHECK(dist_nccl_wait(d, r->g, NULL, NULL, "all-reduce"));
    CUDA_OK(cudaEventRecord(r->done, d->side));
    r->kind = REQ_NCCL;
    return LP_OK;
}
#endif

#if LOUPE_MPI
static lp_status mpi_start(lp_dist *d, lp_dist_req *r, float *h, req_kind kind) {
    if (MPI_Iallreduce(MPI_IN_PLACE, h, (int)r->n, MPI_FLOAT, MPI_SUM, d->comm[r->g], &r->rq) != MPI_SUCCESS) {
        d->failed = 1;
        LP_FAIL(LP_ERR_PEER, "dist: all-reduce could not start (MPI): a rank of the job is gone");
    }
    r->kind = kind;
    return LP_OK;
}

/* The way lp_dist_allreduce_sum_dev would take: host memory through MPI, device memory
 * through NCCL, or through a host copy (this request's own) and MPI. */
static lp_status start(lp_dist *d, lp_dist_req *r) {
    lp_ctx *c = r->c;
    if (c->device == LP_CPU) return mpi_start(d, r, r->buf, REQ_MPI);
#if LOUPE_NCCL
    int use;
    LP_CHECK(dist_nccl_for(d, r->g, c, &use));
    if (use) return nccl_start(d, r);
#endif
    LP_CHECK(dist_grow(&r->stage, &r->stage_bytes, r->n * 6));
    LP_CHECK(dist_to_stage(c, r->stage, r->buf, r->n));
    return mpi_start(d, r, r->stage, REQ_STAGE);
}
#endif

lp_status lp_dist_allreduce_sum_dev_start(lp_dist *d, lp_dist_group g, lp_ctx *c, void *buf, size_t n, lp_dist_req **req) {
    *req = NULL;
    if (dist_gsize(d, g) <= 1 || n == 0) return LP_OK;
#if LOUPE_MPI
    LP_CHECK(dist_usable(d, "all-reduce"));
    /* MPI counts are int: a larger buffer is summed here and now, in pieces */
    if (n > (size_t)1 << 30) return lp_dist_allreduce_sum_dev(d, g, c, buf, n);
    lp_dist_req *r = NULL;
    for (int i = 0; i < LP_DIST_MAX_STARTED && !r; i++)
        if (d->req[i].kind == REQ_FREE) r = &d->req[i];
    if (!r) LP_FAIL(LP_ERR_ARG, "dist: more than %d collectives started and not waited for", LP_DIST_MAX_STARTED);
    double t0 = dist_now();
    r->g = g, r->c = c, r->buf = buf, r->n = n;
    LP_CHECK(start(d, r));
    *req = r;
    d->counts.allreduce++;
    d->counts.allreduce_bytes += n * lp_dtype_size(c->dtype);
    d->counts.seconds += dist_now() - t0;
    return LP_OK;
#else
    (void)c, (void)buf;
    LP_FAIL(LP_ERR_ARG, "dist: all-reduce over more than one process needs MPI (this build has none)");
#endif
}

static lp_status finish(lp_dist *d, lp_dist_req *r) {
#if LOUPE_MPI /* (without MPI nothing was ever started) */
    LP_CHECK(dist_usable(d, "the wait for an all-reduce"));
    if (r->kind == REQ_MPI) return dist_wait_mpi(d, r->g, &r->rq, "all-reduce");
    if (r->kind == REQ_STAGE) {
        LP_CHECK(dist_wait_mpi(d, r->g, &r->rq, "all-reduce"));
        return dist_from_stage(r->c, r->buf, r->stage, r->n);
    }
#endif
#if LOUPE_NCCL /* (only with MPI) */
    if (r->kind == REQ_NCCL) {
        LP_CHECK(dist_nccl_wait(d, r->g, NULL, r->done, "all-reduce"));
        /* the host saw it end; the stream's own order says the same to later kernels */
        CUDA_OK(cudaStreamWaitEvent((cudaStream_t)r->c->stream, r->done, 0));
        return LP_OK;
    }
#endif
    LP_FAIL(LP_ERR_INTERNAL, "dist: a wait for a collective that was not started");
}

lp_status lp_dist_wait(lp_dist *d, lp_dist_req *req) {
    if (!req) return LP_OK;
    double t0 = dist_now();
    lp_status st = finish(d, req);
    req->kind = REQ_FREE;
    d->counts.seconds += dist_now() - t0;
    return st;
}
