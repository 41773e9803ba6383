/* weights.h: the weight table and the one streaming loader (weights.c). Every family's
 * weights are laid out the same way (model-level weights, then each layer's by role, W_*)
 * and named by a table of the checkpoint's tensor names; the loader checks every tensor the
 * config implies against the checkpoint, then converts them one at a time into the single
 * device allocation (safetensors in F32/F16/BF16, GGUF dequantized on the device for a CUDA
 * model), so the model is never whole twice in host memory. */
#ifndef LOUPE_MODEL_WEIGHTS_H
#define LOUPE_MODEL_WEIGHTS_H

#include "loupe/gguf.h"
#include "model/model_internal.h"

/* A family's names for its tensors. Layer names follow a printf prefix with the layer
 * number ("model.layers.%d." / "blk.%d."); NULL where the family has no such weight. */
typedef struct tensor_names {
    /* Hugging Face: prefixes tried in order (the first under which the embedding exists), then
     * model-level names (the unembedding is never prefixed) and per-role names */
    const char *const *hf_prefixes;
    const char *hf_embed, *hf_pos, *hf_lnf_w, *hf_lnf_b, *hf_unembed, *hf_layer;
    const char *hf[W_PER_LAYER];
    /* GPT-2: k > 0 when the role's tensor is slice k-1 of 3 along the output axis (c_attn) */
    int hf_split[W_PER_LAYER];
    /* the config keys behind each role's shape, for messages; and the layer count's key */
    const char *hf_keys[W_PER_LAYER], *hf_vocab_keys, *hf_d_key, *hf_layers_key;
    /* GGUF (the same roles; NULL: the family has no GGUF form) */
    const char *gg_embed, *gg_lnf_w, *gg_unembed;
    const char *gg[W_PER_LAYER];
    const char *gg_keys[W_PER_LAYER];
    /* norm weights w that the model uses as 1 + w (Gemma): added at load from Hugging Face
     * checkpoints, whose files hold w (llama.cpp's GGUF holds 1 + w already) */
    int hf_norm_plus_one;
} tensor_names;

/* Lays out the table for m->cfg (sizes from the config, roles absent where it says so) and
 * allocates the weights. own_unembed: a separate unembedding (else the embedding, tied). */
lp_status weights_alloc(lp_model *m, int own_unembed);
/* The shape of layer role r for config c ([rows, cols]; cols 0 for a vector, rows 0 when the
 * config has no such weight), in the layout `trans`. */
void weights_role_shape(const lp_config *c, int trans, int r, int64_t *rows, int64_t *cols);
/* Loads a Hugging Face directory / a GGUF file, whose config m->cfg already holds (checked
 * against the files before anything is allocated). `cfg_path` names the config in messages. */
lp_status weights_load_hf(lp_model *m, const tensor_names *nm, const char *dir, const char *cfg_path);
lp_status weights_load_gguf(lp_model *m, const tensor_names *nm, const lp_gguf *g);
/* Random weights for benchmarks (norm weights near 1), generated tensor by tensor where they
 * live (on the device for a CUDA model). */
lp_status weights_random(lp_model *m, uint64_t seed);
void weights_free(lp_model *m);

#endif
