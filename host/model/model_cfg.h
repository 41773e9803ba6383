/* model_cfg.h: reading a checkpoint's config.json (and GGUF metadata) into lp_config
 * with every value checked where it is read: numbers in range and finite, sizes inside
 * bounds that keep every product of two dimensions far from overflow, and each failure
 * one line naming the file and the key. The dimensions are then checked against the
 * checkpoint's tensors (gpt2.c, llama.c) before any table or buffer is sized. */
#ifndef LOUPE_MODEL_CFG_H
#define LOUPE_MODEL_CFG_H

#include "io/json.h" /* lp_jcfg_*: the readers of config.json values, kept here for model/ */
#include "loupe/gguf.h"
#include "loupe/model.h"

/* Upper bounds of the model's dimensions: generous beyond any released model (405B:
 * 126 layers, d_model 16384, d_mlp 53248; vocabularies up to 262144; contexts up to 10M),
 * and small enough that heads x d_head, d_model x d_mlp and d_vocab x d_model fit in
 * int64 and heads x d_head in int. */
enum {
    LP_MAX_LAYERS = 1 << 14,
    LP_MAX_D_MODEL = 1 << 18,
    LP_MAX_HEADS = 1 << 14,
    LP_MAX_D_HEAD = 1 << 12,
    LP_MAX_D_MLP = 1 << 20,
    LP_MAX_VOCAB = 1 << 24,
    LP_MAX_CTX = 1 << 24,
};

/* The Llama family's config (llama_config.c): config.json of a Hugging Face directory
 * (transformers 4 and 5 layouts), or GGUF metadata. Fills m->cfg; sizes nothing. */
lp_status llama_read_hf_config(lp_model *m, const char *path, const cJSON *root);
lp_status llama_read_gguf_config(lp_model *m, const lp_gguf *g);
/* What makes a block the Llama family's (RMSNorm, rotary, SwiGLU). */
void llama_set_shape(lp_config *c);
/* Invariants of a Llama-family config, whatever it came from (`what` names it). */
lp_status llama_check_config(const char *what, const lp_config *c);

#endif
