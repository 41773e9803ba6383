/* grad.c: the gradients a backward keeps. The forward runs "taping" (tape.c): each layer
 * keeps what its backward needs; the metric's gradient enters at the logits or at a hook
 * (metric.c) and the architecture's backward (the blocks) carries it down, stopping at every
 * hook site, here: the gradient is kept when wanted, a direction entering there is added,
 * and the forward's edits of the hook apply their Jacobians (hooks.c). Weight gradients of
 * the blocks' linear layers are kept the same way. lp_grad_get hands them out, refusing a
 * stale or unknowable one. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fnmatch.h>

#include "loupe/attrib.h"
#include "loupe/hooks.h"
#include "loupe/ops.h"
#include "loupe/sae_ops.h"
#include "model/grad.h"

lp_status grad_state_get(lp_model *m, struct grad_state **out) {
    if (!m->grad) {
        struct grad_state *g = calloc(1, sizeof *g);
        if (!g) LP_FAIL(LP_ERR_OOM, "out of memory");
        g->want = calloc(m->n_hooks, 1);
        g->host = calloc(m->n_hooks, sizeof *g->host);
        g->cap = calloc(m->n_hooks, sizeof *g->cap);
        g->gen = calloc(m->n_hooks, sizeof *g->gen);
        g->poison = calloc(m->n_hooks, sizeof *g->poison);
        g->inject_id = g->enter_id = g->passed = -1;
        g->pwant = calloc(m->w.n, 1);
        g->phost = calloc(m->w.n, sizeof *g->phost);
        g->pgen = calloc(m->w.n, sizeof *g->pgen);
        g->ppoison = calloc(m->w.n, sizeof *g->ppoison);
        m->grad = g;
        if (!g->want || !g->host || !g->cap || !g->gen || !g->poison || !g->pwant || !g->phost || !g->pgen || !g->ppoison) {
            grad_free(m);
            LP_FAIL(LP_ERR_OOM, "out of memory");
        }
    }
    *out = m->grad;
    return LP_OK;
}

void grad_free(lp_model *m) {
    struct grad_state *g = m->grad;
    if (!g) return;
    for (int i = 0; g->host && i < m->n_hooks; i++) free(g->host[i]);
    for (int i = 0; g->phost && i < m->w.n; i++) free(g->phost[i]);
    free(g->host), free(g->want), free(g->cap), free(g->gen), free(g->poison), free(g->stage);
    free(g->pwant), free(g->phost), free(g->pgen), free(g->ppoison), free(g->inject_host);
    lp_ctx_release(&m->ctx, g->inject_dev);
    lp_ctx_release(&m->ctx, g->scratch);
    lp_ctx_release(&m->ctx, g->dw);
    lp_ctx_release(&m->ctx, g->row_scale);
    free(g);
    m->grad = NULL;
}

/* Whether the backward must stop at (kind, layer): its gradient is wanted, a direction
 * enters there, the forward edited it (the edit's Jacobian applies there) or its node scores
 * are formed there (score.h). */
int grad_wanted(const lp_model *m, int kind, int layer) {
    if (!m->grad || !m->tp.on) return 0;
    int id = hook_id(m, kind, layer);
    return id >= 0 && (m->grad->want[id] || id == m->grad->inject_id || m->hooks[id].edits || m->hooks[id].score);
}

/* Hooks and gradients alike: the scores and pattern exist only when someone reads them. */
int hooks_want_attn_mats(const lp_model *m) {
    for (int L = 0; L < m->cfg.n_layers; L++)
        if (hook_active(m, hook_id(m, HK_SCORES, L)) || hook_active(m, hook_id(m, HK_PATTERN, L)) ||
            grad_wanted(m, HK_SCORES, L) || grad_wanted(m, HK_PATTERN, L))
            return 1;
    return 0;
}

int grad_enters(const lp_model *m, int kind, int layer) {
    int id = hook_id(m, kind, layer);
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
    size_t n = hook_numel(m, id), es = act_elem_bytes(m);
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
static lp_status grad_site_whole(lp_model *m, int kind, int layer, void *buf);

/* Under tensor parallelism a split hook's gradient is summed whole for its site, and only
 * where the backward stops (tp.c). */
lp_status grad_site(lp_model *m, int kind, int layer, void *buf) {
    if (m->par.tp <= 1) return grad_site_whole(m, kind, layer, buf);
    if (!grad_wanted(m, kind, layer)) return LP_OK;
    void *whole;
    LP_CHECK(tp_grad_gather(m, kind, buf, &whole));
    LP_CHECK(grad_site_whole(m, kind, layer, whole));
    return tp_grad_scatter(m, kind, buf, whole);
}

static lp_status grad_site_whole(lp_model *m, int kind, int layer, void *buf) {
    struct grad_state *g = m->grad;
    int id = hook_id(m, kind, layer);
    if (!g || id < 0) return LP_OK;
    int inputs = kind == HK_EMBED || kind == HK_POS_EMBED;
    size_t n = hook_numel(m, id), rows = (size_t)g->B * g->T, per = n / rows;
    if (id == g->inject_id && !inputs) /* d(act . direction)/d act: the direction at every token */
        LP_CHECK(lp_affine(&m->ctx, buf, buf, m->grad_ones, g->inject_dev, (int)rows, (int)per));
    if (g->want[id]) {
        LP_CHECK(grad_keep(m, g, id, buf));
        for (size_t i = 0; id == g->inject_id && inputs && i < n; i++) g->host[id][i] += g->inject_host[i % per];
    }
    if (m->hooks[id].score) LP_CHECK(score_grad_site(m, id, buf));
    if (inputs || !m->hooks[id].edits) return LP_OK;
    int unknown = 0;
    LP_CHECK(hook_edit_jacobian(m, id, buf, &unknown));
    if (unknown && g->passed < 0) g->passed = id; /* every gradient from here down is unknowable */
    return LP_OK;
}

/* Registers which gradients to keep. */
lp_status grad_set_wanted(lp_model *m, const char *grad_hooks) {
    struct grad_state *g = m->grad;
    memset(g->want, 0, m->n_hooks);
    memset(g->pwant, 0, m->w.n);
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
        for (int i = 0; i < m->w.n; i++) {
            const param *pa = &m->w.params[i];
            if (!(glob ? fnmatch(p, pa->name, 0) == 0 : strcmp(p, pa->name) == 0)) continue;
            if (pa->ndim != 2 || strncmp(pa->name, "blocks.", 7) != 0) {
                if (!glob) st = LP_ERR(LP_ERR_ARG, "gradient of '%s': only the blocks' linear weights have gradients", p);
                continue;
            }
            if (m->ctx.dtype != LP_F32) st = LP_ERR(LP_ERR_ARG, "gradient of '%s': weight gradients need --model.dtype=f32", p);
            if (m->par.tp > 1)
                st = LP_ERR(LP_ERR_ARG, "gradient of '%s': weight gradients of a model split over dist.tp=%d ranks are not supported",
                            p, m->par.tp);
            g->pwant[i] = 1, n++;
        }
        if (!n && st == LP_OK) st = LP_ERR(LP_ERR_NOT_FOUND, "gradient of '%s': no such hook or weight (see `loupe info MODEL`)", p);
    }
    free(list);
    return st;
}


lp_status grad_buffer(lp_model *m, void **buf, size_t *cap, size_t bytes) {
    if (bytes <= *cap && *buf) return LP_OK;
    lp_ctx_release(&m->ctx, *buf);
    *buf = NULL, *cap = 0;
    LP_CHECK(lp_ctx_alloc(&m->ctx, bytes ? bytes : 1, buf));
    *cap = bytes;
    return LP_OK;
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
    for (int i = 0; id < 0 && i < m->w.n; i++)
        if (strcmp(m->w.params[i].name, hook) == 0) { /* a weight */
            LP_CHECK(grad_absent(m, hook, g && g->pwant[i], g ? g->pgen[i] : 0, g ? g->ppoison[i] : -1));
            memset(out, 0, sizeof *out);
            out->data = g->phost[i], out->dtype = LP_F32, out->device = LP_CPU, out->ndim = 2;
            out->shape[0] = m->w.params[i].shape[0], out->shape[1] = m->w.params[i].shape[1];
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

int param_layer_wanted(const lp_model *m, int L) {
    if (!m->grad || !m->tp.on) return 0;
    char pre[32];
    int n = snprintf(pre, sizeof pre, "blocks.%d.", L);
    for (int i = 0; i < m->w.n; i++)
        if (m->grad->pwant[i] && strncmp(m->w.params[i].name, pre, n) == 0) return 1;
    return 0;
}

lp_status param_grad(lp_model *m, int idx, const void *x, const void *dy, int N, int K, int M) {
    struct grad_state *g = m->grad;
    if (!g || !g->pwant[idx]) return LP_OK;
    lp_ctx *c = &m->ctx;
    size_t n = (size_t)K * M;
    LP_CHECK(grad_buffer(m, &g->dw, &g->dw_bytes, n * sizeof(float)));
    float *dw = g->dw;
    /* W [K,M]: dW = x^T dy; W [M,K]: dW = dy^T x */
    lp_status st = m->w.trans ? lp_matmul_at(c, dw, dy, x, N, M, K, 0.0f) : lp_matmul_at(c, dw, x, dy, N, K, M, 0.0f);
    if (st == LP_OK && !g->phost[idx] && !(g->phost[idx] = malloc(n * sizeof(float)))) st = LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) st = lp_ctx_to_host(c, g->phost[idx], dw, n * sizeof(float));
    if (st == LP_OK) g->pgen[idx] = g->run, g->ppoison[idx] = g->passed;
    return st;
}
