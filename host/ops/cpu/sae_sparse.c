/* sae_sparse.c: CPU twins of the SAE ops that the GPU path added for sparse training
 * (include/loupe/sae_ops.h): top-K over a candidate list (AuxK's dead latents), latent-major
 * entry lists and the encoder gradient taken from them, and the bf16 encoder GEMM. The
 * CUDA twins: kernels/sae_select.cu, kernels/sae_lists.cu, kernels/matmul.cu. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3")
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ops/ops_internal.h"

/* ---- top-K among candidates ----
 * Per row, the candidates' values are gathered into n_cand floats and the row's top
 * m = min(K, n_cand) taken there; positions map back through cand, whose increasing order
 * keeps the ties' lower-latent-first rule. With fewer candidates than K (AuxK over fewer dead
 * latents than aux_k, lp_sae_topk_among_counted) the rest of the row is padding of value 0
 * that adds nothing downstream. Memory is one gathered row per thread, never [N, S]. */
typedef struct {
    int32_t *idx;
    float *val;
    const float *pre;
    const int32_t *cand;
    int n_cand, S, K;
    volatile int oom;
} among_args;

static void among_rows(void *p, size_t n0, size_t n1) {
    among_args *a = p;
    const int m = a->K < a->n_cand ? a->K : a->n_cand;
    float *row = malloc((size_t)(a->n_cand ? a->n_cand : 1) * sizeof(float));
    if (!row) {
        a->oom = 1; /* set by any thread that fails: the caller reports it */
        return;
    }
    for (size_t n = n0; n < n1; n++) {
        int32_t *h = a->idx + n * a->K;
        float *v = a->val + n * a->K;
        if (m > 0) {
            const float *pr = a->pre + n * a->S;
            for (int i = 0; i < a->n_cand; i++) row[i] = pr[a->cand[i]];
            cpu_sae_topk_row(h, v, row, a->n_cand, m);
            for (int j = 0; j < m; j++) h[j] = a->cand[h[j]];
        }
        for (int j = m; j < a->K; j++) h[j] = (int32_t)((n * a->K + j) % (size_t)a->S), v[j] = 0.0f;
    }
    free(row);
}

lp_status cpu_sae_topk_among(int32_t *idx, float *val, const float *pre, const int32_t *cand, int n_cand, int N, int S,
                             int K) {
    among_args a = {idx, val, pre, cand, n_cand, S, K, 0};
    cpu_parallel_for((size_t)N, 16, among_rows, &a);
    if (a.oom) LP_FAIL(LP_ERR_OOM, "sae_topk_among: out of memory for a row of %d candidates", n_cand);
    return LP_OK;
}

/* ---- latent-major lists ----
 * A stable counting sort of the entries by latent: counts, their prefix sums, then the
 * entries in token order, so a latent's list is in token order. */
void cpu_sae_latent_lists(int32_t *lists, const int32_t *idx, int N, int K, int S) {
    int32_t *start = lists, *fill = lists + S + 1, *ent = lists + 2 * (size_t)S + 1;
    const size_t NK = (size_t)N * K;
    memset(start, 0, ((size_t)S + 1) * sizeof(int32_t));
    for (size_t e = 0; e < NK; e++) start[idx[e] + 1]++;
    for (int s = 0; s < S; s++) start[s + 1] += start[s];
    memcpy(fill, start, (size_t)S * sizeof(int32_t));
    for (size_t e = 0; e < NK; e++) ent[fill[idx[e]]++] = (int32_t)e;
}

enum { TILE = 16 }; /* latents per tile of dW_enc: one 64-byte line of each of its D rows */

typedef struct {
    float *dW, *db;
    const float *x, *dpre;
    const int32_t *start, *ent;
    int K, D, S;
} lists_grad_args;

/* Tiles [t0, t1) of TILE latents: each tile's columns of dW_enc are read into a scratch
 * block of rows, take their latents' terms in token order, and go back (each cache line of
 * dW_enc read and written once; a thread owns whole columns). */
static void lists_grad_tiles(void *p, size_t t0, size_t t1) {
    const lists_grad_args *a = p;
    const int D = a->D, S = a->S;
    float t[TILE * 1024];
    for (size_t b = t0; b < t1; b++) {
        const size_t s0 = b * TILE;
        const int nb = (size_t)S - s0 < TILE ? (int)(S - s0) : TILE;
        if (a->start[s0] == a->start[s0 + nb]) continue; /* no latent of the tile was chosen */
        for (int q = 0; q < nb; q++) {
            float acc = a->db[s0 + q];
            for (int32_t r = a->start[s0 + q]; r < a->start[s0 + q + 1]; r++) acc += a->dpre[a->ent[r]];
            a->db[s0 + q] = acc;
        }
        for (int d0 = 0; d0 < D; d0 += 1024) { /* D in slices that fit the stack block */
            const int nd = D - d0 < 1024 ? D - d0 : 1024;
            for (int d = 0; d < nd; d++)
                for (int q = 0; q < nb; q++) t[(size_t)q * nd + d] = a->dW[(size_t)(d0 + d) * S + s0 + q];
            for (int q = 0; q < nb; q++) {
                float *tq = t + (size_t)q * nd;
                for (int32_t r = a->start[s0 + q]; r < a->start[s0 + q + 1]; r++) {
                    const int32_t e = a->ent[r];
                    const float g = a->dpre[e], *xr = a->x + (size_t)(e / a->K) * D + d0;
                    for (int d = 0; d < nd; d++) tq[d] += xr[d] * g;
                }
            }
            for (int d = 0; d < nd; d++)
                for (int q = 0; q < nb; q++) a->dW[(size_t)(d0 + d) * S + s0 + q] = t[(size_t)q * nd + d];
        }
    }
}

void cpu_sae_encode_sparse_grad_lists(float *dW_enc, float *db_enc, const float *x, const int32_t *lists,
                                      const float *dpre, int N, int K, int D, int S) {
    (void)N;
    lists_grad_args a = {dW_enc, db_enc, x, dpre, lists, lists + 2 * (size_t)S + 1, K, D, S};
    cpu_parallel_for((size_t)(S + TILE - 1) / TILE, 4, lists_grad_tiles, &a);
}

/* ---- bf16 ---- */

void cpu_sae_to_bf16(uint16_t *dst, const float *src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = lp_f32_to_bf16(src[i]);
}

/* The bf16 values widened exactly to fp32, then the F32 GEMM (OpenBLAS): fp32 products of
 * bf16 values are exact, so this is the fp32-accumulated sum the GPU's tensor cores form,
 * up to summation order. */
lp_status cpu_sae_matmul_bf16(float *out, const uint16_t *x, const uint16_t *w, const float *bias, int N, int K, int M) {
    float *xf = malloc((size_t)N * K * sizeof(float)), *wf = malloc((size_t)K * M * sizeof(float));
    if (!xf || !wf) {
        free(xf), free(wf);
        LP_FAIL(LP_ERR_OOM, "sae_matmul_bf16: out of memory for the widened operands (%d x %d, %d x %d)", N, K, K, M);
    }
    for (size_t i = 0; i < (size_t)N * K; i++) xf[i] = lp_bf16_to_f32(x[i]);
    for (size_t i = 0; i < (size_t)K * M; i++) wf[i] = lp_bf16_to_f32(w[i]);
    cpu_matmul(out, xf, wf, bias, N, K, M, 0);
    free(xf), free(wf);
    return LP_OK;
}
