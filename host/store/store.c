/* store.c: writing the activation store (shards + meta.json) with resume, and
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

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Expands the comma-separated hook list into hook ids, in model order, without repeats. */
static lp_status expand_hooks(lp_model *m, const char *spec, int *ids, int *n) {
    char *s = strdup(spec), *save = NULL;
    if (!s) LP_FAIL(LP_ERR_OOM, "out of memory");
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
    char *buf = lp_read_file(path, NULL);
    if (!buf) return LP_OK; /* a new store */
    cJSON *old = cJSON_Parse(buf), *now = cJSON_Parse(fresh);
    free(buf);
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

/* One batch's captures in the store's dtype, packed after an 8-byte status header:
 * [int32 status, pad][hook 0: B rows][hook 1: B rows]... — the unit the DP ranks gather. */
typedef struct cache_pack {
    size_t slot, *off, *per_seq; /* bytes of a slot; each hook's offset and bytes per sequence */
    char *mine, *all;            /* this rank's slot; every DP rank's slots (dp * slot) */
} cache_pack;

static lp_status pack_init(cache_pack *p, lp_model *m, const int *ids, int nh, int B, int T, size_t es, int dp) {
    p->off = calloc(nh, sizeof(size_t)), p->per_seq = calloc(nh, sizeof(size_t));
    if (!p->off || !p->per_seq) LP_FAIL(LP_ERR_OOM, "out of memory");
    p->slot = 8; /* a word for the rank's status, then the hooks */
    for (int i = 0; i < nh; i++) {
        int64_t s[LP_MAX_DIMS];
        int nd = lp_hook_shape(m, ids[i], 1, T, s);
        p->per_seq[i] = (size_t)lp_shape_numel(s, nd) * es;
        p->off[i] = p->slot;
        p->slot += ((p->per_seq[i] * B + 7) & ~(size_t)7);
    }
    p->mine = calloc(1, p->slot), p->all = calloc(dp, p->slot);
    if (!p->mine || !p->all) LP_FAIL(LP_ERR_OOM, "out of memory");
    return LP_OK;
}

static void pack_free(cache_pack *p) {
    free(p->off), free(p->per_seq), free(p->mine), free(p->all);
}

/* Runs the forward of nb rows and packs every captured hook into p->mine. */
static lp_status forward_pack(lp_model *m, const int32_t *tk, int nb, int T, const int *ids, int nh, lp_dtype dt, cache_pack *p) {
    LP_CHECK(lp_model_forward(m, tk, nb, T, 0));
    for (int i = 0; i < nh; i++) {
        lp_tensor t;
        LP_CHECK(lp_capture_get(m, lp_hook_name(m, ids[i]), &t));
        size_t n = (size_t)lp_shape_numel(t.shape, t.ndim);
        if (n * lp_dtype_size(dt) != p->per_seq[i] * nb) LP_FAIL(LP_ERR_SHAPE, "%s: captured size differs from its shape", lp_hook_name(m, ids[i]));
        if (t.dtype != dt) LP_CHECK(lp_convert_host(p->mine + p->off[i], dt, t.data, t.dtype, n));
        else memcpy(p->mine + p->off[i], t.data, n * lp_dtype_size(dt));
    }
    return LP_OK;
}

/* Every rank's word on the round: fst its own forward's status, wst the writer's last write.
 * With TP the forward is a collective of the TP group, so no rank may skip it while another
 * runs it: each runs its batch whatever failed before, and then all agree (over the world)
 * whether any rank failed, so every rank stops at the same round. */
static lp_status round_agree(const lp_cache_opts *o, lp_status fst, lp_status wst) {
    int failed = fst != LP_OK || wst != LP_OK;
    int32_t bad = failed ? lp_dist_rank(o->dist) + 1 : 0; /* the highest failed rank, + 1 */
    if (lp_dist_size(o->dist) > 1) {
        lp_status a = lp_dist_allreduce_max(o->dist, LP_DIST_WORLD, &bad, 1, LP_I32);
        if (a != LP_OK && !failed) return a;
    }
    if (failed) return fst != LP_OK ? fst : wst;
    if (bad) LP_FAIL(LP_ERR_IO, "cache: rank %d failed (its error is printed by that rank)", bad - 1);
    return LP_OK;
}

/* The batches of one shard, dp at a time: batch k is computed by DP rank k % dp (with its
 * whole TP group, each TP rank holding the gathered captures); after each round every rank
 * holds every slot of its DP group, and the writer (world rank 0) puts them into the shard
 * in batch order. st: the writer's status so far (its shard's open). */
static lp_status cache_shard(lp_model *m, const lp_tokens *toks, const lp_cache_opts *o, const int *ids, int nh, cache_pack *p,
                             lp_st_writer *w, lp_status st, int64_t first, int ns, int B, int64_t *toks_done, double t0) {
    int T = toks->ctx, dp = lp_dist_dp_size(o->dist), me = lp_dist_dp_rank(o->dist), writer = lp_dist_rank(o->dist) == 0;
    int nbatch = (ns + B - 1) / B;
    for (int r0 = 0; r0 < nbatch; r0 += dp) {
        int k = r0 + me;
        lp_status fst = LP_OK;
        if (k < nbatch) {
            int nb = ns - k * B < B ? ns - k * B : B;
            fst = forward_pack(m, toks->ids + (size_t)(first + (int64_t)k * B) * T, nb, T, ids, nh, o->dtype, p);
        }
        *(int32_t *)p->mine = fst != LP_OK; /* the gather is a collective: a failed rank takes part too */
        if (dp > 1) LP_CHECK(lp_dist_allgather(o->dist, LP_DIST_DP, p->mine, p->all, p->slot));
        LP_CHECK(round_agree(o, fst, st));
        const char *all = dp > 1 ? p->all : p->mine;
        for (int j = 0; j < dp && r0 + j < nbatch && writer && st == LP_OK; j++) {
            int b0 = (r0 + j) * B, nb = ns - b0 < B ? ns - b0 : B;
            const char *slot = all + (size_t)j * p->slot;
            st = lp_st_writer_put(w, 0, (size_t)b0 * T * 4, toks->ids + (size_t)(first + b0) * T, (size_t)nb * T * 4);
            for (int i = 0; i < nh && st == LP_OK; i++) st = lp_st_writer_put(w, i + 1, (size_t)b0 * p->per_seq[i], slot + p->off[i], nb * p->per_seq[i]);
        }
        for (int j = 0; j < dp && r0 + j < nbatch; j++) {
            int b0 = (r0 + j) * B, nb = ns - b0 < B ? ns - b0 : B;
            *toks_done += (int64_t)nb * T;
            if (writer) progress(o, first + b0 + nb, toks->n_seq, *toks_done, t0, 0, 0);
        }
    }
    return st; /* a failed write of the last round: the end-of-shard broadcast tells the others */
}

/* The writer (world rank 0) alone: the lock, the resume check and the stale files; *keep the
 * complete shards. */
static lp_status cache_begin(const lp_model *m, const lp_tokens *toks, const lp_cache_opts *o, const int *ids, int nh, lp_lock *lock,
                             source_id *src, int *keep) {
    /* one writer per store, for the whole run: a second run started by mistake is refused
     * instead of deleting or renaming this one's files in flight */
    LP_CHECK(lp_lock_output(lock, o->out, 1));
    lp_status st = source_fingerprint(o, src);
    char *fresh = st == LP_OK ? meta_json(m, o, src, toks, ids, nh, 0, 0, 0) : NULL;
    if (st == LP_OK) st = check_resume(o->out, fresh, keep);
    free(fresh);
    if (st == LP_OK) st = lp_remove_stale_tmp(o->out); /* under the lock: only a dead run's leftovers */
    if (st != LP_OK) lp_lock_release(lock);
    return st;
}

static lp_status write_meta(const lp_model *m, const lp_cache_opts *o, const source_id *src, const lp_tokens *toks, const int *ids, int nh,
                            int n_shards, int64_t done, int complete) {
    char path[4200];
    snprintf(path, sizeof path, "%s/meta.json", o->out);
    char *meta = meta_json(m, o, src, toks, ids, nh, n_shards, done, complete);
    lp_status st = meta ? lp_write_file_atomic(path, meta, strlen(meta)) : LP_ERR(LP_ERR_OOM, "out of memory");
    free(meta);
    return st;
}

lp_status lp_cache_run(lp_model *m, const lp_tokens *toks, const lp_cache_opts *o, lp_cache_report *rep) {
    memset(rep, 0, sizeof *rep);
    if (o->dtype != LP_F32 && o->dtype != LP_BF16) LP_FAIL(LP_ERR_ARG, "cache.dtype must be F32 or BF16");
    if (o->batch <= 0 || o->shard_sequences <= 0) LP_FAIL(LP_ERR_ARG, "cache.batch and cache.shard_sequences must be positive");
    if (toks->ctx > lp_model_config(m)->n_ctx)
        LP_FAIL(LP_ERR_ARG, "%s: rows of %d tokens exceed the model's context of %d", o->tokens_path, toks->ctx, lp_model_config(m)->n_ctx);
    /* the writer is world rank 0; its news goes to every rank (its TP peers too) */
    int dp = lp_dist_dp_size(o->dist), me = lp_dist_rank(o->dist), many = lp_dist_size(o->dist) > 1;
    int *ids = malloc(lp_hook_count(m) * sizeof(int)), nh = 0;
    if (!ids) LP_FAIL(LP_ERR_OOM, "out of memory");
    lp_status st = expand_hooks(m, o->hooks, ids, &nh);
    if (st != LP_OK) {
        free(ids);
        return st;
    }
    lp_lock lock;
    source_id src;
    int T = toks->ctx, S = o->shard_sequences;
    int n_shards = (int)((toks->n_seq + S - 1) / S), keep = 0;
    if (me == 0) st = cache_begin(m, toks, o, ids, nh, &lock, &src, &keep);
    int locked = me == 0 && st == LP_OK;
    int32_t hdr = st == LP_OK ? keep : -1; /* the other ranks learn where to start, or that rank 0 failed */
    if (many) {
        lp_status b = lp_dist_broadcast(o->dist, LP_DIST_WORLD, &hdr, sizeof hdr, 0);
        if (st == LP_OK) st = b;
        if (st == LP_OK && hdr < 0) st = LP_ERR(LP_ERR_IO, "cache: rank 0 could not open %s (its error is printed by that rank)", o->out);
        keep = hdr;
    }
    if (st != LP_OK) {
        free(ids);
        return st;
    }
    rep->resumed_sequences = (int64_t)keep * S < toks->n_seq ? (int64_t)keep * S : toks->n_seq;
    int B = o->batch < S ? o->batch : S;
    lp_st_spec *specs = calloc(nh + 1, sizeof *specs);
    cache_pack pk = {0};
    double t0 = now_s();
    int64_t toks_done = 0;
    LP_TRY(st, done, specs ? LP_OK : LP_ERR(LP_ERR_OOM, "out of memory"));
    LP_TRY(st, done, pack_init(&pk, m, ids, nh, B, T, lp_dtype_size(o->dtype), dp));
    LP_TRY(st, done, lp_model_prepare(m, B, T));
    for (int s = keep; s < n_shards; s++) {
        int64_t first = (int64_t)s * S;
        int ns = (int)(toks->n_seq - first < S ? toks->n_seq - first : S);
        lp_st_writer w;
        int opened = 0;
        if (me == 0) {
            specs[0] = (lp_st_spec){.name = "tokens", .dtype = LP_I32, .ndim = 2, .shape = {ns, T}};
            for (int i = 0; i < nh; i++) {
                specs[i + 1] = (lp_st_spec){.name = lp_hook_name(m, ids[i]), .dtype = o->dtype};
                specs[i + 1].ndim = lp_hook_shape(m, ids[i], ns, T, specs[i + 1].shape);
            }
            char path[4200];
            snprintf(path, sizeof path, "%s/shard-%05d.safetensors", o->out, s);
            /* a failure here is rank 0's status in the first round, so no rank waits on it */
            st = lp_st_writer_open(&w, path, specs, nh + 1, NULL);
            opened = st == LP_OK;
        }
        st = cache_shard(m, toks, o, ids, nh, &pk, &w, st, first, ns, B, &toks_done, t0);
        if (opened && st != LP_OK) lp_st_writer_abort(&w);
        else if (opened) st = lp_st_writer_commit(&w);
        if (me == 0 && st == LP_OK) st = write_meta(m, o, &src, toks, ids, nh, s + 1, first + ns, s + 1 == n_shards);
        if (many) { /* rank 0's writes of this shard: the others stop with it */
            int32_t ok = st == LP_OK;
            lp_status b = lp_dist_broadcast(o->dist, LP_DIST_WORLD, &ok, sizeof ok, 0);
            if (st == LP_OK && b != LP_OK) st = b;
            if (st == LP_OK && !ok) st = LP_ERR(LP_ERR_IO, "cache: rank 0 could not write %s (its error is printed by that rank)", o->out);
        }
        if (st != LP_OK) goto done;
        if (me == 0) progress(o, first + ns, toks->n_seq, toks_done, t0, 1, 0);
    }
    /* nothing to do, but make sure meta says complete */
    if (keep >= n_shards && me == 0) LP_TRY(st, done, write_meta(m, o, &src, toks, ids, nh, n_shards, toks->n_seq, 1));
    if (me == 0) progress(o, toks->n_seq, toks->n_seq, toks_done, t0, 0, 1);
done:
    rep->seconds = now_s() - t0;
    rep->tokens_per_s = rep->seconds > 0 ? toks_done / rep->seconds : 0;
    rep->n_shards = n_shards;
    rep->n_hooks = nh;
    rep->n_sequences = st == LP_OK ? toks->n_seq : 0;
    rep->n_tokens = rep->n_sequences * T;
    pack_free(&pk);
    free(specs);
    free(ids);
    if (locked) lp_lock_release(&lock);
    return st;
}

lp_status lp_store_require_complete(const char *dir) {
    char path[4200];
    snprintf(path, sizeof path, "%s/meta.json", dir);
    size_t n;
    char *txt = lp_read_file(path, &n);
    if (!txt) return LP_OK; /* shards without meta.json: not written by loupe cache, nothing says incomplete */
    cJSON *j = cJSON_ParseWithLength(txt, n);
    free(txt);
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
    size_t n;
    char *meta = lp_read_file(path, &n);
    if (meta) { /* optional: the model the store came from */
        cJSON *j = cJSON_ParseWithLength(meta, n);
        const cJSON *mp = cJSON_GetObjectItemCaseSensitive(j, "model");
        if (cJSON_IsString(mp)) snprintf(s->model, sizeof s->model, "%s", mp->valuestring);
        cJSON_Delete(j);
        free(meta);
    }
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
