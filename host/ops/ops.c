/* host/ops/: the ops layer, above core/: every numeric op in one place, with its CPU
 * reference in ops/cpu/ and its CUDA twin in kernels/; dispatch here (ops.c), for the SAE
 * ops (sae_ops.c) and for dequantization with the ggml type table (quant.c, ggml_types.c).
 * Nothing in it knows about models, files or hooks.
 *
 * ops.c: the one dispatch point for every op in include/loupe/ops.h.
 * Checks arguments once, then calls the CPU reference (host/ops/cpu/) or the CUDA
 * kernel (kernels/) by the context's device. */
#include <math.h>

#include "loupe/ops.h"
#include "ops/ops_internal.h"

#define NEED(cond, ...)                                                                       \
    do {                                                                                      \
        if (!(cond)) LP_FAIL(LP_ERR_ARG, __VA_ARGS__);                                        \
    } while (0)
#define CPU(c) ((c)->device == LP_CPU)

lp_status lp_embed(lp_ctx *c, void *out, const int32_t *tok, const void *wte, int N, int D) {
    NEED(N >= 0 && D > 0 && out && tok && wte, "embed: bad arguments (N=%d D=%d)", N, D);
    if (CPU(c)) { cpu_embed(out, tok, wte, N, D); return LP_OK; }
    return cuda_embed(c, out, tok, wte, N, D);
}

lp_status lp_pos_embed(lp_ctx *c, void *out, const void *wpe, int B, int T, int D) {
    NEED(B >= 0 && T >= 0 && D > 0 && out && wpe, "pos_embed: bad arguments");
    if (CPU(c)) { cpu_pos_embed(out, wpe, B, T, D); return LP_OK; }
    return cuda_pos_embed(c, out, wpe, B, T, D);
}

lp_status lp_add(lp_ctx *c, void *out, const void *a, const void *b, size_t n) {
    NEED(out && a && b, "add: null buffer");
    if (CPU(c)) { cpu_add(out, a, b, n); return LP_OK; }
    return cuda_add(c, out, a, b, n);
}

lp_status lp_ln_scale(lp_ctx *c, void *scale, const void *x, int N, int D, float eps) {
    NEED(N >= 0 && D > 0 && scale && x && eps >= 0, "ln_scale: bad arguments (N=%d D=%d)", N, D);
    if (CPU(c)) { cpu_ln_scale(scale, x, N, D, eps); return LP_OK; }
    return cuda_ln_scale(c, scale, x, N, D, eps);
}

lp_status lp_ln_apply(lp_ctx *c, void *out, const void *x, const void *scale, const void *w,
                      const void *b, int N, int D) {
    NEED(N >= 0 && D > 0 && out && x && scale, "ln_apply: bad arguments (N=%d D=%d)", N, D);
    if (CPU(c)) { cpu_ln_apply(out, x, scale, w, b, N, D); return LP_OK; }
    return cuda_ln_apply(c, out, x, scale, w, b, N, D);
}

lp_status lp_affine(lp_ctx *c, void *out, const void *x, const void *w, const void *b, int N, int D) {
    NEED(N >= 0 && D > 0 && out && x && w, "affine: bad arguments");
    if (CPU(c)) { cpu_affine(out, x, w, b, N, D); return LP_OK; }
    return cuda_affine(c, out, x, w, b, N, D);
}

lp_status lp_matmul(lp_ctx *c, void *out, const void *x, const void *w, const void *bias, int N,
                    int K, int M, int w_trans) {
    NEED(N >= 0 && K > 0 && M > 0 && out && x && w, "matmul: bad arguments (N=%d K=%d M=%d)", N, K, M);
    if (N == 0) return LP_OK;
    if (CPU(c)) { cpu_matmul(out, x, w, bias, N, K, M, w_trans); return LP_OK; }
    return cuda_matmul(c, out, x, w, bias, N, K, M, w_trans);
}

lp_status lp_matmul_gelu(lp_ctx *c, void *post, void *pre, const void *x, const void *w, const void *bias, int N, int K,
                         int M, int w_trans) {
    NEED(N >= 0 && K > 0 && M > 0 && post && pre && x && w && post != pre,
         "matmul_gelu: bad arguments (N=%d K=%d M=%d)", N, K, M);
    if (N == 0) return LP_OK;
    if (CPU(c)) {
        cpu_matmul(pre, x, w, bias, N, K, M, w_trans);
        cpu_gelu(post, pre, (size_t)N * M);
        return LP_OK;
    }
    return cuda_matmul_gelu(c, post, pre, x, w, bias, N, K, M, w_trans);
}

lp_status lp_gelu(lp_ctx *c, void *out, const void *x, size_t n) {
    NEED(out && x, "gelu: null buffer");
    if (CPU(c)) { cpu_gelu(out, x, n); return LP_OK; }
    return cuda_gelu(c, out, x, n);
}

/* dh <= 256: the CUDA kernels keep a query row in registers, 8 values per lane */
#define ATTN_ARGS_OK(B, T, H, Hkv, dh) ((B) >= 0 && (T) >= 0 && (H) > 0 && (Hkv) > 0 && (H) % (Hkv) == 0 && (dh) > 0 && (dh) <= 256)

/* The attention options: NULL is the zeroed cfg (causal, 1/sqrt(dh), no cap); negative or
 * non-finite values are errors (a NaN fails every comparison). */
static const lp_attn_cfg NO_CFG = {0.0f, 0.0f, 0};
static lp_status cfg_check(const char *op, const lp_attn_cfg *g) {
    NEED(g->scale >= 0 && isfinite(g->scale) && g->softcap >= 0 && isfinite(g->softcap) && g->window >= 0,
         "%s: bad attention options (scale=%g softcap=%g window=%d)", op, (double)g->scale, (double)g->softcap,
         g->window);
    return LP_OK;
}
#define CHECK_CFG(op, cfg)                                                                                   \
    do {                                                                                                     \
        if (!(cfg)) (cfg) = &NO_CFG;                                                                         \
        LP_CHECK(cfg_check(op, cfg));                                                                        \
    } while (0)

lp_status lp_attention(lp_ctx *c, void *z, const void *q, const void *k, const void *v, int B,
                       int T, int H, int Hkv, int dh) {
    return lp_attention_cfg(c, z, q, k, v, B, T, H, Hkv, dh, NULL);
}

lp_status lp_attention_cfg(lp_ctx *c, void *z, const void *q, const void *k, const void *v, int B, int T, int H, int Hkv,
                           int dh, const lp_attn_cfg *cfg) {
    NEED(ATTN_ARGS_OK(B, T, H, Hkv, dh) && z && q && k && v, "attention: bad arguments (H=%d Hkv=%d dh=%d)", H, Hkv, dh);
    CHECK_CFG("attention", cfg);
    if (CPU(c)) { cpu_attention(z, q, k, v, B, T, H, Hkv, dh, cfg); return LP_OK; }
    return cuda_attention(c, z, q, k, v, B, T, H, Hkv, dh, cfg);
}

lp_status lp_attn_scores(lp_ctx *c, void *scores, const void *q, const void *k, int B, int T,
                         int H, int Hkv, int dh) {
    return lp_attn_scores_cfg(c, scores, q, k, B, T, H, Hkv, dh, NULL);
}

lp_status lp_attn_scores_cfg(lp_ctx *c, void *scores, const void *q, const void *k, int B, int T, int H, int Hkv, int dh,
                             const lp_attn_cfg *cfg) {
    NEED(ATTN_ARGS_OK(B, T, H, Hkv, dh) && scores && q && k, "attn_scores: bad arguments");
    CHECK_CFG("attn_scores", cfg);
    if (CPU(c)) { cpu_attn_scores(scores, q, k, B, T, H, Hkv, dh, cfg); return LP_OK; }
    return cuda_attn_scores(c, scores, q, k, B, T, H, Hkv, dh, cfg);
}

lp_status lp_softmax_rows(lp_ctx *c, void *out, const void *x, size_t rows, int cols) {
    NEED(cols > 0 && out && x, "softmax_rows: bad arguments");
    if (CPU(c)) { cpu_softmax_rows(out, x, rows, cols); return LP_OK; }
    return cuda_softmax_rows(c, out, x, rows, cols);
}

lp_status lp_attn_apply(lp_ctx *c, void *z, const void *pattern, const void *v, int B, int T,
                        int H, int Hkv, int dh) {
    NEED(ATTN_ARGS_OK(B, T, H, Hkv, dh) && z && pattern && v, "attn_apply: bad arguments");
    if (CPU(c)) { cpu_attn_apply(z, pattern, v, B, T, H, Hkv, dh); return LP_OK; }
    return cuda_attn_apply(c, z, pattern, v, B, T, H, Hkv, dh);
}

/* ---- Llama family ---- */

lp_status lp_rms_scale(lp_ctx *c, void *scale, const void *x, int N, int D, float eps) {
    NEED(N >= 0 && D > 0 && scale && x && eps >= 0, "rms_scale: bad arguments (N=%d D=%d eps=%g)", N, D, (double)eps);
    if (CPU(c)) { cpu_rms_scale(scale, x, N, D, eps); return LP_OK; }
    return cuda_rms_scale(c, scale, x, N, D, eps);
}

lp_status lp_rms_apply(lp_ctx *c, void *out, const void *x, const void *scale, const void *w, int N, int D) {
    NEED(N >= 0 && D > 0 && out && x && scale, "rms_apply: bad arguments (N=%d D=%d)", N, D);
    if (CPU(c)) { cpu_rms_apply(out, x, scale, w, N, D); return LP_OK; }
    return cuda_rms_apply(c, out, x, scale, w, N, D);
}

/* The tables' length n_pos is not passed: pos0 + T <= n_pos is the caller's promise. */
lp_status lp_rope(lp_ctx *c, void *out, const void *x, const float *cos_t, const float *sin_t, int B, int T,
                  int H, int dh, int pos0) {
    NEED(B >= 0 && T >= 0 && H > 0 && dh > 0 && dh % 2 == 0 && pos0 >= 0 && out && x && cos_t && sin_t,
         "rope: bad arguments (H=%d dh=%d pos0=%d; dh must be even)", H, dh, pos0);
    if (CPU(c)) { cpu_rope(out, x, cos_t, sin_t, B, T, H, dh, pos0); return LP_OK; }
    return cuda_rope(c, out, x, cos_t, sin_t, B, T, H, dh, pos0);
}

lp_status lp_silu_mul(lp_ctx *c, void *out, const void *gate, const void *up, size_t n) {
    NEED(out && gate && up, "silu_mul: null buffer");
    if (CPU(c)) { cpu_silu_mul(out, gate, up, n); return LP_OK; }
    return cuda_silu_mul(c, out, gate, up, n);
}

lp_status lp_attention_cached(lp_ctx *c, void *z, const void *q, const void *kc, const void *vc, int B, int Tq,
                              int Tcap, int pos0, int H, int Hkv, int dh) {
    return lp_attention_cached_cfg(c, z, q, kc, vc, B, Tq, Tcap, pos0, H, Hkv, dh, NULL);
}

lp_status lp_attention_cached_cfg(lp_ctx *c, void *z, const void *q, const void *kc, const void *vc, int B, int Tq,
                                  int Tcap, int pos0, int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    NEED(ATTN_ARGS_OK(B, Tq, H, Hkv, dh) && z && q && kc && vc, "attention_cached: bad arguments (H=%d Hkv=%d dh=%d)",
         H, Hkv, dh);
    NEED(pos0 >= 0 && Tcap >= 0 && (long long)pos0 + Tq <= Tcap,
         "attention_cached: positions %d .. %lld do not fit a cache of %d", pos0, (long long)pos0 + Tq - 1, Tcap);
    CHECK_CFG("attention_cached", cfg);
    if (CPU(c)) { cpu_attention_cached(z, q, kc, vc, B, Tq, Tcap, pos0, H, Hkv, dh, cfg); return LP_OK; }
    return cuda_attention_cached(c, z, q, kc, vc, B, Tq, Tcap, pos0, H, Hkv, dh, cfg);
}

/* ---- a query suffix over all keys ---- */

#define SUFFIX_OK(B, Tq, pos0, H, Hkv, dh) (ATTN_ARGS_OK(B, Tq, H, Hkv, dh) && (pos0) >= 0 && (long long)(pos0) + (Tq) <= (1 << 30))
#define SUFFIX_CPU(op)                                                                                         \
    NEED(CPU(c), op ": on the CPU only")

lp_status lp_attention_suffix(lp_ctx *c, void *z, const void *q, const void *k, const void *v, int B, int Tq, int pos0,
                              int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    NEED(SUFFIX_OK(B, Tq, pos0, H, Hkv, dh) && z && q && k && v, "attention_suffix: bad arguments (H=%d Hkv=%d dh=%d pos0=%d)",
         H, Hkv, dh, pos0);
    CHECK_CFG("attention_suffix", cfg);
    if (!CPU(c)) return cuda_attention_cached(c, z, q, k, v, B, Tq, pos0 + Tq, pos0, H, Hkv, dh, cfg);
    if (!cpu_attention_suffix(z, q, k, v, B, Tq, pos0, H, Hkv, dh, cfg)) LP_FAIL(LP_ERR_OOM, "attention_suffix: out of memory");
    return LP_OK;
}

lp_status lp_attn_scores_suffix(lp_ctx *c, void *scores, const void *q, const void *k, int B, int Tq, int pos0, int H,
                                int Hkv, int dh, const lp_attn_cfg *cfg) {
    NEED(SUFFIX_OK(B, Tq, pos0, H, Hkv, dh) && scores && q && k, "attn_scores_suffix: bad arguments");
    CHECK_CFG("attn_scores_suffix", cfg);
    SUFFIX_CPU("attn_scores_suffix");
    cpu_attn_scores_suffix(scores, q, k, B, Tq, pos0, H, Hkv, dh, cfg);
    return LP_OK;
}

lp_status lp_attn_apply_suffix(lp_ctx *c, void *z, const void *pattern, const void *v, int B, int Tq, int pos0, int H,
                               int Hkv, int dh) {
    NEED(SUFFIX_OK(B, Tq, pos0, H, Hkv, dh) && z && pattern && v, "attn_apply_suffix: bad arguments");
    SUFFIX_CPU("attn_apply_suffix");
    cpu_attn_apply_suffix(z, pattern, v, B, Tq, pos0, H, Hkv, dh);
    return LP_OK;
}

lp_status lp_attention_backward_suffix(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q, const void *k,
                                       const void *v, int B, int Tq, int pos0, int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    NEED(SUFFIX_OK(B, Tq, pos0, H, Hkv, dh) && dq && dk && dv && dz && q && k && v, "attention_backward_suffix: bad arguments");
    NEED(dq != dk && dq != dv && dk != dv && dq != dz && dq != q && dq != k && dq != v && dk != dz && dk != q && dk != k &&
             dk != v && dv != dz && dv != q && dv != k && dv != v,
         "attention_backward_suffix: an output is also an input, or two outputs are one buffer");
    CHECK_CFG("attention_backward_suffix", cfg);
    if (!CPU(c)) return cuda_attention_backward_suffix(c, dq, dk, dv, dz, q, k, v, B, Tq, pos0, H, Hkv, dh, cfg);
    cpu_attention_backward_suffix(dq, dk, dv, dz, q, k, v, B, Tq, pos0, H, Hkv, dh, cfg);
    return LP_OK;
}

lp_status lp_attn_apply_backward_suffix(lp_ctx *c, void *dpattern, void *dv, const void *dz, const void *pattern,
                                        const void *v, int B, int Tq, int pos0, int H, int Hkv, int dh) {
    NEED(SUFFIX_OK(B, Tq, pos0, H, Hkv, dh) && dpattern && dv && dz && pattern && v, "attn_apply_backward_suffix: bad arguments");
    NEED(dpattern != pattern && dv != v && dv != dz && dpattern != dv, "attn_apply_backward_suffix: an output is also an input");
    SUFFIX_CPU("attn_apply_backward_suffix");
    if (!cpu_attn_apply_backward_suffix(dpattern, dv, dz, pattern, v, B, Tq, pos0, H, Hkv, dh))
        LP_FAIL(LP_ERR_OOM, "attn_apply_backward_suffix: out of memory");
    return LP_OK;
}

lp_status lp_attn_scores_backward_suffix(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *scores,
                                         const void *q, const void *k, int B, int Tq, int pos0, int H, int Hkv, int dh,
                                         const lp_attn_cfg *cfg) {
    NEED(SUFFIX_OK(B, Tq, pos0, H, Hkv, dh) && dq && dk && dscores && q && k, "attn_scores_backward_suffix: bad arguments");
    NEED(dq != dk && dq != dscores && dq != q && dq != k && dk != dscores && dk != q && dk != k,
         "attn_scores_backward_suffix: an output is also an input, or dq is dk");
    CHECK_CFG("attn_scores_backward_suffix", cfg);
    NEED(cfg->softcap <= 0 || scores, "attn_scores_backward_suffix: a soft-cap needs the saved scores");
    SUFFIX_CPU("attn_scores_backward_suffix");
    if (!cpu_attn_scores_backward_suffix(dq, dk, dscores, scores, q, k, B, Tq, pos0, H, Hkv, dh, cfg))
        LP_FAIL(LP_ERR_OOM, "attn_scores_backward_suffix: out of memory");
    return LP_OK;
}

lp_status lp_gelu_mul(lp_ctx *c, void *out, const void *gate, const void *up, size_t n) {
    NEED(out && gate && up, "gelu_mul: null buffer");
    if (CPU(c)) { cpu_gelu_mul(out, gate, up, n); return LP_OK; }
    return cuda_gelu_mul(c, out, gate, up, n);
}

lp_status lp_softcap(lp_ctx *c, void *out, const void *x, float cap, size_t n) {
    NEED(out && x, "softcap: null buffer");
    NEED(cap > 0 && isfinite(cap), "softcap: the cap must be positive and finite (cap=%g)", (double)cap);
    if (CPU(c)) { cpu_softcap(out, x, cap, n); return LP_OK; }
    return cuda_softcap(c, out, x, cap, n);
}

lp_status lp_scale(lp_ctx *c, void *out, const void *x, float s, size_t n) {
    NEED(out && x, "scale: null buffer");
    if (CPU(c)) { cpu_scale(out, x, s, n); return LP_OK; }
    return cuda_scale(c, out, x, s, n);
}

lp_status lp_cross_entropy(lp_ctx *c, float *losses, const void *logits, const int32_t *targets,
                           int N, int V) {
    NEED(N >= 0 && V > 0 && losses && logits && targets, "cross_entropy: bad arguments");
    if (CPU(c)) { cpu_cross_entropy(losses, logits, targets, N, V); return LP_OK; }
    return cuda_cross_entropy(c, losses, logits, targets, N, V);
}

lp_status lp_cross_entropy_ld(lp_ctx *c, float *losses, const void *logits, const int32_t *targets,
                              int N, int V, int ld) {
    NEED(N >= 0 && V > 0 && ld >= V && losses && logits && targets, "cross_entropy: bad arguments (V=%d ld=%d)", V, ld);
    if (!CPU(c)) return cuda_cross_entropy_ld(c, losses, logits, targets, N, V, ld);
    for (int n = 0; n < N; n++) cpu_cross_entropy(losses + n, (const float *)logits + (size_t)n * ld, targets + n, 1, V);
    return LP_OK;
}

static int view_ok(lp_view v) { return v.B >= 0 && v.P > 0 && v.H > 0 && v.E > 0; }

lp_status lp_edit_apply(lp_ctx *c, void *act, lp_view v, lp_edit_kind kind, const void *src,
                        float coef, const uint8_t *pos_mask, const uint8_t *head_mask) {
    NEED(act && view_ok(v) && kind >= LP_EDIT_ZERO && kind <= LP_EDIT_PATCH, "edit: bad arguments");
    NEED(kind == LP_EDIT_ZERO || src, "edit: this edit needs a source");
    if (CPU(c)) { cpu_edit_apply(act, v, kind, src, coef, pos_mask, head_mask); return LP_OK; }
    return cuda_edit_apply(c, act, v, kind, src, coef, pos_mask, head_mask);
}

lp_status lp_gather_pos(lp_ctx *c, void *dst, const void *act, lp_view v, const int32_t *pos, int npos) {
    NEED(dst && act && pos && view_ok(v) && npos > 0, "gather_pos: bad arguments");
    if (CPU(c)) { cpu_gather_pos(dst, act, v, pos, npos); return LP_OK; }
    return cuda_gather_pos(c, dst, act, v, pos, npos);
}

lp_status lp_diff_dot_rows(lp_ctx *c, float *out, const void *a, const void *b, const void *g, size_t rows, size_t per) {
    NEED(out && a && b && g && per > 0, "diff_dot_rows: bad arguments");
    if (CPU(c)) { cpu_diff_dot_rows(out, a, b, g, rows, per); return LP_OK; }
    return cuda_diff_dot_rows(c, out, a, b, g, rows, per);
}

/* ---- backward ops (attribution gradients) ----
 * Same checks as the forward ops they differentiate. Outputs that the kernels write while
 * other rows still read the inputs (attention, the three-step form) must not be an input. */

lp_status lp_ln_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale, const void *w, int N,
                         int D) {
    NEED(N >= 0 && D > 0 && dx && dy && x && scale, "ln_backward: bad arguments (N=%d D=%d)", N, D);
    if (CPU(c)) { cpu_ln_backward(dx, dy, x, scale, w, N, D); return LP_OK; }
    return cuda_ln_backward(c, dx, dy, x, scale, w, N, D);
}

lp_status lp_rms_backward(lp_ctx *c, void *dx, const void *dy, const void *x, const void *scale, const void *w, int N,
                          int D) {
    NEED(N >= 0 && D > 0 && dx && dy && x && scale, "rms_backward: bad arguments (N=%d D=%d)", N, D);
    if (CPU(c)) { cpu_rms_backward(dx, dy, x, scale, w, N, D); return LP_OK; }
    return cuda_rms_backward(c, dx, dy, x, scale, w, N, D);
}

lp_status lp_gelu_backward(lp_ctx *c, void *dx, const void *dy, const void *x, size_t n) {
    NEED(dx && dy && x, "gelu_backward: null buffer");
    if (CPU(c)) { cpu_gelu_backward(dx, dy, x, n); return LP_OK; }
    return cuda_gelu_backward(c, dx, dy, x, n);
}

lp_status lp_silu_mul_backward(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate, const void *up,
                               size_t n) {
    NEED(dgate && dup && dy && gate && up, "silu_mul_backward: null buffer");
    NEED(dgate != dup, "silu_mul_backward: dgate and dup are the same buffer");
    if (CPU(c)) { cpu_silu_mul_backward(dgate, dup, dy, gate, up, n); return LP_OK; }
    return cuda_silu_mul_backward(c, dgate, dup, dy, gate, up, n);
}

lp_status lp_gelu_mul_backward(lp_ctx *c, void *dgate, void *dup, const void *dy, const void *gate, const void *up,
                               size_t n) {
    NEED(dgate && dup && dy && gate && up, "gelu_mul_backward: null buffer");
    NEED(dgate != dup, "gelu_mul_backward: dgate and dup are the same buffer");
    if (CPU(c)) { cpu_gelu_mul_backward(dgate, dup, dy, gate, up, n); return LP_OK; }
    return cuda_gelu_mul_backward(c, dgate, dup, dy, gate, up, n);
}

lp_status lp_softcap_backward(lp_ctx *c, void *dx, const void *dy, const void *y, float cap, size_t n) {
    NEED(dx && dy && y, "softcap_backward: null buffer");
    NEED(cap > 0 && isfinite(cap), "softcap_backward: the cap must be positive and finite (cap=%g)", (double)cap);
    if (CPU(c)) { cpu_softcap_backward(dx, dy, y, cap, n); return LP_OK; }
    return cuda_softcap_backward(c, dx, dy, y, cap, n);
}

lp_status lp_rope_backward(lp_ctx *c, void *dx, const void *dy, const float *cos_t, const float *sin_t, int B, int T,
                           int H, int dh, int pos0) {
    NEED(B >= 0 && T >= 0 && H > 0 && dh > 0 && dh % 2 == 0 && pos0 >= 0 && dx && dy && cos_t && sin_t,
         "rope_backward: bad arguments (H=%d dh=%d pos0=%d; dh must be even)", H, dh, pos0);
    if (CPU(c)) { cpu_rope_backward(dx, dy, cos_t, sin_t, B, T, H, dh, pos0); return LP_OK; }
    return cuda_rope_backward(c, dx, dy, cos_t, sin_t, B, T, H, dh, pos0);
}

lp_status lp_attention_backward(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q, const void *k,
                                const void *v, int B, int T, int H, int Hkv, int dh) {
    return lp_attention_backward_cfg(c, dq, dk, dv, dz, q, k, v, B, T, H, Hkv, dh, NULL);
}

lp_status lp_attention_backward_cfg(lp_ctx *c, void *dq, void *dk, void *dv, const void *dz, const void *q,
                                    const void *k, const void *v, int B, int T, int H, int Hkv, int dh,
                                    const lp_attn_cfg *cfg) {
    NEED(ATTN_ARGS_OK(B, T, H, Hkv, dh) && dq && dk && dv && dz && q && k && v,
         "attention_backward: bad arguments (H=%d Hkv=%d dh=%d)", H, Hkv, dh);
    NEED(dq != dk && dq != dv && dk != dv, "attention_backward: dq, dk and dv must be distinct buffers");
    NEED(dq != dz && dq != q && dq != k && dq != v && dk != dz && dk != q && dk != k && dk != v && dv != dz &&
             dv != q && dv != k && dv != v,
         "attention_backward: an output is also an input (dq, dk, dv must not alias dz, q, k, v)");
    CHECK_CFG("attention_backward", cfg);
    if (CPU(c)) { cpu_attention_backward(dq, dk, dv, dz, q, k, v, B, T, H, Hkv, dh, cfg); return LP_OK; }
    return cuda_attention_backward(c, dq, dk, dv, dz, q, k, v, B, T, H, Hkv, dh, cfg);
}

lp_status lp_attn_apply_backward(lp_ctx *c, void *dpattern, void *dv, const void *dz, const void *pattern,
                                 const void *v, int B, int T, int H, int Hkv, int dh) {
    NEED(ATTN_ARGS_OK(B, T, H, Hkv, dh) && dpattern && dv && dz && pattern && v, "attn_apply_backward: bad arguments");
    NEED(dpattern != pattern && dv != v && dv != dz && dpattern != dv,
         "attn_apply_backward: an output is also an input, or dpattern is dv");
    if (CPU(c)) { cpu_attn_apply_backward(dpattern, dv, dz, pattern, v, B, T, H, Hkv, dh); return LP_OK; }
    return cuda_attn_apply_backward(c, dpattern, dv, dz, pattern, v, B, T, H, Hkv, dh);
}

/* dx may alias dy (each row is summed before it is written) but not y. */
lp_status lp_softmax_rows_backward(lp_ctx *c, void *dx, const void *dy, const void *y, size_t rows, int cols) {
    NEED(cols > 0 && dx && dy && y, "softmax_rows_backward: bad arguments");
    NEED(dx != y, "softmax_rows_backward: dx must not alias y");
    if (CPU(c)) { cpu_softmax_rows_backward(dx, dy, y, rows, cols); return LP_OK; }
    return cuda_softmax_rows_backward(c, dx, dy, y, rows, cols);
}

lp_status lp_attn_scores_backward(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *q, const void *k,
                                  int B, int T, int H, int Hkv, int dh) {
    return lp_attn_scores_backward_cfg(c, dq, dk, dscores, NULL, q, k, B, T, H, Hkv, dh, NULL);
}

/* The saved scores are read only to differentiate the softcap's tanh. */
lp_status lp_attn_scores_backward_cfg(lp_ctx *c, void *dq, void *dk, const void *dscores, const void *scores,
                                      const void *q, const void *k, int B, int T, int H, int Hkv, int dh,
                                      const lp_attn_cfg *cfg) {
    NEED(ATTN_ARGS_OK(B, T, H, Hkv, dh) && dq && dk && dscores && q && k, "attn_scores_backward: bad arguments");
    NEED(dq != dk && dq != q && dq != k && dk != q && dk != k,
         "attn_scores_backward: an output is also an input, or dq is dk");
    CHECK_CFG("attn_scores_backward", cfg);
    NEED(cfg->softcap == 0 || scores, "attn_scores_backward: softcap %g needs the saved scores", (double)cfg->softcap);
    NEED(!scores || (scores != dq && scores != dk), "attn_scores_backward: dq or dk is the saved scores");
    if (CPU(c)) { cpu_attn_scores_backward(dq, dk, dscores, scores, q, k, B, T, H, Hkv, dh, cfg); return LP_OK; }
    return cuda_attn_scores_backward(c, dq, dk, dscores, scores, q, k, B, T, H, Hkv, dh, cfg);
}

lp_status lp_xent_backward(lp_ctx *c, void *dlogits, const void *logits, const int32_t *targets, const float *scale,
                           int N, int V) {
    NEED(N >= 0 && V > 0 && dlogits && logits && targets && scale, "xent_backward: bad arguments (N=%d V=%d)", N, V);
    if (CPU(c)) { cpu_xent_backward(dlogits, logits, targets, scale, N, V); return LP_OK; }
    return cuda_xent_backward(c, dlogits, logits, targets, scale, N, V);
}

lp_status lp_xent_backward_ld(lp_ctx *c, void *dlogits, const void *logits, const int32_t *targets, const float *scale,
                              int N, int V, int ld) {
    NEED(N >= 0 && V > 0 && ld >= V && dlogits && logits && targets && scale, "xent_backward: bad arguments (V=%d ld=%d)", V, ld);
    if (!CPU(c)) return cuda_xent_backward_ld(c, dlogits, logits, targets, scale, N, V, ld);
    for (int n = 0; n < N; n++) {
        float *o = (float *)dlogits + (size_t)n * ld;
        cpu_xent_backward(o, (const float *)logits + (size_t)n * ld, targets + n, scale + n, 1, V);
        for (int j = V; j < ld; j++) o[j] = 0.0f;
    }
    return LP_OK;
}

lp_status lp_norm_scale_grad(lp_ctx *c, void *dscale, const void *dy, const void *x, const void *scale, const void *w, int N,
                             int D, int center) {
    NEED(N >= 0 && D > 0 && dscale && dy && x && scale, "norm_scale_grad: bad arguments (N=%d D=%d)", N, D);
    if (CPU(c)) { cpu_norm_scale_grad(dscale, dy, x, scale, w, N, D, center); return LP_OK; }
    return cuda_norm_scale_grad(c, dscale, dy, x, scale, w, N, D, center);
}
