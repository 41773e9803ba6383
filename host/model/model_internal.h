/* model_internal.h: host/model/, the model layer: what a model is in memory and what its
 * files share. The layer owns the hook table and the hook sites (hooks.c), the weight table
 * and the one streaming loader (weights.c), the architectures (gpt2.c, llama.c, gemma.c, each
 * one table: arch.h) and their registry (registry.c), the blocks every architecture is
 * written in, each forward beside its backward (blocks.c, attend.c), the model driver
 * (model.c), the tape and the gradients (tape.c, grad.c, metric.c) and generation
 * (generate.c). It uses core/, ops/ and io/ only; store/, sae/ and everything above use it
 * through include/loupe/model.h and hooks.h (and, for the few that need weights or hook
 * internals, this header).
 *
 * lp_model is split by lifetime: weights (load to free), hooks (registered by the user),
 * acts (one forward's buffers, resized by prepare), kv (while generating), rope tables,
 * the tape (one backward), grad (kept gradients) and res (results of the last forward). */
#ifndef LOUPE_MODEL_INTERNAL_H
#define LOUPE_MODEL_INTERNAL_H

#include "loupe/hooks.h"
#include "loupe/model.h"

/* Hook kinds inside a block, in forward order; the model-level ones follow. */
enum {
    HK_RESID_PRE, HK_LN1_SCALE, HK_LN1_NORM, HK_Q, HK_K, HK_V, HK_QN_SCALE, HK_QN_NORM, HK_KN_SCALE, HK_KN_NORM,
    HK_ROT_Q, HK_ROT_K, HK_SCORES, HK_PATTERN, HK_Z, HK_LN1P_SCALE, HK_LN1P_NORM, HK_ATTN_OUT, HK_RESID_MID,
    HK_LN2_SCALE, HK_LN2_NORM, HK_MLP_IN, HK_MLP_PRE, HK_MLP_PRE_LINEAR, HK_MLP_POST, HK_LN2P_SCALE, HK_LN2P_NORM, HK_MLP_OUT,
    HK_RESID_POST, HK_PER_LAYER,
    HK_EMBED = HK_PER_LAYER, HK_POS_EMBED, HK_LNF_SCALE, HK_LNF_NORM, HK_UNEMBED_IN, HK_UNEMBED_OUT, HK_N_KINDS,
};
/* Hook points an architecture does not have (GPT-2: no rotary or gated MLP hooks; Llama: no
 * hook_pos_embed; only Gemma has the post-norms' and q/k norms' hooks) are absent from the
 * table: hook_id gives -1 for them, and hook_site / hook_active treat -1 as "nobody
 * is listening". */

typedef struct edit {
    lp_edit_spec spec; /* arrays below are owned copies */
    float *src_host;
    void *src_dev;     /* act dtype on the device, uploaded at prepare */
    uint8_t *pos_mask_host, *head_mask_host;
    void *pos_mask_dev, *head_mask_dev;
    int mask_len;      /* positions covered by pos_mask_host */
    int borrowed;      /* src_dev is the caller's (score_patch): never released here */
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
    void *cap_pos_dev;   /* int32 on the device (the CPU: cap_pos itself) */
    int cap_pos_dev_n;   /* positions cap_pos_dev holds (CUDA) */
    void *cap_dev;       /* device staging (CUDA only) */
    void *cap_host;      /* host buffer, act dtype */
    size_t cap_bytes_max;
    edit *edits;
    /* node scores fused into the backward (score.h): marked, and whether this run scores it
     * (what its sites do then is the score phase's); the reference and the current activation
     * on the device, kept across runs like the capture buffers; its rows' offset in the scores */
    int s_mark, score;
    size_t s_per, s_off, s_bytes;
    void *s_ref, *s_cur;
} hook;

/* One named weight: where it lives in the weight allocation. */
typedef struct param {
    char name[96];
    int ndim;
    int64_t shape[2];    /* rows 0: the model has no such weight */
    size_t offset;       /* in elements */
} param;

/* The weights of a block, by role: every architecture's table is laid out this way (roles it
 * lacks have zero rows), so that the blocks find a weight by its role alone. */
enum {
    W_LN1, W_LN1_B, W_Q, W_K, W_V, W_BQ, W_BK, W_BV, W_QN, W_KN, W_O, W_BO, W_LN1P,
    W_LN2, W_LN2_B, W_GATE, W_IN, W_BIN, W_OUT, W_BOUT, W_LN2P, W_PER_LAYER,
};

/* Weights: one allocation on the device, carved by the param table (load to free). */
typedef struct mdl_weights {
    param *params;
    int n;                /* entries of params */
    int64_t n_params;     /* values in all of them */
    void *mem;
    size_t bytes;
    int trans;            /* linear weights [out, in] (1: nn.Linear, GGUF) or [in, out] (0: GPT-2's Conv1D) */
    int embed, pos_embed; /* param indices: [V, D] and [n_ctx, D] (-1: none) */
    int first_layer;      /* layer L's role r is params[first_layer + L * W_PER_LAYER + r] */
    int lnf_w, lnf_b;     /* [D] each (lnf_b -1: none) */
    int unembed;          /* [V, D], used transposed (the embedding when tied) */
} mdl_weights;

/* One forward's buffers, sized for B_max x T_max: one allocation (resized by prepare). */
typedef struct mdl_acts {
    int B_max, T_max;
    void *mem;
    size_t bytes;
    void *resid;          /* [B, T, D] the residual stream */
    void *ln_out;         /* [B, T, D] the last norm's output (after its weight) */
    void *ln_norm;        /* [B, T, D] its normalized value, only while a hook reads it */
    void *ln_scale;       /* [B, T] */
    void *q;              /* [B, T, H, dh] */
    void *k, *v;          /* [B, T, Hkv, dh] */
    void *q_pre, *k_pre;  /* [B, T, H | Hkv, dh] q and k before their norms (Gemma 3) */
    void *qk_scale;       /* [B, T, H] the q/k norms' scales (Gemma 3) */
    void *scores, *pattern; /* [B, H, T, T], only while a hook needs them */
    void *z;              /* [B, T, H, dh] */
    void *attn_out;       /* [B, T, D] */
    void *mlp_pre, *mlp_lin, *mlp_post; /* [B, T, F] (mlp_lin: gated MLPs only) */
    void *mlp_out;        /* [B, T, D] */
    void *branch;         /* [B, T, D] a block's output before its post-norm (Gemma) */
    void *pos_buf;        /* [B, T, D] position embeddings (GPT-2) */
    void *logits;         /* [logit_rows, V] */
    int32_t *tok, *tgt;   /* [B, T] */
    float *loss;          /* [B, T] */
    int logit_rows;       /* rows of logits computed per chunk */
    int attn_mats;        /* whether scores and pattern are reserved */
    int32_t *tgt_host;    /* [B_max * T_max] staging for targets */
    float *loss_stage;    /* [B_max * T_max] staging for per-position losses */
    void *logit_stage;    /* one chunk of logits in the act dtype, for the GPU's copy back */
    /* tensor parallelism only (tp.c): a split activation gathered whole for a hook, the
     * all-gather's send (padded) and receive buffers, and this rank's slice of a logits chunk */
    void *tp_full, *tp_send, *tp_recv, *tp_logits;
} mdl_acts;

/* What a block reads and writes in layer L: the tape's slices while the backward will need
 * them, else the forward's own buffers (tape_acts in tape.c). Shapes as in acts. */
typedef struct layer_acts {
    void *resid_pre, *resid_mid;      /* [B, T, D] copies kept for the backward (NULL: none) */
    void *ln1_scale, *ln2_scale;      /* [B, T] */
    void *ln1_out, *ln2_out;          /* [B, T, D] */
    void *q, *k, *v;                  /* [B, T, H | Hkv, dh] after the q/k norms and rotary */
    void *q_pre, *k_pre;              /* [B, T, H | Hkv, dh] before the q/k norms (Gemma 3) */
    void *qn_scale, *kn_scale;        /* [B, T, H | Hkv] */
    void *scores, *pattern;           /* [B, H, T, T] */
    void *z;                          /* [B, T, H, dh] */
    void *attn_pre, *mlp_branch;      /* [B, T, D] the block outputs before their post-norms */
    void *ln1p_scale, *ln2p_scale;    /* [B, T] */
    void *mlp_pre, *mlp_lin, *mlp_post; /* [B, T, F] */
} layer_acts;

/* The tape: what the forward keeps for the backward, one allocation carved per layer
 * (layer n_layers: the final norm's input in resid_pre and its scale in ln1_scale). */
typedef struct mdl_tape {
    int on;               /* the forward is keeping what the backward needs */
    int top;              /* layers 0..top are kept (n_layers: and the final norm) */
    layer_acts *layer;    /* [n_layers + 1] */
    void *mem;
    size_t bytes;
} mdl_tape;

/* Generation: a KV cache [2 * n_layers][cap][Hkv * dh], act dtype. While pos0 >= 0 a
 * forward of batch 1 appends to it at position pos0. */
typedef struct mdl_kv {
    void *mem;
    int cap, pos0;
    /* while lp_generate runs: hook sites apply edits at absolute positions (row 0 is pos0,
     * or 0 when a step recomputes the whole sequence) and take no captures */
    int generating;
} mdl_kv;

/* Prefix sharing (attribution patching, score.h): rows whose first p0 positions are the same
 * in two runs have the same activations there (the model is causal), so the second run need
 * only compute positions p0 .. . The first run (keep) keeps every layer's k and v, [B][T]
 * rows each after the rotary; the second (on) runs the T - p0 positions p0 .. of the same
 * rows, puts its own k and v into the kept rows' suffix and attends over them; its backward
 * stops at the prefix's keys (constants to it). */
typedef struct mdl_pfx {
    int p0;               /* > 0 while sharing is set up */
    int keep, on;         /* this forward keeps k and v / runs the suffix against them */
    int B, T;             /* the kept batch, whole rows */
    void *mem;            /* [n_layers][2][B][T][Hkv * dh] (this rank's kv heads), act dtype */
    size_t bytes;
} mdl_pfx;

/* Rotary tables: F32 [n, dh/2] on the device, for global layers and (Gemma 3) local ones. */
typedef struct mdl_rope {
    float *cos, *sin, *cos_local, *sin_local;
    int n;
    float *freq_div;      /* host [dh/2] divisors of the inverse frequencies (GGUF rope_freqs), or NULL */
} mdl_rope;

/* Results of the last forward, on the host. */
typedef struct mdl_results {
    int B, T;
    float *logits, *losses;
    size_t logits_rows;   /* rows logits can hold */
    int have_logits, have_losses;
} mdl_results;

typedef struct model_arch model_arch;

/* Fused node scores (score.h, hooks.c): what marked hooks' sites do, the batch, and the
 * scores of all marked hooks on the device and their host copy. */
typedef struct mdl_score {
    int phase, B, T;
    size_t n, out_bytes, host_bytes;
    float *out, *host;
} mdl_score;

/* Tensor parallelism (dist.h): this rank's slice of the model. With tp == 1 every field is
 * the whole model's and no collective is ever called. */
typedef struct mdl_tp {
    struct lp_dist *dist; /* NULL: one process */
    int tp, rank;         /* group size and this rank in it */
    int H, Hkv, F, V;     /* local heads, kv heads, MLP width, vocabulary rows */
    int h0, hkv0, f0, v0; /* where this rank's slice starts in the full model */
    int kv_rep;           /* 1: fewer kv heads than ranks: each rank holds the one kv head its q heads read */
    int parts;            /* micro-batches of the interleaved forward (decoder.c; 0: per forward, 1: the plain schedule) */
    int parts_run;        /* those the last forward ran its layers in (1: the plain schedule) */
    void *ones;           /* [d_model] ones (act dtype): biases added after a reduce */
    float *xh;            /* host [logit_rows, V] this rank's logits, for the vocabulary-parallel loss */
    double *red;          /* host [3 * logit_rows] per-row reductions */
} mdl_tp;

struct lp_model {
    lp_config cfg;
    lp_ctx ctx;
    mdl_tp par;           /* tensor-parallel slice (par.tp == 1: the whole model) */
    char path[1024];
    const model_arch *arch;
    mdl_weights w;
    /* hooks */
    hook *hooks;
    int n_hooks;
    int *hook_index;      /* [(n_layers + 1) * HK_N_KINDS]: (layer, kind) -> hook id or -1 */
    int any_hook_dirty;
    mdl_acts a;
    mdl_kv kv;
    mdl_pfx pfx;               /* prefix sharing (score.h, hooks.c) */
    mdl_rope rope;
    mdl_tape tp;
    struct grad_state *grad;   /* hook gradients wanted and kept (NULL: none); grad.c */
    void *grad_ones;           /* ones in the act dtype, for broadcasts in the backward */
    mdl_score sc;              /* fused node scores (hooks.c) */
    mdl_results res;
    void *unembed_pad;         /* GPU: W_U padded to [roundup(V, 64), D] (vocab.c; NULL until used, or V a multiple of 64) */
    int vocab_chunk_rows;      /* > 0: the padded path's chunk rows, forced (tests: several chunks); < 0: path off */
};

size_t act_elem_bytes(const lp_model *m); /* bytes per activation element */
/* The absolute position of a forward's first row: the KV cache's fill while generating, the
 * shared prefix's length while a suffix runs (mdl_pfx), else 0. */
static inline int pos_base(const lp_model *m) { return m->kv.pos0 >= 0 ? m->kv.pos0 : m->pfx.on ? m->pfx.p0 : 0; }
/* The keys a query row of a T-position forward attends over (the pattern's last axis). */
static inline int attn_keys(const lp_model *m, int T) { return m->pfx.on ? m->pfx.p0 + T : T; }
/* Layer L's kept keys (v = 0) or values (v = 1) of the shared prefix, [B][T][Hkv * dh]. */
void *pfx_kv(const lp_model *m, int L, int v);
/* Weight idx (a param index) as host F32 into dst (its element count). */
lp_status param_to_f32(lp_model *m, int idx, float *dst);
lp_status hooks_init(lp_model *m);
void hooks_free(lp_model *m);
/* Allocation and upload of capture buffers, masks and edit sources for B_max x T_max. */
lp_status hooks_prepare(lp_model *m);
/* Whether the hook is captured, edited or scored (score.h). */
static inline int hook_active(const lp_model *m, int id) {
    return id >= 0 && (m->hooks[id].capture || m->hooks[id].edits || m->hooks[id].score);
}
/* Index of (kind, layer). */
int hook_id(const lp_model *m, int kind, int layer);
/* The last layer any hook touches (-1: none; n_layers: ln_final). */
int hooks_last_layer(const lp_model *m);
/* Runs the edits, then the capture, of hook id on activation act of the current batch. */
lp_status hook_site(lp_model *m, int id, void *act);
/* The forward's and the backward's stops at a scored hook (hooks.c): the activation kept, or
 * the gradient reduced into the node scores. */
lp_status score_forward_site(lp_model *m, int id, const void *act);
lp_status score_grad_site(lp_model *m, int id, const void *grad);
void score_free(lp_model *m);
#define SITE(kind, layer, buf) LP_CHECK(hook_site(m, hook_id(m, (kind), (layer)), (buf)))
/* While generating: refuses a patch edit of hook id that would reach a position in
 * [from, to) its source does not cover, or whose shape grows with the sequence. */
lp_status gen_patch_check(const lp_model *m, int id, int from, int to);
/* Device bytes of a hook's capture buffer (0 on the CPU, where captures live on the host). */
size_t hook_capture_bytes(const lp_model *m, int id);
/* Waits for capture copies of the last forward. */
lp_status hooks_finish(lp_model *m);
/* Whether unembed.hook_out is captured or edited: then the forward keeps all B x T rows of
 * logits at once (otherwise they pass through in row chunks and are never whole). */
int hooks_want_full_logits(const lp_model *m);
/* The Jacobian of hook id's edits applied to grad (its gradient after the edits, the hook's
 * shape for the current batch), in place: zero where an edit replaced the value, unchanged
 * where it steered, as the edit's spec declares for a callback. *unknown is set when a
 * callback's Jacobian is not declared (grad is then left as it is). */
lp_status hook_edit_jacobian(lp_model *m, int id, void *grad, int *unknown);

/* ---- tensor parallelism (tp.c) ---- */

struct lp_dist_req; /* a started all-reduce (dist.h) */

/* This rank's slice (m->par) for m->cfg and m->par.tp / rank; refuses sizes that do not split. */
lp_status tp_setup(lp_model *m);
/* Device constants of a split model (after the weights); frees them. */
lp_status tp_alloc(lp_model *m);
void tp_free(lp_model *m);
/* Host buffers for lrows rows of this rank's logits. */
lp_status tp_host_alloc(lp_model *m, int lrows);
/* How weight role r (or LP_TP_UNEMBED) is cut: 0 whole, 1 along its output axis, 2 along its
 * input axis, this rank holding [*start, *start + *count) of that axis. */
#define LP_TP_UNEMBED (-2)
int tp_role_cut(const lp_model *m, int r, int64_t *start, int64_t *count);
/* A hook site of kind `kind` on this rank's activation act: *whole is the hook's whole
 * activation (gathered from the ranks when the kind is split, else act itself); after the
 * site, the scatter takes this rank's part of the (edited) whole back into act. */
lp_status tp_gather_hook(lp_model *m, int kind, const void *act, void **whole);
lp_status tp_scatter_hook(lp_model *m, int kind, void *act, const void *whole);
/* out [N, M] = x [N, K] W (+ b) for a weight split along its input axis (role r, bias role
 * rb or -1), in two steps so that other work can run while the sum travels: the start
 * queues this rank's partial product and sums it over the TP group, at once (req NULL) or
 * started (*req, NULL when nothing was started); the finish waits for a started sum and adds
 * the bias once. TP 1: the start is blk_linear (bias included), the finish nothing. */
lp_status tp_linear_start(lp_model *m, void *out, const void *x, int L, int r, int rb, int N, int K, int M, struct lp_dist_req **req);
lp_status tp_linear_finish(lp_model *m, void *out, int L, int rb, int N, int M, struct lp_dist_req *req);
/* This rank's rows of the unembedding [V_local, D]. */
const void *tp_unembed_w(const lp_model *m);
/* Full logits [rows, V] from every rank's [rows, V_local]. */
lp_status tp_gather_logits(lp_model *m, void *full, const void *local, int rows);
/* Losses of rows [r0, r0 + rows) from this rank's capped logits, vocabulary-parallel. */
lp_status tp_xent(lp_model *m, const void *logits, int r0, int rows);

/* The same for the backward's stop at a hook: the whole gradient is the sum over ranks of
 * their parts (ranks sharing a kv head each hold a part), and the scatter leaves it with
 * the first rank of a shared kv head alone. */
lp_status tp_grad_gather(lp_model *m, int kind, const void *grad, void **whole);
lp_status tp_grad_scatter(lp_model *m, int kind, void *grad, const void *whole);
/* Logits [rows, V] of x [rows, D], every rank the whole (gathered in chunks at TP > 1). */
lp_status tp_logits_of(lp_model *m, void *out, const void *x, int rows);
/* dx [rows, D] = dlogits [rows, V] W_U: each rank its vocabulary slice, summed. */
lp_status tp_unembed_dx(lp_model *m, void *dx, const void *dlogits, int rows);

/* ---- the weight table (weights.c) ---- */

/* Address of weight idx (NULL when the model has no such weight). */
static inline void *param_ptr(const lp_model *m, int idx) {
    return idx >= 0 && m->w.params[idx].shape[0] ? (char *)m->w.mem + m->w.params[idx].offset * act_elem_bytes(m) : NULL;
}
/* Layer L's weight of role r, and its index. */
static inline int layer_weight_idx(const lp_model *m, int L, int r) { return m->w.first_layer + L * W_PER_LAYER + r; }
static inline void *layer_weight(const lp_model *m, int L, int r) { return param_ptr(m, layer_weight_idx(m, L, r)); }

/* ---- the tape (tape.c) ---- */

/* The buffers layer L of the current forward reads and writes (the tape's where it keeps
 * them). Layer n_layers: the final norm (resid_pre, ln1_scale). */
layer_acts layer_acts_of(const lp_model *m, int L);
/* Keeps the residual in the tape before layer L's first norm (mid = 0) or its second (mid =
 * 1); layer n_layers: before the final norm. No-op unless taping reaches L. */
lp_status tape_resid(lp_model *m, int L, int mid);
/* Bytes of the tape for a B x T batch (what grad_wanted asks for), carving m->tp.mem
 * when `carve`. */
size_t tape_layout(lp_model *m, int B, int T, int carve);
#define TAPE(L, mid) LP_CHECK(tape_resid(m, (L), (mid)))

/* ---- gradients (grad.c) ---- */

/* The backward's stop at hook (kind, layer): keeps the gradient when wanted, adds a
 * direction entering there and applies the forward's edits' Jacobian. */
lp_status grad_site(lp_model *m, int kind, int layer, void *grad);
#define GSITE(kind, layer, buf) LP_CHECK(grad_site(m, (kind), (layer), (buf)))
/* Whether the backward must stop at (kind, layer): its gradient is wanted, a direction
 * enters there or the forward edited it (so the backward goes the long way, e.g. through the
 * pattern instead of the fused attention). */
int grad_wanted(const lp_model *m, int kind, int layer);
/* Whether any hook or wanted gradient needs the [B,H,T,T] score and pattern buffers. */
int hooks_want_attn_mats(const lp_model *m);
/* Whether the direction metric's direction enters at (kind, layer). */
int grad_enters(const lp_model *m, int kind, int layer);
void grad_free(lp_model *m);
/* Weight gradients: whether any weight of layer L is wanted, and dW of param idx for a
 * linear layer from its input x [N,K] and output gradient dy [N,M] (kept on the host when
 * wanted; the layout is the model's, m->w.trans). */
int param_layer_wanted(const lp_model *m, int L);
lp_status param_grad(lp_model *m, int idx, const void *x, const void *dy, int N, int K, int M);

/* The backward's buffers: gradients flowing down ([N, width] each; metric.c sizes them). */
typedef struct bw_bufs {
    void *dresid, *dtmp, *dln, *dq, *dk, *dv, *dz, *da, *db, *dc, *dpat, *dsc, *dscale, *ones;
    void *dbr;            /* [N, D] a branch's gradient before its post-norm (Gemma) */
    /* only where a norm's scale is edited or a direction enters there: [N, width], [N], and
     * d_model values of 1 / d_model, d_head values of 1 / d_head (the q/k norms) */
    void *nrm, *nsc, *invd, *invdh;
} bw_bufs;

/* An internal lp_model_forward flag: run every layer and the final norm (into ln_out) even
 * when no hook needs them and no logits are wanted (the metrics of metric.c). */
#define LP_WANT_FINAL_NORM 0x100

/* The end of every forward after the final norm: the unembed.hook_in site on ln_out [N, D],
 * then, when `want` asks for losses or logits or unembed.hook_out is hooked, the logits
 * through the unembedding (blocks.c). */
lp_status model_unembed(lp_model *m, int N, int want);

/* The GPU's loss-only unembedding over W_U padded to Vp = roundup(d_vocab, 64) rows (vocab.c).
 * vocab_pad_rows: the rows of one chunk, whose [rows, Vp] logits fit in L2 and in a buffer of
 * cap elements; 0 where the padded path is not taken (the CPU, tensor parallelism). */
int vocab_padded(const lp_model *m);
int vocab_pad_rows(const lp_model *m, size_t cap);
/* out [rows, Vp] = x W_Up^T (capped under Gemma 2); dx [rows, D] = dlogits [rows, Vp] W_Up. */
lp_status vocab_pad_logits(lp_model *m, void *out, const void *x, int rows);
lp_status vocab_pad_dx(lp_model *m, void *dx, const void *dlogits, int rows);
/* The per-token losses of N rows of ln_out into a.loss, chunk rows at a time through a.logits. */
lp_status vocab_pad_loss(lp_model *m, int N, int chunk);
void vocab_pad_free(lp_model *m);

#endif
