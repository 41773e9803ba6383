/* probe_run.c: one probe job on one hook's rows: the split by sequence (held out or
 * k-fold), the fits, and the held-out metrics (see probe.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "loupe/probe.h"
#include "core/rng.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

lp_status lp_probe_split(int64_t n_seq, const unsigned char *has_rows, int folds, double test_frac, uint64_t seed, int32_t *assign,
                         int64_t *n_used) {
    int64_t *perm = malloc(((size_t)n_seq + 1) * sizeof *perm), S = 0;
    if (!perm) LP_FAIL(LP_ERR_OOM, "probe: out of memory");
    for (int64_t q = 0; q < n_seq; q++) {
        assign[q] = -1;
        if (!has_rows || has_rows[q]) perm[S++] = q;
    }
    uint64_t s = seed;
    for (int64_t i = S - 1; i > 0; i--) { /* Fisher-Yates with splitmix64 */
        int64_t j = (int64_t)(rng_next(&s) % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    int64_t n_test = (int64_t)llround(test_frac * (double)S);
    n_test = n_test < 1 ? 1 : n_test > S - 1 ? S - 1 : n_test;
    for (int64_t i = 0; i < S; i++) /* k-fold: contiguous runs of the shuffled order */
        assign[perm[i]] = folds > 0 ? (int32_t)(i * folds / S) : i < n_test;
    free(perm);
    *n_used = S;
    return LP_OK;
}

/* Copies the rows whose sequence's assignment is (or with invert, is not) want. */
static lp_status take(const lp_probe_rows *r, const int32_t *assign, int want, int invert, double **x, int32_t **y, int64_t *n) {
    int64_t c = 0;
    for (int64_t i = 0; i < r->n; i++) c += (assign[r->seq[i]] == want) != invert;
    *x = malloc(((size_t)c * r->d + 1) * sizeof **x);
    *y = malloc(((size_t)c + 1) * sizeof **y);
    if (!*x || !*y) {
        free(*x), free(*y);
        *x = NULL, *y = NULL;
        LP_FAIL(LP_ERR_OOM, "probe: out of memory for a split of %lld rows", (long long)c);
    }
    *n = 0;
    for (int64_t i = 0; i < r->n; i++) {
        if ((assign[r->seq[i]] == want) == invert) continue;
        memcpy(*x + (size_t)*n * r->d, r->x + (size_t)i * r->d, (size_t)r->d * sizeof **x);
        (*y)[(*n)++] = r->y[i];
    }
    return LP_OK;
}

/* A class without training rows cannot be fitted: say which split and what to change. */
static lp_status train_classes(const int32_t *y, int64_t n, int k, const char *labels_path, int fold) {
    int64_t *cnt = calloc((size_t)k, sizeof *cnt);
    if (!cnt) LP_FAIL(LP_ERR_OOM, "probe: out of memory");
    for (int64_t i = 0; i < n; i++) cnt[y[i]]++;
    int missing = -1;
    for (int c = 0; c < k && missing < 0; c++)
        if (cnt[c] == 0) missing = c;
    free(cnt);
    if (missing < 0) return LP_OK;
    if (fold < 0) LP_FAIL(LP_ERR_ARG, "%s: class index %d has no rows in the training split; change probe.test_frac or probe.seed", labels_path, missing);
    LP_FAIL(LP_ERR_ARG, "%s: class index %d has no training rows in fold %d; use fewer probe.folds or another probe.seed", labels_path, missing, fold);
}

typedef struct fit_out { double acc, auroc, train_acc; lp_logreg_info info; } fit_out;

/* Fits one kind on the training rows into w, b and scores the test rows. */
static lp_status fit_eval(int kind, const double *xtr, const int32_t *ytr, int64_t ntr, const double *xte, const int32_t *yte, int64_t nte,
                          int d, int k, const lp_probe_opts *o, double *w, double *b, fit_out *out) {
    int m = lp_probe_n_out(k);
    size_t ns = (size_t)(ntr > nte ? ntr : nte) * (kind == LP_PROBE_LOGISTIC ? k : m) + 1;
    double *sc = malloc(ns * sizeof *sc);
    if (!sc) LP_FAIL(LP_ERR_OOM, "probe: out of memory");
    lp_status st;
    memset(out, 0, sizeof *out);
    if (kind == LP_PROBE_LOGISTIC) st = lp_logreg_fit(xtr, ytr, ntr, d, k, &o->logreg, w, b, &out->info);
    else st = lp_diffmean_fit(xtr, ytr, ntr, d, k, w, b);
    if (st == LP_OK) st = lp_probe_scores(xtr, ntr, d, m, w, b, sc);
    if (st == LP_OK) out->train_acc = lp_probe_accuracy(sc, ytr, ntr, k);
    out->acc = out->auroc = NAN;
    if (st == LP_OK && nte > 0) st = lp_probe_scores(xte, nte, d, m, w, b, sc);
    if (st == LP_OK && nte > 0) out->acc = lp_probe_accuracy(sc, yte, nte, k);
    /* AUROC of a logistic probe from its probabilities, as scikit-learn's predict_proba
     * (with K > 2 a class's probability is not a function of its logit alone) */
    if (st == LP_OK && nte > 0 && kind == LP_PROBE_LOGISTIC) st = lp_logreg_proba(xte, nte, d, k, w, b, sc);
    if (st == LP_OK && nte > 0) st = lp_probe_auroc(sc, kind == LP_PROBE_LOGISTIC ? k : m, yte, nte, k, &out->auroc);
    free(sc);
    return st;
}

static void record(lp_probe_metrics *mt, const fit_out *f, int fold, double secs) {
    if (fold >= 0) mt->fold_accuracy[fold] = f->acc, mt->fold_auroc[fold] = f->auroc;
    else mt->accuracy = f->acc, mt->auroc = f->auroc, mt->train_accuracy = f->train_acc;
    mt->seconds += secs;
}

/* k-fold: each fold's held-out metrics, then the saved probes on every row. */
static lp_status run_folds(const lp_probe_rows *r, int k, const lp_probe_opts *o, const char *lp, const int32_t *assign, lp_probe_result *res) {
    int m = res->n_out, d = r->d;
    double *w = malloc(((size_t)m * d + m) * sizeof *w);
    if (!w) LP_FAIL(LP_ERR_OOM, "probe: out of memory");
    lp_status st = LP_OK;
    for (int f = 0; f < o->folds && st == LP_OK; f++) {
        double *xtr = NULL, *xte = NULL;
        int32_t *ytr = NULL, *yte = NULL;
        int64_t ntr = 0, nte = 0;
        st = take(r, assign, f, 1, &xtr, &ytr, &ntr);
        if (st == LP_OK) st = take(r, assign, f, 0, &xte, &yte, &nte);
        if (st == LP_OK) st = train_classes(ytr, ntr, k, lp, f);
        if (f == 0) res->n_train = ntr, res->n_test = nte;
        for (int kind = LP_PROBE_LOGISTIC; kind <= LP_PROBE_DIFFMEAN && st == LP_OK; kind <<= 1) {
            if (!(o->kinds & kind)) continue;
            fit_out fo;
            double t0 = now_s();
            st = fit_eval(kind, xtr, ytr, ntr, xte, yte, nte, d, k, o, w, w + (size_t)m * d, &fo);
            record(kind == LP_PROBE_LOGISTIC ? &res->logistic : &res->diffmean, &fo, f, now_s() - t0);
        }
        free(xtr), free(xte), free(ytr), free(yte);
    }
    free(w);
    for (int kind = LP_PROBE_LOGISTIC; kind <= LP_PROBE_DIFFMEAN && st == LP_OK; kind <<= 1) {
        if (!(o->kinds & kind)) continue;
        lp_probe_metrics *mt = kind == LP_PROBE_LOGISTIC ? &res->logistic : &res->diffmean;
        double sa = 0, su = 0;
        int nu = 0;
        for (int f = 0; f < o->folds; f++) {
            sa += mt->fold_accuracy[f];
            if (!isnan(mt->fold_auroc[f])) su += mt->fold_auroc[f], nu++;
        }
        fit_out fo;
        double t0 = now_s();
        st = fit_eval(kind, r->x, r->y, r->n, NULL, NULL, 0, d, k, o, kind == LP_PROBE_LOGISTIC ? res->w : res->dm,
                      kind == LP_PROBE_LOGISTIC ? res->b : res->dm_b, &fo);
        mt->seconds += now_s() - t0;
        mt->accuracy = sa / o->folds, mt->auroc = nu ? su / nu : NAN, mt->train_accuracy = fo.train_acc;
        mt->iterations = fo.info.iterations, mt->converged = fo.info.converged;
    }
    return st;
}

static lp_status run_holdout(const lp_probe_rows *r, int k, const lp_probe_opts *o, const char *lp, const int32_t *assign, lp_probe_result *res) {
    double *xtr = NULL, *xte = NULL;
    int32_t *ytr = NULL, *yte = NULL;
    int64_t ntr = 0, nte = 0;
    lp_status st = take(r, assign, 1, 1, &xtr, &ytr, &ntr);
    if (st == LP_OK) st = take(r, assign, 1, 0, &xte, &yte, &nte);
    if (st == LP_OK) st = train_classes(ytr, ntr, k, lp, -1);
    res->n_train = ntr, res->n_test = nte;
    for (int kind = LP_PROBE_LOGISTIC; kind <= LP_PROBE_DIFFMEAN && st == LP_OK; kind <<= 1) {
        if (!(o->kinds & kind)) continue;
        fit_out fo;
        double t0 = now_s();
        int lg = kind == LP_PROBE_LOGISTIC;
        st = fit_eval(kind, xtr, ytr, ntr, xte, yte, nte, r->d, k, o, lg ? res->w : res->dm, lg ? res->b : res->dm_b, &fo);
        lp_probe_metrics *mt = lg ? &res->logistic : &res->diffmean;
        record(mt, &fo, -1, now_s() - t0);
        mt->iterations = fo.info.iterations, mt->converged = fo.info.converged;
    }
    free(xtr), free(xte), free(ytr), free(yte);
    return st;
}

lp_status lp_probe_run(const lp_probe_rows *r, int k, const lp_probe_opts *o, const char *labels_path, lp_probe_result *res) {
    memset(res, 0, sizeof *res);
    if (o->folds == 1 || o->folds < 0 || o->folds > LP_PROBE_MAX_FOLDS)
        LP_FAIL(LP_ERR_ARG, "probe.folds: %d; use 0 (one held-out split) or 2 to %d", o->folds, LP_PROBE_MAX_FOLDS);
    if (!o->folds && !(o->test_frac > 0 && o->test_frac < 1)) LP_FAIL(LP_ERR_ARG, "probe.test_frac: %g is not in (0, 1)", o->test_frac);
    int m = lp_probe_n_out(k), d = r->d;
    int64_t n_seq = 0;
    for (int64_t i = 0; i < r->n; i++) n_seq = r->seq[i] + 1 > n_seq ? r->seq[i] + 1 : n_seq;
    res->n_out = m, res->d = d, res->n_rows = r->n;
    unsigned char *has = calloc((size_t)n_seq + 1, 1);
    int32_t *assign = malloc(((size_t)n_seq + 1) * sizeof *assign);
    res->w = calloc(2 * ((size_t)m * d + m), sizeof *res->w);
    lp_status st = has && assign && res->w ? LP_OK : LP_ERR(LP_ERR_OOM, "probe: out of memory");
    if (st == LP_OK) {
        res->b = res->w + (size_t)m * d, res->dm = res->b + m, res->dm_b = res->dm + (size_t)m * d;
        for (int64_t i = 0; i < r->n; i++) has[r->seq[i]] = 1;
        int64_t S = 0;
        st = lp_probe_split(n_seq, has, o->folds, o->test_frac, o->seed, assign, &S);
        int need = o->folds ? o->folds : 2;
        if (st == LP_OK && S < need)
            st = LP_ERR(LP_ERR_ARG, "%s: %lld labelled sequence(s); %s needs at least %d", labels_path, (long long)S,
                              o->folds ? "probe.folds" : "a held-out split", need);
        int64_t held = 0;
        for (int64_t q = 0; st == LP_OK && q < n_seq; q++) held += assign[q] == 1;
        res->n_seq_test = o->folds ? 0 : held, res->n_seq_train = o->folds ? S : S - held;
    }
    if (st == LP_OK) st = o->folds ? run_folds(r, k, o, labels_path, assign, res) : run_holdout(r, k, o, labels_path, assign, res);
    free(has), free(assign);
    if (st != LP_OK) lp_probe_result_free(res);
    return st;
}

void lp_probe_result_free(lp_probe_result *res) {
    free(res->w);
    res->w = res->b = res->dm = res->dm_b = NULL;
}
