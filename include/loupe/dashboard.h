/* dashboard.h: feature dashboards of an SAE over an activation store, in one pass.
 *
 * For each chosen latent:
 *   - the top `top` activations (token, value) with their contexts: the tokens of the same
 *     sequence from `left` before to `right` after, and that latent's activation on each;
 *     order: value descending, ties by token index (sequence, then position) ascending;
 *   - the firing count (activation > 0) and density = fires / counted tokens;
 *   - a histogram of the nonzero activations in LINEAR bins starting at 0 (as SAEDashboard
 *     and Neuronpedia draw it). The bin width is a power of two, 2^hist_exp, the smallest
 *     for which every activation lies below LP_DASH_BINS widths; bin b holds the values v
 *     with floor(v / 2^hist_exp) = b. With a power-of-two width the histogram is exact in
 *     one pass: when a larger value arrives the width doubles and pairs of bins add up.
 *     n_bins = the bins up to the one holding the maximum (LP_DASH_BINS/2 + 1 or more);
 *   - interval samples (SAEDashboard's "quantile" groups): the activation range split into
 *     bands of LP_DASH_BINS_PER_BAND histogram bins (equal-width intervals of
 *     [0, ~max]); from each band the `samples` tokens whose hash64(token index ^ seed) is
 *     smallest (ties by token index): a uniform sample without replacement that any
 *     reader can recompute, with no second pass;
 *   - with an unembedding: the logits of the latent's decoder direction, W_dec[latent] @
 *     W_U, as TransformerLens presents W_U by default (the final norm's scale folded in,
 *     the mean over the vocabulary removed: fold_ln, center_unembed), which is what
 *     SAEDashboard multiplies by: the top and bottom `n_logits` tokens (ties: lower token
 *     id first) and a histogram of all of them in LP_DASH_LOGIT_BINS equal bins over
 *     [min, max].
 *
 * Positions below `skip_positions` in each sequence (e.g. 1: the BOS token, whose huge
 * residual norm dominates many latents) are left out of every statistic but still shown
 * inside contexts. Tokens are numbered as the store numbers them: seq * ctx + pos. */
#ifndef LOUPE_DASHBOARD_H
#define LOUPE_DASHBOARD_H

#include "loupe/sae.h"
#include "loupe/tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LP_DASH_BINS 64          /* histogram bins at the current width */
#define LP_DASH_BINS_PER_BAND 4  /* so 16 bands, of which 9 to 16 are ever non-empty */
#define LP_DASH_BANDS (LP_DASH_BINS / LP_DASH_BINS_PER_BAND)
#define LP_DASH_LOGIT_BINS 40

typedef struct lp_dash_opts {
    const char *store;           /* activation store directory */
    const char *hook;            /* NULL or "": the SAE's hook_name */
    const int32_t *latents;      /* the latents to report, each in [0, d_sae) */
    int n_latents;
    int top;                     /* top activations per latent (20) */
    int left, right;             /* context tokens around each example (16, 4) */
    int samples;                 /* samples per band (5) */
    int n_logits;                /* top and bottom logits (10) */
    int skip_positions;          /* leading positions of each sequence not counted (0) */
    int batch_tokens;            /* tokens per encoded batch, rounded to whole sequences (4096) */
    uint64_t seed;               /* of the band-sampling hash */
    /* the unembedding, host F32: W_U [d_vocab, d_model] (row v: token v's direction) and
     * the final norm's scale [d_model] (NULL: none); NULL W_U: no logit tables */
    const float *W_U, *ln_final_w;
    int d_vocab;
} lp_dash_opts;

/* Sets the defaults above (store, latents and the unembedding left empty). */
void lp_dash_defaults(lp_dash_opts *o);

typedef struct lp_dash_example {
    int64_t token;               /* seq * ctx + pos */
    float value;
    int start, len;              /* the context: positions [start, start + len) of the sequence */
    int32_t *tokens;             /* [len] token ids */
    float *acts;                 /* [len] this latent's activation on each */
} lp_dash_example;

typedef struct lp_dash_band {
    float lo, hi;                /* activations in [lo, hi) */
    int64_t count;               /* nonzero activations in the band */
    int n;                       /* examples (<= samples), value descending */
    lp_dash_example *ex;
} lp_dash_band;

typedef struct lp_dash_latent {
    int latent;
    int64_t fires;               /* counted tokens with activation > 0 */
    double density;              /* fires / counted tokens */
    float max;
    int hist_exp;                /* bin width 2^hist_exp (meaningless when fires = 0) */
    int n_bins;                  /* bins shown: through the one holding max; 0 when fires = 0 */
    int64_t hist[LP_DASH_BINS];
    int n_top;
    lp_dash_example *top;
    int n_bands;                 /* bands covering the n_bins bins, lowest first */
    lp_dash_band bands[LP_DASH_BANDS];
    /* logits (n_logits = 0 without an unembedding) */
    int n_logits;
    int32_t *pos_ids, *neg_ids;  /* [n_logits]: largest first; smallest first */
    float *pos_vals, *neg_vals;
    float logit_lo, logit_hi;    /* histogram range */
    int64_t logit_hist[LP_DASH_LOGIT_BINS];
} lp_dash_latent;

typedef struct lp_dash {
    char hook[128];
    int ctx;                     /* sequence length of the store */
    int64_t n_seq, n_tokens;     /* in the store */
    int64_t n_counted;           /* tokens counted: n_seq * (ctx - skip_positions) */
    int n;                       /* latents */
    lp_dash_latent *lat;
    lp_dash_opts opts;           /* as run (pointers not kept valid) */
    double seconds_pass;         /* the pass over the store */
    void *mem;                   /* what the examples point into */
} lp_dash;

/* The pass: encodes the store's `hook` with s (on c's device) batch by batch and keeps the
 * statistics above for the chosen latents. Errors name the key or file: a latent out of
 * range (dash.latents, with d_sae), an empty store, a hook the store lacks, a hook width
 * that is not the SAE's d_in. */
lp_status lp_dash_run(lp_sae *s, lp_ctx *c, const lp_dash_opts *o, lp_dash **out);
void lp_dash_free(lp_dash *d);

/* "0-99,200" or "all" into latents in [0, d_sae), ascending as written; duplicates are an
 * error. key names the setting in messages. *out is malloc'd. */
lp_status lp_dash_parse_latents(const char *spec, int d_sae, const char *key, int32_t **out, int *n);

/* ---- outputs (host/analysis/dashboard_out.c) ----
 * Token strings come from tk (each id decoded on its own; invalid UTF-8 replaced by
 * U+FFFD); without a tokenizer tokens show as "#id". Both files are written under a
 * temporary name and renamed when complete. */

/* One self-contained HTML file: the data as inline JSON (every '<', '>' and '&' written
 * as \u escapes, so no token can close the script element), inline script and styles,
 * no external URL of any kind. The page sets data-rendered on <body> to the number of
 * latents listed and data-contexts to the contexts drawn for the one shown. */
lp_status lp_dash_write_html(const lp_dash *d, const lp_tokenizer *tk, const char *title, const char *path);
/* Neuronpedia's dashboard batch JSON (the format of SAEDashboard's NeuronpediaConverter:
 * {model_id, layer, sae_set, features: [{feature_index, pos_str, pos_values, neg_str,
 * neg_values, frac_nonzero, freq_hist_data_bar_values/heights,
 * logits_hist_data_bar_values/heights, activations: [{bin_min, bin_max, bin_contains,
 * tokens, values}], ...}], settings}), values rounded to 3 decimals; latents [first,
 * first + n) of d. */
lp_status lp_dash_write_neuronpedia(const lp_dash *d, const lp_tokenizer *tk, const char *model_id, int layer,
                                    const char *sae_set, int first, int n, const char *path);

#ifdef __cplusplus
}
#endif
#endif
