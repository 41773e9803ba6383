/* store.h: the activation store of DESIGN.md, written by `loupe cache`.
 *
 * A directory with meta.json and shard-00000.safetensors, shard-00001..., each shard
 * holding "tokens" (I32 [n_seq, ctx]) and one tensor per captured hook named by the hook,
 * shaped [n_seq, *hook shape without batch], in the store's dtype (F32 or BF16).
 * Shards and meta.json are written under unique temporary names and renamed when
 * complete; one run at a time holds the store (DIR/.lock); a re-run with the same
 * settings and the same token file (size and hash) resumes after the last complete shard. */
#ifndef LOUPE_STORE_H
#define LOUPE_STORE_H

#include "loupe/model.h"
#include "loupe/tokens.h"
#include "loupe/dist.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lp_cache_progress {
    int64_t seq_done, seq_total, tokens_done;
    double seconds;           /* since this run started */
    int shard_done, final;
} lp_cache_progress;

typedef struct lp_cache_opts {
    const char *out;          /* store directory */
    const char *hooks;        /* comma-separated names or globs */
    const char *model_path;   /* recorded in meta.json */
    const char *tokens_path;  /* recorded in meta.json */
    lp_dtype dtype;           /* LP_F32 or LP_BF16 */
    int batch;                /* sequences per forward */
    int shard_sequences;      /* sequences per shard */
    /* Called after every batch (shard_done set when a shard was committed) and once at the
     * end with final set; NULL: silent. The library never prints: the CLI draws the bar. */
    void (*on_progress)(const struct lp_cache_progress *p, void *user);
    void *progress_user;
    /* Data and tensor parallelism (dist.h): NULL or a world of one is the single process.
     * With more, every rank calls lp_cache_run with the same settings and tokens, the model
     * loaded over its TP group (lp_model_load_dist; its captures are whole on every TP rank);
     * each shard's batches go round-robin over the DP groups (batch k to DP rank k % dp, so
     * every forward is the one a single process would run, on the same rows), their captures
     * are all-gathered, and world rank 0 alone holds the lock and writes shards and
     * meta.json. With TP = 1 the store is byte for byte the single process's; with TP > 1 its
     * values differ from it by the split model's rounding (sums in another order); both
     * resume the same way. */
    struct lp_dist *dist;
} lp_cache_opts;

typedef struct lp_cache_report {
    int64_t n_sequences, n_tokens;   /* in the store when done */
    int64_t resumed_sequences;       /* already present when this run started */
    int n_shards, n_hooks;
    double seconds, tokens_per_s;    /* of this run's work */
} lp_cache_report;

/* Registers the captures on m (clearing other hooks) and writes the store. */
lp_status lp_cache_run(lp_model *m, const lp_tokens *toks, const lp_cache_opts *o, lp_cache_report *rep);

/* LP_ERR_ARG naming dir/meta.json when meta.json says the store is not complete (its
 * cache run was stopped or is still going); LP_OK otherwise, also without a meta.json. */
lp_status lp_store_require_complete(const char *dir);

/* Per-token mean of a stored hook over every sequence and position, e.g. [d_model] for
 * resid hooks or [n_heads * d_head] for hook_z: the source of mean ablation. */
lp_status lp_store_hook_mean(const char *dir, const char *hook, float **mean, size_t *n);

/* ---- reading one hook of a store, token by token (the SAE trainer's data) ----
 * The hook's per-token values are flattened: [n_tokens, d] with d = the product of the
 * hook's dimensions after [n_seq, ctx] (d_model for resid hooks, n_heads * d_head for
 * hook_z). Tokens are numbered sequence by sequence across the shards. */
typedef struct lp_store lp_store;
lp_status lp_store_open(lp_store **s, const char *dir, const char *hook);
void lp_store_close(lp_store *s);
int64_t lp_store_n_tokens(const lp_store *s);
int lp_store_d(const lp_store *s);
int lp_store_context(const lp_store *s);
/* The model path and context recorded in meta.json ("" when absent). */
const char *lp_store_model(const lp_store *s);
/* F32 [n, d] of tokens [t0, t0 + n), converted from the store's dtype. */
lp_status lp_store_read(const lp_store *s, int64_t t0, int64_t n, float *dst);

#ifdef __cplusplus
}
#endif
#endif
