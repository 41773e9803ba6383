/* score.h: attribution patching's node sums fused into the backward (defined in hooks.c,
 * beside the hook sites they act at). A marked hook
 * keeps its activation of one run on the device (the reference: the clean run's, say); in
 * the scored run its forward site keeps the current activation beside it and its backward
 * site reduces (reference - current) * gradient over each node's `per` values at once, so
 * that no gradient is stored or leaves the device: the scores of all marked hooks sit in one
 * device buffer, read with one copy at the end. */
#ifndef LOUPE_MODEL_SCORE_H
#define LOUPE_MODEL_SCORE_H

#include <stddef.h>

#include "loupe/model.h"

typedef enum score_phase_t {
    SCORE_OFF = 0,  /* marked hooks' sites do nothing (their kept buffers stay) */
    SCORE_KEEP_REF, /* forwards keep the activation as the reference (sizes the buffers) */
    SCORE_KEEP_CUR, /* forwards keep it as the current activation */
    SCORE_RUN,      /* forwards keep the current activation, backwards reduce the gradient */
} score_phase_t;

/* Marks hook `name`: its nodes are runs of `per` consecutive values of the hook's tensor. */
lp_status score_mark(lp_model *m, const char *name, size_t per);
/* What marked hooks' sites do in the following runs of B x T; SCORE_RUN zeroes the scores
 * (a node the backward never reaches scores 0). */
lp_status score_phase(lp_model *m, score_phase_t phase, int B, int T);
/* Copies the scores of the last SCORE_RUN backward to the host (one copy) and waits. */
lp_status score_fetch(lp_model *m);
/* Hook `name`'s scores as fetched (its nodes in memory order, *n of them), or NULL. */
const float *score_values(const lp_model *m, const char *name, size_t *n);
/* Hook `name`'s kept reference and current activation (device, act dtype), or NULL. */
void score_buffers(const lp_model *m, const char *name, void **ref, void **cur);
/* Registers a patch of hook `name` whose source is n values (the hook's shape for the next
 * forward) of a device buffer the caller keeps until lp_hooks_clear: nothing is uploaded. */
lp_status score_patch(lp_model *m, const char *name, const void *src_dev, size_t n);
/* Prefix sharing (mdl_pfx in model_internal.h): rows of two runs equal in their first p0
 * positions. score_prefix_keep before the reference run of B x T: that forward keeps every
 * layer's k and v, and the marked hooks keep their reference at positions p0 .. only (rows
 * [B, (H,) T - p0, ...]). score_prefix_run before the scored run, which is then of the
 * T - p0 positions p0 .. of the same rows (its tokens, its metric's positions less p0): it
 * attends over the kept prefix, and its scores are the suffix's (a pattern node's values are
 * its [T - p0, T] rows; re-mark it with that `per`). score_end ends the sharing. */
lp_status score_prefix_keep(lp_model *m, int p0, int B, int T);
/* Whether this model can share a prefix: one process (tensor parallelism does not), not
 * generating; on the GPU only without the three-step attention (`three_steps`: the pattern or
 * the scores are scored), whose suffix ops exist on the CPU only. */
int score_prefix_possible(const lp_model *m, int three_steps);
lp_status score_prefix_run(lp_model *m);
/* Unmarks every hook and turns scoring off (the buffers stay for the next marks). */
void score_end(lp_model *m);

#endif
