/* sae.c: CPU references of the SAE ops (include/loupe/sae_ops.h): the weight-gradient
 * GEMM through OpenBLAS, per-row top-K, the BatchTopK threshold, the sparse decode and
 * the sparse gradients, the activations and their backward, Adam, the decoder-row
 * constraints and the reconstruction metrics. The CUDA twins are in kernels/sae.cu.
 *
 * Plain loops in the order a reader would write them. Reductions over a column (col_sum,
 * the JumpReLU threshold gradient, the batch variance) walk the rows in blocks of COLS
 * columns with double accumulators on the stack, so nothing is allocated and the rows
 * are still read contiguously. Dot products and norms accumulate in double. */
#include <cblas.h>
#include <math.h>
#include <string.h>

#include "ops/ops_internal.h"

enum { COLS = 256 }; /* columns per block of a column reduction */

/* ---- weight gradients ---- */

void lp_cpu_matmul_at(float *out, const float *a, const float *b, int N, int K, int M, float beta) {
    // out is (K,M); a is (N,K); b is (N,M). With beta = 0, out is never read (BLAS contract).
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, K, M, N, 1.0f, a, K, b, M, beta, out, M);
}

void lp_cpu_col_sum(float *out, const float *x, int N, int M, float beta) {
    // out is (M,); x is (N,M)
    for (int m0 = 0; m0 < M; m0 += COLS) {
        const int nc = M - m0 < COLS ? M - m0 : COLS;
        double acc[COLS] = {0};
        for (int n = 0; n < N; n++) {
            const float *xr = x + (size_t)n * M + m0;
            for (int j = 0; j < nc; j++) acc[j] += xr[j];
        }
        for (int j = 0; j < nc; j++) out[m0 + j] = (float)((beta != 0.0f ? (double)out[m0 + j] : 0.0) + acc[j]);
    }
}

/* ---- selection ----
 * Values are ordered by their key: the float's bits with negatives flipped, so that
 * unsigned comparison of keys is the float order (-0 just below +0; NaNs at the ends).
 * kernels/sae.cu uses the same key, so both back ends agree on every input. */
static inline uint32_t order_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float relu(float v) { return v > 0.0f ? v : 0.0f; } /* NaN and -0 give +0 */

/* Selection order: the larger value first, then the lower index. */
static int ranks_before(const float *row, int32_t a, int32_t b) {
    const uint32_t ka = order_key(row[a]), kb = order_key(row[b]);
    return ka > kb || (ka == kb && a < b);
}

/* h[0..n) is a heap whose root is the entry that every other one ranks before (the
 * worst kept); restores that below position i. */
static void sift_down(int32_t *h, int n, int i, const float *row) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && ranks_before(row, h[w], h[l])) w = l;
        if (r < n && ranks_before(row, h[w], h[r])) w = r;
        if (w == i) return;
        int32_t t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

void lp_cpu_sae_topk(int32_t *idx, float *val, const float *pre, int N, int S, int K) {
    // idx, val are (N,K); pre is (N,S); 1 <= K <= S
    for (int n = 0; n < N; n++) {
        const float *row = pre + (size_t)n * S;
        int32_t *h = idx + (size_t)n * K; /* the heap lives in the output row */
        for (int j = 0; j < K; j++) h[j] = j;
        for (int j = K / 2 - 1; j >= 0; j--) sift_down(h, K, j, row);
        /* Scanning upward, an entry equal to the root never ranks before it: ties keep
         * the lower index. */
        for (int i = K; i < S; i++)
            if (ranks_before(row, i, h[0])) {
                h[0] = i;
                sift_down(h, K, 0, row);
            }
        for (int end = K - 1; end > 0; end--) { /* heap sort: the worst goes last */
            int32_t t = h[0];
            h[0] = h[end];
            h[end] = t;
            sift_down(h, end, 0, row);
        }
        for (int j = 0; j < K; j++) val[(size_t)n * K + j] = relu(row[h[j]]);
    }
}

/* The (count+1)-th largest of relu(pre) (see host/ops/sae_ops.c for the contract), by radix
 * selection over the bits of the positive entries, whose unsigned order is their float
 * order: four passes of an 8-bit histogram, each narrowing the prefix of the answer. */
float lp_cpu_sae_kth_largest(const float *pre, size_t n, size_t count) {
    if (count >= n) return 0.0f;
    size_t r = count + 1; /* rank from the top among the candidates still in play */
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        size_t hist[256] = {0}, total = 0;
        for (size_t i = 0; i < n; i++) {
            if (!(pre[i] > 0.0f)) continue;
            uint32_t u;
            memcpy(&u, &pre[i], sizeof u);
            if ((u & mask) == prefix) hist[(u >> shift) & 255]++, total++;
        }
        if (total < r) return 0.0f; /* fewer than count+1 positive entries (first pass only) */
        int d = 255;
        while (hist[d] < r) r -= hist[d--];
        prefix |= (uint32_t)d << shift;
        mask |= 0xFFu << shift;
    }
    float t;
    memcpy(&t, &prefix, sizeof t);
    return t;
}

/* ---- sparse decode and the sparse gradients ---- */

void lp_cpu_sae_decode_sparse(float *out, const int32_t *idx, const float *val, const float *W,
                              const float *bias, int N, int K, int D) {
    // out is (N,D); idx, val are (N,K); W is (S,D); bias is (D,) or NULL
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * D;
        for (int d = 0; d < D; d++) o[d] = bias ? bias[d] : 0.0f;
        for (int j = 0; j < K; j++) {
            const float v = val[(size_t)n * K + j];
            const float *w = W + (size_t)idx[(size_t)n * K + j] * D;
            for (int d = 0; d < D; d++) o[d] += v * w[d];
        }
    }
}

void lp_cpu_sae_decode_sparse_grad(float *dval, float *dW, const float *dout, const int32_t *idx,
                                   const float *val, const float *W, int N, int K, int D) {
    // dval, idx, val are (N,K); dW, W are (S,D); dout is (N,D)
    for (int n = 0; n < N; n++) {
        const float *g = dout + (size_t)n * D;
        for (int j = 0; j < K; j++) {
            const size_t e = (size_t)n * K + j, row = (size_t)idx[e] * D;
            double dot = 0;
            for (int d = 0; d < D; d++) dot += (double)g[d] * W[row + d];
            dval[e] = (float)dot;
            for (int d = 0; d < D; d++) dW[row + d] += val[e] * g[d];
        }
    }
}

void lp_cpu_sae_encode_sparse_grad(float *dW_enc, float *db_enc, const float *x, const int32_t *idx,
                                   const float *dpre, int N, int K, int D, int S) {
    // dW_enc is (D,S); db_enc is (S,); x is (N,D); idx, dpre are (N,K)
    /* row by row of dW_enc (a token's K columns within one row), not column by column:
     * the same additions in the same order per element, without striding S floats per step */
    for (int n = 0; n < N; n++) {
        const int32_t *in = idx + (size_t)n * K;
        const float *gn = dpre + (size_t)n * K;
        for (int j = 0; j < K; j++) db_enc[in[j]] += gn[j];
        for (int d = 0; d < D; d++) {
            float *row = dW_enc + (size_t)d * S;
            const float xd = x[(size_t)n * D + d];
            for (int j = 0; j < K; j++) row[in[j]] += xd * gn[j];
        }
    }
}

void lp_cpu_sae_encode_sparse_input_grad(float *dx, const float *dpre, const int32_t *idx, const float *W_enc,
                                         int N, int K, int D, int S) {
    // dx is (N,D); dpre, idx are (N,K); W_enc is (D,S)
    for (int n = 0; n < N; n++)
        for (int d = 0; d < D; d++) {
            const float *wr = W_enc + (size_t)d * S;
            float acc = 0.0f;
            for (int j = 0; j < K; j++) acc += dpre[(size_t)n * K + j] * wr[idx[(size_t)n * K + j]];
            dx[(size_t)n * D + d] = acc;
        }
}

/* ---- activations ---- */

void lp_cpu_sae_scale(float *x, float alpha, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] *= alpha;
}

void lp_cpu_sae_relu(float *f, const float *pre, size_t n) {
    for (size_t i = 0; i < n; i++) f[i] = relu(pre[i]);
}

void lp_cpu_sae_jumprelu(float *f, const float *pre, const float *theta, int N, int S) {
    // f, pre are (N,S); theta is (S,)
    for (int n = 0; n < N; n++)
        for (int s = 0; s < S; s++) {
            const size_t i = (size_t)n * S + s;
            f[i] = pre[i] > theta[s] ? pre[i] : 0.0f;
        }
}

void lp_cpu_sae_relu_grad(float *dpre, const float *df, const float *pre, size_t n) {
    for (size_t i = 0; i < n; i++) dpre[i] = pre[i] > 0.0f ? df[i] : 0.0f;
}

/* The rectangle kernel K((pre - theta)/eps) of the straight-through estimator, in fp32
 * exactly as the CUDA kernel evaluates it, so both agree at the window's edges. */
static inline int in_window(float pre, float theta, float eps) { return fabsf((pre - theta) / eps) < 0.5f; }

void lp_cpu_sae_jumprelu_grad(float *dpre, float *dtheta, const float *df, const float *pre,
                              const float *theta, float eps, float l0_coef, int N, int S) {
    // dpre, df, pre are (N,S); dtheta, theta are (S,). dpre may alias df.
    for (int s0 = 0; s0 < S; s0 += COLS) {
        const int nc = S - s0 < COLS ? S - s0 : COLS;
        double kdf[COLS] = {0}, kn[COLS] = {0}; /* sum_n K * df, sum_n K */
        for (int n = 0; n < N; n++)
            for (int j = 0; j < nc; j++) {
                const int s = s0 + j;
                const size_t i = (size_t)n * S + s;
                const float g = df[i], p = pre[i];
                if (in_window(p, theta[s], eps)) kdf[j] += g, kn[j] += 1;
                dpre[i] = p > theta[s] ? g : 0.0f;
            }
        for (int j = 0; j < nc; j++) {
            const int s = s0 + j;
            const double th = theta[s];
            dtheta[s] = (float)((double)dtheta[s] - th / eps * kdf[j] - (double)l0_coef / eps * kn[j]);
        }
    }
}

/* ---- optimizer and decoder constraints ---- */

void lp_cpu_adam_step(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                      float b2, float eps, int t) {
    /* The bias corrections in double, rounded once; the CUDA kernel gets the same floats. */
    const float bc1 = (float)(1.0 - pow((double)b1, t)), bc2 = (float)(1.0 - pow((double)b2, t));
    const float c1 = 1.0f - b1, c2 = 1.0f - b2;
    for (size_t i = 0; i < n; i++) {
        const float gi = g[i];
        const float mi = b1 * m[i] + c1 * gi;
        const float vi = b2 * v[i] + c2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
    }
}

static double row_dot(const float *a, const float *b, int D) {
    double s = 0;
    for (int d = 0; d < D; d++) s += (double)a[d] * b[d];
    return s;
}

void lp_cpu_rows_unit_norm(float *W, int S, int D) {
    // W is (S,D)
    for (int s = 0; s < S; s++) {
        float *w = W + (size_t)s * D;
        const double nrm = sqrt(row_dot(w, w, D));
        if (nrm > 0)
            for (int d = 0; d < D; d++) w[d] = (float)(w[d] / nrm);
    }
}

void lp_cpu_rows_remove_parallel(float *dW, const float *W, int S, int D) {
    // dW, W are (S,D); the rows of W are unit vectors (the caller's promise)
    for (int s = 0; s < S; s++) {
        float *g = dW + (size_t)s * D;
        const float *w = W + (size_t)s * D;
        const double par = row_dot(g, w, D);
        for (int d = 0; d < D; d++) g[d] = (float)(g[d] - par * w[d]);
    }
}

void lp_cpu_rows_norm(float *out, const float *W, int S, int D) {
    for (int s = 0; s < S; s++) out[s] = (float)sqrt(row_dot(W + (size_t)s * D, W + (size_t)s * D, D));
}

/* ---- metrics ---- */

void lp_cpu_sae_recon_sums(double sums[4], const float *x, const float *x_hat, int N, int D) {
    // x, x_hat are (N,D)
    double se = 0, cos_sum = 0, ratio_sum = 0, var = 0;
    for (int n = 0; n < N; n++) {
        const float *a = x + (size_t)n * D, *b = x_hat + (size_t)n * D;
        double xx = 0, hh = 0, xh = 0;
        for (int d = 0; d < D; d++) {
            const double e = (double)b[d] - a[d];
            se += e * e;
            xx += (double)a[d] * a[d];
            hh += (double)b[d] * b[d];
            xh += (double)a[d] * b[d];
        }
        if (xx > 0 && hh > 0) cos_sum += xh / sqrt(xx * hh);
        if (xx > 0) ratio_sum += sqrt(hh) / sqrt(xx);
    }
    /* two passes per block of columns: the per-dim mean over the batch, then the squares */
    for (int d0 = 0; d0 < D; d0 += COLS) {
        const int nc = D - d0 < COLS ? D - d0 : COLS;
        double mean[COLS] = {0};
        for (int n = 0; n < N; n++)
            for (int j = 0; j < nc; j++) mean[j] += x[(size_t)n * D + d0 + j];
        for (int j = 0; j < nc; j++) mean[j] /= N;
        for (int n = 0; n < N; n++)
            for (int j = 0; j < nc; j++) {
                const double e = x[(size_t)n * D + d0 + j] - mean[j];
                var += e * e;
            }
    }
    sums[0] = se;
    sums[1] = var;
    sums[2] = cos_sum;
    sums[3] = ratio_sum;
}

void lp_cpu_sae_fire_counts(int64_t *counts, const int32_t *idx, const float *val, const float *f,
                            int N, int K, int S) {
    // counts is (S,); idx, val are (N,K), or f is (N,S) when idx is NULL
    if (idx) {
        for (size_t e = 0; e < (size_t)N * K; e++)
            if (val[e] > 0.0f && idx[e] >= 0 && idx[e] < S) counts[idx[e]]++;
        return;
    }
    for (int n = 0; n < N; n++)
        for (int s = 0; s < S; s++) counts[s] += f[(size_t)n * S + s] > 0.0f;
}
