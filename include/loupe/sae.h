/* sae.h: sparse autoencoders and transcoders: the parameters, encode/decode, and the
 * files SAELens reads and writes.
 *
 * Architectures (as SAELens names them):
 *   standard   f = relu((x - b_dec?) W_enc + b_enc)                      L1 penalty
 *   topk       f = the k largest pre-activations per token, relu'd       AuxK for dead latents
 *   batchtopk  the k * n_tokens largest over the batch; exported as jumprelu with the
 *              learned global threshold
 *   jumprelu   f = pre * (pre > threshold), threshold per latent          L0 penalty (STE)
 *   x_hat = f W_dec + b_dec (+ x W_skip for a transcoder with a skip connection)
 * A transcoder reads one hook (d_in) and reconstructs another (d_out); an SAE has
 * d_out = d_in and hook_name_out empty.
 *
 * Parameters are F32 on the context's device (one allocation), in the orientation
 * SAELens uses: W_enc [d_in, d_sae], W_dec [d_sae, d_out]. */
#ifndef LOUPE_SAE_H
#define LOUPE_SAE_H

#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lp_sae_arch { LP_SAE_STANDARD = 0, LP_SAE_TOPK, LP_SAE_BATCHTOPK, LP_SAE_JUMPRELU } lp_sae_arch;

/* "standard", "topk", "batchtopk", "jumprelu"; lp_sae_arch_parse returns -1 if unknown. */
const char *lp_sae_arch_name(lp_sae_arch a);
int lp_sae_arch_parse(const char *name);

typedef struct lp_sae_cfg {
    lp_sae_arch arch;
    int d_in, d_sae, d_out;      /* d_out = d_in for an SAE */
    int k;                       /* topk, batchtopk */
    int apply_b_dec_to_input;    /* subtract b_dec from the input before encoding */
    int skip;                    /* transcoder: a linear skip W_skip [d_in, d_out] */
    float jumprelu_bandwidth;    /* straight-through estimator bandwidth (jumprelu) */
    char normalize[32];          /* "none" or "expected_average_only_in" */
    char model_name[128], hook_name[128], hook_name_out[128];
    int context_size;
} lp_sae_cfg;

typedef struct lp_sae {
    lp_sae_cfg cfg;
    lp_device device;
    void *mem;                   /* the one allocation the pointers below carve */
    float *W_enc;                /* [d_in, d_sae] */
    float *b_enc;                /* [d_sae] */
    float *W_dec;                /* [d_sae, d_out] */
    float *b_dec;                /* [d_out] */
    float *threshold;            /* [d_sae] for jumprelu and batchtopk, else NULL */
    float *W_skip;               /* [d_in, d_out] when cfg.skip, else NULL */
    size_t n_floats;             /* floats in mem, in the order above */
    /* kept between calls by the code that runs an SAE once per request (attribution), so
     * that a request allocates nothing once they are large enough; freed by lp_sae_free */
    void *runner_cache;          /* a runner for runner_cache_n tokens (host/sae/sae_runner.c) */
    int runner_cache_n;
    void *scratch;               /* scratch_bytes on the SAE's device */
    size_t scratch_bytes;
} lp_sae;

/* Checks the config (d_in, d_sae > 0, 0 < k <= d_sae for topk/batchtopk, known
 * normalize, ...); the error names the bad field. */
lp_status lp_sae_cfg_check(const lp_sae_cfg *cfg);
/* Allocates zeroed parameters on c's device. */
lp_status lp_sae_alloc(lp_sae **out, const lp_sae_cfg *cfg, lp_ctx *c);
void lp_sae_free(lp_sae *s, lp_ctx *c);

/* ---- files ----
 * SAELens layout: a directory with cfg.json (architecture, d_in, d_sae, dtype, device,
 * apply_b_dec_to_input, normalize_activations, k for topk, metadata: model_name,
 * hook_name, context_size, ...) and sae_weights.safetensors (W_enc, W_dec, b_enc, b_dec,
 * threshold for jumprelu). Written under temporary names and renamed when complete.
 * A batchtopk SAE is written as jumprelu with its global threshold in every latent.
 * `scale` is the activation normalization factor the SAE was trained with (inputs were
 * multiplied by it); it is folded into the weights so the file takes raw activations. */
lp_status lp_sae_save(const lp_sae *s, lp_ctx *c, const char *dir, float scale);
/* Reads the SAELens layout, Gemma Scope (params.npz or params.safetensors: W_enc, W_dec,
 * b_enc, b_dec, threshold; a directory or the file) or sparsify (cfg.json +
 * sae.safetensors: encoder.weight [d_sae, d_in], encoder.bias, W_dec, b_dec; TopK),
 * converting orientation, onto c's device. */
lp_status lp_sae_load(lp_sae **out, lp_ctx *c, const char *path);

/* ---- the SAE spliced into a model ----
 * An edit at the SAE's hook (cfg.hook_name) that replaces the activation by the SAE's
 * reconstruction x_hat, token by token, in every forward and while generating (the
 * splice is per token, so the KV cache sees the same values as a forward over the whole
 * sequence). Options:
 *   with_error: add back the reconstruction error x - x_hat (SAELens / TransformerLens
 *     "splice with error"): the hook's value is then x itself unless latents are clamped,
 *     so a clamp changes exactly that latent's contribution and nothing else;
 *   clamp: latent clamp_latents[i] is set to clamp_values[i] in the reconstruction
 *     (x_hat += (value - f_latent) W_dec[latent]), the usual SAE feature steering;
 *   pos/npos: only these absolute positions are spliced (NULL = all); the others keep x.
 * The model must run in F32 on the SAE's device; transcoders are refused. The splice
 * holds buffers for forwards of up to n_ctx tokens in all (one sequence); free it after lp_hooks_clear (the edit keeps a
 * pointer to it). */
typedef struct lp_model lp_model;
typedef struct lp_sae_splice_opts {
    int with_error;
    const int *clamp_latents;
    const float *clamp_values;
    int n_clamp;
    const int *pos;
    int npos;
} lp_sae_splice_opts;
typedef struct lp_sae_splice lp_sae_splice;
/* Checks the SAE against the model (its hook exists, d_in is the hook's width, clamped
 * latents are in range) and adds the edit; o may be NULL (plain splice). */
lp_status lp_sae_splice_add(lp_sae_splice **out, lp_model *m, lp_sae *s, const lp_sae_splice_opts *o);
void lp_sae_splice_free(lp_sae_splice *sp);

#ifdef __cplusplus
}
#endif
#endif
