/* arch.h: the architecture interface. Each model family is one table (gpt2.c, llama.c,
 * gemma.c); the registry (registry.c) finds the table for a Hugging Face model_type or a GGUF
 * general.architecture, and the rest of loupe reaches an architecture only through it.
 *
 * What a family differs in is data: the config fields of lp_config (norm kind, position
 * kind, MLP kind, post-norms, q/k norms, soft-caps, sliding windows; read by the shared
 * blocks of blocks.h) and the names of its tensors (the weight table of weights.h). What is
 * left is code: a config reader, and a forward and backward that read as short scripts of
 * block calls and hook sites. */
#ifndef LOUPE_MODEL_ARCH_H
#define LOUPE_MODEL_ARCH_H

#include "model/model_cfg.h"
#include "loupe/gguf.h"
#include "model/model_internal.h"
#include "model/weights.h"

struct model_arch {
    const char *name;
    lp_arch id;
    const char *const *hf_types;   /* config.json model_type values, NULL-terminated */
    const char *const *gguf_archs; /* GGUF general.architecture values, NULL-terminated (none: NULL) */
    /* Fills m->cfg from config.json (root, parsed once by the caller; path names it in messages). */
    lp_status (*read_hf)(lp_model *m, const char *path, const cJSON *root);
    /* Fills m->cfg from GGUF metadata. */
    lp_status (*read_gguf)(lp_model *m, const lp_gguf *g);
    /* Fills the derived fields of a random model's config (lp_model_random) and checks it. */
    lp_status (*random_cfg)(lp_config *c);
    /* The checkpoint's names for each weight (weights.h). */
    const tensor_names *names;
    /* The forward of a batch of m->res.B x m->res.T tokens (in m->a.tok) to the logits. */
    lp_status (*forward)(lp_model *m, int B, int T, int want);
    /* Takes g->dln (the gradient at the final norm's output; top == n_layers) or g->dresid
     * (at layer top's resid_post) down to the embeddings, through every gradient site. */
    lp_status (*backward)(lp_model *m, bw_bufs *g, int B, int T, int top);
};

/* The table for a model_type / a GGUF architecture; NULL when loupe has none. */
const model_arch *arch_for_hf(const char *model_type);
const model_arch *arch_for_gguf(const char *arch);
const model_arch *arch_for_id(lp_arch id);
/* "gpt2, llama, ..." : the supported names, for messages. */
const char *arch_hf_list(void);
const char *arch_gguf_list(void);

extern const model_arch lp_arch_gpt2, lp_arch_llama, lp_arch_gemma;

#endif
