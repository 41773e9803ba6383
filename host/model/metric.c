/* metric.c: what lp_model_grad and lp_model_metric take the gradient of (a logit
 * difference, a log-probability, the mean loss, or a direction at a hook), reading it from
 * a taped forward, and the gradient entering at the logits (through the unembedding and,
 * for Gemma 2, the final soft-cap) or at the direction's hook; then the architecture's
 * backward carries it down (arch.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/attrib.h"
#include "loupe/ops.h"
#include "model/arch.h"
#include "model/grad.h"


static int row_pos(const lp_metric *mt, int b, int T) { return mt->pos ? mt->pos[b] : T - 1; }

static lp_status check_metric(const lp_model *m, const lp_metric *mt, int B, int T) {
    int V = m->cfg.d_vocab;
    if (mt->kind == LP_METRIC_DIRECTION) {
        if (!mt->hook || !mt->direction) LP_FAIL(LP_ERR_ARG, "direction metric: needs a hook and a direction");
        int id = lp_hook_find(m, mt->hook);
        if (id < 0) LP_FAIL(LP_ERR_NOT_FOUND, "direction metric: unknown hook '%s'", mt->hook);
        if (m->hooks[id].head_outer) LP_FAIL(LP_ERR_ARG, "direction metric: '%s' is not a per-token hook", mt->hook);
        return LP_OK;
    }
    if (mt->kind == LP_METRIC_MEAN_LOSS) {
        if (T < 2) LP_FAIL(LP_ERR_ARG, "mean-loss metric: rows of %d token(s) predict nothing", T);
        return LP_OK;
    }
    for (int b = 0; b < B; b++) {
        int p = row_pos(mt, b, T);
        if (p < 0 || p >= T) LP_FAIL(LP_ERR_ARG, "metric: row %d reads position %d of %d", b, p, T);
        if (!mt->answer || mt->answer[b] < 0 || mt->answer[b] >= V) LP_FAIL(LP_ERR_ARG, "metric: row %d: answer token is not in [0, %d)", b, V);
        if (mt->kind == LP_METRIC_LOGIT_DIFF && (!mt->wrong || mt->wrong[b] < 0 || mt->wrong[b] >= V))
            LP_FAIL(LP_ERR_ARG, "metric: row %d: wrong-answer token is not in [0, %d)", b, V);
    }
    return LP_OK;
}

/* Logits of the rows the metric reads: ln_out rows gathered, times the unembedding; or,
 * while unembed.hook_out is hooked, those rows of the forward's whole (maybe edited) logits. */
static lp_status read_rows(lp_model *m, const lp_metric *mt, int B, int T, void *rows_dev, void *logits_dev, float *host) {
    lp_ctx *c = &m->ctx;
    size_t es = act_elem_bytes(m), D = m->cfg.d_model;
    int V = m->cfg.d_vocab;
    if (hooks_want_full_logits(m)) {
        for (int b = 0; b < B; b++)
            LP_CHECK(lp_ctx_copy(c, (char *)logits_dev + b * V * es, (char *)m->a.logits + ((size_t)b * T + row_pos(mt, b, T)) * V * es, V * es));
    } else {
        for (int b = 0; b < B; b++)
            LP_CHECK(lp_ctx_copy(c, (char *)rows_dev + b * D * es, (char *)m->a.ln_out + ((size_t)b * T + row_pos(mt, b, T)) * D * es, D * es));
        LP_CHECK(tp_logits_of(m, logits_dev, rows_dev, B));
        if (m->cfg.final_softcap > 0) LP_CHECK(lp_softcap(c, logits_dev, logits_dev, m->cfg.final_softcap, (size_t)B * V));
    }
    if (c->device == LP_CPU) {
        memcpy(host, logits_dev, (size_t)B * V * sizeof(float));
        return LP_OK;
    }
    void *st = malloc((size_t)B * V * es);
    if (!st) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status s = lp_ctx_to_host(c, st, logits_dev, (size_t)B * V * es);
    if (s == LP_OK) s = lp_convert_host(host, LP_F32, st, c->dtype, (size_t)B * V);
    free(st);
    return s;
}

static double metric_row(const lp_metric *mt, const float *l, int V, int b) {
    if (mt->kind == LP_METRIC_LOGIT_DIFF) return (double)l[mt->answer[b]] - l[mt->wrong[b]];
    double mx = -INFINITY, z = 0;
    for (int v = 0; v < V; v++) mx = fmax(mx, l[v]);
    for (int v = 0; v < V; v++) z += exp(l[v] - mx);
    return l[mt->answer[b]] - mx - log(z);
}

/* d metric / d logits of row b (logits l) into d[V], which starts at zero. */
static void metric_grad_row(const lp_metric *mt, const float *l, int V, int b, float *d) {
    if (mt->kind == LP_METRIC_LOGIT_DIFF) {
        d[mt->answer[b]] += 1.0f, d[mt->wrong[b]] -= 1.0f;
        return;
    }
    double mx = -INFINITY, z = 0;
    for (int v = 0; v < V; v++) mx = fmax(mx, l[v]);
    for (int v = 0; v < V; v++) z += exp(l[v] - mx);
    for (int v = 0; v < V; v++) d[v] = (float)-(exp(l[v] - mx) / z);
    d[mt->answer[b]] += 1.0f;
}

/* Scratch of one lp_model_grad: rows, logits and their gradients, and bw_bufs; carved from
 * one device buffer the model keeps (grown when a batch needs more, never freed per call). */
typedef struct scratch {
    void *rows, *logits, *drows;
    bw_bufs g;
} scratch;

/* Whether the backward takes a norm apart at its scale: its scale is edited or a direction
 * enters there. */
static int scales_split(const lp_model *m, int dir_id) {
    for (int i = 0; i < m->n_hooks; i++) {
        int k = m->hooks[i].kind;
        int scale = k == HK_LN1_SCALE || k == HK_LN2_SCALE || k == HK_LNF_SCALE || k == HK_LN1P_SCALE || k == HK_LN2P_SCALE ||
                    k == HK_QN_SCALE || k == HK_KN_SCALE;
        if (scale && (m->hooks[i].edits || i == dir_id)) return 1;
    }
    return 0;
}

/* width values of 1 / width into dst (act dtype). */
static lp_status upload_inv(lp_model *m, void *dst, int width) {
    float *h = malloc((size_t)width * sizeof(float));
    if (!h) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (int i = 0; i < width; i++) h[i] = 1.0f / (float)width;
    lp_status st = lp_ctx_upload_f32(&m->ctx, dst, h, (size_t)width);
    free(h);
    return st;
}

/* backward = 0: only what reading the metric needs (a metric-only run, once per exact-patching batch).
 * full: the logits' gradient is formed for all B x T rows at once (unembed.hook_out's is wanted). */
static lp_status scratch_alloc(lp_model *m, scratch *s, int B, int T, int backward, int full, int dir_id) {
    const lp_config *c = &m->cfg;
    size_t N = (size_t)B * T, D = c->d_model, F = c->d_mlp, es = act_elem_bytes(m), V = c->d_vocab, H = c->n_heads;
    size_t qD = H * c->d_head, kvD = (size_t)c->n_kv_heads * c->d_head;
    size_t wide = D > qD ? D : qD;
    if (F > wide) wide = F;
    size_t mat = hooks_want_attn_mats(m) ? (size_t)B * H * T * attn_keys(m, T) * es : 0; /* [B,H,T,keys] */
    size_t lrows = (size_t)m->a.logit_rows > (size_t)B ? (size_t)m->a.logit_rows : (size_t)B;
    if (full) lrows = N;
    if (!backward) N = 0, mat = 0, lrows = (size_t)B;
    int sp = backward && scales_split(m, dir_id);
    size_t wn = D > qD ? D : qD; /* the widest norm: the residual's, or the q norm's rows of all heads */
    struct { void **p; size_t bytes; } b[] = {
        {&s->rows, B * D * es}, {&s->logits, lrows * V * es}, {&s->drows, backward ? lrows * V * es : 0},
        {&s->g.dresid, N * D * es}, {&s->g.dtmp, N * wide * es}, {&s->g.dln, N * D * es}, {&s->g.dq, N * qD * es},
        {&s->g.dk, N * kvD * es}, {&s->g.dv, N * kvD * es}, {&s->g.dz, N * qD * es}, {&s->g.da, N * F * es},
        {&s->g.db, N * F * es}, {&s->g.dc, N * F * es}, {&s->g.dpat, mat}, {&s->g.dsc, mat}, {&s->g.dscale, N * H * es},
        {&s->g.dbr, c->post_norms ? N * D * es : 0},
        {&s->g.nrm, sp ? N * wn * es : 0}, {&s->g.nsc, sp ? N * H * es : 0}, {&s->g.invd, sp ? D * es : 0},
        {&s->g.invdh, sp ? (size_t)c->d_head * es : 0},
    };
    size_t off = 0;
    for (size_t i = 0; i < sizeof b / sizeof *b; i++) off += (b[i].bytes + 255) / 256 * 256;
    LP_CHECK(grad_buffer(m, &m->grad->scratch, &m->grad->scratch_bytes, off));
    off = 0;
    for (size_t i = 0; i < sizeof b / sizeof *b; i++) {
        *b[i].p = b[i].bytes ? (char *)m->grad->scratch + off : NULL;
        off += (b[i].bytes + 255) / 256 * 256;
    }
    s->g.ones = m->grad_ones;
    if (!sp) return LP_OK;
    LP_CHECK(upload_inv(m, s->g.invd, c->d_model));
    return upload_inv(m, s->g.invdh, c->d_head);
}

/* Ones in the act dtype, for broadcasts (lp_affine's multiplier). */
static lp_status ensure_ones(lp_model *m) {
    if (m->grad_ones) return LP_OK;
    const lp_config *c = &m->cfg;
    size_t n = (size_t)c->d_model;
    size_t cand[4] = {(size_t)c->n_heads * c->d_head, (size_t)c->d_mlp, (size_t)c->n_ctx, (size_t)c->d_vocab};
    for (int i = 0; i < 4; i++) n = cand[i] > n ? cand[i] : n;
    float *h = malloc(n * sizeof(float));
    if (!h) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (size_t i = 0; i < n; i++) h[i] = 1.0f;
    lp_status st = lp_ctx_alloc(&m->ctx, n * act_elem_bytes(m), &m->grad_ones);
    if (st == LP_OK) st = lp_ctx_upload_f32(&m->ctx, m->grad_ones, h, n);
    free(h);
    return st;
}


/* The gradient at capped logits y [rows, V] to the logits before Gemma 2's final soft-cap, in place. */
static lp_status uncap(lp_model *m, void *dl, const void *y, size_t n) {
    float cap = m->cfg.final_softcap;
    return cap > 0 ? lp_softcap_backward(&m->ctx, dl, dl, y, cap, n) : LP_OK;
}

/* The GPU's mean-loss gradient over the padded unembedding (vocab.c): per chunk of rows whose
 * [rows, Vp] logits stay in L2, the logits, the softmax gradient (zero in the padded columns)
 * and its product with W_U into s->g.dln; the full logits never exist. */
static lp_status mean_loss_backward_padded(lp_model *m, scratch *s, size_t N, int chunk) {
    lp_ctx *c = &m->ctx;
    size_t D = m->cfg.d_model, es = act_elem_bytes(m);
    int V = m->cfg.d_vocab, Vp = vocab_padded(m);
    for (size_t r0 = 0; r0 < N; r0 += (size_t)chunk) {
        int rows = (int)(N - r0 < (size_t)chunk ? N - r0 : (size_t)chunk);
        LP_CHECK(vocab_pad_logits(m, s->logits, (char *)m->a.ln_out + r0 * D * es, rows));
        LP_CHECK(lp_xent_backward_ld(c, s->drows, s->logits, m->a.tgt + r0, m->grad->row_scale + r0, rows, V, Vp));
        LP_CHECK(uncap(m, s->drows, s->logits, (size_t)rows * Vp));
        LP_CHECK(vocab_pad_dx(m, (char *)s->g.dln + r0 * D * es, s->drows, rows));
    }
    return LP_OK;
}

/* The mean-loss metric's gradient at the logits, chunk by chunk (one chunk of all rows when
 * `full`), through the unembedding into s->g.dln, with the unembed.hook_out site when full.
 * The logits are the forward's own while unembed.hook_out is hooked (they may be edited). */
static lp_status mean_loss_backward(lp_model *m, scratch *s, int B, int T, int full) {
    lp_ctx *c = &m->ctx;
    struct grad_state *g = m->grad;
    size_t N = (size_t)B * T, D = m->cfg.d_model, es = act_elem_bytes(m);
    int V = m->cfg.d_vocab, kept = hooks_want_full_logits(m);
    /* per row, the mean over its T-1 predictions: uploaded only when T changes */
    LP_CHECK(grad_buffer(m, (void **)&g->row_scale, &g->row_scale_n, N * sizeof(float)));
    float *scale_h = malloc(N * sizeof(float));
    if (!scale_h) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (size_t i = 0; i < N; i++) scale_h[i] = 1.0f / (T - 1);
    lp_status st = lp_ctx_to_device(c, g->row_scale, scale_h, N * sizeof(float));
    free(scale_h);
    if (st == LP_OK && !full && !kept) {
        int pad = vocab_pad_rows(m, (size_t)m->a.logit_rows * V);
        if (pad > 0) return mean_loss_backward_padded(m, s, N, pad);
    }
    size_t chunk = full || kept ? N : (size_t)m->a.logit_rows;
    for (size_t r0 = 0; st == LP_OK && r0 < N; r0 += chunk) {
        int rows = (int)(N - r0 < chunk ? N - r0 : chunk);
        void *logits = kept ? (char *)m->a.logits + r0 * V * es : s->logits;
        if (!kept) st = tp_logits_of(m, s->logits, (char *)m->a.ln_out + r0 * D * es, rows);
        if (st == LP_OK && !kept && m->cfg.final_softcap > 0) st = lp_softcap(c, s->logits, s->logits, m->cfg.final_softcap, (size_t)rows * V);
        if (st == LP_OK) st = lp_xent_backward(c, s->drows, logits, m->a.tgt + r0, g->row_scale + r0, rows, V);
        if (st == LP_OK) st = uncap(m, s->drows, logits, (size_t)rows * V);
        if (st == LP_OK && full) st = grad_site(m, HK_UNEMBED_OUT, m->cfg.n_layers, s->drows);
        if (st == LP_OK) st = tp_unembed_dx(m, (char *)s->g.dln + r0 * D * es, s->drows, rows);
    }
    return st;
}

/* The capped logits of all N rows (full gradient of a logit metric under Gemma 2's soft-cap):
 * the forward's own when it kept them, else formed again from the final norm's output. */
static lp_status all_capped_logits(lp_model *m, scratch *s, size_t N, const void **out) {
    if (hooks_want_full_logits(m)) return *out = m->a.logits, LP_OK;
    const lp_config *cf = &m->cfg;
    LP_CHECK(tp_logits_of(m, s->logits, m->a.ln_out, (int)N));
    *out = s->logits;
    return lp_softcap(&m->ctx, s->logits, s->logits, cf->final_softcap, N * cf->d_vocab);
}

/* The metric's gradient from the logits into s->g.dln (the final norm's output, zeroed), with
 * the unembed.hook_out and unembed.hook_in gradient sites. Unless `full`, the logit metrics'
 * gradient is formed only on the rows they read (lh: those rows' logits, [B, V]). A direction
 * metric at this layer starts from zero (its direction enters at its own site). */
static lp_status unembed_backward(lp_model *m, scratch *s, const lp_metric *mt, int B, int T, const float *lh, int full) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    size_t N = (size_t)B * T, D = cf->d_model, es = act_elem_bytes(m), V = cf->d_vocab;
    if (mt->kind == LP_METRIC_LOGIT_DIFF || mt->kind == LP_METRIC_LOGPROB) {
        size_t rows = full ? N : (size_t)B;
        float *dl = calloc(rows * V, sizeof(float));
        if (!dl) LP_FAIL(LP_ERR_OOM, "out of memory for the logits' gradient");
        for (int b = 0; b < B; b++)
            metric_grad_row(mt, lh + (size_t)b * V, (int)V, b, dl + (full ? (size_t)b * T + row_pos(mt, b, T) : (size_t)b) * V);
        lp_status st = lp_ctx_upload_f32(c, s->drows, dl, rows * V);
        free(dl);
        LP_CHECK(st);
        const void *y = s->logits; /* the read rows' capped logits (read_rows) */
        if (full && cf->final_softcap > 0) LP_CHECK(all_capped_logits(m, s, N, &y));
        LP_CHECK(uncap(m, s->drows, y, rows * V));
        if (full) {
            GSITE(HK_UNEMBED_OUT, cf->n_layers, s->drows);
            LP_CHECK(tp_unembed_dx(m, s->g.dln, s->drows, (int)N));
        } else { /* d ln_out = dlogits W_U at the read rows */
            LP_CHECK(tp_unembed_dx(m, s->rows, s->drows, B));
            for (int b = 0; b < B; b++)
                LP_CHECK(lp_ctx_copy(c, (char *)s->g.dln + ((size_t)b * T + row_pos(mt, b, T)) * D * es, (char *)s->rows + b * D * es, D * es));
        }
    } else if (mt->kind == LP_METRIC_MEAN_LOSS) {
        LP_CHECK(mean_loss_backward(m, s, B, T, full));
    } else if (full) { /* a direction at unembed.hook_out */
        LP_CHECK(lp_ctx_memset0(c, s->drows, N * V * es));
        GSITE(HK_UNEMBED_OUT, cf->n_layers, s->drows);
        LP_CHECK(tp_unembed_dx(m, s->g.dln, s->drows, (int)N));
    }
    GSITE(HK_UNEMBED_IN, cf->n_layers, s->g.dln);
    return LP_OK;
}

/* The tape for a B x T batch and the gradients wanted: the layers the metric reaches (all of
 * them for a logit metric; a direction's hook's layer and below), carved from one buffer
 * kept on the model and grown when a batch needs more. */
static lp_status tape_prepare(lp_model *m, int B, int T, int dir_id) {
    const lp_config *cf = &m->cfg;
    if (!m->tp.layer && !(m->tp.layer = calloc(cf->n_layers + 1, sizeof *m->tp.layer))) LP_FAIL(LP_ERR_OOM, "out of memory");
    m->tp.on = 1; /* so that tape_layout sees the wanted pattern gradients */
    m->tp.top = dir_id >= 0 ? m->hooks[dir_id].layer : cf->n_layers;
    size_t need = tape_layout(m, B, T, 0);
    if (need > m->tp.bytes) {
        lp_ctx_release(&m->ctx, m->tp.mem);
        m->tp.mem = NULL, m->tp.bytes = 0;
        lp_status st = lp_ctx_alloc(&m->ctx, need, &m->tp.mem);
        if (st != LP_OK) return m->tp.on = 0, st;
        m->tp.bytes = need;
    }
    tape_layout(m, B, T, 1);
    return LP_OK;
}

/* A direction metric: the hook's activation (captured for this run) dotted with the
 * direction at every position, and, for the backward, the direction where it enters. */
static lp_status direction_metric(lp_model *m, const lp_metric *mt, int B, int T, int dir_id, double *metric_out, int backward) {
    struct grad_state *g = m->grad;
    lp_tensor a;
    int64_t hs[LP_MAX_DIMS];
    int hnd = lp_hook_shape(m, dir_id, 1, 1, hs);
    size_t per = (size_t)lp_shape_numel(hs + 2, hnd - 2); /* values per token */
    LP_CHECK(lp_capture_get(m, mt->hook, &a));
    if ((size_t)lp_shape_numel(a.shape, a.ndim) != (size_t)B * T * per)
        LP_FAIL(LP_ERR_ARG, "direction metric: '%s' is captured at chosen positions only; clear that capture first", mt->hook);
    float *f = malloc((size_t)B * T * per * sizeof(float));
    if (!f) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = lp_convert_host(f, LP_F32, a.data, a.dtype, (size_t)B * T * per);
    for (int b = 0; st == LP_OK && b < B; b++) {
        double acc = 0;
        for (size_t i = 0; i < (size_t)T * per; i++) acc += (double)f[(size_t)b * T * per + i] * mt->direction[i % per];
        metric_out[b] = acc;
    }
    free(f);
    if (st != LP_OK || !backward) return st;
    LP_CHECK(grad_buffer(m, &g->inject_dev, &g->inject_bytes, per * act_elem_bytes(m)));
    LP_CHECK(lp_ctx_upload_f32(&m->ctx, g->inject_dev, mt->direction, per));
    free(g->inject_host);
    if (!(g->inject_host = malloc(per * sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory");
    memcpy(g->inject_host, mt->direction, per * sizeof(float));
    g->inject_id = dir_id;
    return LP_OK;
}

/* The metric of each row into metric_out, read from the forward just run; *lh keeps a
 * logit metric's rows of logits ([B, V], host) for its gradient. */
static lp_status read_metric(lp_model *m, scratch *s, const lp_metric *mt, int B, int T, int backward, int full, int dir_id,
                             double *metric_out, float **lh) {
    int V = m->cfg.d_vocab;
    if (mt->kind == LP_METRIC_DIRECTION) {
        LP_CHECK(direction_metric(m, mt, B, T, dir_id, metric_out, backward));
        return backward ? scratch_alloc(m, s, B, T, 1, full, dir_id) : LP_OK;
    }
    if (mt->kind == LP_METRIC_MEAN_LOSS) {
        const float *l = lp_model_losses(m);
        for (int b = 0; b < B; b++) {
            double acc = 0;
            for (int i = 0; i < T - 1; i++) acc += l[(size_t)b * (T - 1) + i];
            metric_out[b] = acc / (T - 1);
        }
        return backward ? scratch_alloc(m, s, B, T, 1, full, dir_id) : LP_OK;
    }
    LP_CHECK(scratch_alloc(m, s, B, T, backward, full, dir_id));
    if (!(*lh = malloc((size_t)B * V * sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory");
    LP_CHECK(read_rows(m, mt, B, T, s->rows, s->logits, *lh));
    for (int b = 0; b < B; b++) metric_out[b] = metric_row(mt, *lh + (size_t)b * V, V, b);
    return LP_OK;
}

/* The backward from the metric (entering at the logits, or at a direction's layer). */
static lp_status run_backward(lp_model *m, scratch *s, const lp_metric *mt, int B, int T, const float *lh, int full, int dir_id) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    size_t ND = (size_t)B * T * cf->d_model * act_elem_bytes(m);
    LP_CHECK(lp_ctx_memset0(c, s->g.dresid, ND));
    LP_CHECK(lp_ctx_memset0(c, s->g.dln, ND));
    int top = mt->kind == LP_METRIC_DIRECTION ? m->hooks[dir_id].layer : cf->n_layers;
    m->tp.on = 1; /* grad_wanted answers for the backward too */
    if (top == cf->n_layers) LP_CHECK(unembed_backward(m, s, mt, B, T, lh, full));
    LP_CHECK(m->arch->backward(m, &s->g, B, T, top));
    return lp_ctx_sync(c);
}

static lp_status grad_run(lp_model *m, const int32_t *tokens, int B, int T, const lp_metric *mt, const char *grad_hooks,
                          double *metric_out, int backward) {
    LP_CHECK(check_metric(m, mt, B, T));
    struct grad_state *g = NULL;
    LP_CHECK(grad_state_get(m, &g));
    if (backward) LP_CHECK(grad_set_wanted(m, grad_hooks)); /* a metric-only run keeps the last gradients */
    LP_CHECK(ensure_ones(m));
    g->B = B, g->T = T, g->inject_id = -1;
    int dir_id = mt->kind == LP_METRIC_DIRECTION ? lp_hook_find(m, mt->hook) : -1;
    /* the gradient at the logits is formed whole only when unembed.hook_out's is wanted, a
     * direction enters there or an edit's Jacobian applies there */
    int out_id = hook_id(m, HK_UNEMBED_OUT, m->cfg.n_layers);
    int full = backward && (g->want[out_id] || dir_id == out_id || m->hooks[out_id].edits);
    /* a direction metric reads the hook's activation: capture it for this run */
    int had_capture = dir_id >= 0 && m->hooks[dir_id].capture;
    if (dir_id >= 0 && !had_capture) LP_CHECK(lp_hook_capture(m, mt->hook, NULL, 0, NULL));
    /* sized with taping on, so that wanted pattern gradients count */
    m->tp.on = backward;
    lp_status st = lp_model_prepare(m, B, T);
    m->tp.on = 0;
    if (st == LP_OK && backward) st = tape_prepare(m, B, T, dir_id);
    int want = mt->kind == LP_METRIC_MEAN_LOSS ? LP_WANT_LOSS : mt->kind == LP_METRIC_DIRECTION ? 0 : LP_WANT_FINAL_NORM;
    if (st == LP_OK) st = lp_model_forward(m, tokens, B, T, want);
    scratch s = {0};
    float *lh = NULL;
    if (st == LP_OK) st = read_metric(m, &s, mt, B, T, backward, full, dir_id, metric_out, &lh);
    if (dir_id >= 0 && !had_capture) m->hooks[dir_id].capture = 0, m->any_hook_dirty = 1;
    if (st == LP_OK && backward) st = run_backward(m, &s, mt, B, T, lh, full, dir_id);
    m->tp.on = 0;
    free(lh);
    return st;
}

/* Each call is a new run: whatever it does not reach (or if it fails, everything) reads
 * as absent in lp_grad_get, never as an older run's gradient. */
lp_status lp_model_grad(lp_model *m, const int32_t *tokens, int B, int T, const lp_metric *metric, const char *grad_hooks,
                        double *metric_out) {
    struct grad_state *g = NULL;
    LP_CHECK(grad_state_get(m, &g));
    g->run++, g->ok = 0, g->passed = -1;
    g->enter_id = metric && metric->kind == LP_METRIC_DIRECTION && metric->hook ? lp_hook_find(m, metric->hook) : -1;
    LP_CHECK(grad_run(m, tokens, B, T, metric, grad_hooks, metric_out, 1));
    g->ok = 1, g->res_B = B, g->res_T = T;
    return LP_OK;
}

lp_status lp_model_metric(lp_model *m, const int32_t *tokens, int B, int T, const lp_metric *metric, double *metric_out) {
    return grad_run(m, tokens, B, T, metric, NULL, metric_out, 0);
}

