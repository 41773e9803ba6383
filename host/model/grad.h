/* grad.h: the state of the gradients (grad.c) that the metrics (metric.c) read and set. */
#ifndef LOUPE_MODEL_GRAD_H
#define LOUPE_MODEL_GRAD_H

#include "model/model_internal.h"

/* Every gradient buffer records the backward that wrote it (gen) and the callback edit of
 * unknown Jacobian, if any, that the gradient had passed by then (poison), so that
 * lp_grad_get can tell a gradient of the last backward from a stale or unknowable one. */
struct grad_state {
    unsigned char *want;   /* [n_hooks] */
    float **host;          /* [n_hooks] F32 gradients */
    size_t *cap;           /* floats each host buffer holds */
    unsigned *gen;         /* [n_hooks] the backward that wrote host[i] (0: none) */
    int *poison;           /* [n_hooks] the callback-edited hook it passed, or -1 */
    int inject_id;         /* direction metric: where its direction enters, or -1 */
    void *inject_dev;      /* the direction on the device, act dtype */
    size_t inject_bytes;   /* what inject_dev holds (kept between runs) */
    float *inject_host;    /* the same, F32 on the host (the embeddings' sites add it there) */
    void *stage;           /* device-to-host staging in the act dtype */
    size_t stage_cap;
    int B, T;              /* the batch being taken (gradient sites size their buffers by it) */
    unsigned char *pwant;  /* [n_params_t] weight gradients wanted */
    float **phost;         /* [n_params_t] */
    unsigned *pgen;        /* [n_params_t] */
    int *ppoison;          /* [n_params_t] */
    /* the last lp_model_grad: its number, whether it finished, its batch, where its metric
     * entered (a direction's hook, or -1 for the logits), and, while it runs, the first
     * callback edit of unknown Jacobian the gradient has passed (-1: none yet) */
    unsigned run;
    int ok, res_B, res_T, enter_id, passed;
    /* sized once and kept (a backward allocates nothing once they are large enough): the
     * backward's scratch (metric.c), one weight gradient on the device, the mean-loss rows' scale */
    void *scratch;
    size_t scratch_bytes;
    void *dw;
    size_t dw_bytes;
    float *row_scale;
    size_t row_scale_n;
};


/* The model's gradient state, created on first use. */
lp_status grad_state_get(lp_model *m, struct grad_state **out);
/* Registers which hook and weight gradients the next backward keeps. */
lp_status grad_set_wanted(lp_model *m, const char *grad_hooks);
/* A device buffer of at least `bytes` kept in the gradient state (*buf, *cap), grown when needed. */
lp_status grad_buffer(lp_model *m, void **buf, size_t *cap, size_t bytes);

#endif
