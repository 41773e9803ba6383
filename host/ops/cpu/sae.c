/* sae.c: CPU references of the SAE ops (include/loupe/sae_ops.h): the weight-gradient
 * GEMM through OpenBLAS, per-row top-K, the BatchTopK threshold, the sparse decode and
 * the sparse gradients, the activations and their backward, Adam, the decoder-row
 * constraints and the reconstruction metrics. The CUDA twins are in kernels/sae.cu.
 *
 * Plain loops in the order a reader would write them. Reductions over a column (col_sum,
 * the JumpReLU threshold gradient, the batch variance) walk the rows in blocks of COLS
 * columns with double accumulators on the stack, so nothing is allocated and the rows
 * are still read contiguously. Dot products and norms accumulate in double. */
/* The element-wise loops here (Adam, the row updates of the sparse gradients, the sparse
 * decode) vectorise only under -O3's cost model; without -ffast-math that changes no
 * result, only the speed. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3")
#endif
#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ops/ops_internal.h"

enum { COLS = 256 }; /* columns per block of a column reduction */

/* ---- weight gradients ---- */

void cpu_matmul_at(float *out, const float *a, const float *b, int N, int K, int M, float beta) {
    // out is (K,M); a is (N,K); b is (N,M). With beta = 0, out is never read (BLAS contract).
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, K, M, N, 1.0f, a, K, b, M, beta, out, M);
}

typedef struct {
    float *out;
    const float *x;
    int N, M;
    float beta;
} col_sum_args;

/* Column blocks [b0, b1): each column's sum is the same whichever thread takes its block. */
static void col_sum_blocks(void *p, size_t b0, size_t b1) {
    const col_sum_args *a = p;
    const int N = a->N, M = a->M;
    for (int m0 = (int)b0 * COLS; m0 < M && m0 < (int)b1 * COLS; m0 += COLS) {
        const int nc = M - m0 < COLS ? M - m0 : COLS;
        double acc[COLS] = {0};
        for (int n = 0; n < N; n++) {
            const float *xr = a->x + (size_t)n * M + m0;
            for (int j = 0; j < nc; j++) acc[j] += xr[j];
        }
        for (int j = 0; j < nc; j++) a->out[m0 + j] = (float)((a->beta != 0.0f ? (double)a->out[m0 + j] : 0.0) + acc[j]);
    }
}

void cpu_col_sum(float *out, const float *x, int N, int M, float beta) {
    // out is (M,); x is (N,M)
    col_sum_args a = {out, x, N, M, beta};
    size_t blocks = ((size_t)M + COLS - 1) / COLS;
    /* a thread per block once a block holds enough rows to pay for the thread's start */
    cpu_parallel_for(blocks, N >= 256 ? 1 : blocks, col_sum_blocks, &a);
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

/* One row's top K into h (indices, best first) and v. */
static void topk_row(int32_t *h, float *v, const float *row, int S, int K) {
    for (int j = 0; j < K; j++) h[j] = j;
    for (int j = K / 2 - 1; j >= 0; j--) sift_down(h, K, j, row);
    /* Scanning upward, an entry equal to the root never ranks before it (ties keep the
     * lower index), so an entry enters exactly when its key exceeds the root's: one
     * comparison per entry, the heap touched only on the rare entry that does. */
    uint32_t root = order_key(row[h[0]]);
    int i = K;
    for (; i + 16 <= S; i += 16) { /* a block of 16 whose largest key does not beat the root is skipped whole */
        uint32_t mx = 0;
        for (int q = 0; q < 16; q++) {
            const uint32_t kq = order_key(row[i + q]);
            mx = kq > mx ? kq : mx;
        }
        if (mx <= root) continue;
        for (int q = i; q < i + 16; q++)
            if (order_key(row[q]) > root) {
                h[0] = q;
                sift_down(h, K, 0, row);
                root = order_key(row[h[0]]);
            }
    }
    for (; i < S; i++)
        if (order_key(row[i]) > root) {
            h[0] = i;
            sift_down(h, K, 0, row);
            root = order_key(row[h[0]]);
        }
    for (int end = K - 1; end > 0; end--) { /* heap sort: the worst goes last */
        int32_t t = h[0];
        h[0] = h[end];
        h[end] = t;
        sift_down(h, end, 0, row);
    }
    for (int j = 0; j < K; j++) v[j] = relu(row[h[j]]);
}

void cpu_sae_topk_row(int32_t *idx, float *val, const float *row, int S, int K) { topk_row(idx, val, row, S, K); }

typedef struct { int32_t *idx; float *val; const float *pre; int S, K; } topk_args;

static void topk_rows(void *p, size_t n0, size_t n1) {
    const topk_args *a = p;
    for (size_t n = n0; n < n1; n++) /* the heap lives in the output row */
        topk_row(a->idx + n * a->K, a->val + n * a->K, a->pre + n * a->S, a->S, a->K);
}

void cpu_sae_topk(int32_t *idx, float *val, const float *pre, int N, int S, int K) {
    // idx, val are (N,K); pre is (N,S); 1 <= K <= S
    topk_args a = {idx, val, pre, S, K};
    cpu_parallel_for((size_t)N, 16, topk_rows, &a);
}

/* One pass of the radix selection below: the positive entries under the prefix, by the
 * byte at shift. */
void cpu_sae_radix_hist(int64_t *hist, const float *pre, size_t n, uint32_t prefix, uint32_t mask, int shift) {
    memset(hist, 0, 256 * sizeof *hist);
    for (size_t i = 0; i < n; i++) {
        if (!(pre[i] > 0.0f)) continue;
        uint32_t u;
        memcpy(&u, &pre[i], sizeof u);
        if ((u & mask) == prefix) hist[(u >> shift) & 255]++;
    }
}

/* The (count+1)-th largest of relu(pre) (see host/ops/sae_ops.c for the contract), by radix
 * selection over the bits of the positive entries, whose unsigned order is their float
 * order: four passes of an 8-bit histogram, each narrowing the prefix of the answer. */
float cpu_sae_kth_largest(const float *pre, size_t n, size_t count) {
    if (count >= n) return 0.0f;
    int64_t r = (int64_t)count + 1; /* rank from the top among the candidates still in play */
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        int64_t hist[256];
        cpu_sae_radix_hist(hist, pre, n, prefix, mask, shift);
        if (!cpu_sae_radix_pick(hist, &r, &prefix, &mask, shift)) return 0.0f;
    }
    float t;
    memcpy(&t, &prefix, sizeof t);
    return t;
}

int cpu_sae_radix_pick(const int64_t *hist, int64_t *rank, uint32_t *prefix, uint32_t *mask, int shift) {
    int64_t total = 0, r = *rank;
    for (int d = 0; d < 256; d++) total += hist[d];
    if (total < r) return 0; /* fewer than count+1 positive entries (first pass only) */
    int d = 255;
    while (hist[d] < r) r -= hist[d--];
    *rank = r;
    *prefix |= (uint32_t)d << shift;
    *mask |= 0xFFu << shift;
    return 1;
}

/* ---- sparse decode and the sparse gradients ----
 * The gradients of the K chosen latents per token are gathered latent by latent: a
 * counting sort of the N*K entries by latent, stable, so each latent's entries stay in
 * token order. A latent's weight row (W_dec) or column (W_enc) then takes its additions
 * from one thread, in token order, as the token-by-token loop gives them: the same sums
 * bit for bit, without two threads ever writing one weight. */
typedef struct {
    int32_t *start; /* [S+1]: latent s owns ent[start[s] .. start[s+1]) */
    int32_t *ent;   /* [N*K]: entries n*K + j, by latent, then in token order */
} latent_lists;

/* 0 when out of memory (the callers then run the token-by-token loop). */
static int latent_lists_build(latent_lists *l, const int32_t *idx, size_t NK, int S) {
    l->start = calloc((size_t)S + 1, sizeof(int32_t));
    l->ent = malloc((NK ? NK : 1) * sizeof(int32_t));
    if (!l->start || !l->ent || NK > INT32_MAX) {
        free(l->start), free(l->ent);
        return 0;
    }
    for (size_t e = 0; e < NK; e++) l->start[idx[e] + 1]++;
    for (int s = 0; s < S; s++) l->start[s + 1] += l->start[s];
    int32_t *fill = malloc((size_t)S * sizeof(int32_t));
    if (!fill) {
        free(l->start), free(l->ent);
        return 0;
    }
    memcpy(fill, l->start, (size_t)S * sizeof(int32_t));
    for (size_t e = 0; e < NK; e++) l->ent[fill[idx[e]]++] = (int32_t)e;
    free(fill);
    return 1;
}

static void latent_lists_free(latent_lists *l) { free(l->start), free(l->ent); }

/* The largest index in idx[0..NK) plus one: the latents the lists must cover. */
static int latent_span(const int32_t *idx, size_t NK) {
    int32_t m = -1;
    for (size_t e = 0; e < NK; e++) m = idx[e] > m ? idx[e] : m;
    return m + 1;
}

typedef struct {
    float *out;
    const int32_t *idx;
    const float *val, *W, *bias;
    int K, D;
} decode_args;

static void decode_rows(void *p, size_t n0, size_t n1) {
    const decode_args *a = p;
    const int K = a->K, D = a->D;
    for (size_t n = n0; n < n1; n++) {
        float *o = a->out + n * D;
        for (int d = 0; d < D; d++) o[d] = a->bias ? a->bias[d] : 0.0f;
        for (int j = 0; j < K; j++) {
            const float v = a->val[n * K + j];
            const float *w = a->W + (size_t)a->idx[n * K + j] * D;
            for (int d = 0; d < D; d++) o[d] += v * w[d];
        }
    }
}

void cpu_sae_decode_sparse(float *out, const int32_t *idx, const float *val, const float *W,
                              const float *bias, int N, int K, int D) {
    // out is (N,D); idx, val are (N,K); W is (S,D); bias is (D,) or NULL
    decode_args a = {out, idx, val, W, bias, K, D};
    cpu_parallel_for((size_t)N, 16, decode_rows, &a);
}

/* sum_d a[d] b[d] in double, in four interleaved partial sums (the compiler may keep them
 * in vector lanes; a strict left-to-right double sum could not be). */
static double dot_f64(const float *a, const float *b, int D) {
    double s[4] = {0, 0, 0, 0};
    int d = 0;
    for (; d + 4 <= D; d += 4)
        for (int q = 0; q < 4; q++) s[q] += (double)a[d + q] * b[d + q];
    for (; d < D; d++) s[0] += (double)a[d] * b[d];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

typedef struct {
    float *dval, *dW, *db;
    const float *dout, *val, *W, *x;
    const int32_t *idx;
    latent_lists l;
    int K, D, S;
} sparse_grad_args;

static void dval_rows(void *p, size_t n0, size_t n1) {
    const sparse_grad_args *a = p;
    for (size_t e = n0 * a->K; e < n1 * a->K; e++)
        a->dval[e] = (float)dot_f64(a->dout + (e / a->K) * a->D, a->W + (size_t)a->idx[e] * a->D, a->D);
}

static void dW_dec_rows(void *p, size_t s0, size_t s1) {
    const sparse_grad_args *a = p;
    for (size_t s = s0; s < s1; s++) {
        float *row = a->dW + s * a->D;
        for (int32_t q = a->l.start[s]; q < a->l.start[s + 1]; q++) {
            const int32_t e = a->l.ent[q];
            const float v = a->val[e], *g = a->dout + (size_t)(e / a->K) * a->D;
            for (int d = 0; d < a->D; d++) row[d] += v * g[d];
        }
    }
}

void cpu_sae_decode_sparse_grad(float *dval, float *dW, const float *dout, const int32_t *idx,
                                   const float *val, const float *W, int N, int K, int D) {
    // dval, idx, val are (N,K); dW, W are (S,D); dout is (N,D)
    sparse_grad_args a = {.dval = dval, .dW = dW, .dout = dout, .val = val, .W = W, .idx = idx, .K = K, .D = D};
    cpu_parallel_for((size_t)N, 16, dval_rows, &a);
    const size_t NK = (size_t)N * K;
    const int S = latent_span(idx, NK);
    if (latent_lists_build(&a.l, idx, NK, S)) {
        cpu_parallel_for((size_t)S, 64, dW_dec_rows, &a);
        latent_lists_free(&a.l);
        return;
    }
    for (size_t e = 0; e < NK; e++) { /* out of memory for the lists: token by token */
        float *row = dW + (size_t)idx[e] * D;
        const float *g = dout + (e / K) * D;
        for (int d = 0; d < D; d++) row[d] += val[e] * g[d];
    }
}

/* The same two passes as cpu_sae_decode_sparse_grad (the same sums in the same order, so
 * the same bits), the lists being the caller's (lp_sae_latent_lists layout). */
void cpu_sae_decode_sparse_grad_lists(float *dval, float *dW, const float *dout, const int32_t *idx, const int32_t *lists,
                                      const float *val, const float *W, int N, int K, int D, int S) {
    sparse_grad_args a = {.dval = dval, .dW = dW, .dout = dout, .val = val, .W = W, .idx = idx, .K = K, .D = D};
    a.l.start = (int32_t *)lists, a.l.ent = (int32_t *)lists + 2 * (size_t)S + 1;
    cpu_parallel_for((size_t)N, 16, dval_rows, &a);
    cpu_parallel_for((size_t)S, 64, dW_dec_rows, &a);
}

enum { TILE = 16 }; /* latents per tile of dW_enc: one 64-byte line of each of its D rows */

/* dW_enc[:, s0..s1) and db_enc[s0..s1), a tile of TILE latents at a time: the tile's
 * columns are read into rows of a scratch block, take their latents' entries, and go
 * back, so each cache line of dW_enc is read and written once. */
static void dW_enc_cols(void *p, size_t s0, size_t s1) {
    const sparse_grad_args *a = p;
    const int D = a->D, S = a->S;
    float *t = malloc((size_t)TILE * D * sizeof(float));
    for (size_t b0 = s0; b0 < s1; b0 += TILE) {
        const int nb = s1 - b0 < TILE ? (int)(s1 - b0) : TILE;
        if (a->l.start[b0] == a->l.start[b0 + nb]) continue; /* no latent of the tile was chosen */
        for (int q = 0; q < nb; q++) {
            const size_t s = b0 + q;
            float acc = a->db[s];
            for (int32_t r = a->l.start[s]; r < a->l.start[s + 1]; r++) acc += a->dout[a->l.ent[r]];
            a->db[s] = acc;
        }
        if (!t) { /* out of scratch: straight into the strided column */
            for (int q = 0; q < nb; q++)
                for (int32_t r = a->l.start[b0 + q]; r < a->l.start[b0 + q + 1]; r++) {
                    const int32_t e = a->l.ent[r];
                    const float g = a->dout[e], *xr = a->x + (size_t)(e / a->K) * D;
                    for (int d = 0; d < D; d++) a->dW[(size_t)d * S + b0 + q] += xr[d] * g;
                }
            continue;
        }
        for (int d = 0; d < D; d++)
            for (int q = 0; q < nb; q++) t[(size_t)q * D + d] = a->dW[(size_t)d * S + b0 + q];
        for (int q = 0; q < nb; q++) {
            float *tq = t + (size_t)q * D;
            for (int32_t r = a->l.start[b0 + q]; r < a->l.start[b0 + q + 1]; r++) {
                const int32_t e = a->l.ent[r];
                const float g = a->dout[e], *xr = a->x + (size_t)(e / a->K) * D;
                for (int d = 0; d < D; d++) tq[d] += xr[d] * g;
            }
        }
        for (int d = 0; d < D; d++)
            for (int q = 0; q < nb; q++) a->dW[(size_t)d * S + b0 + q] = t[(size_t)q * D + d];
    }
    free(t);
}

static void dW_enc_tiles(void *p, size_t t0, size_t t1) {
    const sparse_grad_args *a = p;
    const size_t s1 = t1 * TILE < (size_t)a->S ? t1 * TILE : (size_t)a->S;
    dW_enc_cols(p, t0 * TILE, s1);
}

void cpu_sae_encode_sparse_grad(float *dW_enc, float *db_enc, const float *x, const int32_t *idx,
                                   const float *dpre, int N, int K, int D, int S) {
    // dW_enc is (D,S); db_enc is (S,); x is (N,D); idx, dpre are (N,K)
    /* latent-major: each column of dW_enc takes its tokens' x rows scaled by dpre, in
     * token order (the sums of the token-by-token loop below, bit for bit) */
    sparse_grad_args a = {.dW = dW_enc, .db = db_enc, .dout = dpre, .x = x, .K = K, .D = D, .S = S};
    const size_t NK = (size_t)N * K;
    if (latent_lists_build(&a.l, idx, NK, S)) {
        cpu_parallel_for((size_t)(S + TILE - 1) / TILE, 4, dW_enc_tiles, &a);
        latent_lists_free(&a.l);
        return;
    }
    for (int n = 0; n < N; n++) { /* out of memory for the lists: token by token */
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

void cpu_sae_encode_sparse_input_grad(float *dx, const float *dpre, const int32_t *idx, const float *W_enc,
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

void cpu_sae_scale(float *x, float alpha, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] *= alpha;
}

typedef struct {
    float *out;
    const float *a, *b;
} ew_args;

static void relu_range(void *p, size_t i0, size_t i1) {
    const ew_args *a = p;
    for (size_t i = i0; i < i1; i++) a->out[i] = relu(a->a[i]);
}

/* Element-wise over [N, d_sae] between two GEMMs: split over the BLAS threads. */
void cpu_sae_relu(float *f, const float *pre, size_t n) {
    ew_args a = {f, pre, NULL};
    cpu_parallel_for(n, 1 << 16, relu_range, &a);
}

void cpu_sae_jumprelu(float *f, const float *pre, const float *theta, int N, int S) {
    // f, pre are (N,S); theta is (S,)
    for (int n = 0; n < N; n++)
        for (int s = 0; s < S; s++) {
            const size_t i = (size_t)n * S + s;
            f[i] = pre[i] > theta[s] ? pre[i] : 0.0f;
        }
}

/* df is read unconditionally so that the select vectorises: a branch on the sign of pre
 * mispredicts at every density between the extremes. */
static void relu_grad_range(void *p, size_t i0, size_t i1) {
    const ew_args *a = p;
    for (size_t i = i0; i < i1; i++) {
        const float g = a->a[i];
        a->out[i] = a->b[i] > 0.0f ? g : 0.0f;
    }
}

void cpu_sae_relu_grad(float *dpre, const float *df, const float *pre, size_t n) {
    ew_args a = {dpre, df, pre};
    cpu_parallel_for(n, 1 << 16, relu_grad_range, &a);
}

enum { L1_ROWS = 64 }; /* rows per partial sum of lp_sae_l1_relu_grad */

typedef struct {
    float *dpre, *db, *fsum;
    const float *df, *pre, *w;
    double *part; /* [chunks][2][S]: each chunk's sums of dpre and of relu(pre) */
    int N, S;
} l1_relu_args;

/* Chunks [c0, c1) of L1_ROWS rows, each row read front to back (streams; a walk down
 * narrow column blocks leaves the prefetcher a new page every row). Pieces of COLS
 * columns go through row buffers on the stack, one select per loop: each loop vectorises
 * instead of branching on the sign of pre (a coin toss), and dpre may alias df. */
static void l1_relu_grad_chunks(void *p, size_t c0, size_t c1) {
    const l1_relu_args *a = p;
    const int N = a->N, S = a->S;
    float t[COLS], f[COLS];
    for (size_t c = c0; c < c1; c++) {
        double *pd = a->part + c * 2 * S, *pf = pd + S;
        memset(pd, 0, (size_t)2 * S * sizeof(double));
        const int n1 = (int)(c + 1) * L1_ROWS < N ? (int)(c + 1) * L1_ROWS : N;
        for (int n = (int)c * L1_ROWS; n < n1; n++)
            for (int s0 = 0; s0 < S; s0 += COLS) {
                const int nc = S - s0 < COLS ? S - s0 : COLS;
                const size_t r = (size_t)n * S + s0;
                const float *pr = a->pre + r, *g = a->df + r, *w = a->w + s0;
                float *o = a->dpre + r;
                double *qd = pd + s0, *qf = pf + s0;
                for (int j = 0; j < nc; j++) t[j] = g[j] + w[j];
                for (int j = 0; j < nc; j++) {
                    const float v = t[j];
                    t[j] = pr[j] > 0.0f ? v : 0.0f;
                }
                for (int j = 0; j < nc; j++) f[j] = relu(pr[j]);
                for (int j = 0; j < nc; j++) o[j] = t[j], qd[j] += t[j], qf[j] += f[j];
            }
    }
}

/* Columns [s0, s1): the chunks' sums in chunk order, whatever the number of threads. */
static void l1_relu_grad_sums(void *p, size_t s0, size_t s1) {
    const l1_relu_args *a = p;
    const size_t S = (size_t)a->S, chunks = ((size_t)a->N + L1_ROWS - 1) / L1_ROWS;
    for (size_t s = s0; s < s1; s++) {
        double d = 0, f = 0;
        for (size_t c = 0; c < chunks; c++) d += a->part[c * 2 * S + s], f += a->part[c * 2 * S + S + s];
        a->db[s] = (float)((double)a->db[s] + d);
        a->fsum[s] = (float)f;
    }
}

lp_status cpu_sae_l1_relu_grad(float *dpre, float *db, float *fsum, const float *df, const float *pre, const float *w,
                               int N, int S) {
    // dpre, df, pre are (N,S); db, fsum, w are (S,). dpre may alias df.
    const size_t chunks = ((size_t)N + L1_ROWS - 1) / L1_ROWS;
    l1_relu_args a = {dpre, db, fsum, df, pre, w, malloc(chunks * 2 * (size_t)S * sizeof(double)), N, S};
    if (!a.part) LP_FAIL(LP_ERR_OOM, "sae_l1_relu_grad: out of memory for %zu partial sums", chunks * 2 * (size_t)S);
    cpu_parallel_for(chunks, 1, l1_relu_grad_chunks, &a);
    cpu_parallel_for((size_t)S, 1024, l1_relu_grad_sums, &a);
    free(a.part);
    return LP_OK;
}

/* The rectangle kernel K((pre - theta)/eps) of the straight-through estimator, in fp32
 * exactly as the CUDA kernel evaluates it, so both agree at the window's edges. */
static inline int in_window(float pre, float theta, float eps) { return fabsf((pre - theta) / eps) < 0.5f; }

void cpu_sae_jumprelu_grad(float *dpre, float *dtheta, const float *df, const float *pre,
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

typedef struct {
    float *p, *m, *v;
    const float *g;
    float lr, b1, b2, eps, bc1, bc2;
} adam_args;

static void adam_range(void *q, size_t i0, size_t i1) {
    const adam_args *a = q;
    const float b1 = a->b1, b2 = a->b2, c1 = 1.0f - b1, c2 = 1.0f - b2;
    for (size_t i = i0; i < i1; i++) {
        const float gi = a->g[i];
        const float mi = b1 * a->m[i] + c1 * gi;
        const float vi = b2 * a->v[i] + c2 * (gi * gi);
        a->m[i] = mi;
        a->v[i] = vi;
        a->p[i] -= a->lr * (mi / a->bc1) / (sqrtf(vi / a->bc2) + a->eps);
    }
}

/* Dense: with momentum every parameter moves every step, even where this step's gradient
 * is zero (an inactive latent's encoder column still follows m / sqrt(v)), so skipping
 * them would change the result. Element-wise, so any split gives the same bits. */
void cpu_adam_step(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1,
                      float b2, float eps, int t) {
    /* The bias corrections in double, rounded once; the CUDA kernel gets the same floats. */
    adam_args a = {p, m, v, g, lr, b1, b2, eps, (float)(1.0 - pow((double)b1, t)), (float)(1.0 - pow((double)b2, t))};
    cpu_parallel_for(n, 1 << 16, adam_range, &a);
}

static double row_dot(const float *a, const float *b, int D) {
    double s = 0;
    for (int d = 0; d < D; d++) s += (double)a[d] * b[d];
    return s;
}

typedef struct { float *out, *dW; const float *W; float *Wm; int D; } rows_args;

static void unit_norm_rows(void *p, size_t s0, size_t s1) {
    const rows_args *a = p;
    for (size_t s = s0; s < s1; s++) {
        float *w = a->Wm + s * a->D;
        const double nrm = sqrt(row_dot(w, w, a->D));
        if (nrm > 0)
            for (int d = 0; d < a->D; d++) w[d] = (float)(w[d] / nrm);
    }
}

static void remove_parallel_rows(void *p, size_t s0, size_t s1) {
    const rows_args *a = p;
    for (size_t s = s0; s < s1; s++) {
        float *g = a->dW + s * a->D;
        const float *w = a->W + s * a->D;
        const double par = row_dot(g, w, a->D);
        for (int d = 0; d < a->D; d++) g[d] = (float)(g[d] - par * w[d]);
    }
}

static void norm_rows(void *p, size_t s0, size_t s1) {
    const rows_args *a = p;
    for (size_t s = s0; s < s1; s++) a->out[s] = (float)sqrt(row_dot(a->W + s * a->D, a->W + s * a->D, a->D));
}

void cpu_rows_unit_norm(float *W, int S, int D) {
    // W is (S,D)
    rows_args a = {.Wm = W, .D = D};
    cpu_parallel_for((size_t)S, 256, unit_norm_rows, &a);
}

void cpu_rows_remove_parallel(float *dW, const float *W, int S, int D) {
    // dW, W are (S,D); the rows of W are unit vectors (the caller's promise)
    rows_args a = {.dW = dW, .W = W, .D = D};
    cpu_parallel_for((size_t)S, 256, remove_parallel_rows, &a);
}

void cpu_rows_norm(float *out, const float *W, int S, int D) {
    rows_args a = {.out = out, .W = W, .D = D};
    cpu_parallel_for((size_t)S, 256, norm_rows, &a);
}

/* ---- metrics ---- */

void cpu_sae_recon_sums(double sums[4], const float *x, const float *x_hat, int N, int D) {
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

void cpu_sae_fire_counts(int64_t *counts, const int32_t *idx, const float *val, const float *f,
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
