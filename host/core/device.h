/* device.h: the CUDA half of lp_ctx (kernels/ctx.cu and kernels/capture.cu; in a build
 * without CUDA, kernels/ctx_stub.c): streams, the cuBLAS handle, device and pinned memory,
 * and copies. host/core/tensor.c (lp_ctx_*) calls these when c->device == LP_CUDA; they
 * are part of core, below the ops, though they are compiled by nvcc. */
#ifndef LOUPE_CORE_DEVICE_H
#define LOUPE_CORE_DEVICE_H

#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

lp_status cuda_ctx_init(lp_ctx *c);
void cuda_ctx_free(lp_ctx *c);
lp_status cuda_alloc(lp_ctx *c, size_t bytes, void **p);
void cuda_release(lp_ctx *c, void *p);
lp_status cuda_alloc_host(lp_ctx *c, size_t bytes, void **p);
void cuda_release_host(lp_ctx *c, void *p);
lp_status cuda_memset0(lp_ctx *c, void *p, size_t bytes);
lp_status cuda_to_device(lp_ctx *c, void *dst, const void *src, size_t bytes);
lp_status cuda_to_host(lp_ctx *c, void *dst, const void *src, size_t bytes);
lp_status cuda_copy(lp_ctx *c, void *dst, const void *src, size_t bytes);
lp_status cuda_sync(lp_ctx *c);
lp_status cuda_to_host_async(lp_ctx *c, void *dst, const void *src, size_t bytes); /* kernels/capture.cu */
lp_status cuda_to_device_async(lp_ctx *c, void *dst, const void *src, size_t bytes); /* kernels/capture.cu */
lp_status cuda_wait_copies(lp_ctx *c);
int cuda_device_count(char *why, size_t n);

#ifdef __cplusplus
}
#endif
#endif
