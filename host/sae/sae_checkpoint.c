/* sae_checkpoint.c: trainer checkpoints that resume identically (parameters, Adam state,
 * counters, matched by a signature of the config and data), pruning old ones, and the
 * metrics log cut back to a resumed step. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loupe/hooks.h"
#include "loupe/ops.h"
#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "loupe/sae_ops.h"
#include "loupe/sae_train.h"
#include "loupe/store.h"
#include "core/rng.h"
#include "io/json.h"
#include "sae/sae_internal.h"
#include "sae/sae_read.h"
#include "sae/sae_trainer.h"

/* ---- checkpoints ---- */

/* What must match for a checkpoint to be resumed. */
static void signature(const trainer *tr, char *buf, size_t n) {
    const lp_sae_train_cfg *t = tr->t;
    const lp_sae_cfg *s = &tr->full; /* the whole SAE: a checkpoint resumes under any dist.tp */
    snprintf(buf, n, "%s|%s|%s|%d|%d|%d|%d|%d|%s|%a|%a|%a|%a|%lld|%lld|%s|%a|%lld|%a|%a|%a|%d|%lld|%d|%s|%lld|%lld|%llu|%s|%s",
             lp_sae_arch_name(s->arch), s->hook_name, s->hook_name_out, s->d_in, s->d_sae, s->d_out, s->k, s->apply_b_dec_to_input,
             s->normalize, t->lr, t->adam_beta1, t->adam_beta2, t->adam_eps, (long long)t->lr_warm_up_steps, (long long)t->lr_decay_steps,
             t->lr_scheduler, t->l1_coefficient, (long long)t->l1_warm_up_steps, t->l0_coefficient, t->jumprelu_init_threshold,
             t->aux_k_coefficient, t->aux_k, (long long)t->tokens, t->batch_tokens, t->b_dec_init, (long long)t->dead_feature_window,
             (long long)tr->W, (unsigned long long)t->seed, t->store ? t->store : "(live)", tr->store_id);
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Keeps the `keep` newest complete checkpoints (their names sort by step). */
static lp_status prune_checkpoints(const char *out, int keep) {
    char dir[1200], path[1500];
    snprintf(dir, sizeof dir, "%s/checkpoints", out);
    DIR *d = opendir(dir);
    if (!d) return LP_OK;
    char *names[4096];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 4096)
        if (strncmp(e->d_name, "step-", 5) == 0 && strlen(e->d_name) == 14 && !(names[n++] = strdup(e->d_name))) break;
    closedir(d);
    if (n && !names[n - 1]) {
        while (n--) free(names[n]);
        LP_FAIL(LP_ERR_OOM, "%s: out of memory", dir);
    }
    qsort(names, n, sizeof *names, by_name);
    lp_status st = LP_OK;
    for (int i = 0; i < n; i++) {
        if (i < n - keep && st == LP_OK) {
            snprintf(path, sizeof path, "%s/%s", dir, names[i]);
            st = lp_remove_tree(path);
        }
        free(names[i]);
    }
    return st;
}

/* The whole SAE's state on the host: parameters, Adam moments (3 nf floats, the full
 * layout) and the dead-latent counters; a latent shard's are gathered (sae_shard.c) and land
 * on TP rank 0 alone (*h NULL elsewhere). */
static lp_status ckpt_state(trainer *tr, float **h, int64_t **since, size_t *nf) {
    lp_ctx *c = tr->c;
    lp_sae whole = {.cfg = tr->full};
    *nf = sae_carve(&whole, NULL), *since = NULL;
    *h = tr->tpr == 0 ? malloc(3 * *nf * sizeof(float)) : NULL;
    if (tr->tpr == 0 && !*h) LP_FAIL(LP_ERR_OOM, "out of memory for a checkpoint");
    if (tr->tp == 1) { /* the caller frees *h, also after a failure */
        *since = tr->since;
        lp_status st = lp_ctx_to_host(c, *h, tr->s->mem, *nf * 4);
        if (st == LP_OK) st = lp_ctx_to_host(c, tr->since, tr->since_dev, (size_t)tr->S * 8); /* the dead-latent counters */
        if (st == LP_OK) st = lp_ctx_to_host(c, *h + *nf, tr->adam_m, *nf * 4);
        if (st == LP_OK) st = lp_ctx_to_host(c, *h + 2 * *nf, tr->adam_v, *nf * 4);
        return st;
    }
    int64_t *all = tr->tpr == 0 ? malloc((size_t)tr->full.d_sae * 8) : NULL;
    if (tr->tpr == 0 && !all) LP_FAIL(LP_ERR_OOM, "out of memory for a checkpoint");
    *since = all; /* every gather is made, so no rank of the group is left waiting */
    lp_status st = shard_gather(tr, tr->s->mem, *h);
    lp_status e = shard_gather(tr, tr->adam_m, *h ? *h + *nf : NULL);
    if (st == LP_OK) st = e;
    e = shard_gather(tr, tr->adam_v, *h ? *h + 2 * *nf : NULL);
    if (st == LP_OK) st = e;
    e = shard_gather_since(tr, all);
    return st == LP_OK ? e : st;
}

lp_status sae_save_checkpoint(trainer *tr) {
    size_t nf;
    float *h;
    int64_t *since;
    lp_status st = ckpt_state(tr, &h, &since, &nf);
    if (tr->tpr != 0 || st != LP_OK) { /* TP rank 0 writes what the group gathered */
        free(h);
        if (since != tr->since) free(since);
        if (st == LP_OK) tr->ckpt_step = tr->step;
        return st;
    }
    char dir[1200], tmp[1300], path[1400];
    snprintf(dir, sizeof dir, "%s/checkpoints/step-%09lld", tr->t->out, (long long)tr->step);
    lp_tmp_name(tmp, sizeof tmp, dir); /* a killed run's leftovers went at the start, under the lock */
    st = lp_mkdir_p(tmp);
    lp_st_spec specs[4] = {
        {.name = "params", .dtype = LP_F32, .ndim = 1, .shape = {(int64_t)nf}},
        {.name = "adam_m", .dtype = LP_F32, .ndim = 1, .shape = {(int64_t)nf}},
        {.name = "adam_v", .dtype = LP_F32, .ndim = 1, .shape = {(int64_t)nf}},
        {.name = "since_fired", .dtype = LP_I64, .ndim = 1, .shape = {tr->full.d_sae}},
    };
    const void *datas[4] = {h, h + nf, h + 2 * nf, since};
    snprintf(path, sizeof path, "%s/state.safetensors", tmp);
    if (st == LP_OK) st = lp_st_write(path, specs, datas, 4, NULL);
    free(h);
    if (since != tr->since) free(since);
    char sig[4096];
    signature(tr, sig, sizeof sig);
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "step", (double)tr->step);
    cJSON_AddNumberToObject(j, "tokens", (double)tr->tokens_done);
    char hex[64];
    snprintf(hex, sizeof hex, "%a", tr->scale); /* exact: a resumed run must continue bit for bit */
    cJSON_AddStringToObject(j, "scale", hex);
    snprintf(hex, sizeof hex, "%a", tr->thr_ema);
    cJSON_AddStringToObject(j, "batchtopk_threshold", hex);
    /* the log window's running sums: a checkpoint between two metrics lines resumes them,
     * so the next line equals an uninterrupted run's */
    cJSON *acc = cJSON_AddArrayToObject(j, "log_window");
    const double accs[7] = {tr->acc_mse, tr->acc_sse, tr->acc_sst, tr->acc_l0, tr->acc_sparsity, tr->acc_aux, tr->acc_n};
    for (int i = 0; i < 7; i++) {
        snprintf(hex, sizeof hex, "%a", accs[i]);
        cJSON_AddItemToArray(acc, cJSON_CreateString(hex));
    }
    cJSON_AddStringToObject(j, "store_fingerprint", tr->store_id);
    cJSON_AddStringToObject(j, "signature", sig);
    char *txt = cJSON_Print(j);
    cJSON_Delete(j);
    snprintf(path, sizeof path, "%s/state.json", tmp);
    if (st == LP_OK) st = lp_write_file_atomic(path, txt, strlen(txt));
    free(txt);
    if (st == LP_OK && rename(tmp, dir) != 0)
        st = LP_ERR(lp_write_status(errno), "%s: cannot rename the checkpoint into place: %s", dir, strerror(errno));
    if (st != LP_OK) {
        lp_remove_tree(tmp);
        return st;
    }
    tr->ckpt_step = tr->step;
    return prune_checkpoints(tr->t->out, 2);
}

/* The parameters, Adam moments and dead-latent counters of state.safetensors (the whole
 * SAE's) onto the device; a latent shard takes its slice of each. */
static lp_status load_state(trainer *tr, const char *path) {
    lp_st_file f;
    LP_CHECK(lp_st_open(&f, path));
    lp_sae whole = {.cfg = tr->full};
    size_t nf = sae_carve(&whole, NULL), nfl = tr->s->n_floats; /* the file's, this rank's (a shard's under dist.tp) */
    const lp_st_tensor *p = lp_st_find(&f, "params"), *m = lp_st_find(&f, "adam_m"), *v = lp_st_find(&f, "adam_v"),
                       *sf = lp_st_find(&f, "since_fired");
    lp_status st = LP_OK;
    const lp_st_tensor *fl[3] = {p, m, v};
    for (int i = 0; i < 3 && st == LP_OK; i++) /* every tensor whole and of the right type before any copy */
        if (!fl[i] || fl[i]->dtype != LP_F32 || fl[i]->ndim != 1 || fl[i]->shape[0] != (int64_t)nf)
            st = LP_ERR(LP_ERR_FORMAT, "%s: not a checkpoint of this SAE", path);
    if (st == LP_OK && (!sf || sf->dtype != LP_I64 || sf->ndim != 1 || sf->shape[0] != tr->full.d_sae))
        st = LP_ERR(LP_ERR_FORMAT, "%s: not a checkpoint of this SAE", path);
    float *loc = tr->tp > 1 ? malloc(nfl * 4) : NULL; /* a shard: its slice of each */
    if (st == LP_OK && tr->tp > 1 && !loc) st = LP_ERR(LP_ERR_OOM, "out of memory reading %s", path);
    void *dst[3] = {tr->s->mem, tr->adam_m, tr->adam_v};
    for (int i = 0; i < 3 && st == LP_OK; i++) {
        const float *src = fl[i]->data;
        if (loc) shard_map(&tr->full, tr->tp, tr->tpr, loc, (float *)(uintptr_t)src, 0), src = loc; /* only read */
        st = lp_ctx_to_device(tr->c, dst[i], src, nfl * 4);
    }
    free(loc);
    if (st == LP_OK) memcpy(tr->since, (const int64_t *)sf->data + tr->s0, (size_t)tr->S * 8);
    lp_st_close(&f);
    return st;
}

/* The newest complete checkpoint whose signature matches; *found = 0 when none. */
lp_status sae_load_checkpoint(trainer *tr, int *found) {
    *found = 0;
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/checkpoints", tr->t->out);
    DIR *d = opendir(dir);
    if (!d) return LP_OK;
    char best[256] = "";
    struct dirent *e;
    while ((e = readdir(d)))
        if (strncmp(e->d_name, "step-", 5) == 0 && strlen(e->d_name) == 14 && strcmp(e->d_name, best) > 0)
            snprintf(best, sizeof best, "%s", e->d_name);
    closedir(d);
    if (!best[0]) return LP_OK;
    char path[1600];
    snprintf(path, sizeof path, "%s/%s/state.json", dir, best);
    int absent;
    cJSON *j = json_load(path, &absent);
    if (absent) LP_FAIL(LP_ERR_IO, "%s: cannot read", path);
    char sig[4096];
    signature(tr, sig, sizeof sig);
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(j, "signature"), *jf = cJSON_GetObjectItemCaseSensitive(j, "store_fingerprint");
    if (cJSON_IsString(jf) && strcmp(jf->valuestring, tr->store_id) != 0) { /* the settings may match, the data does not */
        cJSON_Delete(j);
        LP_FAIL(LP_ERR_ARG, "data.store: %s changed since the checkpoint %s was written (its meta.json: shards or their source differ); "
                            "use another train.out or remove it", tr->t->store, path);
    }
    if (!cJSON_IsString(js) || strcmp(js->valuestring, sig) != 0) {
        cJSON_Delete(j);
        LP_FAIL(LP_ERR_ARG, "%s: a checkpoint of a run with other settings is in %s; use another train.out or remove it", path, tr->t->out);
    }
    const cJSON *js_step = cJSON_GetObjectItemCaseSensitive(j, "step"), *js_tok = cJSON_GetObjectItemCaseSensitive(j, "tokens");
    const cJSON *js_scale = cJSON_GetObjectItemCaseSensitive(j, "scale"), *js_thr = cJSON_GetObjectItemCaseSensitive(j, "batchtopk_threshold");
    if (!cJSON_IsNumber(js_step) || !cJSON_IsNumber(js_tok) || !cJSON_IsString(js_scale) || !cJSON_IsString(js_thr)) {
        cJSON_Delete(j);
        LP_FAIL(LP_ERR_FORMAT, "%s: step, tokens, scale or batchtopk_threshold is missing", path);
    }
    /* counts are whole and in range before the cast (a double outside int64 is undefined
     * behaviour to convert); the two hex floats are finite and nothing else */
    const cJSON *cnt[2] = {js_step, js_tok};
    for (int i = 0; i < 2; i++)
        if (!(cnt[i]->valuedouble >= 0 && cnt[i]->valuedouble <= 0x1p53) || cnt[i]->valuedouble != floor(cnt[i]->valuedouble)) {
            lp_status bad = LP_ERR(LP_ERR_FORMAT, "%s: '%s' is not a whole number in [0, 2^53]", path,
                                         cnt[i]->string);
            cJSON_Delete(j);
            return bad;
        }
    const cJSON *hex[2] = {js_scale, js_thr};
    double val[2];
    for (int i = 0; i < 2; i++) {
        char *end;
        val[i] = strtod(hex[i]->valuestring, &end);
        if (end == hex[i]->valuestring || *end || !isfinite(val[i])) {
            lp_status bad = LP_ERR(LP_ERR_FORMAT, "%s: '%s' is not a finite number", path, hex[i]->string);
            cJSON_Delete(j);
            return bad;
        }
    }
    tr->step = (int64_t)js_step->valuedouble, tr->tokens_done = (int64_t)js_tok->valuedouble;
    tr->scale = val[0], tr->thr_ema = val[1];
    const cJSON *acc = cJSON_GetObjectItemCaseSensitive(j, "log_window");
    double *accs[7] = {&tr->acc_mse, &tr->acc_sse, &tr->acc_sst, &tr->acc_l0, &tr->acc_sparsity, &tr->acc_aux, &tr->acc_n};
    if (cJSON_GetArraySize(acc) != 7) {
        cJSON_Delete(j);
        LP_FAIL(LP_ERR_FORMAT, "%s: log_window is missing (a checkpoint of an older loupe); use another train.out or remove it", path);
    }
    int i = 0;
    for (const cJSON *e = acc->child; e; e = e->next, i++) {
        char *end = NULL;
        *accs[i] = cJSON_IsString(e) ? strtod(e->valuestring, &end) : NAN;
        if (!end || end == e->valuestring || *end || !isfinite(*accs[i])) {
            cJSON_Delete(j);
            LP_FAIL(LP_ERR_FORMAT, "%s: log_window[%d] is not a finite number", path, i);
        }
    }
    cJSON_Delete(j);
    snprintf(path, sizeof path, "%s/%s/state.safetensors", dir, best);
    LP_CHECK(load_state(tr, path));
    *found = 1, tr->ckpt_step = tr->step;
    return LP_OK;
}

/* Keeps the metrics lines of steps the checkpoint covers (a killed run may have logged more). */
lp_status sae_trim_metrics(const char *path, int64_t upto_step) {
    size_t n;
    char *txt = lp_read_file(path, &n);
    if (!txt) return LP_OK; /* no metrics yet */
    char *out = malloc(n + 2); /* every line is written back with a newline, the last may not have had one */
    if (!out) {
        free(txt);
        LP_FAIL(LP_ERR_OOM, "out of memory");
    }
    size_t o = 0;
    for (char *line = strtok(txt, "\n"); line; line = strtok(NULL, "\n")) {
        cJSON *j = cJSON_Parse(line);
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(j, "step");
        if (cJSON_IsNumber(s) && s->valuedouble <= upto_step) o += (size_t)sprintf(out + o, "%s\n", line);
        cJSON_Delete(j);
    }
    lp_status st = lp_write_file_atomic(path, out, o); /* never a half-trimmed file */
    free(out), free(txt);
    return st;
}

/* The report of a run that was already finished: the figures of its last metrics line. */
void sae_last_metrics(const char *path, lp_sae_train_report *rep) {
    size_t n;
    char *txt = lp_read_file(path, &n);
    if (!txt) return;
    char *last = NULL;
    for (char *line = strtok(txt, "\n"); line; line = strtok(NULL, "\n")) last = line;
    cJSON *j = last ? cJSON_Parse(last) : NULL;
    const cJSON *mse = cJSON_GetObjectItemCaseSensitive(j, "losses/mse_loss"), *ev = cJSON_GetObjectItemCaseSensitive(j, "metrics/explained_variance");
    const cJSON *l0 = cJSON_GetObjectItemCaseSensitive(j, "metrics/l0"), *dead = cJSON_GetObjectItemCaseSensitive(j, "sparsity/dead_features");
    if (cJSON_IsNumber(mse)) rep->mse = mse->valuedouble;
    if (cJSON_IsNumber(ev)) rep->explained_variance = ev->valuedouble;
    if (cJSON_IsNumber(l0)) rep->l0 = l0->valuedouble;
    if (cJSON_IsNumber(dead)) rep->dead = dead->valueint;
    cJSON_Delete(j);
    free(txt);
}
