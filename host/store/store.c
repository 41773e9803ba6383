/* host/store/: the activation store, above model/: runs the model with captures and writes
 * shards a reader can use directly; reads them back (means, windows).
 *
 * store.c: writing the activation store (shards + meta.json) with resume, and
 * reading hook means back from it. See store.h for the layout. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "loupe/hooks.h"
#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "loupe/store.h"
#include "io/json.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Expands the comma-separated hook list into hook ids, in model order, without repeats. */
static lp_status expand_hooks(lp_model *m, const char *spec, int *ids, int *n) {
    char *s = strdup(spec), *save = NULL;
    if (!s) LP_FAIL(LP_ERR_OOM, "cache.hooks: out of memory");
    lp_status st = LP_OK;
    lp_hooks_clear(m);
    for (char *tok = strtok_r(s, ",", &save); tok && st == LP_OK; tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ') tok++;
        char *end = tok + strlen(tok);
        while (end > tok && end[-1] == ' ') *--end = 0;
        if (*tok) st = lp_hook_capture(m, tok, NULL, 0, NULL);
    }
    free(s);
    if (st != LP_OK) return st;
    *n = 0;
    for (int id = 0; id < lp_hook_count(m); id++)
        if (lp_hook_is_captured(m, id)) ids[(*n)++] = id;
    if (*n == 0) LP_FAIL(LP_ERR_ARG, "cache.hooks: no hooks given");
    return LP_OK;
}

/* What the store is made from, beyond the paths: the token file's size and hash (a file
 * replaced under the same name must not be resumed into the old store). */
typedef struct source_id {
    char tokens[64];
} source_id;

static lp_status source_fingerprint(const lp_cache_opts *o, source_id *src) {
    snprintf(src->tokens, sizeof src->tokens, "none");
    if (!o->tokens_path || !o->tokens_path[0]) return LP_OK;
    int64_t size;
    uint64_t hash;
    LP_CHECK(lp_fingerprint(o->tokens_path, &size, &hash));
    snprintf(src->tokens, sizeof src->tokens, "%lld bytes, hash %016llx", (long long)size, (unsigned long long)hash);
    return LP_OK;
}

static char *meta_json(const lp_model *m, const lp_cache_opts *o, const source_id *src, const lp_tokens *toks, const int *ids, int nh,
                       int n_shards, int64_t done, int complete) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddStringToObject(r, "format", "loupe activation store");
    cJSON_AddNumberToObject(r, "version", 1);
    cJSON_AddStringToObject(r, "model", o->model_path ? o->model_path : "");
    cJSON_AddStringToObject(r, "architecture", lp_model_config(m)->name);
    cJSON_AddStringToObject(r, "tokens", o->tokens_path ? o->tokens_path : "");
    cJSON_AddStringToObject(r, "tokens_fingerprint", src->tokens);
    cJSON_AddNumberToObject(r, "context", toks->ctx);
    cJSON_AddStringToObject(r, "dtype", lp_dtype_name(o->dtype));
    cJSON_AddNumberToObject(r, "shard_sequences", o->shard_sequences);
    cJSON *hooks = cJSON_AddArrayToObject(r, "hooks");
    for (int i = 0; i < nh; i++) {
        cJSON *h = cJSON_CreateObject();
        cJSON_AddStringToObject(h, "name", lp_hook_name(m, ids[i]));
        int64_t s[LP_MAX_DIMS];
        int nd = lp_hook_shape(m, ids[i], 1, toks->ctx, s);
        cJSON *sh = cJSON_AddArrayToObject(h, "shape"); /* per sequence: the batch axis dropped */
        for (int d = 1; d < nd; d++) cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)s[d]));
        cJSON_AddItemToArray(hooks, h);
    }
    cJSON_AddNumberToObject(r, "n_sequences", (double)done);
    cJSON_AddNumberToObject(r, "n_tokens", (double)done * toks->ctx);
    cJSON_AddNumberToObject(r, "n_sequences_planned", (double)toks->n_seq);
    cJSON_AddBoolToObject(r, "complete", complete);
    cJSON *shards = cJSON_AddArrayToObject(r, "shards");
    for (int s = 0; s < n_shards; s++) {
        cJSON *e = cJSON_CreateObject();
        char nm[64];
        snprintf(nm, sizeof nm, "shard-%05d.safetensors", s);
        int64_t first = (int64_t)s * o->shard_sequences, cnt = toks->n_seq - first < o->shard_sequences ? toks->n_seq - first : o->shard_sequences;
        cJSON_AddStringToObject(e, "file", nm);
        cJSON_AddNumberToObject(e, "first_sequence", (double)first);
        cJSON_AddNumberToObject(e, "n_sequences", (double)cnt);
        cJSON_AddItemToArray(shards, e);
    }
    char *txt = cJSON_Print(r);
    cJSON_Delete(r);
    return txt;
}

/* Fields that must agree for a re-run to resume an existing store. */
static const char *const g_same[] = {"model", "tokens", "tokens_fingerprint", "context", "dtype", "shard_sequences", "hooks", "n_sequences_planned", NULL};

/* Returns the number of complete shards to keep, or an error if the settings differ. */
static lp_status check_resume(const char *dir, const char *fresh, int *keep) {
    char path[4200];
    snprintf(path, sizeof path, "%s/meta.json", dir);
    *keep = 0;
    int absent;
    cJSON *old = json_load(path, &absent);
    if (absent) return LP_OK; /* a new store */
    cJSON *now = cJSON_Parse(fresh);
    lp_status st = LP_OK;
    if (!cJSON_IsObject(old)) {
        st = LP_ERR(LP_ERR_FORMAT, "%s: not a loupe store's meta.json; choose another cache.out", path);
        goto done;
    }
    for (int i = 0; g_same[i]; i++) {
        char *a = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(old, g_same[i]));
        char *b = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(now, g_same[i]));
        int same = a && b && strcmp(a, b) == 0;
        free(a);
        free(b);
        if (!same) {
            st = LP_ERR(LP_ERR_ARG, "%s: the store there was written with a different '%s'; use another cache.out or remove it", dir, g_same[i]);
            goto done;
        }
    }
    /* keep the listed shards that are present, up to the first missing one */
    const cJSON *shards = cJSON_GetObjectItemCaseSensitive(old, "shards");
    for (const cJSON *e = shards ? shards->child : NULL; e; e = e->next) {
        const cJSON *file = cJSON_GetObjectItemCaseSensitive(e, "file");
        snprintf(path, sizeof path, "%s/%s", dir, cJSON_IsString(file) ? file->valuestring : "");
        if (access(path, R_OK) != 0) break;
        (*keep)++;
    }
done:
    cJSON_Delete(old);
    cJSON_Delete(now);
    return st;
}

static void progress(const lp_cache_opts *o, int64_t done, int64_t total, int64_t toks_done, double t0, int shard_done, int final) {
    if (!o->on_progress) return;
    lp_cache_progress p = {done, total, toks_done, now_s() - t0, shard_done, final};
    o->on_progress(&p, o->progress_user);
}

/* Writes meta (meta_json's text, then freed) to path; NULL is meta_json out of memory. */
static lp_status write_meta(const char *path, char *meta) {
    lp_status st = meta ? lp_write_file_atomic(path, meta, strlen(meta)) : LP_ERR(LP_ERR_OOM, "%s: out of memory", path);
    free(meta);
    return st;
}

/* What lp_cache_run carries from one shard to the next. */
typedef struct {
    lp_model *m;
    const lp_tokens *toks;
    const lp_cache_opts *o;
    const int *ids; /* the captured hooks */
    int nh, B;
    lp_st_spec *specs; /* [nh + 1]: the tokens, then each hook */
    void *conv;        /* scratch for the conversion to o->dtype */
    size_t conv_cap;
    double t0;
    int64_t toks_done;
} cache_run;

/* One batch's captures, converted to the store's dtype, into rows b0.. of shard writer w. */
static lp_status put_captures(cache_run *x, lp_st_writer *w, int b0, int nb) {
    size_t es_store = lp_dtype_size(x->o->dtype);
    for (int i = 0; i < x->nh; i++) {
        lp_tensor t;
        LP_CHECK(lp_capture_get(x->m, lp_hook_name(x->m, x->ids[i]), &t));
        size_t n = (size_t)lp_shape_numel(t.shape, t.ndim), bytes = n * es_store;
        const void *src = t.data;
        if (t.dtype != x->o->dtype) {
            if (bytes > x->conv_cap) {
                free(x->conv);
                x->conv = malloc(bytes);
                x->conv_cap = x->conv ? bytes : 0;
                if (!x->conv) LP_FAIL(LP_ERR_OOM, "cache: out of memory for %zu bytes", bytes);
            }
            LP_CHECK(lp_convert_host(x->conv, x->o->dtype, t.data, t.dtype, n));
            src = x->conv;
        }
        LP_CHECK(lp_st_writer_put(w, i + 1, (size_t)b0 * (bytes / nb), src, bytes));
    }
    return LP_OK;
}

/* Shard s, sequences [first, first + ns): their tokens and every hook's activations,
 * committed whole (a shard that fails part way is removed). */
static lp_status write_shard(cache_run *x, int s, int64_t first, int ns) {
    const lp_tokens *toks = x->toks;
    int T = toks->ctx, B = x->B;
    x->specs[0] = (lp_st_spec){.name = "tokens", .dtype = LP_I32, .ndim = 2, .shape = {ns, T}};
    for (int i = 0; i < x->nh; i++) {
        x->specs[i + 1] = (lp_st_spec){.name = lp_hook_name(x->m, x->ids[i]), .dtype = x->o->dtype};
        x->specs[i + 1].ndim = lp_hook_shape(x->m, x->ids[i], ns, T, x->specs[i + 1].shape);
    }
    char path[4200];
    snprintf(path, sizeof path, "%s/shard-%05d.safetensors", x->o->out, s);
    lp_st_writer w;
    LP_CHECK(lp_st_writer_open(&w, path, x->specs, x->nh + 1, NULL));
    lp_status st = LP_OK;
    for (int b0 = 0; b0 < ns && st == LP_OK; b0 += B) {
        int nb = ns - b0 < B ? ns - b0 : B;
        const int32_t *tk = toks->ids + (size_t)(first + b0) * T;
        st = lp_st_writer_put(&w, 0, (size_t)b0 * T * 4, tk, (size_t)nb * T * 4);
        if (st == LP_OK) st = lp_model_forward(x->m, tk, nb, T, 0);
        if (st == LP_OK) st = put_captures(x, &w, b0, nb);
        x->toks_done += (int64_t)nb * T;
        progress(x->o, first + b0 + nb, toks->n_seq, x->toks_done, x->t0, 0, 0);
    }
    if (st != LP_OK) {
        lp_st_writer_abort(&w);
        return st;
    }
    return lp_st_writer_commit(&w);
}

lp_status lp_cache_run(lp_model *m, const lp_tokens *toks, const lp_cache_opts *o, lp_cache_report *rep) {
    memset(rep, 0, sizeof *rep);
    if (o->dtype != LP_F32 && o->dtype != LP_BF16) LP_FAIL(LP_ERR_ARG, "cache.dtype must be F32 or BF16");
    if (o->batch <= 0 || o->shard_sequences <= 0) LP_FAIL(LP_ERR_ARG, "cache.batch and cache.shard_sequences must be positive");
    if (toks->ctx > lp_model_config(m)->n_ctx)
        LP_FAIL(LP_ERR_ARG, "%s: rows of %d tokens exceed the model's context of %d", o->tokens_path, toks->ctx, lp_model_config(m)->n_ctx);
    int *ids = malloc(lp_hook_count(m) * sizeof(int)), nh = 0;
    if (!ids) LP_FAIL(LP_ERR_OOM, "cache: out of memory");
    lp_status st = expand_hooks(m, o->hooks, ids, &nh);
    if (st != LP_OK) {
        free(ids);
        return st;
    }
    /* one writer per store, for the whole run: a second run started by mistake is refused
     * instead of deleting or renaming this one's files in flight */
    lp_lock lock;
    source_id src;
    st = lp_lock_output(&lock, o->out, 1);
    if (st != LP_OK) {
        free(ids);
        return st;
    }
    int T = toks->ctx, S = o->shard_sequences;
    int n_shards = (int)((toks->n_seq + S - 1) / S), keep = 0;
    st = source_fingerprint(o, &src);
    char *fresh = st == LP_OK ? meta_json(m, o, &src, toks, ids, nh, 0, 0, 0) : NULL;
    if (st == LP_OK && !fresh) st = LP_ERR(LP_ERR_OOM, "cache: out of memory");
    if (st == LP_OK) st = check_resume(o->out, fresh, &keep);
    free(fresh);
    if (st == LP_OK) st = lp_remove_stale_tmp(o->out); /* under the lock: only a dead run's leftovers */
    if (st != LP_OK) {
        lp_lock_release(&lock);
        free(ids);
        return st;
    }
    rep->resumed_sequences = (int64_t)keep * S < toks->n_seq ? (int64_t)keep * S : toks->n_seq;
    cache_run x = {.m = m, .toks = toks, .o = o, .ids = ids, .nh = nh, .B = o->batch < S ? o->batch : S,
                   .specs = calloc(nh + 1, sizeof *x.specs), .t0 = now_s()};
    char meta_path[4200];
    snprintf(meta_path, sizeof meta_path, "%s/meta.json", o->out);
    if (!x.specs) LP_TRY(st, done, LP_ERR(LP_ERR_OOM, "cache: out of memory"));
    LP_TRY(st, done, lp_model_prepare(m, x.B, T));
    for (int s = keep; s < n_shards; s++) {
        int64_t first = (int64_t)s * S;
        int ns = (int)(toks->n_seq - first < S ? toks->n_seq - first : S);
        LP_TRY(st, done, write_shard(&x, s, first, ns));
        LP_TRY(st, done, write_meta(meta_path, meta_json(m, o, &src, toks, ids, nh, s + 1, first + ns, s + 1 == n_shards)));
        progress(o, first + ns, toks->n_seq, x.toks_done, x.t0, 1, 0);
    }
    if (keep >= n_shards) /* nothing to do, but make sure meta says complete */
        st = write_meta(meta_path, meta_json(m, o, &src, toks, ids, nh, n_shards, toks->n_seq, 1));
    progress(o, toks->n_seq, toks->n_seq, x.toks_done, x.t0, 0, 1);
done:
    rep->seconds = now_s() - x.t0;
    rep->tokens_per_s = rep->seconds > 0 ? x.toks_done / rep->seconds : 0;
    rep->n_shards = n_shards;
    rep->n_hooks = nh;
    rep->n_sequences = st == LP_OK ? toks->n_seq : 0;
    rep->n_tokens = rep->n_sequences * T;
    free(x.conv);
    free(x.specs);
    free(ids);
    lp_lock_release(&lock);
    return st;
}

lp_status lp_store_require_complete(const char *dir) {
    char path[4200];
    snprintf(path, sizeof path, "%s/meta.json", dir);
    int absent;
    cJSON *j = json_load(path, &absent);
    if (absent) return LP_OK; /* shards without meta.json: not written by loupe cache, nothing says incomplete */
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(j, "complete");
    int incomplete = cJSON_IsFalse(c);
    const cJSON *done = cJSON_GetObjectItemCaseSensitive(j, "n_sequences"), *plan = cJSON_GetObjectItemCaseSensitive(j, "n_sequences_planned");
    double d = cJSON_IsNumber(done) ? done->valuedouble : 0, p = cJSON_IsNumber(plan) ? plan->valuedouble : 0;
    cJSON_Delete(j);
    if (incomplete)
        LP_FAIL(LP_ERR_ARG, "%s: the store is not complete (%.0f of %.0f sequences; its `loupe cache` run was stopped or is still "
                            "running); finish it, or set data.allow_incomplete=true to use what is there", path, d, p);
    return LP_OK;
}

lp_status lp_store_hook_mean(const char *dir, const char *hook, float **mean, size_t *n_out) {
    *mean = NULL;
    *n_out = 0;
    if (strstr(hook, "hook_pattern") || strstr(hook, "hook_attn_scores"))
        LP_FAIL(LP_ERR_ARG, "%s: mean ablation of attention patterns is not supported", hook);
    lp_store *s;
    LP_CHECK(lp_store_open(&s, dir, hook));
    size_t per = (size_t)lp_store_d(s);
    int64_t rows = lp_store_n_tokens(s), chunk = rows < 4096 ? rows : 4096; /* no buffer larger than the store */
    double *acc = calloc(per, sizeof(double));
    float *buf = malloc((size_t)chunk * per * sizeof(float));
    lp_status st = acc && buf ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory");
    for (int64_t r0 = 0; st == LP_OK && r0 < rows; r0 += chunk) {
        int64_t n = rows - r0 < chunk ? rows - r0 : chunk;
        st = lp_store_read(s, r0, n, buf);
        for (int64_t i = 0; st == LP_OK && i < n; i++)
            for (size_t j = 0; j < per; j++) acc[j] += buf[(size_t)i * per + j];
    }
    if (st == LP_OK && !(*mean = malloc(per * sizeof(float)))) st = LP_ERR(LP_ERR_OOM, "out of memory");
    if (st == LP_OK) {
        for (size_t j = 0; j < per; j++) (*mean)[j] = (float)(acc[j] / rows);
        *n_out = per;
    }
    free(acc), free(buf);
    lp_store_close(s);
    return st;
}

/* ---- reading one hook, token by token ---- */

struct lp_store {
    char dir[1024], model[1024];
    int n_shards, ctx, d;
    lp_st_file *files;
    const lp_st_tensor **t; /* the hook in each shard */
    int64_t *first;         /* first token of each shard; first[n_shards] = total */
};

void lp_store_close(lp_store *s) {
    if (!s) return;
    for (int i = 0; i < s->n_shards; i++) lp_st_close(&s->files[i]);
    free(s->files);
    free(s->t);
    free(s->first);
    free(s);
}

lp_status lp_store_open(lp_store **out, const char *dir, const char *hook) {
    *out = NULL;
    lp_store *s = calloc(1, sizeof *s);
    if (!s) LP_FAIL(LP_ERR_OOM, "out of memory");
    snprintf(s->dir, sizeof s->dir, "%s", dir);
    char path[1200];
    snprintf(path, sizeof path, "%s/meta.json", dir);
    int absent; /* meta.json is optional: it names the model the store came from */
    cJSON *j = json_load(path, &absent);
    const cJSON *mp = cJSON_GetObjectItemCaseSensitive(j, "model");
    if (cJSON_IsString(mp)) snprintf(s->model, sizeof s->model, "%s", mp->valuestring);
    cJSON_Delete(j);
    int cap = 0;
    lp_status st = LP_OK;
    for (int i = 0;; i++) {
        snprintf(path, sizeof path, "%s/shard-%05d.safetensors", dir, i);
        if (access(path, F_OK) != 0) break;
        if (s->n_shards == cap) {
            cap = cap ? 2 * cap : 16;
            lp_st_file *f = realloc(s->files, cap * sizeof *f);
            const lp_st_tensor **t = f ? realloc(s->t, cap * sizeof *t) : NULL;
            int64_t *first = t ? realloc(s->first, (cap + 1) * sizeof *first) : NULL;
            if (f) s->files = f;
            if (t) s->t = t;
            if (first) s->first = first;
            if (!f || !t || !first) { st = LP_ERR(LP_ERR_OOM, "out of memory"); break; }
        }
        if ((st = lp_st_open(&s->files[s->n_shards], path)) != LP_OK) break;
        lp_st_file *f = &s->files[s->n_shards++];
        const lp_st_tensor *t = lp_st_find(f, hook);
        if (!t || t->ndim < 3) {
            st = LP_ERR(LP_ERR_NOT_FOUND, "%s: hook '%s' is not in the store (see its meta.json)", path, hook);
            break;
        }
        if (t->dtype != LP_F32 && t->dtype != LP_BF16) {
            st = LP_ERR(LP_ERR_FORMAT, "%s: '%s' has dtype %s (F32 or BF16 expected)", path, hook, lp_dtype_name(t->dtype));
            break;
        }
        /* the shape is checked against the file's size by lp_st_open; d and ctx must fit int */
        int64_t d64 = lp_shape_numel(t->shape + 2, t->ndim - 2);
        if (d64 <= 0 || d64 > INT32_MAX || t->shape[0] <= 0 || t->shape[1] <= 0 || t->shape[1] > INT32_MAX) {
            char sh[128];
            st = LP_ERR(LP_ERR_SHAPE, "%s: '%s' has shape %s; [sequences, context, d...] with "
                              "sequences >= 1, context and d in 1..2^31-1 expected", path, hook, lp_shape_str(t->shape, t->ndim, sh, sizeof sh));
            break;
        }
        int d = (int)d64, ctx = (int)t->shape[1];
        if (s->n_shards == 1) s->d = d, s->ctx = ctx, s->first[0] = 0;
        if (d != s->d || ctx != s->ctx) {
            st = LP_ERR(LP_ERR_SHAPE, "%s: '%s' changes shape between shards", path, hook);
            break;
        }
        s->t[s->n_shards - 1] = t;
        s->first[s->n_shards] = s->first[s->n_shards - 1] + t->shape[0] * t->shape[1];
    }
    if (st == LP_OK && s->n_shards == 0) st = LP_ERR(LP_ERR_IO, "%s: no shards (is it an activation store?)", dir);
    if (st != LP_OK) {
        lp_store_close(s);
        return st;
    }
    *out = s;
    return LP_OK;
}

int64_t lp_store_n_tokens(const lp_store *s) { return s->first[s->n_shards]; }
int lp_store_d(const lp_store *s) { return s->d; }
int lp_store_context(const lp_store *s) { return s->ctx; }
const char *lp_store_model(const lp_store *s) { return s->model; }

lp_status lp_store_read(const lp_store *s, int64_t t0, int64_t n, float *dst) {
    if (t0 < 0 || n < 0 || t0 + n > lp_store_n_tokens(s))
        LP_FAIL(LP_ERR_ARG, "%s: tokens [%lld, %lld) are outside the store's %lld", s->dir, (long long)t0, (long long)(t0 + n),
                (long long)lp_store_n_tokens(s));
    int i = 0;
    while (n > 0) {
        while (s->first[i + 1] <= t0) i++;
        const lp_st_tensor *t = s->t[i];
        int64_t off = t0 - s->first[i], take = s->first[i + 1] - t0 < n ? s->first[i + 1] - t0 : n;
        size_t es = lp_dtype_size(t->dtype);
        LP_CHECK(lp_convert_host(dst, LP_F32, (const char *)t->data + (size_t)off * s->d * es, t->dtype, (size_t)take * s->d));
        dst += (size_t)take * s->d, t0 += take, n -= take;
    }
    return LP_OK;
}
