/* lens.h: the logit lens and direct logit attribution (DLA) of one prompt at one position,
 * with TransformerLens 3.x's ActivationCache semantics:
 *
 *   lp_lens_ctx *lx;
 *   lp_lens_open(&lx, m);
 *   lp_lens_opts o = {.pos = -1, .answer = paris, .wrong = rome, .top_k = 10};
 *   lp_lens r;
 *   lp_lens_run(lx, tokens, T, &o, &r);   // r.lens_prob[LP_LENS_RECOMPUTED][layer], r.comp[..][i], ...
 *   lp_lens_free(&r);
 *   lp_lens_close(lx);
 *
 * One forward (batch 1) captures, at the position: hook_embed (and hook_pos_embed), every
 * layer's hook_resid_pre, hook_resid_mid, hook_attn_out, hook_mlp_out and attn.hook_z, the
 * last hook_resid_post and ln_final.hook_scale; the rest is computed on the host in double.
 * The run clears the model's hooks (captures and edits) before and after.
 *
 * The final norm is read as TransformerLens reads it after fold_ln: its weight w is folded
 * into the unembedding (u_t = w * W_U[:, t]), its bias b into b_U (b . W_U[:, t] + b_U[t]),
 * so that attributions add up to the logit. Two ways to normalise a residual-stream vector x:
 *   LP_LENS_CACHED      the run's own final-norm scale s (ln_final.hook_scale): (x - mean x) / s
 *                       for LayerNorm, x / s for RMSNorm -- apply_ln_to_stack(recompute_ln=False),
 *                       what logit_attrs uses; linear, so the parts add up.
 *   LP_LENS_RECOMPUTED  the norm recomputed from x alone (LayerNormPre / RMSNormPre of x) --
 *                       apply_ln_to_stack(recompute_ln=True), what accumulated_resid(apply_ln=True)
 *                       uses for the logit lens; not additive.
 *
 * The metric is logit(answer), or logit(answer) - logit(wrong) when a wrong answer is given,
 * at the position; its direction is u = u_answer (- u_wrong).
 *   Logit lens: the accumulated residual stream 0_pre, 0_mid, 1_pre, ..., (L-1)_mid, final_post
 *     (accumulated_resid(incl_mid=True)), normalised, through the unembedding with b_U: the
 *     metric, the answer's probability and rank, and the top tokens of each entry. final_post
 *     gives the run's own logits in both modes.
 *   DLA: the decomposition decompose_resid gives (embed, pos_embed for GPT-2, then L_attn_out,
 *     L_mlp_out per layer) and stack_head_results's per-head outputs z_h W_O[h] (L0H0, L0H1,
 *     ...), plus the attention output bias b_O of each layer (attn_out = sum of heads + b_O),
 *     each normalised and dotted with u (logit_attrs). In the cached mode:
 *       sum(comp) + unembed_bias = metric
 *       embed (+ pos_embed) + sum(head) + sum(bias) + sum(mlp_out) + unembed_bias = metric
 *     and comp_sum_err / head_sum_err are how far the run is from each. */
#ifndef LOUPE_LENS_H
#define LOUPE_LENS_H

#include <stddef.h>
#include <stdint.h>

#include "loupe/model.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { LP_LENS_CACHED = 0, LP_LENS_RECOMPUTED = 1, LP_LENS_MODES = 2 };

typedef struct lp_lens_opts {
    int pos;          /* the position read, in [0, T); -1: the last */
    int32_t answer;   /* -1: the run's own top token at the position */
    int32_t wrong;    /* -1: none (the metric is the answer's logit) */
    int top_k;        /* top tokens kept per lens entry, in [0, d_vocab] */
    int keep_logits;  /* keep the lens logits [n_stack, d_vocab] of both modes */
} lp_lens_opts;

typedef struct lp_lens {
    int n_layers, n_heads, d_model, d_vocab;
    int T, pos, top_k;
    int32_t answer, wrong;  /* wrong: -1 when none */
    int answer_given;       /* 0: answer is the run's top token */
    int n_stack;            /* 2 n_layers + 1 lens entries */
    int n_comp;             /* components of decompose_resid */
    int has_pos_embed;
    double metric;          /* of the run's logits */
    double unembed_bias;    /* (b . W_U[:, answer] + b_U[answer]) (- the same for wrong) */
    double comp_sum_err, head_sum_err; /* |sum - metric| of the two identities, cached mode */
    /* What the input held (all 1 for a prompt; a store may lack hooks): without the scale
     * the cached mode is NaN throughout; a missing lens entry's row is NaN (rank and top
     * ids -1); without every component or every head's z those attributions are NaN, as
     * is the identity they enter. */
    int have_scale, have_comp, have_heads;
    uint8_t *stack_have;                /* [n_stack] */
    /* the logit lens, per mode */
    float *lens_metric[LP_LENS_MODES];  /* [n_stack] */
    float *lens_prob[LP_LENS_MODES];    /* [n_stack] softmax probability of the answer */
    int32_t *lens_rank[LP_LENS_MODES];  /* [n_stack] 0: the top token */
    int32_t *top_ids[LP_LENS_MODES];    /* [n_stack, top_k] by falling logit */
    float *top_prob[LP_LENS_MODES];     /* [n_stack, top_k] */
    float *lens_logits[LP_LENS_MODES];  /* [n_stack, d_vocab] with keep_logits, else NULL */
    /* direct logit attribution, per mode */
    float *comp[LP_LENS_MODES];         /* [n_comp] */
    float *head[LP_LENS_MODES];         /* [n_layers * n_heads] */
    float *bias[LP_LENS_MODES];         /* [n_layers]: b_O */
    /* the vectors, as TransformerLens stacks them */
    float *resid;                       /* [n_stack, d_model] accumulated_resid */
    float *comp_ln;                     /* [n_comp, d_model] decompose_resid(apply_ln=True) */
    float *head_ln;                     /* [n_layers * n_heads, d_model] stack_head_results(apply_ln=True) */
} lp_lens;

typedef struct lp_lens_ctx lp_lens_ctx;

/* Host F32 copies of the weights the lens reads (the unembedding, the final norm, W_O and
 * b_O); on a CPU F32 model they are the model's own. The context holds m; free it first. */
lp_status lp_lens_open(lp_lens_ctx **lx, lp_model *m);
void lp_lens_close(lp_lens_ctx *lx);

/* One prompt tokens[0..T): every token in [0, d_vocab), 1 <= T <= n_ctx; bad options are
 * LP_ERR_ARG naming the field. On failure *r holds nothing to free. */
lp_status lp_lens_run(lp_lens_ctx *lx, const int32_t *tokens, int T, const lp_lens_opts *o, lp_lens *r);
void lp_lens_free(lp_lens *r);

/* ---- from an activation store (store.h, written by `loupe cache`) ----
 * The same lens and DLA for each stored sequence, from whichever hooks the store holds:
 * lens entries from blocks.L.hook_resid_pre (or blocks.L-1.hook_resid_post), hook_resid_mid
 * and the last hook_resid_post (required: it gives the answer and the metric); the cached
 * mode from ln_final.hook_scale; components from hook_embed (+ hook_pos_embed),
 * hook_attn_out and hook_mlp_out of every layer; heads from every attn.hook_z. The answer
 * defaults to the top token of the final residual through the final norm and unembedding
 * (the run's scale when stored, else recomputed). Opening refuses a store cached from
 * another model (meta.json's model path against model_path, when given), a hook whose
 * width is not the model's, and a store without the last hook_resid_post, naming it. */
typedef struct lp_lens_store lp_lens_store;
lp_status lp_lens_store_open(lp_lens_store **out, lp_lens_ctx *lx, const char *dir, const char *model_path);
void lp_lens_store_close(lp_lens_store *ls);
int64_t lp_lens_store_n_seq(const lp_lens_store *ls);
int lp_lens_store_context(const lp_lens_store *ls);
/* The tokens of sequence seq ([context]), as stored. */
const int32_t *lp_lens_store_tokens(const lp_lens_store *ls, int64_t seq);
/* Sequence seq in [0, n_seq) at o->pos (-1: the last position). */
lp_status lp_lens_store_run(lp_lens_store *ls, int64_t seq, const lp_lens_opts *o, lp_lens *r);

/* Labels as TransformerLens writes them: lens entry i ("3_pre", "3_mid", "final_post"),
 * component i ("embed", "pos_embed", "0_attn_out", "0_mlp_out"), head i ("L0H3"). */
const char *lp_lens_stack_label(const lp_lens *r, int i, char *buf, size_t n);
const char *lp_lens_comp_label(const lp_lens *r, int i, char *buf, size_t n);
const char *lp_lens_head_label(const lp_lens *r, int i, char *buf, size_t n);

#ifdef __cplusplus
}
#endif
#endif
