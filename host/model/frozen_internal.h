/* frozen_internal.h: what the replacement model keeps from its forward (frozen.c) for its
 * backward (frozen_bwd.c). */
#ifndef LOUPE_MODEL_FROZEN_INTERNAL_H
#define LOUPE_MODEL_FROZEN_INTERNAL_H

#include "loupe/frozen.h"
#include "model/model_internal.h"

typedef struct fz_layer {
    float *ln1_w, *ln2_w, *ln2_b; /* [D] */
    float *W_V, *W_O;             /* as stored (trans: [out, in]) */
    float *ln1_s, *ln2_s;         /* [T] */
    float *ln1p_w, *ln2p_w;       /* [D] the post-norms' weights (Gemma); NULL without */
    float *ln1p_s, *ln2p_s;       /* [T] their frozen scales */
    float *q, *k;                 /* [T, H, dh], [T, Hkv, dh] after the rotary */
    float *mlp_in, *mlp_out;      /* [T, D] */
    float *pat;                   /* [H, T, T] the frozen pattern, when cached (else NULL:
                                   * recomputed each backward into lp_frozen.pattern) */
} fz_layer;

struct lp_frozen {
    lp_config c;
    int T, trans;
    lp_frozen_sites sites;        /* where the transcoders read and write */
    fz_layer *lay;
    float *lnf_w, *lnf_s;         /* [D], [T] */
    float *W_U, *embed, *logits;  /* [V, D], [T, D], [V] */
    float *pattern;               /* [H, T, T] scratch: one layer's pattern */
};

#endif
