// capture.cu: the overlapped device-to-host copy behind lp_ctx_to_host_async (and its
// host-to-device twin lp_ctx_to_device_async with lp_ctx_wait_copies, at the end).
// Captures are first copied device-to-device on the compute stream (so later layers may
// overwrite the activation), then drained to pinned host memory on the copy stream,
// which waits only for that point of the compute stream.
#include <cuda_runtime.h>

#include "core/device.h"

extern "C" lp_status cuda_to_host_async(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    if (c == NULL || c->device != LP_CUDA || c->stream == NULL || c->copy_stream == NULL)
        return LP_ERR(LP_ERR_ARG, "cuda_to_host_async: not an initialised CUDA context");
    if (bytes == 0) return LP_OK;
    if (dst == NULL || src == NULL)
        return LP_ERR(LP_ERR_ARG, "cuda_to_host_async: NULL pointer for %zu bytes", bytes);
    cudaEvent_t ev = NULL;
    cudaError_t e = cudaSetDevice(c->cuda_device);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventRecord(ev, (cudaStream_t)c->stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent((cudaStream_t)c->copy_stream, ev, 0);
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, (cudaStream_t)c->copy_stream);
    if (ev) cudaEventDestroy(ev); // safe: destruction is deferred until the event completes
    if (e != cudaSuccess)
        return LP_ERR(LP_ERR_CUDA, "CUDA error %s: %s in capture copy",
                            cudaGetErrorName(e), cudaGetErrorString(e));
    return LP_OK;
}

// Host to device on the copy stream, after the compute stream's work so far (which may still
// read dst): the next shuffle window of SAE training, uploaded while the current one trains.
extern "C" lp_status cuda_to_device_async(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    if (c == NULL || c->device != LP_CUDA || c->stream == NULL || c->copy_stream == NULL)
        return LP_ERR(LP_ERR_ARG, "cuda_to_device_async: not an initialised CUDA context");
    if (bytes == 0) return LP_OK;
    if (dst == NULL || src == NULL) return LP_ERR(LP_ERR_ARG, "cuda_to_device_async: NULL pointer for %zu bytes", bytes);
    cudaEvent_t ev = NULL;
    cudaError_t e = cudaSetDevice(c->cuda_device);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventRecord(ev, (cudaStream_t)c->stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent((cudaStream_t)c->copy_stream, ev, 0);
    if (e == cudaSuccess) e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)c->copy_stream);
    if (ev) cudaEventDestroy(ev);
    if (e != cudaSuccess)
        return LP_ERR(LP_ERR_CUDA, "CUDA error %s: %s in an upload on the copy stream", cudaGetErrorName(e), cudaGetErrorString(e));
    return LP_OK;
}

// The compute stream waits (on the device) for every copy queued so far on the copy stream.
extern "C" lp_status cuda_wait_copies(lp_ctx *c) {
    if (c == NULL || c->device != LP_CUDA || c->stream == NULL || c->copy_stream == NULL)
        return LP_ERR(LP_ERR_ARG, "cuda_wait_copies: not an initialised CUDA context");
    cudaEvent_t ev = NULL;
    cudaError_t e = cudaSetDevice(c->cuda_device);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventRecord(ev, (cudaStream_t)c->copy_stream);
    if (e == cudaSuccess) e = cudaStreamWaitEvent((cudaStream_t)c->stream, ev, 0);
    if (ev) cudaEventDestroy(ev);
    if (e != cudaSuccess)
        return LP_ERR(LP_ERR_CUDA, "CUDA error %s: %s waiting for the copy stream", cudaGetErrorName(e), cudaGetErrorString(e));
    return LP_OK;
}
