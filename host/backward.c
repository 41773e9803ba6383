/* backward.c: gradients of a metric with respect to hook activations. The forward runs
 * "taping": each layer keeps in its own slice of one allocation what its backward needs
 * (the residual before each norm, the norms' scales, q/k/v, the MLP pre-activations, and
 * the attention pattern where its gradient is asked for); the metric's gradient enters at
 * the final norm's output (or at a hook, for a direction metric) and each architecture's
 * backward (gpt2.c, llama.c) carries it down, stopping at every hook site. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fnmatch.h>

#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "loupe/ops.h"
#include "loupe/sae_ops.h"
#include "model_internal.h"

struct grad_state {
    unsigned char *want;   /* [n_hooks] */
    float **host;          /* [n_hooks] F32 gradients of the last backward */
    size_t *cap;           /* floats each host buffer holds */
    int inject_id;         /* direction metric: where its direction enters, or -1 */
    void *inject_dev;      /* the direction on the device, act dtype */
    void *stage;           /* device-to-host staging in the act dtype */
    size_t stage_cap;
    int B, T;
    unsigned char *pwant;  /* [n_params_t] weight gradients wanted */
    float **phost;         /* [n_params_t] */
};

static lp_status grad_state_get(lp_model *m, struct grad_state **out) {
    if (!m->grad) {
        struct grad_state *g = calloc(1, sizeof *g);
        if (!g) LP_FAIL(LP_ERR_OOM, "out of memory");
        g->want = calloc(m->n_hooks, 1);
        g->host = calloc(m->n_hooks, sizeof *g->host);
        g->cap = calloc(m->n_hooks, sizeof *g->cap);
        g->inject_id = -1;
        g->pwant = calloc(m->n_params_t, 1);
        g->phost = calloc(m->n_params_t, sizeof *g->phost);
        if (!g->want || !g->host || !g->cap || !g->pwant || !g->phost) {
            free(g->want), free(g->host), free(g->cap), free(g->pwant), free(g->phost), free(g);
            LP_FAIL(LP_ERR_OOM, "out of memory");
        }
        m->grad = g;
    }
    *out = m->grad;
    return LP_OK;
}

void lp_grad_free(lp_model *m) {
    struct grad_state *g = m->grad;
    if (!g) return;
    for (int i = 0; i < m->n_hooks; i++) free(g->host[i]);
    for (int i = 0; g->phost && i < m->n_params_t; i++) free(g->phost[i]);
    free(g->host), free(g->want), free(g->cap), free(g->stage), free(g->pwant), free(g->phost);
    lp_ctx_release(&m->ctx, g->inject_dev);
    free(g);
    m->grad = NULL;
}

int lp_grad_wanted(const lp_model *m, int kind, int layer) {
    if (!m->grad || !m->taping) return 0;
    int id = lp_hook_id(m, kind, layer);
    return id >= 0 && (m->grad->want[id] || id == m->grad->inject_id); /* a direction enters there too */
}

/* ---- the tape ---- */

static size_t tape_layout(lp_model *m, int B, int T, int carve) {
    const lp_config *c = &m->cfg;
    size_t N = (size_t)B * T, D = c->d_model, F = c->d_mlp, es = lp_act_size(m), off = 0;
    size_t qD = (size_t)c->n_heads * c->d_head, kvD = (size_t)c->n_kv_heads * c->d_head, mat = (size_t)B * c->n_heads * T * T * es;
    int llama = c->arch == LP_ARCH_LLAMA;
#define SLICE(field, bytes)                                                    \
    do {                                                                       \
        size_t b_ = (bytes);                                                   \
        if (carve) t->field = b_ ? (char *)m->tape_mem + off : NULL;           \
        off += (b_ + 255) / 256 * 256;                                         \
    } while (0)
    for (int L = 0; L <= c->n_layers; L++) {
        tape_layer *t = &m->tape[L];
        if (L > m->tape_top) { /* beyond what the metric reaches: nothing kept */
            if (carve) memset(t, 0, sizeof *t);
            continue;
        }
        if (L == c->n_layers) { /* the final norm: its input and scale */
            SLICE(resid_pre, N * D * es);
            SLICE(ln1_scale, N * es);
            break;
        }
        int mats = lp_grad_wanted(m, HK_SCORES, L) || lp_grad_wanted(m, HK_PATTERN, L);
        SLICE(resid_pre, N * D * es);
        SLICE(ln1_scale, N * es);
        SLICE(q, N * qD * es);
        SLICE(k, N * kvD * es);
        SLICE(v, N * kvD * es);
        SLICE(scores, mats ? mat : 0);
        SLICE(pattern, mats ? mat : 0);
        SLICE(resid_mid, N * D * es);
        SLICE(ln2_scale, N * es);
        SLICE(mlp_pre, N * F * es);
        SLICE(mlp_lin, llama ? N * F * es : 0);
        int pw = lp_param_layer_wanted(m, L);
        SLICE(ln1_out, pw ? N * D * es : 0);
        SLICE(z, pw ? N * qD * es : 0);
        SLICE(ln2_out, pw ? N * D * es : 0);
        SLICE(mlp_post, pw ? N * F * es : 0);
    }
#undef SLICE
    return off;
}

/* Layers above tape_top (run only because a hook asked for them) use the ordinary buffers. */
static void untaped(lp_model *m) {
    m->q = m->base_q, m->k = m->base_k, m->v = m->base_v, m->scores = m->base_scores, m->pattern = m->base_pattern;
    m->mlp_pre = m->base_mlp_pre, m->mlp_lin = m->base_mlp_lin, m->ln_scale = m->base_ln_scale;
    m->ln_out = m->base_ln_out, m->z = m->base_z, m->mlp_post = m->base_mlp_post;
}

lp_status lp_tape_layer(lp_model *m, int L) {
    if (L > m->tape_top) return untaped(m), LP_OK;
    tape_layer *t = &m->tape[L];
    size_t bytes = (size_t)m->B * m->T * m->cfg.d_model * lp_act_size(m);
    LP_CHECK(lp_ctx_copy(&m->ctx, t->resid_pre, m->resid, bytes));
    m->ln_scale = t->ln1_scale, m->q = t->q, m->k = t->k, m->v = t->v, m->mlp_pre = t->mlp_pre;
    if (t->mlp_lin) m->mlp_lin = t->mlp_lin;
    m->scores = t->scores ? t->scores : m->base_scores;
    m->pattern = t->pattern ? t->pattern : m->base_pattern;
    m->ln_out = t->ln1_out ? t->ln1_out : m->base_ln_out;
    m->z = t->z ? t->z : m->base_z;
    m->mlp_post = t->mlp_post ? t->mlp_post : m->base_mlp_post;
    return LP_OK;
}

lp_status lp_tape_mid(lp_model *m, int L) {
    if (L > m->tape_top) return untaped(m), LP_OK;
    tape_layer *t = &m->tape[L];
    size_t bytes = (size_t)m->B * m->T * m->cfg.d_model * lp_act_size(m);
    LP_CHECK(lp_ctx_copy(&m->ctx, t->resid_mid, m->resid, bytes));
    m->ln_scale = t->ln2_scale;
    m->ln_out = t->ln2_out ? t->ln2_out : m->base_ln_out;
    return LP_OK;
}

lp_status lp_tape_final(lp_model *m) {
    if (m->cfg.n_layers > m->tape_top) return untaped(m), LP_OK;
    tape_layer *t = &m->tape[m->cfg.n_layers];
    size_t bytes = (size_t)m->B * m->T * m->cfg.d_model * lp_act_size(m);
    LP_CHECK(lp_ctx_copy(&m->ctx, t->resid_pre, m->resid, bytes));
    m->ln_scale = t->ln1_scale;
    m->ln_out = m->base_ln_out; /* the metric reads the final norm's output there */
    return LP_OK;
}

static void tape_restore(lp_model *m) {
    m->taping = 0;
    untaped(m);
}

/* ---- gradient sites ---- */

static size_t hook_numel(const lp_model *m, int id) {
    int64_t s[LP_MAX_DIMS];
    int nd = lp_hook_shape(m, id, m->grad->B, m->grad->T, s);
    return (size_t)lp_shape_numel(s, nd);
}

lp_status lp_grad_site(lp_model *m, int kind, int layer, void *buf) {
    struct grad_state *g = m->grad;
    int id = lp_hook_id(m, kind, layer);
    if (!g || id < 0) return LP_OK;
    lp_ctx *c = &m->ctx;
    if (id == g->inject_id) { /* d(act . direction)/d act: the direction at every token */
        size_t n = hook_numel(m, id), rows = (size_t)g->B * g->T, per = n / rows;
        LP_CHECK(lp_affine(c, buf, buf, m->grad_ones, g->inject_dev, (int)rows, (int)per));
    }
    if (!g->want[id]) return LP_OK;
    size_t n = hook_numel(m, id), es = lp_act_size(m);
    if (n > g->cap[id]) {
        free(g->host[id]);
        if (!(g->host[id] = malloc(n * sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory for the gradient of %s", m->hooks[id].name);
        g->cap[id] = n;
    }
    if (c->device == LP_CPU) {
        memcpy(g->host[id], buf, n * sizeof(float));
        return LP_OK;
    }
    if (n * es > g->stage_cap) {
        free(g->stage);
        if (!(g->stage = malloc(n * es))) LP_FAIL(LP_ERR_OOM, "out of memory");
        g->stage_cap = n * es;
    }
    LP_CHECK(lp_ctx_to_host(c, g->stage, buf, n * es));
    return lp_convert_host(g->host[id], LP_F32, g->stage, c->dtype, n);
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
static lp_status scratch_alloc(lp_model *m, scratch *s, int B, int T, int backward, int full) {
    const lp_config *c = &m->cfg;
    size_t N = (size_t)B * T, D = c->d_model, F = c->d_mlp, es = lp_act_size(m), V = c->d_vocab;
    size_t qD = (size_t)c->n_heads * c->d_head, kvD = (size_t)c->n_kv_heads * c->d_head;
    size_t wide = D > qD ? D : qD;
    if (F > wide) wide = F;
    size_t mat = lp_hooks_want_attn_mats(m) ? (size_t)B * c->n_heads * T * T * es : 0;
    size_t lrows = (size_t)m->logit_rows > (size_t)B ? (size_t)m->logit_rows : (size_t)B;
    if (full) lrows = N;
    if (!backward) N = 0, mat = 0, lrows = (size_t)B;
    struct { void **p; size_t bytes; } b[] = {
        {&s->rows, B * D * es}, {&s->logits, lrows * V * es}, {&s->drows, backward ? lrows * V * es : 0},
        {&s->g.dresid, N * D * es}, {&s->g.dtmp, N * wide * es}, {&s->g.dln, N * D * es}, {&s->g.dq, N * qD * es},
        {&s->g.dk, N * kvD * es}, {&s->g.dv, N * kvD * es}, {&s->g.dz, N * qD * es}, {&s->g.da, N * F * es},
        {&s->g.db, N * F * es}, {&s->g.dc, N * F * es}, {&s->g.dpat, mat}, {&s->g.dsc, mat}, {&s->g.dscale, N * es},
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
    return LP_OK;
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
                if (!glob) st = lp_set_error(LP_ERR_ARG, __FILE__, __LINE__, "gradient of '%s': only the blocks' linear weights have gradients", p);
                continue;
            }
            if (m->ctx.dtype != LP_F32) st = lp_set_error(LP_ERR_ARG, __FILE__, __LINE__, "gradient of '%s': weight gradients need --model.dtype=f32", p);
            g->pwant[i] = 1, n++;
        }
        if (!n && st == LP_OK) st = lp_set_error(LP_ERR_NOT_FOUND, __FILE__, __LINE__, "gradient of '%s': no such hook or weight (see `loupe info MODEL`)", p);
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
    lp_status st = scale_h ? LP_OK : lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
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
    /* the gradient at the logits is formed whole only when unembed.hook_out's is wanted or
     * a direction enters there */
    int out_id = lp_hook_id(m, HK_UNEMBED_OUT, cf->n_layers), full = backward && (g->want[out_id] || dir_id == out_id);
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
        m->taping = 1; /* so that tape_layout sees the wanted pattern gradients */
        /* a logit metric reaches every layer; a direction metric only up to its hook's */
        m->tape_top = dir_id >= 0 ? m->hooks[dir_id].layer : cf->n_layers;
        size_t need = tape_layout(m, B, T, 0);
        if (need > m->tape_bytes) {
            lp_ctx_release(&m->ctx, m->tape_mem);
            m->tape_mem = NULL, m->tape_bytes = 0;
            lp_status st = lp_ctx_alloc(&m->ctx, need, &m->tape_mem);
            if (st != LP_OK) {
                tape_restore(m);
                if (dir_id >= 0 && !had_capture) m->hooks[dir_id].capture = 0, m->any_hook_dirty = 1;
                return st;
            }
            m->tape_bytes = need;
        }
        tape_layout(m, B, T, 1);
    }
    int want = mt->kind == LP_METRIC_MEAN_LOSS ? LP_WANT_LOSS : mt->kind == LP_METRIC_DIRECTION ? 0 : LP_WANT_FINAL_NORM;
    lp_status st = lp_model_forward(m, tokens, B, T, want);
    scratch s = {0};
    float *lh = NULL;
    if (st == LP_OK && mt->kind != LP_METRIC_DIRECTION && mt->kind != LP_METRIC_MEAN_LOSS) {
        st = scratch_alloc(m, &s, B, T, backward, full);
        lh = malloc((size_t)B * V * sizeof(float));
        if (st == LP_OK && !lh) st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
        if (st == LP_OK) st = read_rows(m, mt, B, T, s.rows, s.logits, lh);
        for (int b = 0; st == LP_OK && b < B; b++) metric_out[b] = metric_row(mt, lh + (size_t)b * V, V, b);
    } else if (st == LP_OK && mt->kind == LP_METRIC_MEAN_LOSS) {
        const float *l = lp_model_losses(m);
        for (int b = 0; b < B; b++) {
            double acc = 0;
            for (int i = 0; i < T - 1; i++) acc += l[(size_t)b * (T - 1) + i];
            metric_out[b] = acc / (T - 1);
        }
        if (backward) st = scratch_alloc(m, &s, B, T, 1, full);
    } else if (st == LP_OK) { /* direction */
        lp_tensor a;
        int64_t hs[LP_MAX_DIMS];
        int hnd = lp_hook_shape(m, dir_id, 1, 1, hs);
        size_t per = (size_t)lp_shape_numel(hs + 2, hnd - 2); /* values per token */
        st = lp_capture_get(m, mt->hook, &a);
        if (st == LP_OK && (size_t)lp_shape_numel(a.shape, a.ndim) != (size_t)B * T * per)
            st = lp_set_error(LP_ERR_ARG, __FILE__, __LINE__, "direction metric: '%s' is captured at chosen positions only; clear that capture first",
                              mt->hook);
        float *f = st == LP_OK ? malloc((size_t)B * T * per * sizeof(float)) : NULL;
        if (st == LP_OK && !f) st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
        if (st == LP_OK) st = lp_convert_host(f, LP_F32, a.data, a.dtype, (size_t)B * T * per);
        for (int b = 0; st == LP_OK && b < B; b++) {
            double acc = 0;
            for (size_t i = 0; i < (size_t)T * per; i++) acc += (double)f[(size_t)b * T * per + i] * mt->direction[i % per];
            metric_out[b] = acc;
        }
        free(f);
        if (st == LP_OK && backward) {
            st = scratch_alloc(m, &s, B, T, 1, full);
            lp_ctx_release(&m->ctx, g->inject_dev);
            g->inject_dev = NULL;
            if (st == LP_OK) st = lp_ctx_alloc(&m->ctx, per * lp_act_size(m), &g->inject_dev);
            if (st == LP_OK) st = lp_ctx_upload_f32(&m->ctx, g->inject_dev, mt->direction, per);
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
    if (backward) tape_restore(m);
    lp_ctx_release(&m->ctx, s.mem);
    free(lh);
    return st;
}

lp_status lp_model_grad(lp_model *m, const int32_t *tokens, int B, int T, const lp_metric *metric, const char *grad_hooks,
                        double *metric_out) {
    return grad_run(m, tokens, B, T, metric, grad_hooks, metric_out, 1);
}

lp_status lp_model_metric(lp_model *m, const int32_t *tokens, int B, int T, const lp_metric *metric, double *metric_out) {
    return grad_run(m, tokens, B, T, metric, NULL, metric_out, 0);
}

lp_status lp_grad_get(lp_model *m, const char *hook, lp_tensor *out) {
    int id = lp_hook_find(m, hook);
    for (int i = 0; id < 0 && m->grad && i < m->n_params_t; i++)
        if (strcmp(m->params[i].name, hook) == 0) { /* a weight */
            if (!m->grad->pwant[i] || !m->grad->phost[i])
                LP_FAIL(LP_ERR_NOT_FOUND, "the gradient of '%s' was not asked for in the last lp_model_grad", hook);
            memset(out, 0, sizeof *out);
            out->data = m->grad->phost[i], out->dtype = LP_F32, out->device = LP_CPU, out->ndim = 2;
            out->shape[0] = m->params[i].shape[0], out->shape[1] = m->params[i].shape[1];
            return LP_OK;
        }
    if (id < 0) LP_FAIL(LP_ERR_NOT_FOUND, "unknown hook '%s'", hook);
    struct grad_state *g = m->grad;
    if (!g || !g->want[id] || !g->host[id]) LP_FAIL(LP_ERR_NOT_FOUND, "the gradient of '%s' was not asked for in the last lp_model_grad", hook);
    memset(out, 0, sizeof *out);
    out->data = g->host[id];
    out->dtype = LP_F32;
    out->device = LP_CPU;
    out->ndim = lp_hook_shape(m, id, g->B, g->T, out->shape);
    return LP_OK;
}

lp_status lp_bw_linear(lp_ctx *c, void *dx, const void *dy, const void *W, int N, int K, int M, int w_trans) {
    /* out = x W: dx = dy W^T, i.e. W used as [M,K] transposed; out = x W^T: dx = dy W */
    return lp_matmul(c, dx, dy, W, NULL, N, M, K, w_trans ? 0 : 1);
}

lp_status lp_attn_core_backward(lp_model *m, bw_bufs *g, const tape_layer *t, int L, int B, int T) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int H = cf->n_heads, Hkv = cf->n_kv_heads, dh = cf->d_head;
    if (!lp_grad_wanted(m, HK_PATTERN, L) && !lp_grad_wanted(m, HK_SCORES, L))
        return lp_attention_backward(c, g->dq, g->dk, g->dv, g->dz, t->q, t->k, t->v, B, T, H, Hkv, dh);
    /* the three steps, stopping at the pattern and the scores */
    LP_CHECK(lp_attn_apply_backward(c, g->dpat, g->dv, g->dz, t->pattern, t->v, B, T, H, Hkv, dh));
    GSITE(HK_PATTERN, L, g->dpat);
    LP_CHECK(lp_softmax_rows_backward(c, g->dsc, g->dpat, t->pattern, (size_t)B * H * T, T));
    GSITE(HK_SCORES, L, g->dsc);
    return lp_attn_scores_backward(c, g->dq, g->dk, g->dsc, t->q, t->k, B, T, H, Hkv, dh);
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
    if (st == LP_OK && !g->phost[idx] && !(g->phost[idx] = malloc(n * sizeof(float)))) st = lp_set_error(LP_ERR_OOM, __FILE__, __LINE__, "out of memory");
    if (st == LP_OK) st = lp_ctx_to_host(c, g->phost[idx], dw, n * sizeof(float));
    lp_ctx_release(c, dw);
    return st;
}

lp_status lp_norm_backward_site(lp_model *m, bw_bufs *g, void *dx, void *dy, const void *x, const void *scale, const void *w,
                                int k_scale, int k_norm, int L, int N) {
    lp_ctx *c = &m->ctx;
    int D = m->cfg.d_model, rms = m->cfg.arch == LP_ARCH_LLAMA;
    if (lp_grad_wanted(m, k_scale, L)) { /* the scale as its own node */
        LP_CHECK(lp_norm_scale_grad(c, g->dscale, dy, x, scale, w, N, D, !rms));
        LP_CHECK(lp_grad_site(m, k_scale, L, g->dscale));
    }
    if (lp_grad_wanted(m, k_norm, L)) { /* the normalized value's gradient is dy * w */
        LP_CHECK(lp_affine(c, dy, dy, w, NULL, N, D));
        LP_CHECK(lp_grad_site(m, k_norm, L, dy));
        w = NULL;
    }
    return rms ? lp_rms_backward(c, dx, dy, x, scale, w, N, D) : lp_ln_backward(c, dx, dy, x, scale, w, N, D);
}
