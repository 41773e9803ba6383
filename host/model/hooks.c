/* hooks.c: the hook table (TransformerLens names and shapes), capture and edit
 * registration, and the hook site that the forward calls at every named point. */
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/ops.h"
#include "model/model_internal.h"
#include "model/score.h"

static const char *const g_layer_names[HK_PER_LAYER] = {
    [HK_RESID_PRE] = "hook_resid_pre",     [HK_LN1_SCALE] = "ln1.hook_scale",
    [HK_LN1_NORM] = "ln1.hook_normalized", [HK_Q] = "attn.hook_q",
    [HK_K] = "attn.hook_k",                [HK_V] = "attn.hook_v",
    [HK_QN_SCALE] = "attn.q_norm.hook_scale", [HK_QN_NORM] = "attn.q_norm.hook_normalized",
    [HK_KN_SCALE] = "attn.k_norm.hook_scale", [HK_KN_NORM] = "attn.k_norm.hook_normalized",
    [HK_LN1P_SCALE] = "ln1_post.hook_scale", [HK_LN1P_NORM] = "ln1_post.hook_normalized",
    [HK_LN2P_SCALE] = "ln2_post.hook_scale", [HK_LN2P_NORM] = "ln2_post.hook_normalized",
    [HK_ROT_Q] = "attn.hook_rot_q",        [HK_ROT_K] = "attn.hook_rot_k",
    [HK_SCORES] = "attn.hook_attn_scores", [HK_PATTERN] = "attn.hook_pattern",
    [HK_Z] = "attn.hook_z",                [HK_ATTN_OUT] = "hook_attn_out",
    [HK_RESID_MID] = "hook_resid_mid",     [HK_LN2_SCALE] = "ln2.hook_scale",
    [HK_LN2_NORM] = "ln2.hook_normalized", [HK_MLP_PRE] = "mlp.hook_pre",
    [HK_MLP_IN] = "mlp.hook_in",
    [HK_MLP_PRE_LINEAR] = "mlp.hook_pre_linear",
    [HK_MLP_POST] = "mlp.hook_post",       [HK_MLP_OUT] = "hook_mlp_out",
    [HK_RESID_POST] = "hook_resid_post",
};

size_t act_elem_bytes(const lp_model *m) { return lp_dtype_size(m->ctx.dtype); }

static void set_view(hook *h, const lp_config *c) {
    h->H = 1, h->E = c->d_model, h->head_outer = 0, h->e_is_pos = 0;
    switch (h->kind) {
    case HK_LN1_SCALE: case HK_LN2_SCALE: case HK_LNF_SCALE: case HK_LN1P_SCALE: case HK_LN2P_SCALE: h->E = 1; break;
    case HK_Q: case HK_ROT_Q: case HK_Z: case HK_QN_NORM: h->H = c->n_heads, h->E = c->d_head; break;
    case HK_K: case HK_V: case HK_ROT_K: case HK_KN_NORM: h->H = c->n_kv_heads, h->E = c->d_head; break;
    /* TransformerLens flattens the q/k norms' rows to [B*T*H, ...]; loupe keeps [B, T, H, ...] */
    case HK_QN_SCALE: h->H = c->n_heads, h->E = 1; break;
    case HK_KN_SCALE: h->H = c->n_kv_heads, h->E = 1; break;
    case HK_SCORES: case HK_PATTERN: h->H = c->n_heads, h->head_outer = 1, h->e_is_pos = 1; break;
    case HK_MLP_PRE: case HK_MLP_PRE_LINEAR: case HK_MLP_POST: h->E = c->d_mlp; break;
    case HK_UNEMBED_OUT: h->E = c->d_vocab; break;
    default: break;
    }
}

/* Whether the architecture has this hook point. */
static int arch_has(const lp_config *c, int kind) {
    switch (kind) {
    case HK_POS_EMBED: return c->pos == LP_POS_LEARNED;
    case HK_ROT_Q: case HK_ROT_K: return c->pos == LP_POS_ROTARY;
    case HK_MLP_PRE_LINEAR: return c->mlp != LP_MLP_GELU;
    case HK_QN_SCALE: case HK_QN_NORM: case HK_KN_SCALE: case HK_KN_NORM: return c->qk_norm;
    case HK_LN1P_SCALE: case HK_LN1P_NORM: case HK_LN2P_SCALE: case HK_LN2P_NORM: return c->post_norms;
    case HK_MLP_IN: return 0; /* only on request: lp_hooks_add_mlp_in */
    default: return 1;
    }
}

static void add_hook(lp_model *m, int kind, int layer, const char *name) {
    hook *h = &m->hooks[m->n_hooks];
    snprintf(h->name, sizeof h->name, "%s", name);
    h->kind = kind, h->layer = layer;
    set_view(h, &m->cfg);
    m->hook_index[layer * HK_N_KINDS + kind] = m->n_hooks++;
}

lp_status hooks_init(lp_model *m) {
    const lp_config *c = &m->cfg;
    int n_idx = (c->n_layers + 1) * HK_N_KINDS;
    m->hooks = calloc(HK_N_KINDS * (c->n_layers + 1), sizeof *m->hooks);
    m->hook_index = malloc(n_idx * sizeof(int));
    if (!m->hooks || !m->hook_index) LP_FAIL(LP_ERR_OOM, "out of memory for hooks");
    for (int i = 0; i < n_idx; i++) m->hook_index[i] = -1;
    m->n_hooks = 0;
    add_hook(m, HK_EMBED, 0, "hook_embed");
    if (arch_has(c, HK_POS_EMBED)) add_hook(m, HK_POS_EMBED, 0, "hook_pos_embed");
    char nm[64];
    for (int L = 0; L < c->n_layers; L++)
        for (int k = 0; k < HK_PER_LAYER; k++) {
            if (!arch_has(c, k)) continue;
            snprintf(nm, sizeof nm, "blocks.%d.%s", L, g_layer_names[k]);
            add_hook(m, k, L, nm);
        }
    /* ln_final lives at layer n_layers so that "the last layer a hook needs" orders it last */
    add_hook(m, HK_LNF_SCALE, c->n_layers, "ln_final.hook_scale");
    add_hook(m, HK_LNF_NORM, c->n_layers, "ln_final.hook_normalized");
    /* TransformerLens 3.x's Unembed fires these in every forward: its input (the final
     * norm's output, after the weight) and the logits */
    add_hook(m, HK_UNEMBED_IN, c->n_layers, "unembed.hook_in");
    add_hook(m, HK_UNEMBED_OUT, c->n_layers, "unembed.hook_out");
    return LP_OK;
}

/* circuit-tracer's replacement model wraps each MLP with hook_in / hook_out; HookedTransformer
 * has neither, so the table stays HookedTransformer's until a transcoder set asks. The
 * gradient state is sized by the hook count, hence "before the first gradient". */
lp_status lp_hooks_add_mlp_in(lp_model *m) {
    if (hook_id(m, HK_MLP_IN, 0) >= 0) return LP_OK;
    if (m->grad) LP_FAIL(LP_ERR_ARG, "mlp.hook_in: add it before the model's first gradient");
    char nm[64];
    for (int L = 0; L < m->cfg.n_layers; L++) {
        snprintf(nm, sizeof nm, "blocks.%d.mlp.hook_in", L);
        add_hook(m, HK_MLP_IN, L, nm);
    }
    return LP_OK;
}

int hook_id(const lp_model *m, int kind, int layer) {
    if (kind == HK_EMBED || kind == HK_POS_EMBED) layer = 0;
    if (kind == HK_LNF_SCALE || kind == HK_LNF_NORM || kind == HK_UNEMBED_IN || kind == HK_UNEMBED_OUT) layer = m->cfg.n_layers;
    return m->hook_index[layer * HK_N_KINDS + kind];
}

int lp_hook_count(const lp_model *m) { return m->n_hooks; }
const char *lp_hook_name(const lp_model *m, int id) { return id >= 0 && id < m->n_hooks ? m->hooks[id].name : NULL; }

int lp_hook_find(const lp_model *m, const char *name) {
    for (int i = 0; i < m->n_hooks; i++)
        if (strcmp(m->hooks[i].name, name) == 0) return i;
    return -1;
}

/* [.., head, d_head] hooks keep their head axis even with one head (TransformerLens does). */
static int has_head_axis(const hook *h) {
    switch (h->kind) {
    case HK_Q: case HK_K: case HK_V: case HK_ROT_Q: case HK_ROT_K: case HK_Z: case HK_QN_SCALE: case HK_QN_NORM:
    case HK_KN_SCALE: case HK_KN_NORM: return 1;
    default: return h->H > 1;
    }
}

/* Shape with P positions (T, or the number of captured positions) and T keys. */
static int shape_of(const hook *h, int B, int P, int T, int64_t *s) {
    if (h->head_outer) {
        s[0] = B, s[1] = h->H, s[2] = P, s[3] = T;
        return 4;
    }
    s[0] = B, s[1] = P;
    if (has_head_axis(h)) {
        s[2] = h->H, s[3] = h->E;
        return 4;
    }
    s[2] = h->E;
    return 3;
}

int lp_hook_shape(const lp_model *m, int id, int B, int T, int64_t shape[LP_MAX_DIMS]) {
    return shape_of(&m->hooks[id], B, T, attn_keys(m, T), shape);
}

static lp_view view_of(const hook *h, int B, int T) {
    return (lp_view){.B = B, .P = T, .H = h->H, .E = h->e_is_pos ? T : h->E, .head_outer = h->head_outer};
}

/* Calls fn on every hook matching the pattern; fails if none does. */
static lp_status for_matches(lp_model *m, const char *pat, lp_status (*fn)(lp_model *, hook *, const void *),
                             const void *arg, int *n_matched) {
    int n = 0;
    int glob = strpbrk(pat, "*?[") != NULL;
    for (int i = 0; i < m->n_hooks; i++) {
        if (glob ? fnmatch(pat, m->hooks[i].name, 0) != 0 : strcmp(pat, m->hooks[i].name) != 0) continue;
        LP_CHECK(fn(m, &m->hooks[i], arg));
        n++;
    }
    if (n_matched) *n_matched = n;
    if (n == 0) {
        if (glob) LP_FAIL(LP_ERR_NOT_FOUND, "hook pattern '%s' matches no hook point (see `loupe info MODEL`)", pat);
        LP_FAIL(LP_ERR_NOT_FOUND, "unknown hook '%s' (see `loupe info MODEL` for the names)", pat);
    }
    m->any_hook_dirty = 1;
    return LP_OK;
}

typedef struct { const int *pos; int npos; } cap_arg;

static lp_status add_capture(lp_model *m, hook *h, const void *arg) {
    const cap_arg *a = arg;
    free(h->cap_pos);
    h->cap_pos = NULL, h->cap_npos = 0;
    if (a->pos && a->npos > 0) {
        for (int i = 0; i < a->npos; i++)
            if (a->pos[i] < 0 || a->pos[i] >= m->cfg.n_ctx)
                LP_FAIL(LP_ERR_ARG, "capture of %s: position %d is outside the context [0, %d)", h->name, a->pos[i],
                        m->cfg.n_ctx);
        if (!(h->cap_pos = malloc(a->npos * sizeof(int)))) LP_FAIL(LP_ERR_OOM, "capture of %s: out of memory", h->name);
        memcpy(h->cap_pos, a->pos, a->npos * sizeof(int));
        h->cap_npos = a->npos;
    }
    h->capture = 1;
    return LP_OK;
}

lp_status lp_hook_capture(lp_model *m, const char *pat, const int *pos, int npos, int *n_matched) {
    cap_arg a = {pos, npos};
    return for_matches(m, pat, add_capture, &a, n_matched);
}

static lp_status add_edit(lp_model *m, hook *h, const void *arg) {
    const lp_edit_spec *s = arg;
    int has_heads = has_head_axis(h) || h->head_outer;
    if (s->heads && s->nheads > 0 && !has_heads) LP_FAIL(LP_ERR_ARG, "edit of %s: this hook has no head axis", h->name);
    for (int i = 0; s->heads && i < s->nheads; i++)
        if (s->heads[i] < 0 || s->heads[i] >= h->H)
            LP_FAIL(LP_ERR_ARG, "edit of %s: head %d is outside [0, %d)", h->name, s->heads[i], h->H);
    for (int i = 0; s->pos && i < s->npos; i++)
        if (s->pos[i] < 0 || s->pos[i] >= m->cfg.n_ctx)
            LP_FAIL(LP_ERR_ARG, "edit of %s: position %d is outside the context [0, %d)", h->name, s->pos[i], m->cfg.n_ctx);
    if (!s->fn && (s->kind == LP_EDIT_SET || s->kind == LP_EDIT_ADD)) {
        size_t per_tok = (size_t)h->H * (h->e_is_pos ? 0 : h->E);
        if (h->e_is_pos) LP_FAIL(LP_ERR_ARG, "edit of %s: mean/steer vectors are not supported on attention patterns", h->name);
        if (!s->src || s->src_len != per_tok)
            LP_FAIL(LP_ERR_SHAPE, "edit of %s: vector has %zu values, the hook has %zu per position", h->name, s->src_len, per_tok);
    }
    if (s->fn && (s->grad < LP_EDIT_GRAD_UNKNOWN || s->grad > LP_EDIT_GRAD_STOP))
        LP_FAIL(LP_ERR_ARG, "edit of %s: unknown gradient rule %d for the callback", h->name, (int)s->grad);
    if (!s->fn && s->kind == LP_EDIT_PATCH && (!s->src || s->src_len == 0))
        LP_FAIL(LP_ERR_ARG, "edit of %s: patch needs the source activation", h->name);
    edit *e = calloc(1, sizeof *e);
    if (!e) LP_FAIL(LP_ERR_OOM, "edit of %s: out of memory", h->name);
    e->spec = *s;
    int ok = 1;
    if (s->src && s->src_len && (ok = (e->src_host = malloc(s->src_len * sizeof(float))) != NULL))
        memcpy(e->src_host, s->src, s->src_len * sizeof(float));
    if (ok && s->pos && s->npos > 0) {
        e->mask_len = m->cfg.n_ctx;
        if ((ok = (e->pos_mask_host = calloc(e->mask_len, 1)) != NULL))
            for (int i = 0; i < s->npos; i++) e->pos_mask_host[s->pos[i]] = 1;
    }
    if (ok && s->heads && s->nheads > 0 && (ok = (e->head_mask_host = calloc(h->H, 1)) != NULL))
        for (int i = 0; i < s->nheads; i++) e->head_mask_host[s->heads[i]] = 1;
    if (!ok) {
        free(e->src_host), free(e->pos_mask_host), free(e);
        LP_FAIL(LP_ERR_OOM, "edit of %s: out of memory", h->name);
    }
    e->spec.src = NULL, e->spec.pos = NULL, e->spec.heads = NULL; /* only the owned copies are used */
    edit **tail = &h->edits;
    while (*tail) tail = &(*tail)->next;
    *tail = e;
    return LP_OK;
}

lp_status lp_hook_edit(lp_model *m, const char *pat, const lp_edit_spec *spec) {
    return for_matches(m, pat, add_edit, spec, NULL);
}

lp_status score_patch(lp_model *m, const char *name, const void *src_dev, size_t n) {
    int id = lp_hook_find(m, name);
    if (id < 0) LP_FAIL(LP_ERR_NOT_FOUND, "patch: unknown hook '%s'", name);
    edit *e = calloc(1, sizeof *e);
    if (!e) LP_FAIL(LP_ERR_OOM, "patch of %s: out of memory", name);
    e->spec.kind = LP_EDIT_PATCH, e->spec.src_len = n, e->src_dev = (void *)src_dev, e->borrowed = 1;
    edit **tail = &m->hooks[id].edits;
    while (*tail) tail = &(*tail)->next;
    *tail = e;
    m->any_hook_dirty = 1;
    return LP_OK;
}

/* The device copies of a hook's edits. */
static void free_edit_copies(lp_model *m, hook *h) {
    lp_ctx *c = &m->ctx;
    for (edit *e = h->edits; e; e = e->next) {
        if (c->device == LP_CUDA) {
            if (!e->borrowed) lp_ctx_release(c, e->src_dev);
            lp_ctx_release(c, e->pos_mask_dev);
            lp_ctx_release(c, e->head_mask_dev);
        } else if (!e->borrowed) {
            free(e->src_dev);
        }
        e->src_dev = e->pos_mask_dev = e->head_mask_dev = NULL;
    }
}

/* A hook's capture buffers (kept across lp_hooks_clear for reuse; released with the model). */
static void free_capture(lp_model *m, hook *h) {
    lp_ctx *c = &m->ctx;
    if (c->device == LP_CUDA) {
        lp_ctx_release(c, h->cap_dev);
        lp_ctx_release(c, h->cap_pos_dev);
    }
    lp_ctx_release_host(c, h->cap_host);
    h->cap_dev = h->cap_pos_dev = h->cap_host = NULL;
    h->cap_bytes_max = 0, h->cap_pos_dev_n = 0;
}

void lp_hooks_clear(lp_model *m) {
    for (int i = 0; i < m->n_hooks; i++) {
        hook *h = &m->hooks[i];
        free_edit_copies(m, h);
        free(h->cap_pos);
        h->cap_pos = NULL, h->cap_npos = 0, h->capture = 0;
        if (m->ctx.device != LP_CUDA) h->cap_pos_dev = NULL; /* it was cap_pos */
        for (edit *e = h->edits, *n; e; e = n) {
            n = e->next;
            free(e->src_host);
            free(e->pos_mask_host);
            free(e->head_mask_host);
            free(e);
        }
        h->edits = NULL;
    }
    m->any_hook_dirty = 1;
}

void hooks_free(lp_model *m) {
    if (!m->hooks) return;
    lp_hooks_clear(m);
    score_free(m);
    for (int i = 0; i < m->n_hooks; i++) free_capture(m, &m->hooks[i]);
    free(m->hooks);
    free(m->hook_index);
    m->hooks = NULL;
    m->hook_index = NULL;
}

/* Uploads host data to the device in the act dtype (or keeps F32 on the CPU). */
static lp_status upload_act(lp_model *m, const float *src, size_t n, void **dst) {
    LP_CHECK(lp_ctx_alloc(&m->ctx, n * act_elem_bytes(m), dst));
    return lp_ctx_upload_f32(&m->ctx, *dst, src, n);
}

static lp_status upload_bytes(lp_model *m, const void *src, size_t n, void **dst) {
    LP_CHECK(lp_ctx_alloc(&m->ctx, n, dst));
    return lp_ctx_to_device(&m->ctx, *dst, src, n);
}

/* A captured hook's buffers for B x T (P positions when it captures some only): grown
 * when too small, else kept, so that registering and clearing captures between forwards
 * of one size allocates nothing. */
static lp_status prepare_capture(lp_model *m, hook *h, int B, int T) {
    lp_ctx *c = &m->ctx;
    int64_t s[LP_MAX_DIMS];
    int nd = shape_of(h, B, h->cap_pos ? h->cap_npos : T, T, s);
    size_t need = (size_t)lp_shape_numel(s, nd) * act_elem_bytes(m);
    if (need > h->cap_bytes_max || !h->cap_host) {
        lp_ctx_release_host(c, h->cap_host);
        if (c->device == LP_CUDA) lp_ctx_release(c, h->cap_dev);
        h->cap_host = h->cap_dev = NULL, h->cap_bytes_max = 0;
        LP_CHECK(lp_ctx_alloc_host(c, need, &h->cap_host));
        if (c->device == LP_CUDA) LP_CHECK(lp_ctx_alloc(c, need, &h->cap_dev));
        h->cap_bytes_max = need;
    }
    if (!h->cap_pos) return LP_OK;
    if (c->device != LP_CUDA) return h->cap_pos_dev = h->cap_pos, LP_OK;
    if (h->cap_npos > h->cap_pos_dev_n) {
        lp_ctx_release(c, h->cap_pos_dev);
        h->cap_pos_dev = NULL, h->cap_pos_dev_n = 0;
        LP_CHECK(lp_ctx_alloc(c, h->cap_npos * sizeof(int32_t), &h->cap_pos_dev));
        h->cap_pos_dev_n = h->cap_npos;
    }
    return lp_ctx_to_device(c, h->cap_pos_dev, h->cap_pos, h->cap_npos * sizeof(int32_t));
}

lp_status hooks_prepare(lp_model *m) {
    lp_ctx *c = &m->ctx;
    int B = m->a.B_max, T = m->a.T_max;
    for (int i = 0; i < m->n_hooks; i++) {
        hook *h = &m->hooks[i];
        if (h->capture) LP_CHECK(prepare_capture(m, h, B, T));
        /* an edit's device copies are made once: its spec does not change after registration */
        for (edit *e = h->edits; e; e = e->next) {
            if (e->src_host && !e->src_dev) LP_CHECK(upload_act(m, e->src_host, e->spec.src_len, &e->src_dev));
            if (c->device == LP_CUDA) {
                if (e->pos_mask_host && !e->pos_mask_dev) LP_CHECK(upload_bytes(m, e->pos_mask_host, e->mask_len, &e->pos_mask_dev));
                if (e->head_mask_host && !e->head_mask_dev) LP_CHECK(upload_bytes(m, e->head_mask_host, h->H, &e->head_mask_dev));
            } else {
                e->pos_mask_dev = e->pos_mask_host, e->head_mask_dev = e->head_mask_host;
            }
        }
    }
    m->any_hook_dirty = 0;
    return LP_OK;
}

int hooks_last_layer(const lp_model *m) {
    int last = -1;
    for (int i = 0; i < m->n_hooks; i++)
        if (hook_active(m, i) && m->hooks[i].layer > last) last = m->hooks[i].layer;
    return last;
}

int lp_hook_first_pos(const lp_model *m) { return m->kv.pos0 > 0 ? m->kv.pos0 : 0; }

/* Positions per source row of a patch, or 0 when the hook has none (scores, pattern). */
static size_t patch_row(const hook *h) { return h->e_is_pos ? 0 : (size_t)h->H * h->E; }

lp_status gen_patch_check(const lp_model *m, int id, int from, int to) {
    const hook *h = &m->hooks[id];
    for (const edit *e = h->edits; e; e = e->next) {
        if (e->spec.fn || e->spec.kind != LP_EDIT_PATCH) continue;
        size_t row = patch_row(h);
        if (!row) LP_FAIL(LP_ERR_ARG, "patch of %s while generating: its shape grows with every token; patch it in lp_model_forward", h->name);
        if (e->spec.src_len % row)
            LP_FAIL(LP_ERR_SHAPE, "patch of %s while generating: the source's %zu values are not whole positions of %zu", h->name, e->spec.src_len, row);
        int n_src = (int)(e->spec.src_len / row);
        for (int p = from > n_src ? from : n_src; p < to; p++)
            if (!e->pos_mask_host || e->pos_mask_host[p])
                LP_FAIL(LP_ERR_ARG, "patch of %s: generation reaches position %d, the patch source covers positions 0..%d (restrict the patch to positions < %d)",
                        h->name, p, n_src - 1, n_src);
    }
    return LP_OK;
}

/* The edits of hook h on act. While generating, row 0 of act is absolute position pos0:
 * the position mask is read from there, and a patch source (one sequence, [1, n_src, ...])
 * from its row pos0. */
static lp_status run_edits(lp_model *m, hook *h, int id, void *act, lp_view v, size_t n) {
    lp_ctx *c = &m->ctx;
    int pos0 = lp_hook_first_pos(m);
    for (edit *e = h->edits; e; e = e->next) {
        if (e->spec.fn) {
            lp_tensor t = {.data = act, .dtype = c->dtype, .device = c->device};
            t.ndim = shape_of(h, v.B, v.P, v.P, t.shape);
            lp_status st = e->spec.fn(h->name, &t, e->spec.user);
            if (st != LP_OK) return st;
            continue;
        }
        const char *src = e->src_dev;
        if (e->spec.kind == LP_EDIT_PATCH && m->kv.generating) {
            LP_CHECK(gen_patch_check(m, id, pos0, pos0 + v.P));
            src += (size_t)pos0 * patch_row(h) * act_elem_bytes(m);
        } else if (e->spec.kind == LP_EDIT_PATCH && e->spec.src_len != n) {
            LP_FAIL(LP_ERR_SHAPE, "patch of %s: source has %zu values, this batch's activation has %zu", h->name,
                    e->spec.src_len, n);
        }
        const uint8_t *mask = e->pos_mask_dev ? (const uint8_t *)e->pos_mask_dev + pos0 : NULL;
        LP_CHECK(lp_edit_apply(c, act, v, e->spec.kind, src, e->spec.coef, mask, e->head_mask_dev));
    }
    return LP_OK;
}

static lp_status site_whole(lp_model *m, int id, void *act);

/* Under tensor parallelism a split hook's site sees the whole activation (tp.c). */
lp_status hook_site(lp_model *m, int id, void *act) {
    if (id < 0) return LP_OK; /* absent hook */
    hook *h = &m->hooks[id];
    int capture = h->capture && !m->kv.generating; /* generation edits but captures nothing */
    if (!capture && !h->edits && !h->score) return LP_OK;
    if (m->par.tp <= 1) return site_whole(m, id, act);
    void *whole;
    LP_CHECK(tp_gather_hook(m, h->kind, act, &whole));
    LP_CHECK(site_whole(m, id, whole));
    return h->edits ? tp_scatter_hook(m, h->kind, act, whole) : LP_OK;
}

static lp_status site_whole(lp_model *m, int id, void *act) {
    hook *h = &m->hooks[id];
    int capture = h->capture && !m->kv.generating;
    lp_ctx *c = &m->ctx;
    int B = m->res.B, T = m->res.T;
    lp_view v = view_of(h, B, T);
    size_t n = (size_t)v.B * v.P * v.H * v.E;
    LP_CHECK(run_edits(m, h, id, act, v, n));
    if (h->score) LP_CHECK(score_forward_site(m, id, act));
    if (!capture) return LP_OK;
    size_t bytes;
    if (h->cap_pos) {
        for (int i = 0; i < h->cap_npos; i++)
            if (h->cap_pos[i] >= T)
                LP_FAIL(LP_ERR_ARG, "capture of %s: position %d is outside this batch's %d positions", h->name, h->cap_pos[i], T);
        bytes = n / v.P * h->cap_npos * act_elem_bytes(m);
        void *dst = c->device == LP_CUDA ? h->cap_dev : h->cap_host;
        LP_CHECK(lp_gather_pos(c, dst, act, v, h->cap_pos_dev, h->cap_npos));
    } else {
        bytes = n * act_elem_bytes(m);
        if (c->device == LP_CUDA) LP_CHECK(lp_ctx_copy(c, h->cap_dev, act, bytes));
        else memcpy(h->cap_host, act, bytes);
    }
    if (c->device == LP_CUDA) LP_CHECK(lp_ctx_to_host_async(c, h->cap_host, h->cap_dev, bytes));
    return LP_OK;
}

lp_status hook_edit_jacobian(lp_model *m, int id, void *grad, int *unknown) {
    hook *h = &m->hooks[id];
    lp_view v = view_of(h, m->res.B, m->res.T);
    /* masks commute: the order of the edits does not matter */
    for (edit *e = h->edits; e; e = e->next) {
        int stop = e->spec.kind != LP_EDIT_ADD;
        if (e->spec.fn) {
            if (e->spec.grad == LP_EDIT_GRAD_UNKNOWN) *unknown = 1;
            stop = e->spec.grad == LP_EDIT_GRAD_STOP;
        }
        if (stop) LP_CHECK(lp_edit_apply(&m->ctx, grad, v, LP_EDIT_ZERO, NULL, 0.0f, e->pos_mask_dev, e->head_mask_dev));
    }
    return LP_OK;
}

size_t hook_capture_bytes(const lp_model *m, int id) { return m->hooks[id].cap_dev ? m->hooks[id].cap_bytes_max : 0; }

int lp_hook_is_captured(const lp_model *m, int id) { return id >= 0 && id < m->n_hooks && m->hooks[id].capture; }
int lp_hook_is_edited(const lp_model *m, int id) { return id >= 0 && id < m->n_hooks && m->hooks[id].edits; }

int hooks_want_full_logits(const lp_model *m) { return hook_active(m, hook_id(m, HK_UNEMBED_OUT, m->cfg.n_layers)); }

lp_status hooks_finish(lp_model *m) { return lp_ctx_sync(&m->ctx); }

lp_status lp_capture_get(lp_model *m, const char *name, lp_tensor *out) {
    int id = lp_hook_find(m, name);
    if (id < 0) LP_FAIL(LP_ERR_NOT_FOUND, "unknown hook '%s'", name);
    hook *h = &m->hooks[id];
    if (!h->capture || !h->cap_host || m->res.B == 0) LP_FAIL(LP_ERR_NOT_FOUND, "hook '%s' was not captured in the last forward", name);
    memset(out, 0, sizeof *out);
    out->data = h->cap_host;
    out->dtype = m->ctx.dtype;
    out->device = LP_CPU;
    out->ndim = shape_of(h, m->res.B, h->cap_pos ? h->cap_npos : m->res.T, m->res.T, out->shape);
    return LP_OK;
}

lp_status lp_capture_read_f32(lp_model *m, const char *name, float *dst, size_t n) {
    lp_tensor t;
    LP_CHECK(lp_capture_get(m, name, &t));
    size_t have = (size_t)lp_shape_numel(t.shape, t.ndim);
    if (n != have) LP_FAIL(LP_ERR_SHAPE, "capture of %s has %zu values, asked for %zu", name, have, n);
    return lp_convert_host(dst, LP_F32, t.data, t.dtype, n);
}

/* ---- node scores fused into the backward (score.h) ----
 * The forward site copies the activation into a buffer the hook keeps; the backward site,
 * where the gradient at the hook is produced, forms per node the sum of (reference -
 * current) * gradient (lp_diff_dot_rows) into the model's score buffer. The gradient is
 * neither kept nor copied out, and nothing crosses to the host until score_fetch. */

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
    mdl_score *g = &m->sc;
    size_t total = 0;
    for (int id = 0; id < m->n_hooks; id++) {
        hook *h = &m->hooks[id];
        h->score = phase != SCORE_OFF && h->s_mark;
        if (!h->score) continue;
        LP_CHECK(score_buffers_for(m, h, id, B, T, phase == SCORE_KEEP_REF));
        h->s_off = total;
        total += numel_of(m, id, B, T) / h->s_per;
    }
    g->phase = phase, g->n = total, g->B = B, g->T = T;
    m->any_hook_dirty = 1;
    if (phase != SCORE_RUN) return LP_OK;
    size_t bytes = total * sizeof(float);
    if (bytes > g->out_bytes || !g->out) {
        lp_ctx_release(&m->ctx, g->out);
        g->out = NULL, g->out_bytes = 0;
        LP_CHECK(lp_ctx_alloc(&m->ctx, bytes ? bytes : sizeof(float), (void **)&g->out));
        g->out_bytes = bytes;
    }
    return lp_ctx_memset0(&m->ctx, g->out, bytes);
}

/* A shared prefix (mdl_pfx): the reference's positions p0 .. of hook id's activation act
 * ([B, T, ...], or [B, H, T, T] rows of keys per head) into dst, rows [B, (H,) T - p0, ...]. */
static lp_status keep_suffix(lp_model *m, int id, const void *act, void *dst) {
    int B = m->res.B, T = m->res.T, p0 = m->pfx.p0, Ts = T - p0;
    if (B != m->pfx.B || T != m->pfx.T)
        LP_FAIL(LP_ERR_INTERNAL, "prefix sharing: a reference run of %d x %d, prepared for %d x %d", B, T, m->pfx.B, m->pfx.T);
    size_t outer = m->hooks[id].head_outer ? (size_t)B * m->hooks[id].H : (size_t)B;
    size_t inner = numel_of(m, id, B, T) / outer / T * act_elem_bytes(m); /* bytes per position */
    for (size_t o = 0; o < outer; o++)
        LP_CHECK(lp_ctx_copy(&m->ctx, (char *)dst + o * Ts * inner, (const char *)act + (o * T + p0) * inner, Ts * inner));
    return LP_OK;
}

lp_status score_forward_site(lp_model *m, int id, const void *act) {
    hook *h = &m->hooks[id];
    int ph = m->sc.phase;
    if (ph == SCORE_OFF) return LP_OK;
    size_t bytes = numel_of(m, id, m->res.B, m->res.T) * act_elem_bytes(m);
    if (bytes > h->s_bytes) LP_FAIL(LP_ERR_ARG, "score of %s: this batch is larger than the one it was prepared for", h->name);
    /* a shared prefix scores its suffix alone: the reference keeps the positions p0 .. */
    if (ph == SCORE_KEEP_REF && m->pfx.keep) return keep_suffix(m, id, act, h->s_ref);
    return lp_ctx_copy(&m->ctx, ph == SCORE_KEEP_REF ? h->s_ref : h->s_cur, act, bytes);
}

lp_status score_grad_site(lp_model *m, int id, const void *grad) {
    const mdl_score *g = &m->sc;
    hook *h = &m->hooks[id];
    if (g->phase != SCORE_RUN) return LP_OK;
    size_t rows = numel_of(m, id, g->B, g->T) / h->s_per;
    return lp_diff_dot_rows(&m->ctx, g->out + h->s_off, h->s_ref, h->s_cur, grad, rows, h->s_per);
}

lp_status score_fetch(lp_model *m) {
    mdl_score *g = &m->sc;
    if (g->phase != SCORE_RUN || !g->out) LP_FAIL(LP_ERR_NOT_FOUND, "score: no scored backward has run");
    size_t bytes = g->n * sizeof(float);
    if (bytes > g->host_bytes || !g->host) {
        lp_ctx_release_host(&m->ctx, g->host);
        g->host = NULL, g->host_bytes = 0;
        LP_CHECK(lp_ctx_alloc_host(&m->ctx, bytes ? bytes : sizeof(float), (void **)&g->host));
        g->host_bytes = bytes;
    }
    LP_CHECK(lp_ctx_to_host_async(&m->ctx, g->host, g->out, bytes));
    return lp_ctx_sync(&m->ctx);
}

const float *score_values(const lp_model *m, const char *name, size_t *n) {
    int id = lp_hook_find(m, name);
    const mdl_score *g = &m->sc;
    if (id < 0 || !g->host || !m->hooks[id].score) return NULL;
    const hook *h = &m->hooks[id];
    *n = numel_of(m, id, g->B, g->T) / h->s_per;
    return g->host + h->s_off;
}

void score_buffers(const lp_model *m, const char *name, void **ref, void **cur) {
    int id = lp_hook_find(m, name);
    *ref = id >= 0 ? m->hooks[id].s_ref : NULL;
    *cur = id >= 0 ? m->hooks[id].s_cur : NULL;
}

void score_end(lp_model *m) {
    for (int id = 0; id < m->n_hooks; id++) m->hooks[id].s_mark = m->hooks[id].score = 0;
    m->sc.phase = SCORE_OFF;
    m->pfx.p0 = m->pfx.keep = m->pfx.on = 0;
    m->any_hook_dirty = 1;
}

void score_free(lp_model *m) {
    for (int id = 0; m->hooks && id < m->n_hooks; id++) {
        hook *h = &m->hooks[id];
        lp_ctx_release(&m->ctx, h->s_ref);
        lp_ctx_release(&m->ctx, h->s_cur);
        h->s_ref = h->s_cur = NULL, h->s_bytes = 0;
    }
    lp_ctx_release(&m->ctx, m->sc.out);
    lp_ctx_release_host(&m->ctx, m->sc.host);
    memset(&m->sc, 0, sizeof m->sc);
    lp_ctx_release(&m->ctx, m->pfx.mem);
    memset(&m->pfx, 0, sizeof m->pfx);
}
