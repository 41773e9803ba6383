/* model.c: the architecture-independent part of a model: loading by config,
 * sizing and allocating activation memory, running a forward, the unembedding,
 * handing back logits and losses (generation with a KV cache is in generate.c).
 * Architecture files (gpt2.c, llama.c) provide load, carve and forward. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "loupe/ops.h"
#include "loupe/safetensors.h"
#include "model/model_internal.h"

void lp_param_add(lp_model *m, const char *name, int64_t r, int64_t cols, size_t *off) {
    param *p = &m->params[m->n_params_t++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = cols ? 2 : 1;
    p->shape[0] = r, p->shape[1] = cols;
    p->offset = *off;
    *off += (size_t)(r * (cols ? cols : 1) + 31) / 32 * 32; /* keep every tensor 128-byte aligned in f32 */
}

void lp_param_count(lp_model *m) {
    m->n_params = 0;
    for (int i = 0; i < m->n_params_t; i++) m->n_params += m->params[i].shape[0] * (m->params[i].ndim == 2 ? m->params[i].shape[1] : 1);
}

/* A directory's config.json model_type picks the architecture; a file is GGUF. */
static lp_status load_by_kind(lp_model *m, const char *path) {
    struct stat sb;
    if (stat(path, &sb) != 0) LP_FAIL(LP_ERR_IO, "%s: no such file or directory", path);
    if (!S_ISDIR(sb.st_mode)) return lp_llama_load(m, path);
    char cfg[1200];
    snprintf(cfg, sizeof cfg, "%s/config.json", path);
    size_t n;
    char *buf = lp_read_file(cfg, &n);
    if (!buf) LP_FAIL(LP_ERR_IO, "%s: cannot open (is '%s' a Hugging Face checkpoint directory?)", cfg, path);
    cJSON *root = cJSON_ParseWithLength(buf, n);
    free(buf);
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    int gpt2 = cJSON_IsString(mt) && strcmp(mt->valuestring, "gpt2") == 0;
    cJSON_Delete(root);
    return gpt2 ? lp_gpt2_load(m, path) : lp_llama_load(m, path);
}

lp_status lp_model_load(lp_model **out, const char *path, lp_device dev, lp_dtype dtype) {
    *out = NULL;
    lp_model *m = calloc(1, sizeof *m);
    if (!m) LP_FAIL(LP_ERR_OOM, "out of memory");
    snprintf(m->path, sizeof m->path, "%s", path);
    m->gen_pos0 = -1;
    lp_status st = lp_ctx_init(&m->ctx, dev, dtype);
    if (st == LP_OK) st = load_by_kind(m, path);
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
    if (cfg->arch != LP_ARCH_GPT2 && cfg->arch != LP_ARCH_LLAMA) LP_FAIL(LP_ERR_ARG, "random model: unsupported architecture");
    lp_model *m = calloc(1, sizeof *m);
    if (!m) LP_FAIL(LP_ERR_OOM, "out of memory");
    m->cfg = *cfg;
    snprintf(m->path, sizeof m->path, "(random)");
    m->gen_pos0 = -1;
    lp_status st = lp_ctx_init(&m->ctx, dev, dtype);
    if (st == LP_OK) st = cfg->arch == LP_ARCH_GPT2 ? lp_gpt2_random(m, seed) : lp_llama_random(m, seed);
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
    lp_ctx_release(&m->ctx, m->kv);
    lp_grad_free(m);
    lp_ctx_release(&m->ctx, m->tape_mem);
    lp_ctx_release(&m->ctx, m->grad_ones);
    free(m->tape);
    lp_ctx_release(&m->ctx, m->rope_cos);
    lp_ctx_release(&m->ctx, m->rope_sin);
    free(m->params);
    free(m->rope_freq_div);
    lp_ctx_free(&m->ctx);
    free(m);
}

const lp_config *lp_model_config(const lp_model *m) { return &m->cfg; }
int64_t lp_model_n_params(const lp_model *m) { return m->n_params; }
lp_ctx *lp_model_ctx(lp_model *m) { return &m->ctx; }
static lp_status param_to_f32(lp_model *m, int idx, float *dst) {
    const param *p = &m->params[idx];
    size_t n = (size_t)p->shape[0] * (p->ndim == 2 ? (size_t)p->shape[1] : 1), es = lp_act_size(m);
    if (m->ctx.dtype == LP_F32) return lp_ctx_to_host(&m->ctx, dst, lp_param(m, idx), n * es);
    void *h = malloc(n * es);
    if (!h) LP_FAIL(LP_ERR_OOM, "out of memory for %s", p->name);
    lp_status st = lp_ctx_to_host(&m->ctx, h, lp_param(m, idx), n * es);
    if (st == LP_OK) st = lp_convert_host(dst, LP_F32, h, m->ctx.dtype, n);
    free(h);
    return st;
}

lp_status lp_model_unembed_weights(lp_model *m, float *W_U, float *ln_w) {
    LP_CHECK(param_to_f32(m, m->unembed, W_U));
    if (!ln_w) return LP_OK;
    for (int i = 0; i < m->n_params_t; i++)
        if (strcmp(m->params[i].name, "ln_final.w") == 0) return param_to_f32(m, i, ln_w);
    LP_FAIL(LP_ERR_NOT_FOUND, "%s: no final norm weight", m->path);
}

const float *lp_model_logits(const lp_model *m) { return m->have_logits ? m->logits_host : NULL; }
const float *lp_model_losses(const lp_model *m) { return m->have_losses ? m->losses_host : NULL; }

/* The buffers of one forward for B x T, carved from one allocation when `carve` is set;
 * returns the bytes needed. Scores and pattern ([B,H,T,T]) exist only while a hook asks
 * for them; the Llama family adds the up projection, GPT-2 the position embedding. */
static size_t layout(lp_model *m, int B, int T, int carve) {
    const lp_config *c = &m->cfg;
    int llama = c->arch == LP_ARCH_LLAMA;
    size_t N = (size_t)B * T, D = c->d_model, F = c->d_mlp, es = lp_act_size(m), off = 0;
    size_t qD = (size_t)c->n_heads * c->d_head, kvD = (size_t)c->n_kv_heads * c->d_head;
    size_t attn_mat = lp_hooks_want_attn_mats(m) ? (size_t)B * c->n_heads * T * T * es : 0;
    size_t rows = N < 1 ? 1 : N;
    size_t lrows = (size_t)(64u << 20) / ((size_t)c->d_vocab * es); /* logits chunk: at most 64 MiB */
    if (lrows < 1) lrows = 1;
    if (lrows > rows || lp_hooks_want_full_logits(m)) lrows = rows; /* unembed.hook_out sees them whole */
    struct { void **p; size_t bytes; } bufs[] = {
        {&m->resid, N * D * es}, {&m->ln_out, N * D * es}, {&m->ln_norm, N * D * es}, {&m->ln_scale, N * es},
        {&m->q, N * qD * es}, {&m->k, N * kvD * es}, {&m->v, N * kvD * es},
        {&m->scores, attn_mat}, {&m->pattern, attn_mat},
        {&m->z, N * qD * es}, {&m->attn_out, N * D * es}, {&m->mlp_pre, N * F * es}, {&m->mlp_lin, llama ? N * F * es : 0},
        {&m->mlp_post, N * F * es}, {&m->mlp_out, N * D * es}, {&m->pos_buf, llama ? 0 : N * D * es},
        {&m->logits, lrows * c->d_vocab * es}, {(void **)&m->tok_dev, N * 4}, {(void **)&m->tgt_dev, N * 4},
        {(void **)&m->loss_dev, N * 4},
    };
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) {
        if (carve) *bufs[i].p = bufs[i].bytes ? (char *)m->acts + off : NULL;
        off += (bufs[i].bytes + 255) / 256 * 256;
    }
    if (carve) m->logit_rows = (int)lrows, m->acts_attn_mats = attn_mat > 0;
    return off;
}

lp_status lp_model_prepare(lp_model *m, int B, int T) {
    if (B <= 0 || T <= 0) LP_FAIL(LP_ERR_ARG, "batch %d x %d: both must be positive", B, T);
    if (T > m->cfg.n_ctx) LP_FAIL(LP_ERR_ARG, "sequence length %d exceeds the model's context of %d", T, m->cfg.n_ctx);
    int grow = B > m->B_max || T > m->T_max;
    if (m->any_hook_dirty && lp_hooks_want_attn_mats(m) && !m->acts_attn_mats) grow = 1;
    if (m->any_hook_dirty && lp_hooks_want_full_logits(m) && (size_t)m->logit_rows < (size_t)m->B_max * m->T_max) grow = 1;
    if (grow) {
        int nB = B > m->B_max ? B : m->B_max, nT = T > m->T_max ? T : m->T_max;
        free_acts(m);
        m->acts_bytes = layout(m, nB, nT, 0);
        LP_CHECK(lp_ctx_alloc(&m->ctx, m->acts_bytes, &m->acts));
        layout(m, nB, nT, 1);
        if (m->cfg.arch == LP_ARCH_LLAMA && m->rope_n < nT) LP_CHECK(lp_llama_rope_tables(m, nT));
        size_t N = (size_t)nB * nT;
        m->losses_host = malloc(N * sizeof(float));
        m->tgt_host = malloc(N * sizeof(int32_t));
        m->loss_stage = malloc(N * sizeof(float));
        m->logit_stage = malloc((size_t)m->logit_rows * m->cfg.d_vocab * lp_act_size(m));
        if (!m->losses_host || !m->tgt_host || !m->loss_stage || !m->logit_stage) {
            free_acts(m); /* B_max stays 0: the next call tries again */
            LP_FAIL(LP_ERR_OOM, "out of host memory for %d x %d logits", nB, nT);
        }
        m->B_max = nB, m->T_max = nT; /* only once everything sized for them exists */
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
    LP_CHECK(m->forward(m, B, T, want));
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

lp_status lp_model_unembed(lp_model *m, int N, int want) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    LP_CHECK(lp_hook_site(m, lp_hook_id(m, HK_UNEMBED_IN, cf->n_layers), m->ln_out));
    /* while generating only an edit of the logits makes them all (the step needs the last row) */
    int out_id = lp_hook_id(m, HK_UNEMBED_OUT, cf->n_layers);
    int out = m->generating ? out_id >= 0 && m->hooks[out_id].edits : lp_hook_active(m, out_id);
    if (!(want & (LP_WANT_LOSS | LP_WANT_LOGITS)) && !out) return LP_OK;
    if (out && m->logit_rows < N) LP_FAIL(LP_ERR_INTERNAL, "unembed.hook_out: the logits buffer holds %d rows, the batch has %d", m->logit_rows, N);
    /* in row chunks so that B x T x V logits never exist at once, unless unembed.hook_out is
     * hooked (then logit_rows covers the batch: one chunk, which the hook sees and edits
     * before the losses are taken from it) */
    const void *wu = lp_param(m, m->unembed);
    size_t es = lp_act_size(m);
    for (int r0 = 0; r0 < N; r0 += m->logit_rows) {
        int rows = N - r0 < m->logit_rows ? N - r0 : m->logit_rows;
        const char *x = (const char *)m->ln_out + (size_t)r0 * cf->d_model * es;
        lp_status st = lp_matmul(c, m->logits, x, wu, NULL, rows, cf->d_model, cf->d_vocab, 1);
        if (st == LP_OK && out) st = lp_hook_site(m, out_id, m->logits);
        if (st == LP_OK && (want & LP_WANT_LOSS))
            st = lp_cross_entropy(c, m->loss_dev + r0, m->logits, m->tgt_dev + r0, rows, cf->d_vocab);
        if (st == LP_OK && (want & LP_WANT_LOGITS)) {
            float *dst = m->logits_host + (size_t)r0 * cf->d_vocab;
            size_t n = (size_t)rows * cf->d_vocab;
            if (c->device == LP_CPU) {
                memcpy(dst, m->logits, n * sizeof(float));
            } else {
                st = lp_ctx_to_host(c, m->logit_stage, m->logits, n * es);
                if (st == LP_OK) st = lp_convert_host(dst, LP_F32, m->logit_stage, c->dtype, n);
            }
        }
        LP_CHECK(st);
    }
    return LP_OK;
}

/* ---- forward pieces both architectures share ---- */

lp_status lp_model_norm(lp_model *m, const void *x, const void *w, const void *b, int k_scale, int k_norm, int L, int N) {
    lp_ctx *c = &m->ctx;
    int D = m->cfg.d_model, rms = m->cfg.arch == LP_ARCH_LLAMA;
    LP_CHECK(rms ? lp_rms_scale(c, m->ln_scale, x, N, D, m->cfg.ln_eps) : lp_ln_scale(c, m->ln_scale, x, N, D, m->cfg.ln_eps));
    LP_CHECK(lp_hook_site(m, lp_hook_id(m, k_scale, L), m->ln_scale));
    int id = lp_hook_id(m, k_norm, L);
    if (lp_hook_active(m, id)) { /* materialise the normalized value only when someone hooks it */
        LP_CHECK(rms ? lp_rms_apply(c, m->ln_norm, x, m->ln_scale, NULL, N, D) : lp_ln_apply(c, m->ln_norm, x, m->ln_scale, NULL, NULL, N, D));
        LP_CHECK(lp_hook_site(m, id, m->ln_norm));
        return lp_affine(c, m->ln_out, m->ln_norm, w, b, N, D);
    }
    return rms ? lp_rms_apply(c, m->ln_out, x, m->ln_scale, w, N, D) : lp_ln_apply(c, m->ln_out, x, m->ln_scale, w, b, N, D);
}

lp_status lp_model_attend(lp_model *m, int L, int B, int T) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int H = cf->n_heads, Hkv = cf->n_kv_heads, dh = cf->d_head;
    if (m->gen_pos0 >= 0) { /* batch 1: append this step's keys and values to the cache and attend over it */
        int pos0 = m->gen_pos0;
        size_t row = (size_t)Hkv * dh * lp_act_size(m), plane = (size_t)m->kv_cap * row;
        char *kc = (char *)m->kv + 2 * (size_t)L * plane, *vc = kc + plane;
        LP_CHECK(lp_ctx_copy(c, kc + pos0 * row, m->k, T * row));
        LP_CHECK(lp_ctx_copy(c, vc + pos0 * row, m->v, T * row));
        /* the prompt (nothing cached before it) takes the blocked fused kernel */
        if (pos0 == 0) return lp_attention(c, m->z, m->q, m->k, m->v, 1, T, H, Hkv, dh);
        return lp_attention_cached(c, m->z, m->q, kc, vc, 1, T, m->kv_cap, pos0, H, Hkv, dh);
    }
    int ks = lp_hook_id(m, HK_SCORES, L), kp = lp_hook_id(m, HK_PATTERN, L);
    if (lp_hook_active(m, ks) || lp_hook_active(m, kp) || lp_grad_wanted(m, HK_SCORES, L) || lp_grad_wanted(m, HK_PATTERN, L)) {
        LP_CHECK(lp_attn_scores(c, m->scores, m->q, m->k, B, T, H, Hkv, dh));
        LP_CHECK(lp_hook_site(m, ks, m->scores));
        LP_CHECK(lp_softmax_rows(c, m->pattern, m->scores, (size_t)B * H * T, T));
        LP_CHECK(lp_hook_site(m, kp, m->pattern));
        return lp_attn_apply(c, m->z, m->pattern, m->v, B, T, H, Hkv, dh);
    }
    return lp_attention(c, m->z, m->q, m->k, m->v, B, T, H, Hkv, dh);
}
