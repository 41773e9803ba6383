/* tensor.h: dtypes, devices, a small tensor descriptor, and the execution context.
 *
 * An lp_ctx says where ops run (CPU or one CUDA device) and in which activation
 * dtype (F32 on the CPU; BF16 by default or F32 on request on the GPU, always with
 * fp32 accumulation). Device memory is allocated through the context so that call
 * sites never carry #ifdef CUDA. */
#ifndef LOUPE_TENSOR_H
#define LOUPE_TENSOR_H

#include <stddef.h>
#include <stdint.h>
#include "loupe/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lp_dtype {
    LP_F32 = 0, LP_BF16, LP_F16, LP_F64,
    LP_I8, LP_U8, LP_I16, LP_U16, LP_I32, LP_U32, LP_I64, LP_U64, LP_BOOL,
    LP_DTYPE_COUNT
} lp_dtype;

typedef enum lp_device { LP_CPU = 0, LP_CUDA = 1 } lp_device;

size_t lp_dtype_size(lp_dtype dt);
/* Safetensors spelling: "F32", "BF16", "I32", ... */
const char *lp_dtype_name(lp_dtype dt);
/* Parses the safetensors spelling; returns -1 if unknown. */
int lp_dtype_parse(const char *name);

#define LP_MAX_DIMS 6
typedef struct lp_tensor {
    void *data;
    lp_dtype dtype;
    lp_device device;
    int ndim;
    int64_t shape[LP_MAX_DIMS];
} lp_tensor;

int64_t lp_shape_numel(const int64_t *shape, int ndim);
/* Writes "[2, 16, 64]" into buf. */
const char *lp_shape_str(const int64_t *shape, int ndim, char *buf, size_t n);

/* bf16 and f16 <-> f32 on the host (round to nearest even). */
uint16_t lp_f32_to_bf16(float f);
float lp_bf16_to_f32(uint16_t h);
uint16_t lp_f32_to_f16(float f);
float lp_f16_to_f32(uint16_t h);
/* Converts n host values between F32, BF16 and F16 (src and dst must differ in memory). */
lp_status lp_convert_host(void *dst, lp_dtype dt, const void *src, lp_dtype st, size_t n);

typedef struct lp_ctx {
    lp_device device;
    lp_dtype dtype;      /* activation and weight dtype for ops on this context */
    int cuda_device;     /* ordinal, when device == LP_CUDA */
    void *stream;        /* cudaStream_t: compute */
    void *copy_stream;   /* cudaStream_t: device-to-host copies of captures */
    void *blas;          /* cublasHandle_t */
    unsigned long n_allocs; /* lp_ctx_alloc calls that succeeded: what a hot path must not add to */
    unsigned long n_d2h;    /* synchronous device-to-host reads (lp_ctx_to_host and the ops that
                             * return a host result): each stalls the GPU's stream */
} lp_ctx;

/* dtype must be LP_F32 on the CPU; LP_F32 or LP_BF16 on CUDA. A CUDA context opens device
 * (local rank % the devices this process sees): device 0 in one process. */
lp_status lp_ctx_init(lp_ctx *c, lp_device dev, lp_dtype dtype);
/* This process's rank among the job's processes on its machine (lp_dist_init sets it), so
 * that the ranks of a node with as many GPUs take one each; with fewer GPUs than ranks they
 * share (the launcher may also hand each rank its own through CUDA_VISIBLE_DEVICES, and then
 * each sees one). */
void lp_ctx_set_local_rank(int local_rank);
void lp_ctx_free(lp_ctx *c);
/* Memory on the context's device (64-byte aligned on the CPU). */
lp_status lp_ctx_alloc(lp_ctx *c, size_t bytes, void **p);
void lp_ctx_release(lp_ctx *c, void *p);
/* Host memory that the device copies into fast (pinned for CUDA, plain otherwise). */
lp_status lp_ctx_alloc_host(lp_ctx *c, size_t bytes, void **p);
void lp_ctx_release_host(lp_ctx *c, void *p);
lp_status lp_ctx_memset0(lp_ctx *c, void *p, size_t bytes);
lp_status lp_ctx_to_device(lp_ctx *c, void *dst, const void *src, size_t bytes);
/* n host floats into dst on c's device, converted to c's dtype (F32 on the CPU: a copy). */
lp_status lp_ctx_upload_f32(lp_ctx *c, void *dst, const float *src, size_t n);
lp_status lp_ctx_to_host(lp_ctx *c, void *dst, const void *src, size_t bytes);
/* to_device and to_host return when the copy is done; lp_ctx_copy (same device) is
 * ordered with later ops on the context but does not make the host wait. */
lp_status lp_ctx_copy(lp_ctx *c, void *dst, const void *src, size_t bytes);
/* Queues a device-to-host copy on the copy stream, ordered after the work queued so far
 * on the compute stream, so it overlaps later compute; done by the next lp_ctx_sync.
 * src must not change until then. On the CPU it copies at once. */
lp_status lp_ctx_to_host_async(lp_ctx *c, void *dst, const void *src, size_t bytes);
/* Queues a host-to-device copy on the copy stream, ordered after the work queued so far on
 * the compute stream (which may still read dst), so it overlaps later compute. The compute
 * stream must not read dst before lp_ctx_wait_copies; src (pinned: lp_ctx_alloc_host) must
 * not change until the copy is done (lp_ctx_sync). On the CPU it copies at once. */
lp_status lp_ctx_to_device_async(lp_ctx *c, void *dst, const void *src, size_t bytes);
/* Orders the work queued after it on the compute stream behind every copy queued so far on
 * the copy stream; the host does not wait. */
lp_status lp_ctx_wait_copies(lp_ctx *c);
lp_status lp_ctx_sync(lp_ctx *c);

/* 1 if a usable CUDA device is present; otherwise 0 and the reason in why. */
int lp_cuda_available(char *why, size_t n);

#ifdef __cplusplus
}
#endif
#endif
