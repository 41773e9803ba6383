/* model.c: the architecture-independent part of a model: loading by config,
 * sizing and allocating activation memory, running a forward and handing back
 * logits and losses. Architecture files (gpt2.c) provide load, carve and forward. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model_internal.h"

lp_status lp_model_load(lp_model **out, const char *path, lp_device dev, lp_dtype dtype) {
    *out = NULL;
    lp_model *m = calloc(1, sizeof *m);
    if (!m) LP_FAIL(LP_ERR_OOM, "out of memory");
    snprintf(m->path, sizeof m->path, "%s", path);
    lp_status st = lp_ctx_init(&m->ctx, dev, dtype);
    if (st == LP_OK) st = lp_gpt2_load(m, path);
    if (st == LP_OK) st = lp_hooks_init(m);
    if (st != LP_OK) {
        lp_model_free(m);
        return st;
    }
    *out = m;
    return LP_OK;
}

lp_status lp_model_random(lp_model **out, const lp_config *cfg, uint64_t seed, lp_device dev, lp_dtype dtype) {
    *out = NULL;
    if (cfg->arch != LP_ARCH_GPT2) LP_FAIL(LP_ERR_ARG, "random model: unsupported architecture");
    lp_model *m = calloc(1, sizeof *m);
    if (!m) LP_FAIL(LP_ERR_OOM, "out of memory");
    m->cfg = *cfg;
    snprintf(m->path, sizeof m->path, "(random)");
    lp_status st = lp_ctx_init(&m->ctx, dev, dtype);
    if (st == LP_OK) st = lp_gpt2_random(m, seed);
    if (st == LP_OK) st = lp_hooks_init(m);
    if (st != LP_OK) {
        lp_model_free(m);
        return st;
    }
    *out = m;
    return LP_OK;
}

size_t lp_model_device_bytes(const lp_model *m) {
    size_t n = m->weight_bytes + (m->acts ? m->acts_bytes : 0);
    for (int i = 0; i < m->n_hooks; i++) n += lp_hook_capture_bytes(m, i);
    return n;
}

static void free_acts(lp_model *m) {
    lp_ctx_release(&m->ctx, m->acts);
    m->acts = NULL;
    free(m->logits_host);
    free(m->losses_host);
    free(m->tgt_host);
    free(m->loss_stage);
    free(m->logit_stage);
    m->logits_host = m->losses_host = m->loss_stage = NULL;
    m->logits_rows = 0;
    m->tgt_host = NULL;
    m->logit_stage = NULL;
    m->B_max = m->T_max = 0;
}

void lp_model_free(lp_model *m) {
    if (!m) return;
    lp_hooks_free(m);
    free_acts(m);
    lp_ctx_release(&m->ctx, m->weights);
    free(m->params);
    lp_ctx_free(&m->ctx);
    free(m);
}

const lp_config *lp_model_config(const lp_model *m) { return &m->cfg; }
int64_t lp_model_n_params(const lp_model *m) { return m->n_params; }
lp_ctx *lp_model_ctx(lp_model *m) { return &m->ctx; }
const float *lp_model_logits(const lp_model *m) { return m->have_logits ? m->logits_host : NULL; }
const float *lp_model_losses(const lp_model *m) { return m->have_losses ? m->losses_host : NULL; }

lp_status lp_model_prepare(lp_model *m, int B, int T) {
    if (B <= 0 || T <= 0) LP_FAIL(LP_ERR_ARG, "batch %d x %d: both must be positive", B, T);
    if (T > m->cfg.n_ctx) LP_FAIL(LP_ERR_ARG, "sequence length %d exceeds the model's context of %d", T, m->cfg.n_ctx);
    int grow = B > m->B_max || T > m->T_max;
    if (m->any_hook_dirty && lp_hooks_want_attn_mats(m) && !m->acts_attn_mats) grow = 1;
    if (grow) {
        int nB = B > m->B_max ? B : m->B_max, nT = T > m->T_max ? T : m->T_max;
        free_acts(m);
        m->acts_bytes = lp_gpt2_act_bytes(m, nB, nT);
        LP_CHECK(lp_ctx_alloc(&m->ctx, m->acts_bytes, &m->acts));
        m->B_max = nB, m->T_max = nT;
        lp_gpt2_carve(m, nB, nT);
        size_t N = (size_t)nB * nT;
        m->losses_host = malloc(N * sizeof(float));
        m->tgt_host = malloc(N * sizeof(int32_t));
        m->loss_stage = malloc(N * sizeof(float));
        m->logit_stage = malloc((size_t)m->logit_rows * m->cfg.d_vocab * lp_act_size(m));
        if (!m->losses_host || !m->tgt_host || !m->loss_stage || !m->logit_stage) LP_FAIL(LP_ERR_OOM, "out of host memory for %d x %d logits", nB, nT);
        m->any_hook_dirty = 1;
    }
    if (m->any_hook_dirty) LP_CHECK(lp_hooks_prepare(m));
    return LP_OK;
}

lp_status lp_model_forward(lp_model *m, const int32_t *tokens, int B, int T, int want) {
    LP_CHECK(lp_model_prepare(m, B, T));
    for (int64_t i = 0; i < (int64_t)B * T; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.d_vocab)
            LP_FAIL(LP_ERR_ARG, "token id %d at row %lld position %lld is not in [0, %d)", tokens[i],
                    (long long)(i / T), (long long)(i % T), m->cfg.d_vocab);
    if ((want & LP_WANT_LOGITS) && (size_t)B * T > m->logits_rows) {
        /* a host result buffer, sized when first asked for: B x T x V floats can be large */
        free(m->logits_host);
        m->logits_host = malloc((size_t)B * T * m->cfg.d_vocab * sizeof(float));
        m->logits_rows = m->logits_host ? (size_t)B * T : 0;
        if (!m->logits_host) LP_FAIL(LP_ERR_OOM, "out of host memory for %d x %d x %d logits", B, T, m->cfg.d_vocab);
    }
    m->B = B, m->T = T;
    m->have_logits = m->have_losses = 0;
    lp_ctx *c = &m->ctx;
    size_t N = (size_t)B * T;
    LP_CHECK(lp_ctx_to_device(c, m->tok_dev, tokens, N * sizeof(int32_t)));
    if (want & LP_WANT_LOSS) {
        /* target of position t is token t+1; the last position of a row predicts nothing */
        int32_t *tgt = m->tgt_host;
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) tgt[(size_t)b * T + t] = t + 1 < T ? tokens[(size_t)b * T + t + 1] : -1;
        LP_CHECK(lp_ctx_to_device(c, m->tgt_dev, tgt, N * sizeof(int32_t)));
    }
    LP_CHECK(lp_gpt2_forward(m, B, T, want));
    LP_CHECK(lp_hooks_finish(m));
    if (want & LP_WANT_LOSS) {
        LP_CHECK(lp_ctx_to_host(c, m->loss_stage, m->loss_dev, N * sizeof(float)));
        /* drop each row's last position: [B,T] -> [B,T-1] */
        for (int b = 0; b < B; b++)
            memcpy(m->losses_host + (size_t)b * (T - 1), m->loss_stage + (size_t)b * T, (T - 1) * sizeof(float));
        m->have_losses = 1;
    }
    if (want & LP_WANT_LOGITS) m->have_logits = 1;
    return LP_OK;
}
