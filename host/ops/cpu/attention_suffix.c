/* attention_suffix.c: CPU references of the attention of a query suffix over all keys
 * (ops.h, "a query suffix over all keys"): queries at absolute positions pos0 .. pos0+Tq-1
 * of sequences whose Tk = pos0 + Tq keys are all given (the prefix's from another run).
 * The forward, its three-step form, and the three-step backward; the fused backward is
 * cpu_attention_backward_suffix (backward.c), of which the square attention is pos0 = 0.
 * The backward ops write the gradient of the suffix's keys and values only (positions
 * pos0 ..): the prefix's are constants to the suffix. Precision as the square ops: the
 * forward in float through BLAS, the backward's sums in double rounded once. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops/ops_internal.h"

static float suffix_scale(const lp_attn_cfg *cfg, int dh) { return cfg->scale > 0 ? cfg->scale : 1.0f / sqrtf((float)dh); }

enum { SQB = 64 }; /* query rows per block of the fused forward */

int cpu_attention_suffix(float *z, const float *q, const float *k, const float *v, int B, int Tq, int pos0, int H, int Hkv,
                         int dh, const lp_attn_cfg *cfg) {
    // z, q are (B,Tq,H,dh); k, v are (B,Tk,Hkv,dh). As cpu_attention, a block of SQB query
    // rows at a time: S = scale Q K^T over the keys the block can see, capped, masked to each
    // row's window (first .. pos0 + i) and normalised, then Z = S V.
    const int Tk = pos0 + Tq, ldq = H * dh, ldk = Hkv * dh;
    const float scale = suffix_scale(cfg, dh), cap = cfg->softcap;
    float *S = malloc((size_t)SQB * (Tk > 0 ? Tk : 1) * sizeof(float));
    if (!S) return 0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int g = h / (H / Hkv);
            const float *qh = q + (size_t)b * Tq * ldq + h * dh, *kh = k + (size_t)b * Tk * ldk + g * dh;
            const float *vh = v + (size_t)b * Tk * ldk + g * dh;
            for (int q0 = 0; q0 < Tq; q0 += SQB) {
                const int rows = Tq - q0 < SQB ? Tq - q0 : SQB, k0 = attn_first_key(cfg, pos0 + q0);
                const int keys = pos0 + q0 + rows - k0;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, dh, scale, qh + (size_t)q0 * ldq, ldq,
                            kh + (size_t)k0 * ldk, ldk, 0.0f, S, keys);
                for (int i = 0; i < rows; i++) {
                    float *r = S + (size_t)i * keys;
                    const int t = pos0 + q0 + i, first = attn_first_key(cfg, t) - k0, last = t - k0;
                    float mx = -INFINITY;
                    for (int s = first; s <= last; s++) {
                        if (cap > 0) r[s] = cap * tanhf(r[s] / cap);
                        mx = r[s] > mx ? r[s] : mx;
                    }
                    double sum = 0;
                    for (int s = first; s <= last; s++) sum += (r[s] = expf(r[s] - mx));
                    const float inv = (float)(1.0 / sum);
                    for (int s = 0; s < keys; s++) r[s] = s >= first && s <= last ? r[s] * inv : 0.0f;
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, dh, keys, 1.0f, S, keys, vh + (size_t)k0 * ldk, ldk,
                            0.0f, z + ((size_t)b * Tq + q0) * ldq + h * dh, ldq);
            }
        }
    free(S);
    return 1;
}

void cpu_attn_scores_suffix(float *scores, const float *q, const float *k, int B, int Tq, int pos0, int H, int Hkv, int dh,
                            const lp_attn_cfg *cfg) {
    // scores is (B,H,Tq,Tk): scaled, capped, -inf outside each row's window (first .. pos0 + t)
    const int Tk = pos0 + Tq, ldq = H * dh, ldk = Hkv * dh;
    const float scale = suffix_scale(cfg, dh), cap = cfg->softcap;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            float *S = scores + ((size_t)b * H + h) * Tq * Tk;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Tq, Tk, dh, scale, q + (size_t)b * Tq * ldq + h * dh, ldq,
                        k + (size_t)b * Tk * ldk + h / (H / Hkv) * dh, ldk, 0.0f, S, Tk);
            for (int t = 0; t < Tq; t++) {
                float *row = S + (size_t)t * Tk;
                const int first = attn_first_key(cfg, pos0 + t), last = pos0 + t;
                for (int s = 0; s < Tk; s++)
                    row[s] = s < first || s > last ? -INFINITY : cap > 0 ? cap * tanhf(row[s] / cap) : row[s];
            }
        }
}

void cpu_attn_apply_suffix(float *z, const float *pattern, const float *v, int B, int Tq, int pos0, int H, int Hkv, int dh) {
    // z is (B,Tq,H,dh); pattern is (B,H,Tq,Tk); v is (B,Tk,Hkv,dh): per head z_h = pattern_h v_g
    const int Tk = pos0 + Tq, ldz = H * dh, ldv = Hkv * dh;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Tq, dh, Tk, 1.0f, pattern + ((size_t)b * H + h) * Tq * Tk, Tk,
                        v + (size_t)b * Tk * ldv + h / (H / Hkv) * dh, ldv, 0.0f, z + (size_t)b * Tq * ldz + h * dh, ldz);
}

/* Rows r0 .. r0+n-1 of head h of row b of a [B, Tr, nh, dh] tensor as an [n, dh] double matrix. */
static void rows_in(double *dst, const float *src, int b, int Tr, int r0, int n, int nh, int h, int dh) {
    for (int t = 0; t < n; t++) {
        const float *r = src + (((size_t)b * Tr + r0 + t) * nh + h) * dh;
        for (int d = 0; d < dh; d++) dst[(size_t)t * dh + d] = r[d];
    }
}

/* The reverse, times c: head h of row b of a [B, n, nh, dh] tensor from an [n, dh] double matrix. */
static void rows_out(float *dst, const double *src, double c, int b, int n, int nh, int h, int dh) {
    for (int t = 0; t < n; t++) {
        float *r = dst + (((size_t)b * n + t) * nh + h) * dh;
        for (int d = 0; d < dh; d++) r[d] = (float)(src[(size_t)t * dh + d] * c);
    }
}

int cpu_attn_apply_backward_suffix(float *dpattern, float *dv, const float *dz, const float *pattern, const float *v, int B,
                                   int Tq, int pos0, int H, int Hkv, int dh) {
    // The forward z_t = sum_j pattern[t,j] v_j over all Tk keys (an edited pattern applies as
    // given): dpattern[t,j] = dz_t . v_j; dv_j = sum over the group's heads and the Tq queries
    // of pattern[t,j] dz_t, for the suffix's keys j >= pos0 (rows pos0 .. of P^T dz).
    const int Tk = pos0 + Tq, group = H / Hkv;
    const size_t qd = (size_t)Tq * dh, kd = (size_t)Tk * dh, tt = (size_t)Tq * Tk;
    double *buf = malloc((qd + 2 * kd + tt) * sizeof(double));
    if (!buf) return 0;
    double *dzd = buf, *vd = dzd + qd, *dvd = vd + kd, *pd = dvd + kd;
    for (int b = 0; b < B; b++)
        for (int g = 0; g < Hkv; g++) {
            rows_in(vd, v, b, Tk, 0, Tk, Hkv, g, dh);
            memset(dvd, 0, kd * sizeof(double));
            for (int h = g * group; h < (g + 1) * group; h++) {
                const size_t po = ((size_t)b * H + h) * tt;
                rows_in(dzd, dz, b, Tq, 0, Tq, H, h, dh);
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Tq, Tk, dh, 1.0, dzd, dh, vd, dh, 0.0, pd, Tk);
                for (size_t i = 0; i < tt; i++) dpattern[po + i] = (float)pd[i];
                for (size_t i = 0; i < tt; i++) pd[i] = pattern[po + i];
                cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Tk, dh, Tq, 1.0, pd, Tk, dzd, dh, 1.0, dvd, dh);
            }
            rows_out(dv, dvd + (size_t)pos0 * dh, 1.0, b, Tq, Hkv, g, dh);
        }
    free(buf);
    return 1;
}

int cpu_attn_scores_backward_suffix(float *dq, float *dk, const float *dscores, const float *scores, const float *q,
                                    const float *k, int B, int Tq, int pos0, int H, int Hkv, int dh, const lp_attn_cfg *cfg) {
    // As cpu_attn_scores_backward with the queries at pos0 ..: with dr[t,j] = dscores[t,j]
    // (1 - (scores[t,j] / cap)^2) (dscores[t,j] without a cap) inside each row's window and 0
    // outside it (the masked entries are never read): dq_h = c dr_h k_g over all Tk keys;
    // dk_g = c sum_h dr_h^T q_h at the suffix's keys.
    const double scale = cfg->scale > 0 ? (double)cfg->scale : 1.0 / sqrt((double)dh), cap = cfg->softcap;
    const int Tk = pos0 + Tq, group = H / Hkv;
    const size_t qd = (size_t)Tq * dh, kd = (size_t)Tk * dh, tt = (size_t)Tq * Tk;
    double *buf = malloc((2 * qd + 2 * kd + tt) * sizeof(double));
    if (!buf) return 0;
    double *qdd = buf, *dqd = qdd + qd, *kdd = dqd + qd, *dkd = kdd + kd, *dr = dkd + kd;
    for (int b = 0; b < B; b++)
        for (int g = 0; g < Hkv; g++) {
            rows_in(kdd, k, b, Tk, 0, Tk, Hkv, g, dh);
            memset(dkd, 0, kd * sizeof(double));
            for (int h = g * group; h < (g + 1) * group; h++) {
                const size_t row0 = ((size_t)b * H + h) * tt;
                for (int t = 0; t < Tq; t++) {
                    double *r = dr + (size_t)t * Tk;
                    const int first = attn_first_key(cfg, pos0 + t), last = pos0 + t;
                    for (int j = 0; j < Tk; j++) {
                        size_t i = row0 + (size_t)t * Tk + j;
                        double rr = cap > 0 && j >= first && j <= last ? scores[i] / cap : 0.0;
                        r[j] = j >= first && j <= last ? dscores[i] * (1 - rr * rr) : 0.0;
                    }
                }
                rows_in(qdd, q, b, Tq, 0, Tq, H, h, dh);
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Tq, dh, Tk, 1.0, dr, Tk, kdd, dh, 0.0, dqd, dh);
                rows_out(dq, dqd, scale, b, Tq, H, h, dh);
                cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Tk, dh, Tq, 1.0, dr, Tk, qdd, dh, 1.0, dkd, dh);
            }
            rows_out(dk, dkd + (size_t)pos0 * dh, scale, b, Tq, Hkv, g, dh);
        }
    free(buf);
    return 1;
}
