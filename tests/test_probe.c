/* test_probe.c: linear probes against scikit-learn (tests/gen/gen_probe_fixture.py):
 * logistic probabilities, AUROC and accuracy on a fixed split, difference-of-means probes,
 * the split by sequence and k-fold, gathering rows from a store (per token, mean-pooled),
 * and `loupe probe` end to end, with its refusals of bad input. */
#include <cjson/cJSON.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loupe/probe.h"
#include "loupe/safetensors.h"
#include "loupe/tokens.h"
#include "testutil.h"

#define FIX LP_FIXTURES "/probe"

/* Budgets, each with its reason:
 * - probabilities: the bound against scikit-learn at the same C (both solvers stop
 *   at a gradient of 1e-10 or so, far below it: the run prints the budget used);
 * - coefficients: relative to the largest coefficient, the same convergence argument;
 * - AUROC: both are exact ratios of integer rank sums, up to the last bits of rounding;
 * - difference of means: double sums of the same float32 inputs in a different order;
 * - accuracies are counts and must be equal. */
static const double PROBA_ABS = 1e-4, COEF_REL = 1e-4, AUROC_ABS = 1e-12, DIFFMEAN_ABS = 1e-12;

static lp_st_file g_fix;
static char dir[64];
static void mk(void) {
    cr_assert_eq(lp_st_open(&g_fix, FIX "/probe.safetensors"), LP_OK, "%s", lp_last_error());
    snprintf(dir, sizeof dir, "/tmp/loupe-probe-XXXXXX");
    cr_assert(mkdtemp(dir) != NULL);
}
static void rm(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    cr_expect(system(cmd) == 0);
    lp_st_close(&g_fix);
}
TestSuite(probe, .init = mk, .fini = rm, .timeout = 120);

static const lp_st_tensor *fx(const char *name) {
    const lp_st_tensor *t = lp_st_find(&g_fix, name);
    cr_assert(t != NULL, "fixture tensor %s missing", name);
    return t;
}
static const double *f64(const char *name) { return fx(name)->data; }
static double scalar(const char *name) { return f64(name)[0]; }
static const char *tmp(const char *name) {
    static char p[4][256];
    static int i;
    i = (i + 1) % 4;
    snprintf(p[i], sizeof p[i], "%s/%s", dir, name);
    return p[i];
}

/* The fixture's float32 activations as double rows, labels and the loupe split. */
typedef struct { double *x; int32_t *y; int64_t n; int d; } rows;
static rows fixture_rows(const char *xname, const char *yname) {
    const lp_st_tensor *x = fx(xname), *y = fx(yname);
    rows r = {malloc(x->nbytes * 2), malloc(y->nbytes), x->shape[0], (int)x->shape[1]};
    for (int64_t i = 0; i < r.n * r.d; i++) r.x[i] = ((const float *)x->data)[i];
    memcpy(r.y, y->data, y->nbytes);
    return r;
}
/* Rows whose split value is want (0 train, 1 test), copied. */
static rows pick(const rows *r, const int32_t *split, int want) {
    rows o = {malloc(r->n * r->d * sizeof(double)), malloc(r->n * sizeof(int32_t)), 0, r->d};
    for (int64_t i = 0; i < r->n; i++)
        if (split[i] == want) {
            memcpy(o.x + o.n * r->d, r->x + i * r->d, r->d * sizeof(double));
            o.y[o.n++] = r->y[i];
        }
    return o;
}
static void rows_free(rows *r) { free(r->x), free(r->y); }

static double max_abs_diff(const double *a, const double *b, size_t n, double *scale) {
    double m = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        m = fabs(a[i] - b[i]) > m ? fabs(a[i] - b[i]) : m;
        s = fabs(b[i]) > s ? fabs(b[i]) : s;
    }
    if (scale) *scale = s;
    return m;
}
static void within(const char *what, double err, double budget) {
    fprintf(stderr, "  %-44s %.3e of %.1e (%5.1f%%)\n", what, err, budget, 100 * err / budget);
    cr_expect(err <= budget, "%s: %.3e exceeds %.1e", what, err, budget);
}

/* ---- library against the references ---- */

static void check_logistic(const char *task, const char *xname, const char *yname, int k, double C) {
    char key[64], what[96];
    rows all = fixture_rows(xname, yname), tr = pick(&all, fx("split200")->data, 0), te = pick(&all, fx("split200")->data, 1);
    int m = lp_probe_n_out(k);
    double *w = malloc(m * all.d * sizeof *w), b[8], *proba = malloc(te.n * k * sizeof *proba), scale;
    lp_logreg_opts o = {C, 1e-10, 10000};
    lp_logreg_info info;
    cr_assert_eq(lp_logreg_fit(tr.x, tr.y, tr.n, tr.d, k, &o, w, b, &info), LP_OK, "%s", lp_last_error());
    cr_expect(info.converged, "%s: not converged after %d iterations (gradient %g)", task, info.iterations, info.grad_max);
    snprintf(key, sizeof key, "%s.n_iter", task);
    fprintf(stderr, "  %s: %d L-BFGS iterations (scikit-learn: %.0f)\n", task, info.iterations, scalar(key));
    cr_assert_eq(lp_logreg_proba(te.x, te.n, te.d, k, w, b, proba), LP_OK);
    snprintf(key, sizeof key, "%s.proba", task), snprintf(what, sizeof what, "%s probabilities (max abs)", task);
    within(what, max_abs_diff(proba, f64(key), te.n * k, NULL), PROBA_ABS);
    snprintf(key, sizeof key, "%s.coef", task), snprintf(what, sizeof what, "%s coefficients (max rel)", task);
    double e = max_abs_diff(w, f64(key), m * all.d, &scale);
    within(what, e / scale, COEF_REL);
    snprintf(key, sizeof key, "%s.intercept", task), snprintf(what, sizeof what, "%s intercepts (max rel)", task);
    within(what, max_abs_diff(b, f64(key), m, NULL) / scale, COEF_REL);
    double auc;
    cr_assert_eq(lp_probe_auroc(proba, k, te.y, te.n, k, &auc), LP_OK);
    snprintf(key, sizeof key, "%s.auroc", task), snprintf(what, sizeof what, "%s AUROC", task);
    within(what, fabs(auc - scalar(key)), AUROC_ABS);
    /* AUROC of scikit-learn's own probabilities: the metric alone */
    snprintf(key, sizeof key, "%s.proba", task);
    cr_assert_eq(lp_probe_auroc(f64(key), k, te.y, te.n, k, &auc), LP_OK);
    snprintf(key, sizeof key, "%s.auroc", task);
    cr_expect(fabs(auc - scalar(key)) <= AUROC_ABS, "%s: AUROC of scikit-learn's probabilities %.17g vs %.17g", task, auc, scalar(key));
    double *sc = malloc(te.n * m * sizeof *sc);
    cr_assert_eq(lp_probe_scores(te.x, te.n, te.d, m, w, b, sc), LP_OK);
    snprintf(key, sizeof key, "%s.accuracy", task);
    cr_expect_eq(lp_probe_accuracy(sc, te.y, te.n, k), scalar(key), "%s accuracy %g vs %g", task, lp_probe_accuracy(sc, te.y, te.n, k), scalar(key));
    free(sc), free(w), free(proba);
    rows_free(&all), rows_free(&tr), rows_free(&te);
}

Test(probe, logistic_binary_matches_sklearn) { check_logistic("bin", "x", "y2", 2, 1.0); }
Test(probe, logistic_binary_strong_l2_matches_sklearn) { check_logistic("binc", "x", "y2", 2, 0.05); }
Test(probe, logistic_multinomial_matches_sklearn) { check_logistic("multi", "x3", "y3", 3, 0.5); }

static void check_diffmean(const char *task, const char *xname, const char *yname, int k) {
    char key[64], what[96];
    rows all = fixture_rows(xname, yname), tr = pick(&all, fx("split200")->data, 0), te = pick(&all, fx("split200")->data, 1);
    int m = lp_probe_n_out(k);
    double *dirv = malloc(m * all.d * sizeof *dirv), b[8], *sc = malloc(te.n * m * sizeof *sc), auc;
    cr_assert_eq(lp_diffmean_fit(tr.x, tr.y, tr.n, tr.d, k, dirv, b), LP_OK, "%s", lp_last_error());
    snprintf(key, sizeof key, "%s.dm_dir", task), snprintf(what, sizeof what, "%s diffmean direction", task);
    within(what, max_abs_diff(dirv, f64(key), m * all.d, NULL), DIFFMEAN_ABS);
    snprintf(key, sizeof key, "%s.dm_bias", task), snprintf(what, sizeof what, "%s diffmean bias", task);
    within(what, max_abs_diff(b, f64(key), m, NULL), DIFFMEAN_ABS);
    cr_assert_eq(lp_probe_scores(te.x, te.n, te.d, m, dirv, b, sc), LP_OK);
    cr_assert_eq(lp_probe_auroc(sc, m, te.y, te.n, k, &auc), LP_OK);
    snprintf(key, sizeof key, "%s.dm_auroc", task), snprintf(what, sizeof what, "%s diffmean AUROC", task);
    within(what, fabs(auc - scalar(key)), AUROC_ABS);
    snprintf(key, sizeof key, "%s.dm_accuracy", task);
    cr_expect_eq(lp_probe_accuracy(sc, te.y, te.n, k), scalar(key), "%s diffmean accuracy", task);
    free(dirv), free(sc);
    rows_free(&all), rows_free(&tr), rows_free(&te);
}

Test(probe, diffmean_binary_matches_numpy) { check_diffmean("bin", "x", "y2", 2); }
Test(probe, diffmean_one_vs_rest_matches_numpy) { check_diffmean("multi", "x3", "y3", 3); }

Test(probe, auroc_counts_ties_as_sklearn) {
    const lp_st_tensor *s = fx("ties.score");
    double auc;
    cr_assert_eq(lp_probe_auroc(s->data, 1, fx("ties.y")->data, s->shape[0], 2, &auc), LP_OK);
    within("AUROC with tied scores", fabs(auc - scalar("ties.auroc")), AUROC_ABS);
    /* a class without rows: undefined, not a number */
    int32_t y[3] = {1, 1, 1};
    double sc[3] = {0.1, 0.2, 0.3};
    cr_assert_eq(lp_probe_auroc(sc, 1, y, 3, 2, &auc), LP_OK);
    cr_expect(isnan(auc));
}

Test(probe, split_is_seeded_balanced_and_by_sequence) {
    int32_t a[103], b[103], c[103];
    int64_t S;
    cr_assert_eq(lp_probe_split(103, NULL, 5, 0, 7, a, &S), LP_OK);
    cr_assert_eq(lp_probe_split(103, NULL, 5, 0, 7, b, &S), LP_OK);
    cr_assert_eq(lp_probe_split(103, NULL, 5, 0, 8, c, &S), LP_OK);
    cr_expect_eq(memcmp(a, b, sizeof a), 0, "the same seed gave another split");
    cr_expect_neq(memcmp(a, c, sizeof a), 0, "another seed gave the same split");
    int cnt[5] = {0};
    for (int i = 0; i < 103; i++) {
        cr_assert(a[i] >= 0 && a[i] < 5);
        cnt[a[i]]++;
    }
    for (int f = 0; f < 5; f++) cr_expect(cnt[f] == 20 || cnt[f] == 21, "fold %d has %d sequences", f, cnt[f]);
    /* the reference split: the same algorithm reimplemented in the generator */
    int32_t h[200];
    cr_assert_eq(lp_probe_split(200, NULL, 0, 0.2, 0, h, &S), LP_OK);
    cr_expect_eq(memcmp(h, fx("split200")->data, sizeof h), 0, "held-out split differs from the generator's");
    unsigned char has[10] = {1, 0, 1, 1, 0, 1, 1, 1, 1, 1};
    cr_assert_eq(lp_probe_split(10, has, 0, 0.25, 3, h, &S), LP_OK);
    cr_expect_eq(S, 8);
    cr_expect(h[1] == -1 && h[4] == -1);
    int held = 0;
    for (int i = 0; i < 10; i++) held += h[i] == 1;
    cr_expect_eq(held, 2);
}

Test(probe, kfold_matches_sklearn_on_the_same_folds) {
    rows all = fixture_rows("x", "y2");
    int64_t *seq = malloc(all.n * sizeof *seq);
    for (int64_t i = 0; i < all.n; i++) seq[i] = i;
    lp_probe_rows r = {all.x, all.y, seq, all.n, all.d};
    lp_probe_opts o = {LP_PROBE_LOGISTIC, {1.0, 1e-10, 10000}, 5, 0.2, 0};
    lp_probe_result res;
    cr_assert_eq(lp_probe_run(&r, 2, &o, "labels", &res), LP_OK, "%s", lp_last_error());
    const double *acc = f64("bin.fold_accuracy"), *auc = f64("bin.fold_auroc");
    double ma = 0;
    for (int f = 0; f < 5; f++) {
        cr_expect_eq(res.logistic.fold_accuracy[f], acc[f], "fold %d accuracy %g vs %g", f, res.logistic.fold_accuracy[f], acc[f]);
        cr_expect(fabs(res.logistic.fold_auroc[f] - auc[f]) <= AUROC_ABS, "fold %d AUROC %.17g vs %.17g", f, res.logistic.fold_auroc[f], auc[f]);
        ma += acc[f] / 5;
    }
    cr_expect(fabs(res.logistic.accuracy - ma) < 1e-15);
    cr_expect(res.logistic.converged);
    lp_probe_result_free(&res);
    free(seq);
    rows_free(&all);
}

/* ---- stores and label files ---- */

/* A store of one shard: tokens [n_seq, ctx] and hooks given as float32 [n_seq, ctx, d]. */
static void write_store(const char *sdir, int64_t n_seq, int ctx, int d, int n_hooks, const char *const *names, const float *const *data) {
    cr_assert_eq(lp_mkdir_p(sdir), LP_OK);
    lp_st_spec specs[8];
    const void *datas[8];
    int32_t *tok = calloc(n_seq * ctx + 1, sizeof *tok);
    specs[0] = (lp_st_spec){"tokens", LP_I32, 2, {n_seq, ctx}};
    datas[0] = tok;
    for (int h = 0; h < n_hooks; h++) specs[h + 1] = (lp_st_spec){names[h], LP_F32, 3, {n_seq, ctx, d}}, datas[h + 1] = data[h];
    char path[512];
    snprintf(path, sizeof path, "%s/shard-00000.safetensors", sdir);
    cr_assert_eq(lp_st_write(path, specs, datas, n_hooks + 1, NULL), LP_OK, "%s", lp_last_error());
    free(tok);
}

/* Raw .npy with any descr and shape text, for the label reader's refusals. */
static void write_npy(const char *path, const char *descr, const char *shape, const void *data, size_t nbytes) {
    char hdr[118];
    int n = snprintf(hdr, sizeof hdr, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }", descr, shape);
    memset(hdr + n, ' ', sizeof hdr - n);
    hdr[sizeof hdr - 1] = '\n';
    FILE *f = fopen(path, "wb");
    cr_assert(f);
    fwrite("\x93NUMPY\x01\x00\x76\x00", 1, 10, f);
    fwrite(hdr, 1, sizeof hdr, f);
    fwrite(data, 1, nbytes, f);
    fclose(f);
}

static void check_gathered(const char *task, const char *store, const char *hook, const char *labels, int pool_mean, int k) {
    lp_probe_labels lab;
    cr_assert_eq(lp_probe_labels_load(&lab, labels), LP_OK, "%s", lp_last_error());
    lp_probe_rows r;
    cr_assert_eq(lp_probe_gather(store, hook, &lab, labels, pool_mean, -1, &r), LP_OK, "%s", lp_last_error());
    lp_probe_opts o = {LP_PROBE_LOGISTIC | LP_PROBE_DIFFMEAN, {1.0, 1e-10, 10000}, 0, 0.2, 0};
    lp_probe_result res;
    cr_assert_eq(lp_probe_run(&r, lab.n_classes, &o, labels, &res), LP_OK, "%s", lp_last_error());
    char key[64], what[96];
    double scale;
    int m = lp_probe_n_out(k);
    snprintf(key, sizeof key, "%s.coef", task), snprintf(what, sizeof what, "%s from the store: coefficients", task);
    double e = max_abs_diff(res.w, f64(key), m * r.d, &scale);
    within(what, e / scale, COEF_REL);
    snprintf(key, sizeof key, "%s.auroc", task), snprintf(what, sizeof what, "%s from the store: AUROC", task);
    within(what, fabs(res.logistic.auroc - scalar(key)), AUROC_ABS);
    snprintf(key, sizeof key, "%s.accuracy", task);
    cr_expect_eq(res.logistic.accuracy, scalar(key), "%s accuracy", task);
    snprintf(key, sizeof key, "%s.dm_dir", task), snprintf(what, sizeof what, "%s from the store: diffmean", task);
    within(what, max_abs_diff(res.dm, f64(key), m * r.d, NULL), DIFFMEAN_ABS);
    snprintf(key, sizeof key, "%s.dm_auroc", task);
    cr_expect(fabs(res.diffmean.auroc - scalar(key)) <= AUROC_ABS, "%s diffmean AUROC", task);
    /* no sequence is on both sides of the split */
    cr_expect_eq(res.n_train + res.n_test, r.n);
    lp_probe_result_free(&res);
    lp_probe_rows_free(&r);
    lp_probe_labels_free(&lab);
}

Test(probe, per_token_labels_from_a_store) {
    const char *names[] = {"blocks.0.hook_resid_post"};
    const float *data[] = {fx("x")->data};
    write_store(tmp("s"), 50, 4, 24, 1, names, data);
    check_gathered("tok", tmp("s"), names[0], FIX "/labels_tok.npy", 0, 2);
}

Test(probe, mean_pooled_sequence_labels_from_a_store) {
    const char *names[] = {"blocks.0.hook_resid_post"};
    const float *data[] = {fx("x3")->data};
    write_store(tmp("s"), 50, 4, 24, 1, names, data);
    cr_assert_eq(lp_npy_write_i32(tmp("pool.npy"), fx("pool.labels")->data, -1, 50), LP_OK);
    check_gathered("pool", tmp("s"), names[0], tmp("pool.npy"), 1, 3);
}

Test(probe, label_files_are_checked) {
    lp_probe_labels l;
    cr_expect_eq(lp_probe_labels_load(&l, FIX "/labels_float.npy"), LP_ERR_FORMAT);
    cr_expect(strstr(lp_last_error(), "labels_float.npy") && strstr(lp_last_error(), "<f4"), "%s", lp_last_error());
    int32_t one[4] = {3, 3, -1, 3}, neg[4] = {0, 1, -2, 1};
    write_npy(tmp("one.npy"), "<i4", "(4,)", one, sizeof one);
    cr_expect_eq(lp_probe_labels_load(&l, tmp("one.npy")), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "only one class (label 3)"), "%s", lp_last_error());
    write_npy(tmp("neg.npy"), "<i4", "(4,)", neg, sizeof neg);
    cr_expect_eq(lp_probe_labels_load(&l, tmp("neg.npy")), LP_ERR_ARG);
    cr_expect(strstr(lp_last_error(), "label -2 at index 2"), "%s", lp_last_error());
    write_npy(tmp("3d.npy"), "<i4", "(1, 2, 2)", neg, sizeof neg);
    cr_expect_eq(lp_probe_labels_load(&l, tmp("3d.npy")), LP_ERR_SHAPE);
    write_npy(tmp("short.npy"), "<i4", "(40,)", neg, sizeof neg);
    cr_expect_eq(lp_probe_labels_load(&l, tmp("short.npy")), LP_ERR_FORMAT);
    /* sparse class values become indices in increasing order; -1 is no label */
    int64_t v[6] = {7, -1, 2, 7, 5, 2};
    write_npy(tmp("ok.npy"), "<i8", "(6,)", v, sizeof v);
    cr_assert_eq(lp_probe_labels_load(&l, tmp("ok.npy")), LP_OK, "%s", lp_last_error());
    cr_expect(l.n_classes == 3 && l.classes[0] == 2 && l.classes[1] == 5 && l.classes[2] == 7);
    cr_expect(l.y[0] == 2 && l.y[1] == -1 && l.y[2] == 0 && l.y[4] == 1 && l.ctx == 0 && l.n_seq == 6);
    lp_probe_labels_free(&l);
}


/* ---- loupe probe, as a user runs it (build/loupe or $LOUPE_CLI) ---- */

#define MODEL LP_FIXTURES "/gpt2-tiny"
#define H0 "blocks.0.hook_resid_post"
#define H1 "blocks.1.hook_resid_post"
/* a float32 value written to and read back from a file: the stored probes are float32 */
static const double F32_REL = 1e-6;
#include "clitest.h"


/* Bad input: exit 2 and exactly one line on stderr, containing the phrase. */
#define EXPECT_BAD(phrase, ...)                                                                 \
    do {                                                                                        \
        int rc_ = loupe(__VA_ARGS__);                                                           \
        cr_expect_eq(rc_, 2, "exit %d; stderr: %s", rc_, err_txt);                              \
        cr_expect(strstr(err_txt, phrase) != NULL, "stderr '%s' lacks '%s'", err_txt, phrase);  \
        char *nl_ = strchr(err_txt, '\n');                                                      \
        cr_expect(nl_ && nl_[1] == 0, "stderr is not one line: '%s'", err_txt);                 \
    } while (0)

static void fixture_store(const char *sdir) {
    const char *names[] = {H0, H1};
    const float *data[] = {fx("x")->data, fx("x3")->data};
    write_store(sdir, 200, 1, 24, 2, names, data);
}

static cJSON *last_json(void) {
    char *last = strrchr(out_txt, '{');
    while (last && last > out_txt && last[-1] != '\n') last = memrchr(out_txt, '{', last - out_txt);
    cJSON *j = last ? cJSON_Parse(last) : NULL;
    cr_assert(j, "last stdout line is not JSON: %s", out_txt);
    return j;
}
static double jnum(const cJSON *o, const char *kind, const char *key) {
    const cJSON *k = cJSON_GetObjectItem(o, kind), *v = k ? cJSON_GetObjectItem(k, key) : NULL;
    cr_assert(cJSON_IsNumber(v), "%s.%s missing", kind, key);
    return v->valuedouble;
}
static void stored_within(const lp_st_file *f, const char *name, const char *ref, int64_t d0, int64_t d1) {
    const lp_st_tensor *t = lp_st_find(f, name);
    cr_assert(t && t->dtype == LP_F32, "%s missing or not F32", name);
    cr_expect(t->shape[0] == d0 && (d1 == 0 ? t->ndim == 1 : t->ndim == 2 && t->shape[1] == d1), "%s has the wrong shape", name);
    double *v = malloc(t->nbytes / 4 * sizeof *v), scale;
    for (size_t i = 0; i < t->nbytes / 4; i++) v[i] = ((const float *)t->data)[i];
    char what[128];
    snprintf(what, sizeof what, "stored %s", name);
    within(what, max_abs_diff(v, f64(ref), t->nbytes / 4, &scale) / scale, COEF_REL + F32_REL);
    free(v);
}

Test(probe, cli_probes_match_sklearn) {
    fixture_store(tmp("s"));
    cr_assert_eq(loupe("probe %s --probe.labels=" FIX "/labels_bin.npy --probe.hooks=" H0 " --probe.out=%s --json", tmp("s"), tmp("o")), 0, "%s", err_txt);
    cJSON *j = last_json(), *h = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "hooks"), 0);
    cr_assert(h && cJSON_GetArraySize(cJSON_GetObjectItem(j, "hooks")) == 1);
    cr_expect_eq(jnum(h, "logistic", "accuracy"), scalar("bin.accuracy"));
    within("CLI AUROC", fabs(jnum(h, "logistic", "auroc") - scalar("bin.auroc")), AUROC_ABS);
    within("CLI diffmean AUROC", fabs(jnum(h, "diffmean", "auroc") - scalar("bin.dm_auroc")), AUROC_ABS);
    cr_expect_eq(cJSON_GetObjectItem(h, "n_test")->valueint, 40);
    cJSON_Delete(j);
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, tmp("o/probes.safetensors")), LP_OK, "%s", lp_last_error());
    stored_within(&f, H0 ".weight", "bin.coef", 1, 24);
    stored_within(&f, H0 ".bias", "bin.intercept", 1, 0);
    stored_within(&f, H0 ".diffmean", "bin.dm_dir", 24, 0);
    stored_within(&f, H0 ".diffmean_bias", "bin.dm_bias", 1, 0);
    lp_st_close(&f);
    slurp(tmp("o/report.jsonl"), out_txt, sizeof out_txt);
    cr_expect(strstr(out_txt, "\"hook\":\"" H0 "\"") && strchr(out_txt, '\n') == out_txt + strlen(out_txt) - 1, "%s", out_txt);

    /* three classes from an int8 file, logistic only, at another C */
    cr_assert_eq(loupe("probe %s --probe.labels=" FIX "/labels_multi.npy --probe.hooks=" H1 " --probe.kind=logistic --probe.C=0.5 "
                       "--probe.out=%s", tmp("s"), tmp("o")), 0, "%s", err_txt);
    cr_expect(strstr(out_txt, H1 ": d 24, train 160 / test 40 rows; logistic acc 0.9500") != NULL, "%s", out_txt);
    cr_assert_eq(lp_st_open(&f, tmp("o/probes.safetensors")), LP_OK, "%s", lp_last_error());
    stored_within(&f, H1 ".weight", "multi.coef", 3, 24);
    cr_expect(lp_st_find(&f, H1 ".diffmean") == NULL && lp_st_find(&f, H0 ".weight") == NULL);
    lp_st_close(&f);
}

Test(probe, cli_kfold_over_a_glob) {
    fixture_store(tmp("s"));
    cr_assert_eq(loupe("probe %s --probe.labels=" FIX "/labels_bin.npy --probe.hooks='blocks.*.hook_resid_post' --probe.folds=5 "
                       "--probe.kind=logistic --probe.tol=1e-10 --probe.out=%s --json", tmp("s"), tmp("o")), 0, "%s", err_txt);
    cJSON *j = last_json(), *hooks = cJSON_GetObjectItem(j, "hooks");
    cr_assert_eq(cJSON_GetArraySize(hooks), 2);
    cJSON *fa = cJSON_GetObjectItem(cJSON_GetObjectItem(cJSON_GetArrayItem(hooks, 0), "logistic"), "fold_accuracy");
    cr_assert_eq(cJSON_GetArraySize(fa), 5);
    for (int f = 0; f < 5; f++) cr_expect_eq(cJSON_GetArrayItem(fa, f)->valuedouble, f64("bin.fold_accuracy")[f], "fold %d", f);
    cr_expect_str_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(hooks, 1), "hook")->valuestring, H1);
    cJSON_Delete(j);
}

Test(probe, cli_on_a_cached_store) {
    cr_assert_eq(loupe("cache --model.path=" MODEL " --data.tokens=" MODEL "/tokens_flat.npy --data.context=8 "
                       "--cache.hooks=blocks.*.hook_resid_post,blocks.0.attn.hook_pattern --cache.out=%s", tmp("c")), 0, "%s", err_txt);
    int32_t lab[4 * 8];
    for (int i = 0; i < 32; i++) lab[i] = i % 8 == 0 ? -1 : (i * 5 + i / 8) % 3 == 0;
    cr_assert_eq(lp_npy_write_i32(tmp("tok.npy"), lab, 4, 8), LP_OK);
    cr_assert_eq(loupe("probe %s --probe.labels=%s --probe.hooks='blocks.*.hook_resid_post' --probe.test_frac=0.25 --probe.out=%s",
                       tmp("c"), tmp("tok.npy"), tmp("o")), 0, "%s", err_txt);
    cr_expect(strstr(out_txt, H0 ": d 64, train 21 / test 7 rows") && strstr(out_txt, H1 ": d 64"), "%s", out_txt);
    /* the default, every hook: the attention pattern is left out of a glob */
    cr_assert_eq(loupe("probe %s --probe.labels=%s --probe.kind=diffmean --probe.out=%s --json", tmp("c"), tmp("tok.npy"), tmp("o")), 0, "%s", err_txt);
    cJSON *j = last_json();
    cr_expect_eq(cJSON_GetArraySize(cJSON_GetObjectItem(j, "hooks")), 2, "%s", out_txt);
    cJSON_Delete(j);
    EXPECT_BAD("is not per token", "probe %s --probe.labels=%s --probe.hooks=blocks.0.attn.hook_pattern --probe.out=%s", tmp("c"),
               tmp("tok.npy"), tmp("o"));
}

Test(probe, cli_refuses_bad_input) {
    fixture_store(tmp("s"));
    char o[256];
    snprintf(o, sizeof o, "%s", tmp("o"));
    EXPECT_BAD("labels_tok.npy: 50 rows of labels, but the store", "probe %s --probe.labels=" FIX "/labels_tok.npy --probe.out=%s", tmp("s"), o);
    EXPECT_BAD("200 sequences", "probe %s --probe.labels=" FIX "/labels_tok.npy --probe.out=%s", tmp("s"), o);
    EXPECT_BAD("labels_float.npy: labels have dtype <f4", "probe %s --probe.labels=" FIX "/labels_float.npy --probe.out=%s", tmp("s"), o);
    int32_t zeros[200] = {0};
    cr_assert_eq(lp_npy_write_i32(tmp("one.npy"), zeros, -1, 200), LP_OK);
    EXPECT_BAD("only one class", "probe %s --probe.labels=%s --probe.out=%s", tmp("s"), tmp("one.npy"), o);
    EXPECT_BAD("probe.hooks: 'blocks.9.hook_resid_post' matches no hook",
               "probe %s --probe.labels=" FIX "/labels_bin.npy --probe.hooks=blocks.9.hook_resid_post --probe.out=%s", tmp("s"), o);
    EXPECT_BAD("probe.position", "probe %s --probe.labels=" FIX "/labels_bin.npy --probe.position=1 --probe.out=%s", tmp("s"), o);
    EXPECT_BAD("probe.C", "probe %s --probe.labels=" FIX "/labels_bin.npy --probe.C=0 --probe.out=%s", tmp("s"), o);
    EXPECT_BAD("probe.folds", "probe %s --probe.labels=" FIX "/labels_bin.npy --probe.folds=1 --probe.out=%s", tmp("s"), o);
    EXPECT_BAD("probe.labels", "probe %s --probe.out=%s", tmp("s"), o);
    /* empty stores: no shards, and a shard of no sequences */
    cr_assert_eq(lp_mkdir_p(tmp("e")), LP_OK);
    EXPECT_BAD("no shards", "probe %s --probe.labels=" FIX "/labels_bin.npy --probe.out=%s", tmp("e"), o);
    const char *names[] = {H0};
    const float *data[] = {fx("x")->data};
    write_store(tmp("z"), 0, 1, 24, 1, names, data);
    /* the store reader refuses a shard of no sequences itself, naming the shard */
    EXPECT_BAD("with sequences >= 1", "probe %s --probe.labels=" FIX "/labels_bin.npy --probe.out=%s", tmp("z"), o);
    /* a non-finite activation names the hook and where */
    float *x = malloc(200 * 24 * sizeof *x);
    memcpy(x, fx("x")->data, 200 * 24 * sizeof *x);
    x[7 * 24 + 3] = NAN;
    data[0] = x;
    write_store(tmp("n"), 200, 1, 24, 1, names, data);
    free(x);
    EXPECT_BAD("hook '" H0 "' holds a non-finite value (nan) at sequence 7, position 0, element 3",
               "probe %s --probe.labels=" FIX "/labels_bin.npy --probe.out=%s", tmp("n"), o);
    struct stat sb;
    cr_expect(stat(tmp("o/probes.safetensors"), &sb) != 0, "a refused run left probes.safetensors");
}
