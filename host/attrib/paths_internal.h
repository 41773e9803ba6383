/* paths_internal.h: what path patching (paths.c) and edge attribution (eap.c) share:
 * frozen hooks, host copies of weights, runs' captures and the senders' deltas. */
#ifndef LOUPE_PATHS_INTERNAL_H
#define LOUPE_PATHS_INTERNAL_H

#include "loupe/paths.h"
#include "model/model_internal.h"

/* Hooks held at their clean values: recorded from one clean run, then patched into every
 * later run. */
typedef struct frozen {
    int n;
    int *id;     /* [n] hook ids */
    float **v;   /* [n] one row of the hook's clean value */
    size_t *per; /* [n] floats per row */
} frozen;

/* Runs the clean prompt capturing every hook matching the comma-separated globs in spec
 * (NULL or "": nothing to do) and keeps their values. Clears the hooks. */
lp_status paths_freeze_record(lp_model *m, const char *spec, const int32_t *clean, int T, frozen *fz);
/* Adds the frozen values (for B rows) as patches. */
lp_status paths_freeze_apply(lp_model *m, const frozen *fz, int B);
void paths_freeze_free(frozen *fz);
/* Whether the hook (kind, layer) is frozen. */
int paths_frozen(const lp_model *m, const frozen *fz, int kind, int layer);

/* A host F32 copy of the named weight (malloc'ed) and its shape. */
lp_status paths_param(lp_model *m, const char *name, float **out, int64_t *rows, int64_t *cols);
/* Whether the blocks' projection weights are kept [in, out] (else [out, in]). */
int paths_in_out(const lp_model *m);

/* The hook whose capture gives sender s's output: blocks.0.hook_resid_pre (the
 * embeddings), blocks.L.attn.hook_z (a head: its result needs W_O), blocks.L.hook_mlp_out. */
void paths_sender_hook(const lp_model *m, int s, char *buf, size_t n);
/* Δ_s [T, d_model] from row b of the clean (c) and corrupted (x) captures of that hook,
 * [B, T, ...]; wo: layer's W_O on the host (heads only). */
lp_status paths_delta(const lp_model *m, int s, int b, int T, const float *c, const float *x, const float *wo, float *out);

/* The refusal of attrib.c: these methods run their own forwards and clear the hooks. */
lp_status paths_no_user_edits(const lp_model *m, const char *what);
/* A host F32 copy of the capture (malloc'ed), n values. */
lp_status paths_grab(lp_model *m, const char *name, float **out, size_t *n);

/* Decoded receiver j: kind 0 q, 1 k, 2 v (head: the head or kv head), 3 MLP, 4 logits. */
enum { PR_Q, PR_K, PR_V, PR_MLP, PR_LOGITS };
void paths_receiver_decode(const lp_model *m, int j, int *layer, int *kind, int *head);
/* Decoded sender i: kind 0 embeddings, 1 head, 2 MLP. */
enum { PS_EMBED, PS_HEAD, PS_MLP };
void paths_sender_decode(const lp_model *m, int i, int *layer, int *kind, int *head);

#endif
