// ctx.cu: the CUDA half of lp_ctx: streams, the cuBLAS handle, device and pinned memory,
// and copies. host/core/tensor.c (lp_ctx_*) calls these when c->device == LP_CUDA.
//
// Streams: ops run on one compute stream; captures are copied to the host on a second,
// non-blocking stream so they can overlap the next layer. The compute stream is an
// ordinary (blocking) stream on purpose: anything that ever touches the legacy default
// stream (a library, a debugging cudaMemcpy) is then still ordered with our work.
// Copies in and out are synchronous with respect to the host, so callers may reuse or
// read their host buffer as soon as the call returns.
//
// Every call makes the context's device current first (cudaSetDevice is per host thread,
// and a thread may hold contexts on several devices).
#include <stdio.h>

#include "common.cuh"
#include "core/device.h"

lp_status cuda_ctx_init(lp_ctx *c) {
    if (c == NULL) LP_FAIL(LP_ERR_ARG, "cuda_ctx_init: NULL context");
    lp_status st = LP_OK;
    cudaStream_t compute = NULL, copy = NULL;
    cublasHandle_t blas = NULL;
    int n = 0;

    // No driver or no device is "asked for the GPU on a machine without one", not a failure
    // while working: LP_ERR_NO_CUDA, with the runtime's reason.
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        (void)cudaGetLastError();
        return LP_ERR(LP_ERR_NO_CUDA, "no usable CUDA device: %s (use --model.device=cpu)",
                            e != cudaSuccess ? cudaGetErrorString(e) : "none found");
    }
    if (c->cuda_device < 0 || c->cuda_device >= n) {
        st = LP_ERR(LP_ERR_ARG, "CUDA device %d requested but %d device(s) present", c->cuda_device, n);
        goto fail;
    }
    LP_CUDA_TRY(st, fail, cudaSetDevice(c->cuda_device));
    LP_CUDA_TRY(st, fail, cudaStreamCreate(&compute));
    LP_CUDA_TRY(st, fail, cudaStreamCreateWithFlags(&copy, cudaStreamNonBlocking));
    LP_CUBLAS_TRY(st, fail, cublasCreate(&blas));
    LP_CUBLAS_TRY(st, fail, cublasSetStream(blas, compute));
    // Default math allows tensor cores for bf16 operands but never TF32 for fp32 ones
    // (fp32 GEMMs must match the CPU tightly); split-K partial sums stay in fp32 even
    // when the output is bf16.
    LP_CUBLAS_TRY(st, fail,
                  cublasSetMathMode(blas, (cublasMath_t)(CUBLAS_DEFAULT_MATH |
                                                         CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    c->stream = compute;
    c->copy_stream = copy;
    c->blas = blas;
    return LP_OK;

fail:
    if (blas) cublasDestroy(blas);
    if (copy) cudaStreamDestroy(copy);
    if (compute) cudaStreamDestroy(compute);
    (void)cudaGetLastError();
    c->stream = c->copy_stream = c->blas = NULL;
    return st;
}

void cuda_ctx_free(lp_ctx *c) {
    if (c == NULL) return;
    (void)cudaSetDevice(c->cuda_device);
    // Let queued work (and captures in flight) finish before their streams go away.
    if (c->stream) (void)cudaStreamSynchronize((cudaStream_t)c->stream);
    if (c->copy_stream) (void)cudaStreamSynchronize((cudaStream_t)c->copy_stream);
    if (c->blas) cublasDestroy((cublasHandle_t)c->blas);
    if (c->copy_stream) cudaStreamDestroy((cudaStream_t)c->copy_stream);
    if (c->stream) cudaStreamDestroy((cudaStream_t)c->stream);
    (void)cudaGetLastError();
    c->stream = c->copy_stream = c->blas = NULL;
}

lp_status cuda_alloc(lp_ctx *c, size_t bytes, void **p) {
    if (p == NULL) LP_FAIL(LP_ERR_ARG, "cuda_alloc: NULL result pointer");
    *p = NULL;
    if (bytes == 0) return LP_OK;
    LP_CUDA_REQUIRE(c != NULL && c->device == LP_CUDA, "cuda_alloc: not a CUDA context");
    LP_CUDA_CHECK(cudaSetDevice(c->cuda_device));
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        *p = NULL;
        if (e == cudaErrorMemoryAllocation) {
            size_t free_b = 0, total_b = 0;
            (void)cudaMemGetInfo(&free_b, &total_b);
            (void)cudaGetLastError();
            LP_FAIL(LP_ERR_OOM,
                    "CUDA out of memory: cudaMalloc of %zu bytes failed (%zu of %zu bytes free on "
                    "device %d)", bytes, free_b, total_b, c->cuda_device);
        }
        LP_FAIL(LP_ERR_CUDA, "CUDA error %s: %s in cudaMalloc(%zu bytes)", cudaGetErrorName(e),
                cudaGetErrorString(e), bytes);
    }
    return LP_OK;
}

void cuda_release(lp_ctx *c, void *p) {
    if (p == NULL) return;
    if (c) (void)cudaSetDevice(c->cuda_device); // cudaFree syncs the current device first
    (void)cudaFree(p);
    (void)cudaGetLastError();
}

lp_status cuda_alloc_host(lp_ctx *c, size_t bytes, void **p) {
    (void)c;
    if (p == NULL) LP_FAIL(LP_ERR_ARG, "cuda_alloc_host: NULL result pointer");
    *p = NULL;
    if (bytes == 0) return LP_OK;
    cudaError_t e = cudaMallocHost(p, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        *p = NULL;
        LP_FAIL(e == cudaErrorMemoryAllocation ? LP_ERR_OOM : LP_ERR_CUDA,
                "CUDA error %s: %s in cudaMallocHost(%zu bytes)", cudaGetErrorName(e),
                cudaGetErrorString(e), bytes);
    }
    return LP_OK;
}

void cuda_release_host(lp_ctx *c, void *p) {
    (void)c;
    if (p == NULL) return;
    (void)cudaFreeHost(p);
    (void)cudaGetLastError();
}

lp_status cuda_memset0(lp_ctx *c, void *p, size_t bytes) {
    LP_CUDA_REQUIRE(c != NULL && c->device == LP_CUDA, "cuda_memset0: not a CUDA context");
    if (bytes == 0) return LP_OK;
    LP_CUDA_REQUIRE(p != NULL, "cuda_memset0: NULL pointer for %zu bytes", bytes);
    LP_CUDA_CHECK(cudaSetDevice(c->cuda_device));
    LP_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, cuda_stream_of(c)));
    return LP_OK;
}

// One synchronous copy on the compute stream: ordered after every op already queued.
static lp_status copy_sync(lp_ctx *c, void *dst, const void *src, size_t bytes,
                           cudaMemcpyKind kind, const char *op) {
    LP_CUDA_REQUIRE(c != NULL && c->device == LP_CUDA, "%s: not a CUDA context", op);
    if (bytes == 0) return LP_OK;
    LP_CUDA_REQUIRE(dst != NULL && src != NULL, "%s: NULL pointer for %zu bytes", op, bytes);
    LP_CUDA_CHECK(cudaSetDevice(c->cuda_device));
    LP_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, cuda_stream_of(c)));
    LP_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(c)));
    return LP_OK;
}

lp_status cuda_to_device(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    return copy_sync(c, dst, src, bytes, cudaMemcpyHostToDevice, "cuda_to_device");
}

lp_status cuda_to_host(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    return copy_sync(c, dst, src, bytes, cudaMemcpyDeviceToHost, "cuda_to_host");
}

// Device to device stays on the compute stream without a host wait: every reader of dst
// is later work on that stream, or the copy stream after an event (captures).
lp_status cuda_copy(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    LP_CUDA_REQUIRE(c != NULL && c->device == LP_CUDA, "cuda_copy: not a CUDA context");
    if (bytes == 0) return LP_OK;
    LP_CUDA_REQUIRE(dst != NULL && src != NULL, "cuda_copy: NULL pointer for %zu bytes", bytes);
    LP_CUDA_CHECK(cudaSetDevice(c->cuda_device));
    LP_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cuda_stream_of(c)));
    return LP_OK;
}

lp_status cuda_sync(lp_ctx *c) {
    LP_CUDA_REQUIRE(c != NULL && c->device == LP_CUDA, "cuda_sync: not a CUDA context");
    LP_CUDA_CHECK(cudaSetDevice(c->cuda_device));
    if (c->stream) LP_CUDA_CHECK(cudaStreamSynchronize(cuda_stream_of(c)));
    if (c->copy_stream) LP_CUDA_CHECK(cudaStreamSynchronize((cudaStream_t)c->copy_stream));
    return LP_OK;
}

int cuda_device_count(char *why, size_t n) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (why && n) snprintf(why, n, "%s", cudaGetErrorString(e));
        return 0;
    }
    if (count == 0 && why && n) snprintf(why, n, "no CUDA device found");
    return count;
}
