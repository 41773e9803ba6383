/* backward.c: gradients of a metric with respect to hook activations. The forward runs
 * "taping": each layer keeps in its own slice of one allocation what its backward needs
 * (the residual before each norm, the norms' scales, q/k/v, the MLP pre-activations, and
 * the attention pattern where its gradient is asked for); the metric's gradient enters at
 * the final norm's output (or at a hook, for a direction metric) and each architecture's
 * backward (gpt2.c, llama.c) carries it down, stopping at every hook site, where the
 * forward's edits of that hook apply their Jacobians (hooks.c). The tape and the backward
 * steps the architectures share are in tape.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fnmatch.h>

#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "loupe/ops.h"
#include "loupe/sae_ops.h"
#include "model/model_internal.h"

/* Every gradient buffer records the backward that wrote it (gen) and the callback edit of
 * unknown Jacobian, if any, that the gradient had passed by then (poison), so that
 * lp_grad_get can tell a gradient of the last backward from a stale or unknowable one. */
struct grad_state {
    unsigned char *want;   /* [n_hooks] */
    float **host;          /* [n_hooks] F32 gradients */
    size_t *cap;           /* floats each host buffer holds */
    unsigned *gen;         /* [n_hooks] the backward that wrote host[i] (0: none) */
    int *poison;           /* [n_hooks] the callback-edited hook it passed, or -1 */
    int inject_id;         /* direction metric: where its direction enters, or -1 */
    void *inject_dev;      /* the direction on the device, act dtype */
    float *inject_host;    /* the same, F32 on the host (the embeddings' sites add it there) */
    void *stage;           /* device-to-host staging in the act dtype */
    size_t stage_cap;
    int B, T;              /* the batch being taken (gradient sites size their buffers by it) */
    unsigned char *pwant;  /* [n_params_t] weight gradients wanted */
    float **phost;         /* [n_params_t] */
    unsigned *pgen;        /* [n_params_t] */
    int *ppoison;          /* [n_params_t] */
    /* the last lp_model_grad: its number, whether it finished, its batch, where its metric
     * entered (a direction's hook, or -1 for the logits), and, while it runs, the first
     * callback edit of unknown Jacobian the gradient has passed (-1: none yet) */
    unsigned run;
    int ok, res_B, res_T, enter_id, passed;
};

static lp_status grad_state_get(lp_model *m, struct grad_state **out) {
    if (!m->grad) {
        struct grad_state *g = calloc(1, sizeof *g);
        if (!g) LP_FAIL(LP_ERR_OOM, "out of memory");
        g->want = calloc(m->n_hooks, 1);
        g->host = calloc(m->n_hooks, sizeof *g->host);
        g->cap = calloc(m->n_hooks, sizeof *g->cap);
        g->gen = calloc(m->n_hooks, sizeof *g->gen);
        g->poison = calloc(m->n_hooks, sizeof *g->poison);
        g->inject_id = g->enter_id = g->passed = -1;
        g->pwant = calloc(m->n_params_t, 1);
        g->phost = calloc(m->n_params_t, sizeof *g->phost);
        g->pgen = calloc(m->n_params_t, sizeof *g->pgen);
        g->ppoison = calloc(m->n_params_t, sizeof *g->ppoison);
        m->grad = g;
        if (!g->want || !g->host || !g->cap || !g->gen || !g->poison || !g->pwant || !g->phost || !g->pgen || !g->ppoison) {
            lp_grad_free(m);
            LP_FAIL(LP_ERR_OOM, "out of memory");
        }
    }
    *out = m->grad;
    return LP_OK;
}

void lp_grad_free(lp_model *m) {
    struct grad_state *g = m->grad;
    if (!g) return;
    for (int i = 0; g->host && i < m->n_hooks; i++) free(g->host[i]);
    for (int i = 0; g->phost && i < m->n_params_t; i++) free(g->phost[i]);
    free(g->host), free(g->want), free(g->cap), free(g->gen), free(g->poison), free(g->stage);
    free(g->pwant), free(g->phost), free(g->pgen), free(g->ppoison), free(g->inject_host);
    lp_ctx_release(&m->ctx, g->inject_dev);
    free(g);
    m->grad = NULL;
}

/* Whether the backward must stop at (kind, layer): its gradient is wanted, a direction
 * enters there, or the forward edited it (the edit's Jacobian applies there). */
int lp_grad_wanted(const lp_model *m, int kind, int layer) {
    if (!m->grad || !m->taping) return 0;
    int id = lp_hook_id(m, kind, layer);
    return id >= 0 && (m->grad->want[id] || id == m->grad->inject_id || m->hooks[id].edits);
}

int lp_grad_enters(const lp_model *m, int kind, int layer) {
    int id = lp_hook_id(m, kind, layer);
    return m->grad && id >= 0 && id == m->grad->inject_id;
}

/* ---- gradient sites ---- */

static size_t hook_numel(const lp_model *m, int id) {
    int64_t s[LP_MAX_DIMS];
    int nd = lp_hook_shape(m, id, m->grad->B, m->grad->T, s);
    return (size_t)lp_shape_numel(s, nd);
}

/* Keeps buf as the gradient of hook id (F32 on the host), marked as this run's. */
static lp_status grad_keep(lp_model *m, struct grad_state *g, int id, const void *buf) {
    lp_ctx *c = &m->ctx;
    size_t n = hook_numel(m, id), es = lp_act_size(m);
    if (n > g->cap[id]) {
        free(g->host[id]);
        g->cap[id] = 0;
        if (!(g->host[id] = malloc(n * sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory for the gradient of %s", m->hooks[id].name);
        g->cap[id] = n;
    }
    if (c->device == LP_CPU) {
        memcpy(g->host[id], buf, n * sizeof(float));
    } else {
        if (n * es > g->stage_cap) {
            free(g->stage);
            g->stage_cap = 0;
            if (!(g->stage = malloc(n * es))) LP_FAIL(LP_ERR_OOM, "out of memory");
            g->stage_cap = n * es;
        }
        LP_CHECK(lp_ctx_to_host(c, g->stage, buf, n * es));
        LP_CHECK(lp_convert_host(g->host[id], LP_F32, g->stage, c->dtype, n));
    }
    g->gen[id] = g->run, g->poison[id] = g->passed;
    return LP_OK;
}

/* The backward's stop at hook (kind, layer): buf holds d metric / d the hook's value as the
 * forward left it (after its edits, as TransformerLens's backward hooks report it). A
 * direction entering there is added, the gradient is kept when wanted, and then the edits'
 * Jacobian turns it into the gradient of the value before the edits, which flows on: zero
 * where an edit replaced the value, unchanged by a steer. hook_embed and hook_pos_embed share
 * buf and have nothing upstream: their direction is added to the kept copy only and buf is
 * left as it is. */
lp_status lp_grad_site(lp_model *m, int kind, int layer, void *buf) {
    struct grad_state *g = m->grad;
    int id = lp_hook_id(m, kind, layer);
    if (!g || id < 0) return LP_OK;
    int inputs = kind == HK_EMBED || kind == HK_POS_EMBED;
    size_t n = hook_numel(m, id), rows = (size_t)g->B * g->T, per = n / rows;
    if (id == g->inject_id && !inputs) /* d(act . direction)/d act: the direction at every token */
        LP_CHECK(lp_affine(&m->ctx, buf, buf, m->grad_ones, g->inject_dev, (int)rows, (int)per));
    if (g->want[id]) {
        LP_CHECK(grad_keep(m, g, id, buf));
        for (size_t i = 0; id == g->inject_id && inputs && i < n; i++) g->host[id][i] += g->inject_host[i % per];
    }
    if (inputs || !m->hooks[id].edits) return LP_OK;
    int unknown = 0;
    LP_CHECK(lp_hook_edit_jacobian(m, id, buf, &unknown));
    if (unknown && g->passed < 0) g->passed = id; /* every gradient from here down is unknowable */
    return LP_OK;
}

/* ---- the metric and the gradient entering at the final norm ---- */

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
    size_t es = lp_act_size(m), D = m->cfg.d_model;
    int V = m->cfg.d_vocab;
    if (lp_hooks_want_full_logits(m)) {
        for (int b = 0; b < B; b++)
            LP_CHECK(lp_ctx_copy(c, (char *)logits_dev + b * V * es, (char *)m->logits + ((size_t)b * T + row_pos(mt, b, T)) * V * es, V * es));
    } else {
        for (int b = 0; b < B; b++)
            LP_CHECK(lp_ctx_copy(c, (char *)rows_dev + b * D * es, (char *)m->ln_out + ((size_t)b * T + row_pos(mt, b, T)) * D * es, D * es));
        LP_CHECK(lp_matmul(c, logits_dev, rows_dev, lp_param(m, m->unembed), NULL, B, (int)D, V, 1));
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

/* Scratch of one lp_model_grad: rows, logits and their gradients, and bw_bufs. */
typedef struct scratch {
    void *mem;
    void *rows, *logits, *drows;
    bw_bufs g;
} scratch;

/* backward = 0: only what reading the metric needs (a metric-only run, once per exact-patching batch).
 * full: the logits' gradient is formed for all B x T rows at once (unembed.hook_out's is wanted). */
static lp_status scratch_alloc(lp_model *m, scratch *s, int B, int T, int backward, int full, int dir_id) {
    const lp_config *c = &m->cfg;
    size_t N = (size_t)B * T, D = c->d_model, F = c->d_mlp, es = lp_act_size(m), V = c->d_vocab;
    size_t qD = (size_t)c->n_heads * c->d_head, kvD = (size_t)c->n_kv_heads * c->d_head;
    size_t wide = D > qD ? D : qD;
    if (F > wide) wide = F;
    size_t mat = lp_hooks_want_attn_mats(m) ? (size_t)B * c->n_heads * T * T * es : 0;
    size_t lrows = (size_t)m->logit_rows > (size_t)B ? (size_t)m->logit_rows : (size_t)B;
    if (full) lrows = N;
    if (!backward) N = 0, mat = 0, lrows = (size_t)B;
    /* a norm whose scale is edited, or where a direction enters, is taken apart at its scale */
    int sp = 0;
    for (int i = 0; backward && i < m->n_hooks; i++) {
        int k = m->hooks[i].kind;
        if ((k == HK_LN1_SCALE || k == HK_LN2_SCALE || k == HK_LNF_SCALE) && (m->hooks[i].edits || i == dir_id)) sp = 1;
    }
    struct { void **p; size_t bytes; } b[] = {
        {&s->rows, B * D * es}, {&s->logits, lrows * V * es}, {&s->drows, backward ? lrows * V * es : 0},
        {&s->g.dresid, N * D * es}, {&s->g.dtmp, N * wide * es}, {&s->g.dln, N * D * es}, {&s->g.dq, N * qD * es},
        {&s->g.dk, N * kvD * es}, {&s->g.dv, N * kvD * es}, {&s->g.dz, N * qD * es}, {&s->g.da, N * F * es},
        {&s->g.db, N * F * es}, {&s->g.dc, N * F * es}, {&s->g.dpat, mat}, {&s->g.dsc, mat}, {&s->g.dscale, N * es},
        {&s->g.nrm, sp ? N * D * es : 0}, {&s->g.nsc, sp ? N * es : 0}, {&s->g.invd, sp ? D * es : 0},
    };
    size_t off = 0;
    for (size_t i = 0; i < sizeof b / sizeof *b; i++) off += (b[i].bytes + 255) / 256 * 256;
    LP_CHECK(lp_ctx_alloc(&m->ctx, off, &s->mem));
    off = 0;
    for (size_t i = 0; i < sizeof b / sizeof *b; i++) {
        *b[i].p = b[i].bytes ? (char *)s->mem + off : NULL;
        off += (b[i].bytes + 255) / 256 * 256;
    }
    s->g.ones = m->grad_ones;
    if (!sp) return LP_OK;
    float *h = malloc(D * sizeof(float));
    if (!h) LP_FAIL(LP_ERR_OOM, "out of memory");
    for (size_t i = 0; i < D; i++) h[i] = 1.0f / (float)D;
    lp_status st = lp_ctx_upload_f32(&m->ctx, s->g.invd, h, D);
    free(h);
    return st;
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
    lp_status st = lp_ctx_alloc(&m->ctx, n * lp_act_size(m), &m->grad_ones);
    if (st == LP_OK) st = lp_ctx_upload_f32(&m->ctx, m->grad_ones, h, n);
    free(h);
    return st;
}


/* Registers which gradients to keep. */
static lp_status set_wanted(lp_model *m, const char *grad_hooks) {
    struct grad_state *g = m->grad;
    memset(g->want, 0, m->n_hooks);
    memset(g->pwant, 0, m->n_params_t);
    if (!grad_hooks || !grad_hooks[0]) return LP_OK;
    char *list = strdup(grad_hooks), *save = NULL;
    if (!list) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = LP_OK;
    for (char *p = strtok_r(list, ",", &save); p && st == LP_OK; p = strtok_r(NULL, ",", &save)) {
        int glob = strpbrk(p, "*?[") != NULL, n = 0;
        for (int i = 0; i < m->n_hooks; i++)
            if (glob ? fnmatch(p, m->hooks[i].name, 0) == 0 : strcmp(p, m->hooks[i].name) == 0) g->want[i] = 1, n++;
        /* weights: the blocks' linear layers (names as `loupe info` does not list them:
         * blocks.L.attn.W_Q|W_K|W_V|W_O, blocks.L.mlp.W_in|W_out (GPT-2) or W_gate|W_in|W_out) */
        for (int i = 0; i < m->n_params_t; i++) {
            const param *pa = &m->params[i];
            if (!(glob ? fnmatch(p, pa->name, 0) == 0 : strcmp(p, pa->name) == 0)) continue;
            if (pa->ndim != 2 || strncmp(pa->name, "blocks.", 7) != 0) {
                if (!glob) st = LP_ERR(LP_ERR_ARG, "gradient of '%s': only the blocks' linear weights have gradients", p);
                continue;
            }
            if (m->ctx.dtype != LP_F32) st = LP_ERR(LP_ERR_ARG, "gradient of '%s': weight gradients need --model.dtype=f32", p);
            g->pwant[i] = 1, n++;
        }
        if (!n && st == LP_OK) st = LP_ERR(LP_ERR_NOT_FOUND, "gradient of '%s': no such hook or weight (see `loupe info MODEL`)", p);
    }
    free(list);
    return st;
}

/* The mean-loss metric's gradient at the logits, chunk by chunk (one chunk of all rows when
 * `full`), through the unembedding into s->g.dln, with the unembed.hook_out site when full.
 * The logits are the forward's own while unembed.hook_out is hooked (they may be edited). */
static lp_status mean_loss_backward(lp_model *m, scratch *s, int B, int T, int full) {
    lp_ctx *c = &m->ctx;
    size_t N = (size_t)B * T, D = m->cfg.d_model, es = lp_act_size(m);
    int V = m->cfg.d_vocab, kept = lp_hooks_want_full_logits(m);
    const void *wu = lp_param(m, m->unembed);
    float *scale_h = malloc(N * sizeof(float)); /* per row, the mean over its T-1 predictions */
    void *scale_d = NULL;
    lp_status st = scale_h ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    for (size_t i = 0; st == LP_OK && i < N; i++) scale_h[i] = 1.0f / (T - 1);
    if (st == LP_OK) st = lp_ctx_alloc(c, N * sizeof(float), &scale_d);
    if (st == LP_OK) st = lp_ctx_to_device(c, scale_d, scale_h, N * sizeof(float));
    size_t chunk = full || kept ? N : (size_t)m->logit_rows;
    for (size_t r0 = 0; st == LP_OK && r0 < N; r0 += chunk) {
        int rows = (int)(N - r0 < chunk ? N - r0 : chunk);
        void *logits = kept ? (char *)m->logits + r0 * V * es : s->logits;
        if (!kept) st = lp_matmul(c, s->logits, (char *)m->ln_out + r0 * D * es, wu, NULL, rows, (int)D, V, 1);
        if (st == LP_OK) st = lp_xent_backward(c, s->drows, logits, m->tgt_dev + r0, (float *)scale_d + r0, rows, V);
        if (st == LP_OK && full) st = lp_grad_site(m, HK_UNEMBED_OUT, m->cfg.n_layers, s->drows);
        if (st == LP_OK) st = lp_matmul(c, (char *)s->g.dln + r0 * D * es, s->drows, wu, NULL, rows, V, (int)D, 0);
    }
    lp_ctx_release(c, scale_d);
    free(scale_h);
    return st;
}

/* The metric's gradient from the logits into s->g.dln (the final norm's output, zeroed), with
 * the unembed.hook_out and unembed.hook_in gradient sites. Unless `full`, the logit metrics'
 * gradient is formed only on the rows they read (lh: those rows' logits, [B, V]). A direction
 * metric at this layer starts from zero (its direction enters at its own site). */
static lp_status unembed_backward(lp_model *m, scratch *s, const lp_metric *mt, int B, int T, const float *lh, int full) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    size_t N = (size_t)B * T, D = cf->d_model, es = lp_act_size(m), V = cf->d_vocab;
    const void *wu = lp_param(m, m->unembed);
    if (mt->kind == LP_METRIC_LOGIT_DIFF || mt->kind == LP_METRIC_LOGPROB) {
        size_t rows = full ? N : (size_t)B;
        float *dl = calloc(rows * V, sizeof(float));
        if (!dl) LP_FAIL(LP_ERR_OOM, "out of memory for the logits' gradient");
        for (int b = 0; b < B; b++)
            metric_grad_row(mt, lh + (size_t)b * V, (int)V, b, dl + (full ? (size_t)b * T + row_pos(mt, b, T) : (size_t)b) * V);
        lp_status st = lp_ctx_upload_f32(c, s->drows, dl, rows * V);
        free(dl);
        LP_CHECK(st);
        if (full) {
            GSITE(HK_UNEMBED_OUT, cf->n_layers, s->drows);
            LP_CHECK(lp_matmul(c, s->g.dln, s->drows, wu, NULL, (int)N, (int)V, (int)D, 0));
        } else { /* d ln_out = dlogits W_U at the read rows */
            LP_CHECK(lp_matmul(c, s->rows, s->drows, wu, NULL, B, (int)V, (int)D, 0));
            for (int b = 0; b < B; b++)
                LP_CHECK(lp_ctx_copy(c, (char *)s->g.dln + ((size_t)b * T + row_pos(mt, b, T)) * D * es, (char *)s->rows + b * D * es, D * es));
        }
    } else if (mt->kind == LP_METRIC_MEAN_LOSS) {
        LP_CHECK(mean_loss_backward(m, s, B, T, full));
    } else if (full) { /* a direction at unembed.hook_out */
        LP_CHECK(lp_ctx_memset0(c, s->drows, N * V * es));
        GSITE(HK_UNEMBED_OUT, cf->n_layers, s->drows);
        LP_CHECK(lp_matmul(c, s->g.dln, s->drows, wu, NULL, (int)N, (int)V, (int)D, 0));
    }
    GSITE(HK_UNEMBED_IN, cf->n_layers, s->g.dln);
    return LP_OK;
}

static lp_status grad_run(lp_model *m, const int32_t *tokens, int B, int T, const lp_metric *mt, const char *grad_hooks,
                          double *metric_out, int backward) {
    LP_CHECK(check_metric(m, mt, B, T));
    struct grad_state *g = NULL;
    LP_CHECK(grad_state_get(m, &g));
    if (backward) LP_CHECK(set_wanted(m, grad_hooks)); /* a metric-only run keeps the last gradients */
    LP_CHECK(ensure_ones(m));
    g->B = B, g->T = T, g->inject_id = -1;
    const lp_config *cf = &m->cfg;
    int V = cf->d_vocab, dir_id = mt->kind == LP_METRIC_DIRECTION ? lp_hook_find(m, mt->hook) : -1;
    /* the gradient at the logits is formed whole only when unembed.hook_out's is wanted, a
     * direction enters there or an edit's Jacobian applies there */
    int out_id = lp_hook_id(m, HK_UNEMBED_OUT, cf->n_layers);
    int full = backward && (g->want[out_id] || dir_id == out_id || m->hooks[out_id].edits);
    /* a direction metric reads the hook's activation: capture it for this run */
    int had_capture = dir_id >= 0 && m->hooks[dir_id].capture;
    if (dir_id >= 0 && !had_capture) LP_CHECK(lp_hook_capture(m, mt->hook, NULL, 0, NULL));
    /* sized with taping on, so that wanted pattern gradients count; the base buffers are
     * then those of this batch size */
    m->taping = backward;
    lp_status pst = lp_model_prepare(m, B, T);
    m->taping = 0;
    if (pst != LP_OK) {
        if (dir_id >= 0 && !had_capture) m->hooks[dir_id].capture = 0, m->any_hook_dirty = 1;
        return pst;
    }
    /* the tape, for this batch and these wanted gradients */
    if (backward) {
        if (!m->tape && !(m->tape = calloc(cf->n_layers + 1, sizeof *m->tape))) LP_FAIL(LP_ERR_OOM, "out of memory");
        m->base_q = m->q, m->base_k = m->k, m->base_v = m->v, m->base_scores = m->scores, m->base_pattern = m->pattern;
        m->base_mlp_pre = m->mlp_pre, m->base_mlp_lin = m->mlp_lin, m->base_ln_scale = m->ln_scale;
        m->base_ln_out = m->ln_out, m->base_z = m->z, m->base_mlp_post = m->mlp_post;
        m->taping = 1; /* so that lp_tape_layout sees the wanted pattern gradients */
        /* a logit metric reaches every layer; a direction metric only up to its hook's */
        m->tape_top = dir_id >= 0 ? m->hooks[dir_id].layer : cf->n_layers;
        size_t need = lp_tape_layout(m, B, T, 0);
        if (need > m->tape_bytes) {
            lp_ctx_release(&m->ctx, m->tape_mem);
            m->tape_mem = NULL, m->tape_bytes = 0;
            lp_status st = lp_ctx_alloc(&m->ctx, need, &m->tape_mem);
            if (st != LP_OK) {
                lp_tape_restore(m);
                if (dir_id >= 0 && !had_capture) m->hooks[dir_id].capture = 0, m->any_hook_dirty = 1;
                return st;
            }
            m->tape_bytes = need;
        }
        lp_tape_layout(m, B, T, 1);
    }
    int want = mt->kind == LP_METRIC_MEAN_LOSS ? LP_WANT_LOSS : mt->kind == LP_METRIC_DIRECTION ? 0 : LP_WANT_FINAL_NORM;
    lp_status st = lp_model_forward(m, tokens, B, T, want);
    scratch s = {0};
    float *lh = NULL;
    if (st == LP_OK && mt->kind != LP_METRIC_DIRECTION && mt->kind != LP_METRIC_MEAN_LOSS) {
        st = scratch_alloc(m, &s, B, T, backward, full, dir_id);
        lh = malloc((size_t)B * V * sizeof(float));
        if (st == LP_OK && !lh) st = LP_ERR(LP_ERR_OOM, "out of memory");
        if (st == LP_OK) st = read_rows(m, mt, B, T, s.rows, s.logits, lh);
        for (int b = 0; st == LP_OK && b < B; b++) metric_out[b] = metric_row(mt, lh + (size_t)b * V, V, b);
    } else if (st == LP_OK && mt->kind == LP_METRIC_MEAN_LOSS) {
        const float *l = lp_model_losses(m);
        for (int b = 0; b < B; b++) {
            double acc = 0;
            for (int i = 0; i < T - 1; i++) acc += l[(size_t)b * (T - 1) + i];
            metric_out[b] = acc / (T - 1);
        }
        if (backward) st = scratch_alloc(m, &s, B, T, 1, full, dir_id);
    } else if (st == LP_OK) { /* direction */
        lp_tensor a;
        int64_t hs[LP_MAX_DIMS];
        int hnd = lp_hook_shape(m, dir_id, 1, 1, hs);
        size_t per = (size_t)lp_shape_numel(hs + 2, hnd - 2); /* values per token */
        st = lp_capture_get(m, mt->hook, &a);
        if (st == LP_OK && (size_t)lp_shape_numel(a.shape, a.ndim) != (size_t)B * T * per)
            st = LP_ERR(LP_ERR_ARG, "direction metric: '%s' is captured at chosen positions only; clear that capture first",
                              mt->hook);
        float *f = st == LP_OK ? malloc((size_t)B * T * per * sizeof(float)) : NULL;
        if (st == LP_OK && !f) st = LP_ERR(LP_ERR_OOM, "out of memory");
        if (st == LP_OK) st = lp_convert_host(f, LP_F32, a.data, a.dtype, (size_t)B * T * per);
        for (int b = 0; st == LP_OK && b < B; b++) {
            double acc = 0;
            for (size_t i = 0; i < (size_t)T * per; i++) acc += (double)f[(size_t)b * T * per + i] * mt->direction[i % per];
            metric_out[b] = acc;
        }
        free(f);
        if (st == LP_OK && backward) {
            st = scratch_alloc(m, &s, B, T, 1, full, dir_id);
            lp_ctx_release(&m->ctx, g->inject_dev);
            g->inject_dev = NULL;
            if (st == LP_OK) st = lp_ctx_alloc(&m->ctx, per * lp_act_size(m), &g->inject_dev);
            if (st == LP_OK) st = lp_ctx_upload_f32(&m->ctx, g->inject_dev, mt->direction, per);
            free(g->inject_host);
            if (st == LP_OK && !(g->inject_host = malloc(per * sizeof(float))))
                st = LP_ERR(LP_ERR_OOM, "out of memory");
            if (st == LP_OK) memcpy(g->inject_host, mt->direction, per * sizeof(float));
            g->inject_id = dir_id;
        }
    }
    if (dir_id >= 0 && !had_capture) m->hooks[dir_id].capture = 0, m->any_hook_dirty = 1;
    if (st == LP_OK && backward) {
        lp_ctx *c = &m->ctx;
        size_t N = (size_t)B * T, D = cf->d_model, es = lp_act_size(m);
        st = lp_ctx_memset0(c, s.g.dresid, N * D * es);
        if (st == LP_OK) st = lp_ctx_memset0(c, s.g.dln, N * D * es);
        /* a logit metric enters at the logits; a direction at its hook's layer */
        int top = mt->kind == LP_METRIC_DIRECTION ? m->hooks[dir_id].layer : cf->n_layers;
        m->taping = 1; /* lp_grad_wanted answers for the backward too */
        if (st == LP_OK && top == cf->n_layers) st = unembed_backward(m, &s, mt, B, T, lh, full);
        if (st == LP_OK)
            st = cf->arch == LP_ARCH_GPT2 ? lp_gpt2_backward(m, &s.g, B, T, top) : lp_llama_backward(m, &s.g, B, T, top);
        if (st == LP_OK) st = lp_ctx_sync(c);
    }
    if (backward) lp_tape_restore(m);
    lp_ctx_release(&m->ctx, s.mem);
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

/* Why the last run has no gradient for the hook or weight `name` (kept: its buffer's run and
 * the callback edit it passed), or LP_OK when it has one. */
static lp_status grad_absent(const lp_model *m, const char *name, int wanted, unsigned kept, int passed) {
    const struct grad_state *g = m->grad;
    if (!g || !g->run) LP_FAIL(LP_ERR_NOT_FOUND, "%s: no gradient has been taken yet (lp_model_grad)", name);
    if (!g->ok) LP_FAIL(LP_ERR_NOT_FOUND, "%s: the last lp_model_grad failed, so it has no gradients", name);
    if (!wanted) LP_FAIL(LP_ERR_NOT_FOUND, "%s: its gradient was not asked for in the last lp_model_grad", name);
    if (kept != g->run) {
        if (g->enter_id >= 0)
            LP_FAIL(LP_ERR_NOT_FOUND, "%s: the last backward did not reach it (the metric enters at %s, layer %d)", name,
                    m->hooks[g->enter_id].name, m->hooks[g->enter_id].layer);
        LP_FAIL(LP_ERR_NOT_FOUND, "%s: the last backward did not reach it", name);
    }
    if (passed >= 0)
        LP_FAIL(LP_ERR_ARG, "%s: its gradient passes the callback edit at %s, whose Jacobian is unknown (set the edit's .grad to "
                "LP_EDIT_GRAD_IDENTITY or LP_EDIT_GRAD_STOP to declare it)", name, m->hooks[passed].name);
    return LP_OK;
}

lp_status lp_grad_get(lp_model *m, const char *hook, lp_tensor *out) {
    struct grad_state *g = m->grad;
    int id = lp_hook_find(m, hook);
    for (int i = 0; id < 0 && i < m->n_params_t; i++)
        if (strcmp(m->params[i].name, hook) == 0) { /* a weight */
            LP_CHECK(grad_absent(m, hook, g && g->pwant[i], g ? g->pgen[i] : 0, g ? g->ppoison[i] : -1));
            memset(out, 0, sizeof *out);
            out->data = g->phost[i], out->dtype = LP_F32, out->device = LP_CPU, out->ndim = 2;
            out->shape[0] = m->params[i].shape[0], out->shape[1] = m->params[i].shape[1];
            return LP_OK;
        }
    if (id < 0) LP_FAIL(LP_ERR_NOT_FOUND, "unknown hook '%s'", hook);
    LP_CHECK(grad_absent(m, hook, g && g->want[id], g ? g->gen[id] : 0, g ? g->poison[id] : -1));
    memset(out, 0, sizeof *out);
    out->data = g->host[id];
    out->dtype = LP_F32;
    out->device = LP_CPU;
    out->ndim = lp_hook_shape(m, id, g->res_B, g->res_T, out->shape);
    return LP_OK;
}

int lp_param_layer_wanted(const lp_model *m, int L) {
    if (!m->grad || !m->taping) return 0;
    char pre[32];
    int n = snprintf(pre, sizeof pre, "blocks.%d.", L);
    for (int i = 0; i < m->n_params_t; i++)
        if (m->grad->pwant[i] && strncmp(m->params[i].name, pre, n) == 0) return 1;
    return 0;
}

lp_status lp_param_grad(lp_model *m, int idx, const void *x, const void *dy, int N, int K, int M, int w_trans) {
    struct grad_state *g = m->grad;
    if (!g || !g->pwant[idx]) return LP_OK;
    lp_ctx *c = &m->ctx;
    size_t n = (size_t)K * M;
    float *dw = NULL;
    LP_CHECK(lp_ctx_alloc(c, n * sizeof(float), (void **)&dw));
    /* W [K,M]: dW = x^T dy; W [M,K]: dW = dy^T x */
    lp_status st = w_trans ? lp_matmul_at(c, dw, dy, x, N, M, K, 0.0f) : lp_matmul_at(c, dw, x, dy, N, K, M, 0.0f);
    if (st == LP_OK && !g->phost[idx] && !(g->phost[idx] = malloc(n * sizeof(float)))) st = LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = lp_ctx_to_host(c, g->phost[idx], dw, n * sizeof(float));
    if (st == LP_OK) g->pgen[idx] = g->run, g->ppoison[idx] = g->passed;
    lp_ctx_release(c, dw);
    return st;
}
