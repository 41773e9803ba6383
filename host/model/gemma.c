/* gemma.c: Gemma 2 and Gemma 3 (Hugging Face gemma2 and gemma3_text; GGUF gemma2 and
 * gemma3): their config and tensor names. Everything else is the shared decoder, told by
 * the config: RMSNorm of (1 + w) (the 1 added at load, as TransformerLens does), norms before
 * and after attention and the MLP, GeGLU with tanh GELU, the embedding times sqrt(d_model),
 * q.k scaled by query_pre_attn_scalar^-1/2, sliding-window attention on local layers; Gemma 2
 * soft-caps the attention scores and the final logits, Gemma 3 normalizes every head's q and
 * k and gives its local layers their own rotary base.
 *
 * Config layouts: transformers 5 lists "layer_types" and, for Gemma 3, one "rope_parameters"
 * dict per attention type; transformers 4 says "sliding_window_pattern" (Gemma 3; Gemma 2
 * alternates), "rope_theta", "rope_scaling" and "rope_local_base_freq". The local/global
 * pattern loupe runs is every window_pattern-th layer global; a "layer_types" that differs is
 * refused, naming the layer. GGUF keeps neither the pattern nor Gemma 3's local base: they
 * are what llama.cpp assumes (2 and 6; 10000). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "model/arch.h"
#include "model/blocks.h"
#include "model/model_cfg.h"

static const cJSON *jget(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNull(v) ? NULL : v;
}

static void set_shape(lp_config *c, int gemma3) {
    c->arch = gemma3 ? LP_ARCH_GEMMA3 : LP_ARCH_GEMMA2;
    c->norm = LP_NORM_RMS, c->pos = LP_POS_ROTARY, c->mlp = LP_MLP_GEGLU, c->post_norms = 1, c->qk_norm = gemma3;
    c->embed_scale = sqrtf((float)c->d_model);
    c->window_pattern = gemma3 ? 6 : 2;
}

/* "layer_types" against the pattern: local ("sliding_attention") exactly where loupe runs the window. */
static lp_status read_layer_types(const char *path, const cJSON *root, lp_config *c) {
    const cJSON *lt = jget(root, "layer_types");
    if (!lt) return LP_OK;
    if (!cJSON_IsArray(lt) || cJSON_GetArraySize(lt) != c->n_layers)
        LP_FAIL(LP_ERR_FORMAT, "%s: \"layer_types\" is not a list of %d layer types", path, c->n_layers);
    int first_full = -1, L = 0;
    for (const cJSON *e = lt->child; e; e = e->next, L++)
        if (cJSON_IsString(e) && strcmp(e->valuestring, "full_attention") == 0 && first_full < 0) first_full = L;
    c->window_pattern = first_full < 0 ? 0 : first_full + 1;
    L = 0;
    for (const cJSON *e = lt->child; e; e = e->next, L++) {
        const char *want = lp_config_local(c, L) ? "sliding_attention" : "full_attention";
        if (!cJSON_IsString(e) || strcmp(e->valuestring, want) != 0)
            LP_FAIL(LP_ERR_FORMAT, "%s: \"layer_types\"[%d]: loupe runs a global layer every %d (the first at %d); this one must "
                    "be '%s'", path, L, c->window_pattern, first_full, want);
    }
    return LP_OK;
}

/* One rotary dict: its base, and a scaling (default or linear). */
static lp_status rope_one(const char *path, const cJSON *d, const char *where, double dflt, double *theta, lp_config *c, int global) {
    const char *type;
    LP_CHECK(jcfg_num(path, d, where, "rope_theta", 1, HUGE_VAL, dflt, theta));
    LP_CHECK(jcfg_str(path, d, where, jget(d, "rope_type") || !jget(d, "type") ? "rope_type" : "type", "default", &type));
    if (strcmp(type, "default") == 0) return LP_OK;
    if (strcmp(type, "linear") != 0 || !global)
        LP_FAIL(LP_ERR_FORMAT, "%s: \"%srope_type\" '%s' is not supported (default%s)", path, where, type, global ? ", linear" : "");
    c->rope_kind = LP_ROPE_LINEAR;
    return jcfg_num(path, d, where, "factor", 0, HUGE_VAL, NAN, &c->rope_factor);
}

static lp_status read_rope(const char *path, const cJSON *root, lp_config *c, int gemma3) {
    double top, local;
    LP_CHECK(jcfg_num(path, root, "", "rope_theta", 1, HUGE_VAL, gemma3 ? 1e6 : 1e4, &top));
    LP_CHECK(jcfg_num(path, root, "", "rope_local_base_freq", 1, HUGE_VAL, 1e4, &local));
    c->rope_theta = top, c->rope_theta_local = gemma3 ? local : 0;
    const cJSON *rp = jget(root, "rope_parameters"), *rs = jget(root, "rope_scaling");
    if ((rp && !cJSON_IsObject(rp)) || (rs && !cJSON_IsObject(rs)))
        LP_FAIL(LP_ERR_FORMAT, "%s: \"%s\" is not an object", path, rp && !cJSON_IsObject(rp) ? "rope_parameters" : "rope_scaling");
    if (rs && rs->child) return rope_one(path, rs, "rope_scaling.", top, &c->rope_theta, c, 1);
    if (!rp || !rp->child) return LP_OK;
    const cJSON *full = jget(rp, "full_attention"), *slide = jget(rp, "sliding_attention");
    if (!full && !slide) return rope_one(path, rp, "rope_parameters.", top, &c->rope_theta, c, 1);
    if (full) LP_CHECK(rope_one(path, full, "rope_parameters.full_attention.", top, &c->rope_theta, c, 1));
    if (slide && gemma3) LP_CHECK(rope_one(path, slide, "rope_parameters.sliding_attention.", local, &c->rope_theta_local, c, 0));
    if (slide && !gemma3) LP_CHECK(rope_one(path, slide, "rope_parameters.sliding_attention.", top, &local, c, 0));
    if (slide && !gemma3 && local != c->rope_theta)
        LP_FAIL(LP_ERR_FORMAT, "%s: \"rope_parameters\": Gemma 2 with a separate local rotary base is not supported", path);
    return LP_OK;
}

/* The keys only Gemma has: soft-caps, the query scalar, the window. */
static lp_status read_gemma_keys(const char *path, const cJSON *root, lp_config *c, int gemma3) {
    double v;
    int flag;
    LP_CHECK(jcfg_num(path, root, "", "query_pre_attn_scalar", 0, HUGE_VAL, c->d_head, &v));
    c->attn_scale = (float)(1.0 / sqrt(v));
    LP_CHECK(jcfg_num(path, root, "", "attn_logit_softcapping", 0, HUGE_VAL, 0, &v));
    c->attn_softcap = (float)v;
    LP_CHECK(jcfg_num(path, root, "", "final_logit_softcapping", 0, HUGE_VAL, 0, &v));
    c->final_softcap = (float)v;
    LP_CHECK(jcfg_int(path, root, "sliding_window", 1, INT32_MAX, 4096, &c->sliding_window));
    if (gemma3) LP_CHECK(jcfg_int(path, root, "sliding_window_pattern", 1, LP_MAX_LAYERS, 6, &c->window_pattern));
    LP_CHECK(jcfg_bool(path, root, "attention_bias", 0, &flag));
    if (flag) LP_FAIL(LP_ERR_FORMAT, "%s: \"attention_bias\" = true is not supported", path);
    LP_CHECK(jcfg_bool(path, root, "use_bidirectional_attention", 0, &flag));
    if (flag) LP_FAIL(LP_ERR_FORMAT, "%s: \"use_bidirectional_attention\" = true is not supported", path);
    const char *act;
    LP_CHECK(jcfg_str(path, root, "", "hidden_activation", "gelu_pytorch_tanh", &act));
    if (strcmp(act, "gelu_pytorch_tanh") != 0)
        LP_FAIL(LP_ERR_FORMAT, "%s: \"hidden_activation\" '%s' is not supported (gelu_pytorch_tanh)", path, act);
    return LP_OK;
}

static lp_status read_dims(const char *path, const cJSON *root, lp_config *c) {
    LP_CHECK(jcfg_int(path, root, "num_hidden_layers", 1, LP_MAX_LAYERS, -1, &c->n_layers));
    LP_CHECK(jcfg_int(path, root, "hidden_size", 1, LP_MAX_D_MODEL, -1, &c->d_model));
    LP_CHECK(jcfg_int(path, root, "num_attention_heads", 1, LP_MAX_HEADS, -1, &c->n_heads));
    LP_CHECK(jcfg_int(path, root, "num_key_value_heads", 1, LP_MAX_HEADS, c->n_heads, &c->n_kv_heads));
    LP_CHECK(jcfg_int(path, root, "head_dim", 1, LP_MAX_D_HEAD, 256, &c->d_head));
    LP_CHECK(jcfg_int(path, root, "intermediate_size", 1, LP_MAX_D_MLP, -1, &c->d_mlp));
    LP_CHECK(jcfg_int(path, root, "max_position_embeddings", 1, LP_MAX_CTX, -1, &c->n_ctx));
    LP_CHECK(jcfg_int(path, root, "vocab_size", 1, LP_MAX_VOCAB, -1, &c->d_vocab));
    double eps;
    LP_CHECK(jcfg_num(path, root, "", "rms_norm_eps", 0, 1, 1e-6, &eps));
    c->ln_eps = (float)eps;
    if (!(c->ln_eps > 0)) LP_FAIL(LP_ERR_FORMAT, "%s: \"rms_norm_eps\" = %g underflows float32", path, eps);
    return LP_OK;
}

static lp_status read_hf(lp_model *m, const char *path, const cJSON *root) {
    lp_config *c = &m->cfg;
    const char *type;
    LP_CHECK(jcfg_str(path, root, "", "model_type", "", &type));
    int gemma3 = strcmp(type, "gemma2") != 0;
    snprintf(c->name, sizeof c->name, "%s", type);
    m->w.trans = 1;
    if (jget(root, "quantization_config"))
        LP_FAIL(LP_ERR_FORMAT, "%s: \"quantization_config\": quantized Hugging Face checkpoints are not supported (GGUF is)", path);
    LP_CHECK(read_dims(path, root, c));
    set_shape(c, gemma3);
    LP_CHECK(read_gemma_keys(path, root, c, gemma3));
    LP_CHECK(read_layer_types(path, root, c));
    LP_CHECK(read_rope(path, root, c, gemma3));
    LP_CHECK(jcfg_bool(path, root, "tie_word_embeddings", 1, &c->tied_unembed));
    return llama_check_config(path, c);
}

/* ---- GGUF ---- */

static lp_status gguf_num(const lp_gguf *g, const char *arch, const char *key, double dflt, double *out) {
    char k[128];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    *out = dflt;
    if (lp_gguf_has(g, k)) LP_CHECK(lp_gguf_get_float(g, k, out));
    if (!isfinite(*out) || *out < 0) LP_FAIL(LP_ERR_FORMAT, "%s: metadata key '%s' = %g is not a finite value >= 0", lp_gguf_path(g), k, *out);
    return LP_OK;
}

static lp_status read_gguf(lp_model *m, const lp_gguf *g) {
    lp_config *c = &m->cfg;
    m->w.trans = 1;
    /* the dimensions, norms, rotary and tied unembedding as for the Llama family */
    LP_CHECK(llama_read_gguf_config(m, g));
    int gemma3 = strcmp(c->name, "gemma3") == 0;
    set_shape(c, gemma3);
    double v;
    LP_CHECK(gguf_num(g, c->name, "attention.sliding_window", 4096, &v));
    if (v < 1 || v > INT32_MAX) LP_FAIL(LP_ERR_FORMAT, "%s: metadata key '%s.attention.sliding_window' is not in [1, 2^31)", lp_gguf_path(g), c->name);
    c->sliding_window = (int)v;
    LP_CHECK(gguf_num(g, c->name, "attn_logit_softcapping", 0, &v));
    c->attn_softcap = (float)v;
    LP_CHECK(gguf_num(g, c->name, "final_logit_softcapping", 0, &v));
    c->final_softcap = (float)v;
    /* llama.cpp scales q.k by key_length^-1/2 (query_pre_attn_scalar is head_dim in these checkpoints) */
    c->attn_scale = (float)(1.0 / sqrt((double)c->d_head));
    c->rope_theta_local = gemma3 ? 10000.0 : 0;
    return LP_OK;
}

static lp_status random_cfg(lp_config *c) {
    int gemma3 = c->arch == LP_ARCH_GEMMA3;
    if (!c->n_kv_heads) c->n_kv_heads = c->n_heads;
    if (!c->d_head && c->n_heads) c->d_head = c->d_model / c->n_heads;
    if (c->ln_eps <= 0) c->ln_eps = 1e-6f;
    if (c->rope_theta <= 0) c->rope_theta = gemma3 ? 1e6 : 1e4;
    if (c->sliding_window <= 0) c->sliding_window = 4096;
    snprintf(c->name, sizeof c->name, "%s", gemma3 ? "gemma3_text" : "gemma2");
    float scale = c->attn_scale, softcap = c->attn_softcap, final = c->final_softcap;
    int window = c->window_pattern;
    set_shape(c, gemma3);
    c->attn_scale = scale, c->attn_softcap = softcap, c->final_softcap = final;
    if (window) c->window_pattern = window;
    if (gemma3 && c->rope_theta_local <= 0) c->rope_theta_local = 1e4;
    return llama_check_config("random model", c);
}

static const char *const g_no_prefix[] = {"", NULL};
#define QD "num_attention_heads x head_dim"
#define KVD "num_key_value_heads x head_dim"
#define GQD "attention.head_count x attention.key_length"
#define GKVD "attention.head_count_kv x attention.key_length"
static const tensor_names g_names = {
    .hf_prefixes = g_no_prefix, .hf_layer = "model.layers.%d.", .hf_embed = "model.embed_tokens.weight",
    .hf_lnf_w = "model.norm.weight", .hf_unembed = "lm_head.weight", .hf_norm_plus_one = 1,
    .hf = {[W_LN1] = "input_layernorm.weight", [W_Q] = "self_attn.q_proj.weight", [W_K] = "self_attn.k_proj.weight",
           [W_V] = "self_attn.v_proj.weight", [W_QN] = "self_attn.q_norm.weight", [W_KN] = "self_attn.k_norm.weight",
           [W_O] = "self_attn.o_proj.weight", [W_LN1P] = "post_attention_layernorm.weight",
           [W_LN2] = "pre_feedforward_layernorm.weight", [W_GATE] = "mlp.gate_proj.weight", [W_IN] = "mlp.up_proj.weight",
           [W_OUT] = "mlp.down_proj.weight", [W_LN2P] = "post_feedforward_layernorm.weight"},
    .hf_keys = {[W_LN1] = "hidden_size", [W_LN2] = "hidden_size", [W_LN1P] = "hidden_size", [W_LN2P] = "hidden_size",
                [W_QN] = "head_dim", [W_KN] = "head_dim", [W_Q] = QD ", hidden_size", [W_K] = KVD ", hidden_size",
                [W_V] = KVD ", hidden_size", [W_O] = "hidden_size, " QD, [W_GATE] = "intermediate_size, hidden_size",
                [W_IN] = "intermediate_size, hidden_size", [W_OUT] = "hidden_size, intermediate_size"},
    .hf_vocab_keys = "vocab_size, hidden_size", .hf_d_key = "hidden_size", .hf_layers_key = "num_hidden_layers",
    .gg_embed = "token_embd.weight", .gg_lnf_w = "output_norm.weight", .gg_unembed = "output.weight",
    .gg = {[W_LN1] = "attn_norm.weight", [W_Q] = "attn_q.weight", [W_K] = "attn_k.weight", [W_V] = "attn_v.weight",
           [W_QN] = "attn_q_norm.weight", [W_KN] = "attn_k_norm.weight", [W_O] = "attn_output.weight",
           [W_LN1P] = "post_attention_norm.weight", [W_LN2] = "ffn_norm.weight", [W_GATE] = "ffn_gate.weight",
           [W_IN] = "ffn_up.weight", [W_OUT] = "ffn_down.weight", [W_LN2P] = "post_ffw_norm.weight"},
    .gg_keys = {[W_LN1] = "embedding_length", [W_LN2] = "embedding_length", [W_LN1P] = "embedding_length",
                [W_LN2P] = "embedding_length", [W_QN] = "attention.key_length", [W_KN] = "attention.key_length",
                [W_Q] = GQD ", embedding_length", [W_K] = GKVD ", embedding_length", [W_V] = GKVD ", embedding_length",
                [W_O] = "embedding_length, " GQD, [W_GATE] = "feed_forward_length, embedding_length",
                [W_IN] = "feed_forward_length, embedding_length", [W_OUT] = "embedding_length, feed_forward_length"},
};

static const char *const g_types[] = {"gemma2", "gemma3_text", NULL};
static const char *const g_gguf[] = {"gemma2", "gemma3", NULL};
const model_arch lp_arch_gemma = {
    .name = "gemma", .id = LP_ARCH_GEMMA2, .hf_types = g_types, .gguf_archs = g_gguf, .read_hf = read_hf, .read_gguf = read_gguf,
    .random_cfg = random_cfg, .names = &g_names, .forward = decoder_forward, .backward = decoder_backward,
};
