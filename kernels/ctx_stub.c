/* ctx_stub.c: the CUDA half of lp_ctx (core/device.h) in a CPU-only build (make CUDA=0),
 * linked in place of kernels/ctx.cu and kernels/capture.cu, as cuda_stub.c is for the ops.
 * Every entry point reports LP_ERR_NO_CUDA with a hint; the void ones do nothing. */
#include <stdio.h>

#include "core/device.h"

#define NO_CUDA()                                                                            \
    LP_ERR(LP_ERR_NO_CUDA,                                                                   \
                 "built without CUDA (rebuild with nvcc available, or use --model.device=cpu)")

lp_status cuda_ctx_init(lp_ctx *c) { (void)c; return NO_CUDA(); }
void cuda_ctx_free(lp_ctx *c) { (void)c; }
lp_status cuda_alloc(lp_ctx *c, size_t bytes, void **p) {
    (void)c; (void)bytes;
    if (p) *p = NULL;
    return NO_CUDA();
}
void cuda_release(lp_ctx *c, void *p) { (void)c; (void)p; }
lp_status cuda_alloc_host(lp_ctx *c, size_t bytes, void **p) {
    (void)c; (void)bytes;
    if (p) *p = NULL;
    return NO_CUDA();
}
void cuda_release_host(lp_ctx *c, void *p) { (void)c; (void)p; }
lp_status cuda_memset0(lp_ctx *c, void *p, size_t bytes) {
    (void)c; (void)p; (void)bytes;
    return NO_CUDA();
}
lp_status cuda_to_device(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    (void)c; (void)dst; (void)src; (void)bytes;
    return NO_CUDA();
}
lp_status cuda_to_host(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    (void)c; (void)dst; (void)src; (void)bytes;
    return NO_CUDA();
}
lp_status cuda_copy(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    (void)c; (void)dst; (void)src; (void)bytes;
    return NO_CUDA();
}
lp_status cuda_sync(lp_ctx *c) { (void)c; return NO_CUDA(); }
lp_status cuda_to_host_async(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    (void)c; (void)dst; (void)src; (void)bytes;
    return NO_CUDA();
}
lp_status cuda_to_device_async(lp_ctx *c, void *dst, const void *src, size_t bytes) {
    (void)c; (void)dst; (void)src; (void)bytes;
    return NO_CUDA();
}
lp_status cuda_wait_copies(lp_ctx *c) { (void)c; return NO_CUDA(); }
int cuda_device_count(char *why, size_t n) {
    if (why && n) snprintf(why, n, "loupe was built without CUDA");
    return 0;
}
