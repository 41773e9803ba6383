/* probe.c: `loupe probe`: linear probes (logistic and difference of means) on the hooks
 * of an activation store, with labels from an .npy file. Writes probe.out/probes.safetensors
 * (per hook `<hook>.weight` [n_out, d], `<hook>.bias` [n_out], `<hook>.diffmean` [d] or
 * [K, d], `<hook>.diffmean_bias` [n_out]) and probe.out/report.jsonl (one line per hook),
 * both at the end and atomically, under the output directory's lock. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loupe/output.h"
#include "loupe/probe.h"
#include "loupe/safetensors.h"
#include "loupe/store.h"
#include "cli.h"

typedef struct probe_job {
    const char *store, *labels, *out;
    lp_probe_opts o;
    int pool_mean, position;
    lp_probe_labels lab;
    char **hooks;
    int n_hooks;
    /* what probes.safetensors receives: 4 tensors per hook at most, float32 */
    lp_st_spec *specs;
    float **data;
    int n_t;
    cJSON *lines;   /* report.jsonl, one object per hook */
} probe_job;

static lp_status job_opts(const args *a, probe_job *j) {
    LP_CHECK(lp_cfg_require(&a->cfg, (const char *[]){"data.store", "probe.labels", "probe.out", NULL}));
    const char *kind = lp_cfg_str(&a->cfg, "probe.kind");
    j->store = lp_cfg_str(&a->cfg, "data.store");
    j->labels = lp_cfg_str(&a->cfg, "probe.labels");
    j->out = lp_cfg_str(&a->cfg, "probe.out");
    j->o.kinds = strcmp(kind, "logistic") == 0 ? LP_PROBE_LOGISTIC : strcmp(kind, "diffmean") == 0 ? LP_PROBE_DIFFMEAN
                                                                                                  : LP_PROBE_LOGISTIC | LP_PROBE_DIFFMEAN;
    j->o.logreg = (lp_logreg_opts){lp_cfg_float(&a->cfg, "probe.C"), lp_cfg_float(&a->cfg, "probe.tol"), (int)lp_cfg_int(&a->cfg, "probe.max_iter")};
    j->o.folds = (int)lp_cfg_int(&a->cfg, "probe.folds");
    j->o.test_frac = lp_cfg_float(&a->cfg, "probe.test_frac");
    j->o.seed = (uint64_t)lp_cfg_int(&a->cfg, "probe.seed");
    j->pool_mean = strcmp(lp_cfg_str(&a->cfg, "probe.pool"), "mean") == 0;
    j->position = (int)lp_cfg_int(&a->cfg, "probe.position");
    if (!(j->o.logreg.C > 0)) LP_FAIL(LP_ERR_ARG, "probe.C: %g; it must be > 0", j->o.logreg.C);
    if (strlen(j->labels) >= 1024) LP_FAIL(LP_ERR_ARG, "probe.labels: the path is %zu bytes; at most 1023 are allowed", strlen(j->labels));
    if (strcmp(lp_cfg_str(&a->cfg, "data.allow_incomplete"), "true") != 0) LP_CHECK(lp_store_require_complete(j->store));
    return LP_OK;
}

/* Adds a float32 copy of a double tensor to the output. */
static lp_status add_tensor(probe_job *j, const char *hook, const char *suffix, const double *v, int ndim, int64_t d0, int64_t d1) {
    size_t n = (size_t)d0 * (ndim == 2 ? (size_t)d1 : 1);
    lp_st_spec *sp = &j->specs[j->n_t];
    char *name = malloc(strlen(hook) + strlen(suffix) + 2);
    float *f = malloc(n * sizeof *f);
    j->data[j->n_t] = f;
    sp->name = name;
    j->n_t++;
    if (!name || !f) LP_FAIL(LP_ERR_OOM, "out of memory");
    sprintf(name, "%s.%s", hook, suffix);
    sp->dtype = LP_F32, sp->ndim = ndim, sp->shape[0] = d0, sp->shape[1] = d1;
    for (size_t i = 0; i < n; i++) f[i] = (float)v[i];
    return LP_OK;
}

static void add_metrics(cJSON *o, const char *name, const lp_probe_metrics *m, int folds, int logistic) {
    cJSON *k = cJSON_AddObjectToObject(o, name);
    cJSON_AddNumberToObject(k, "accuracy", m->accuracy); /* NaN (undefined) prints as null */
    cJSON_AddNumberToObject(k, "auroc", m->auroc);
    cJSON_AddNumberToObject(k, "train_accuracy", m->train_accuracy);
    if (folds) {
        cJSON_AddItemToObject(k, "fold_accuracy", cJSON_CreateDoubleArray(m->fold_accuracy, folds));
        cJSON_AddItemToObject(k, "fold_auroc", cJSON_CreateDoubleArray(m->fold_auroc, folds));
    }
    if (logistic) {
        cJSON_AddNumberToObject(k, "iterations", m->iterations);
        cJSON_AddBoolToObject(k, "converged", m->converged);
    }
    cJSON_AddNumberToObject(k, "seconds", m->seconds);
}

static cJSON *report_line(const probe_job *j, const char *hook, const lp_probe_result *r) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "hook", hook);
    cJSON_AddNumberToObject(o, "d", r->d);
    cJSON *cl = cJSON_AddArrayToObject(o, "classes");
    for (int c = 0; c < j->lab.n_classes; c++) cJSON_AddItemToArray(cl, cJSON_CreateNumber((double)j->lab.classes[c]));
    cJSON_AddStringToObject(o, "labels", j->lab.ctx ? "per_token" : "per_sequence");
    if (!j->lab.ctx) cJSON_AddStringToObject(o, "pool", j->pool_mean ? "mean" : "position");
    if (!j->lab.ctx && !j->pool_mean) cJSON_AddNumberToObject(o, "position", j->position);
    cJSON_AddNumberToObject(o, "n_rows", (double)r->n_rows);
    cJSON_AddNumberToObject(o, "folds", j->o.folds);
    cJSON_AddNumberToObject(o, "n_train", (double)r->n_train);
    cJSON_AddNumberToObject(o, "n_test", (double)r->n_test);
    cJSON_AddNumberToObject(o, "n_seq_train", (double)r->n_seq_train);
    cJSON_AddNumberToObject(o, "n_seq_test", (double)r->n_seq_test);
    cJSON_AddNumberToObject(o, "C", j->o.logreg.C);
    cJSON_AddNumberToObject(o, "seed", (double)j->o.seed);
    if (j->o.kinds & LP_PROBE_LOGISTIC) add_metrics(o, "logistic", &r->logistic, j->o.folds, 1);
    if (j->o.kinds & LP_PROBE_DIFFMEAN) add_metrics(o, "diffmean", &r->diffmean, j->o.folds, 0);
    return o;
}

static void print_hook(const probe_job *j, const char *hook, const lp_probe_result *r) {
    if (j->o.folds) printf("%s: d %d, %lld rows, %d folds", hook, r->d, (long long)r->n_rows, j->o.folds);
    else printf("%s: d %d, train %lld / test %lld rows", hook, r->d, (long long)r->n_train, (long long)r->n_test);
    if (j->o.kinds & LP_PROBE_LOGISTIC)
        printf("; logistic acc %.4f auroc %.4f (%d it%s, %.2f s)", r->logistic.accuracy, r->logistic.auroc, r->logistic.iterations,
               r->logistic.converged ? "" : ", NOT converged", r->logistic.seconds);
    if (j->o.kinds & LP_PROBE_DIFFMEAN) printf("; diffmean acc %.4f auroc %.4f", r->diffmean.accuracy, r->diffmean.auroc);
    printf("\n");
}

static lp_status probe_hook(probe_job *j, const char *hook, int quiet) {
    lp_probe_rows rows;
    lp_probe_result r;
    LP_CHECK(lp_probe_gather(j->store, hook, &j->lab, j->labels, j->pool_mean, j->position, &rows));
    lp_status st = lp_probe_run(&rows, j->lab.n_classes, &j->o, j->labels, &r);
    lp_probe_rows_free(&rows);
    if (st != LP_OK) return st;
    int m = r.n_out, bin = j->lab.n_classes == 2;
    if (st == LP_OK && (j->o.kinds & LP_PROBE_LOGISTIC)) st = add_tensor(j, hook, "weight", r.w, 2, m, r.d);
    if (st == LP_OK && (j->o.kinds & LP_PROBE_LOGISTIC)) st = add_tensor(j, hook, "bias", r.b, 1, m, 0);
    if (st == LP_OK && (j->o.kinds & LP_PROBE_DIFFMEAN)) st = bin ? add_tensor(j, hook, "diffmean", r.dm, 1, r.d, 0) : add_tensor(j, hook, "diffmean", r.dm, 2, m, r.d);
    if (st == LP_OK && (j->o.kinds & LP_PROBE_DIFFMEAN)) st = add_tensor(j, hook, "diffmean_bias", r.dm_b, 1, m, 0);
    if (st == LP_OK) cJSON_AddItemToArray(j->lines, report_line(j, hook, &r));
    if (st == LP_OK && !quiet) print_hook(j, hook, &r);
    lp_probe_result_free(&r);
    return st;
}

/* probes.safetensors, then report.jsonl: each complete or absent. */
static lp_status write_outputs(probe_job *j) {
    char path[1200], classes[512] = "[", Cbuf[32];
    for (int c = 0, o = 1; c < j->lab.n_classes && o < (int)sizeof classes - 24; c++)
        o += snprintf(classes + o, sizeof classes - o, "%s%lld", c ? ", " : "", (long long)j->lab.classes[c]);
    strcat(classes, "]");
    snprintf(Cbuf, sizeof Cbuf, "%.17g", j->o.logreg.C);
    const char *meta[] = {"format", "loupe probes", "classes", classes, "store", j->store, "labels", j->labels, "C", Cbuf, NULL};
    snprintf(path, sizeof path, "%s/probes.safetensors", j->out);
    LP_CHECK(lp_st_write(path, j->specs, (const void *const *)j->data, j->n_t, meta));
    size_t cap = 4096, len = 0;
    char *txt = malloc(cap);
    lp_status st = txt ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    cJSON *line;
    cJSON_ArrayForEach(line, j->lines) {
        char *s = st == LP_OK ? cJSON_PrintUnformatted(line) : NULL;
        size_t n = s ? strlen(s) : 0;
        char *grown = s && len + n + 2 > cap ? realloc(txt, cap = 2 * (len + n + 2)) : txt;
        if (s && grown) txt = grown, memcpy(txt + len, s, n), len += n, txt[len++] = '\n';
        else if (st == LP_OK) st = LP_ERR(LP_ERR_OOM, "out of memory");
        free(s);
    }
    snprintf(path, sizeof path, "%s/report.jsonl", j->out);
    if (st == LP_OK) st = lp_write_file_atomic(path, txt, len);
    free(txt);
    return st;
}

static void job_free(probe_job *j) {
    for (int i = 0; i < j->n_t; i++) free((char *)j->specs[i].name), free(j->data[i]);
    free(j->specs), free(j->data);
    lp_probe_hooks_free(j->hooks, j->n_hooks);
    lp_probe_labels_free(&j->lab);
    cJSON_Delete(j->lines);
}

int cmd_probe(args *a) {
    probe_job j = {0};
    lp_lock lock = {.fd = -1};
    double t0 = cli_now();
    lp_status st = job_opts(a, &j);
    if (st == LP_OK) st = lp_probe_labels_load(&j.lab, j.labels);
    if (st == LP_OK) st = lp_probe_store_hooks(j.store, lp_cfg_str(&a->cfg, "probe.hooks"), &j.hooks, &j.n_hooks);
    if (st == LP_OK && strlen(j.out) >= 1024) st = LP_ERR(LP_ERR_ARG, "probe.out: the path is too long");
    if (st == LP_OK) st = lp_lock_output(&lock, j.out, 1);
    if (st == LP_OK) {
        j.specs = calloc((size_t)j.n_hooks * 4, sizeof *j.specs);
        j.data = calloc((size_t)j.n_hooks * 4, sizeof *j.data);
        j.lines = cJSON_CreateArray();
        if (!j.specs || !j.data || !j.lines) st = LP_ERR(LP_ERR_OOM, "out of memory");
    }
    for (int h = 0; h < j.n_hooks && st == LP_OK; h++) {
        if (isatty(2)) fprintf(stderr, "\rloupe: probe %d/%d: %s\033[K", h + 1, j.n_hooks, j.hooks[h]);
        st = probe_hook(&j, j.hooks[h], a->json);
    }
    if (isatty(2) && j.n_hooks) fputc('\n', stderr);
    if (st == LP_OK) st = write_outputs(&j);
    int rc = st == LP_OK ? 0 : cli_fail(st);
    if (st == LP_OK && a->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "out", j.out);
        cJSON_AddNumberToObject(o, "seconds", cli_now() - t0);
        cJSON_AddItemToObject(o, "hooks", j.lines);
        j.lines = NULL;
        cli_print_json(o);
    } else if (st == LP_OK) {
        printf("wrote %d probe(s) to %s/probes.safetensors and %s/report.jsonl in %.2f s\n", j.n_hooks, j.out, j.out, cli_now() - t0);
    }
    job_free(&j);
    lp_lock_release(&lock);
    return rc;
}
