/* model_internal.h: what the model files share: the hook table, the per-hook
 * capture and edit state, and the activation buffers of one forward. */
#ifndef LOUPE_MODEL_INTERNAL_H
#define LOUPE_MODEL_INTERNAL_H

#include "loupe/hooks.h"
#include "loupe/model.h"

/* Hook kinds inside a block, in forward order; the model-level ones follow. */
enum {
    HK_RESID_PRE, HK_LN1_SCALE, HK_LN1_NORM, HK_Q, HK_K, HK_V, HK_ROT_Q, HK_ROT_K, HK_SCORES, HK_PATTERN,
    HK_Z, HK_ATTN_OUT, HK_RESID_MID, HK_LN2_SCALE, HK_LN2_NORM, HK_MLP_PRE, HK_MLP_PRE_LINEAR, HK_MLP_POST,
    HK_MLP_OUT, HK_RESID_POST, HK_PER_LAYER,
    HK_EMBED = HK_PER_LAYER, HK_POS_EMBED, HK_LNF_SCALE, HK_LNF_NORM, HK_UNEMBED_IN, HK_UNEMBED_OUT, HK_N_KINDS,
};
/* Hook points an architecture does not have (GPT-2: no rotary or gated MLP hooks;
 * Llama: no hook_pos_embed) are absent from the table: lp_hook_id gives -1 for them,
 * and lp_hook_site / lp_hook_active treat -1 as "nobody is listening". */

typedef struct edit {
    lp_edit_spec spec; /* arrays below are owned copies */
    float *src_host;
    void *src_dev;     /* act dtype on the device, uploaded at prepare */
    uint8_t *pos_mask_host, *head_mask_host;
    void *pos_mask_dev, *head_mask_dev;
    int mask_len;      /* positions covered by pos_mask_host */
    struct edit *next;
} edit;

typedef struct hook {
    char name[64];
    int kind, layer;     /* layer = n_layers for ln_final and unembed */
    /* view per token: positions are P = T (or queries), heads H, inner E */
    int H, E, head_outer, e_is_pos; /* e_is_pos: E equals T (key positions) */
    int capture;
    int *cap_pos;        /* NULL: all positions */
    int cap_npos;
    void *cap_pos_dev;   /* int32 on the device */
    void *cap_dev;       /* device staging (CUDA only) */
    void *cap_host;      /* host buffer, act dtype */
    size_t cap_bytes_max;
    edit *edits;
} hook;

/* One named weight: where it lives in the weight allocation. */
typedef struct param {
    char name[96];
    int ndim;
    int64_t shape[2];
    size_t offset; /* in elements */
} param;

struct lp_model {
    lp_config cfg;
    lp_ctx ctx;
    char path[1024];
    /* weights: one allocation on the device, carved by the param table */
    param *params;
    int n_params_t;
    int64_t n_params;
    void *weights;
    size_t weight_bytes;
    /* hooks */
    hook *hooks;
    int n_hooks;
    int *hook_index; /* [(n_layers + 1) * HK_N_KINDS]: (layer, kind) -> hook id or -1 */
    int any_hook_dirty;
    /* activations, sized for B_max x T_max: one allocation */
    int B_max, T_max;
    void *acts;
    size_t acts_bytes;
    void *resid, *ln_out, *ln_norm, *ln_scale, *q, *k, *v, *scores, *pattern, *z, *attn_out, *mlp_pre,
        *mlp_lin, *mlp_post, *mlp_out, *logits, *pos_buf;
    int32_t *tok_dev, *tgt_dev;
    float *loss_dev;
    int logit_rows;       /* rows of logits computed per chunk */
    int acts_attn_mats;   /* whether scores and pattern buffers are reserved */
    int unembed;          /* param index of the unembedding ([V, D], used transposed) */
    int32_t *tgt_host;    /* [B_max*T_max] staging for targets */
    float *loss_stage;    /* [B_max*T_max] staging for per-position losses */
    void *logit_stage;    /* one chunk of logits in the act dtype, for the GPU's copy back */
    /* the architecture's forward (gpt2.c, llama.c) */
    lp_status (*forward)(lp_model *m, int B, int T, int want);
    /* rotary tables (Llama family): F32 [rope_n, d_head/2] on the device */
    float *rope_cos, *rope_sin;
    int rope_n;
    float *rope_freq_div; /* host [d_head/2] divisors of the inverse frequencies (GGUF rope_freqs), or NULL */
    /* generation: a KV cache of [2 * n_layers][kv_cap][n_kv_heads * d_head], act dtype;
     * while gen_pos0 >= 0 a forward of batch 1 appends to it at position gen_pos0 */
    void *kv;
    int kv_cap, gen_pos0;
    /* while lp_generate runs: hook sites apply edits at absolute positions (row 0 is
     * gen_pos0, or 0 when a step recomputes the whole sequence) and take no captures */
    int generating;
    /* backward (host/model/backward.c): while taping, the forward keeps what the backward needs
     * per layer in tape[L] ([n_layers] is the final norm) */
    int taping, tape_top;      /* taping: layers 0..tape_top are kept (n_layers: and the final norm) */
    struct tape_layer *tape;
    void *tape_mem;
    size_t tape_bytes;
    void *base_q, *base_k, *base_v, *base_scores, *base_pattern, *base_mlp_pre, *base_mlp_lin, *base_ln_scale;
    void *base_ln_out, *base_z, *base_mlp_post;
    struct grad_state *grad;   /* hook gradients wanted and captured (NULL: none) */
    void *grad_ones;           /* ones in the act dtype, for broadcasts in the backward */
    /* results of the last forward, on the host */
    int B, T;
    float *logits_host, *losses_host;
    size_t logits_rows; /* rows logits_host can hold */
    int have_logits, have_losses;
};

size_t lp_act_size(const lp_model *m); /* bytes per activation element */
lp_status lp_hooks_init(lp_model *m);
void lp_hooks_free(lp_model *m);
/* Allocation and upload of capture buffers, masks and edit sources for B_max x T_max. */
lp_status lp_hooks_prepare(lp_model *m);
/* Whether the hook is captured or edited. */
static inline int lp_hook_active(const lp_model *m, int id) { return id >= 0 && (m->hooks[id].capture || m->hooks[id].edits); }
/* Index of (kind, layer). */
int lp_hook_id(const lp_model *m, int kind, int layer);
/* The last layer any hook touches (-1: none; n_layers: ln_final). */
int lp_hooks_last_layer(const lp_model *m);
/* Runs the edits, then the capture, of hook id on activation act of the current batch. */
lp_status lp_hook_site(lp_model *m, int id, void *act);
/* While generating: refuses a patch edit of hook id that would reach a position in
 * [from, to) its source does not cover, or whose shape grows with the sequence. */
lp_status lp_gen_patch_check(const lp_model *m, int id, int from, int to);
/* Device bytes of a hook's capture buffer (0 on the CPU, where captures live on the host). */
size_t lp_hook_capture_bytes(const lp_model *m, int id);
/* Waits for capture copies of the last forward. */
lp_status lp_hooks_finish(lp_model *m);

/* What the backward of layer L needs from its forward. */
typedef struct tape_layer {
    void *resid_pre, *ln1_scale, *q, *k, *v, *scores, *pattern, *resid_mid, *ln2_scale, *mlp_pre, *mlp_lin;
    /* the linear layers' inputs, kept only where a weight's gradient is wanted */
    void *ln1_out, *z, *ln2_out, *mlp_post;
} tape_layer;

/* Called by the forwards while m->taping: after the resid_pre site of layer L (keeps the
 * residual, points q/k/v/scores/pattern/mlp/ln_scale at the layer's tape), after the
 * resid_mid site, and before the final norm (layer n_layers). */
lp_status lp_tape_layer(lp_model *m, int L);
lp_status lp_tape_mid(lp_model *m, int L);
lp_status lp_tape_final(lp_model *m);
/* Bytes of the tape for a B x T batch (what lp_grad_wanted asks for), carving m->tape_mem
 * into m->tape when `carve`; and the forward's own buffers back once the backward is done. */
size_t lp_tape_layout(lp_model *m, int B, int T, int carve);
void lp_tape_restore(lp_model *m);
#define TAPE(call)                      \
    do {                                \
        if (m->taping) LP_CHECK(call);  \
    } while (0)

/* The backward: the gradient of the metric flows into d_ln_final (the final norm's output,
 * [N, d_model]); each architecture takes it to the embeddings, calling lp_grad_site at
 * every hook point it passes. */
lp_status lp_grad_site(lp_model *m, int kind, int layer, void *grad);
/* Whether the backward must stop at (kind, layer): its gradient is wanted, a direction
 * enters there or the forward edited it (so the backward goes the long way, e.g. through the
 * pattern instead of the fused attention). */
int lp_grad_wanted(const lp_model *m, int kind, int layer);
/* Whether the direction metric's direction enters at (kind, layer). */
int lp_grad_enters(const lp_model *m, int kind, int layer);
/* The Jacobian of hook id's edits applied to grad (its gradient after the edits, the hook's
 * shape for the current batch), in place: zero where an edit replaced the value, unchanged
 * where it steered, as the edit's spec declares for a callback. *unknown is set when a
 * callback's Jacobian is not declared (grad is then left as it is). */
lp_status lp_hook_edit_jacobian(lp_model *m, int id, void *grad, int *unknown);
typedef struct bw_bufs {
    void *dresid, *dtmp, *dln, *dq, *dk, *dv, *dz, *da, *db, *dc, *dpat, *dsc, *dscale, *ones;
    /* only where a norm's scale is edited or a direction enters there: [N, d_model], [N], and
     * d_model values of 1 / d_model */
    void *nrm, *nsc, *invd;
} bw_bufs;
/* top: n_layers to start at the final norm's output (g->dln), else the layer whose
 * resid_post the (zero) gradient starts at. */
lp_status lp_gpt2_backward(lp_model *m, bw_bufs *g, int B, int T, int top);
lp_status lp_llama_backward(lp_model *m, bw_bufs *g, int B, int T, int top);
/* dx of a linear layer out = x W (w_trans 0, W [K,M]) or x W^T (w_trans 1, W [M,K]). */
lp_status lp_bw_linear(lp_ctx *c, void *dx, const void *dy, const void *W, int N, int K, int M, int w_trans);
void lp_grad_free(lp_model *m);
/* Weight gradients: whether any weight of layer L is wanted, and dW of param idx for a
 * linear layer out = x W (w_trans 0, W [K,M]) or x W^T (w_trans 1, W [M,K]) from its input
 * x [N,K] and output gradient dy [N,M] (kept on the host when wanted). */
int lp_param_layer_wanted(const lp_model *m, int L);
lp_status lp_param_grad(lp_model *m, int idx, const void *x, const void *dy, int N, int K, int M, int w_trans);
/* dq, dk, dv from g->dz through layer L's attention (the fused backward, or the three
 * steps with gradient sites at the pattern and the scores when they are wanted). */
lp_status lp_attn_core_backward(lp_model *m, bw_bufs *g, const tape_layer *t, int L, int B, int T);
#define GSITE(kind, layer, buf) LP_CHECK(lp_grad_site(m, (kind), (layer), (buf)))

/* An internal lp_model_forward flag: run every layer and the final norm (into m->ln_out)
 * even when no hook needs them and no logits are wanted (the metric of backward.c). */
#define LP_WANT_FINAL_NORM 0x100

/* Whether any hook needs the [B,H,T,T] score and pattern buffers. */
int lp_hooks_want_attn_mats(const lp_model *m);
/* Whether unembed.hook_out is captured or edited: then the forward keeps all B x T rows of
 * logits at once (otherwise they pass through in row chunks and are never whole). */
int lp_hooks_want_full_logits(const lp_model *m);

/* Address of weight idx of the param table. */
static inline void *lp_param(const lp_model *m, int idx) {
    return m->params[idx].shape[0] ? (char *)m->weights + m->params[idx].offset * lp_act_size(m) : NULL;
}
/* Adds a [rows, cols] weight (cols = 0: a vector; rows = 0: absent) to the param table. */
void lp_param_add(lp_model *m, const char *name, int64_t rows, int64_t cols, size_t *off);
/* Sums the param table into m->n_params. */
void lp_param_count(lp_model *m);

/* The norm before a block (or the final one), into m->ln_out with its hook_scale and
 * hook_normalized sites: LayerNorm with bias for GPT-2, RMSNorm for the Llama family. */
lp_status lp_model_norm(lp_model *m, const void *x, const void *w, const void *b, int k_scale, int k_norm, int L, int N);
/* z from m->q, m->k, m->v (rotated already) of layer L: the KV-cache step when generating,
 * the three steps when a hook or gradient wants the scores or the pattern, else fused. */
lp_status lp_model_attend(lp_model *m, int L, int B, int T);
/* The backward of lp_model_norm from dy at its output (dy may be overwritten), with the
 * hook_scale and hook_normalized gradient sites; dx is written. */
lp_status lp_norm_backward_site(lp_model *m, bw_bufs *g, void *dx, void *dy, const void *x, const void *scale, const void *w,
                                int k_scale, int k_norm, int L, int N);

/* The end of every forward after the final norm: the unembed.hook_in site on m->ln_out
 * [N, D], then, when `want` asks for losses or logits or unembed.hook_out is hooked, the
 * logits through the unembedding (all rows at once with the unembed.hook_out site when it
 * is hooked, else in row chunks), with per-token losses and/or logits copied to the host. */
lp_status lp_model_unembed(lp_model *m, int N, int want);

/* Architecture entry points: load fills cfg, params and weights and sets m->forward. */
lp_status lp_gpt2_load(lp_model *m, const char *dir);
lp_status lp_gpt2_random(lp_model *m, uint64_t seed);
lp_status lp_llama_load(lp_model *m, const char *path); /* HF directory or .gguf file */
lp_status lp_llama_random(lp_model *m, uint64_t seed);
/* (Re)builds the rotary tables for positions [0, n_pos). */
lp_status lp_llama_rope_tables(lp_model *m, int n_pos);

#endif
