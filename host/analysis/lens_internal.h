/* lens_internal.h: what the lens computes from, shared by the prompt path (host/cli/lens.c)
 * and the store path (host/analysis/lens_store.c). */
#ifndef LOUPE_LENS_INTERNAL_H
#define LOUPE_LENS_INTERNAL_H

#include "loupe/hooks.h"
#include "loupe/lens.h"

struct lp_lens_ctx {
    lp_model *m;
    int layer_norm;   /* LayerNorm (centres, has a bias) or RMSNorm */
    int wo_trans;     /* W_O stored [d_model, n_heads d_head] (x W_O^T) rather than [n_heads d_head, d_model] */
    float *W_U;       /* [d_vocab, d_model] */
    float *lnw, *lnb; /* [d_model]; lnb NULL without a bias */
    float **W_O, **b_O; /* [n_layers] each; b_O[l] NULL without a bias */
    float **owned;    /* host copies to free */
    int n_owned;
};

/* The residual stream's parts at one position (one allocation, from embed). */
typedef struct lens_acts {
    float *embed, *pos_embed, *final, scale; /* [D]; pos_embed unused without one */
    float *pre, *mid, *attn, *mlp;           /* [L, D] */
    float *z;                                /* [L, n_heads d_head] */
    int have_scale, have_comp, have_heads;   /* what the input held */
    const uint8_t *stack_have;               /* [2L + 1] lens entries held; NULL: all */
} lens_acts;

lp_status lens_acts_alloc(const lp_lens_ctx *lx, lens_acts *a);
/* r's sizes and options, no arrays. */
void lens_header(const lp_lens_ctx *lx, int T, const lp_lens_opts *o, lp_lens *r);
/* The answer (the top token of row when none was given) and the metric from logits row. */
void lens_pick(lp_lens *r, const float *row);
/* The final residual through the final norm (the run's scale when held, else recomputed)
 * and W_U: logits [d_vocab]. */
lp_status lens_final_logits(const lp_lens_ctx *lx, const lens_acts *a, float *logits);
/* The arrays of r (answer and metric set): the logit lens and the attributions. */
lp_status lens_compute(const lp_lens_ctx *lx, const lens_acts *a, int keep_logits, lp_lens *r);

#endif
