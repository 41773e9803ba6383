/* dashboard_internal.h: what the dashboard files share: the per-latent state of the pass
 * (host/cli/dashboard.c), the batch encoder (host/analysis/dashboard_enc.c) and the finishing steps
 * that turn the state into an lp_dash (host/analysis/dashboard_fin.c). */
#ifndef LOUPE_DASHBOARD_INTERNAL_H
#define LOUPE_DASHBOARD_INTERNAL_H

#include "loupe/dashboard.h"
#include "loupe/safetensors.h"
#include "loupe/store.h"

/* One example; acts[W] follows: the context's activations, zero past the sequence's ends. */
typedef struct ent {
    int64_t t;
    uint64_t h;
    float v;
    float acts[];
} ent;

typedef struct lstate {
    int64_t fires;
    float max;
    int e;                       /* bin width 2^e; INT_MIN before the first value */
    int n_top;
    int n_band[LP_DASH_BANDS];
    int64_t hist[LP_DASH_BINS];
    unsigned char *top, *band;   /* top * stride (a heap); LP_DASH_BANDS * samples * stride */
} lstate;

#define ENT(base, i, stride) ((ent *)((base) + (size_t)(i) * (stride)))

/* The hash that picks band samples: splitmix64's finalizer of token ^ seed. */
uint64_t dash_hash(uint64_t x);
double dash_now(void);

/* Encodes batches of the store with the SAE: dense f [n, L] over the chosen latents only
 * (standard, jumprelu: their columns of W_enc gathered), or the SAE's top-k over all
 * latents as idx/val [n, K] with col mapping a latent to its chosen column (-1: not
 * chosen). Host pointers, valid until the next batch. */
typedef struct dash_enc {
    lp_sae *s;
    lp_ctx *c;
    int L, N, D, K, cols;        /* cols: columns of the GEMM (L, or d_sae for topk) */
    float *W, *b, *thr;          /* device: gathered W_enc [D, L], b_enc, threshold (or the SAE's own) */
    float *x, *pre, *dval;       /* device: [N, D], [N, cols], [N, K] */
    int32_t *didx;
    float *hx, *bdec, *f, *val;  /* host */
    int32_t *idx, *col;
    int own_w;
} dash_enc;
lp_status dash_enc_open(dash_enc *e, lp_sae *s, lp_ctx *c, const int32_t *latents, int L, int N);
lp_status dash_enc_batch(dash_enc *e, const lp_store *in, const char *store, const char *hook, int64_t t0, int n);
void dash_enc_close(dash_enc *e);

/* Token ids of the store's shards ("tokens", I32 [n_seq, ctx]), read on demand. */
typedef struct dash_tokens {
    int n;
    lp_st_file *files;
    const int32_t **tok;
    int64_t *first;              /* first token of each shard; [n] = total */
} dash_tokens;
lp_status dash_tokens_open(dash_tokens *t, const char *dir, int ctx);
int32_t dash_token(const dash_tokens *t, int64_t i);
void dash_tokens_close(dash_tokens *t);

/* Orders the examples, reads their tokens, computes the logit tables: fills d->lat. */
lp_status dash_finish(lp_dash *d, lp_sae *s, lp_ctx *c, const lp_dash_opts *o, lstate *st, size_t stride, int W);

#endif
