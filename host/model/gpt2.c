/* gpt2.c: GPT-2 from Hugging Face checkpoints: config, the weight table, loading
 * (both the hub layout and the save_pretrained layout), and the forward pass with a
 * hook site at every TransformerLens point.
 *
 * Weights are kept as [in, out] (Conv1D's layout), with c_attn split into W_Q, W_K,
 * W_V so that tensor-parallel column splits stay possible; the unembedding is the
 * tied wte ([V, D], used transposed) unless the checkpoint has its own lm_head. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/ops.h"
#include "loupe/safetensors.h"
#include "model/model_cfg.h"
#include "model/model_internal.h"
#include "core/rng.h"

/* per-layer weights, in table order */
enum { P_LN1_W, P_LN1_B, P_WQ, P_WK, P_WV, P_BQ, P_BK, P_BV, P_WO, P_BO, P_LN2_W, P_LN2_B, P_WIN, P_BIN,
       P_WOUT, P_BOUT, P_PER_LAYER };
/* model-level weights come first: wte, wpe, then the layers, then ln_f and lm_head */
enum { P_WTE, P_WPE, P_FIRST_LAYER };

static void *W(const lp_model *m, int idx) { return lp_param(m, idx); }
static void *LW(const lp_model *m, int L, int k) { return W(m, P_FIRST_LAYER + L * P_PER_LAYER + k); }
static int lnf_w(const lp_model *m) { return P_FIRST_LAYER + m->cfg.n_layers * P_PER_LAYER; }

/* ---- config ---- */

#define REFUSE(...)                                                        \
    do {                                                                   \
        st = LP_ERR(LP_ERR_FORMAT, __VA_ARGS__); \
        goto done;                                                         \
    } while (0)

static lp_status read_config(lp_model *m, const char *dir) {
    char path[1200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    cJSON *root;
    LP_CHECK(lp_jcfg_open(path, &root));
    lp_status st = LP_OK;
    lp_config *c = &m->cfg;
    const char *type, *act;
    int flag;
    LP_TRY(st, done, lp_jcfg_str(path, root, "", "model_type", "", &type));
    if (strcmp(type, "gpt2") != 0) REFUSE("%s: model_type '%s' is not supported (supported: gpt2)", path, type);
    c->arch = LP_ARCH_GPT2;
    snprintf(c->name, sizeof c->name, "gpt2");
    LP_TRY(st, done, lp_jcfg_int(path, root, "n_layer", 1, LP_MAX_LAYERS, -1, &c->n_layers));
    LP_TRY(st, done, lp_jcfg_int(path, root, "n_embd", 1, LP_MAX_D_MODEL, -1, &c->d_model));
    LP_TRY(st, done, lp_jcfg_int(path, root, "n_head", 1, LP_MAX_HEADS, -1, &c->n_heads));
    /* old hub configs also say n_ctx; transformers reads n_positions */
    int has_pos = cJSON_GetObjectItemCaseSensitive(root, "n_positions") != NULL;
    LP_TRY(st, done, lp_jcfg_int(path, root, has_pos ? "n_positions" : "n_ctx", 1, LP_MAX_CTX, -1, &c->n_ctx));
    LP_TRY(st, done, lp_jcfg_int(path, root, "vocab_size", 1, LP_MAX_VOCAB, -1, &c->d_vocab));
    LP_TRY(st, done, lp_jcfg_int(path, root, "n_inner", 1, LP_MAX_D_MLP, 4 * c->d_model, &c->d_mlp));
    if (c->d_model % c->n_heads != 0) REFUSE("%s: \"n_embd\" %d is not a multiple of \"n_head\" %d", path, c->d_model, c->n_heads);
    c->n_kv_heads = c->n_heads;
    c->d_head = c->d_model / c->n_heads;
    double eps;
    LP_TRY(st, done, lp_jcfg_num(path, root, "", "layer_norm_epsilon", 0, 1, 1e-5, &eps));
    c->ln_eps = (float)eps;
    if (!(c->ln_eps > 0)) REFUSE("%s: \"layer_norm_epsilon\" = %g underflows float32", path, eps);
    LP_TRY(st, done, lp_jcfg_str(path, root, "", "activation_function", "gelu_new", &act));
    if (strcmp(act, "gelu_new") != 0 && strcmp(act, "gelu_pytorch_tanh") != 0)
        REFUSE("%s: \"activation_function\" '%s' is not supported (gelu_new, gelu_pytorch_tanh)", path, act);
    /* attention variants transformers' GPT-2 implements and loupe does not */
    LP_TRY(st, done, lp_jcfg_bool(path, root, "scale_attn_weights", 1, &flag));
    if (!flag) REFUSE("%s: \"scale_attn_weights\" = false is not supported", path);
    LP_TRY(st, done, lp_jcfg_bool(path, root, "scale_attn_by_inverse_layer_idx", 0, &flag));
    if (flag) REFUSE("%s: \"scale_attn_by_inverse_layer_idx\" = true is not supported", path);
    LP_TRY(st, done, lp_jcfg_bool(path, root, "add_cross_attention", 0, &flag));
    if (flag) REFUSE("%s: \"add_cross_attention\" = true is not supported", path);
    LP_TRY(st, done, lp_jcfg_bool(path, root, "tie_word_embeddings", 1, &c->tied_unembed));
done:
    cJSON_Delete(root);
    return st;
}

/* The checkpoint tensors of a layer, in Conv1D's [in, out] layout (cols 0: a vector). */
enum { T_LN1_W, T_LN1_B, T_ATTN_W, T_ATTN_B, T_APROJ_W, T_APROJ_B, T_LN2_W, T_LN2_B, T_FC_W, T_FC_B, T_MPROJ_W, T_MPROJ_B, T_PER_LAYER };

static const char *layer_tensor(int i, int64_t D, int64_t F, int64_t *rows, int64_t *cols) {
    static const struct { const char *suffix, *r, *c; } t[T_PER_LAYER] = {
        {"ln_1.weight", "D", ""}, {"ln_1.bias", "D", ""}, {"attn.c_attn.weight", "D", "3D"}, {"attn.c_attn.bias", "3D", ""},
        {"attn.c_proj.weight", "D", "D"}, {"attn.c_proj.bias", "D", ""}, {"ln_2.weight", "D", ""}, {"ln_2.bias", "D", ""},
        {"mlp.c_fc.weight", "D", "F"}, {"mlp.c_fc.bias", "F", ""}, {"mlp.c_proj.weight", "F", "D"}, {"mlp.c_proj.bias", "D", ""}};
    const char *dims[2] = {t[i].r, t[i].c};
    int64_t v[2];
    for (int k = 0; k < 2; k++)
        v[k] = !*dims[k] ? 0 : strcmp(dims[k], "3D") == 0 ? 3 * D : strcmp(dims[k], "F") == 0 ? F : D;
    *rows = v[0], *cols = v[1];
    return t[i].suffix;
}

static lp_status expect_tensor(const lp_model *m, const lp_st_set *s, const char *name, int64_t rows, int64_t cols) {
    const lp_st_file *file;
    const lp_st_tensor *t = lp_st_set_find(s, name, &file);
    if (!t) LP_FAIL(LP_ERR_NOT_FOUND, "%s: tensor '%s' is missing from the checkpoint", m->path, name);
    if (t->ndim != (cols ? 2 : 1) || t->shape[0] != rows || (cols && t->shape[1] != cols)) {
        char got[64], exp[64];
        int64_t e[2] = {rows, cols};
        LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has shape %s but the config needs %s (%s/config.json: n_embd, n_inner, n_positions, "
                "vocab_size)", file->path, name, lp_shape_str(t->shape, t->ndim, got, sizeof got),
                lp_shape_str(e, cols ? 2 : 1, exp, sizeof exp), m->path);
    }
    return LP_OK;
}

/* Every tensor the config implies exists with the config's shape, and n_layer is the
 * checkpoint's layer count, before the weight table or buffer is sized from the config. */
static lp_status check_checkpoint(const lp_model *m, const lp_st_set *s, const char *prefix, int own_unembed) {
    const lp_config *c = &m->cfg;
    int64_t D = c->d_model, F = c->d_mlp, r, cl;
    char nm[160];
    snprintf(nm, sizeof nm, "%swte.weight", prefix);
    LP_CHECK(expect_tensor(m, s, nm, c->d_vocab, D));
    snprintf(nm, sizeof nm, "%swpe.weight", prefix);
    LP_CHECK(expect_tensor(m, s, nm, c->n_ctx, D));
    snprintf(nm, sizeof nm, "%sh.%d.ln_1.weight", prefix, c->n_layers - 1);
    if (!lp_st_set_find(s, nm, NULL))
        LP_FAIL(LP_ERR_SHAPE, "%s/config.json: \"n_layer\" = %d, but the checkpoint has no tensor '%s'", m->path, c->n_layers, nm);
    snprintf(nm, sizeof nm, "%sh.%d.ln_1.weight", prefix, c->n_layers);
    if (lp_st_set_find(s, nm, NULL))
        LP_FAIL(LP_ERR_SHAPE, "%s/config.json: \"n_layer\" = %d, but the checkpoint has more layers ('%s')", m->path, c->n_layers, nm);
    for (int L = 0; L < c->n_layers; L++)
        for (int i = 0; i < T_PER_LAYER; i++) {
            const char *suffix = layer_tensor(i, D, F, &r, &cl);
            snprintf(nm, sizeof nm, "%sh.%d.%s", prefix, L, suffix);
            LP_CHECK(expect_tensor(m, s, nm, r, cl));
        }
    snprintf(nm, sizeof nm, "%sln_f.weight", prefix);
    LP_CHECK(expect_tensor(m, s, nm, D, 0));
    snprintf(nm, sizeof nm, "%sln_f.bias", prefix);
    LP_CHECK(expect_tensor(m, s, nm, D, 0));
    if (own_unembed) LP_CHECK(expect_tensor(m, s, "lm_head.weight", c->d_vocab, D));
    return LP_OK;
}

/* ---- the weight table ---- */

static lp_status forward(lp_model *m, int B, int T, int want);

static size_t build_table(lp_model *m, int own_unembed) {
    const lp_config *c = &m->cfg;
    m->forward = forward;
    int D = c->d_model, F = c->d_mlp;
    m->params = calloc(P_FIRST_LAYER + (size_t)c->n_layers * P_PER_LAYER + 3, sizeof *m->params);
    if (!m->params) return 0;
    size_t off = 0;
    char nm[96];
    lp_param_add(m, "wte", c->d_vocab, D, &off);
    lp_param_add(m, "wpe", c->n_ctx, D, &off);
    static const char *const names[P_PER_LAYER] = {"ln1.w", "ln1.b", "attn.W_Q", "attn.W_K", "attn.W_V", "attn.b_Q",
                                                   "attn.b_K", "attn.b_V", "attn.W_O", "attn.b_O", "ln2.w", "ln2.b",
                                                   "mlp.W_in", "mlp.b_in", "mlp.W_out", "mlp.b_out"};
    for (int L = 0; L < c->n_layers; L++)
        for (int k = 0; k < P_PER_LAYER; k++) {
            snprintf(nm, sizeof nm, "blocks.%d.%s", L, names[k]);
            int64_t r, cols = 0;
            switch (k) {
            case P_WQ: case P_WK: case P_WV: case P_WO: r = D, cols = D; break;
            case P_WIN: r = D, cols = F; break;
            case P_WOUT: r = F, cols = D; break;
            case P_BIN: r = F; break;
            default: r = D; break;
            }
            lp_param_add(m, nm, r, cols, &off);
        }
    lp_param_add(m, "ln_final.w", D, 0, &off);
    lp_param_add(m, "ln_final.b", D, 0, &off);
    m->unembed = P_WTE; /* tied: wte used transposed */
    if (own_unembed) {
        m->unembed = m->n_params_t;
        lp_param_add(m, "unembed", c->d_vocab, D, &off);
    }
    lp_param_count(m);
    return off;
}

/* Copies checkpoint tensor `name` (columns [c0, c0 + p.cols) of it when split) into param idx, as f32. */
static lp_status load_one(lp_model *m, const lp_st_set *s, const char *prefix, const char *name, int idx, int64_t want_rows,
                          int64_t want_cols, int64_t c0, float *host) {
    char full[160];
    snprintf(full, sizeof full, "%s%s", prefix, name);
    const lp_st_file *file;
    const lp_st_tensor *t = lp_st_set_find(s, full, &file);
    if (!t) LP_FAIL(LP_ERR_NOT_FOUND, "%s: tensor '%s' is missing from the checkpoint", m->path, full);
    int64_t rows = t->shape[0], cols = t->ndim == 2 ? t->shape[1] : 0;
    if (t->ndim != (want_cols ? 2 : 1) || rows != want_rows || cols != want_cols) {
        char got[64], exp[64];
        int64_t e[2] = {want_rows, want_cols};
        LP_FAIL(LP_ERR_SHAPE, "%s: tensor '%s' has shape %s but the config needs %s", file->path, full,
                lp_shape_str(t->shape, t->ndim, got, sizeof got), lp_shape_str(e, want_cols ? 2 : 1, exp, sizeof exp));
    }
    if (t->dtype != LP_F32 && t->dtype != LP_F16 && t->dtype != LP_BF16)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor '%s' has dtype %s (expected F32, F16 or BF16)", file->path, full, lp_dtype_name(t->dtype));
    const param *p = &m->params[idx];
    int64_t pr = p->shape[0], pc = p->ndim == 2 ? p->shape[1] : 1, src_cols = want_cols ? want_cols : 1;
    size_t es = lp_dtype_size(t->dtype);
    float *dst = host + p->offset;
    for (int64_t r = 0; r < pr; r++)
        LP_CHECK(lp_convert_host(dst + r * pc, LP_F32, (const char *)t->data + ((size_t)r * src_cols + c0) * es, t->dtype, (size_t)pc));
    return LP_OK;
}

/* One allocation for all weights, in the context's dtype. */
static lp_status upload_weights(lp_model *m, const float *host, size_t total) {
    size_t bytes = total * lp_act_size(m);
    LP_CHECK(lp_ctx_alloc(&m->ctx, bytes, &m->weights));
    m->weight_bytes = bytes;
    return lp_ctx_upload_f32(&m->ctx, m->weights, host, total);
}

lp_status lp_gpt2_random(lp_model *m, uint64_t seed) {
    lp_config *c = &m->cfg;
    if (c->n_layers < 1 || c->d_model < 1 || c->n_heads < 1 || c->d_model % c->n_heads || c->d_mlp < 1 || c->n_ctx < 1 || c->d_vocab < 1)
        LP_FAIL(LP_ERR_ARG, "random model: impossible shape");
    snprintf(c->name, sizeof c->name, "gpt2");
    c->n_kv_heads = c->n_heads, c->d_head = c->d_model / c->n_heads, c->tied_unembed = 1;
    if (c->ln_eps <= 0) c->ln_eps = 1e-5f;
    if (c->n_layers > LP_MAX_LAYERS || c->d_model > LP_MAX_D_MODEL || c->d_mlp > LP_MAX_D_MLP || c->n_ctx > LP_MAX_CTX ||
        c->d_vocab > LP_MAX_VOCAB)
        LP_FAIL(LP_ERR_ARG, "random model: a dimension exceeds loupe's bounds");
    size_t total = build_table(m, 0);
    float *host = total ? malloc(total * sizeof(float)) : NULL;
    if (!host) LP_FAIL(LP_ERR_OOM, "out of host memory for %zu weights", total);
    uint64_t s = seed;
    for (size_t i = 0; i < total; i++) host[i] = lp_rng_init_weight(&s);
    for (int L = 0; L <= c->n_layers; L++) { /* LayerNorm weights near 1 */
        int w = L < c->n_layers ? P_FIRST_LAYER + L * P_PER_LAYER + P_LN1_W : lnf_w(m);
        for (int k = 0; k < (L < c->n_layers ? 2 : 1); k++) {
            param *p = &m->params[w + k * (P_LN2_W - P_LN1_W)];
            for (int64_t i = 0; i < p->shape[0]; i++) host[p->offset + i] += 1.0f;
        }
    }
    lp_status st = upload_weights(m, host, total);
    free(host);
    return st;
}

lp_status lp_gpt2_load(lp_model *m, const char *dir) {
    LP_CHECK(read_config(m, dir));
    lp_st_set s;
    LP_CHECK(lp_st_set_open(&s, dir));
    lp_status st = LP_OK;
    float *host = NULL;
    /* hub files have no prefix; save_pretrained of GPT2LMHeadModel writes "transformer." */
    const char *prefix = lp_st_set_find(&s, "transformer.wte.weight", NULL) ? "transformer." : "";
    /* transformers ties the unembedding to wte unless tie_word_embeddings is false; then
     * it needs lm_head.weight (it would start it at random) */
    int own_unembed = !m->cfg.tied_unembed;
    if (own_unembed && !lp_st_set_find(&s, "lm_head.weight", NULL))
        LP_TRY(st, done, LP_ERR(LP_ERR_NOT_FOUND, "%s/config.json: \"tie_word_embeddings\" is false, but the checkpoint has no 'lm_head.weight'", dir));
    LP_TRY(st, done, check_checkpoint(m, &s, prefix, own_unembed));
    size_t total = build_table(m, own_unembed);
    host = total ? malloc(total * sizeof(float)) : NULL;
    if (!host) LP_TRY(st, done, LP_ERR(LP_ERR_OOM, "out of memory for %zu weights", total));
    const lp_config *c = &m->cfg;
    int D = c->d_model, F = c->d_mlp;
    char nm[128];
    LP_TRY(st, done, load_one(m, &s, prefix, "wte.weight", P_WTE, c->d_vocab, D, 0, host));
    LP_TRY(st, done, load_one(m, &s, prefix, "wpe.weight", P_WPE, c->n_ctx, D, 0, host));
    for (int L = 0; L < c->n_layers; L++) {
        int base = P_FIRST_LAYER + L * P_PER_LAYER;
#define LOAD(suffix, k, r, cols, c0)                                                                     \
    do {                                                                                                 \
        snprintf(nm, sizeof nm, "h.%d.%s", L, suffix);                                                   \
        LP_TRY(st, done, load_one(m, &s, prefix, nm, base + (k), r, cols, c0, host));                    \
    } while (0)
        LOAD("ln_1.weight", P_LN1_W, D, 0, 0);
        LOAD("ln_1.bias", P_LN1_B, D, 0, 0);
        LOAD("attn.c_attn.weight", P_WQ, D, 3 * D, 0);
        LOAD("attn.c_attn.weight", P_WK, D, 3 * D, D);
        LOAD("attn.c_attn.weight", P_WV, D, 3 * D, 2 * D);
        LOAD("attn.c_attn.bias", P_BQ, 3 * D, 0, 0);
        LOAD("attn.c_attn.bias", P_BK, 3 * D, 0, D);
        LOAD("attn.c_attn.bias", P_BV, 3 * D, 0, 2 * D);
        LOAD("attn.c_proj.weight", P_WO, D, D, 0);
        LOAD("attn.c_proj.bias", P_BO, D, 0, 0);
        LOAD("ln_2.weight", P_LN2_W, D, 0, 0);
        LOAD("ln_2.bias", P_LN2_B, D, 0, 0);
        LOAD("mlp.c_fc.weight", P_WIN, D, F, 0);
        LOAD("mlp.c_fc.bias", P_BIN, F, 0, 0);
        LOAD("mlp.c_proj.weight", P_WOUT, F, D, 0);
        LOAD("mlp.c_proj.bias", P_BOUT, D, 0, 0);
#undef LOAD
    }
    LP_TRY(st, done, load_one(m, &s, prefix, "ln_f.weight", lnf_w(m), D, 0, 0, host));
    LP_TRY(st, done, load_one(m, &s, prefix, "ln_f.bias", lnf_w(m) + 1, D, 0, 0, host));
    if (own_unembed) LP_TRY(st, done, load_one(m, &s, "", "lm_head.weight", lnf_w(m) + 2, c->d_vocab, D, 0, host));
    st = upload_weights(m, host, total);
done:
    free(host);
    lp_st_set_close(&s);
    return st;
}

/* ---- activations ---- */

/* ---- forward ---- */

#define SITE(kind, layer, buf) LP_CHECK(lp_hook_site(m, lp_hook_id(m, (kind), (layer)), (buf)))

static lp_status forward(lp_model *m, int B, int T, int want) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int N = B * T, D = cf->d_model, Hkv = cf->n_kv_heads, dh = cf->d_head;
    int last = (want & (LP_WANT_LOSS | LP_WANT_LOGITS | LP_WANT_FINAL_NORM)) || m->gen_pos0 >= 0 ? cf->n_layers : lp_hooks_last_layer(m);
    if (m->taping && m->tape_top > last) last = m->tape_top; /* the backward needs layers up to tape_top only */

    LP_CHECK(lp_embed(c, m->resid, m->tok_dev, W(m, P_WTE), N, D));
    SITE(HK_EMBED, 0, m->resid);
    /* generating (batch 1): positions start at the cache's fill */
    int pos0 = m->gen_pos0 >= 0 ? m->gen_pos0 : 0;
    LP_CHECK(lp_pos_embed(c, m->pos_buf, (const char *)W(m, P_WPE) + (size_t)pos0 * D * lp_act_size(m), B, T, D));
    SITE(HK_POS_EMBED, 0, m->pos_buf);
    LP_CHECK(lp_add(c, m->resid, m->resid, m->pos_buf, (size_t)N * D));

    for (int L = 0; L < cf->n_layers && L <= last; L++) {
        SITE(HK_RESID_PRE, L, m->resid);
        TAPE(lp_tape_layer(m, L));
        LP_CHECK(lp_model_norm(m, m->resid, LW(m, L, P_LN1_W), LW(m, L, P_LN1_B), HK_LN1_SCALE, HK_LN1_NORM, L, N));
        LP_CHECK(lp_matmul(c, m->q, m->ln_out, LW(m, L, P_WQ), LW(m, L, P_BQ), N, D, D, 0));
        LP_CHECK(lp_matmul(c, m->k, m->ln_out, LW(m, L, P_WK), LW(m, L, P_BK), N, D, Hkv * dh, 0));
        LP_CHECK(lp_matmul(c, m->v, m->ln_out, LW(m, L, P_WV), LW(m, L, P_BV), N, D, Hkv * dh, 0));
        SITE(HK_Q, L, m->q);
        SITE(HK_K, L, m->k);
        SITE(HK_V, L, m->v);
        LP_CHECK(lp_model_attend(m, L, B, T));
        SITE(HK_Z, L, m->z);
        LP_CHECK(lp_matmul(c, m->attn_out, m->z, LW(m, L, P_WO), LW(m, L, P_BO), N, D, D, 0));
        SITE(HK_ATTN_OUT, L, m->attn_out);
        LP_CHECK(lp_add(c, m->resid, m->resid, m->attn_out, (size_t)N * D));
        SITE(HK_RESID_MID, L, m->resid);
        TAPE(lp_tape_mid(m, L));
        LP_CHECK(lp_model_norm(m, m->resid, LW(m, L, P_LN2_W), LW(m, L, P_LN2_B), HK_LN2_SCALE, HK_LN2_NORM, L, N));
        LP_CHECK(lp_matmul(c, m->mlp_pre, m->ln_out, LW(m, L, P_WIN), LW(m, L, P_BIN), N, D, cf->d_mlp, 0));
        SITE(HK_MLP_PRE, L, m->mlp_pre);
        LP_CHECK(lp_gelu(c, m->mlp_post, m->mlp_pre, (size_t)N * cf->d_mlp));
        SITE(HK_MLP_POST, L, m->mlp_post);
        LP_CHECK(lp_matmul(c, m->mlp_out, m->mlp_post, LW(m, L, P_WOUT), LW(m, L, P_BOUT), N, cf->d_mlp, D, 0));
        SITE(HK_MLP_OUT, L, m->mlp_out);
        LP_CHECK(lp_add(c, m->resid, m->resid, m->mlp_out, (size_t)N * D));
        SITE(HK_RESID_POST, L, m->resid);
    }
    if (last < cf->n_layers) return LP_OK;

    TAPE(lp_tape_final(m));
    LP_CHECK(lp_model_norm(m, m->resid, W(m, lnf_w(m)), W(m, lnf_w(m) + 1), HK_LNF_SCALE, HK_LNF_NORM, cf->n_layers, N));
    return lp_model_unembed(m, N, want);
}

/* ---- backward ---- */

/* the gradient of layer L's weight k (when wanted) */
#define PGRAD(k, x, dy, K, M) LP_CHECK(lp_param_grad(m, P_FIRST_LAYER + L * P_PER_LAYER + (k), (x), (dy), N, (K), (M), 0))

lp_status lp_gpt2_backward(lp_model *m, bw_bufs *g, int B, int T, int top) {
    lp_ctx *c = &m->ctx;
    const lp_config *cf = &m->cfg;
    int N = B * T, D = cf->d_model, Hkv = cf->n_kv_heads, dh = cf->d_head, F = cf->d_mlp;
    size_t es = lp_act_size(m), ND = (size_t)N * D * es;
    if (top == cf->n_layers) {
        const tape_layer *t = &m->tape[cf->n_layers];
        LP_CHECK(lp_norm_backward_site(m, g, g->dresid, g->dln, t->resid_pre, t->ln1_scale, W(m, lnf_w(m)), HK_LNF_SCALE, HK_LNF_NORM, cf->n_layers, N));
        top = cf->n_layers - 1;
    }
    for (int L = top; L >= 0; L--) {
        const tape_layer *t = &m->tape[L];
        GSITE(HK_RESID_POST, L, g->dresid);
        /* MLP: its own copy of the gradient, so a direction injected at mlp_out stays on its branch */
        LP_CHECK(lp_ctx_copy(c, g->dtmp, g->dresid, ND));
        GSITE(HK_MLP_OUT, L, g->dtmp);
        PGRAD(P_WOUT, t->mlp_post, g->dtmp, F, D);
        LP_CHECK(lp_bw_linear(c, g->da, g->dtmp, LW(m, L, P_WOUT), N, F, D, 0));
        GSITE(HK_MLP_POST, L, g->da);
        LP_CHECK(lp_gelu_backward(c, g->da, g->da, t->mlp_pre, (size_t)N * F));
        GSITE(HK_MLP_PRE, L, g->da);
        PGRAD(P_WIN, t->ln2_out, g->da, D, F);
        LP_CHECK(lp_bw_linear(c, g->dln, g->da, LW(m, L, P_WIN), N, D, F, 0));
        LP_CHECK(lp_norm_backward_site(m, g, g->dtmp, g->dln, t->resid_mid, t->ln2_scale, LW(m, L, P_LN2_W), HK_LN2_SCALE, HK_LN2_NORM, L, N));
        LP_CHECK(lp_add(c, g->dresid, g->dresid, g->dtmp, (size_t)N * D));
        GSITE(HK_RESID_MID, L, g->dresid);
        /* attention */
        LP_CHECK(lp_ctx_copy(c, g->dtmp, g->dresid, ND));
        GSITE(HK_ATTN_OUT, L, g->dtmp);
        PGRAD(P_WO, t->z, g->dtmp, D, D);
        LP_CHECK(lp_bw_linear(c, g->dz, g->dtmp, LW(m, L, P_WO), N, D, D, 0));
        GSITE(HK_Z, L, g->dz);
        LP_CHECK(lp_attn_core_backward(m, g, t, L, B, T));
        GSITE(HK_Q, L, g->dq);
        GSITE(HK_K, L, g->dk);
        GSITE(HK_V, L, g->dv);
        PGRAD(P_WQ, t->ln1_out, g->dq, D, D);
        PGRAD(P_WK, t->ln1_out, g->dk, D, Hkv * dh);
        PGRAD(P_WV, t->ln1_out, g->dv, D, Hkv * dh);
        LP_CHECK(lp_bw_linear(c, g->dln, g->dq, LW(m, L, P_WQ), N, D, D, 0));
        LP_CHECK(lp_bw_linear(c, g->dtmp, g->dk, LW(m, L, P_WK), N, D, Hkv * dh, 0));
        LP_CHECK(lp_add(c, g->dln, g->dln, g->dtmp, (size_t)N * D));
        LP_CHECK(lp_bw_linear(c, g->dtmp, g->dv, LW(m, L, P_WV), N, D, Hkv * dh, 0));
        LP_CHECK(lp_add(c, g->dln, g->dln, g->dtmp, (size_t)N * D));
        LP_CHECK(lp_norm_backward_site(m, g, g->dtmp, g->dln, t->resid_pre, t->ln1_scale, LW(m, L, P_LN1_W), HK_LN1_SCALE, HK_LN1_NORM, L, N));
        LP_CHECK(lp_add(c, g->dresid, g->dresid, g->dtmp, (size_t)N * D));
        GSITE(HK_RESID_PRE, L, g->dresid);
    }
    /* resid_pre of layer 0 = embed + pos_embed: both receive it */
    GSITE(HK_EMBED, 0, g->dresid);
    GSITE(HK_POS_EMBED, 0, g->dresid);
    return LP_OK;
}
