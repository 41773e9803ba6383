/* probe.h: linear probes on stored activations (`loupe probe`).
 *
 * Two probes per hook: L2-regularised logistic regression with an intercept, the same
 * objective as scikit-learn's LogisticRegression(C) with the lbfgs solver
 *     C * sum_i logloss_i + 1/2 ||W||^2          (the intercept is not penalised)
 * (binary: one weight row and a sigmoid, as scikit-learn parameterises it; K > 2 classes:
 * K rows and a softmax, the multinomial loss), solved by L-BFGS in double precision; and a
 * difference-of-means probe (binary: mean(class 1) - mean(class 0), thresholded at the
 * midpoint of the projected class means; K > 2: one-vs-rest, row k = mean(class k) -
 * mean(not k), each with its own midpoint). Metrics: accuracy and AUROC (binary:
 * Mann-Whitney with ties counted one half, which is scikit-learn's roc_auc_score; K > 2:
 * the one-vs-rest macro average, roc_auc_score(multi_class="ovr", average="macro")).
 *
 * Rows are grouped by sequence: a held-out split or a k-fold split assigns whole
 * sequences, so the tokens of one sequence never straddle train and test. */
#ifndef LOUPE_PROBE_H
#define LOUPE_PROBE_H

#include <stdint.h>

#include "loupe/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- fitting and scoring (x is [n, d] row-major double, y class indices in [0, k)) ---- */

typedef struct lp_logreg_opts {
    double C;       /* inverse regularisation strength, > 0 */
    double tol;     /* stop when max |gradient| of (objective / (C n)) is below this */
    int max_iter;   /* L-BFGS iterations at most */
} lp_logreg_opts;

typedef struct lp_logreg_info {
    int iterations;
    int converged;     /* the gradient reached tol (else max_iter or no further progress) */
    double grad_max;   /* max |gradient| at the end, of the scaled objective */
    double loss;       /* mean log-loss + ||W||^2 / (2 C n) at the end */
} lp_logreg_info;

/* Output rows of a k-class probe: 1 for two classes (the score favours class 1), else k. */
static inline int lp_probe_n_out(int k) { return k == 2 ? 1 : k; }

/* w [n_out, d] and b [n_out] receive the fitted probe. Every class must have a row. */
lp_status lp_logreg_fit(const double *x, const int32_t *y, int64_t n, int d, int k, const lp_logreg_opts *o,
                        double *w, double *b, lp_logreg_info *info);
/* Class probabilities [n, k] of a fitted logistic probe. */
lp_status lp_logreg_proba(const double *x, int64_t n, int d, int k, const double *w, const double *b, double *proba);

/* dir [n_out, d], bias [n_out]: score = dir . x + bias, bias = -(midpoint of the projected
 * means), so a positive score means class 1 (binary) / class k (one-vs-rest). */
lp_status lp_diffmean_fit(const double *x, const int32_t *y, int64_t n, int d, int k, double *dir, double *bias);
/* Scores [n, n_out] = x . dir^T + bias. */
lp_status lp_probe_scores(const double *x, int64_t n, int d, int n_out, const double *w, const double *b, double *scores);

/* Predicted class of each row from scores [n, n_out] (binary: score > 0 is class 1;
 * else the first largest) and the fraction of rows predicted right. */
double lp_probe_accuracy(const double *scores, const int32_t *y, int64_t n, int k);
/* AUROC from scores [n, n_out] (probabilities [n, k] work too: pass n_out = k; for two
 * classes the last column is used). NaN when a class has no row (binary) or any class
 * has no row (one-vs-rest), where it is undefined. */
lp_status lp_probe_auroc(const double *scores, int n_out, const int32_t *y, int64_t n, int k, double *auroc);

/* ---- label files ---- */

/* Labels from an .npy of integers (int8..int64, uint8..uint64, bool), shape [n_seq]
 * (one label per sequence) or [n_seq, ctx] (one per token); -1 means "no label". The
 * distinct values (>= 0) are the classes, in increasing order, as scikit-learn's classes_. */
typedef struct lp_probe_labels {
    int32_t *y;          /* [n_seq] or [n_seq, ctx]: class index, or -1 */
    int64_t n_seq;
    int ctx;             /* 0: per-sequence labels */
    int n_classes;
    int64_t *classes;    /* [n_classes]: the label value of each class index */
    int64_t *count;      /* [n_classes]: rows of each class */
} lp_probe_labels;

lp_status lp_probe_labels_load(lp_probe_labels *l, const char *path);
void lp_probe_labels_free(lp_probe_labels *l);

/* ---- rows from an activation store ---- */

/* The store's hooks matching spec (comma-separated names or globs such as
 * blocks.*.hook_resid_post), in the store's order, each once; globs leave out attention
 * patterns and scores, which are not per token. Free with lp_probe_hooks_free. */
lp_status lp_probe_store_hooks(const char *store, const char *spec, char ***names, int *n);
void lp_probe_hooks_free(char **names, int n);

typedef struct lp_probe_rows {
    double *x;       /* [n, d] */
    int32_t *y;      /* [n] class index */
    int64_t *seq;    /* [n] the sequence each row comes from */
    int64_t n;
    int d;
} lp_probe_rows;

/* Per-sequence labels read one position of each sequence (position < 0 counts from the
 * end: -1 is the last token) or, with pool_mean, the mean over its positions; per-token
 * labels read every labelled token. labels_path names the label file in errors. */
lp_status lp_probe_gather(const char *store, const char *hook, const lp_probe_labels *l, const char *labels_path,
                          int pool_mean, int position, lp_probe_rows *r);
void lp_probe_rows_free(lp_probe_rows *r);

/* ---- a whole probe job on one hook's rows ---- */

enum { LP_PROBE_LOGISTIC = 1, LP_PROBE_DIFFMEAN = 2 };

typedef struct lp_probe_opts {
    int kinds;             /* LP_PROBE_LOGISTIC | LP_PROBE_DIFFMEAN */
    lp_logreg_opts logreg;
    int folds;             /* 0: one held-out split of test_frac; k >= 2: k-fold */
    double test_frac;      /* of the sequences, in (0, 1) */
    uint64_t seed;         /* the sequences' shuffle */
} lp_probe_opts;

#define LP_PROBE_MAX_FOLDS 100
typedef struct lp_probe_metrics {
    double accuracy, auroc;              /* held out; k-fold: the mean over folds (AUROC: of the defined ones) */
    double train_accuracy;
    double fold_accuracy[LP_PROBE_MAX_FOLDS], fold_auroc[LP_PROBE_MAX_FOLDS];
    int iterations, converged;           /* logistic: of the saved probe's fit */
    double seconds;                      /* fitting time, all fits of this kind */
} lp_probe_metrics;

typedef struct lp_probe_result {
    int n_out, d;
    int64_t n_rows, n_train, n_test;     /* k-fold: n_train / n_test of the first fold */
    int64_t n_seq_train, n_seq_test;
    lp_probe_metrics logistic, diffmean;
    /* the saved probes: fitted on the training split, or with k folds on every row */
    double *w, *b;                       /* [n_out, d], [n_out] */
    double *dm, *dm_b;                   /* [n_out, d], [n_out] */
} lp_probe_result;

/* Splits by sequence, fits, scores. labels_path names the label file in errors (a class
 * missing from a training split). */
lp_status lp_probe_run(const lp_probe_rows *r, int k, const lp_probe_opts *o, const char *labels_path, lp_probe_result *res);
void lp_probe_result_free(lp_probe_result *res);

/* assign[q] for each sequence q in [0, n_seq): its fold (k-fold: contiguous runs of a
 * seeded shuffle of the sequences that have rows), or 1 = held out / 0 = train (the first
 * round(test_frac S) of the shuffle, at least 1 and at most S - 1); -1 for a sequence
 * without rows (has_rows may be NULL: all have). *n_used receives S. */
lp_status lp_probe_split(int64_t n_seq, const unsigned char *has_rows, int folds, double test_frac, uint64_t seed, int32_t *assign,
                         int64_t *n_used);

#ifdef __cplusplus
}
#endif
#endif
