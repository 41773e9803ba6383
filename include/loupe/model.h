/* model.h: loading a checkpoint and running batched forward passes.
 *
 *   lp_model *m;
 *   lp_model_load(&m, "path/to/gpt2", LP_CPU, LP_F32);
 *   lp_hook_capture(m, "blocks.*.hook_resid_post", NULL, 0, NULL);   // hooks.h
 *   lp_model_forward(m, tokens, B, T, LP_WANT_LOSS);
 *   lp_capture_get(m, "blocks.3.hook_resid_post", &t);               // [B, T, d_model]
 *
 * MODEL is a Hugging Face checkpoint directory (config.json plus model.safetensors or
 * sharded *.safetensors with model.safetensors.index.json). Activation memory is sized
 * for the largest batch seen and allocated once (lp_model_prepare, or the first forward
 * that needs more); a forward allocates nothing. */
#ifndef LOUPE_MODEL_H
#define LOUPE_MODEL_H

#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lp_arch { LP_ARCH_GPT2 = 0 } lp_arch;

typedef struct lp_config {
    lp_arch arch;
    char name[64];     /* "gpt2" */
    int n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, n_ctx, d_vocab;
    float ln_eps;
    int tied_unembed;
} lp_config;

typedef struct lp_model lp_model;

lp_status lp_model_load(lp_model **m, const char *path, lp_device dev, lp_dtype dtype);
/* A model of the given shape with random weights (benchmarks): cfg->arch, n_layers,
 * d_model, n_heads, d_mlp, n_ctx and d_vocab are read; the rest is derived. */
lp_status lp_model_random(lp_model **m, const lp_config *cfg, uint64_t seed, lp_device dev, lp_dtype dtype);
void lp_model_free(lp_model *m);
const lp_config *lp_model_config(const lp_model *m);
int64_t lp_model_n_params(const lp_model *m);
lp_ctx *lp_model_ctx(lp_model *m);
/* Bytes loupe holds on the model's device: weights, activations and capture buffers. */
size_t lp_model_device_bytes(const lp_model *m);

/* Sizes and allocates activation and capture memory for batches up to B x T. */
lp_status lp_model_prepare(lp_model *m, int B, int T);

enum {
    LP_WANT_LOSS = 1,   /* per-token next-token losses (lp_model_losses) */
    LP_WANT_LOGITS = 2, /* logits [B,T,V] copied to the host (lp_model_logits) */
};
/* tokens: host int32 [B,T], each in [0, d_vocab). Without LP_WANT_LOSS or LP_WANT_LOGITS
 * the pass stops after the last layer any hook needs. */
lp_status lp_model_forward(lp_model *m, const int32_t *tokens, int B, int T, int want);
/* Host F32 [B,T,V] of the last forward with LP_WANT_LOGITS. */
const float *lp_model_logits(const lp_model *m);
/* Host F32 [B,T-1] of the last forward with LP_WANT_LOSS: loss of predicting token t+1. */
const float *lp_model_losses(const lp_model *m);

#ifdef __cplusplus
}
#endif
#endif
