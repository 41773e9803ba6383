// sae.cu: the SAE ops of include/loupe/sae_ops.h on the GPU. Every buffer is float (F32
// master weights) whatever c->dtype; the CPU twins are in host/cpu/sae.c, whose comments
// and host/ops/sae_ops.c's state the contracts (selection order, edge cases).
//
// Design, op by op:
//  - matmul_at: one cuBLAS GEMM, CUBLAS_COMPUTE_32F (the handle never allows TF32).
//  - col_sum, the JumpReLU threshold gradient and dense fire counts are column
//    reductions: a block owns 32 columns and a slice of rows (32 x 8 threads, coalesced
//    rows), sums in fp32 and folds its 8 partial sums in shared memory. When the columns
//    alone give too few blocks to fill the GPU (d_in = 768: 24 blocks) the rows are split
//    over grid.y and the partial sums meet by atomicAdd, so the summation order (not the
//    set of terms) varies from run to run; with one row slice the result is deterministic.
//  - topk and kth_largest (the BatchTopK threshold): sae_select.cu.
//    the host reads one float at the end.
//  - decode_sparse: one block per token, threads across d (coalesced reads of the K
//    active rows of W), the K (index, value) pairs in shared memory.
//  - decode_sparse_grad: one block per token, a warp per active latent: one pass over
//    the row gives the dot product dout . W[idx] (warp reduction) and the atomicAdds of
//    val * dout into dW[idx] (coalesced across the warp).
//  - encode_sparse_grad: one block per token; consecutive threads take consecutive
//    latents at the same d, so a warp's atomics land in one row d of dW_enc [D,S] (32
//    scattered words of one row rather than 32 rows of one column).
//  - encode_sparse_input_grad (dx = dpre W_enc[:, idx]^T): a block per token, a thread per
//    d gathering K scattered words of row d of W_enc.
//  - recon_sums: per-token sums in double (a warp per token) and the batch variance per
//    column in double (shifted by the column's first value), added into four device
//    doubles by atomicAdd: fp64 throughout, only the order of the final sum differs from
//    the CPU.
//  - kth_largest and recon_sums keep their few words of scratch in module-level device
//    variables (no allocation per call): two such calls must not run concurrently on one
//    device from different streams.
#include "sae_common.cuh"
#include "ops/sae_track_internal.h"

static const unsigned kBlock = 256;    // element-wise and row kernels
static const int kChunk = 256;         // (index, value) pairs staged per block in shared memory
static const int kColRows = 8;         // rows of threads in a column-reduction block
static const int kMinRowsPerSlice = 64;

// ---- helpers ----------------------------------------------------------------------------

// Row slices (grid.y) for a column reduction over `rows` rows and `tiles` 32-column tiles:
// enough blocks for about two per SM, each slice at least kMinRowsPerSlice rows.
static lp_status col_split(lp_ctx *c, int rows, int tiles, int *slices, int *rows_per) {
    int sms = 0;
    lp_status st = sm_count(c, &sms);
    if (st != LP_OK) return st;
    long long want = (2LL * sms + tiles - 1) / tiles;
    long long most = (rows + kMinRowsPerSlice - 1) / kMinRowsPerSlice;
    long long y = want < most ? want : most;
    if (y < 1) y = 1;
    if (y > 65535) y = 65535;
    *rows_per = (int)((rows + y - 1) / y);
    *slices = (rows + *rows_per - 1) / *rows_per;
    return LP_OK;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LP_FULL_MASK, v, o);
    return v;
}

// ---- matmul_at ---------------------------------------------------------------------------
// Row-major out[K,M] is column-major [M,K] = out^T = b^T a:
//   b row-major [N,M] = column-major [M,N]            -> op N, ld M
//   a row-major [N,K] = column-major [K,N]; need [N,K] -> op T, ld K

lp_status cuda_matmul_at(lp_ctx *c, float *out, const float *a, const float *b, int N, int K, int M,
                            float beta) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_matmul_at");
    LP_CUDA_REQUIRE(N > 0 && K > 0 && M > 0 && out && a && b, "cuda_matmul_at: bad arguments");
    LP_CUDA_REQUIRE(c->blas != NULL, "cuda_matmul_at: context has no cuBLAS handle");
    const float alpha = 1.0f;
    LP_CUBLAS_CHECK(cublasGemmEx((cublasHandle_t)c->blas, CUBLAS_OP_N, CUBLAS_OP_T, M, K, N, &alpha,
                                 b, CUDA_R_32F, M, a, CUDA_R_32F, K, &beta, out, CUDA_R_32F, M,
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return LP_OK;
}

// ---- column reductions -------------------------------------------------------------------

// out[m] = beta * out[m] + sum_n x[n,m] over this block's row slice. With `atomic` the
// slices meet by atomicAdd (out was pre-scaled by beta); else there is one slice.
__global__ void col_sum_kernel(float *out, const float *x, int N, int M, int rows_per, float beta, int atomic) {
    LP_SHARED(float, sh, [kColRows][33]);
    const int col = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per, r1 = min(N, r0 + rows_per);
    float acc = 0.0f;
    if (col < M) {
#pragma unroll 4
        for (int r = r0 + threadIdx.y; r < r1; r += kColRows) acc += x[(size_t)r * M + col];
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < M) {
        float s = 0.0f;
#pragma unroll
        for (int y = 0; y < kColRows; y++) s += sh[y][threadIdx.x];
        if (atomic) atomicAdd(&out[col], s);
        else out[col] = (beta != 0.0f ? out[col] : 0.0f) + s;
    }
}

lp_status cuda_col_sum(lp_ctx *c, float *out, const float *x, int N, int M, float beta) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_col_sum");
    LP_CUDA_REQUIRE(N > 0 && M > 0 && out && x, "cuda_col_sum: bad arguments");
    const int tiles = (M + 31) / 32;
    int slices, rows_per;
    lp_status st = col_split(c, N, tiles, &slices, &rows_per);
    if (st != LP_OK) return st;
    const int atomic = slices > 1;
    if (atomic && beta == 0.0f) LP_CUDA_CHECK(cudaMemsetAsync(out, 0, (size_t)M * sizeof(float), cuda_stream_of(c)));
    LP_LAUNCH(dim3(tiles, slices), dim3(32, kColRows), 0, cuda_stream_of(c), col_sum_kernel)(out, x, N, M, rows_per, beta,
                                                                                  atomic);
    LP_LAUNCH_CHECK("col_sum_kernel");
    return LP_OK;
}

// ---- sparse decode -----------------------------------------------------------------------

// out[n,:] = bias + sum_j val[n,j] W[idx[n,j],:]. One block per token n, threads across d;
// the pairs are staged kChunk at a time. Terms are added in j order, like the CPU.
__global__ void decode_sparse_kernel(float *out, const int32_t *idx, const float *val, const float *W,
                                     const float *bias, int K, int D) {
    LP_SHARED(int32_t, si, [kChunk]);
    LP_SHARED(float, sv, [kChunk]);
    const size_t n = blockIdx.x;
    for (int d0 = 0; d0 < D; d0 += blockDim.x) { // block-uniform: the barriers below are safe
        const int d = d0 + threadIdx.x;
        float acc = (bias && d < D) ? bias[d] : 0.0f;
        for (int j0 = 0; j0 < K; j0 += kChunk) {
            const int nj = min(kChunk, K - j0);
            __syncthreads();
            for (int j = threadIdx.x; j < nj; j += blockDim.x) {
                si[j] = idx[n * K + j0 + j];
                sv[j] = val[n * K + j0 + j];
            }
            __syncthreads();
            if (d < D) {
#pragma unroll 8
                for (int j = 0; j < nj; j++) acc = fmaf(sv[j], W[(size_t)si[j] * D + d], acc);
            }
        }
        if (d < D) out[n * D + d] = acc;
    }
}

lp_status cuda_sae_decode_sparse(lp_ctx *c, float *out, const int32_t *idx, const float *val,
                                    const float *W, const float *bias, int N, int K, int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_decode_sparse");
    LP_CUDA_REQUIRE(N > 0 && K >= 1 && D > 0 && out && idx && val && W,
                    "cuda_sae_decode_sparse: bad arguments (N=%d K=%d D=%d)", N, K, D);
    const unsigned block = D >= (int)kBlock ? kBlock : (unsigned)((D + 31) / 32 * 32);
    LP_LAUNCH((unsigned)N, block, 0, cuda_stream_of(c), decode_sparse_kernel)(out, idx, val, W, bias, K, D);
    LP_LAUNCH_CHECK("decode_sparse_kernel");
    return LP_OK;
}

// dval[n,j] = dout[n,:] . W[idx[n,j],:] and dW[idx[n,j],:] += val[n,j] dout[n,:]. One block
// per token, one warp per active latent, both in the same pass over the row.
__global__ void decode_sparse_grad_kernel(float *dval, float *dW, const float *dout, const int32_t *idx,
                                          const float *val, const float *W, int K, int D) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const size_t n = blockIdx.x;
    const float *g = dout + n * D;
    for (int j = warp; j < K; j += nwarps) { // warp-uniform
        const size_t e = n * K + j;
        const size_t row = (size_t)idx[e] * D;
        const float v = val[e];
        float dot = 0.0f;
        for (int d = lane; d < D; d += 32) {
            const float gd = g[d];
            dot = fmaf(gd, W[row + d], dot);
            atomicAdd(&dW[row + d], v * gd);
        }
        dot = warp_sum(dot);
        if (lane == 0) dval[e] = dot;
    }
}

lp_status cuda_sae_decode_sparse_grad(lp_ctx *c, float *dval, float *dW, const float *dout,
                                         const int32_t *idx, const float *val, const float *W, int N,
                                         int K, int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_decode_sparse_grad");
    LP_CUDA_REQUIRE(N > 0 && K >= 1 && D > 0 && dval && dW && dout && idx && val && W,
                    "cuda_sae_decode_sparse_grad: bad arguments (N=%d K=%d D=%d)", N, K, D);
    const unsigned warps = K >= 8 ? 8 : (unsigned)K;
    LP_LAUNCH((unsigned)N, 32 * warps, 0, cuda_stream_of(c), decode_sparse_grad_kernel)(dval, dW, dout, idx, val, W, K, D);
    LP_LAUNCH_CHECK("decode_sparse_grad_kernel");
    return LP_OK;
}

// dW_enc[d, idx[n,j]] += x[n,d] dpre[n,j] and db_enc[idx[n,j]] += dpre[n,j]. One block per
// token; t = d * nj + j, so consecutive threads take consecutive latents of the same d.
__global__ void encode_sparse_grad_kernel(float *dW, float *db, const float *x, const int32_t *idx,
                                          const float *dpre, int K, int D, int S) {
    LP_SHARED(int32_t, si, [kChunk]);
    LP_SHARED(float, sd, [kChunk]);
    const size_t n = blockIdx.x;
    const float *xr = x + n * D;
    for (int j0 = 0; j0 < K; j0 += kChunk) {
        const int nj = min(kChunk, K - j0);
        __syncthreads();
        for (int j = threadIdx.x; j < nj; j += blockDim.x) {
            si[j] = idx[n * K + j0 + j];
            sd[j] = dpre[n * K + j0 + j];
        }
        __syncthreads();
        for (int j = threadIdx.x; j < nj; j += blockDim.x) atomicAdd(&db[si[j]], sd[j]);
        const int total = nj * D;
        for (int t = threadIdx.x; t < total; t += blockDim.x) {
            const int d = t / nj, j = t - d * nj;
            atomicAdd(&dW[(size_t)d * S + si[j]], xr[d] * sd[j]);
        }
    }
}

lp_status cuda_sae_encode_sparse_grad(lp_ctx *c, float *dW_enc, float *db_enc, const float *x,
                                         const int32_t *idx, const float *dpre, int N, int K, int D,
                                         int S) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_encode_sparse_grad");
    LP_CUDA_REQUIRE(N > 0 && K >= 1 && D > 0 && S > 0 && dW_enc && db_enc && x && idx && dpre,
                    "cuda_sae_encode_sparse_grad: bad arguments (N=%d K=%d D=%d S=%d)", N, K, D, S);
    LP_CUDA_REQUIRE((long long)kChunk * D < (1LL << 31), "cuda_sae_encode_sparse_grad: d_in=%d too large", D);
    LP_LAUNCH((unsigned)N, kBlock, 0, cuda_stream_of(c), encode_sparse_grad_kernel)(dW_enc, db_enc, x, idx, dpre, K, D, S);
    LP_LAUNCH_CHECK("encode_sparse_grad_kernel");
    return LP_OK;
}

// dx[n,d] = sum_j dpre[n,j] W_enc[d, idx[n,j]]: one block per token, a thread per d, the
// pairs staged in shared memory, terms in j order like the CPU. Each read is a scattered
// word of row d of W_enc [D,S] (the layout SAELens fixes).
__global__ void encode_sparse_input_grad_kernel(float *dx, const float *dpre, const int32_t *idx,
                                                const float *W, int K, int D, int S) {
    LP_SHARED(int32_t, si, [kChunk]);
    LP_SHARED(float, sd, [kChunk]);
    const size_t n = blockIdx.x;
    for (int d0 = 0; d0 < D; d0 += blockDim.x) { // block-uniform
        const int d = d0 + threadIdx.x;
        const float *wr = W + (size_t)(d < D ? d : 0) * S;
        float acc = 0.0f;
        for (int j0 = 0; j0 < K; j0 += kChunk) {
            const int nj = min(kChunk, K - j0);
            __syncthreads();
            for (int j = threadIdx.x; j < nj; j += blockDim.x) {
                si[j] = idx[n * K + j0 + j];
                sd[j] = dpre[n * K + j0 + j];
            }
            __syncthreads();
            if (d < D)
                for (int j = 0; j < nj; j++) acc = fmaf(sd[j], wr[si[j]], acc);
        }
        if (d < D) dx[n * D + d] = acc;
    }
}

lp_status cuda_sae_encode_sparse_input_grad(lp_ctx *c, float *dx, const float *dpre, const int32_t *idx,
                                               const float *W_enc, int N, int K, int D, int S) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_encode_sparse_input_grad");
    LP_CUDA_REQUIRE(N > 0 && K >= 1 && D > 0 && S > 0 && dx && dpre && idx && W_enc,
                    "cuda_sae_encode_sparse_input_grad: bad arguments (N=%d K=%d D=%d S=%d)", N, K, D, S);
    const unsigned block = D >= (int)kBlock ? kBlock : (unsigned)((D + 31) / 32 * 32);
    LP_LAUNCH((unsigned)N, block, 0, cuda_stream_of(c), encode_sparse_input_grad_kernel)(dx, dpre, idx, W_enc, K, D, S);
    LP_LAUNCH_CHECK("encode_sparse_input_grad_kernel");
    return LP_OK;
}

// ---- activations -------------------------------------------------------------------------

__global__ void scale_kernel(float *x, float alpha, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] *= alpha;
}

lp_status cuda_sae_scale(lp_ctx *c, float *x, float alpha, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_scale");
    LP_CUDA_REQUIRE(x != NULL, "cuda_sae_scale: NULL buffer");
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), scale_kernel)(x, alpha, n);
    LP_LAUNCH_CHECK("scale_kernel");
    return LP_OK;
}
// Each element is read before the same thread writes it: in place is safe.

__global__ void relu_kernel(float *f, const float *pre, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        f[i] = relu_f(pre[i]);
}

__global__ void relu_grad_kernel(float *dpre, const float *df, const float *pre, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dpre[i] = pre[i] > 0.0f ? df[i] : 0.0f;
}

__global__ void jumprelu_kernel(float *f, const float *pre, const float *theta, size_t n, int S) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float p = pre[i];
        f[i] = p > theta[i % S] ? p : 0.0f;
    }
}

lp_status cuda_sae_relu(lp_ctx *c, float *f, const float *pre, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_relu");
    LP_CUDA_REQUIRE(f && pre, "cuda_sae_relu: NULL buffer");
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), relu_kernel)(f, pre, n);
    LP_LAUNCH_CHECK("relu_kernel");
    return LP_OK;
}

lp_status cuda_sae_relu_grad(lp_ctx *c, float *dpre, const float *df, const float *pre, size_t n) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_relu_grad");
    LP_CUDA_REQUIRE(dpre && df && pre, "cuda_sae_relu_grad: NULL buffer");
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), relu_grad_kernel)(dpre, df, pre, n);
    LP_LAUNCH_CHECK("relu_grad_kernel");
    return LP_OK;
}

lp_status cuda_sae_jumprelu(lp_ctx *c, float *f, const float *pre, const float *theta, int N, int S) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_jumprelu");
    LP_CUDA_REQUIRE(N > 0 && S > 0 && f && pre && theta, "cuda_sae_jumprelu: bad arguments");
    const size_t n = (size_t)N * S;
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), jumprelu_kernel)(f, pre, theta, n, S);
    LP_LAUNCH_CHECK("jumprelu_kernel");
    return LP_OK;
}

// lp_sae_l1_relu_grad: dpre = pre > 0 ? df + w : 0 with its column sums and those of
// relu(pre), laid out as col_sum_kernel (32 columns a block, coalesced rows, fp32 sums).
// With several row slices db gets each slice's sum by atomicAdd and fsum (zeroed first)
// likewise.
__global__ void l1_relu_grad_kernel(float *dpre, float *db, float *fsum, const float *df, const float *pre,
                                    const float *w, int N, int S, int rows_per, int atomic) {
    LP_SHARED(float, sh_d, [kColRows][33]);
    LP_SHARED(float, sh_f, [kColRows][33]);
    const int col = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per, r1 = min(N, r0 + rows_per);
    float ad = 0.0f, af = 0.0f;
    if (col < S) {
        const float ws = w[col];
        for (int r = r0 + threadIdx.y; r < r1; r += kColRows) {
            const size_t i = (size_t)r * S + col;
            const float p = pre[i], d = p > 0.0f ? __fadd_rn(df[i], ws) : 0.0f;
            dpre[i] = d;
            ad += d;
            af += relu_f(p);
        }
    }
    sh_d[threadIdx.y][threadIdx.x] = ad;
    sh_f[threadIdx.y][threadIdx.x] = af;
    __syncthreads();
    if (threadIdx.y == 0 && col < S) {
        float a = 0.0f, b = 0.0f;
#pragma unroll
        for (int y = 0; y < kColRows; y++) { a += sh_d[y][threadIdx.x]; b += sh_f[y][threadIdx.x]; }
        if (atomic) { atomicAdd(&db[col], a); atomicAdd(&fsum[col], b); }
        else { db[col] += a; fsum[col] = b; }
    }
}

lp_status cuda_sae_l1_relu_grad(lp_ctx *c, float *dpre, float *db, float *fsum, const float *df, const float *pre,
                                const float *w, int N, int S) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_l1_relu_grad");
    LP_CUDA_REQUIRE(N > 0 && S > 0 && dpre && db && fsum && df && pre && w, "cuda_sae_l1_relu_grad: bad arguments (N=%d S=%d)",
                    N, S);
    const int tiles = (S + 31) / 32;
    int slices, rows_per;
    lp_status st = col_split(c, N, tiles, &slices, &rows_per);
    if (st != LP_OK) return st;
    const int atomic = slices > 1;
    if (atomic) LP_CUDA_CHECK(cudaMemsetAsync(fsum, 0, (size_t)S * sizeof(float), cuda_stream_of(c)));
    LP_LAUNCH(dim3(tiles, slices), dim3(32, kColRows), 0, cuda_stream_of(c), l1_relu_grad_kernel)(
        dpre, db, fsum, df, pre, w, N, S, rows_per, atomic);
    LP_LAUNCH_CHECK("l1_relu_grad_kernel");
    return LP_OK;
}

// dpre = df * (pre > theta), and per column the straight-through sums K * df and K,
// K = |(pre - theta) / eps| < 1/2 in fp32 exactly as host/cpu/sae.c evaluates it; the
// block's contribution -(theta/eps) sum K df - (l0/eps) sum K is added to dtheta.
__global__ void jumprelu_grad_kernel(float *dpre, float *dtheta, const float *df, const float *pre,
                                     const float *theta, float eps, float l0_coef, int N, int S, int rows_per,
                                     int atomic) {
    LP_SHARED(float, sh_kdf, [kColRows][33]);
    LP_SHARED(float, sh_kn, [kColRows][33]);
    const int col = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per, r1 = min(N, r0 + rows_per);
    float kdf = 0.0f, kn = 0.0f;
    if (col < S) {
        const float th = theta[col];
        for (int r = r0 + threadIdx.y; r < r1; r += kColRows) {
            const size_t i = (size_t)r * S + col;
            const float g = df[i], p = pre[i];
            if (fabsf((p - th) / eps) < 0.5f) { kdf += g; kn += 1.0f; }
            dpre[i] = p > th ? g : 0.0f;
        }
    }
    sh_kdf[threadIdx.y][threadIdx.x] = kdf;
    sh_kn[threadIdx.y][threadIdx.x] = kn;
    __syncthreads();
    if (threadIdx.y == 0 && col < S) {
        float a = 0.0f, b = 0.0f;
#pragma unroll
        for (int y = 0; y < kColRows; y++) { a += sh_kdf[y][threadIdx.x]; b += sh_kn[y][threadIdx.x]; }
        if (a == 0.0f && b == 0.0f) return; // nothing in the window: dtheta unchanged
        const float th = theta[col];
        const float contrib = -(th / eps) * a - (l0_coef / eps) * b;
        if (atomic) atomicAdd(&dtheta[col], contrib);
        else dtheta[col] += contrib;
    }
}

lp_status cuda_sae_jumprelu_grad(lp_ctx *c, float *dpre, float *dtheta, const float *df,
                                    const float *pre, const float *theta, float eps, float l0_coef,
                                    int N, int S) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_jumprelu_grad");
    LP_CUDA_REQUIRE(N > 0 && S > 0 && dpre && dtheta && df && pre && theta && eps > 0,
                    "cuda_sae_jumprelu_grad: bad arguments (N=%d S=%d eps=%g)", N, S, (double)eps);
    const int tiles = (S + 31) / 32;
    int slices, rows_per;
    lp_status st = col_split(c, N, tiles, &slices, &rows_per);
    if (st != LP_OK) return st;
    LP_LAUNCH(dim3(tiles, slices), dim3(32, kColRows), 0, cuda_stream_of(c), jumprelu_grad_kernel)(
        dpre, dtheta, df, pre, theta, eps, l0_coef, N, S, rows_per, slices > 1);
    LP_LAUNCH_CHECK("jumprelu_grad_kernel");
    return LP_OK;
}

// ---- Adam --------------------------------------------------------------------------------
// The same float operations in the same order as host/cpu/sae.c, with the _rn intrinsics
// so the compiler cannot contract them into FMAs: the result matches the CPU bit for bit
// (division and sqrtf are IEEE-rounded in both).
__global__ void adam_kernel(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1, float b2,
                            float c1, float c2, float bc1, float bc2, float eps) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float gi = g[i];
        const float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(c1, gi));
        const float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(c2, __fmul_rn(gi, gi)));
        m[i] = mi;
        v[i] = vi;
        const float step = __fdiv_rn(__fmul_rn(lr, __fdiv_rn(mi, bc1)), __fadd_rn(__fsqrt_rn(__fdiv_rn(vi, bc2)), eps));
        p[i] = __fsub_rn(p[i], step);
    }
}

lp_status cuda_adam_step(lp_ctx *c, float *p, const float *g, float *m, float *v, size_t n, float lr,
                            float b1, float b2, float eps, int t) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_adam_step");
    LP_CUDA_REQUIRE(p && g && m && v && t >= 1, "cuda_adam_step: bad arguments");
    const float bc1 = (float)(1.0 - pow((double)b1, t)), bc2 = (float)(1.0 - pow((double)b2, t));
    const float c1 = 1.0f - b1, c2 = 1.0f - b2;
    LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), adam_kernel)(p, g, m, v, n, lr, b1, b2, c1, c2, bc1, bc2, eps);
    LP_LAUNCH_CHECK("adam_kernel");
    return LP_OK;
}

// ---- decoder rows: a warp per row --------------------------------------------------------

enum { ROWS_UNIT_NORM = 0, ROWS_REMOVE_PARALLEL, ROWS_NORM };

// mode ROWS_UNIT_NORM: a[s,:] /= ||a[s,:]|| (zero rows left alone);
// ROWS_REMOVE_PARALLEL: a[s,:] -= (a[s,:] . w[s,:]) w[s,:]; ROWS_NORM: out[s] = ||w[s,:]||.
__global__ void rows_kernel(float *a, const float *w, float *out, int S, int D, int mode) {
    const int lane = threadIdx.x & 31;
    const long long s = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (s >= S) return; // the whole warp
    const size_t row = (size_t)s * D;
    const float *x = mode == ROWS_REMOVE_PARALLEL ? a + row : (mode == ROWS_NORM ? w + row : a + row);
    const float *y = mode == ROWS_REMOVE_PARALLEL ? w + row : x;
    float acc = 0.0f;
    for (int d = lane; d < D; d += 32) acc = fmaf(x[d], y[d], acc);
    acc = warp_sum(acc);
    if (mode == ROWS_NORM) {
        if (lane == 0) out[s] = sqrtf(acc);
    } else if (mode == ROWS_UNIT_NORM) {
        const float nrm = sqrtf(acc);
        if (nrm > 0.0f)
            for (int d = lane; d < D; d += 32) a[row + d] /= nrm;
    } else {
        for (int d = lane; d < D; d += 32) a[row + d] -= acc * w[row + d];
    }
}

static lp_status rows_launch(lp_ctx *c, float *a, const float *w, float *out, int S, int D, int mode) {
    const unsigned per_block = kBlock / 32;
    LP_LAUNCH(ceil_div_u((size_t)S, per_block), kBlock, 0, cuda_stream_of(c), rows_kernel)(a, w, out, S, D, mode);
    LP_LAUNCH_CHECK("rows_kernel");
    return LP_OK;
}

lp_status cuda_rows_unit_norm(lp_ctx *c, float *W, int S, int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_rows_unit_norm");
    LP_CUDA_REQUIRE(S > 0 && D > 0 && W, "cuda_rows_unit_norm: bad arguments");
    return rows_launch(c, W, NULL, NULL, S, D, ROWS_UNIT_NORM);
}

lp_status cuda_rows_remove_parallel(lp_ctx *c, float *dW, const float *W, int S, int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_rows_remove_parallel");
    LP_CUDA_REQUIRE(S > 0 && D > 0 && dW && W, "cuda_rows_remove_parallel: bad arguments");
    return rows_launch(c, dW, W, NULL, S, D, ROWS_REMOVE_PARALLEL);
}

lp_status cuda_rows_norm(lp_ctx *c, float *out, const float *W, int S, int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_rows_norm");
    LP_CUDA_REQUIRE(S > 0 && D > 0 && out && W, "cuda_rows_norm: bad arguments");
    return rows_launch(c, NULL, W, out, S, D, ROWS_NORM);
}

// ---- reconstruction metrics --------------------------------------------------------------

__device__ double g_recon[4];

__global__ void recon_zero_kernel() {
    if (threadIdx.x < 4) g_recon[threadIdx.x] = 0.0;
}

// A warp per token: squared error, cosine and norm ratio, all in double.
__global__ void recon_token_kernel(const float *x, const float *xh, int N, int D) {
    const int lane = threadIdx.x & 31;
    const long long n = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (n >= N) return; // the whole warp
    const float *a = x + (size_t)n * D, *b = xh + (size_t)n * D;
    double se = 0, xx = 0, hh = 0, xhd = 0;
    for (int d = lane; d < D; d += 32) {
        const double u = a[d], w = b[d], e = w - u;
        se += e * e;
        xx += u * u;
        hh += w * w;
        xhd += u * w;
    }
    se = warp_sum_d(se);
    xx = warp_sum_d(xx);
    hh = warp_sum_d(hh);
    xhd = warp_sum_d(xhd);
    if (lane == 0) {
        atomicAdd(&g_recon[0], se);
        if (xx > 0 && hh > 0) atomicAdd(&g_recon[2], xhd / sqrt(xx * hh));
        if (xx > 0) atomicAdd(&g_recon[3], sqrt(hh) / sqrt(xx));
    }
}

// Per column d: sum_n (x - mean)^2 = sum (x - c)^2 - (sum (x - c))^2 / N with c = x[0,d],
// in double (the shift keeps the subtraction from cancelling); one block owns all rows of
// its 32 columns.
__global__ void recon_var_kernel(const float *x, int N, int D) {
    LP_SHARED(double, s1, [kColRows][33]);
    LP_SHARED(double, s2, [kColRows][33]);
    const int col = blockIdx.x * 32 + threadIdx.x;
    double a = 0, b = 0;
    if (col < D) {
        const double c0 = x[col];
        for (int r = threadIdx.y; r < N; r += kColRows) {
            const double e = (double)x[(size_t)r * D + col] - c0;
            a += e;
            b += e * e;
        }
    }
    s1[threadIdx.y][threadIdx.x] = a;
    s2[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y == 0) { // warp 0: threadIdx.x is the lane
        double v = 0;
        if (col < D) {
            double sa = 0, sb = 0;
            for (int y = 0; y < kColRows; y++) { sa += s1[y][threadIdx.x]; sb += s2[y][threadIdx.x]; }
            v = sb - sa * sa / N;
        }
        v = warp_sum_d(v);
        if (threadIdx.x == 0) atomicAdd(&g_recon[1], v);
    }
}

// The four sums into g_recon, queued on the compute stream.
static lp_status recon_launch(lp_ctx *c, const float *x, const float *x_hat, int N, int D) {
    cudaStream_t s = cuda_stream_of(c);
    LP_LAUNCH(1, 32, 0, s, recon_zero_kernel)();
    LP_LAUNCH_CHECK("recon_zero_kernel");
    LP_LAUNCH(ceil_div_u((size_t)N, kBlock / 32), kBlock, 0, s, recon_token_kernel)(x, x_hat, N, D);
    LP_LAUNCH_CHECK("recon_token_kernel");
    LP_LAUNCH(ceil_div_u((size_t)D, 32), dim3(32, kColRows), 0, s, recon_var_kernel)(x, N, D);
    LP_LAUNCH_CHECK("recon_var_kernel");
    return LP_OK;
}

lp_status cuda_sae_recon_sums(lp_ctx *c, double sums[4], const float *x, const float *x_hat, int N,
                                 int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_recon_sums");
    LP_CUDA_REQUIRE(N > 0 && D > 0 && sums && x && x_hat, "cuda_sae_recon_sums: bad arguments");
    cudaStream_t s = cuda_stream_of(c);
    lp_status st = recon_launch(c, x, x_hat, N, D);
    if (st != LP_OK) return st;
    double h[4];
    LP_CUDA_CHECK(cudaMemcpyFromSymbolAsync(h, g_recon, sizeof h, 0, cudaMemcpyDeviceToHost, s));
    LP_CUDA_CHECK(cudaStreamSynchronize(s));
    for (int i = 0; i < 4; i++) sums[i] = h[i];
    return LP_OK;
}

__global__ void recon_out_kernel(double *dst) {
    if (threadIdx.x < 4) dst[threadIdx.x] = g_recon[threadIdx.x];
}

// The same sums left on the device (include/loupe/sae_track.h): no host wait.
lp_status cuda_sae_recon_sums_dev(lp_ctx *c, double *sums, const float *x, const float *x_hat, int N, int D) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_recon_sums_dev");
    LP_CUDA_REQUIRE(N > 0 && D > 0 && sums && x && x_hat, "cuda_sae_recon_sums_dev: bad arguments");
    lp_status st = recon_launch(c, x, x_hat, N, D);
    if (st != LP_OK) return st;
    LP_LAUNCH(1, 32, 0, cuda_stream_of(c), recon_out_kernel)(sums);
    LP_LAUNCH_CHECK("recon_out_kernel");
    return LP_OK;
}

// ---- fire counts -------------------------------------------------------------------------

__global__ void fire_sparse_kernel(int64_t *counts, const int32_t *idx, const float *val, size_t n, int S) {
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        const int32_t s = idx[e];
        if (val[e] > 0.0f && s >= 0 && s < S) atomicAdd((unsigned long long *)&counts[s], 1ull);
    }
}

// Column counts of f > 0 over a row slice, added to counts (int64, two's complement, so
// an unsigned atomicAdd of a non-negative count is the signed sum).
__global__ void fire_dense_kernel(int64_t *counts, const float *f, int N, int S, int rows_per) {
    LP_SHARED(unsigned, sh, [kColRows][33]);
    const int col = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per, r1 = min(N, r0 + rows_per);
    unsigned k = 0;
    if (col < S)
        for (int r = r0 + threadIdx.y; r < r1; r += kColRows) k += f[(size_t)r * S + col] > 0.0f;
    sh[threadIdx.y][threadIdx.x] = k;
    __syncthreads();
    if (threadIdx.y == 0 && col < S) {
        unsigned long long t = 0;
        for (int y = 0; y < kColRows; y++) t += sh[y][threadIdx.x];
        if (t) atomicAdd((unsigned long long *)&counts[col], t);
    }
}

lp_status cuda_sae_fire_counts(lp_ctx *c, int64_t *counts, const int32_t *idx, const float *val,
                                  const float *f, int N, int K, int S) {
    LP_CUDA_REQUIRE_CTX(c, "cuda_sae_fire_counts");
    LP_CUDA_REQUIRE(N > 0 && S > 0 && counts && (idx ? (val && K >= 1) : f != NULL),
                    "cuda_sae_fire_counts: bad arguments");
    if (idx) {
        const size_t n = (size_t)N * K;
        LP_LAUNCH(grid_1d(n, kBlock), kBlock, 0, cuda_stream_of(c), fire_sparse_kernel)(counts, idx, val, n, S);
        LP_LAUNCH_CHECK("fire_sparse_kernel");
        return LP_OK;
    }
    const int tiles = (S + 31) / 32;
    int slices, rows_per;
    lp_status st = col_split(c, N, tiles, &slices, &rows_per);
    if (st != LP_OK) return st;
    LP_LAUNCH(dim3(tiles, slices), dim3(32, kColRows), 0, cuda_stream_of(c), fire_dense_kernel)(counts, f, N, S, rows_per);
    LP_LAUNCH_CHECK("fire_dense_kernel");
    return LP_OK;
}
