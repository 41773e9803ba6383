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

typedef enum lp_arch {
    LP_ARCH_GPT2 = 0,
    LP_ARCH_LLAMA,  /* Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/2.5 (q/k/v biases) */
    LP_ARCH_GEMMA2, /* Hugging Face gemma2 */
    LP_ARCH_GEMMA3, /* Hugging Face gemma3_text (and the text model of gemma3) */
} lp_arch;

/* Rotary scaling (config.json rope_scaling / GGUF llama.rope.scaling.*). */
typedef enum lp_rope_kind { LP_ROPE_DEFAULT = 0, LP_ROPE_LLAMA3, LP_ROPE_LINEAR } lp_rope_kind;

/* How the architectures differ, as fields the shared blocks read (host/model/blocks.c). */
typedef enum lp_norm_kind { LP_NORM_LAYER = 0, LP_NORM_RMS } lp_norm_kind;  /* LayerNorm with bias, or RMSNorm */
typedef enum lp_pos_kind { LP_POS_LEARNED = 0, LP_POS_ROTARY } lp_pos_kind; /* added position embedding, or rotary */
typedef enum lp_mlp_kind {
    LP_MLP_GELU = 0, /* W_out gelu_tanh(x W_in + b_in) + b_out (GPT-2) */
    LP_MLP_SWIGLU,   /* W_out (silu(x W_gate) * x W_in) (Llama) */
    LP_MLP_GEGLU,    /* W_out (gelu_tanh(x W_gate) * x W_in) (Gemma) */
} lp_mlp_kind;

typedef struct lp_config {
    lp_arch arch;
    char name[64];     /* "gpt2" */
    int n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, n_ctx, d_vocab;
    float ln_eps;       /* LayerNorm or RMSNorm epsilon */
    int tied_unembed;
    /* Llama family */
    int qkv_bias;       /* Qwen2: q/k/v biases */
    int linear_bias;    /* GPT-2: every linear layer has a bias */
    double rope_theta;
    lp_rope_kind rope_kind;
    double rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_orig_ctx;  /* llama3: original_max_position_embeddings */
    /* the shape of a block (set by the architecture: GPT-2 is all zeros) */
    lp_norm_kind norm;
    lp_pos_kind pos;
    lp_mlp_kind mlp;
    int post_norms;       /* Gemma: RMSNorm of the attention and MLP outputs before each residual add */
    int qk_norm;          /* Gemma 3: RMSNorm of every head's q and k before the rotary */
    float embed_scale;    /* the embedding times this (Gemma: sqrt(d_model)); 0: 1 */
    float attn_scale;     /* the multiplier of q.k (Gemma: query_pre_attn_scalar^-1/2); 0: d_head^-1/2 */
    float attn_softcap;   /* > 0: scores = c tanh(scores / c) (Gemma 2) */
    float final_softcap;  /* > 0: logits = c tanh(logits / c) (Gemma 2) */
    int sliding_window;   /* > 0: local layers attend to the last sliding_window positions only */
    int window_pattern;   /* local layers: those with (L + 1) % window_pattern != 0 (Gemma 2: 2, Gemma 3: 6); 0: all */
    double rope_theta_local; /* the rotary base of local layers (Gemma 3); 0: rope_theta, and no scaling there either */
} lp_config;

/* Whether layer L attends through the sliding window. */
static inline int lp_config_local(const lp_config *c, int L) {
    return c->sliding_window > 0 && (c->window_pattern <= 0 || (L + 1) % c->window_pattern != 0);
}

typedef struct lp_model lp_model;

lp_status lp_model_load(lp_model **m, const char *path, lp_device dev, lp_dtype dtype);
/* The same model split over the tensor-parallel group of d (dist.h; NULL or a group of one:
 * lp_model_load). Every rank of the group calls it and every later forward, backward and
 * hook call alike; each rank reads and holds only its slice of the weights (Megatron-style:
 * q/k/v by heads, gate/up/W_in by columns, attention-out and MLP-out by rows, the
 * unembedding by vocabulary). Logits, losses, captures, edits and gradients at hooks read
 * and write the same full shapes as in one process, on every rank of the group. */
typedef struct lp_dist lp_dist;
lp_status lp_model_load_dist(lp_model **m, const char *path, lp_device dev, lp_dtype dtype, lp_dist *d);
/* The group the model was loaded over (NULL: one process). */
lp_dist *lp_model_dist(const lp_model *m);
/* A model of the given shape with random weights (benchmarks): cfg->arch, n_layers,
 * d_model, n_heads, d_mlp, n_ctx and d_vocab are read; the rest is derived. */
lp_status lp_model_random(lp_model **m, const lp_config *cfg, uint64_t seed, lp_device dev, lp_dtype dtype);
/* The same split over d's tensor-parallel group (each rank random values of its slice's
 * shapes: not lp_model_random's model cut in pieces; for timing tensor parallelism). */
lp_status lp_model_random_dist(lp_model **m, const lp_config *cfg, uint64_t seed, lp_device dev, lp_dtype dtype, lp_dist *d);
/* Tensor parallelism (a model split over TP > 1 ranks): a forward may run its layers with
 * the batch in micro-batches of whole sequences, block by block, each part's all-reduce
 * started and waited for only when that part's next block needs it, so that one part's
 * communication travels while the others compute (dist.h's started collectives). Only a
 * plain forward does: no hook captured, edited or scored, no gradient, no generation;
 * anything else runs the plain schedule (two all-reduces per layer, each waited for at
 * once). The results agree with the plain schedule's to rounding (each GEMM sees fewer
 * rows). parts: 0 (the default: lp_model_tp_parts chooses per forward), 1 (always the plain
 * schedule), or 2 to LP_DIST_MAX_STARTED (8) equal parts (the plain schedule when they do not
 * divide the batch); else LP_ERR_ARG. */
lp_status lp_model_set_tp_overlap(lp_model *m, int parts);
/* The micro-batches a forward of B sequences runs under the setting `parts` (above): their
 * number (1: the plain schedule), and in seqs[0..n) (room for LP_DIST_MAX_STARTED) the
 * sequences of each, in batch order. The default (parts = 0) is three parts of B/4, B/2
 * and B/4 sequences when 4 divides B, else two halves of an even batch, else the plain
 * schedule. Why a short first and last part: every part's all-reduce is covered by the
 * compute of the parts after it in the same block and before it in the next, so a short
 * first part starts the communication early and a short last part leaves little of it
 * exposed before the next block, while the long middle part keeps its GEMMs wide
 * (scripts/tp-estimate.py plays the schedules out; README, "Running on a cluster"). */
int lp_model_tp_parts(int B, int parts, int *seqs);
/* The number of micro-batches the last forward ran its layers in: 1 for the plain schedule. */
int lp_model_tp_overlapped(const lp_model *m);
void lp_model_free(lp_model *m);
const lp_config *lp_model_config(const lp_model *m);
int64_t lp_model_n_params(const lp_model *m);
lp_ctx *lp_model_ctx(lp_model *m);
/* Bytes loupe holds on the model's device: weights, activations and capture buffers. */
size_t lp_model_device_bytes(const lp_model *m);

/* The unembedding as host F32 W_U [d_vocab, d_model] (row v writes token v's logit) and
 * the final norm's scale [d_model] (ln_w may be NULL): what a residual direction means
 * in tokens (dashboards' logit tables). */
lp_status lp_model_unembed_weights(lp_model *m, float *W_U, float *ln_w);

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

/* ---- generation with a KV cache ---- */
typedef struct lp_gen_opts {
    int max_tokens;      /* new tokens at most */
    float temperature;   /* 0: greedy (argmax) */
    float top_p;         /* nucleus sampling; 1 = off */
    uint64_t seed;
    int stop_token;      /* stop after emitting this id (e.g. EOS); -1 = never */
    /* called with each new token as it is chosen (may be NULL); non-OK stops */
    lp_status (*on_token)(int32_t id, void *user);
    void *user;
    /* called before step k (0-based) picks its token, with the F32 logits it picks from
     * (n_vocab values, valid during the call; may be NULL); non-OK stops */
    lp_status (*on_logits)(int step, const float *logits, int n_vocab, void *user);
} lp_gen_opts;

/* Continues prompt[0..n_prompt) (batch 1) for up to o->max_tokens tokens; writes the
 * new ids to out (capacity o->max_tokens) and their count to *n_out. The prompt plus the
 * new tokens must fit in the model's context.
 * The hooks' edits are active while generating, at absolute positions of the sequence
 * (prompt then new tokens; see hooks.h): the tokens and logits are those of greedy or
 * sampled decoding by forwards over the whole growing sequence with the same edits, the
 * KV cache holding keys and values as those edits made them. Captures are not taken. */
lp_status lp_generate(lp_model *m, const int32_t *prompt, int n_prompt, const lp_gen_opts *o, int32_t *out,
                      int *n_out);

#ifdef __cplusplus
}
#endif
#endif
