/* cuda_stub.c: the CUDA back end of a CPU-only build (make CUDA=0), linked in place of
 * the .cu files in kernels/. Every cuda_* entry point reports LP_ERR_NO_CUDA with a
 * hint, so asking for the GPU fails with one clear message instead of a link error; the
 * void ones do nothing. The context's own half (core/device.h) is in ctx_stub.c. */
#include <stdio.h>

#include "ops/ops_internal.h"
#include "ops/graph_ops.h"
#include "ops/sae_track_internal.h"

#define NO_CUDA()                                                                            \
    LP_ERR(LP_ERR_NO_CUDA,                                                                   \
                 "built without CUDA (rebuild with nvcc available, or use --model.device=cpu)")

lp_status cuda_embed(lp_ctx *c, void *out, const int32_t *tok, const void *wte, int N, int D) {
    (void)c; (void)out; (void)tok; (void)wte; (void)N; (void)D;
    return NO_CUDA();
}
lp_status cuda_pos_embed(lp_ctx *c, void *out, const void *wpe, int B, int T, int D) {
    (void)c; (void)out; (void)wpe; (void)B; (void)T; (void)D;
    return NO_CUDA();
}
lp_status cuda_add(lp_ctx *c, void *out, const void *a, const void *b, size_t n) {
    (void)c; (void)out; (void)a; (void)b; (void)n;
    return NO_CUDA();
}
lp_status cuda_init_weights(lp_ctx *c, void *dst, size_t n, uint64_t state, float base) {
    (void)c; (void)dst; (void)n; (void)state; (void)base;
    return NO_CUDA();
}
lp_status cuda_ln_scale(lp_ctx *c, void *scale, const void *x, int N, int D, float eps) {
    (void)c; (void)scale; (void)x; (void)N; (void)D; (void)eps;
    return NO_CUDA();
}
lp_status cuda_ln_apply(lp_ctx *c, void *out, const void *x, const void *scale, const void *w,
                           const void *b, int N, int D) {
    (void)c; (void)out; (void)x; (void)scale; (void)w; (void)b; (void)N; (void)D;
    return NO_CUDA();
}
lp_status cuda_affine(lp_ctx *c, void *out, const void *x, const void *w, const void *b, int N,
                         int D) {
    (void)c; (void)out; (void)x; (void)w; (void)b; (void)N; (void)D;
    return NO_CUDA();
}
lp_status cuda_matmul(lp_ctx *c, void *out, const void *x, const void *w, const void *bias, int N,
                         int K, int M, int w_trans) {
    (void)c; (void)out; (void)x; (void)w; (void)bias; (void)N; (void)K; (void)M; (void)w_trans;
    return NO_CUDA();
}
lp_status cuda_gelu(lp_ctx *c, void *out, const void *x, size_t n) {
    (void)c; (void)out; (void)x; (void)n;
    return NO_CUDA();
}
lp_status cuda_matmul_gelu(lp_ctx *c, void *post, void *pre, const void *x, const void *w, const void *bias, int N,
                              int K, int M, int w_trans) {
    (void)c; (void)post; (void)pre; (void)x; (void)w; (void)bias; (void)N; (void)K; (void)M; (void)w_trans;
    return NO_CUDA();
}
lp_status cuda_attention(lp_ctx *c, void *z, const void *q, const void *k, const void *v, int B,
                            int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    (void)c; (void)z; (void)q; (void)k; (void)v; (void)B; (void)T; (void)H; (void)Hkv; (void)dh; (void)cfg;
    return NO_CUDA();
}
lp_status cuda_attn_scores(lp_ctx *c, void *scores, const void *q, const void *k, int B, int T,
                              int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    (void)c; (void)scores; (void)q; (void)k; (void)B; (void)T; (void)H; (void)Hkv; (void)dh; (void)cfg;
    return NO_CUDA();
}
lp_status cuda_softmax_rows(lp_ctx *c, void *out, const void *x, size_t rows, int cols) {
    (void)c; (void)out; (void)x; (void)rows; (void)cols;
    return NO_CUDA();
}
lp_status cuda_attn_apply(lp_ctx *c, void *z, const void *pattern, const void *v, int B, int T,
                             int H, int Hkv, int dh) {
    (void)c; (void)z; (void)pattern; (void)v; (void)B; (void)T; (void)H; (void)Hkv; (void)dh;
    return NO_CUDA();
}
lp_status cuda_cross_entropy_ld(lp_ctx *c, float *losses, const void *logits, const int32_t *targets,
                                int N, int V, int ld) {
    (void)c; (void)losses; (void)logits; (void)targets; (void)N; (void)V; (void)ld;
    return NO_CUDA();
}
lp_status cuda_cross_entropy(lp_ctx *c, float *losses, const void *logits, const int32_t *targets,
                                int N, int V) {
    (void)c; (void)losses; (void)logits; (void)targets; (void)N; (void)V;
    return NO_CUDA();
}
lp_status cuda_edit_apply(lp_ctx *c, void *act, lp_view v, lp_edit_kind kind, const void *src,
                             float coef, const uint8_t *pos_mask, const uint8_t *head_mask) {
    (void)c; (void)act; (void)v; (void)kind; (void)src; (void)coef; (void)pos_mask; (void)head_mask;
    return NO_CUDA();
}
lp_status cuda_gather_pos(lp_ctx *c, void *dst, const void *act, lp_view v, const int32_t *pos,
                             int npos) {
    (void)c; (void)dst; (void)act; (void)v; (void)pos; (void)npos;
    return NO_CUDA();
}

/* Llama-family ops (kernels/llama.cu) */
lp_status cuda_rms_scale(lp_ctx *c, void *scale, const void *x, int N, int D, float eps) {
    (void)c; (void)scale; (void)x; (void)N; (void)D; (void)eps;
    return NO_CUDA();
}
lp_status cuda_rms_apply(lp_ctx *c, void *out, const void *x, const void *scale, const void *w, int N,
                            int D) {
    (void)c; (void)out; (void)x; (void)scale; (void)w; (void)N; (void)D;
    return NO_CUDA();
}
lp_status cuda_rope(lp_ctx *c, void *out, const void *x, const float *cos_t, const float *sin_t, int B,
                       int T, int H, int dh, int pos0) {
    (void)c; (void)out; (void)x; (void)cos_t; (void)sin_t; (void)B; (void)T; (void)H; (void)dh; (void)pos0;
    return NO_CUDA();
}
lp_status cuda_silu_mul(lp_ctx *c, void *out, const void *gate, const void *up, size_t n) {
    (void)c; (void)out; (void)gate; (void)up; (void)n;
    return NO_CUDA();
}
lp_status cuda_attention_cached(lp_ctx *c, void *z, const void *q, const void *kc, const void *vc,
                                   int B, int Tq, int Tcap, int pos0, int H, int Hkv, int dh,
                                   const lp_attn_cfg *cfg) {
    (void)c; (void)z; (void)q; (void)kc; (void)vc; (void)B; (void)Tq; (void)Tcap; (void)pos0; (void)H; (void)Hkv; (void)dh;
    (void)cfg;
    return NO_CUDA();
}

/* Gemma-family ops (kernels/gemma.cu) */
lp_status cuda_gelu_mul(lp_ctx *c, void *out, const void *gate, const void *up, size_t n) {
    (void)c; (void)out; (void)gate; (void)up; (void)n;
    return NO_CUDA();
}
lp_status cuda_softcap(lp_ctx *c, void *out, const void *x, float cap, size_t n) {
    (void)c; (void)out; (void)x; (void)cap; (void)n;
    return NO_CUDA();
}
lp_status cuda_scale(lp_ctx *c, void *out, const void *x, float s, size_t n) {
    (void)c; (void)out; (void)x; (void)s; (void)n;
    return NO_CUDA();
}
lp_status cuda_gelu_mul_backward(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate,
                                    const void *up, size_t n) {
    (void)c; (void)dgate; (void)dup; (void)dy; (void)gate; (void)up; (void)n;
    return NO_CUDA();
}
lp_status cuda_softcap_backward(lp_ctx *c, void *dx, const void *dy, const void *y, float cap, size_t n) {
    (void)c; (void)dx; (void)dy; (void)y; (void)cap; (void)n;
    return NO_CUDA();
}

/* ggml dequantization (kernels/dequant.cu) */
lp_status cuda_dequant(lp_ctx *c, void *dst, lp_dtype dst_dtype, const void *src, int type, int64_t n) {
    (void)c; (void)dst; (void)dst_dtype; (void)src; (void)type; (void)n;
    return NO_CUDA();
}

/* ==== SAE ops (kernels/sae.cu) ==== */
lp_status cuda_matmul_at(lp_ctx *c, float *out, const float *a, const float *b, int N, int K, int M,
                            float beta) {
    (void)c; (void)out; (void)a; (void)b; (void)N; (void)K; (void)M; (void)beta;
    return NO_CUDA();
}
lp_status cuda_col_sum(lp_ctx *c, float *out, const float *x, int N, int M, float beta) {
    (void)c; (void)out; (void)x; (void)N; (void)M; (void)beta;
    return NO_CUDA();
}
lp_status cuda_sae_topk(lp_ctx *c, int32_t *idx, float *val, const float *pre, int N, int S, int K) {
    (void)c; (void)idx; (void)val; (void)pre; (void)N; (void)S; (void)K;
    return NO_CUDA();
}
lp_status cuda_sae_kth_largest(lp_ctx *c, float *t, const float *pre, size_t n, size_t count) {
    (void)c; (void)t; (void)pre; (void)n; (void)count;
    return NO_CUDA();
}
lp_status cuda_sae_radix_hist(lp_ctx *c, int64_t *hist, const float *pre, size_t n, uint32_t prefix, uint32_t mask, int shift) {
    (void)c; (void)hist; (void)pre; (void)n; (void)prefix; (void)mask; (void)shift;
    return NO_CUDA();
}
lp_status cuda_sae_decode_sparse(lp_ctx *c, float *out, const int32_t *idx, const float *val,
                                    const float *W, const float *bias, int N, int K, int D) {
    (void)c; (void)out; (void)idx; (void)val; (void)W; (void)bias; (void)N; (void)K; (void)D;
    return NO_CUDA();
}
lp_status cuda_sae_decode_sparse_grad(lp_ctx *c, float *dval, float *dW, const float *dout,
                                         const int32_t *idx, const float *val, const float *W, int N,
                                         int K, int D) {
    (void)c; (void)dval; (void)dW; (void)dout; (void)idx; (void)val; (void)W; (void)N; (void)K; (void)D;
    return NO_CUDA();
}
lp_status cuda_sae_encode_sparse_grad(lp_ctx *c, float *dW_enc, float *db_enc, const float *x,
                                         const int32_t *idx, const float *dpre, int N, int K, int D,
                                         int S) {
    (void)c; (void)dW_enc; (void)db_enc; (void)x; (void)idx; (void)dpre; (void)N; (void)K; (void)D; (void)S;
    return NO_CUDA();
}
lp_status cuda_sae_relu(lp_ctx *c, float *f, const float *pre, size_t n) {
    (void)c; (void)f; (void)pre; (void)n;
    return NO_CUDA();
}
lp_status cuda_sae_jumprelu(lp_ctx *c, float *f, const float *pre, const float *theta, int N, int S) {
    (void)c; (void)f; (void)pre; (void)theta; (void)N; (void)S;
    return NO_CUDA();
}
lp_status cuda_sae_relu_grad(lp_ctx *c, float *dpre, const float *df, const float *pre, size_t n) {
    (void)c; (void)dpre; (void)df; (void)pre; (void)n;
    return NO_CUDA();
}
lp_status cuda_sae_l1_relu_grad(lp_ctx *c, float *dpre, float *db, float *fsum, const float *df, const float *pre,
                                const float *w, int N, int S) {
    (void)c; (void)dpre; (void)db; (void)fsum; (void)df; (void)pre; (void)w; (void)N; (void)S;
    return NO_CUDA();
}
lp_status cuda_sae_jumprelu_grad(lp_ctx *c, float *dpre, float *dtheta, const float *df,
                                    const float *pre, const float *theta, float eps, float l0_coef,
                                    int N, int S) {
    (void)c; (void)dpre; (void)dtheta; (void)df; (void)pre; (void)theta; (void)eps; (void)l0_coef; (void)N; (void)S;
    return NO_CUDA();
}
lp_status cuda_adam_step(lp_ctx *c, float *p, const float *g, float *m, float *v, size_t n, float lr,
                            float b1, float b2, float eps, int t) {
    (void)c; (void)p; (void)g; (void)m; (void)v; (void)n; (void)lr; (void)b1; (void)b2; (void)eps; (void)t;
    return NO_CUDA();
}
lp_status cuda_rows_unit_norm(lp_ctx *c, float *W, int S, int D) {
    (void)c; (void)W; (void)S; (void)D;
    return NO_CUDA();
}
lp_status cuda_rows_remove_parallel(lp_ctx *c, float *dW, const float *W, int S, int D) {
    (void)c; (void)dW; (void)W; (void)S; (void)D;
    return NO_CUDA();
}
lp_status cuda_rows_norm(lp_ctx *c, float *out, const float *W, int S, int D) {
    (void)c; (void)out; (void)W; (void)S; (void)D;
    return NO_CUDA();
}
lp_status cuda_sae_recon_sums(lp_ctx *c, double sums[4], const float *x, const float *x_hat, int N,
                                 int D) {
    (void)c; (void)sums; (void)x; (void)x_hat; (void)N; (void)D;
    return NO_CUDA();
}
lp_status cuda_sae_fire_counts(lp_ctx *c, int64_t *counts, const int32_t *idx, const float *val,
                                  const float *f, int N, int K, int S) {
    (void)c; (void)counts; (void)idx; (void)val; (void)f; (void)N; (void)K; (void)S;
    return NO_CUDA();
}
lp_status cuda_sae_scale(lp_ctx *c, float *x, float alpha, size_t n) {
    (void)c; (void)x; (void)alpha; (void)n;
    return NO_CUDA();
}
lp_status cuda_sae_encode_sparse_input_grad(lp_ctx *c, float *dx, const float *dpre, const int32_t *idx,
                                               const float *W_enc, int N, int K, int D, int S) {
    (void)c; (void)dx; (void)dpre; (void)idx; (void)W_enc; (void)N; (void)K; (void)D; (void)S;
    return NO_CUDA();
}

/* ---- backward ops ---- */
lp_status cuda_ln_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale,
                              const void *w, int N, int D) {
    (void)c; (void)dx; (void)dy; (void)x; (void)scale; (void)w; (void)N; (void)D;
    return NO_CUDA();
}
lp_status cuda_rms_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale,
                               const void *w, int N, int D) {
    (void)c; (void)dx; (void)dy; (void)x; (void)scale; (void)w; (void)N; (void)D;
    return NO_CUDA();
}
lp_status cuda_gelu_backward(lp_ctx *c, void *dx, const void *dy, const void *x, size_t n) {
    (void)c; (void)dx; (void)dy; (void)x; (void)n;
    return NO_CUDA();
}
lp_status cuda_silu_mul_backward(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate,
                                    const void *up, size_t n) {
    (void)c; (void)dgate; (void)dup; (void)dy; (void)gate; (void)up; (void)n;
    return NO_CUDA();
}
lp_status cuda_rope_backward(lp_ctx *c, void *dx, const void *dy, const float *cos_t, const float *sin_t,
                                int B, int T, int H, int dh, int pos0) {
    (void)c; (void)dx; (void)dy; (void)cos_t; (void)sin_t; (void)B; (void)T; (void)H; (void)dh; (void)pos0;
    return NO_CUDA();
}
lp_status cuda_attention_backward(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q,
                                     const void *k, const void *v, int B, int T, int H, int Hkv, int dh,
                                     const lp_attn_cfg *cfg) {
    (void)c; (void)dq; (void)dk; (void)dv; (void)dz; (void)q; (void)k; (void)v;
    (void)B; (void)T; (void)H; (void)Hkv; (void)dh; (void)cfg;
    return NO_CUDA();
}
lp_status cuda_attention_backward_suffix(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q,
                                         const void *k, const void *v, int B, int Tq, int pos0, int H, int Hkv, int dh,
                                         const lp_attn_cfg *cfg) {
    (void)c; (void)dq; (void)dk; (void)dv; (void)dz; (void)q; (void)k; (void)v;
    (void)B; (void)Tq; (void)pos0; (void)H; (void)Hkv; (void)dh; (void)cfg;
    return NO_CUDA();
}
lp_status cuda_attn_apply_backward(lp_ctx *c, void *dpattern, void *dv, const void *dz, const void *pattern,
                                      const void *v, int B, int T, int H, int Hkv, int dh) {
    (void)c; (void)dpattern; (void)dv; (void)dz; (void)pattern; (void)v;
    (void)B; (void)T; (void)H; (void)Hkv; (void)dh;
    return NO_CUDA();
}
lp_status cuda_softmax_rows_backward(lp_ctx *c, void *dx, const void *dy, const void *y, size_t rows,
                                        int cols) {
    (void)c; (void)dx; (void)dy; (void)y; (void)rows; (void)cols;
    return NO_CUDA();
}
lp_status cuda_attn_scores_backward(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *scores,
                                       const void *q, const void *k, int B, int T, int H, int Hkv, int dh,
                                       const lp_attn_cfg *cfg) {
    (void)c; (void)dq; (void)dk; (void)dscores; (void)scores; (void)q; (void)k; (void)B; (void)T; (void)H; (void)Hkv;
    (void)dh; (void)cfg;
    return NO_CUDA();
}
lp_status cuda_xent_backward_ld(lp_ctx *c, void *dlogits, const void *logits, const int32_t *targets,
                                const float *scale, int N, int V, int ld) {
    (void)c; (void)dlogits; (void)logits; (void)targets; (void)scale; (void)N; (void)V; (void)ld;
    return NO_CUDA();
}
lp_status cuda_xent_backward(lp_ctx *c, void *dlogits, const void *logits, const int32_t *targets,
                                const float *scale, int N, int V) {
    (void)c; (void)dlogits; (void)logits; (void)targets; (void)scale; (void)N; (void)V;
    return NO_CUDA();
}

lp_status cuda_norm_scale_grad(lp_ctx *c, void *dscale, const void *dy, const void *x, const void *scale, const void *w,
                                  int N, int D, int center) {
    (void)c; (void)dscale; (void)dy; (void)x; (void)scale; (void)w; (void)N; (void)D; (void)center;
    return NO_CUDA();
}

/* ---- ops/graph_ops.h: the replacement model's backward on the device ---- */
lp_status cuda_fz_gemm(lp_ctx *c, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda, long long sA,
                       const float *B, int ldb, long long sB, float beta, float *C, int ldc, long long sC, int batch) {
    (void)c; (void)ta; (void)tb; (void)M; (void)N; (void)K; (void)alpha; (void)A; (void)lda; (void)sA; (void)B; (void)ldb;
    (void)sB; (void)beta; (void)C; (void)ldc; (void)sC; (void)batch;
    return NO_CUDA();
}
lp_status cuda_fz_causal_softmax(lp_ctx *c, float *P, int rows, int Tm, int win, float cap) {
    (void)c; (void)P; (void)rows; (void)Tm; (void)win; (void)cap;
    return NO_CUDA();
}
lp_status cuda_fz_norm_back_add(lp_ctx *c, float *dst, const float *g, const float *w, const float *s, int R, int Tm, int D,
                                int centre) {
    (void)c; (void)dst; (void)g; (void)w; (void)s; (void)R; (void)Tm; (void)D; (void)centre;
    return NO_CUDA();
}
lp_status cuda_fz_inject(lp_ctx *c, float *g, int L, int R, int Tm, int D, const int *layer, const int *pos, const float *vec) {
    (void)c; (void)g; (void)L; (void)R; (void)Tm; (void)D; (void)layer; (void)pos; (void)vec;
    return NO_CUDA();
}
lp_status cuda_fz_row_dots(lp_ctx *c, float *out, long long ldo, const float *G, const float *E, int R, int Tm, int D) {
    (void)c; (void)out; (void)ldo; (void)G; (void)E; (void)R; (void)Tm; (void)D;
    return NO_CUDA();
}
lp_status cuda_fz_feature_dots(lp_ctx *c, float *out, long long ldo, const float *G, int R, int Tm, int D, const int *pstart,
                               const int *feat, const float *act, const float *W) {
    (void)c; (void)out; (void)ldo; (void)G; (void)R; (void)Tm; (void)D; (void)pstart; (void)feat; (void)act; (void)W;
    return NO_CUDA();
}
lp_status cuda_fz_mem_info(lp_ctx *c, size_t *free_b, size_t *total_b) {
    (void)c; (void)free_b; (void)total_b;
    return NO_CUDA();
}
lp_status cuda_sae_topk_among(lp_ctx *c, int32_t *idx, float *val, const float *pre, const int32_t *cand, int n_cand,
                              int N, int S, int K) {
    (void)c; (void)idx; (void)val; (void)pre; (void)cand; (void)n_cand; (void)N; (void)S; (void)K;
    return NO_CUDA();
}
lp_status cuda_sae_latent_lists(lp_ctx *c, int32_t *lists, const int32_t *idx, int N, int K, int S) {
    (void)c; (void)lists; (void)idx; (void)N; (void)K; (void)S;
    return NO_CUDA();
}
lp_status cuda_sae_encode_sparse_grad_lists(lp_ctx *c, float *dW_enc, float *db_enc, const float *x,
                                            const int32_t *lists, const float *dpre, int N, int K, int D, int S) {
    (void)c; (void)dW_enc; (void)db_enc; (void)x; (void)lists; (void)dpre; (void)N; (void)K; (void)D; (void)S;
    return NO_CUDA();
}
lp_status cuda_sae_decode_sparse_grad_lists(lp_ctx *c, float *dval, float *dW, const float *dout, const int32_t *idx,
                                            const int32_t *lists, const float *val, const float *W, int N, int K, int D,
                                            int S) {
    (void)c; (void)dval; (void)dW; (void)dout; (void)idx; (void)lists; (void)val; (void)W; (void)N; (void)K; (void)D; (void)S;
    return NO_CUDA();
}
lp_status cuda_sae_to_bf16(lp_ctx *c, uint16_t *dst, const float *src, size_t n) {
    (void)c; (void)dst; (void)src; (void)n;
    return NO_CUDA();
}
lp_status cuda_sae_matmul_bf16(lp_ctx *c, float *out, const uint16_t *x, const uint16_t *w, const float *bias, int N,
                               int K, int M) {
    (void)c; (void)out; (void)x; (void)w; (void)bias; (void)N; (void)K; (void)M;
    return NO_CUDA();
}
lp_status cuda_diff_dot_rows(lp_ctx *c, float *out, const void *a, const void *b, const void *g, size_t rows, size_t per) {
    (void)c; (void)out; (void)a; (void)b; (void)g; (void)rows; (void)per;
    return NO_CUDA();
}

/* include/loupe/sae_track.h */
lp_status cuda_sae_recon_sums_dev(lp_ctx *c, double *sums, const float *x, const float *x_hat, int N, int D) {
    (void)c; (void)sums; (void)x; (void)x_hat; (void)N; (void)D;
    return NO_CUDA();
}
lp_status cuda_sae_dead_update(lp_ctx *c, int64_t *since, int32_t *cand, double *trk, const int64_t *counts, int S,
                               int64_t tokens, int64_t window) {
    (void)c; (void)since; (void)cand; (void)trk; (void)counts; (void)S; (void)tokens; (void)window;
    return NO_CUDA();
}
lp_status cuda_sae_l1_term(lp_ctx *c, double *trk, const float *colsum, const float *norms, int S) {
    (void)c; (void)trk; (void)colsum; (void)norms; (void)S;
    return NO_CUDA();
}
lp_status cuda_sae_track_step(lp_ctx *c, double *trk, const lp_sae_track_step_args *a) {
    (void)c; (void)trk; (void)a;
    return NO_CUDA();
}
lp_status cuda_sae_batch_threshold(lp_ctx *c, float *thr, double *t, const float *pre, size_t n, size_t count, int S) {
    (void)c; (void)thr; (void)t; (void)pre; (void)n; (void)count; (void)S;
    return NO_CUDA();
}
lp_status cuda_sae_topk_among_counted(lp_ctx *c, int32_t *idx, float *val, const float *pre, const int32_t *cand,
                                      const double *n_cand, int N, int S, int K) {
    (void)c; (void)idx; (void)val; (void)pre; (void)cand; (void)n_cand; (void)N; (void)S; (void)K;
    return NO_CUDA();
}
