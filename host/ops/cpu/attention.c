/* attention.c: CPU reference of causal multi-head attention (with grouped kv heads and the
 * options of lp_attn_cfg: score scale, Gemma 2's score soft-cap, a sliding window).
 * The fused form works on blocks of query rows, so no [T,T] matrix exists unless a
 * hook asks for hook_attn_scores or hook_pattern, which use the three-step form. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>

#include "ops/cpu/vmath.h"
#include "ops/ops_internal.h"

/* q (B,T,H,dh); k (B,T,Hkv,dh): the dot product of query t of head h with key s */
static inline float qk(const float *q, const float *k, int b, int t, int s, int h, int T, int H,
                       int Hkv, int dh) {
    const float *qr = q + (((size_t)b * T + t) * H + h) * dh;
    const float *kr = k + (((size_t)b * T + s) * Hkv + h / (H / Hkv)) * dh;
    float acc = 0;
    for (int i = 0; i < dh; i++) acc += qr[i] * kr[i];
    return acc;
}

/* The scale of q.k: cfg's, or 1/sqrt(dh) (computed in float, as it always was). */
static float attn_scale(const lp_attn_cfg *cfg, int dh) { return cfg->scale > 0 ? cfg->scale : 1.0f / sqrtf((float)dh); }

/* Gemma 2's soft-cap of a scaled score; cap 0 leaves it alone. */
static inline float softcap(float s, float cap) { return cap > 0 ? cap * tanhf(s / cap) : s; }

/* Query rows per block of the fused attention: the [QB, T] score block is the only
 * score memory, and the two products per block go through BLAS (and its threads). */
enum { QB = 64 };

/* Scratch for one score block, kept across calls; it grows only when T does. */
static _Thread_local float *g_block;
static _Thread_local size_t g_block_cap;

LP_VEC void cpu_attention(float *z, const float *q, const float *k, const float *v, int B, int T, int H,
                      int Hkv, int dh, const lp_attn_cfg *cfg) {
    // z, q are (B,T,H,dh); k, v are (B,T,Hkv,dh)
    const float scale = attn_scale(cfg, dh), cap = cfg->softcap;
    size_t need = (size_t)QB * (T > 0 ? T : 1);
    if (need > g_block_cap) {
        free(g_block);
        g_block = malloc(need * sizeof(float));
        g_block_cap = g_block ? need : 0;
        if (!g_block) { /* out of memory: fall back to one row at a time on the stack */
            cpu_attention_rows_cfg(z, q, k, v, B, T, H, Hkv, dh, cfg);
            return;
        }
    }
    int ldq = H * dh, ldk = Hkv * dh;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            int g = h / (H / Hkv);
            const float *qh = q + (size_t)b * T * ldq + h * dh, *kh = k + (size_t)b * T * ldk + g * dh;
            const float *vh = v + (size_t)b * T * ldk + g * dh;
            for (int q0 = 0; q0 < T; q0 += QB) {
                // causal: no key after the block; windowed: none before the first row's window
                const int rows = T - q0 < QB ? T - q0 : QB, k0 = attn_first_key(cfg, q0), keys = q0 + rows - k0;
                float *S = g_block;
                // S (rows, keys) = Q_block K[k0 ..]^T * scale
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, dh, scale, qh + (size_t)q0 * ldq, ldq,
                            kh + (size_t)k0 * ldk, ldk, 0.0f, S, keys);
                for (int i = 0; i < rows; i++) { /* cap, mask keys outside the row's window, softmax */
                    float *r = S + (size_t)i * keys;
                    const int first = attn_first_key(cfg, q0 + i) - k0, last = q0 + i - k0;
                    if (cap > 0)
                        for (int s = first; s <= last; s++) r[s] = softcap(r[s], cap);
                    const float mx = vmaxf(r + first, last + 1 - first);
                    const float inv = (float)(1.0 / vexp_sum(r + first, r + first, mx, last + 1 - first));
                    for (int s = first; s <= last; s++) r[s] *= inv;
                    for (int s = 0; s < first; s++) r[s] = 0;
                    for (int s = last + 1; s < keys; s++) r[s] = 0;
                }
                // Z_block (rows, dh) = P V[k0 ..]
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, dh, keys, 1.0f, S, keys,
                            vh + (size_t)k0 * ldk, ldk, 0.0f, z + ((size_t)b * T + q0) * ldq + h * dh, ldq);
            }
        }
}

void cpu_attention_rows(float *z, const float *q, const float *k, const float *v, int B, int T, int H,
                           int Hkv, int dh) {
    static const lp_attn_cfg plain = {0.0f, 0.0f, 0};
    cpu_attention_rows_cfg(z, q, k, v, B, T, H, Hkv, dh, &plain);
}

void cpu_attention_rows_cfg(float *z, const float *q, const float *k, const float *v, int B, int T, int H,
                               int Hkv, int dh, const lp_attn_cfg *cfg) {
    // the same, one query row at a time with a row of scores on the stack
    const float scale = attn_scale(cfg, dh);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            float row[T > 0 ? T : 1];
            for (int t = 0; t < T; t++) {
                const int first = attn_first_key(cfg, t);
                float mx = -INFINITY;
                for (int s = first; s <= t; s++) {
                    row[s] = softcap(qk(q, k, b, t, s, h, T, H, Hkv, dh) * scale, cfg->softcap);
                    if (row[s] > mx) mx = row[s];
                }
                float sum = 0;
                for (int s = first; s <= t; s++) sum += (row[s] = expf(row[s] - mx));
                float *zr = z + (((size_t)b * T + t) * H + h) * dh;
                for (int i = 0; i < dh; i++) zr[i] = 0;
                for (int s = first; s <= t; s++) {
                    const float *vr = v + (((size_t)b * T + s) * Hkv + h / (H / Hkv)) * dh;
                    float p = row[s] / sum;
                    for (int i = 0; i < dh; i++) zr[i] += p * vr[i];
                }
            }
        }
}

void cpu_attn_scores(float *scores, const float *q, const float *k, int B, int T, int H, int Hkv,
                        int dh, const lp_attn_cfg *cfg) {
    // scores is (B,H,T,T): scaled, capped, -inf outside the window (first .. t). Per head one
    // GEMM of all T x T products (the masked ones are overwritten).
    const float scale = attn_scale(cfg, dh);
    const int ldq = H * dh, ldk = Hkv * dh;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            float *S = scores + ((size_t)b * H + h) * T * T;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, dh, scale, q + (size_t)b * T * ldq + h * dh, ldq,
                        k + (size_t)b * T * ldk + h / (H / Hkv) * dh, ldk, 0.0f, S, T);
            for (int t = 0; t < T; t++) {
                float *row = S + (size_t)t * T;
                const int first = attn_first_key(cfg, t);
                for (int s = 0; s < first; s++) row[s] = -INFINITY;
                if (cfg->softcap > 0)
                    for (int s = first; s <= t; s++) row[s] = softcap(row[s], cfg->softcap);
                for (int s = t + 1; s < T; s++) row[s] = -INFINITY;
            }
        }
}

LP_VEC void cpu_softmax_rows(float *out, const float *x, size_t rows, int cols) {
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float *o = out + r * cols;
        float mx = vmaxf(xr, cols);
        if (mx == -INFINITY) { /* fully masked row: nothing to attend to */
            for (int i = 0; i < cols; i++) o[i] = 0;
            continue;
        }
        double sum = vexp_sum(o, xr, mx, cols);
        float inv = (float)(1.0 / sum);
        for (int i = 0; i < cols; i++) o[i] *= inv;
    }
}

void cpu_attn_apply(float *z, const float *pattern, const float *v, int B, int T, int H, int Hkv,
                       int dh) {
    // z is (B,T,H,dh); pattern is (B,H,T,T); v is (B,T,Hkv,dh). Keys after t have weight 0
    // in an unedited pattern; an edited one is applied as given, over all keys: per head
    // z_h = pattern_h v_g, one GEMM.
    const int ldz = H * dh, ldv = Hkv * dh;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, dh, T, 1.0f, pattern + ((size_t)b * H + h) * T * T, T,
                        v + (size_t)b * T * ldv + h / (H / Hkv) * dh, ldv, 0.0f, z + (size_t)b * T * ldz + h * dh, ldz);
}
