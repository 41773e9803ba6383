/* frozen_dev.h: the replacement model's backward on a CUDA device (frozen_dev.c), the twin
 * of lp_frozen_backward (frozen_bwd.c): the same R injected rows, the same frozen patterns
 * (recomputed per layer from the stored rotated q and k) and norm scales, the value path
 * through W_V and W_O, the skips; the sink sees the gradient G [R, Tm, d_model] on the
 * device. What it keeps on the device is one allocation of fz_dev_bytes(c, T, R) bytes. */
#ifndef LOUPE_MODEL_FROZEN_DEV_H
#define LOUPE_MODEL_FROZEN_DEV_H

#include "loupe/frozen.h"

typedef struct fz_dev fz_dev;
typedef lp_status (*fz_dev_sink)(int L, const float *G, int R, int Tm, void *user);

/* Device bytes for T tokens and row blocks of up to R rows. */
size_t fz_dev_bytes(const lp_config *c, int T, int R);
/* Uploads what the backward needs from f onto c (a CUDA F32 context; f outlives it). */
lp_status fz_dev_new(fz_dev **out, const lp_frozen *f, lp_ctx *c, int R);
void fz_dev_free(fz_dev *d);
/* As lp_frozen_backward; vec on the host [R, d_model]; skip: NULL or per layer NULL or
 * W_skip [d_model, d_model] on the device. */
lp_status fz_dev_backward(fz_dev *d, int R, const int *layer, const int *pos, const float *vec, const float *const *skip,
                          fz_dev_sink sink, void *user);

#endif
