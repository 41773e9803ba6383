/* hooks.h: TransformerLens-named hook points, captures and edits.
 *
 * Names and shapes follow TransformerLens (HookedTransformer.from_pretrained_no_processing):
 *   hook_embed, hook_pos_embed                           [batch, pos, d_model]
 *   blocks.L.hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out
 *                                                        [batch, pos, d_model]
 *   blocks.L.ln1.hook_scale, blocks.L.ln2.hook_scale     [batch, pos, 1]
 *   blocks.L.ln1.hook_normalized, ln2.hook_normalized    [batch, pos, d_model] (before the affine)
 *   blocks.L.attn.hook_q|hook_z [batch, pos, n_heads, d_head]; hook_k|hook_v use n_kv_heads
 *   blocks.L.attn.hook_attn_scores (masked with -inf, before softmax), hook_pattern
 *                                                        [batch, n_heads, query_pos, key_pos]
 *   blocks.L.mlp.hook_pre|hook_post                      [batch, pos, d_mlp]
 *   ln_final.hook_scale, ln_final.hook_normalized
 *   unembed.hook_in (the final norm's output)            [batch, pos, d_model]
 *   unembed.hook_out (the logits)                        [batch, pos, d_vocab]
 * Semantics are TransformerLens 3.x's (2.x put hook_normalized after the norm's weight and
 * bias, and had no unembed hooks). Edits of unembed.hook_out change the logits and losses
 * the forward returns and the metrics computed from them.
 * At a hook point, edits run first, in the order they were added, then the capture
 * records the value that flows on. A gradient taken through an edited forward (attrib.h)
 * passes each edit by its Jacobian, as torch autograd does through TransformerLens's hooks:
 * the gradient at the hook is that of its edited value, and none reaches what is upstream
 * of the elements an edit replaced. Hooks nobody asked for cost nothing (hook_normalized,
 * hook_attn_scores and hook_pattern are not even computed, and the logits are whole only
 * while unembed.hook_out is hooked).
 *
 * Edits while generating (lp_generate, model.h). Positions are ABSOLUTE positions in the
 * whole sequence, prompt then new tokens: the prompt is positions 0..n_prompt-1, the k-th
 * new token (from 0) is fed back at position n_prompt+k. With the KV cache a pass sees
 * only the rows it computes (the prompt, then one token), and an edit restricted to
 * position p applies in the pass that computes p: once, to the key, value or residual
 * there, which the cache then keeps as edited. An edit of all positions applies to the
 * prompt and to every new token. So the result is that of forwards over the whole growing
 * sequence with the same edits, token by token:
 *   - steer only the new tokens: positions n_prompt .. n_ctx-1; only the prompt: 0 .. n_prompt-1;
 *   - PATCH reads its source as one sequence [1, n_src, ...] (row p for position p) and
 *     lp_generate refuses, before any work, a patch whose positions generation would reach
 *     beyond n_src (restrict it to positions < n_src), or of the scores or pattern;
 *   - hook_k, hook_v, hook_rot_k: the edit acts on the key or value when it is computed,
 *     before it enters the cache; later tokens attend to the edited one;
 *   - hook_attn_scores, hook_pattern: the cached pass never forms them, so while one is
 *     edited every step recomputes the whole sequence without the cache (quadratic, exact);
 *   - unembed.hook_out: the logits of the pass's rows, of which the last picks the token;
 *   - a callback sees the pass's rows [1, n_rows, ...]; lp_hook_first_pos gives the
 *     absolute position of row 0 (an SAE splice, being per token, needs nothing more);
 *   - captures are not taken while generating.
 * Without generation, lp_hook_first_pos is 0 and positions are those of the batch. */
#ifndef LOUPE_HOOKS_H
#define LOUPE_HOOKS_H

#include "loupe/model.h"
#include "loupe/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

int lp_hook_count(const lp_model *m);
const char *lp_hook_name(const lp_model *m, int id);
/* Index of a hook by exact name, or -1. */
int lp_hook_find(const lp_model *m, const char *name);
/* Adds blocks.L.mlp.hook_in [batch, pos, d_model] to every layer: the MLP's input (ln2's
 * output after its weight), the hook circuit-tracer's replacement model reads transcoder
 * inputs from (its ReplacementMLP.hook_in). HookedTransformer has no such hook, so it is
 * absent until asked for; idempotent; refused after the model's first gradient. */
lp_status lp_hooks_add_mlp_in(lp_model *m);
/* The hook's shape for a B x T batch (TransformerLens order). */
int lp_hook_shape(const lp_model *m, int id, int B, int T, int64_t shape[LP_MAX_DIMS]);

/* Captures every hook matching name_or_glob (fnmatch, e.g. "blocks.*.hook_resid_post"),
 * optionally only at positions pos[0..npos) (query positions for scores and pattern).
 * Fails with LP_ERR_NOT_FOUND naming the pattern if it matches nothing. */
lp_status lp_hook_capture(lp_model *m, const char *name_or_glob, const int *pos, int npos, int *n_matched);

/* A user callback: act is the activation on the model's device, edited in place. */
typedef lp_status (*lp_hook_fn)(const char *hook, lp_tensor *act, void *user);
/* The absolute position of the first row of the activation a hook sees now: 0 in
 * lp_model_forward, the number of tokens already in the KV cache while generating. */
int lp_hook_first_pos(const lp_model *m);

/* What a gradient (attrib.h) does at a callback edit, whose Jacobian loupe cannot know.
 * Built-in edits need no declaration: ZERO, SET and PATCH replace the value (no gradient
 * passes to what is upstream of the edited elements), ADD passes it unchanged. An SAE
 * splice is a callback: declare it IDENTITY only if that is the approximation you want
 * (the straight-through estimate); loupe does not differentiate through the SAE. */
typedef enum lp_edit_grad {
    LP_EDIT_GRAD_UNKNOWN = 0, /* gradients that would pass it are refused (lp_grad_get names this hook) */
    LP_EDIT_GRAD_IDENTITY,    /* the gradient passes unchanged */
    LP_EDIT_GRAD_STOP,        /* the callback replaces the value: no gradient passes at the spec's
                                 positions and heads (all of them when none are given) */
} lp_edit_grad;

typedef struct lp_edit_spec {
    lp_edit_kind kind;    /* ZERO, SET (mean ablation), ADD (steer), PATCH; ignored with fn */
    const float *src;     /* host F32: per-token [H*E] for SET/ADD, full hook shape for PATCH */
    size_t src_len;       /* number of floats in src */
    float coef;           /* ADD: src * coef */
    const int *pos;       /* positions to edit (NULL = all) */
    int npos;
    const int *heads;     /* heads to edit (NULL = all), for hooks with a head axis */
    int nheads;
    lp_hook_fn fn;        /* when set: called instead of a built-in edit */
    void *user;
    lp_edit_grad grad;    /* with fn: its Jacobian for gradients taken through it */
} lp_edit_spec;

/* Adds an edit to every hook matching name_or_glob. The spec's arrays are copied. */
lp_status lp_hook_edit(lp_model *m, const char *name_or_glob, const lp_edit_spec *spec);
int lp_hook_is_captured(const lp_model *m, int id);
int lp_hook_is_edited(const lp_model *m, int id);
/* Removes every capture and edit. The capture buffers stay allocated for the next captures
 * (registering and clearing them between forwards allocates nothing); lp_model_free frees them. */
void lp_hooks_clear(lp_model *m);

/* The capture of the last forward: a host tensor in the model's dtype,
 * shaped [B, npos or T, ...] per lp_hook_shape. */
lp_status lp_capture_get(lp_model *m, const char *name, lp_tensor *out);
/* The same converted to F32 into dst (n floats). */
lp_status lp_capture_read_f32(lp_model *m, const char *name, float *dst, size_t n);

#ifdef __cplusplus
}
#endif
#endif
