/* llama.c: the Llama family (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5): the weight
 * table, loading (safetensors in F32/F16/BF16, or GGUF dequantized at load) after checking
 * every tensor's shape against the config (llama_config.c), the rotary tables, and the
 * forward pass with a hook site at every TransformerLens point. The same forward appends
 * to a KV cache when generating (m->gen_pos0 >= 0).
 *
 * Weights keep the nn.Linear layout [out, in] (used with w_trans = 1), which is also the
 * row order of GGUF tensors. llama.cpp's converter permutes the rows of Q and K of
 * "llama" models for its interleaved rotary form; the loader undoes that, so that
 * hook_q/hook_k and the rotary are Hugging Face's rotate-half form everywhere. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/gguf.h"
#include "loupe/ops.h"
#include "loupe/safetensors.h"
#include "model/model_cfg.h"
#include "model/model_internal.h"
#include "ops/ops_internal.h"
#include "core/rng.h"

/* per-layer weights, in table order; biases have zero rows unless the model has them */
enum { P_LN1, P_WQ, P_WK, P_WV, P_BQ, P_BK, P_BV, P_WO, P_LN2, P_WG, P_WU, P_WD, P_PER_LAYER };
enum { P_EMBED, P_FIRST_LAYER }; /* then the layers, then ln_final and the unembedding */

static int p_layer(int L, int k) { return P_FIRST_LAYER + L * P_PER_LAYER + k; }
static int p_lnf(const lp_model *m) { return P_FIRST_LAYER + m->cfg.n_layers * P_PER_LAYER; }
#define LW(m, L, k) lp_param((m), p_layer((L), (k)))

static lp_status forward(lp_model *m, int B, int T, int want);

/* ---- the weight table ---- */

/* Shape of layer weight k: [rows, cols], cols 0 for a vector, rows 0 when absent. */
static void layer_shape(const lp_config *c, int k, int64_t *rows, int64_t *cols) {
    int64_t D = c->d_model, F = c->d_mlp, qD = (int64_t)c->n_heads * c->d_head, kvD = (int64_t)c->n_kv_heads * c->d_head;
    int64_t r = 0, cl = 0;
    switch (k) {
    case P_LN1: case P_LN2: r = D; break;
    case P_WQ: r = qD, cl = D; break;
    case P_WK: case P_WV: r = kvD, cl = D; break;
    case P_BQ: r = c->qkv_bias ? qD : 0; break;
    case P_BK: case P_BV: r = c->qkv_bias ? kvD : 0; break;
    case P_WO: r = D, cl = qD; break;
    case P_WG: case P_WU: r = F, cl = D; break;
    case P_WD: r = D, cl = F; break;
    }
    *rows = r, *cols = cl;
}

static size_t build_table(lp_model *m) {
    const lp_config *c = &m->cfg;
    int D = c->d_model;
    m->forward = forward;
    m->params = calloc(P_FIRST_LAYER + (size_t)c->n_layers * P_PER_LAYER + 2, sizeof *m->params);
    if (!m->params) return 0;
    size_t off = 0;
    char nm[96];
    lp_param_add(m, "embed", c->d_vocab, D, &off);
    static const char *const names[P_PER_LAYER] = {"ln1.w", "attn.W_Q", "attn.W_K", "attn.W_V", "attn.b_Q", "attn.b_K",
                                                   "attn.b_V", "attn.W_O", "ln2.w", "mlp.W_gate", "mlp.W_in", "mlp.W_out"};
    for (int L = 0; L < c->n_layers; L++)
        for (int k = 0; k < P_PER_LAYER; k++) {
            int64_t r, cols;
            layer_shape(c, k, &r, &cols);
            snprintf(nm, sizeof nm, "blocks.%d.%s", L, names[k]);
            lp_param_add(m, nm, r, cols, &off);
        }
    lp_param_add(m, "ln_final.w", D, 0, &off);
    m->unembed = P_EMBED; /* tied: the embedding, used transposed */
    if (!c->tied_unembed) {
        m->unembed = m->n_params_t;
        lp_param_add(m, "unembed", c->d_vocab, D, &off);
    }
    lp_param_count(m);
    return off;
}

static lp_status alloc_weights(lp_model *m) {
    size_t total = build_table(m);
    if (!total) LP_FAIL(LP_ERR_OOM, "out of memory for the weight table");
    m->weight_bytes = total * lp_act_size(m);
    return lp_ctx_alloc(&m->ctx, m->weight_bytes, &m->weights);
}

/* A checkpoint tensor: safetensors (gtype < 0, dtype) or GGUF (gtype = ggml type). */
typedef struct src_tensor {
    const char *file, *name;
    const void *data;
    int gtype;
    lp_dtype dtype;
    int64_t rows, cols; /* [out, in] as the model uses it; vectors are [n, 1] */
} src_tensor;

typedef struct loader {
    lp_model *m;
    void *dev_stage; /* device buffer for raw GGUF bytes (CUDA) */
    size_t dev_stage_bytes;
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

/* Converts (and for GGUF dequantizes) src into param idx, in the context's dtype. */
static lp_status put_param(loader *ld, int idx, const src_tensor *s, int unpermute) {
    lp_model *m = ld->m;
    lp_ctx *c = &m->ctx;
    const param *p = &m->params[idx];
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
    int64_t n = pr * pc;
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
    void *dst = lp_param(m, idx);
    lp_status st = LP_OK;
    if (c->device == LP_CPU) {
        st = s->gtype >= 0 ? lp_dequant(c, dst, LP_F32, raw, s->gtype, n) : lp_convert_host(dst, LP_F32, raw, s->dtype, (size_t)n);
    } else if (s->gtype >= 0) { /* raw blocks to the device, dequantized there by the CUDA kernel */
        if (bytes > ld->dev_stage_bytes) {
            lp_ctx_release(c, ld->dev_stage);
            ld->dev_stage = NULL, ld->dev_stage_bytes = 0;
            st = lp_ctx_alloc(c, bytes, &ld->dev_stage);
            if (st == LP_OK) ld->dev_stage_bytes = bytes;
        }
        if (st == LP_OK) st = lp_ctx_to_device(c, ld->dev_stage, raw, bytes);
        if (st == LP_OK) st = lp_dequant(c, dst, c->dtype, ld->dev_stage, s->gtype, n);
    } else {
        void *conv = malloc((size_t)n * lp_act_size(m));
        st = conv ? lp_convert_host(conv, c->dtype, raw, s->dtype, (size_t)n) : LP_ERR(LP_ERR_OOM, "out of host memory");
        if (st == LP_OK) st = lp_ctx_to_device(c, dst, conv, (size_t)n * lp_act_size(m));
        free(conv);
    }
    free(perm);
    return st;
}

/* Hugging Face names of param k of layer L (NULL: no such tensor). */
static const char *hf_name(int k) {
    static const char *const n[P_PER_LAYER] = {
        [P_LN1] = "input_layernorm.weight", [P_WQ] = "self_attn.q_proj.weight", [P_WK] = "self_attn.k_proj.weight",
        [P_WV] = "self_attn.v_proj.weight", [P_BQ] = "self_attn.q_proj.bias",   [P_BK] = "self_attn.k_proj.bias",
        [P_BV] = "self_attn.v_proj.bias",   [P_WO] = "self_attn.o_proj.weight", [P_LN2] = "post_attention_layernorm.weight",
        [P_WG] = "mlp.gate_proj.weight",    [P_WU] = "mlp.up_proj.weight",      [P_WD] = "mlp.down_proj.weight"};
    return n[k];
}

static const char *gguf_name(int k) {
    static const char *const n[P_PER_LAYER] = {
        [P_LN1] = "attn_norm.weight", [P_WQ] = "attn_q.weight", [P_WK] = "attn_k.weight",   [P_WV] = "attn_v.weight",
        [P_BQ] = "attn_q.bias",       [P_BK] = "attn_k.bias",   [P_BV] = "attn_v.bias",     [P_WO] = "attn_output.weight",
        [P_LN2] = "ffn_norm.weight",  [P_WG] = "ffn_gate.weight", [P_WU] = "ffn_up.weight", [P_WD] = "ffn_down.weight"};
    return n[k];
}

/* ---- the checkpoint against the config, before anything is sized ---- */

/* A checkpoint's tensors by name: a safetensors set or a GGUF file. */
typedef struct ckpt {
    const lp_st_set *st;
    const lp_gguf *gg;
    const char *path, *cfg; /* the checkpoint, and the file its config came from */
} ckpt;

/* Dimensions of tensor `name` as the model uses them ([out, in]; a vector is [n, 1]) and
 * the file holding it; -1 when absent. */
static int ckpt_shape(const ckpt *ck, const char *name, int64_t *rows, int64_t *cols, const char **file) {
    *file = ck->path;
    if (ck->gg) {
        const lp_gguf_tensor *t = lp_gguf_find_tensor(ck->gg, name);
        if (!t) return -1;
        *rows = t->n_dims >= 2 ? t->ne[1] : t->ne[0], *cols = t->n_dims >= 2 ? t->ne[0] : 1;
        return t->n_dims;
    }
    const lp_st_file *f;
    const lp_st_tensor *t = lp_st_set_find(ck->st, name, &f);
    if (!t) return -1;
    *file = f->path;
    *rows = t->ndim >= 1 ? t->shape[0] : 1, *cols = t->ndim >= 2 ? t->shape[1] : 1;
    return t->ndim;
}

/* The config keys behind each weight's [rows, cols] (Hugging Face; GGUF). */
static const char *shape_keys(int k, int gguf) {
    static const char *const hf[P_PER_LAYER] = {
        [P_LN1] = "hidden_size", [P_LN2] = "hidden_size",
        [P_WQ] = "num_attention_heads x head_dim, hidden_size", [P_BQ] = "num_attention_heads x head_dim",
        [P_WK] = "num_key_value_heads x head_dim, hidden_size", [P_WV] = "num_key_value_heads x head_dim, hidden_size",
        [P_BK] = "num_key_value_heads x head_dim", [P_BV] = "num_key_value_heads x head_dim",
        [P_WO] = "hidden_size, num_attention_heads x head_dim", [P_WG] = "intermediate_size, hidden_size",
        [P_WU] = "intermediate_size, hidden_size", [P_WD] = "hidden_size, intermediate_size"};
    static const char *const gg[P_PER_LAYER] = {
        [P_LN1] = "embedding_length", [P_LN2] = "embedding_length",
        [P_WQ] = "attention.head_count x attention.key_length, embedding_length", [P_BQ] = "attention.head_count x attention.key_length",
        [P_WK] = "attention.head_count_kv x attention.key_length, embedding_length",
        [P_WV] = "attention.head_count_kv x attention.key_length, embedding_length",
        [P_BK] = "attention.head_count_kv x attention.key_length", [P_BV] = "attention.head_count_kv x attention.key_length",
        [P_WO] = "embedding_length, attention.head_count x attention.key_length", [P_WG] = "feed_forward_length, embedding_length",
        [P_WU] = "feed_forward_length, embedding_length", [P_WD] = "embedding_length, feed_forward_length"};
    return gguf ? gg[k] : hf[k];
}

static lp_status expect_tensor(const ckpt *ck, const char *name, int64_t rows, int64_t cols, const char *keys) {
    int64_t r, c;
    const char *file;
    int nd = ckpt_shape(ck, name, &r, &c, &file);
    if (nd < 0) LP_FAIL(LP_ERR_NOT_FOUND, "%s: tensor '%s' is missing from the checkpoint", ck->path, name);
    const lp_gguf_tensor *gt = ck->gg ? lp_gguf_find_tensor(ck->gg, name) : NULL;
    if (gt && !lp_ggml_supported(gt->type))
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has type %s, which loupe cannot dequantize (supported: " LP_GGML_SUPPORTED_LIST ")",
                file, name, lp_ggml_type_name(gt->type));
    if (nd > 2 || r != rows || c != (cols ? cols : 1)) {
        char got[64], exp[64];
        int64_t g[2] = {r, c}, e[2] = {rows, cols};
        LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has shape %s but the config needs %s (%s: %s)", file, name,
                lp_shape_str(g, nd > 2 ? 2 : nd, got, sizeof got), lp_shape_str(e, cols ? 2 : 1, exp, sizeof exp), ck->cfg, keys);
    }
    return LP_OK;
}

/* Every tensor the config implies exists with the config's shape, and the layer count is
 * the checkpoint's, so that what is sized from the config is what the files hold. */
static lp_status check_checkpoint(const lp_model *m, const ckpt *ck) {
    const lp_config *c = &m->cfg;
    int gguf = ck->gg != NULL;
    const char *lpre = gguf ? "blk." : "model.layers.";
    char nm[160], key[96];
    const char *vkeys = gguf ? "vocab_size, embedding_length" : "vocab_size, hidden_size";
    LP_CHECK(expect_tensor(ck, gguf ? "token_embd.weight" : "model.embed_tokens.weight", c->d_vocab, c->d_model, vkeys));
    snprintf(key, sizeof key, gguf ? "metadata key '%s.block_count'" : "\"num_hidden_layers\"", c->name);
    const char *probe = gguf ? gguf_name(P_LN1) : hf_name(P_LN1);
    int64_t r, cl;
    const char *file;
    snprintf(nm, sizeof nm, "%s%d.%s", lpre, c->n_layers - 1, probe);
    if (ckpt_shape(ck, nm, &r, &cl, &file) < 0)
        LP_FAIL(LP_ERR_SHAPE, "%s: %s = %d, but the checkpoint has no tensor '%s'", ck->cfg, key, c->n_layers, nm);
    snprintf(nm, sizeof nm, "%s%d.%s", lpre, c->n_layers, probe);
    if (ckpt_shape(ck, nm, &r, &cl, &file) >= 0)
        LP_FAIL(LP_ERR_SHAPE, "%s: %s = %d, but the checkpoint has more layers ('%s')", ck->cfg, key, c->n_layers, nm);
    for (int L = 0; L < c->n_layers; L++)
        for (int k = 0; k < P_PER_LAYER; k++) {
            layer_shape(c, k, &r, &cl);
            if (!r) continue; /* no bias */
            snprintf(nm, sizeof nm, "%s%d.%s", lpre, L, gguf ? gguf_name(k) : hf_name(k));
            LP_CHECK(expect_tensor(ck, nm, r, cl, shape_keys(k, gguf)));
        }
    LP_CHECK(expect_tensor(ck, gguf ? "output_norm.weight" : "model.norm.weight", c->d_model, 0, gguf ? "embedding_length" : "hidden_size"));
    if (!c->tied_unembed && !gguf && ckpt_shape(ck, "lm_head.weight", &r, &cl, &file) < 0) /* transformers would start it at random */
        LP_FAIL(LP_ERR_NOT_FOUND, "%s: \"tie_word_embeddings\" is false, but the checkpoint has no 'lm_head.weight'", ck->cfg);
    if (!c->tied_unembed) LP_CHECK(expect_tensor(ck, gguf ? "output.weight" : "lm_head.weight", c->d_vocab, c->d_model, vkeys));
    return LP_OK;
}

static lp_status load_st(loader *ld, const lp_st_set *set, const char *name, int idx) {
    const lp_st_file *file;
    const lp_st_tensor *t = lp_st_set_find(set, name, &file);
    if (!t) LP_FAIL(LP_ERR_NOT_FOUND, "%s: tensor '%s' is missing from the checkpoint", ld->m->path, name);
    if (t->dtype != LP_F32 && t->dtype != LP_F16 && t->dtype != LP_BF16)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has dtype %s (expected F32, F16 or BF16)", file->path, name, lp_dtype_name(t->dtype));
    if (t->ndim < 1 || t->ndim > 2) LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has %d dimensions (expected 1 or 2)", file->path, name, t->ndim);
    src_tensor s = {.file = file->path, .name = name, .data = t->data, .gtype = -1, .dtype = t->dtype,
                    .rows = t->shape[0], .cols = t->ndim == 2 ? t->shape[1] : 1};
    return put_param(ld, idx, &s, 0);
}

static lp_status load_hf(lp_model *m, const char *dir) {
    LP_CHECK(lp_llama_read_hf_config(m, dir));
    lp_st_set set;
    LP_CHECK(lp_st_set_open(&set, dir));
    loader ld = {.m = m};
    char cfg[1200];
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    ckpt ck = {.st = &set, .path = dir, .cfg = cfg};
    lp_status st = check_checkpoint(m, &ck);
    if (st == LP_OK) st = alloc_weights(m);
    const lp_config *c = &m->cfg;
    char nm[160];
    if (st == LP_OK) st = load_st(&ld, &set, "model.embed_tokens.weight", P_EMBED);
    for (int L = 0; L < c->n_layers && st == LP_OK; L++)
        for (int k = 0; k < P_PER_LAYER && st == LP_OK; k++) {
            if (!m->params[p_layer(L, k)].shape[0]) continue; /* no bias */
            snprintf(nm, sizeof nm, "model.layers.%d.%s", L, hf_name(k));
            st = load_st(&ld, &set, nm, p_layer(L, k));
        }
    if (st == LP_OK) st = load_st(&ld, &set, "model.norm.weight", p_lnf(m));
    if (st == LP_OK && !c->tied_unembed) st = load_st(&ld, &set, "lm_head.weight", m->unembed);
    lp_st_set_close(&set);
    return st;
}

static lp_status load_gg(loader *ld, const lp_gguf *g, const char *name, int idx, int unpermute) {
    const lp_gguf_tensor *t = lp_gguf_find_tensor(g, name);
    if (!t) LP_FAIL(LP_ERR_NOT_FOUND, "%s: tensor '%s' is missing from the GGUF file", lp_gguf_path(g), name);
    if (t->n_dims > 2) LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has %d dimensions (expected 1 or 2)", lp_gguf_path(g), name, t->n_dims);
    /* ggml's ne[0] is the contiguous (input) dimension */
    src_tensor s = {.file = lp_gguf_path(g), .name = name, .data = t->data, .gtype = t->type,
                    .rows = t->n_dims == 2 ? t->ne[1] : t->ne[0], .cols = t->n_dims == 2 ? t->ne[0] : 1};
    return put_param(ld, idx, &s, unpermute);
}

static lp_status load_gguf(lp_model *m, const char *path) {
    lp_gguf *g;
    LP_CHECK(lp_gguf_open(path, &g));
    lp_status st = lp_llama_read_gguf_config(m, g);
    loader ld = {.m = m};
    ckpt ck = {.gg = g, .path = path, .cfg = path};
    if (st == LP_OK) st = check_checkpoint(m, &ck);
    if (st == LP_OK) st = alloc_weights(m);
    const lp_config *c = &m->cfg;
    int permuted = strcmp(c->name, "llama") == 0; /* llama.cpp permutes Q/K of "llama" models only */
    char nm[160];
    if (st == LP_OK) st = load_gg(&ld, g, "token_embd.weight", P_EMBED, 0);
    for (int L = 0; L < c->n_layers && st == LP_OK; L++)
        for (int k = 0; k < P_PER_LAYER && st == LP_OK; k++) {
            if (!m->params[p_layer(L, k)].shape[0]) continue;
            snprintf(nm, sizeof nm, "blk.%d.%s", L, gguf_name(k));
            st = load_gg(&ld, g, nm, p_layer(L, k), permuted && (k == P_WQ || k == P_WK || k == P_BQ || k == P_BK));
        }
    if (st == LP_OK) st = load_gg(&ld, g, "output_norm.weight", p_lnf(m), 0);
    if (st == LP_OK && !c->tied_unembed) st = load_gg(&ld, g, "output.weight", m->unembed, 0);
    /* Llama 3.1 GGUFs carry the rope scaling as per-frequency divisors */
    const lp_gguf_tensor *rf = lp_gguf_find_tensor(g, "rope_freqs.weight");
    if (st == LP_OK && rf) {
        if (rf->type != LP_GGML_F32 || rf->n_elems != c->d_head / 2)
            st = LP_ERR(LP_ERR_FORMAT, "%s: tensor 'rope_freqs.weight' is not F32 [%d]", path, c->d_head / 2);
        else if (!(m->rope_freq_div = malloc(rf->n_elems * sizeof(float))))
            st = LP_ERR(LP_ERR_OOM, "out of memory");
        else
            memcpy(m->rope_freq_div, rf->data, rf->n_elems * sizeof(float));
    }
    /* the dequant kernels run asynchronously: a fault in one is reported here, as a failed load */
    if (st == LP_OK) st = lp_ctx_sync(&m->ctx);
    lp_ctx_release(&m->ctx, ld.dev_stage);
    lp_gguf_close(g);
    return st;
}

lp_status lp_llama_load(lp_model *m, const char *path) {
    size_t n = strlen(path);
    int gguf = (n > 5 && strcmp(path + n - 5, ".gguf") == 0) || lp_gguf_is_file(path);
    return gguf ? load_gguf(m, path) : load_hf(m, path);
}

lp_status lp_llama_random(lp_model *m, uint64_t seed) {
    lp_config *c = &m->cfg;
    if (!c->n_kv_heads) c->n_kv_heads = c->n_heads;
    if (!c->d_head && c->n_heads) c->d_head = c->d_model / c->n_heads;
    if (c->ln_eps <= 0) c->ln_eps = 1e-5f;
    if (c->rope_theta <= 0) c->rope_theta = 500000.0;
    snprintf(c->name, sizeof c->name, "llama");
    LP_CHECK(lp_llama_check_config("random model", c));
    LP_CHECK(alloc_weights(m));
    /* tensor by tensor, on the device for a CUDA model (an 8B model's weights never pass
     * through the host), else through one host buffer per tensor */
    uint64_t s = seed;
    for (int i = 0; i < m->n_params_t; i++) {
        const param *p = &m->params[i];
        size_t n = (size_t)p->shape[0] * (p->ndim == 2 ? p->shape[1] : 1);
        if (!n) continue;
        float base = p->ndim == 1 && strstr(p->name, ".w") ? 1.0f : 0.0f; /* norm weights near 1 */
        if (m->ctx.device == LP_CUDA) { /* the same values, generated where they live */
            LP_CHECK(lp_cuda_init_weights(&m->ctx, lp_param(m, i), n, s, base));
            s = lp_rng_init_weight_skip(s, n);
            continue;
        }
        float *h = malloc(n * sizeof(float));
        if (!h) LP_FAIL(LP_ERR_OOM, "out of host memory for %s", p->name);
        for (size_t j = 0; j < n; j++) h[j] = base + lp_rng_init_weight(&s);
        src_tensor src = {.file = "random", .name = p->name, .data = h, .gtype = -1, .dtype = LP_F32,
                          .rows = p->shape[0], .cols = p->ndim == 2 ? p->shape[1] : 1};
        loader ld = {.m = m};
        lp_status st = put_param(&ld, i, &src, 0);
        free(h);
        LP_CHECK(st);
    }
    return LP_OK;
}

/* ---- rotary tables ---- */

/* Inverse frequencies as Hugging Face computes them (float32), with the rope scaling. */
static void inv_freqs(const lp_model *m, float *f) {
    const lp_config *c = &m->cfg;
    int half = c->d_head / 2;
    for (int i = 0; i < half; i++) {
        float e = (float)(2 * i) / (float)c->d_head;
        double inv = 1.0 / pow(c->rope_theta, (double)e);
        if (c->rope_kind == LP_ROPE_LINEAR) inv /= c->rope_factor;
        if (c->rope_kind == LP_ROPE_LLAMA3) { /* transformers' _compute_llama3_parameters */
            double wavelen = 2 * M_PI / inv;
            double low_wl = c->rope_orig_ctx / c->rope_low_freq_factor, high_wl = c->rope_orig_ctx / c->rope_high_freq_factor;
            if (wavelen > low_wl) {
                inv /= c->rope_factor;
            } else if (wavelen >= high_wl) {
                double smooth = (c->rope_orig_ctx / wavelen - c->rope_low_freq_factor) /
                                (c->rope_high_freq_factor - c->rope_low_freq_factor);
                inv = (1 - smooth) * inv / c->rope_factor + smooth * inv;
            }
        }
        if (m->rope_freq_div) inv /= m->rope_freq_div[i];
        f[i] = (float)inv;
    }
}

lp_status lp_llama_rope_tables(lp_model *m, int n_pos) {
    lp_ctx *c = &m->ctx;
    int half = m->cfg.d_head / 2;
    size_t n = (size_t)n_pos * half;
    float *f = malloc(half * sizeof(float)), *cs = malloc(n * sizeof(float)), *sn = malloc(n * sizeof(float));
    lp_status st = LP_OK;
    if (!f || !cs || !sn) st = LP_ERR(LP_ERR_OOM, "out of memory for rotary tables");
    if (st == LP_OK) {
        inv_freqs(m, f);
        for (int p = 0; p < n_pos; p++)
            for (int i = 0; i < half; i++) {
                float a = (float)p * f[i]; /* the angle rounded as float32, as Hugging Face forms it */
                cs[(size_t)p * half + i] = (float)cos((double)a);
                sn[(size_t)p * half + i] = (float)sin((double)a);
            }
        lp_ctx_release(c, m->rope_cos);
        lp_ctx_release(c, m->rope_sin);
        m->rope_cos = m->rope_sin = NULL, m->rope_n = 0;
        st = lp_ctx_alloc(c, n * sizeof(float), (void **)&m->rope_cos);
        if (st == LP_OK) st = lp_ctx_alloc(c, n * sizeof(float), (void **)&m->rope_sin);
        if (st == LP_OK) st = lp_ctx_to_device(c, m->rope_cos, cs, n * sizeof(float));
        if (st == LP_OK) st = lp_ctx_to_device(c, m->rope_sin, sn, n * sizeof(float));
        if (st == LP_OK) m->rope_n = n_pos;
    }
    free(f);
    free(cs);
    free(sn);
    return st;
}

/* ---- forward ---- */

#define SITE(kind, layer, buf) LP_CHECK(lp_hook_site(m, lp_hook_id(m, (kind), (layer)), (buf)))

static lp_status attention(lp_model *m, int L, int B, int T) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int H = cf->n_heads, Hkv = cf->n_kv_heads, dh = cf->d_head, pos0 = m->gen_pos0 >= 0 ? m->gen_pos0 : 0;
    LP_CHECK(lp_rope(c, m->q, m->q, m->rope_cos, m->rope_sin, B, T, H, dh, pos0));
    SITE(HK_ROT_Q, L, m->q);
    LP_CHECK(lp_rope(c, m->k, m->k, m->rope_cos, m->rope_sin, B, T, Hkv, dh, pos0));
    SITE(HK_ROT_K, L, m->k);
    return lp_model_attend(m, L, B, T);
}

static lp_status forward(lp_model *m, int B, int T, int want) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int N = B * T, D = cf->d_model, F = cf->d_mlp, qD = cf->n_heads * cf->d_head, kvD = cf->n_kv_heads * cf->d_head;
    int full = (want & (LP_WANT_LOSS | LP_WANT_LOGITS | LP_WANT_FINAL_NORM)) || m->gen_pos0 >= 0;
    int last = full ? cf->n_layers : lp_hooks_last_layer(m);
    if (m->taping && m->tape_top > last) last = m->tape_top; /* the backward needs layers up to tape_top only */
    if ((m->gen_pos0 >= 0 ? m->gen_pos0 : 0) + T > m->rope_n) LP_FAIL(LP_ERR_ARG, "forward: positions past the rotary tables");

    LP_CHECK(lp_embed(c, m->resid, m->tok_dev, lp_param(m, P_EMBED), N, D));
    SITE(HK_EMBED, 0, m->resid);
    for (int L = 0; L < cf->n_layers && L <= last; L++) {
        SITE(HK_RESID_PRE, L, m->resid);
        TAPE(lp_tape_layer(m, L));
        LP_CHECK(lp_model_norm(m, m->resid, LW(m, L, P_LN1), NULL, HK_LN1_SCALE, HK_LN1_NORM, L, N));
        LP_CHECK(lp_matmul(c, m->q, m->ln_out, LW(m, L, P_WQ), LW(m, L, P_BQ), N, D, qD, 1));
        LP_CHECK(lp_matmul(c, m->k, m->ln_out, LW(m, L, P_WK), LW(m, L, P_BK), N, D, kvD, 1));
        LP_CHECK(lp_matmul(c, m->v, m->ln_out, LW(m, L, P_WV), LW(m, L, P_BV), N, D, kvD, 1));
        SITE(HK_Q, L, m->q);
        SITE(HK_K, L, m->k);
        SITE(HK_V, L, m->v);
        LP_CHECK(attention(m, L, B, T));
        SITE(HK_Z, L, m->z);
        LP_CHECK(lp_matmul(c, m->attn_out, m->z, LW(m, L, P_WO), NULL, N, qD, D, 1));
        SITE(HK_ATTN_OUT, L, m->attn_out);
        LP_CHECK(lp_add(c, m->resid, m->resid, m->attn_out, (size_t)N * D));
        SITE(HK_RESID_MID, L, m->resid);
        TAPE(lp_tape_mid(m, L));
        LP_CHECK(lp_model_norm(m, m->resid, LW(m, L, P_LN2), NULL, HK_LN2_SCALE, HK_LN2_NORM, L, N));
        LP_CHECK(lp_matmul(c, m->mlp_pre, m->ln_out, LW(m, L, P_WG), NULL, N, D, F, 1));
        SITE(HK_MLP_PRE, L, m->mlp_pre);
        LP_CHECK(lp_matmul(c, m->mlp_lin, m->ln_out, LW(m, L, P_WU), NULL, N, D, F, 1));
        SITE(HK_MLP_PRE_LINEAR, L, m->mlp_lin);
        LP_CHECK(lp_silu_mul(c, m->mlp_post, m->mlp_pre, m->mlp_lin, (size_t)N * F));
        SITE(HK_MLP_POST, L, m->mlp_post);
        LP_CHECK(lp_matmul(c, m->mlp_out, m->mlp_post, LW(m, L, P_WD), NULL, N, F, D, 1));
        SITE(HK_MLP_OUT, L, m->mlp_out);
        LP_CHECK(lp_add(c, m->resid, m->resid, m->mlp_out, (size_t)N * D));
        SITE(HK_RESID_POST, L, m->resid);
    }
    if (last < cf->n_layers) return LP_OK;
    TAPE(lp_tape_final(m));
    LP_CHECK(lp_model_norm(m, m->resid, lp_param(m, p_lnf(m)), NULL, HK_LNF_SCALE, HK_LNF_NORM, cf->n_layers, N));
    return lp_model_unembed(m, N, want);
}

/* ---- backward ---- */

/* the gradient of layer L's weight k (when wanted); weights are [out, in] */
#define PGRAD(k, x, dy, K, M) LP_CHECK(lp_param_grad(m, p_layer(L, (k)), (x), (dy), N, (K), (M), 1))

lp_status lp_llama_backward(lp_model *m, bw_bufs *g, int B, int T, int top) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int N = B * T, D = cf->d_model, H = cf->n_heads, Hkv = cf->n_kv_heads, dh = cf->d_head, F = cf->d_mlp;
    int qD = H * dh, kvD = Hkv * dh;
    size_t es = lp_act_size(m), ND = (size_t)N * D * es;
    if (top == cf->n_layers) {
        const tape_layer *t = &m->tape[cf->n_layers];
        LP_CHECK(lp_norm_backward_site(m, g, g->dresid, g->dln, t->resid_pre, t->ln1_scale, lp_param(m, p_lnf(m)), HK_LNF_SCALE, HK_LNF_NORM, cf->n_layers, N));
        top = cf->n_layers - 1;
    }
    for (int L = top; L >= 0; L--) {
        const tape_layer *t = &m->tape[L];
        GSITE(HK_RESID_POST, L, g->dresid);
        /* SwiGLU MLP, on its own copy of the gradient */
        LP_CHECK(lp_ctx_copy(c, g->dtmp, g->dresid, ND));
        GSITE(HK_MLP_OUT, L, g->dtmp);
        PGRAD(P_WD, t->mlp_post, g->dtmp, F, D);
        LP_CHECK(lp_bw_linear(c, g->dc, g->dtmp, LW(m, L, P_WD), N, F, D, 1));
        GSITE(HK_MLP_POST, L, g->dc);
        LP_CHECK(lp_silu_mul_backward(c, g->da, g->db, g->dc, t->mlp_pre, t->mlp_lin, (size_t)N * F));
        GSITE(HK_MLP_PRE, L, g->da);
        GSITE(HK_MLP_PRE_LINEAR, L, g->db);
        PGRAD(P_WG, t->ln2_out, g->da, D, F);
        PGRAD(P_WU, t->ln2_out, g->db, D, F);
        LP_CHECK(lp_bw_linear(c, g->dln, g->da, LW(m, L, P_WG), N, D, F, 1));
        LP_CHECK(lp_bw_linear(c, g->dtmp, g->db, LW(m, L, P_WU), N, D, F, 1));
        LP_CHECK(lp_add(c, g->dln, g->dln, g->dtmp, (size_t)N * D));
        LP_CHECK(lp_norm_backward_site(m, g, g->dtmp, g->dln, t->resid_mid, t->ln2_scale, LW(m, L, P_LN2), HK_LN2_SCALE, HK_LN2_NORM, L, N));
        LP_CHECK(lp_add(c, g->dresid, g->dresid, g->dtmp, (size_t)N * D));
        GSITE(HK_RESID_MID, L, g->dresid);
        /* attention */
        LP_CHECK(lp_ctx_copy(c, g->dtmp, g->dresid, ND));
        GSITE(HK_ATTN_OUT, L, g->dtmp);
        PGRAD(P_WO, t->z, g->dtmp, qD, D);
        LP_CHECK(lp_bw_linear(c, g->dz, g->dtmp, LW(m, L, P_WO), N, qD, D, 1));
        GSITE(HK_Z, L, g->dz);
        LP_CHECK(lp_attn_core_backward(m, g, t, L, B, T));
        /* q and k were rotated in place: the gradients of the rotated values, then of the projections */
        GSITE(HK_ROT_Q, L, g->dq);
        GSITE(HK_ROT_K, L, g->dk);
        LP_CHECK(lp_rope_backward(c, g->dq, g->dq, m->rope_cos, m->rope_sin, B, T, H, dh, 0));
        LP_CHECK(lp_rope_backward(c, g->dk, g->dk, m->rope_cos, m->rope_sin, B, T, Hkv, dh, 0));
        GSITE(HK_Q, L, g->dq);
        GSITE(HK_K, L, g->dk);
        GSITE(HK_V, L, g->dv);
        PGRAD(P_WQ, t->ln1_out, g->dq, D, qD);
        PGRAD(P_WK, t->ln1_out, g->dk, D, kvD);
        PGRAD(P_WV, t->ln1_out, g->dv, D, kvD);
        LP_CHECK(lp_bw_linear(c, g->dln, g->dq, LW(m, L, P_WQ), N, D, qD, 1));
        LP_CHECK(lp_bw_linear(c, g->dtmp, g->dk, LW(m, L, P_WK), N, D, kvD, 1));
        LP_CHECK(lp_add(c, g->dln, g->dln, g->dtmp, (size_t)N * D));
        LP_CHECK(lp_bw_linear(c, g->dtmp, g->dv, LW(m, L, P_WV), N, D, kvD, 1));
        LP_CHECK(lp_add(c, g->dln, g->dln, g->dtmp, (size_t)N * D));
        LP_CHECK(lp_norm_backward_site(m, g, g->dtmp, g->dln, t->resid_pre, t->ln1_scale, LW(m, L, P_LN1), HK_LN1_SCALE, HK_LN1_NORM, L, N));
        LP_CHECK(lp_add(c, g->dresid, g->dresid, g->dtmp, (size_t)N * D));
        GSITE(HK_RESID_PRE, L, g->dresid);
    }
    GSITE(HK_EMBED, 0, g->dresid);
    return LP_OK;
}
