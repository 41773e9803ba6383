/* model.c: the model driver: loading (the registry picks the architecture from config.json
 * or GGUF metadata; weights.c streams the tensors), sizing and allocating activation memory,
 * running a forward through the architecture's table, handing back logits and losses
 * (generation with a KV cache is in generate.c, gradients in grad.c and metric.c). */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "loupe/dist.h"
#include "loupe/ops.h"
#include "model/arch.h"
#include "model/blocks.h"
#include "model/model_cfg.h"

/* A directory's config.json model_type picks the architecture (the file parsed once, here);
 * a file is GGUF, whose general.architecture does. */
static lp_status load_hf(lp_model *m, const char *dir) {
    char path[1200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    struct stat sb;
    if (stat(path, &sb) != 0) LP_FAIL(LP_ERR_IO, "%s: cannot open (is '%s' a Hugging Face checkpoint directory?)", path, dir);
    cJSON *root;
    LP_CHECK(jcfg_open(path, &root));
    const char *type;
    lp_status st = jcfg_str(path, root, "", "model_type", "", &type);
    const model_arch *a = st == LP_OK ? arch_for_hf(type) : NULL;
    if (st == LP_OK && !a)
        st = LP_ERR(LP_ERR_FORMAT, "%s: model_type '%s' is not supported (supported: %s)", path, type, arch_hf_list());
    if (st == LP_OK) {
        m->arch = a;
        st = a->read_hf(m, path, root);
    }
    cJSON_Delete(root);
    if (st == LP_OK) st = weights_load_hf(m, a->names, dir, path);
    return st;
}

static lp_status load_gguf(lp_model *m, const char *path) {
    lp_gguf *g;
    LP_CHECK(lp_gguf_open(path, &g));
    const char *s;
    size_t len;
    char name[32];
    lp_status st = lp_gguf_get_str(g, "general.architecture", &s, &len);
    if (st != LP_OK) st = LP_ERR(LP_ERR_FORMAT, "%s: metadata key 'general.architecture' is missing", path);
    if (st == LP_OK) snprintf(name, sizeof name, "%.*s", (int)(len < 31 ? len : 31), s);
    const model_arch *a = st == LP_OK ? arch_for_gguf(name) : NULL;
    if (st == LP_OK && !a)
        st = LP_ERR(LP_ERR_FORMAT, "%s: GGUF architecture '%s' is not supported (supported: %s)", path, name, arch_gguf_list());
    if (st == LP_OK) {
        m->arch = a;
        st = a->read_gguf(m, g);
    }
    if (st == LP_OK) st = weights_load_gguf(m, a->names, g);
    lp_gguf_close(g);
    return st;
}

static lp_status load_by_kind(lp_model *m, const char *path) {
    struct stat sb;
    if (stat(path, &sb) != 0) LP_FAIL(LP_ERR_IO, "%s: no such file or directory", path);
    size_t n = strlen(path);
    int gguf = !S_ISDIR(sb.st_mode) && ((n > 5 && strcmp(path + n - 5, ".gguf") == 0) || lp_gguf_is_file(path));
    return gguf ? load_gguf(m, path) : load_hf(m, path);
}

static lp_model *new_model(const char *path) {
    lp_model *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    snprintf(m->path, sizeof m->path, "%s", path);
    m->kv.pos0 = -1;
    m->w.embed = m->w.pos_embed = m->w.lnf_w = m->w.lnf_b = m->w.unembed = -1;
    return m;
}

lp_status lp_model_load(lp_model **out, const char *path, lp_device dev, lp_dtype dtype) {
    *out = NULL;
    lp_model *m = new_model(path);
    if (!m) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = lp_ctx_init(&m->ctx, dev, dtype);
    if (st == LP_OK) st = load_by_kind(m, path);
    if (st == LP_OK) st = hooks_init(m);
    if (st != LP_OK) {
        lp_model_free(m);
        return st;
    }
    *out = m;
    return LP_OK;
}

lp_status lp_model_load_dist(lp_model **out, const char *path, lp_device dev, lp_dtype dtype, lp_dist *d) {
    if (lp_dist_tp_size(d) <= 1) return lp_model_load(out, path, dev, dtype);
    *out = NULL;
    lp_model *m = new_model(path);
    if (!m) LP_FAIL(LP_ERR_OOM, "out of memory");
    m->par.dist = d, m->par.tp = lp_dist_tp_size(d), m->par.rank = lp_dist_tp_rank(d);
    lp_status st = lp_ctx_init(&m->ctx, dev, dtype);
    if (st == LP_OK) st = load_by_kind(m, path);
    if (st == LP_OK) st = tp_alloc(m);
    if (st == LP_OK) st = hooks_init(m);
    if (st != LP_OK) {
        lp_model_free(m);
        return st;
    }
    *out = m;
    return LP_OK;
}

lp_dist *lp_model_dist(const lp_model *m) { return m->par.dist; }

lp_status lp_model_random(lp_model **out, const lp_config *cfg, uint64_t seed, lp_device dev, lp_dtype dtype) {
    return lp_model_random_dist(out, cfg, seed, dev, dtype, NULL);
}

lp_status lp_model_random_dist(lp_model **out, const lp_config *cfg, uint64_t seed, lp_device dev, lp_dtype dtype, lp_dist *d) {
    *out = NULL;
    const model_arch *a = arch_for_id(cfg->arch);
    if (!a) LP_FAIL(LP_ERR_ARG, "random model: unsupported architecture");
    lp_model *m = new_model("(random)");
    if (!m) LP_FAIL(LP_ERR_OOM, "out of memory");
    m->cfg = *cfg;
    m->arch = a;
    if (lp_dist_tp_size(d) > 1) m->par.dist = d, m->par.tp = lp_dist_tp_size(d), m->par.rank = lp_dist_tp_rank(d);
    lp_status st = lp_ctx_init(&m->ctx, dev, dtype);
    if (st == LP_OK) st = a->random_cfg(&m->cfg);
    if (st == LP_OK) st = weights_random(m, seed); /* each rank its slice's shapes (weights_alloc) */
    if (st == LP_OK) st = tp_alloc(m);
    if (st == LP_OK) st = hooks_init(m);
    if (st != LP_OK) {
        lp_model_free(m);
        return st;
    }
    *out = m;
    return LP_OK;
}

size_t lp_model_device_bytes(const lp_model *m) {
    size_t n = m->w.bytes + (m->a.mem ? m->a.bytes : 0);
    for (int i = 0; i < m->n_hooks; i++) n += hook_capture_bytes(m, i);
    return n;
}

static void free_acts(lp_model *m) {
    mdl_acts *a = &m->a;
    lp_ctx_release(&m->ctx, a->mem);
    free(a->tgt_host);
    free(a->loss_stage);
    free(a->logit_stage);
    free(m->res.logits);
    free(m->res.losses);
    memset(a, 0, sizeof *a);
    m->res.logits = m->res.losses = NULL;
    m->res.logits_rows = 0;
}

void lp_model_free(lp_model *m) {
    if (!m) return;
    grad_free(m); /* before weights_free, which zeroes the weight count its per-weight gradients are walked by */
    hooks_free(m);
    free_acts(m);
    weights_free(m);
    lp_ctx_release(&m->ctx, m->kv.mem);
    vocab_pad_free(m);
    lp_ctx_release(&m->ctx, m->tp.mem);
    lp_ctx_release(&m->ctx, m->grad_ones);
    free(m->tp.layer);
    rope_free(m);
    tp_free(m);
    lp_ctx_free(&m->ctx);
    free(m);
}

const lp_config *lp_model_config(const lp_model *m) { return &m->cfg; }
lp_status lp_model_set_tp_overlap(lp_model *m, int parts) {
    if (parts < 0 || parts > LP_DIST_MAX_STARTED) /* one started all-reduce per part */
        LP_FAIL(LP_ERR_ARG, "tensor-parallel micro-batches: %d (0: chosen per forward; 1: the plain schedule; at most %d)", parts,
                LP_DIST_MAX_STARTED);
    m->par.parts = parts;
    return LP_OK;
}
int lp_model_tp_overlapped(const lp_model *m) { return m->par.parts_run > 1 ? m->par.parts_run : 1; }
int64_t lp_model_n_params(const lp_model *m) { return m->w.n_params; }
lp_ctx *lp_model_ctx(lp_model *m) { return &m->ctx; }

lp_status param_to_f32(lp_model *m, int idx, float *dst) {
    const param *p = &m->w.params[idx];
    size_t n = (size_t)p->shape[0] * (p->ndim == 2 ? (size_t)p->shape[1] : 1), es = act_elem_bytes(m);
    if (m->ctx.dtype == LP_F32) return lp_ctx_to_host(&m->ctx, dst, param_ptr(m, idx), n * es);
    void *h = malloc(n * es);
    if (!h) LP_FAIL(LP_ERR_OOM, "out of memory for %s", p->name);
    lp_status st = lp_ctx_to_host(&m->ctx, h, param_ptr(m, idx), n * es);
    if (st == LP_OK) st = lp_convert_host(dst, LP_F32, h, m->ctx.dtype, n);
    free(h);
    return st;
}

lp_status lp_model_unembed_weights(lp_model *m, float *W_U, float *ln_w) {
    if (m->par.tp > 1) LP_FAIL(LP_ERR_ARG, "dist.tp=%d: the unembedding is split over the ranks (load with dist.tp=1)", m->par.tp);
    LP_CHECK(param_to_f32(m, m->w.unembed, W_U));
    return ln_w ? param_to_f32(m, m->w.lnf_w, ln_w) : LP_OK;
}

const float *lp_model_logits(const lp_model *m) { return m->res.have_logits ? m->res.logits : NULL; }
const float *lp_model_losses(const lp_model *m) { return m->res.have_losses ? m->res.losses : NULL; }

/* The buffers of one forward for B x T, carved from one allocation when `carve` is set;
 * returns the bytes needed. Scores and pattern ([B,H,T,T]) exist only while a hook asks
 * for them; the rest only where the architecture has them (gated MLPs' second projection,
 * GPT-2's position embedding, Gemma's post-norm branch and q/k norms). */
static size_t layout(lp_model *m, int B, int T, int carve) {
    const lp_config *c = &m->cfg;
    mdl_acts *a = &m->a;
    size_t N = (size_t)B * T, D = c->d_model, F = c->d_mlp, es = act_elem_bytes(m), off = 0, H = c->n_heads;
    size_t qD = H * c->d_head, kvD = (size_t)c->n_kv_heads * c->d_head, wide = qD > D ? qD : D;
    size_t attn_mat = hooks_want_attn_mats(m) ? (size_t)B * H * T * T * es : 0;
    size_t rows = N < 1 ? 1 : N;
    size_t lrows = (size_t)(64u << 20) / ((size_t)c->d_vocab * es); /* logits chunk: at most 64 MiB */
    if (lrows < 1) lrows = 1;
    if (lrows > rows || hooks_want_full_logits(m)) lrows = rows; /* unembed.hook_out sees them whole */
    int gated = c->mlp != LP_MLP_GELU, qkn = c->qk_norm, P = m->par.tp;
    /* tensor parallelism: the widest split activation whole, and the all-gather's buffers
     * (every rank's slice, padded to the widest vocabulary slice) */
    size_t tp_full = 0, tp_local = 0, vmax = ((size_t)c->d_vocab + P - 1) / P;
    if (P > 1) {
        size_t cand[] = {N * qD, N * F, attn_mat / es, lrows * c->d_vocab};
        for (size_t i = 0; i < 4; i++) tp_full = cand[i] > tp_full ? cand[i] : tp_full;
        size_t loc[] = {N * m->par.H * c->d_head, N * m->par.Hkv * c->d_head, N * m->par.F, attn_mat / es / P, lrows * vmax};
        for (size_t i = 0; i < 5; i++) tp_local = loc[i] > tp_local ? loc[i] : tp_local;
    }
    struct { void **p; size_t bytes; } bufs[] = {
        {&a->tp_full, tp_full * es}, {&a->tp_send, tp_local * es}, {&a->tp_recv, P * tp_local * es},
        {&a->tp_logits, P > 1 ? lrows * m->par.V * es : 0},
        {&a->resid, N * D * es}, {&a->ln_out, N * D * es}, {&a->ln_norm, N * (qkn ? wide : D) * es}, {&a->ln_scale, N * es},
        {&a->q, N * qD * es}, {&a->k, N * kvD * es}, {&a->v, N * kvD * es},
        {&a->q_pre, qkn ? N * qD * es : 0}, {&a->k_pre, qkn ? N * kvD * es : 0}, {&a->qk_scale, qkn ? N * H * es : 0},
        {&a->scores, attn_mat}, {&a->pattern, attn_mat},
        {&a->z, N * qD * es}, {&a->attn_out, N * D * es}, {&a->mlp_pre, N * F * es}, {&a->mlp_lin, gated ? N * F * es : 0},
        {&a->mlp_post, N * F * es}, {&a->mlp_out, N * D * es}, {&a->branch, c->post_norms ? N * D * es : 0},
        {&a->pos_buf, c->pos == LP_POS_LEARNED ? N * D * es : 0},
        {&a->logits, lrows * c->d_vocab * es}, {(void **)&a->tok, N * 4}, {(void **)&a->tgt, N * 4},
        {(void **)&a->loss, N * 4},
    };
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) {
        if (carve) *bufs[i].p = bufs[i].bytes ? (char *)a->mem + off : NULL;
        off += (bufs[i].bytes + 255) / 256 * 256;
    }
    if (carve) a->logit_rows = (int)lrows, a->attn_mats = attn_mat > 0;
    return off;
}

/* The activation buffers (and host staging) for nB x nT. */
static lp_status grow(lp_model *m, int nB, int nT) {
    mdl_acts *a = &m->a;
    free_acts(m);
    a->bytes = layout(m, nB, nT, 0);
    LP_CHECK(lp_ctx_alloc(&m->ctx, a->bytes, &a->mem));
    layout(m, nB, nT, 1);
    LP_CHECK(rope_tables_grow(m, nT));
    size_t N = (size_t)nB * nT;
    m->res.losses = malloc(N * sizeof(float));
    a->tgt_host = malloc(N * sizeof(int32_t));
    a->loss_stage = malloc(N * sizeof(float));
    a->logit_stage = malloc((size_t)a->logit_rows * m->cfg.d_vocab * act_elem_bytes(m));
    if (!m->res.losses || !a->tgt_host || !a->loss_stage || !a->logit_stage || tp_host_alloc(m, a->logit_rows)) {
        free_acts(m); /* B_max stays 0: the next call tries again */
        LP_FAIL(LP_ERR_OOM, "out of host memory for %d x %d logits", nB, nT);
    }
    a->B_max = nB, a->T_max = nT; /* only once everything sized for them exists */
    m->any_hook_dirty = 1;
    return LP_OK;
}

lp_status lp_model_prepare(lp_model *m, int B, int T) {
    if (B <= 0 || T <= 0) LP_FAIL(LP_ERR_ARG, "batch %d x %d: both must be positive", B, T);
    if (T > m->cfg.n_ctx) LP_FAIL(LP_ERR_ARG, "sequence length %d exceeds the model's context of %d", T, m->cfg.n_ctx);
    mdl_acts *a = &m->a;
    int more = B > a->B_max || T > a->T_max;
    if (m->any_hook_dirty && hooks_want_attn_mats(m) && !a->attn_mats) more = 1;
    if (m->any_hook_dirty && hooks_want_full_logits(m) && (size_t)a->logit_rows < (size_t)a->B_max * a->T_max) more = 1;
    if (more) LP_CHECK(grow(m, B > a->B_max ? B : a->B_max, T > a->T_max ? T : a->T_max));
    if (m->any_hook_dirty) LP_CHECK(hooks_prepare(m));
    return LP_OK;
}

/* Tokens (and for the loss, targets) of the batch onto the device. */
static lp_status upload_tokens(lp_model *m, const int32_t *tokens, int B, int T, int want) {
    lp_ctx *c = &m->ctx;
    size_t N = (size_t)B * T;
    LP_CHECK(lp_ctx_to_device(c, m->a.tok, tokens, N * sizeof(int32_t)));
    if (!(want & LP_WANT_LOSS)) return LP_OK;
    /* target of position t is token t+1; the last position of a row predicts nothing */
    int32_t *tgt = m->a.tgt_host;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) tgt[(size_t)b * T + t] = t + 1 < T ? tokens[(size_t)b * T + t + 1] : -1;
    return lp_ctx_to_device(c, m->a.tgt, tgt, N * sizeof(int32_t));
}

lp_status lp_model_forward(lp_model *m, const int32_t *tokens, int B, int T, int want) {
    LP_CHECK(lp_model_prepare(m, B, T));
    for (int64_t i = 0; i < (int64_t)B * T; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.d_vocab)
            LP_FAIL(LP_ERR_ARG, "token id %d at row %lld position %lld is not in [0, %d)", tokens[i],
                    (long long)(i / T), (long long)(i % T), m->cfg.d_vocab);
    mdl_results *r = &m->res;
    if ((want & LP_WANT_LOGITS) && (size_t)B * T > r->logits_rows) {
        /* a host result buffer, sized when first asked for: B x T x V floats can be large */
        free(r->logits);
        r->logits = malloc((size_t)B * T * m->cfg.d_vocab * sizeof(float));
        r->logits_rows = r->logits ? (size_t)B * T : 0;
        if (!r->logits) LP_FAIL(LP_ERR_OOM, "out of host memory for %d x %d x %d logits", B, T, m->cfg.d_vocab);
    }
    r->B = B, r->T = T;
    r->have_logits = r->have_losses = 0;
    LP_CHECK(upload_tokens(m, tokens, B, T, want));
    LP_CHECK(m->arch->forward(m, B, T, want));
    LP_CHECK(hooks_finish(m));
    if (want & LP_WANT_LOSS) {
        LP_CHECK(lp_ctx_to_host(&m->ctx, m->a.loss_stage, m->a.loss, (size_t)B * T * sizeof(float)));
        /* drop each row's last position: [B,T] -> [B,T-1] */
        for (int b = 0; b < B; b++)
            memcpy(r->losses + (size_t)b * (T - 1), m->a.loss_stage + (size_t)b * T, (T - 1) * sizeof(float));
        r->have_losses = 1;
    }
    if (want & LP_WANT_LOGITS) r->have_logits = 1;
    return LP_OK;
}
