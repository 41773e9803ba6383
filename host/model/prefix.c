/* prefix.c: prefix sharing for attribution patching (score.h, mdl_pfx in model_internal.h).
 * In a causal model, positions before the first one where two prompts differ have the same
 * activations in both runs: the reference run keeps every layer's k and v, and the scored
 * run computes only the positions from there on, attending over the kept prefix (attend.c),
 * with a backward that stops at the prefix's keys. Every node there has a zero activation
 * difference, so its score is 0 without being computed. */
#include <string.h>

#include "model/model_internal.h"
#include "model/score.h"

int score_prefix_possible(const lp_model *m, int three_steps) {
    return m->par.tp <= 1 && m->kv.pos0 < 0 && (m->ctx.device == LP_CPU || !three_steps);
}

lp_status score_prefix_keep(lp_model *m, int p0, int B, int T) {
    const lp_config *c = &m->cfg;
    if (p0 <= 0 || p0 >= T || B <= 0) LP_FAIL(LP_ERR_ARG, "prefix sharing: prefix of %d positions of rows of %d", p0, T);
    if (!score_prefix_possible(m, 0)) LP_FAIL(LP_ERR_ARG, "prefix sharing: on one process only, not while generating");
    size_t need = (size_t)c->n_layers * 2 * B * T * m->par.Hkv * c->d_head * act_elem_bytes(m);
    if (need > m->pfx.bytes) {
        lp_ctx_release(&m->ctx, m->pfx.mem);
        m->pfx.mem = NULL, m->pfx.bytes = 0;
        LP_CHECK(lp_ctx_alloc(&m->ctx, need, &m->pfx.mem));
        m->pfx.bytes = need;
    }
    m->pfx.p0 = p0, m->pfx.B = B, m->pfx.T = T, m->pfx.keep = 1, m->pfx.on = 0;
    m->any_hook_dirty = 1;
    return LP_OK;
}

lp_status score_prefix_run(lp_model *m) {
    if (m->pfx.p0 <= 0 || !m->pfx.keep) LP_FAIL(LP_ERR_ARG, "prefix sharing: no reference run kept a prefix");
    m->pfx.keep = 0, m->pfx.on = 1;
    m->any_hook_dirty = 1;
    return LP_OK;
}

void *pfx_kv(const lp_model *m, int L, int v) {
    size_t plane = (size_t)m->pfx.B * m->pfx.T * m->par.Hkv * m->cfg.d_head * act_elem_bytes(m);
    return (char *)m->pfx.mem + (size_t)(2 * L + v) * plane;
}
