/* llama.c: the Llama family (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5): its tensor
 * names (Hugging Face and GGUF) and its table. RMSNorm, rotary positions, a SwiGLU MLP,
 * q/k/v biases for Qwen2; the config readers are llama_config.c. Weights keep the
 * nn.Linear layout [out, in], which is also the row order of GGUF tensors. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/arch.h"
#include "model/blocks.h"
#include "model/model_cfg.h"

#define QD "num_attention_heads x head_dim"
#define KVD "num_key_value_heads x head_dim"
#define GQD "attention.head_count x attention.key_length"
#define GKVD "attention.head_count_kv x attention.key_length"
static const char *const g_no_prefix[] = {"", NULL};
static const tensor_names g_names = {
    .hf_prefixes = g_no_prefix, .hf_layer = "model.layers.%d.", .hf_embed = "model.embed_tokens.weight",
    .hf_lnf_w = "model.norm.weight", .hf_unembed = "lm_head.weight",
    .hf = {[W_LN1] = "input_layernorm.weight", [W_Q] = "self_attn.q_proj.weight", [W_K] = "self_attn.k_proj.weight",
           [W_V] = "self_attn.v_proj.weight", [W_BQ] = "self_attn.q_proj.bias", [W_BK] = "self_attn.k_proj.bias",
           [W_BV] = "self_attn.v_proj.bias", [W_O] = "self_attn.o_proj.weight", [W_LN2] = "post_attention_layernorm.weight",
           [W_GATE] = "mlp.gate_proj.weight", [W_IN] = "mlp.up_proj.weight", [W_OUT] = "mlp.down_proj.weight"},
    .hf_keys = {[W_LN1] = "hidden_size", [W_LN2] = "hidden_size", [W_Q] = QD ", hidden_size", [W_BQ] = QD,
                [W_K] = KVD ", hidden_size", [W_V] = KVD ", hidden_size", [W_BK] = KVD, [W_BV] = KVD,
                [W_O] = "hidden_size, " QD, [W_GATE] = "intermediate_size, hidden_size", [W_IN] = "intermediate_size, hidden_size",
                [W_OUT] = "hidden_size, intermediate_size"},
    .hf_vocab_keys = "vocab_size, hidden_size", .hf_d_key = "hidden_size", .hf_layers_key = "num_hidden_layers",
    .gg_embed = "token_embd.weight", .gg_lnf_w = "output_norm.weight", .gg_unembed = "output.weight",
    .gg = {[W_LN1] = "attn_norm.weight", [W_Q] = "attn_q.weight", [W_K] = "attn_k.weight", [W_V] = "attn_v.weight",
           [W_BQ] = "attn_q.bias", [W_BK] = "attn_k.bias", [W_BV] = "attn_v.bias", [W_O] = "attn_output.weight",
           [W_LN2] = "ffn_norm.weight", [W_GATE] = "ffn_gate.weight", [W_IN] = "ffn_up.weight", [W_OUT] = "ffn_down.weight"},
    .gg_keys = {[W_LN1] = "embedding_length", [W_LN2] = "embedding_length", [W_Q] = GQD ", embedding_length", [W_BQ] = GQD,
                [W_K] = GKVD ", embedding_length", [W_V] = GKVD ", embedding_length", [W_BK] = GKVD, [W_BV] = GKVD,
                [W_O] = "embedding_length, " GQD, [W_GATE] = "feed_forward_length, embedding_length",
                [W_IN] = "feed_forward_length, embedding_length", [W_OUT] = "embedding_length, feed_forward_length"},
};

static lp_status read_hf(lp_model *m, const char *path, const cJSON *root) {
    m->w.trans = 1;
    return llama_read_hf_config(m, path, root);
}

/* Llama 3.1 GGUFs carry the rope scaling as per-frequency divisors. */
static lp_status read_gguf(lp_model *m, const lp_gguf *g) {
    m->w.trans = 1;
    LP_CHECK(llama_read_gguf_config(m, g));
    const lp_gguf_tensor *rf = lp_gguf_find_tensor(g, "rope_freqs.weight");
    if (!rf) return LP_OK;
    if (rf->type != LP_GGML_F32 || rf->n_elems != m->cfg.d_head / 2)
        LP_FAIL(LP_ERR_FORMAT, "%s: tensor 'rope_freqs.weight' is not F32 [%d]", lp_gguf_path(g), m->cfg.d_head / 2);
    if (!(m->rope.freq_div = malloc(rf->n_elems * sizeof(float)))) LP_FAIL(LP_ERR_OOM, "out of memory");
    memcpy(m->rope.freq_div, rf->data, rf->n_elems * sizeof(float));
    return LP_OK;
}

static lp_status random_cfg(lp_config *c) {
    if (!c->n_kv_heads) c->n_kv_heads = c->n_heads;
    if (!c->d_head && c->n_heads) c->d_head = c->d_model / c->n_heads;
    if (c->ln_eps <= 0) c->ln_eps = 1e-5f;
    if (c->rope_theta <= 0) c->rope_theta = 500000.0;
    snprintf(c->name, sizeof c->name, "llama");
    llama_set_shape(c);
    return llama_check_config("random model", c);
}

static const char *const g_types[] = {"llama", "mistral", "qwen2", NULL};
static const char *const g_gguf[] = {"llama", "qwen2", NULL};
const model_arch lp_arch_llama = {
    .name = "llama", .id = LP_ARCH_LLAMA, .hf_types = g_types, .gguf_archs = g_gguf, .read_hf = read_hf, .read_gguf = read_gguf,
    .random_cfg = random_cfg, .names = &g_names, .forward = decoder_forward, .backward = decoder_backward,
};
