/* clt.h: a set of transcoders that replaces every MLP of a model, as circuit-tracer
 * (0.5.0) uses them: per-layer transcoders (one per layer, each reading its layer's MLP
 * input and writing its MLP output) and cross-layer transcoders (CLT: the features of
 * layer l read layer l's MLP input and write to the MLP output of every layer j >= l).
 *
 * Notation: L = n_layers, D = d_model, S = d_sae (features per layer, the same for every
 * layer, as circuit-tracer requires), N tokens. Features are numbered per layer:
 * feature (l, f) with 0 <= f < S.
 *
 *   pre_l  = x_l W_enc_l^T + b_enc_l                 x_l: layer l's input [N, D]
 *   f_l    = act(pre_l)
 *   y_j    = b_dec_j + sum_{l <= j} f_l W_dec_l[j - l] (+ x_j W_skip_j^T)
 *            (per-layer: only l = j contributes, W_dec_l has one target)
 * Activations (per layer's pre-activation, elementwise unless said):
 *   relu      max(pre, 0)
 *   jumprelu  pre * (pre > threshold_l[f])   (circuit-tracer's form: no relu, so a
 *             negative threshold lets negative values through)
 *   topk      the k largest pre-activations per token kept as they are, the rest 0 (ties:
 *             lower index first); no relu after the selection, as circuit-tracer's TopK
 *             (x * gate): a chosen negative value stays. circuit-tracer 0.5.0 has no file
 *             form for it (see lp_clt_save)
 *
 * Parameters are F32 on the context's device, in one allocation, in circuit-tracer's
 * orientation except the CLT decoder's first two axes:
 *   W_enc_l  [S, D]           row f is feature (l, f)'s encoder (input) direction
 *   b_enc_l  [S]
 *   W_dec_l  [n_out_l, S, D]  W_dec_l[t][f] is feature (l, f)'s output vector at layer
 *                             l + t; n_out_l = L - l for a CLT, 1 per-layer. (circuit-
 *                             tracer's file holds [S, L - l, D]; loupe keeps one
 *                             contiguous [S, D] matrix per target so decoding is one GEMM
 *                             per (source, target), and converts on read and write.)
 *   b_dec_l  [D]              layer l's output bias
 *   threshold_l [S]           jumprelu only, else NULL
 *   W_skip_l [D, D]           when cfg.skip: skip_l = x_l W_skip_l^T (circuit-tracer's
 *                             per-layer orientation, [out, in]), else NULL
 *
 * Hooks. cfg.input_hook / cfg.output_hook are circuit-tracer's feature_input_hook /
 * feature_output_hook, relative to "blocks.{l}." (e.g. "mlp.hook_in", "hook_mlp_out").
 * lp_clt_hook_name gives the loupe hook that holds the same values (see there). */
#ifndef LOUPE_CLT_H
#define LOUPE_CLT_H

#include "loupe/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lp_clt_kind { LP_CLT_PER_LAYER = 0, LP_CLT_CROSS_LAYER } lp_clt_kind;
typedef enum lp_clt_act { LP_CLT_RELU = 0, LP_CLT_JUMPRELU, LP_CLT_TOPK } lp_clt_act;

/* "per_layer" / "cross_layer" (circuit-tracer's model_kind: "transcoder_set",
 * "cross_layer_transcoder"); "relu", "jumprelu", "topk". Parse returns -1 if unknown
 * (kind also accepts "transcoder_set", "cross_layer_transcoder", "plt", "clt"). */
const char *lp_clt_kind_name(lp_clt_kind k);
int lp_clt_kind_parse(const char *name);
const char *lp_clt_act_name(lp_clt_act a);
int lp_clt_act_parse(const char *name);

typedef struct lp_clt_cfg {
    lp_clt_kind kind;
    lp_clt_act act;
    int n_layers, d_model, d_sae;
    int k;                   /* topk */
    int skip;                /* W_skip per layer */
    char input_hook[64];     /* feature_input_hook, e.g. "mlp.hook_in" */
    char output_hook[64];    /* feature_output_hook, e.g. "hook_mlp_out" */
    char model_name[128];
    char scan[256];          /* circuit-tracer's scan id (may be empty) */
} lp_clt_cfg;

typedef struct lp_clt_layer {
    float *W_enc;            /* [S, D] */
    float *b_enc;            /* [S] */
    float *W_dec;            /* [n_out, S, D] */
    float *b_dec;            /* [D] */
    float *threshold;        /* [S] or NULL */
    float *W_skip;           /* [D, D] or NULL */
    int n_out;               /* targets: layers l .. l + n_out - 1 */
} lp_clt_layer;

typedef struct lp_clt {
    lp_clt_cfg cfg;
    lp_device device;
    void *mem;               /* the one device allocation the layer pointers carve */
    size_t n_floats;         /* floats in mem: layer by layer, fields in the order above */
    lp_clt_layer *layer;     /* [n_layers], host array */
    void *scratch;           /* kept between calls (freed by lp_clt_free) */
    size_t scratch_bytes;
} lp_clt;

/* Checks the config (sizes > 0, k in 1..d_sae for topk, hooks set); the error names the field. */
lp_status lp_clt_cfg_check(const lp_clt_cfg *cfg);
/* Allocates zeroed parameters on c's device. */
lp_status lp_clt_alloc(lp_clt **out, const lp_clt_cfg *cfg, lp_ctx *c);
void lp_clt_free(lp_clt *t, lp_ctx *c);

/* Number of targets of layer l's features (L - l or 1); 0 if l is out of range. */
int lp_clt_n_out(const lp_clt *t, int l);
/* Feature (l, f)'s encoder row: D floats on the transcoder's device (W_enc_l[f]); NULL if
 * out of range. The feature's pre-activation at a token is x_l . enc + b_enc_l[f]. */
const float *lp_clt_enc_vec(const lp_clt *t, int l, int f);
/* Feature (l, f)'s output vector at target layer j: D floats on the transcoder's device
 * (W_dec_l[j - l][f]); NULL when j < l, j >= L, or (per-layer) j != l. An active feature
 * with activation a adds a * dec to layer j's output hook. */
const float *lp_clt_dec_vec(const lp_clt *t, int l, int f, int j);

/* Encode: f[N, S] = act(x W_enc_l^T + b_enc_l) for x [N, D], device buffers on c's device
 * (the transcoder's). pre_only: write the pre-activations instead. */
lp_status lp_clt_encode(lp_clt *t, lp_ctx *c, int l, const float *x, int N, float *f, int pre_only);
/* Decode layer j's output: out[N, D] = b_dec_j + sum_{l <= j} f[l] W_dec_l[j - l]
 * (+ x_j W_skip_j^T when cfg.skip). f[l] is layer l's features [N, S] (f[l] == NULL counts
 * as all zero; per-layer transcoders read only f[j]); x_j is layer j's input [N, D]
 * (needed only with skip; may be NULL otherwise). Uses the transcoder's scratch. */
lp_status lp_clt_decode(lp_clt *t, lp_ctx *c, int j, const float *const *f, const float *x_j, int N, float *out);

/* The loupe hook (full name) that holds what circuit-tracer reads at cfg.input_hook
 * (which = 0) or writes at cfg.output_hook (which = 1) of layer l:
 *   "mlp.hook_in"  -> blocks.l.mlp.hook_in (the MLP's input, ln2's output after its
 *                     weight; present once lp_hooks_add_mlp_in has added it)
 *   "mlp.hook_out" -> blocks.l.hook_mlp_out (the MLP's output: the same values in models
 *                     without post-norms; Gemma's hook_mlp_out is after ln2_post)
 *   anything else (hook_resid_mid, ln2.hook_normalized, hook_mlp_out) -> blocks.l.<name>,
 *   the same name with the same values (TransformerLens 2.16 and 3.x both take
 *   hook_normalized before the norm's weight, as loupe does)
 * Returns LP_ERR_ARG if buf is too small. */
lp_status lp_clt_hook_name(const lp_clt *t, int l, int which, char *buf, size_t n);

/* ---- files: circuit-tracer's layout ----
 * A directory with config.yaml (model_kind: transcoder_set | cross_layer_transcoder,
 * feature_input_hook, feature_output_hook, scan, model_name; plus loupe's own keys
 * activation_function and k, which circuit-tracer ignores) and
 *   per-layer: layer_{l}.safetensors: W_enc [S, D], W_dec [S, D], b_enc [S], b_dec [D],
 *              activation_function.threshold [S] (jumprelu), W_skip [D, D] (skip)
 *   CLT:       W_enc_{l}.safetensors: W_enc_{l} [S, D], b_enc_{l} [S], b_dec_{l} [D],
 *              threshold_{l} [S] (jumprelu); W_dec_{l}.safetensors: W_dec_{l} [S, L - l, D]
 *              (circuit-tracer's CLT files carry no skip; a CLT with skip is refused)
 * Written F32 under temporary names and renamed when complete, config.yaml last.
 * A topk set is written with activation_function: topk, which circuit-tracer 0.5.0 does
 * not read (it would run it as relu). */
lp_status lp_clt_save(const lp_clt *t, lp_ctx *c, const char *dir);
/* Reads that layout onto c's device: F32, BF16 or F16 tensors; a directory without
 * config.yaml is read by its files with circuit-tracer's default hooks (hook_resid_mid,
 * hook_mlp_out). A config.yaml "transcoders" list of local paths (relative to the
 * directory, or absolute) is followed; hf:// entries are refused. A per-layer list of .npz
 * files is Gemma Scope's transcoders (google/gemma-scope-2b-pt-transcoders, as
 * circuit-tracer's load_gemma_scope_transcoder reads them): params.npz (np.savez) with
 * W_enc [D, S] (transposed on reading), W_dec [S, D], b_enc [S], b_dec [D], threshold [S]:
 * JumpReLU, no skip; their config is circuit-tracer's (feature_input_hook
 * ln2.hook_normalized, feature_output_hook hook_mlp_out). Every layer is in one format.
 * Every shape and size is checked; an error names the file and key. */
lp_status lp_clt_load(lp_clt **out, lp_ctx *c, const char *dir);

#ifdef __cplusplus
}
#endif
#endif
