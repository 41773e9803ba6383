/* weights.c: the weight table every family shares and the one streaming loader (weights.h).
 *
 * The loader first checks every tensor the config implies against the checkpoint (present,
 * the config's shape, the layer count the checkpoint's), so that nothing is sized from a
 * config the files contradict; then it converts the tensors one at a time into the weight
 * allocation. llama.cpp's converter permutes the rows of Q and K of "llama" models for its
 * interleaved rotary form; the loader undoes that, so that hook_q/hook_k and the rotary are
 * Hugging Face's rotate-half form everywhere. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "loupe/ops.h"
#include "loupe/safetensors.h"
#include "model/weights.h"
#include "ops/ops_internal.h"

static const char *const g_role_names[W_PER_LAYER] = {
    [W_LN1] = "ln1.w",         [W_LN1_B] = "ln1.b",      [W_Q] = "attn.W_Q",       [W_K] = "attn.W_K",
    [W_V] = "attn.W_V",        [W_BQ] = "attn.b_Q",      [W_BK] = "attn.b_K",      [W_BV] = "attn.b_V",
    [W_QN] = "attn.q_norm.w",  [W_KN] = "attn.k_norm.w", [W_O] = "attn.W_O",       [W_BO] = "attn.b_O",
    [W_LN1P] = "ln1_post.w",   [W_LN2] = "ln2.w",        [W_LN2_B] = "ln2.b",      [W_GATE] = "mlp.W_gate",
    [W_IN] = "mlp.W_in",       [W_BIN] = "mlp.b_in",     [W_OUT] = "mlp.W_out",    [W_BOUT] = "mlp.b_out",
    [W_LN2P] = "ln2_post.w",
};

static int is_norm(int r) { return r == W_LN1 || r == W_LN2 || r == W_LN1P || r == W_LN2P || r == W_QN || r == W_KN; }

void weights_role_shape(const lp_config *c, int trans, int r, int64_t *rows, int64_t *cols) {
    int64_t D = c->d_model, F = c->d_mlp, qD = (int64_t)c->n_heads * c->d_head, kvD = (int64_t)c->n_kv_heads * c->d_head;
    int64_t out = 0, in = 0, vec = 0; /* a linear layer [out, in], or a vector */
    int ln = c->norm == LP_NORM_LAYER, gated = c->mlp != LP_MLP_GELU, qkvb = c->qkv_bias || c->linear_bias;
    switch (r) {
    case W_LN1: case W_LN2: vec = D; break;
    case W_LN1_B: case W_LN2_B: vec = ln ? D : 0; break;
    case W_Q: out = qD, in = D; break;
    case W_K: case W_V: out = kvD, in = D; break;
    case W_BQ: vec = qkvb ? qD : 0; break;
    case W_BK: case W_BV: vec = qkvb ? kvD : 0; break;
    case W_QN: case W_KN: vec = c->qk_norm ? c->d_head : 0; break;
    case W_O: out = D, in = qD; break;
    case W_BO: case W_BOUT: vec = c->linear_bias ? D : 0; break;
    case W_LN1P: case W_LN2P: vec = c->post_norms ? D : 0; break;
    case W_GATE: out = gated ? F : 0, in = gated ? D : 0; break;
    case W_IN: out = F, in = D; break;
    case W_BIN: vec = c->linear_bias ? F : 0; break;
    case W_OUT: out = D, in = F; break;
    }
    if (!out) *rows = vec, *cols = 0;
    else *rows = trans ? out : in, *cols = trans ? in : out;
}

static void add(mdl_weights *w, const char *name, int64_t rows, int64_t cols, size_t *off) {
    param *p = &w->params[w->n++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = cols ? 2 : 1;
    p->shape[0] = rows, p->shape[1] = cols;
    p->offset = *off;
    *off += (size_t)(rows * (cols ? cols : 1) + 31) / 32 * 32; /* keep every tensor 128-byte aligned in f32 */
}

/* This rank's part of role r's [rows, cols] (tensor parallelism; the whole at TP 1). */
static void local_shape(const lp_model *m, int r, int64_t *rows, int64_t *cols) {
    int64_t s, n;
    int cut = tp_role_cut(m, r, &s, &n);
    if (!cut || !*rows) return;
    /* the output axis is the rows in the [out, in] layout (and of a vector), else the columns */
    int on_rows = !*cols || (cut == 1) == (m->w.trans != 0);
    *(on_rows ? rows : cols) = n;
}

lp_status weights_alloc(lp_model *m, int own_unembed) {
    const lp_config *c = &m->cfg;
    mdl_weights *w = &m->w;
    int D = c->d_model, gpt2_names = c->pos == LP_POS_LEARNED;
    LP_CHECK(tp_setup(m));
    int64_t full_params = 0; /* what the whole model holds, whatever this rank's slice */
    w->params = calloc(5 + (size_t)c->n_layers * W_PER_LAYER, sizeof *w->params);
    if (!w->params) LP_FAIL(LP_ERR_OOM, "out of memory for the weight table");
    size_t off = 0;
    w->n = 0;
    w->embed = w->n;
    add(w, gpt2_names ? "wte" : "embed", c->d_vocab, D, &off);
    w->pos_embed = c->pos == LP_POS_LEARNED ? w->n : -1;
    if (w->pos_embed >= 0) add(w, "wpe", c->n_ctx, D, &off);
    w->first_layer = w->n;
    char nm[96];
    for (int L = 0; L < c->n_layers; L++)
        for (int r = 0; r < W_PER_LAYER; r++) {
            int64_t rows, cols;
            weights_role_shape(c, w->trans, r, &rows, &cols);
            full_params += rows * (cols ? cols : 1);
            local_shape(m, r, &rows, &cols);
            snprintf(nm, sizeof nm, "blocks.%d.%s", L, g_role_names[r]);
            add(w, nm, rows, cols, &off);
        }
    w->lnf_w = w->n;
    add(w, "ln_final.w", D, 0, &off);
    w->lnf_b = c->norm == LP_NORM_LAYER ? w->n : -1;
    if (w->lnf_b >= 0) add(w, "ln_final.b", D, 0, &off);
    w->unembed = w->embed; /* tied: the embedding, used transposed */
    if (own_unembed) {
        w->unembed = w->n;
        add(w, "unembed", m->par.V, D, &off);
        full_params += (int64_t)(c->d_vocab - m->par.V) * D;
    }
    w->n_params = full_params;
    for (int i = 0; i < w->n; i++)
        if (i < w->first_layer || i >= w->first_layer + c->n_layers * W_PER_LAYER)
            w->n_params += w->params[i].shape[0] * (w->params[i].ndim == 2 ? w->params[i].shape[1] : 1);
    w->bytes = off * act_elem_bytes(m);
    return lp_ctx_alloc(&m->ctx, w->bytes, &w->mem);
}

void weights_free(lp_model *m) {
    lp_ctx_release(&m->ctx, m->w.mem);
    free(m->w.params);
    m->w.mem = NULL, m->w.params = NULL, m->w.n = 0;
}

/* ---- one tensor into its param ---- */

/* A checkpoint tensor: safetensors (gtype < 0, dtype) or GGUF (gtype = ggml type). */
typedef struct src_tensor {
    const char *file, *name;
    const void *data;
    int gtype;
    lp_dtype dtype;
    int64_t rows, cols; /* as the model uses it; vectors are [n, 1] */
} src_tensor;

typedef struct loader {
    lp_model *m;
    const tensor_names *nm;
    const lp_st_set *st;   /* a Hugging Face directory ... */
    const lp_gguf *gg;     /* ... or a GGUF file */
    const char *prefix;    /* Hugging Face: the prefix the tensors carry */
    const char *path, *cfg; /* the checkpoint, and the file its config came from */
    void *dev_stage;       /* device buffer for raw GGUF bytes (CUDA) */
    size_t dev_stage_bytes;
    int role;              /* the role being loaded (W_*, LP_TP_UNEMBED, or -1: model-level, whole) */
} loader;

/* llama.cpp stores Q and K rows of head h as pairs (i, i + d/2) interleaved: row
 * h*d + 2i + j holds Hugging Face row h*d + j*d/2 + i. */
static void unpermute_rows(char *dst, const char *src, int64_t rows, size_t row_bytes, int d_head) {
    int half = d_head / 2;
    for (int64_t h0 = 0; h0 < rows; h0 += d_head)
        for (int j = 0; j < 2; j++)
            for (int i = 0; i < half; i++)
                memcpy(dst + (size_t)(h0 + j * half + i) * row_bytes, src + (size_t)(h0 + 2 * i + j) * row_bytes, row_bytes);
}

/* GGUF blocks into dst: dequantized on the CPU, or raw to the device and dequantized there. */
static lp_status put_gguf(loader *ld, void *dst, const void *raw, size_t bytes, int gtype, int64_t n) {
    lp_ctx *c = &ld->m->ctx;
    if (c->device == LP_CPU) return lp_dequant(c, dst, LP_F32, raw, gtype, n);
    if (bytes > ld->dev_stage_bytes) {
        lp_ctx_release(c, ld->dev_stage);
        ld->dev_stage = NULL, ld->dev_stage_bytes = 0;
        LP_CHECK(lp_ctx_alloc(c, bytes, &ld->dev_stage));
        ld->dev_stage_bytes = bytes;
    }
    LP_CHECK(lp_ctx_to_device(c, ld->dev_stage, raw, bytes));
    return lp_dequant(c, dst, c->dtype, ld->dev_stage, gtype, n);
}

/* Float tensor values (F32/F16/BF16) into dst in the context's dtype, plus one when asked. */
static lp_status put_float(lp_model *m, void *dst, const void *raw, lp_dtype dtype, int64_t n, int plus_one) {
    lp_ctx *c = &m->ctx;
    if (c->device == LP_CPU && !plus_one) return lp_convert_host(dst, LP_F32, raw, dtype, (size_t)n);
    float *f = malloc((size_t)n * sizeof(float));
    if (!f) LP_FAIL(LP_ERR_OOM, "out of host memory for a %lld-value tensor", (long long)n);
    lp_status st = lp_convert_host(f, LP_F32, raw, dtype, (size_t)n);
    for (int64_t i = 0; plus_one && i < n; i++) f[i] += 1.0f;
    if (st == LP_OK) st = lp_ctx_upload_f32(c, dst, f, (size_t)n);
    free(f);
    return st;
}

/* Tensor parallelism: s cut to this rank's part of the role being loaded, in place. Rows
 * (the output axis of [out, in], vectors, the unembedding's vocabulary) are a pointer into
 * the mapped file, so only this rank's rows are read; for GGUF these are whole quant blocks.
 * Columns are copied out row by row (float tensors) or, for GGUF, the tensor's rows are
 * dequantized on the host first and cut as F32. *owned is what to free afterwards. */
static lp_status cut_src(loader *ld, src_tensor *s, void **owned) {
    lp_model *m = ld->m;
    int64_t start, n;
    int cut = ld->role == -1 ? 0 : tp_role_cut(m, ld->role, &start, &n);
    *owned = NULL;
    if (!cut) return LP_OK;
    int on_rows = s->cols == 1 || ld->role == LP_TP_UNEMBED || (cut == 1) == (m->w.trans != 0);
    int64_t extent = on_rows ? s->rows : s->cols;
    if (start + n > extent)
        LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has %lld along its split axis, too few for this rank's part", s->file, s->name,
                (long long)extent);
    if (on_rows) {
        size_t row_bytes = s->gtype >= 0 ? lp_ggml_bytes(s->gtype, s->cols) : (size_t)s->cols * lp_dtype_size(s->dtype);
        s->data = (const char *)s->data + (size_t)start * row_bytes;
        s->rows = n;
        return LP_OK;
    }
    size_t es = s->gtype >= 0 ? sizeof(float) : lp_dtype_size(s->dtype);
    const char *src = s->data;
    float *deq = NULL;
    if (s->gtype >= 0) { /* quant blocks run along the rows: dequantize them whole, then cut */
        lp_ctx cpu;
        LP_CHECK(lp_ctx_init(&cpu, LP_CPU, LP_F32));
        if (!(deq = malloc((size_t)s->rows * s->cols * sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of host memory for tensor '%s'", s->name);
        lp_status st = lp_dequant(&cpu, deq, LP_F32, s->data, s->gtype, s->rows * s->cols);
        lp_ctx_free(&cpu);
        if (st != LP_OK) return free(deq), st;
        src = (const char *)deq, s->gtype = -1, s->dtype = LP_F32;
    }
    char *out = malloc((size_t)s->rows * n * es);
    if (!out) return free(deq), LP_ERR(LP_ERR_OOM, "out of host memory for tensor '%s'", s->name);
    for (int64_t i = 0; i < s->rows; i++) memcpy(out + (size_t)i * n * es, src + ((size_t)i * s->cols + start) * es, n * es);
    free(deq);
    s->data = out, s->cols = n, *owned = out;
    return LP_OK;
}

/* src (this rank's part) into param idx, in the context's dtype. */
static lp_status put_cut(loader *ld, int idx, const src_tensor *s, int unpermute, int plus_one) {
    lp_model *m = ld->m;
    const param *p = &m->w.params[idx];
    int64_t pr = p->shape[0], pc = p->ndim == 2 ? p->shape[1] : 1;
    if (s->rows != pr || s->cols != pc) {
        char got[64], exp[64];
        int64_t g[2] = {s->rows, s->cols}, e[2] = {pr, pc};
        LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has shape %s but the config needs %s", s->file, s->name,
                lp_shape_str(g, s->cols > 1 || pc > 1 ? 2 : 1, got, sizeof got), lp_shape_str(e, pc > 1 ? 2 : 1, exp, sizeof exp));
    }
    if (s->gtype >= 0 && !lp_ggml_supported(s->gtype))
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has type %s, which loupe cannot dequantize (supported: " LP_GGML_SUPPORTED_LIST ")",
                s->file, s->name, lp_ggml_type_name(s->gtype));
    size_t row_bytes = s->gtype >= 0 ? lp_ggml_bytes(s->gtype, s->cols) : (size_t)s->cols * lp_dtype_size(s->dtype);
    if (!row_bytes) LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s': rows of %lld values do not fill whole %s blocks", s->file, s->name,
                            (long long)s->cols, lp_ggml_type_name(s->gtype));
    size_t bytes = row_bytes * (size_t)s->rows;
    const void *raw = s->data;
    char *perm = NULL;
    if (unpermute) {
        if (!(perm = malloc(bytes))) LP_FAIL(LP_ERR_OOM, "out of host memory for tensor '%s'", s->name);
        unpermute_rows(perm, s->data, s->rows, row_bytes, m->cfg.d_head);
        raw = perm;
    }
    lp_status st = s->gtype >= 0 ? put_gguf(ld, param_ptr(m, idx), raw, bytes, s->gtype, pr * pc)
                                 : put_float(m, param_ptr(m, idx), raw, s->dtype, pr * pc, plus_one);
    free(perm);
    return st;
}

/* Converts (and for GGUF dequantizes) src into param idx, in the context's dtype: this rank's
 * part of it under tensor parallelism. */
static lp_status put_param(loader *ld, int idx, const src_tensor *s0, int unpermute, int plus_one) {
    src_tensor cut = *s0;
    void *owned;
    LP_CHECK(cut_src(ld, &cut, &owned));
    lp_status st = put_cut(ld, idx, &cut, unpermute, plus_one);
    free(owned);
    return st;
}

/* ---- the checkpoint against the config ---- */

/* Dimensions of tensor `name` as stored ([out, in] for GGUF; a vector is [n, 1]) and the file
 * holding it; -1 when absent. */
static int ckpt_shape(const loader *ld, const char *name, int64_t *rows, int64_t *cols, const char **file) {
    *file = ld->path;
    if (ld->gg) {
        const lp_gguf_tensor *t = lp_gguf_find_tensor(ld->gg, name);
        if (!t) return -1;
        *rows = t->n_dims >= 2 ? t->ne[1] : t->ne[0], *cols = t->n_dims >= 2 ? t->ne[0] : 1;
        return t->n_dims;
    }
    const lp_st_file *f;
    const lp_st_tensor *t = lp_st_set_find(ld->st, name, &f);
    if (!t) return -1;
    *file = f->path;
    *rows = t->ndim >= 1 ? t->shape[0] : 1, *cols = t->ndim >= 2 ? t->shape[1] : 1;
    return t->ndim;
}

static lp_status expect_tensor(const loader *ld, const char *name, int64_t rows, int64_t cols, const char *keys) {
    int64_t r, c;
    const char *file;
    int nd = ckpt_shape(ld, name, &r, &c, &file);
    if (nd < 0) LP_FAIL(LP_ERR_NOT_FOUND, "%s: tensor '%s' is missing from the checkpoint", ld->path, name);
    const lp_gguf_tensor *gt = ld->gg ? lp_gguf_find_tensor(ld->gg, name) : NULL;
    if (gt && !lp_ggml_supported(gt->type))
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has type %s, which loupe cannot dequantize (supported: " LP_GGML_SUPPORTED_LIST ")",
                file, name, lp_ggml_type_name(gt->type));
    if (nd > 2 || r != rows || c != (cols ? cols : 1) || (!cols && nd != 1)) {
        char got[64], exp[64];
        int64_t g[2] = {r, c}, e[2] = {rows, cols};
        LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has shape %s but the config needs %s (%s: %s)", file, name,
                lp_shape_str(g, nd > 2 ? 2 : nd, got, sizeof got), lp_shape_str(e, cols ? 2 : 1, exp, sizeof exp), ld->cfg, keys);
    }
    return LP_OK;
}

/* The checkpoint's name of layer L's role r (NULL: this family has none), and the shape the
 * whole stored tensor must have (a split role's tensor holds all three parts). */
static const char *role_tensor(const loader *ld, int L, int r, char *buf, size_t n, int64_t *rows, int64_t *cols) {
    const tensor_names *nm = ld->nm;
    const char *suffix = ld->gg ? nm->gg[r] : nm->hf[r];
    weights_role_shape(&ld->m->cfg, ld->m->w.trans, r, rows, cols);
    if (!suffix || !*rows) return NULL;
    if (!ld->gg && nm->hf_split[r]) *(*cols ? cols : rows) *= 3;
    int k = snprintf(buf, n, "%s", ld->gg ? "blk." : ld->prefix);
    k += snprintf(buf + k, n - k, ld->gg ? "%d." : nm->hf_layer, L);
    snprintf(buf + k, n - k, "%s", suffix);
    return buf;
}

static const char *model_tensor(const loader *ld, const char *hf, const char *gg, char *buf, size_t n) {
    if (ld->gg) return gg;
    if (!hf) return NULL;
    snprintf(buf, n, "%s%s", ld->prefix, hf);
    return buf;
}

static lp_status check_layer_count(const loader *ld) {
    const lp_config *c = &ld->m->cfg;
    char nm[200], key[120];
    int64_t r, cl;
    const char *file;
    if (ld->gg) snprintf(key, sizeof key, "metadata key '%s.block_count'", c->name);
    else snprintf(key, sizeof key, "\"%s\"", ld->nm->hf_layers_key);
    role_tensor(ld, c->n_layers - 1, W_LN1, nm, sizeof nm, &r, &cl);
    if (ckpt_shape(ld, nm, &r, &cl, &file) < 0)
        LP_FAIL(LP_ERR_SHAPE, "%s: %s = %d, but the checkpoint has no tensor '%s'", ld->cfg, key, c->n_layers, nm);
    role_tensor(ld, c->n_layers, W_LN1, nm, sizeof nm, &r, &cl);
    if (ckpt_shape(ld, nm, &r, &cl, &file) >= 0)
        LP_FAIL(LP_ERR_SHAPE, "%s: %s = %d, but the checkpoint has more layers ('%s')", ld->cfg, key, c->n_layers, nm);
    return LP_OK;
}

/* Every tensor the config implies exists with the config's shape, and the layer count is
 * the checkpoint's, so that what is sized from the config is what the files hold. */
static lp_status check_checkpoint(const loader *ld, int own_unembed) {
    const lp_config *c = &ld->m->cfg;
    const tensor_names *nm = ld->nm;
    int gg = ld->gg != NULL;
    char buf[200];
    const char *vkeys = gg ? "vocab_size, embedding_length" : nm->hf_vocab_keys, *dkey = gg ? "embedding_length" : nm->hf_d_key;
    LP_CHECK(expect_tensor(ld, model_tensor(ld, nm->hf_embed, nm->gg_embed, buf, sizeof buf), c->d_vocab, c->d_model, vkeys));
    if (c->pos == LP_POS_LEARNED)
        LP_CHECK(expect_tensor(ld, model_tensor(ld, nm->hf_pos, NULL, buf, sizeof buf), c->n_ctx, c->d_model, nm->hf_d_key));
    LP_CHECK(check_layer_count(ld));
    for (int L = 0; L < c->n_layers; L++)
        for (int r = 0; r < W_PER_LAYER; r++) {
            int64_t rows, cols;
            const char *t = role_tensor(ld, L, r, buf, sizeof buf, &rows, &cols);
            if (t) LP_CHECK(expect_tensor(ld, t, rows, cols, gg ? nm->gg_keys[r] : nm->hf_keys[r]));
        }
    LP_CHECK(expect_tensor(ld, model_tensor(ld, nm->hf_lnf_w, nm->gg_lnf_w, buf, sizeof buf), c->d_model, 0, dkey));
    if (c->norm == LP_NORM_LAYER) LP_CHECK(expect_tensor(ld, model_tensor(ld, nm->hf_lnf_b, NULL, buf, sizeof buf), c->d_model, 0, dkey));
    if (!own_unembed) return LP_OK;
    const char *u = gg ? nm->gg_unembed : nm->hf_unembed;
    int64_t r, cl;
    const char *file;
    if (!gg && ckpt_shape(ld, u, &r, &cl, &file) < 0) /* transformers would start it at random */
        LP_FAIL(LP_ERR_NOT_FOUND, "%s: \"tie_word_embeddings\" is false, but the checkpoint has no '%s'", ld->cfg, u);
    return expect_tensor(ld, u, c->d_vocab, c->d_model, vkeys);
}

/* ---- loading ---- */

/* A split role: its third of the stored tensor, gathered into one block (rows x cols of
 * the model's layout; Conv1D's output axis is the columns). */
static void *gather_split(const lp_st_tensor *t, int part, int64_t rows, int64_t cols) {
    size_t es = lp_dtype_size(t->dtype), c = (size_t)(cols ? cols : 1), src_cols = cols ? 3 * c : 1;
    char *out = malloc((size_t)rows * c * es);
    if (!out) return NULL;
    for (int64_t i = 0; i < rows; i++) {
        size_t src = cols ? (size_t)i * src_cols + part * c : (size_t)part * rows + i; /* a vector: its third */
        memcpy(out + (size_t)i * c * es, (const char *)t->data + src * es, c * es);
    }
    return out;
}

static lp_status load_st(loader *ld, const char *name, int idx, int split, int plus_one) {
    const lp_st_file *file;
    const lp_st_tensor *t = lp_st_set_find(ld->st, name, &file);
    if (!t) LP_FAIL(LP_ERR_NOT_FOUND, "%s: tensor '%s' is missing from the checkpoint", ld->path, name);
    if (t->dtype != LP_F32 && t->dtype != LP_F16 && t->dtype != LP_BF16)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has dtype %s (expected F32, F16 or BF16)", file->path, name, lp_dtype_name(t->dtype));
    if (t->ndim < 1 || t->ndim > 2) LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has %d dimensions (expected 1 or 2)", file->path, name, t->ndim);
    src_tensor s = {.file = file->path, .name = name, .data = t->data, .gtype = -1, .dtype = t->dtype,
                    .rows = t->shape[0], .cols = t->ndim == 2 ? t->shape[1] : 1};
    void *part = NULL;
    if (split) { /* the role's whole third (the rank's part is cut from it after) */
        int64_t fr, fc;
        weights_role_shape(&ld->m->cfg, ld->m->w.trans, ld->role, &fr, &fc);
        if (!(part = gather_split(t, split - 1, fr, fc)))
            LP_FAIL(LP_ERR_OOM, "out of host memory for tensor '%s'", name);
        s.data = part, s.rows = fr, s.cols = fc ? fc : 1;
    }
    lp_status st = put_param(ld, idx, &s, 0, plus_one);
    free(part);
    return st;
}

static lp_status load_gg(loader *ld, const char *name, int idx, int unpermute) {
    const lp_gguf_tensor *t = lp_gguf_find_tensor(ld->gg, name);
    if (!t) LP_FAIL(LP_ERR_NOT_FOUND, "%s: tensor '%s' is missing from the GGUF file", ld->path, name);
    if (t->n_dims > 2) LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has %d dimensions (expected 1 or 2)", ld->path, name, t->n_dims);
    /* ggml's ne[0] is the contiguous (input) dimension */
    src_tensor s = {.file = ld->path, .name = name, .data = t->data, .gtype = t->type,
                    .rows = t->n_dims == 2 ? t->ne[1] : t->ne[0], .cols = t->n_dims == 2 ? t->ne[0] : 1};
    return put_param(ld, idx, &s, unpermute, 0);
}

static lp_status load_one(loader *ld, const char *name, int idx, int r) {
    /* the unembedding proper (not the tied embedding) is cut by vocabulary */
    ld->role = r >= 0 ? r : idx == ld->m->w.unembed && idx != ld->m->w.embed ? LP_TP_UNEMBED : -1;
    if (ld->gg) {
        /* llama.cpp permutes Q/K of "llama" models only */
        int perm = strcmp(ld->m->cfg.name, "llama") == 0 && (r == W_Q || r == W_K || r == W_BQ || r == W_BK);
        return load_gg(ld, name, idx, perm);
    }
    int split = r >= 0 ? ld->nm->hf_split[r] : 0;
    int plus_one = ld->nm->hf_norm_plus_one && (r >= 0 ? is_norm(r) : idx == ld->m->w.lnf_w);
    return load_st(ld, name, idx, split, plus_one);
}

static lp_status load_all(loader *ld) {
    lp_model *m = ld->m;
    const lp_config *c = &m->cfg;
    const tensor_names *nm = ld->nm;
    const mdl_weights *w = &m->w;
    char buf[200];
    LP_CHECK(load_one(ld, model_tensor(ld, nm->hf_embed, nm->gg_embed, buf, sizeof buf), w->embed, -1));
    if (w->pos_embed >= 0) LP_CHECK(load_one(ld, model_tensor(ld, nm->hf_pos, NULL, buf, sizeof buf), w->pos_embed, -1));
    for (int L = 0; L < c->n_layers; L++)
        for (int r = 0; r < W_PER_LAYER; r++) {
            int64_t rows, cols;
            const char *t = role_tensor(ld, L, r, buf, sizeof buf, &rows, &cols);
            if (t) LP_CHECK(load_one(ld, t, layer_weight_idx(m, L, r), r));
        }
    LP_CHECK(load_one(ld, model_tensor(ld, nm->hf_lnf_w, nm->gg_lnf_w, buf, sizeof buf), w->lnf_w, -1));
    if (w->lnf_b >= 0) LP_CHECK(load_one(ld, model_tensor(ld, nm->hf_lnf_b, NULL, buf, sizeof buf), w->lnf_b, -1));
    if (w->unembed != w->embed) LP_CHECK(load_one(ld, ld->gg ? nm->gg_unembed : nm->hf_unembed, w->unembed, -1));
    /* the dequant kernels run asynchronously: a fault in one is reported here, as a failed load */
    return lp_ctx_sync(&m->ctx);
}

lp_status weights_load_hf(lp_model *m, const tensor_names *nm, const char *dir, const char *cfg_path) {
    lp_st_set set;
    LP_CHECK(lp_st_set_open(&set, dir));
    loader ld = {.m = m, .nm = nm, .st = &set, .path = dir, .cfg = cfg_path, .prefix = ""};
    for (int i = 0; nm->hf_prefixes && nm->hf_prefixes[i]; i++) {
        char probe[200];
        snprintf(probe, sizeof probe, "%s%s", nm->hf_prefixes[i], nm->hf_embed);
        if (lp_st_set_find(&set, probe, NULL)) {
            ld.prefix = nm->hf_prefixes[i];
            break;
        }
    }
    lp_status st = check_checkpoint(&ld, !m->cfg.tied_unembed);
    if (st == LP_OK) st = weights_alloc(m, !m->cfg.tied_unembed);
    if (st == LP_OK) st = load_all(&ld);
    lp_st_set_close(&set);
    return st;
}

lp_status weights_load_gguf(lp_model *m, const tensor_names *nm, const lp_gguf *g) {
    if (!nm->gg_embed) LP_FAIL(LP_ERR_FORMAT, "%s: loupe reads %s models from Hugging Face directories only", lp_gguf_path(g), m->cfg.name);
    loader ld = {.m = m, .nm = nm, .gg = g, .path = lp_gguf_path(g), .cfg = lp_gguf_path(g)};
    lp_status st = check_checkpoint(&ld, !m->cfg.tied_unembed);
    if (st == LP_OK) st = weights_alloc(m, !m->cfg.tied_unembed);
    if (st == LP_OK) st = load_all(&ld);
    lp_ctx_release(&m->ctx, ld.dev_stage);
    return st;
}

lp_status weights_random(lp_model *m, uint64_t seed) {
    LP_CHECK(weights_alloc(m, 0));
    /* tensor by tensor, on the device for a CUDA model (an 8B model's weights never pass
     * through the host), else through one host buffer per tensor */
    uint64_t s = seed;
    for (int i = 0; i < m->w.n; i++) {
        const param *p = &m->w.params[i];
        size_t n = (size_t)p->shape[0] * (p->ndim == 2 ? p->shape[1] : 1);
        if (!n) continue;
        float base = p->ndim == 1 && strstr(p->name, ".w") ? 1.0f : 0.0f; /* norm weights near 1 */
        if (m->ctx.device == LP_CUDA) { /* the same values, generated where they live */
            LP_CHECK(cuda_init_weights(&m->ctx, param_ptr(m, i), n, s, base));
            s = rng_init_weight_skip(s, n);
            continue;
        }
        float *h = malloc(n * sizeof(float));
        if (!h) LP_FAIL(LP_ERR_OOM, "out of host memory for %s", p->name);
        for (size_t j = 0; j < n; j++) h[j] = base + rng_init_weight(&s);
        lp_status st = lp_ctx_upload_f32(&m->ctx, param_ptr(m, i), h, n);
        free(h);
        LP_CHECK(st);
    }
    return LP_OK;
}
