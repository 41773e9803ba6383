/* tp.c: tensor parallelism in the model layer, Megatron-style (dist.h moves the data).
 *
 * Each rank of the TP group holds a slice: heads [h0, h0 + H) of q, z and W_O's input rows,
 * kv heads [hkv0, hkv0 + Hkv) of k and v (every rank its one kv head when there are fewer kv
 * heads than ranks), MLP columns [f0, f0 + F) of gate/up/W_in and W_out's input rows, and
 * vocabulary rows [v0, v0 + V) of the unembedding. Norms, embeddings and the residual stream
 * are replicated. The two row-split projections (attention out, MLP out) end with one
 * all-reduce each; the losses come from a vocabulary-parallel cross-entropy (two small
 * all-reduces of per-row values); full logits exist only when asked for or hooked.
 *
 * Hooks keep their single-process meaning: a per-head or per-neuron hook that someone
 * captures or edits is gathered whole on every rank for its site (edits then act on the
 * whole activation, and each rank takes its slice back); nobody else pays anything. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/dist.h"
#include "loupe/ops.h"
#include "model/model_internal.h"

/* act_elem_bytes and param_ptr without their file (hooks.c), so that this file calls none of
 * the model layer's and they can call it. */
static size_t act_size(const lp_model *m) { return lp_dtype_size(m->ctx.dtype); }
static void *wparam(const lp_model *m, int idx) {
    return idx >= 0 && m->w.params[idx].shape[0] ? (char *)m->w.mem + m->w.params[idx].offset * act_size(m) : NULL;
}
static void *lw(const lp_model *m, int L, int r) { return wparam(m, layer_weight_idx(m, L, r)); }

lp_status tp_setup(lp_model *m) {
    mdl_tp *p = &m->par;
    const lp_config *c = &m->cfg;
    int P = p->tp > 1 ? p->tp : 1, r = p->rank;
    p->tp = P;
    p->H = c->n_heads, p->Hkv = c->n_kv_heads, p->F = c->d_mlp, p->V = c->d_vocab;
    p->h0 = p->hkv0 = p->f0 = p->v0 = 0, p->kv_rep = 0;
    if (P == 1) return LP_OK;
    if (c->n_heads % P)
        LP_FAIL(LP_ERR_ARG, "dist.tp=%d: the model's %d attention heads do not split evenly over %d ranks", P, c->n_heads, P);
    if (c->d_mlp % P) LP_FAIL(LP_ERR_ARG, "dist.tp=%d: the model's MLP width %d does not split evenly over %d ranks", P, c->d_mlp, P);
    p->H = c->n_heads / P, p->h0 = r * p->H;
    if (c->n_kv_heads % P == 0) {
        p->Hkv = c->n_kv_heads / P, p->hkv0 = r * p->Hkv;
    } else if (P % c->n_kv_heads == 0) { /* fewer kv heads than ranks: each rank the one its q heads read */
        p->Hkv = 1, p->hkv0 = p->h0 / (c->n_heads / c->n_kv_heads), p->kv_rep = 1;
    } else {
        LP_FAIL(LP_ERR_ARG, "dist.tp=%d: the model's %d key/value heads neither split over %d ranks nor divide them", P,
                c->n_kv_heads, P);
    }
    p->F = c->d_mlp / P, p->f0 = r * p->F;
    p->v0 = (int)((int64_t)c->d_vocab * r / P);
    p->V = (int)((int64_t)c->d_vocab * (r + 1) / P) - p->v0;
    return LP_OK;
}

lp_status tp_alloc(lp_model *m) {
    if (m->par.tp <= 1 || m->par.ones) return LP_OK;
    size_t n = (size_t)m->cfg.d_model;
    float *h = malloc(n * sizeof(float));
    if (!h) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (size_t i = 0; i < n; i++) h[i] = 1.0f;
    lp_status st = lp_ctx_alloc(&m->ctx, n * act_size(m), &m->par.ones);
    if (st == LP_OK) st = lp_ctx_upload_f32(&m->ctx, m->par.ones, h, n);
    free(h);
    return st;
}

void tp_free(lp_model *m) {
    lp_ctx_release(&m->ctx, m->par.ones);
    free(m->par.xh);
    free(m->par.red);
    m->par.ones = NULL, m->par.xh = NULL, m->par.red = NULL;
}

int tp_role_cut(const lp_model *m, int r, int64_t *start, int64_t *count) {
    const mdl_tp *p = &m->par;
    int dh = m->cfg.d_head;
    if (p->tp <= 1) return 0;
    switch (r) {
    case W_Q: case W_BQ: *start = (int64_t)p->h0 * dh, *count = (int64_t)p->H * dh; return 1;
    case W_K: case W_V: case W_BK: case W_BV: *start = (int64_t)p->hkv0 * dh, *count = (int64_t)p->Hkv * dh; return 1;
    case W_GATE: case W_IN: case W_BIN: *start = p->f0, *count = p->F; return 1;
    case W_O: *start = (int64_t)p->h0 * dh, *count = (int64_t)p->H * dh; return 2;
    case W_OUT: *start = p->f0, *count = p->F; return 2;
    case LP_TP_UNEMBED: *start = p->v0, *count = p->V; return 1;
    default: return 0;
    }
}

/* ---- split activations: which columns of a row each rank holds ---- */

typedef struct cols {
    int rows, full; /* rows of `full` values each */
    int unit;       /* values per head (or per neuron / vocabulary entry) */
    int kind;       /* 0 heads, 1 kv heads, 2 MLP neurons, 3 vocabulary */
} cols;

/* How hook kind `kind` is split (0: replicated). */
static int cols_of(const lp_model *m, int kind, cols *c) {
    const lp_config *cf = &m->cfg;
    int N = m->res.B * m->res.T, dh = cf->d_head, T = m->res.T;
    switch (kind) {
    case HK_Q: case HK_ROT_Q: case HK_Z: case HK_QN_NORM: *c = (cols){N, cf->n_heads * dh, dh, 0}; return 1;
    case HK_QN_SCALE: *c = (cols){N, cf->n_heads, 1, 0}; return 1;
    case HK_K: case HK_V: case HK_ROT_K: case HK_KN_NORM: *c = (cols){N, cf->n_kv_heads * dh, dh, 1}; return 1;
    case HK_KN_SCALE: *c = (cols){N, cf->n_kv_heads, 1, 1}; return 1;
    case HK_SCORES: case HK_PATTERN: *c = (cols){m->res.B, cf->n_heads * T * T, T * T, 0}; return 1;
    case HK_MLP_PRE: case HK_MLP_PRE_LINEAR: case HK_MLP_POST: *c = (cols){N, cf->d_mlp, 1, 2}; return 1;
    default: return 0;
    }
}

/* Rank q's columns [*start, *start + *width) of every row. */
static void cols_rank(const lp_model *m, const cols *c, int q, int *start, int *width) {
    const lp_config *cf = &m->cfg;
    int P = m->par.tp, H = cf->n_heads / P;
    switch (c->kind) {
    case 0: *start = q * H * c->unit, *width = H * c->unit; break;
    case 1:
        if (m->par.kv_rep) *start = (q * H) / (cf->n_heads / cf->n_kv_heads) * c->unit, *width = c->unit;
        else *start = q * (cf->n_kv_heads / P) * c->unit, *width = cf->n_kv_heads / P * c->unit;
        break;
    case 2: *start = q * (cf->d_mlp / P) * c->unit, *width = cf->d_mlp / P * c->unit; break;
    default: {
        int v0 = (int)((int64_t)cf->d_vocab * q / P), v1 = (int)((int64_t)cf->d_vocab * (q + 1) / P);
        *start = v0, *width = v1 - v0;
    }
    }
}

/* full [rows, c->full] from every rank's local [rows, width]: one all-gather (padded to the
 * widest rank), then each rank's columns put in place (ranks sharing a kv head write the
 * same values). */
static lp_status gather_cols(lp_model *m, void *full, const void *local, const cols *c) {
    lp_ctx *x = &m->ctx;
    size_t es = act_size(m);
    int P = m->par.tp, me = m->par.rank, s, w, wmax = 0;
    for (int q = 0; q < P; q++) {
        cols_rank(m, c, q, &s, &w);
        if (w > wmax) wmax = w;
    }
    cols_rank(m, c, me, &s, &w);
    const void *send = local;
    if (w != wmax) { /* an uneven vocabulary split: pad this rank's rows */
        for (int i = 0; i < c->rows; i++)
            LP_CHECK(lp_ctx_copy(x, (char *)m->a.tp_send + (size_t)i * wmax * es, (const char *)local + (size_t)i * w * es, w * es));
        send = m->a.tp_send;
    }
    size_t per = (size_t)c->rows * wmax;
    LP_CHECK(lp_dist_allgather_dev(m->par.dist, LP_DIST_TP, x, send, m->a.tp_recv, per));
    for (int q = 0; q < P; q++) {
        cols_rank(m, c, q, &s, &w);
        const char *src = (const char *)m->a.tp_recv + (size_t)q * per * es;
        for (int i = 0; i < c->rows; i++)
            LP_CHECK(lp_ctx_copy(x, (char *)full + ((size_t)i * c->full + s) * es, src + (size_t)i * wmax * es, w * es));
    }
    return LP_OK;
}

/* This rank's columns of full back into local. */
static lp_status scatter_cols(lp_model *m, void *local, const void *full, const cols *c) {
    size_t es = act_size(m);
    int s, w;
    cols_rank(m, c, m->par.rank, &s, &w);
    for (int i = 0; i < c->rows; i++)
        LP_CHECK(lp_ctx_copy(&m->ctx, (char *)local + (size_t)i * w * es, (const char *)full + ((size_t)i * c->full + s) * es, w * es));
    return LP_OK;
}

lp_status tp_gather_hook(lp_model *m, int kind, const void *act, void **whole) {
    cols c;
    *whole = (void *)act;
    if (m->par.tp <= 1 || !cols_of(m, kind, &c)) return LP_OK;
    *whole = m->a.tp_full;
    return gather_cols(m, m->a.tp_full, act, &c);
}

lp_status tp_scatter_hook(lp_model *m, int kind, void *act, const void *whole) {
    cols c;
    if (whole == act || !cols_of(m, kind, &c)) return LP_OK;
    return scatter_cols(m, act, whole, &c);
}

lp_status tp_linear_start(lp_model *m, void *out, const void *x, int L, int r, int rb, int N, int K, int M, lp_dist_req **req) {
    if (req) *req = NULL;
    if (m->par.tp <= 1) return lp_matmul(&m->ctx, out, x, lw(m, L, r), rb >= 0 ? lw(m, L, rb) : NULL, N, K, M, m->w.trans);
    LP_CHECK(lp_matmul(&m->ctx, out, x, lw(m, L, r), NULL, N, K, M, m->w.trans));
    if (req) return lp_dist_allreduce_sum_dev_start(m->par.dist, LP_DIST_TP, &m->ctx, out, (size_t)N * M, req);
    return lp_dist_allreduce_sum_dev(m->par.dist, LP_DIST_TP, &m->ctx, out, (size_t)N * M);
}

lp_status tp_linear_finish(lp_model *m, void *out, int L, int rb, int N, int M, lp_dist_req *req) {
    if (m->par.tp <= 1) return LP_OK;
    LP_CHECK(lp_dist_wait(m->par.dist, req));
    /* the bias once, after the sum of the partial outputs */
    return rb >= 0 && lw(m, L, rb) ? lp_affine(&m->ctx, out, out, m->par.ones, lw(m, L, rb), N, M) : LP_OK;
}

/* ---- the unembedding, vocabulary-parallel ---- */

const void *tp_unembed_w(const lp_model *m) {
    const char *w = wparam(m, m->w.unembed);
    /* tied: this rank's rows of the (replicated) embedding; untied: the slice it loaded */
    if (m->par.tp > 1 && m->w.unembed == m->w.embed) w += (size_t)m->par.v0 * m->cfg.d_model * act_size(m);
    return w;
}

lp_status tp_gather_logits(lp_model *m, void *full, const void *local, int rows) {
    cols c = {rows, m->cfg.d_vocab, 1, 3};
    return gather_cols(m, full, local, &c);
}

/* Losses of rows [r0, r0 + rows) from this rank's logits [rows, V_local] (capped already):
 * the row maxima all-reduced (max), then each row's sum of exp(x - max) and its target's
 * logit (from the rank that holds it) all-reduced (sum); in double on the host. */
lp_status tp_xent(lp_model *m, const void *logits, int r0, int rows) {
    lp_ctx *c = &m->ctx;
    mdl_tp *p = &m->par;
    size_t n = (size_t)rows * p->V;
    const float *x = logits;
    if (c->device != LP_CPU || c->dtype != LP_F32) {
        LP_CHECK(lp_ctx_to_host(c, m->a.logit_stage, logits, n * act_size(m)));
        LP_CHECK(lp_convert_host(p->xh, LP_F32, m->a.logit_stage, c->dtype, n));
        x = p->xh;
    }
    const int32_t *tgt = m->a.tgt_host + r0;
    double *mx = p->red, *sum = p->red + rows; /* sum: [rows] sums, then [rows] target logits */
    for (int i = 0; i < rows; i++) {
        mx[i] = -INFINITY;
        for (int v = 0; v < p->V; v++) mx[i] = fmax(mx[i], x[(size_t)i * p->V + v]);
    }
    LP_CHECK(lp_dist_allreduce_max(p->dist, LP_DIST_TP, mx, rows, LP_F64));
    for (int i = 0; i < rows; i++) {
        double s = 0;
        for (int v = 0; v < p->V; v++) s += exp((double)x[(size_t)i * p->V + v] - mx[i]);
        int t = tgt[i] - p->v0;
        sum[i] = s, sum[rows + i] = tgt[i] >= 0 && t >= 0 && t < p->V ? x[(size_t)i * p->V + t] : 0;
    }
    LP_CHECK(lp_dist_allreduce_sum(p->dist, LP_DIST_TP, sum, 2 * (size_t)rows, LP_F64));
    float *loss = m->a.loss_stage;
    for (int i = 0; i < rows; i++) loss[i] = tgt[i] < 0 ? 0.0f : (float)(log(sum[i]) + mx[i] - sum[rows + i]);
    return lp_ctx_to_device(c, m->a.loss + r0, loss, (size_t)rows * sizeof(float));
}

lp_status tp_host_alloc(lp_model *m, int lrows) {
    mdl_tp *p = &m->par;
    if (p->tp <= 1) return LP_OK;
    free(p->xh);
    free(p->red);
    p->xh = malloc((size_t)lrows * p->V * sizeof(float));
    p->red = malloc((size_t)lrows * 3 * sizeof(double));
    if (!p->xh || !p->red) LP_FAIL(LP_ERR_OOM, "out of host memory for %d rows of logits", lrows);
    return LP_OK;
}

/* ---- the backward ---- */

/* full [rows, c->full] = the sum over ranks of each rank's local columns put in place (zeros
 * elsewhere): the whole gradient, where ranks sharing a kv head each hold a part of it. */
static lp_status sum_cols(lp_model *m, void *full, const void *local, const cols *c) {
    size_t es = act_size(m), n = (size_t)c->rows * c->full;
    int s, w;
    cols_rank(m, c, m->par.rank, &s, &w);
    LP_CHECK(lp_ctx_memset0(&m->ctx, full, n * es));
    for (int i = 0; i < c->rows; i++)
        LP_CHECK(lp_ctx_copy(&m->ctx, (char *)full + ((size_t)i * c->full + s) * es, (const char *)local + (size_t)i * w * es, w * es));
    return lp_dist_allreduce_sum_dev(m->par.dist, LP_DIST_TP, &m->ctx, full, n);
}

lp_status tp_grad_gather(lp_model *m, int kind, const void *grad, void **whole) {
    cols c;
    *whole = (void *)grad;
    if (m->par.tp <= 1 || !cols_of(m, kind, &c)) return LP_OK;
    *whole = m->a.tp_full;
    return sum_cols(m, m->a.tp_full, grad, &c);
}

lp_status tp_grad_scatter(lp_model *m, int kind, void *grad, const void *whole) {
    cols c;
    if (whole == grad || !cols_of(m, kind, &c)) return LP_OK;
    LP_CHECK(scatter_cols(m, grad, whole, &c));
    /* a kv head held by several ranks: its whole gradient flows on from the first of them
     * only, so that the sums over ranks further down count it once */
    int s, w, sp, wp;
    cols_rank(m, &c, m->par.rank, &s, &w);
    if (m->par.rank > 0) cols_rank(m, &c, m->par.rank - 1, &sp, &wp);
    if (m->par.rank > 0 && sp == s) LP_CHECK(lp_ctx_memset0(&m->ctx, grad, (size_t)c.rows * w * act_size(m)));
    return LP_OK;
}

lp_status tp_logits_of(lp_model *m, void *out, const void *x, int rows) {
    const lp_config *cf = &m->cfg;
    if (m->par.tp <= 1) return lp_matmul(&m->ctx, out, x, wparam(m, m->w.unembed), NULL, rows, cf->d_model, cf->d_vocab, 1);
    size_t es = act_size(m);
    for (int r0 = 0; r0 < rows; r0 += m->a.logit_rows) {
        int n = rows - r0 < m->a.logit_rows ? rows - r0 : m->a.logit_rows;
        LP_CHECK(lp_matmul(&m->ctx, m->a.tp_logits, (const char *)x + (size_t)r0 * cf->d_model * es, tp_unembed_w(m), NULL, n,
                           cf->d_model, m->par.V, 1));
        LP_CHECK(tp_gather_logits(m, (char *)out + (size_t)r0 * cf->d_vocab * es, m->a.tp_logits, n));
    }
    return LP_OK;
}

lp_status tp_unembed_dx(lp_model *m, void *dx, const void *dlogits, int rows) {
    const lp_config *cf = &m->cfg;
    lp_ctx *c = &m->ctx;
    if (m->par.tp <= 1) return lp_matmul(c, dx, dlogits, wparam(m, m->w.unembed), NULL, rows, cf->d_vocab, cf->d_model, 0);
    size_t es = act_size(m);
    cols vc = {0, cf->d_vocab, 1, 3};
    for (int r0 = 0; r0 < rows; r0 += m->a.logit_rows) {
        vc.rows = rows - r0 < m->a.logit_rows ? rows - r0 : m->a.logit_rows;
        LP_CHECK(scatter_cols(m, m->a.tp_logits, (const char *)dlogits + (size_t)r0 * cf->d_vocab * es, &vc));
        void *o = (char *)dx + (size_t)r0 * cf->d_model * es;
        LP_CHECK(lp_matmul(c, o, m->a.tp_logits, tp_unembed_w(m), NULL, vc.rows, m->par.V, cf->d_model, 0));
        LP_CHECK(lp_dist_allreduce_sum_dev(m->par.dist, LP_DIST_TP, c, o, (size_t)vc.rows * cf->d_model));
    }
    return LP_OK;
}
