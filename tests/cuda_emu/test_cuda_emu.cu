// test_cuda_emu.cu: the emulator's own tests. Each check it claims (cuda_runtime.h) is shown
// to fire on a kernel with that bug, and to stay quiet on the corrected kernel: a test of a
// harness that cannot fail would prove nothing about the kernels it runs.
// Built only into build/emu/ (C++, the emulated headers, ASan + UBSan).
#include <criterion/criterion.h>
#include <criterion/redirect.h>
#include <signal.h>
#include <stdlib.h>

#include "cublas_v2.h"
#include "cuda_runtime.h"

#define FULL 0xffffffffu

// The tests that expect a report silence it (LOUPE_EMU_LOUD=1 shows it): the signal or exit
// status is checked here, the text by reading it.
static void quiet(void) {
    if (!getenv("LOUPE_EMU_LOUD")) cr_redirect_stderr();
}

static float *dev_floats(size_t n) {
    void *p = nullptr;
    cr_assert_eq(cudaMalloc(&p, n * sizeof(float)), cudaSuccess);
    cr_assert_eq(cudaMemset(p, 0, n * sizeof(float)), cudaSuccess);
    return (float *)p;
}
static float get1(const float *d, size_t i) {
    float v;
    cr_assert_eq(cudaMemcpy(&v, d + i, 4, cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
}

// ---- barriers ----
__global__ void block_sum_kernel(float *out) {
    LP_SHARED(float, sh, [32]);
    float v = (float)threadIdx.x;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0;
        for (unsigned w = 0; w < blockDim.x / 32; w++) s += sh[w];
        out[blockIdx.x] = s;
    }
}
Test(cuda_emu, block_sum_is_right) {
    float *d = dev_floats(3);
    LP_LAUNCH(3, 256, 0, 0, block_sum_kernel)(d);
    cr_assert_eq(cudaGetLastError(), cudaSuccess);
    for (int b = 0; b < 3; b++) cr_expect_float_eq(get1(d, b), 255.0f * 256 / 2, 0.0f);
    cudaFree(d);
}

__global__ void divergent_barrier_kernel(float *out) {
    if (threadIdx.x < 16) __syncthreads(); // threads 16.. go on to the next barrier
    __syncthreads();
    out[threadIdx.x] = 1;
}
Test(cuda_emu, divergent_barrier_is_reported, .signal = SIGABRT, .init = quiet) {
    float *d = dev_floats(64);
    LP_LAUNCH(1, 64, 0, 0, divergent_barrier_kernel)(d);
}

// Threads that exited do not hold a barrier up (sm_70 and later): not an error.
__global__ void exited_threads_kernel(float *out, int n) {
    if ((int)threadIdx.x >= n) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
Test(cuda_emu, exited_threads_release_the_barrier) {
    float *d = dev_floats(40);
    LP_LAUNCH(1, 64, 0, 0, exited_threads_kernel)(d, 40);
    cr_expect_float_eq(get1(d, 39), 1.0f, 0.0f);
    cudaFree(d);
}

// ---- warp masks ----
__global__ void warp_sum_after_exit_kernel(float *out) {
    if ((threadIdx.x & 31) >= 16) return;
    float v = 1;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o); // names the exited lanes
    out[threadIdx.x] = v;
}
Test(cuda_emu, full_mask_over_exited_lanes_is_reported, .signal = SIGABRT, .init = quiet) {
    float *d = dev_floats(32);
    LP_LAUNCH(1, 32, 0, 0, warp_sum_after_exit_kernel)(d);
}

__global__ void half_warp_sum_kernel(float *out) {
    if ((threadIdx.x & 31) >= 16) return;
    float v = 1;
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0x0000ffffu, v, o);
    out[threadIdx.x] = v;
}
Test(cuda_emu, right_mask_over_half_a_warp) {
    float *d = dev_floats(32);
    LP_LAUNCH(1, 32, 0, 0, half_warp_sum_kernel)(d);
    cr_expect_float_eq(get1(d, 5), 16.0f, 0.0f);
    cudaFree(d);
}

__global__ void partial_warp_kernel(float *out) {
    out[threadIdx.x] = __shfl_sync(FULL, (float)threadIdx.x, 0);
}
Test(cuda_emu, full_mask_in_a_partial_warp_is_reported, .signal = SIGABRT, .init = quiet) {
    float *d = dev_floats(48);
    LP_LAUNCH(1, 48, 0, 0, partial_warp_kernel)(d); // the second warp has 16 lanes
}

__global__ void ballot_match_kernel(unsigned *out) {
    const unsigned lane = threadIdx.x & 31;
    out[0 + lane] = __ballot_sync(FULL, lane % 3 == 0);
    out[32 + lane] = __match_any_sync(FULL, (int)(lane / 8));
    out[64 + lane] = __shfl_up_sync(FULL, lane, 1);
}
Test(cuda_emu, ballot_match_and_shfl_up) {
    unsigned *d = (unsigned *)dev_floats(96), h[96];
    LP_LAUNCH(1, 32, 0, 0, ballot_match_kernel)(d);
    cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
    cr_expect_eq(h[7], 0x49249249u);
    cr_expect_eq(h[32 + 9], 0x0000ff00u);
    cr_expect_eq(h[64 + 0], 0u);
    cr_expect_eq(h[64 + 5], 4u);
    cudaFree(d);
}

// ---- shared and device memory ----
__global__ void shared_overrun_kernel(float *out) {
    LP_SHARED(float, sh, [32]);
    sh[threadIdx.x] = 1; // 64 threads, 32 slots
    __syncthreads();
    out[threadIdx.x] = sh[threadIdx.x];
}
Test(cuda_emu, static_shared_overrun_is_caught, .exit_code = 1, .init = quiet) {
    float *d = dev_floats(64);
    LP_LAUNCH(1, 64, 0, 0, shared_overrun_kernel)(d);
}

__global__ void dynamic_shared_kernel(float *out, int n) {
    LP_DYNAMIC_SHARED(float, sm);
    sm[threadIdx.x] = 2;
    __syncthreads();
    out[threadIdx.x] = sm[n - 1 - threadIdx.x];
}
Test(cuda_emu, dynamic_shared_sized_by_the_launch) {
    float *d = dev_floats(32);
    LP_LAUNCH(1, 32, 32 * sizeof(float), 0, dynamic_shared_kernel)(d, 32);
    cr_expect_float_eq(get1(d, 0), 2.0f, 0.0f);
    cudaFree(d);
}
Test(cuda_emu, dynamic_shared_overrun_is_caught, .exit_code = 1, .init = quiet) {
    float *d = dev_floats(32);
    LP_LAUNCH(1, 32, 31 * sizeof(float), 0, dynamic_shared_kernel)(d, 32); // one float short
}

__global__ void uninit_shared_kernel(float *out) {
    LP_SHARED(float, sh, [32]);
    out[threadIdx.x] = sh[threadIdx.x]; // never written
}
Test(cuda_emu, uninitialised_shared_reads_nan) {
    float *d = dev_floats(32);
    LP_LAUNCH(1, 32, 0, 0, uninit_shared_kernel)(d);
    cr_expect(isnan(get1(d, 3)));
    cudaFree(d);
}

__global__ void unguarded_kernel(float *out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    (void)n; // missing `if (i < n)`
    out[i] = 1;
}
Test(cuda_emu, missing_bound_on_the_last_block_is_caught, .exit_code = 1, .init = quiet) {
    float *d = dev_floats(100);
    LP_LAUNCH(2, 64, 0, 0, unguarded_kernel)(d, 100);
}

Test(cuda_emu, host_pointer_argument_is_reported, .signal = SIGABRT, .init = quiet) {
    static float host[128];
    LP_LAUNCH(2, 64, 0, 0, unguarded_kernel)(host, 128);
}

Test(cuda_emu, copy_in_the_wrong_direction_is_reported, .signal = SIGABRT, .init = quiet) {
    float *d = dev_floats(4), h[4] = {0};
    cudaMemcpy(d, h, sizeof h, cudaMemcpyDeviceToHost); // dst is device memory
}

Test(cuda_emu, too_many_threads_is_a_launch_error) {
    float *d = dev_floats(4);
    LP_LAUNCH(1, 2048, 0, 0, unguarded_kernel)(d, 4);
    cr_expect_eq(cudaGetLastError(), cudaErrorInvalidConfiguration);
    cr_expect_eq(cudaGetLastError(), cudaSuccess);
    cudaFree(d);
}

Test(cuda_emu, memory_of_another_device_is_reported, .signal = SIGABRT, .init = quiet) {
    setenv("LOUPE_EMU_DEVICES", "2", 1);
    cr_assert_eq(cudaSetDevice(1), cudaSuccess);
    float *d = dev_floats(128);
    cudaSetDevice(0);
    LP_LAUNCH(2, 64, 0, 0, unguarded_kernel)(d, 128);
}

// ---- cuBLAS ----
// C[m,n] = A[m,k] B[k,n], column-major, against a direct loop.
Test(cuda_emu, gemm_transposes_and_leading_dimensions) {
    const int m = 3, n = 4, k = 5, lda = 7;
    float hA[lda * m], hB[k * n], ref[m * n];
    for (int i = 0; i < lda * m; i++) hA[i] = (float)(i % 5) - 2;
    for (int i = 0; i < k * n; i++) hB[i] = (float)(i % 3) - 1;
    // A stored transposed: op(A) = T, storage k x m with lda = 7
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float s = 0;
            for (int p = 0; p < k; p++) s += hA[i * lda + p] * hB[j * k + p];
            ref[j * m + i] = s;
        }
    float *A = dev_floats(lda * m), *B = dev_floats(k * n), *C = dev_floats(m * n), got[m * n];
    cudaMemcpy(A, hA, sizeof hA, cudaMemcpyHostToDevice);
    cudaMemcpy(B, hB, sizeof hB, cudaMemcpyHostToDevice);
    cublasHandle_t h;
    cublasCreate(&h);
    const float one = 1, zero = 0;
    cr_assert_eq(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, A, CUDA_R_32F, lda, B, CUDA_R_32F, k, &zero,
                              C, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 CUBLAS_STATUS_SUCCESS);
    cudaMemcpy(got, C, sizeof got, cudaMemcpyDeviceToHost);
    for (int i = 0; i < m * n; i++) cr_expect_float_eq(got[i], ref[i], 0.0f, "C[%d]", i);
    // lda below the rows of A's storage (k) is what cuBLAS rejects
    cr_expect_eq(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, A, CUDA_R_32F, k - 1, B, CUDA_R_32F, k,
                              &zero, C, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 CUBLAS_STATUS_INVALID_VALUE);
    cublasDestroy(h);
}

Test(cuda_emu, gemm_operand_past_its_allocation_is_reported, .signal = SIGABRT, .init = quiet) {
    const int m = 3, n = 4, k = 5;
    float *A = dev_floats(m * k), *B = dev_floats(k * n), *C = dev_floats(m * n);
    cublasHandle_t h;
    cublasCreate(&h);
    const float one = 1, zero = 0;
    // m and n swapped: C is read as 4 x 4 with ldc 4, past its 12 floats
    cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, k, &one, A, CUDA_R_32F, n, B, CUDA_R_32F, k, &zero, C, CUDA_R_32F,
                 n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
