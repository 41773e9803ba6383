/* score.c: the node sums of attribution patching fused into the backward's hook sites
 * (score.h). The forward site copies the activation into a buffer the hook keeps; the
 * backward site, where the gradient at the hook is produced, forms per node the sum of
 * (reference - current) * gradient (lp_diff_dot_rows) into the model's score buffer. The
 * gradient is neither kept nor copied out, and nothing crosses to the host until score_fetch. */
#include <stdlib.h>
#include <string.h>

#include "loupe/hooks.h"
#include "loupe/ops.h"
#include "model/grad.h"
#include "model/score.h"

lp_status score_mark(lp_model *m, const char *name, size_t per) {
    int id = lp_hook_find(m, name);
    if (id < 0) LP_FAIL(LP_ERR_NOT_FOUND, "score: unknown hook '%s'", name);
    if (per == 0) LP_FAIL(LP_ERR_ARG, "score of %s: nodes of 0 values", name);
    m->hooks[id].s_mark = 1, m->hooks[id].s_per = per;
    return LP_OK;
}

static size_t numel_of(const lp_model *m, int id, int B, int T) {
    int64_t s[LP_MAX_DIMS];
    int nd = lp_hook_shape(m, id, B, T, s);
    return (size_t)lp_shape_numel(s, nd);
}

/* The hook's two activation buffers for B x T: sized (grown) when the reference is about to
 * be kept, else they must hold this batch already (growing would lose the reference). */
static lp_status score_buffers_for(lp_model *m, hook *h, int id, int B, int T, int grow) {
    size_t need = numel_of(m, id, B, T) * act_elem_bytes(m);
    if (need <= h->s_bytes && h->s_ref) return LP_OK;
    if (!grow) LP_FAIL(LP_ERR_ARG, "score of %s: its reference was kept for a smaller batch than %d x %d", h->name, B, T);
    lp_ctx_release(&m->ctx, h->s_ref);
    lp_ctx_release(&m->ctx, h->s_cur);
    h->s_ref = h->s_cur = NULL, h->s_bytes = 0;
    LP_CHECK(lp_ctx_alloc(&m->ctx, need, &h->s_ref));
    LP_CHECK(lp_ctx_alloc(&m->ctx, need, &h->s_cur));
    h->s_bytes = need;
    return LP_OK;
}

lp_status score_phase(lp_model *m, score_phase_t phase, int B, int T) {
    struct grad_state *g;
    LP_CHECK(grad_state_get(m, &g));
    size_t total = 0;
    for (int id = 0; id < m->n_hooks; id++) {
        hook *h = &m->hooks[id];
        h->score = phase != SCORE_OFF && h->s_mark;
        if (!h->score) continue;
        LP_CHECK(score_buffers_for(m, h, id, B, T, phase == SCORE_KEEP_REF));
        h->s_off = total;
        total += numel_of(m, id, B, T) / h->s_per;
    }
    g->s_phase = phase, g->s_n = total;
    m->any_hook_dirty = 1;
    if (phase != SCORE_RUN) return LP_OK;
    LP_CHECK(grad_buffer(m, (void **)&g->s_out, &g->s_out_bytes, total * sizeof(float)));
    return lp_ctx_memset0(&m->ctx, g->s_out, total * sizeof(float));
}

lp_status score_forward_site(lp_model *m, int id, const void *act) {
    hook *h = &m->hooks[id];
    int ph = m->grad ? m->grad->s_phase : SCORE_OFF;
    if (ph == SCORE_OFF) return LP_OK;
    size_t bytes = numel_of(m, id, m->res.B, m->res.T) * act_elem_bytes(m);
    if (bytes > h->s_bytes) LP_FAIL(LP_ERR_ARG, "score of %s: this batch is larger than the one it was prepared for", h->name);
    return lp_ctx_copy(&m->ctx, ph == SCORE_KEEP_REF ? h->s_ref : h->s_cur, act, bytes);
}

lp_status score_grad_site(lp_model *m, int id, const void *grad) {
    struct grad_state *g = m->grad;
    hook *h = &m->hooks[id];
    if (!g || g->s_phase != SCORE_RUN) return LP_OK;
    size_t rows = numel_of(m, id, g->B, g->T) / h->s_per;
    return lp_diff_dot_rows(&m->ctx, g->s_out + h->s_off, h->s_ref, h->s_cur, grad, rows, h->s_per);
}

lp_status score_fetch(lp_model *m) {
    struct grad_state *g = m->grad;
    if (!g || !g->s_out) LP_FAIL(LP_ERR_NOT_FOUND, "score: no scored backward has run");
    size_t bytes = g->s_n * sizeof(float);
    if (bytes > g->s_host_bytes || !g->s_host) {
        lp_ctx_release_host(&m->ctx, g->s_host);
        g->s_host = NULL, g->s_host_bytes = 0;
        LP_CHECK(lp_ctx_alloc_host(&m->ctx, bytes ? bytes : sizeof(float), (void **)&g->s_host));
        g->s_host_bytes = bytes;
    }
    LP_CHECK(lp_ctx_to_host_async(&m->ctx, g->s_host, g->s_out, bytes));
    return lp_ctx_sync(&m->ctx);
}

const float *score_values(const lp_model *m, const char *name, size_t *n) {
    int id = lp_hook_find(m, name);
    const struct grad_state *g = m->grad;
    if (id < 0 || !g || !g->s_host || !m->hooks[id].score) return NULL;
    const hook *h = &m->hooks[id];
    *n = numel_of(m, id, g->B, g->T) / h->s_per;
    return g->s_host + h->s_off;
}

void score_buffers(const lp_model *m, const char *name, void **ref, void **cur) {
    int id = lp_hook_find(m, name);
    *ref = id >= 0 ? m->hooks[id].s_ref : NULL;
    *cur = id >= 0 ? m->hooks[id].s_cur : NULL;
}

void score_end(lp_model *m) {
    for (int id = 0; id < m->n_hooks; id++) m->hooks[id].s_mark = m->hooks[id].score = 0;
    if (m->grad) m->grad->s_phase = SCORE_OFF;
    m->any_hook_dirty = 1;
}

void score_free(lp_model *m) {
    for (int id = 0; m->hooks && id < m->n_hooks; id++) {
        hook *h = &m->hooks[id];
        lp_ctx_release(&m->ctx, h->s_ref);
        lp_ctx_release(&m->ctx, h->s_cur);
        h->s_ref = h->s_cur = NULL, h->s_bytes = 0;
    }
}
