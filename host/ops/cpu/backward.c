/* backward.c: CPU references of the backward ops of ops.h ("backward ops (attribution
 * gradients)"): given the upstream gradient dy of a forward op's output and the forward's
 * saved inputs, the gradient of its inputs. Each function states what its forward computed
 * and the derivative it writes; kernels/backward.cu is the fast twin, checked against these.
 *
 * Precision: element-wise derivatives are computed in double and rounded once; every sum that is formed and written once (a row's mean, a dot product, a gradient summed over
 * queries and heads) accumulates in double and is rounded once on the store. The one
 * exception is dk/dv of the fused attention, which gather contributions from every query
 * row while the rows are visited one at a time (no [T,T] buffer): they accumulate in the
 * fp32 outputs themselves. The three-step attention's backward forms its products per head
 * with dgemm on double copies of the operands: the same sums in double, rounded once. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops/cpu/vmath.h"
#include "ops/ops_internal.h"

/* ---- normalization ---- */

void cpu_ln_backward(float *dx, const float *dy, const float *x, const float *scale, const float *w, int N,
                        int D) {
    // dx, dy, x are (N,D); scale is (N,); w is (D,) or NULL. The forward was
    //   y = xh * w + b,  xh = (x - mean) / s,  s = scale = sqrt(mean((x - mean)^2) + eps),
    // and with g = dy * w the derivative through mean and s (eps inside s) is
    //   dx = (g - mean(g) - xh * mean(g * xh)) / s.
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D, *dyr = dy + (size_t)n * D;
        float *dxr = dx + (size_t)n * D;
        double mean = 0, sg = 0, sgx = 0;
        for (int d = 0; d < D; d++) mean += xr[d];
        mean /= D;
        const double inv = 1.0 / scale[n];
        for (int d = 0; d < D; d++) {
            double g = (double)dyr[d] * (w ? w[d] : 1.0f);
            sg += g;
            sgx += g * (xr[d] - mean) * inv;
        }
        sg /= D, sgx /= D;
        for (int d = 0; d < D; d++) { /* every sum is done: dx may alias dy or x */
            double g = (double)dyr[d] * (w ? w[d] : 1.0f), xh = (xr[d] - mean) * inv;
            dxr[d] = (float)((g - sg - xh * sgx) * inv);
        }
    }
}

void cpu_rms_backward(float *dx, const float *dy, const float *x, const float *scale, const float *w, int N,
                         int D) {
    // dx, dy, x are (N,D); scale is (N,); w is (D,) or NULL. The forward was
    //   y = xh * w,  xh = x / s,  s = scale = sqrt(mean(x^2) + eps),
    // and with g = dy * w:  dx = (g - xh * mean(g * xh)) / s.
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D, *dyr = dy + (size_t)n * D;
        float *dxr = dx + (size_t)n * D;
        const double inv = 1.0 / scale[n];
        double sgx = 0;
        for (int d = 0; d < D; d++) sgx += (double)dyr[d] * (w ? w[d] : 1.0f) * xr[d] * inv;
        sgx /= D;
        for (int d = 0; d < D; d++) {
            double g = (double)dyr[d] * (w ? w[d] : 1.0f);
            dxr[d] = (float)((g - xr[d] * inv * sgx) * inv);
        }
    }
}

/* ---- element-wise ---- */

LP_VEC void cpu_gelu_backward(float *dx, const float *dy, const float *x, size_t n) {
    // gelu(x) = 0.5 x (1 + tanh(u)), u = s (x + a x^3), s = sqrt(2/pi), a = 0.044715:
    //   gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) s (1 + 3 a x^2)
    //            = sig(2u) (1 + 2 x sig(-2u) s (1 + 3 a x^2)),   sig(z) = 1 / (1 + exp(-z)),
    // the same function written without 1 + tanh(u), which loses every digit in the tails.
    // In double, as the CUDA kernel's oracle (the two terms still cancel near x = -0.75).
    // One exponential: with e = exp(-2u), sig(2u) = 1 / (1 + e) and sig(-2u) = e sig(2u);
    // e is held below 1e300 so that e sig(2u) stays 1 (not inf * 0) where exp overflows.
    const double s = 0.7978845608028654, a = 0.044715;
    for (size_t i = 0; i < n; i++) {
        double v = x[i], u = s * (v + a * v * v * v), e = vexpd(-2 * u);
        e = e < 1e300 ? e : 1e300;
        double sp = 1 / (1 + e), sm = e * sp;
        dx[i] = (float)(dy[i] * sp * (1 + 2 * v * sm * s * (1 + 3 * a * v * v))); /* dx may alias dy */
    }
}

LP_VEC void cpu_silu_mul_backward(float *dgate, float *dup, const float *dy, const float *gate, const float *up,
                              size_t n) {
    // y = silu(g) * u, silu(g) = g sig(g), sig(g) = 1 / (1 + exp(-g)):
    //   dgate = dy * u * sig(g) (1 + g sig(-g)),  dup = dy * g sig(g)
    // (sig(-g) rather than 1 - sig(g): exact for large g too.)
    for (size_t i = 0; i < n; i++) {
        double g = gate[i], u = up[i], d = dy[i]; /* all read first: outputs may alias inputs */
        double sp = 1 / (1 + vexpd(-g)), sm = 1 / (1 + vexpd(g));
        dgate[i] = (float)(d * u * sp * (1 + g * sm));
        dup[i] = (float)(d * g * sp);
    }
}

LP_VEC void cpu_gelu_mul_backward(float *dgate, float *dup, const float *dy, const float *gate, const float *up,
                              size_t n) {
    // y = gelu(g) * u (the tanh form): dgate = dy * u * gelu'(g), dup = dy * gelu(g), with
    // gelu'(g) in its sigmoid form as cpu_gelu_backward and gelu(g) = g sig(2 v),
    // v = s (g + a g^3) (0.5 (1 + tanh v) = sig(2 v)). In double.
    const double s = 0.7978845608028654, a = 0.044715;
    for (size_t i = 0; i < n; i++) {
        double g = gate[i], u = up[i], d = dy[i]; /* all read first: outputs may alias inputs */
        double v = s * (g + a * g * g * g);
        double sp = 1 / (1 + vexpd(-2 * v)), sm = 1 / (1 + vexpd(2 * v));
        dgate[i] = (float)(d * u * sp * (1 + 2 * g * sm * s * (1 + 3 * a * g * g)));
        dup[i] = (float)(d * g * sp);
    }
}

void cpu_softcap_backward(float *dx, const float *dy, const float *y, float cap, size_t n) {
    // y = cap tanh(x / cap): dy/dx = 1 - tanh^2 = 1 - (y / cap)^2, from the saved output. dx may alias dy.
    for (size_t i = 0; i < n; i++) {
        double r = (double)y[i] / cap;
        dx[i] = (float)(dy[i] * (1 - r * r));
    }
}

void cpu_rope_backward(float *dx, const float *dy, const float *cos_t, const float *sin_t, int B, int T,
                          int H, int dh, int pos0) {
    // The forward rotated each pair (x1, x2) = (x[i], x[i + dh/2]) by the angle a:
    //   y1 = x1 c - x2 s,  y2 = x2 c + x1 s;  its transpose rotates by -a:
    //   dx1 = dy1 c + dy2 s,  dx2 = dy2 c - dy1 s.  dx may alias dy.
    const int half = dh / 2;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *c = cos_t + (size_t)(pos0 + t) * half, *s = sin_t + (size_t)(pos0 + t) * half;
            for (int h = 0; h < H; h++) {
                size_t off = (((size_t)b * T + t) * H + h) * dh;
                for (int i = 0; i < half; i++) {
                    float g1 = dy[off + i], g2 = dy[off + i + half];
                    dx[off + i] = g1 * c[i] + g2 * s[i];
                    dx[off + i + half] = g2 * c[i] - g1 * s[i];
                }
            }
        }
}

/* ---- attention ---- */

void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dz, const float *q, const float *k,
                               const float *v, int B, int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    cpu_attention_backward_suffix(dq, dk, dv, dz, q, k, v, B, T, 0, H, Hkv, dh, cfg);
}

void cpu_attention_backward_suffix(float *dq, float *dk, float *dv, const float *dz, const float *q, const float *k,
                                   const float *v, int B, int Tq, int pos0, int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    // dq, dz, q are (B,Tq,H,dh), query t at absolute position pos0 + t; k, v are (B,Tk,Hkv,dh)
    // with Tk = pos0 + Tq; dk, dv are (B,Tq,Hkv,dh), the keys at positions pos0 .. only (the
    // prefix's keys are constants to whoever asks for a suffix: pos0 = 0 is the whole square
    // attention). Query head h reads kv head g = h / (H/Hkv). The forward, per query row t of
    // head h, with c the scale (1/sqrt(dh) unless cfg says) and the keys j of the row's window
    // (first <= j <= pos0 + t):
    //   r_j = c q_t . k_j,  s_j = cap tanh(r_j / cap) (s_j = r_j without a cap),
    //   p = softmax(s),  z_t = sum_j p_j v_j.
    // Backward, with dp_j = dz_t . v_j and D = sum_j p_j dp_j = dz_t . z_t:
    //   ds_j = p_j (dp_j - D);  dr_j = ds_j (1 - (s_j / cap)^2) (dr_j = ds_j without a cap);
    //   dq_t = c sum_j dr_j k_j;  dk_j += c dr_j q_t;  dv_j += p_j dz_t.
    // One query row at a time: its probabilities (and the cap's derivatives) are recomputed
    // into rows of Tk floats on the stack, like cpu_attention_rows.
    const int Tk = pos0 + Tq;
    const double scale = cfg->scale > 0 ? (double)cfg->scale : 1.0 / sqrt((double)dh), cap = cfg->softcap;
    const int group = H / Hkv;
    const size_t nkv = (size_t)B * Tq * Hkv * dh;
    memset(dk, 0, nkv * sizeof(float));
    memset(dv, 0, nkv * sizeof(float));
    float p[Tk > 0 ? Tk : 1], dcap[Tk > 0 ? Tk : 1];
    double acc[dh];
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < Tq; i++) {
                const int t = pos0 + i; /* the query's absolute position */
                const size_t qo = (((size_t)b * Tq + i) * H + h) * dh;
                const float *qr = q + qo, *dzr = dz + qo;
                const float *kb = k + ((size_t)b * Tk * Hkv + h / group) * dh;
                const float *vb = v + ((size_t)b * Tk * Hkv + h / group) * dh;
                /* key j's gradient row is j - pos0 (j >= pos0) */
                float *dkb = dk + ((size_t)b * Tq * Hkv + h / group) * dh;
                float *dvb = dv + ((size_t)b * Tq * Hkv + h / group) * dh;
                const size_t stride = (size_t)Hkv * dh; /* between consecutive keys */
                // p = softmax of the scores of keys first..t
                const int first = attn_first_key(cfg, t);
                double mx = -INFINITY, sum = 0;
                for (int j = first; j <= t; j++) {
                    double s = 0;
                    for (int d = 0; d < dh; d++) s += (double)qr[d] * kb[j * stride + d];
                    s *= scale;
                    if (cap > 0) {
                        double th = tanh(s / cap);
                        s = cap * th, dcap[j] = (float)(1 - th * th);
                    }
                    p[j] = (float)s;
                    if (p[j] > mx) mx = p[j];
                }
                for (int j = first; j <= t; j++) sum += exp(p[j] - mx);
                for (int j = first; j <= t; j++) p[j] = (float)(exp(p[j] - mx) / sum);
                // D = dz_t . z_t, z_t recomputed
                double D = 0;
                for (int d = 0; d < dh; d++) {
                    double z = 0;
                    for (int j = first; j <= t; j++) z += (double)p[j] * vb[j * stride + d];
                    D += z * dzr[d];
                }
                for (int d = 0; d < dh; d++) acc[d] = 0;
                for (int j = first; j <= t; j++) {
                    const float *kr = kb + j * stride, *vr = vb + j * stride;
                    double dp = 0;
                    for (int d = 0; d < dh; d++) dp += (double)dzr[d] * vr[d];
                    double ds = p[j] * (dp - D) * (cap > 0 ? (double)dcap[j] : 1.0);
                    for (int d = 0; d < dh; d++) acc[d] += ds * kr[d];
                    if (j < pos0) continue; /* a prefix key: no gradient asked for */
                    const size_t o = (size_t)(j - pos0) * stride;
                    for (int d = 0; d < dh; d++) {
                        dkb[o + d] += (float)(ds * scale * qr[d]);
                        dvb[o + d] += p[j] * dzr[d];
                    }
                }
                for (int d = 0; d < dh; d++) dq[qo + d] = (float)(acc[d] * scale);
            }
}

/* The scalar form of cpu_attn_apply_backward, for when its double scratch cannot be had. */
static void attn_apply_backward_rows(float *dpattern, float *dv, const float *dz, const float *pattern, const float *v,
                                     int B, int T, int H, int Hkv, int dh) {
    // dpattern, pattern are (B,H,T,T); dz is (B,T,H,dh); dv, v are (B,T,Hkv,dh). The forward
    // z_t = sum_j pattern[t,j] v_j ran over all T keys (an edited pattern is applied as
    // given), so every entry has a derivative:
    //   dpattern[t,j] = dz_t . v_j;  dv_j = sum over the group's heads and all t of pattern[t,j] dz_t
    const int group = H / Hkv;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *dzr = dz + (((size_t)b * T + t) * H + h) * dh;
                float *dpr = dpattern + (((size_t)b * H + h) * T + t) * T;
                for (int j = 0; j < T; j++) {
                    const float *vr = v + (((size_t)b * T + j) * Hkv + h / group) * dh;
                    double acc = 0;
                    for (int d = 0; d < dh; d++) acc += (double)dzr[d] * vr[d];
                    dpr[j] = (float)acc;
                }
            }
    double acc[dh];
    for (int b = 0; b < B; b++)
        for (int g = 0; g < Hkv; g++)
            for (int j = 0; j < T; j++) {
                for (int d = 0; d < dh; d++) acc[d] = 0;
                for (int h = g * group; h < (g + 1) * group; h++)
                    for (int t = 0; t < T; t++) {
                        double pw = pattern[(((size_t)b * H + h) * T + t) * T + j];
                        if (pw == 0) continue;
                        const float *dzr = dz + (((size_t)b * T + t) * H + h) * dh;
                        for (int d = 0; d < dh; d++) acc[d] += pw * dzr[d];
                    }
                float *dvr = dv + (((size_t)b * T + j) * Hkv + g) * dh;
                for (int d = 0; d < dh; d++) dvr[d] = (float)acc[d];
            }
}

void cpu_softmax_rows_backward(float *dx, const float *dy, const float *y, size_t rows, int cols) {
    // y = softmax(x) per row: dx = y * (dy - sum_j dy_j y_j). Entries with y = 0 (masked keys,
    // a fully masked row) get dx = 0 and their dy is never read into the sum, so a
    // non-finite gradient there does not spread. dx may alias dy.
    for (size_t r = 0; r < rows; r++) {
        const float *dyr = dy + r * cols, *yr = y + r * cols;
        float *dxr = dx + r * cols;
        double dot = 0;
        for (int j = 0; j < cols; j++)
            if (yr[j] != 0.0f) dot += (double)dyr[j] * yr[j];
        for (int j = 0; j < cols; j++) dxr[j] = yr[j] != 0.0f ? (float)(yr[j] * (dyr[j] - dot)) : 0.0f;
    }
}

/* dscores[i] as a derivative of the raw score c q.k: times the cap's 1 - (s / cap)^2 */
static inline double raw_grad(const float *dscores, const float *scores, double cap, size_t i) {
    if (cap <= 0) return dscores[i];
    double r = scores[i] / cap;
    return dscores[i] * (1 - r * r);
}

/* The scalar form of cpu_attn_scores_backward, for when its double scratch cannot be had. */
static void attn_scores_backward_rows(float *dq, float *dk, const float *dscores, const float *scores, const float *q,
                                      const float *k, int B, int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    // dscores, scores are (B,H,T,T); dq, q are (B,T,H,dh); dk, k are (B,T,Hkv,dh). The forward
    // wrote scores[t,j] = cap tanh(c q_t . k_j / cap) (c q_t . k_j without a cap; c the scale)
    // for the keys of the row's window (first <= j <= t) and a constant -inf elsewhere, so only
    // those carry a derivative (the masked entries are never read). With
    // dr[t,j] = dscores[t,j] (1 - (scores[t,j] / cap)^2) (dscores[t,j] without a cap):
    //   dq_t = c sum_{first<=j<=t} dr[t,j] k_j;
    //   dk_j = c sum over the group's heads and the queries t that see j of dr[t,j] q_t
    const double scale = cfg->scale > 0 ? (double)cfg->scale : 1.0 / sqrt((double)dh), cap = cfg->softcap;
    const int group = H / Hkv;
    double acc[dh];
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const size_t row = (((size_t)b * H + h) * T + t) * T;
                for (int d = 0; d < dh; d++) acc[d] = 0;
                for (int j = attn_first_key(cfg, t); j <= t; j++) {
                    const float *kr = k + (((size_t)b * T + j) * Hkv + h / group) * dh;
                    const double gs = raw_grad(dscores, scores, cap, row + j);
                    for (int d = 0; d < dh; d++) acc[d] += gs * kr[d];
                }
                float *dqr = dq + (((size_t)b * T + t) * H + h) * dh;
                for (int d = 0; d < dh; d++) dqr[d] = (float)(acc[d] * scale);
            }
    for (int b = 0; b < B; b++)
        for (int g = 0; g < Hkv; g++)
            for (int j = 0; j < T; j++) {
                for (int d = 0; d < dh; d++) acc[d] = 0;
                const int end = cfg->window > 0 && T - j > cfg->window ? j + cfg->window : T; /* t < j + window */
                for (int h = g * group; h < (g + 1) * group; h++)
                    for (int t = j; t < end; t++) {
                        double gs = raw_grad(dscores, scores, cap, (((size_t)b * H + h) * T + t) * T + j);
                        const float *qr = q + (((size_t)b * T + t) * H + h) * dh;
                        for (int d = 0; d < dh; d++) acc[d] += gs * qr[d];
                    }
                float *dkr = dk + (((size_t)b * T + j) * Hkv + g) * dh;
                for (int d = 0; d < dh; d++) dkr[d] = (float)(acc[d] * scale);
            }
}

/* Head h of row b of a [B, T, nh, dh] tensor as a [T, dh] double matrix. */
static void head_in(double *dst, const float *src, int b, int T, int nh, int h, int dh) {
    for (int t = 0; t < T; t++) {
        const float *r = src + (((size_t)b * T + t) * nh + h) * dh;
        for (int d = 0; d < dh; d++) dst[(size_t)t * dh + d] = r[d];
    }
}

/* The reverse, scaled by c: dst's head h of row b from a [T, dh] double matrix. */
static void head_out(float *dst, const double *src, double c, int b, int T, int nh, int h, int dh) {
    for (int t = 0; t < T; t++) {
        float *r = dst + (((size_t)b * T + t) * nh + h) * dh;
        for (int d = 0; d < dh; d++) r[d] = (float)(src[(size_t)t * dh + d] * c);
    }
}

void cpu_attn_apply_backward(float *dpattern, float *dv, const float *dz, const float *pattern, const float *v,
                                int B, int T, int H, int Hkv, int dh) {
    // as attn_apply_backward_rows, per head: dpattern_h = dz_h v_g^T and dv_g = sum_h pattern_h^T dz_h
    const int group = H / Hkv;
    const size_t tdh = (size_t)T * dh, tt = (size_t)T * T;
    double *buf = malloc((3 * tdh + tt) * sizeof(double));
    if (!buf) {
        attn_apply_backward_rows(dpattern, dv, dz, pattern, v, B, T, H, Hkv, dh);
        return;
    }
    double *dzd = buf, *vd = dzd + tdh, *dvd = vd + tdh, *pd = dvd + tdh;
    for (int b = 0; b < B; b++)
        for (int g = 0; g < Hkv; g++) {
            head_in(vd, v, b, T, Hkv, g, dh);
            memset(dvd, 0, tdh * sizeof(double));
            for (int h = g * group; h < (g + 1) * group; h++) {
                const size_t po = ((size_t)b * H + h) * tt;
                head_in(dzd, dz, b, T, H, h, dh);
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, dh, 1.0, dzd, dh, vd, dh, 0.0, pd, T);
                for (size_t i = 0; i < tt; i++) dpattern[po + i] = (float)pd[i];
                for (size_t i = 0; i < tt; i++) pd[i] = pattern[po + i];
                cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, dh, T, 1.0, pd, T, dzd, dh, 1.0, dvd, dh);
            }
            head_out(dv, dvd, 1.0, b, T, Hkv, g, dh);
        }
    free(buf);
}

void cpu_attn_scores_backward(float *dq, float *dk, const float *dscores, const float *scores, const float *q,
                                 const float *k, int B, int T, int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    // as attn_scores_backward_rows, per head with dr zero outside each row's window:
    //   dq_h = c dr_h k_g;  dk_g = c sum_h dr_h^T q_h
    const double scale = cfg->scale > 0 ? (double)cfg->scale : 1.0 / sqrt((double)dh), cap = cfg->softcap;
    const int group = H / Hkv;
    const size_t tdh = (size_t)T * dh, tt = (size_t)T * T;
    double *buf = malloc((4 * tdh + tt) * sizeof(double));
    if (!buf) {
        attn_scores_backward_rows(dq, dk, dscores, scores, q, k, B, T, H, Hkv, dh, cfg);
        return;
    }
    double *qd = buf, *kd = qd + tdh, *dqd = kd + tdh, *dkd = dqd + tdh, *dr = dkd + tdh;
    for (int b = 0; b < B; b++)
        for (int g = 0; g < Hkv; g++) {
            head_in(kd, k, b, T, Hkv, g, dh);
            memset(dkd, 0, tdh * sizeof(double));
            for (int h = g * group; h < (g + 1) * group; h++) {
                const size_t row0 = ((size_t)b * H + h) * tt;
                for (int t = 0; t < T; t++) { /* the masked entries are never read */
                    double *r = dr + (size_t)t * T;
                    const int first = attn_first_key(cfg, t);
                    for (int j = 0; j < T; j++) r[j] = j >= first && j <= t ? raw_grad(dscores, scores, cap, row0 + (size_t)t * T + j) : 0.0;
                }
                head_in(qd, q, b, T, H, h, dh);
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, dh, T, 1.0, dr, T, kd, dh, 0.0, dqd, dh);
                head_out(dq, dqd, scale, b, T, H, h, dh);
                cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, dh, T, 1.0, dr, T, qd, dh, 1.0, dkd, dh);
            }
            head_out(dk, dkd, scale, b, T, Hkv, g, dh);
        }
    free(buf);
}

/* ---- loss ---- */

void cpu_xent_backward(float *dlogits, const float *logits, const int32_t *targets, const float *scale, int N,
                          int V) {
    // The forward: loss[n] = logsumexp(logits[n,:]) - logits[n, target[n]]. Its gradient,
    // weighted by scale[n]: dlogits[n,:] = scale[n] * (softmax(logits[n,:]) - onehot(target[n])).
    // A row with target < 0 had no loss: zeros. A target >= V (the CUDA forward could not
    // check it) gives a row of NaN, as lp_cross_entropy's CUDA kernel does.
    for (int n = 0; n < N; n++) {
        const float *r = logits + (size_t)n * V;
        float *o = dlogits + (size_t)n * V;
        const int32_t tg = targets[n];
        if (tg < 0 || tg >= V) {
            for (int j = 0; j < V; j++) o[j] = tg < 0 ? 0.0f : NAN;
            continue;
        }
        float mx = -INFINITY;
        for (int j = 0; j < V; j++)
            if (r[j] > mx) mx = r[j];
        double sum = 0;
        for (int j = 0; j < V; j++) sum += exp((double)r[j] - mx);
        for (int j = 0; j < V; j++) o[j] = (float)(scale[n] * (exp((double)r[j] - mx) / sum - (j == tg)));
    }
}

void cpu_norm_scale_grad(float *dscale, const float *dy, const float *x, const float *scale, const float *w, int N, int D,
                            int center) {
    /* dscale = d/dscale of sum(dy * xh * w) with xh = (x - mean) / scale, x fixed */
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D, *dyr = dy + (size_t)n * D;
        double mean = 0, acc = 0, inv = 1.0 / scale[n];
        if (center) {
            for (int d = 0; d < D; d++) mean += xr[d];
            mean /= D;
        }
        for (int d = 0; d < D; d++) acc += (double)dyr[d] * (w ? w[d] : 1.0f) * (xr[d] - mean) * inv;
        dscale[n] = (float)(-acc * inv);
    }
}
