// sae_common.cuh: what the SAE kernel files (sae.cu, sae_select.cu) share.
#ifndef LOUPE_SAE_COMMON_CUH
#define LOUPE_SAE_COMMON_CUH

#include "common.cuh"

static lp_status sm_count(lp_ctx *c, int *n) {
    LP_CUDA_CHECK(cudaDeviceGetAttribute(n, cudaDevAttrMultiProcessorCount, c->cuda_device));
    return LP_OK;
}

__device__ __forceinline__ float relu_f(float v) { return v > 0.0f ? v : 0.0f; }

#endif
