// test_cuda_emu.cu: the emulator's own tests. Each check it claims (cuda_runtime.h) is shown
// to fire on a kernel with that bug, and to stay quiet on the corrected kernel: a test of a
// harness that cannot fail would prove nothing about the kernels it runs.
// Built only into build/emu/ (C++, the emulated headers, ASan + UBSan).
#include <criterion/criterion.h>
#include <criterion/redirect.h>
#include <signal.h>
#include <stdlib.h>

#include "cublasLt.h"
#include "cublas_v2.h"
#include "cuda_runtime.h"
#include "mma.h"

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

// ---- WMMA (mma.h): 16x16x16, bf16 operands, fp32 accumulator ----
using namespace nvcuda;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> wa_t;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> wc_t;

// d = a b + c, with a row-major (ldm lda), b row- or column-major (ldm 16), c and d in the
// layout asked for; two warps, each on its own tile (warp w reads a + w * 16 rows).
__global__ void wmma_kernel(float *d, const __nv_bfloat16 *a, int lda, const __nv_bfloat16 *b, const float *c,
                            int b_col, int d_col) {
    const int w = threadIdx.x >> 5;
    wa_t fa;
    wc_t fc;
    wmma::load_matrix_sync(fa, a + w * 16 * lda, lda);
    wmma::load_matrix_sync(fc, c, 16, wmma::mem_row_major);
    if (b_col) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, b, 16);
        wmma::mma_sync(fc, fa, fb, fc);
    } else {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, b, 16);
        wmma::mma_sync(fc, fa, fb, fc);
    }
    for (int i = 0; i < fc.num_elements; i++) fc.x[i] *= 2.0f; // element-wise: the same for every element
    wmma::store_matrix_sync(d + w * 256, fc, 16, d_col ? wmma::mem_col_major : wmma::mem_row_major);
}

static __nv_bfloat16 *dev_bf16(const float *h, size_t n) {
    void *p = nullptr;
    cr_assert_eq(cudaMalloc(&p, n * 2), cudaSuccess);
    __nv_bfloat16 *tmp = (__nv_bfloat16 *)malloc(n * 2);
    for (size_t i = 0; i < n; i++) tmp[i] = __float2bfloat16_rn(h[i]);
    cudaMemcpy(p, tmp, n * 2, cudaMemcpyHostToDevice);
    free(tmp);
    return (__nv_bfloat16 *)p;
}

// Small integers: every product and sum is exact, so the result must equal the loop exactly,
// in each combination of layouts.
Test(cuda_emu, wmma_mma_is_right) {
    const int lda = 24;
    static float ha[32 * lda], hb[256], hc[256], got[512];
    for (int i = 0; i < 32 * lda; i++) ha[i] = (float)((i * 7) % 9) - 4;
    for (int i = 0; i < 256; i++) hb[i] = (float)((i * 5) % 7) - 3, hc[i] = (float)(i % 11) - 5;
    __nv_bfloat16 *a = dev_bf16(ha, 32 * lda), *b = dev_bf16(hb, 256);
    float *c = dev_floats(256), *d = dev_floats(512);
    cudaMemcpy(c, hc, sizeof hc, cudaMemcpyHostToDevice);
    for (int b_col = 0; b_col < 2; b_col++)
        for (int d_col = 0; d_col < 2; d_col++) {
            LP_LAUNCH(1, 64, 0, 0, wmma_kernel)(d, a, lda, b, c, b_col, d_col);
            cr_assert_eq(cudaGetLastError(), cudaSuccess);
            cudaMemcpy(got, d, sizeof got, cudaMemcpyDeviceToHost);
            for (int w = 0; w < 2; w++)
                for (int i = 0; i < 16; i++)
                    for (int j = 0; j < 16; j++) {
                        float s = hc[i * 16 + j];
                        for (int k = 0; k < 16; k++)
                            s += ha[(w * 16 + i) * lda + k] * (b_col ? hb[j * 16 + k] : hb[k * 16 + j]);
                        const float g = got[w * 256 + (d_col ? j * 16 + i : i * 16 + j)];
                        cr_expect_float_eq(g, 2 * s, 0.0f, "b_col %d d_col %d warp %d D[%d][%d]", b_col, d_col, w, i, j);
                    }
        }
    cudaFree(a), cudaFree(b), cudaFree(c), cudaFree(d);
}

// Shared memory staged by the block, then read by WMMA after a barrier: right; without the
// barrier the tile is still 0xFF (NaN) when the second warp loads it.
__global__ void wmma_shared_kernel(float *d, const __nv_bfloat16 *a, int barrier) {
    LP_SHARED(__nv_bfloat16, as, [256]);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (w == 1)
        for (int i = lane; i < 256; i += 32) as[i] = a[i];
    if (barrier) __syncthreads();
    if (w == 0) {
        wa_t fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
        wc_t fc;
        wmma::fill_fragment(fc, 0.0f);
        wmma::load_matrix_sync(fa, as, 16);
        wmma::load_matrix_sync(fb, as, 16);
        wmma::mma_sync(fc, fa, fb, fc);
        wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
    }
}
Test(cuda_emu, wmma_reads_shared_memory_after_a_barrier) {
    static float ha[256], got[256];
    for (int i = 0; i < 256; i++) ha[i] = (float)(i % 3) - 1;
    __nv_bfloat16 *a = dev_bf16(ha, 256);
    float *d = dev_floats(256);
    for (int barrier = 1; barrier >= 0; barrier--) {
        LP_LAUNCH(1, 64, 0, 0, wmma_shared_kernel)(d, a, barrier);
        cudaMemcpy(got, d, sizeof got, cudaMemcpyDeviceToHost);
        int nan = 0;
        for (int i = 0; i < 256; i++) nan += isnan(got[i]);
        if (barrier) cr_expect_eq(nan, 0);
        else cr_expect_eq(nan, 256, "a missing barrier must show as NaN (%d of 256)", nan);
    }
    cudaFree(a), cudaFree(d);
}

// Lanes write a tile, then the warp loads it: without __syncwarp the first lanes read
// before the others wrote.
__global__ void wmma_syncwarp_kernel(float *d, int sync) {
    LP_SHARED(__nv_bfloat16, as, [256]);
    const int lane = threadIdx.x & 31;
    for (int i = lane; i < 256; i += 32) as[i] = __float2bfloat16_rn((float)(i % 5));
    if (sync) __syncwarp();
    wa_t fa;
    wmma::load_matrix_sync(fa, as, 16);
    d[lane] = __bfloat162float(fa.x[lane]);
}
Test(cuda_emu, wmma_load_after_syncwarp_runs) {
    float *d = dev_floats(32);
    LP_LAUNCH(1, 32, 0, 0, wmma_syncwarp_kernel)(d, 1);
    cr_expect_float_eq(get1(d, 7), 2.0f, 0.0f);
    cudaFree(d);
}
Test(cuda_emu, wmma_load_without_syncwarp_is_reported, .signal = SIGABRT, .init = quiet) {
    float *d = dev_floats(32);
    LP_LAUNCH(1, 32, 0, 0, wmma_syncwarp_kernel)(d, 0);
}

// The checks: a lane missing, a misaligned pointer, a bad ldm, lanes that disagree.
__global__ void wmma_bug_kernel(float *d, const __nv_bfloat16 *a, int bug) {
    const int lane = threadIdx.x & 31;
    if (bug == 0 && lane >= 16) return; // half the warp leaves
    wa_t fa;
    wc_t fc;
    wmma::fill_fragment(fc, 0.0f);
    const __nv_bfloat16 *p = bug == 1 ? a + 8 : a; // 16 bytes off the 32-byte alignment
    const unsigned ldm = bug == 2 ? 20 : (bug == 3 && lane == 5 ? 32 : 16);
    wmma::load_matrix_sync(fa, p, ldm);
    if (bug == 4 && lane == 3) fc.x[0] = 1.0f; // assumes one lane holds element 0
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::load_matrix_sync(fb, a, 16);
    wmma::mma_sync(fc, fa, fb, fc);
    wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}
static void wmma_bug(int bug) {
    static float ha[1024];
    __nv_bfloat16 *a = dev_bf16(ha, 1024);
    float *d = dev_floats(256);
    LP_LAUNCH(1, 32, 0, 0, wmma_bug_kernel)(d, a, bug);
}
Test(cuda_emu, wmma_without_bugs_runs) { wmma_bug(-1); }
Test(cuda_emu, wmma_with_half_a_warp_is_reported, .signal = SIGABRT, .init = quiet) { wmma_bug(0); }
Test(cuda_emu, wmma_misaligned_pointer_is_reported, .signal = SIGABRT, .init = quiet) { wmma_bug(1); }
Test(cuda_emu, wmma_bad_ldm_is_reported, .signal = SIGABRT, .init = quiet) { wmma_bug(2); }
Test(cuda_emu, wmma_lanes_with_different_ldm_are_reported, .signal = SIGABRT, .init = quiet) { wmma_bug(3); }
Test(cuda_emu, wmma_lane_dependent_fragment_is_reported, .signal = SIGABRT, .init = quiet) { wmma_bug(4); }

// ---- cuBLASLt epilogues ----
// D[m,n] = A[m,k] B[k,n] + bias[m], then GELU (tanh form), the value before it to aux.
static cublasStatus_t lt_run(int m, int n, int k, const float *A, const float *B, const float *bias, float *D,
                             float *aux, int64_t aux_ld, cublasLtEpilogue_t ep) {
    cublasLtHandle_t h;
    cublasLtCreate(&h);
    cublasLtMatmulDesc_t d;
    cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep);
    if (bias) cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    if (aux) {
        cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof aux);
        cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof aux_ld);
    }
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, m, k, m);
    cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, k, n, k);
    cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, m, n, m);
    const float one = 1, zero = 0;
    cublasStatus_t s = cublasLtMatmul(h, d, &one, A, la, B, lb, &zero, D, lc, D, lc, nullptr, nullptr, 0, 0);
    cublasLtMatrixLayoutDestroy(la), cublasLtMatrixLayoutDestroy(lb), cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(d);
    cublasLtDestroy(h);
    return s;
}
Test(cuda_emu, cublaslt_bias_and_gelu_epilogues) {
    const int m = 8, n = 3, k = 5;
    float hA[m * k], hB[k * n], hb[m], pre[m * n], got[m * n], gaux[m * n];
    for (int i = 0; i < m * k; i++) hA[i] = (float)(i % 5) - 2;
    for (int i = 0; i < k * n; i++) hB[i] = (float)(i % 3) - 1;
    for (int i = 0; i < m; i++) hb[i] = 0.25f * (float)i - 1.0f;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            float s = hb[i];
            for (int p = 0; p < k; p++) s += hA[p * m + i] * hB[j * k + p];
            pre[j * m + i] = s;
        }
    float *A = dev_floats(m * k), *B = dev_floats(k * n), *bias = dev_floats(m), *D = dev_floats(m * n),
          *aux = dev_floats(m * n);
    cudaMemcpy(A, hA, sizeof hA, cudaMemcpyHostToDevice);
    cudaMemcpy(B, hB, sizeof hB, cudaMemcpyHostToDevice);
    cudaMemcpy(bias, hb, sizeof hb, cudaMemcpyHostToDevice);
    cr_assert_eq(lt_run(m, n, k, A, B, bias, D, nullptr, 0, CUBLASLT_EPILOGUE_BIAS), CUBLAS_STATUS_SUCCESS);
    cudaMemcpy(got, D, sizeof got, cudaMemcpyDeviceToHost);
    for (int i = 0; i < m * n; i++) cr_expect_float_eq(got[i], pre[i], 0.0f, "bias: D[%d]", i);
    cr_assert_eq(lt_run(m, n, k, A, B, bias, D, aux, m, CUBLASLT_EPILOGUE_GELU_AUX_BIAS), CUBLAS_STATUS_SUCCESS);
    cudaMemcpy(got, D, sizeof got, cudaMemcpyDeviceToHost);
    cudaMemcpy(gaux, aux, sizeof gaux, cudaMemcpyDeviceToHost);
    for (int i = 0; i < m * n; i++) {
        const double x = pre[i], g = 0.5 * x * (1 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
        cr_expect_float_eq(gaux[i], pre[i], 0.0f, "gelu: aux[%d]", i);
        cr_expect_float_eq(got[i], (float)g, 1e-6f * (1 + fabs(g)), "gelu: D[%d] %g vs %g", i, got[i], g);
    }
    // a bias epilogue without its pointer is refused; an aux ld cuBLASLt cannot take is "not supported"
    quiet();
    cr_expect_eq(lt_run(m, n, k, A, B, nullptr, D, nullptr, 0, CUBLASLT_EPILOGUE_BIAS), CUBLAS_STATUS_INVALID_VALUE);
    cr_expect_eq(lt_run(m, n, k, A, B, bias, D, aux, m - 1, CUBLASLT_EPILOGUE_GELU_AUX_BIAS), CUBLAS_STATUS_INVALID_VALUE);
    float *aux2 = dev_floats(12 * n);
    cr_expect_eq(lt_run(m, n, k, A, B, bias, D, aux2, 12, CUBLASLT_EPILOGUE_GELU_AUX_BIAS), CUBLAS_STATUS_NOT_SUPPORTED);
    cudaFree(A), cudaFree(B), cudaFree(bias), cudaFree(D), cudaFree(aux), cudaFree(aux2);
}

// A stream with an NCCL call still in progress on it (nccl.cpp marks it so) takes no work:
// on a GPU the collective might not be enqueued yet. Done, the stream is free again.
Test(cuda_emu, work_behind_an_nccl_call_in_progress_is_reported, .signal = SIGABRT, .init = quiet) {
    cudaStream_t s;
    cudaEvent_t e;
    cudaStreamCreate(&s);
    cudaEventCreate(&e);
    lp_emu::stream_nccl_pending(s, +1);
    lp_emu::stream_nccl_pending(s, -1);
    cr_assert_eq(cudaEventRecord(e, s), cudaSuccess);
    cr_assert_eq(cudaStreamQuery(s), cudaSuccess);
    lp_emu::stream_nccl_pending(s, +1);
    cudaEventRecord(e, s);
}

// Each process its own PCI bus (from the launcher's rank), unless LOUPE_EMU_PCI_BUS names one.
Test(cuda_emu, pci_bus_per_rank_or_shared) {
    char a[32], b[32], c[32];
    unsetenv("LOUPE_EMU_PCI_BUS");
    setenv("OMPI_COMM_WORLD_RANK", "0", 1);
    cr_assert_eq(cudaDeviceGetPCIBusId(a, sizeof a, 0), cudaSuccess);
    setenv("OMPI_COMM_WORLD_RANK", "1", 1);
    cr_assert_eq(cudaDeviceGetPCIBusId(b, sizeof b, 0), cudaSuccess);
    cr_assert_str_neq(a, b);
    cr_assert_str_eq(a, "0000:01:00.0");
    setenv("LOUPE_EMU_PCI_BUS", "7", 1);
    cr_assert_eq(cudaDeviceGetPCIBusId(c, sizeof c, 0), cudaSuccess);
    setenv("OMPI_COMM_WORLD_RANK", "0", 1);
    cr_assert_eq(cudaDeviceGetPCIBusId(a, sizeof a, 0), cudaSuccess);
    cr_assert_str_eq(a, c);
    cr_assert_str_eq(c, "0000:07:00.0");
}
