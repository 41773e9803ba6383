/* gpt2.c: GPT-2 (Hugging Face checkpoints, the hub layout and the save_pretrained one):
 * its config, its tensor names, and its forward and backward as scripts of blocks.
 *
 * LayerNorm with biases, learned position embeddings, a GELU MLP, biases on every linear
 * layer; weights kept as [in, out] (Conv1D's layout), with c_attn split into W_Q, W_K, W_V
 * so that tensor-parallel column splits stay possible; the unembedding is the tied wte
 * ([V, D], used transposed) unless the checkpoint has its own lm_head. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#include "model/arch.h"
#include "model/blocks.h"
#include "model/model_cfg.h"

#define REFUSE(...)                                     \
    do {                                                \
        st = LP_ERR(LP_ERR_FORMAT, __VA_ARGS__);        \
        goto done;                                      \
    } while (0)

/* What makes a block GPT-2's (the config's zeros, spelled out). */
static void set_shape(lp_config *c) {
    c->arch = LP_ARCH_GPT2;
    snprintf(c->name, sizeof c->name, "gpt2");
    c->norm = LP_NORM_LAYER, c->pos = LP_POS_LEARNED, c->mlp = LP_MLP_GELU, c->linear_bias = 1;
}

static lp_status read_hf(lp_model *m, const char *path, const cJSON *root) {
    lp_status st = LP_OK;
    lp_config *c = &m->cfg;
    const char *act;
    int flag;
    set_shape(c);
    LP_TRY(st, done, jcfg_int(path, root, "n_layer", 1, LP_MAX_LAYERS, -1, &c->n_layers));
    LP_TRY(st, done, jcfg_int(path, root, "n_embd", 1, LP_MAX_D_MODEL, -1, &c->d_model));
    LP_TRY(st, done, jcfg_int(path, root, "n_head", 1, LP_MAX_HEADS, -1, &c->n_heads));
    /* old hub configs also say n_ctx; transformers reads n_positions */
    int has_pos = cJSON_GetObjectItemCaseSensitive(root, "n_positions") != NULL;
    LP_TRY(st, done, jcfg_int(path, root, has_pos ? "n_positions" : "n_ctx", 1, LP_MAX_CTX, -1, &c->n_ctx));
    LP_TRY(st, done, jcfg_int(path, root, "vocab_size", 1, LP_MAX_VOCAB, -1, &c->d_vocab));
    LP_TRY(st, done, jcfg_int(path, root, "n_inner", 1, LP_MAX_D_MLP, 4 * c->d_model, &c->d_mlp));
    if (c->d_model % c->n_heads != 0) REFUSE("%s: \"n_embd\" %d is not a multiple of \"n_head\" %d", path, c->d_model, c->n_heads);
    c->n_kv_heads = c->n_heads;
    c->d_head = c->d_model / c->n_heads;
    double eps;
    LP_TRY(st, done, jcfg_num(path, root, "", "layer_norm_epsilon", 0, 1, 1e-5, &eps));
    c->ln_eps = (float)eps;
    if (!(c->ln_eps > 0)) REFUSE("%s: \"layer_norm_epsilon\" = %g underflows float32", path, eps);
    LP_TRY(st, done, jcfg_str(path, root, "", "activation_function", "gelu_new", &act));
    if (strcmp(act, "gelu_new") != 0 && strcmp(act, "gelu_pytorch_tanh") != 0)
        REFUSE("%s: \"activation_function\" '%s' is not supported (gelu_new, gelu_pytorch_tanh)", path, act);
    /* attention variants transformers' GPT-2 implements and loupe does not */
    LP_TRY(st, done, jcfg_bool(path, root, "scale_attn_weights", 1, &flag));
    if (!flag) REFUSE("%s: \"scale_attn_weights\" = false is not supported", path);
    LP_TRY(st, done, jcfg_bool(path, root, "scale_attn_by_inverse_layer_idx", 0, &flag));
    if (flag) REFUSE("%s: \"scale_attn_by_inverse_layer_idx\" = true is not supported", path);
    LP_TRY(st, done, jcfg_bool(path, root, "add_cross_attention", 0, &flag));
    if (flag) REFUSE("%s: \"add_cross_attention\" = true is not supported", path);
    LP_TRY(st, done, jcfg_bool(path, root, "tie_word_embeddings", 1, &c->tied_unembed));
done:
    return st;
}

static lp_status random_cfg(lp_config *c) {
    if (c->n_layers < 1 || c->d_model < 1 || c->n_heads < 1 || c->d_model % c->n_heads || c->d_mlp < 1 || c->n_ctx < 1 || c->d_vocab < 1)
        LP_FAIL(LP_ERR_ARG, "random model: impossible shape");
    set_shape(c);
    c->n_kv_heads = c->n_heads, c->d_head = c->d_model / c->n_heads, c->tied_unembed = 1;
    if (c->ln_eps <= 0) c->ln_eps = 1e-5f;
    if (c->n_layers > LP_MAX_LAYERS || c->d_model > LP_MAX_D_MODEL || c->d_mlp > LP_MAX_D_MLP || c->n_ctx > LP_MAX_CTX ||
        c->d_vocab > LP_MAX_VOCAB)
        LP_FAIL(LP_ERR_ARG, "random model: a dimension exceeds loupe's bounds");
    return LP_OK;
}

static const char *const g_prefixes[] = {"transformer.", "", NULL}; /* save_pretrained writes "transformer." */
#define DK "n_embd"
static const tensor_names g_names = {
    .hf_prefixes = g_prefixes, .hf_layer = "h.%d.", .hf_embed = "wte.weight", .hf_pos = "wpe.weight",
    .hf_lnf_w = "ln_f.weight", .hf_lnf_b = "ln_f.bias", .hf_unembed = "lm_head.weight",
    .hf = {[W_LN1] = "ln_1.weight", [W_LN1_B] = "ln_1.bias", [W_Q] = "attn.c_attn.weight", [W_K] = "attn.c_attn.weight",
           [W_V] = "attn.c_attn.weight", [W_BQ] = "attn.c_attn.bias", [W_BK] = "attn.c_attn.bias", [W_BV] = "attn.c_attn.bias",
           [W_O] = "attn.c_proj.weight", [W_BO] = "attn.c_proj.bias", [W_LN2] = "ln_2.weight", [W_LN2_B] = "ln_2.bias",
           [W_IN] = "mlp.c_fc.weight", [W_BIN] = "mlp.c_fc.bias", [W_OUT] = "mlp.c_proj.weight", [W_BOUT] = "mlp.c_proj.bias"},
    .hf_split = {[W_Q] = 1, [W_K] = 2, [W_V] = 3, [W_BQ] = 1, [W_BK] = 2, [W_BV] = 3},
    .hf_keys = {[W_LN1] = DK, [W_LN1_B] = DK, [W_Q] = DK ", 3 x " DK, [W_K] = DK ", 3 x " DK, [W_V] = DK ", 3 x " DK,
                [W_BQ] = "3 x " DK, [W_BK] = "3 x " DK, [W_BV] = "3 x " DK, [W_O] = DK ", " DK, [W_BO] = DK, [W_LN2] = DK,
                [W_LN2_B] = DK, [W_IN] = DK ", n_inner", [W_BIN] = "n_inner", [W_OUT] = "n_inner, " DK, [W_BOUT] = DK},
    .hf_vocab_keys = "vocab_size, " DK, .hf_d_key = DK ", n_positions", .hf_layers_key = "n_layer",
};

static const char *const g_types[] = {"gpt2", NULL};
const model_arch lp_arch_gpt2 = {
    .name = "gpt2", .id = LP_ARCH_GPT2, .hf_types = g_types, .gguf_archs = NULL, .read_hf = read_hf, .read_gguf = NULL,
    .random_cfg = random_cfg, .names = &g_names, .forward = decoder_forward, .backward = decoder_backward,
};
