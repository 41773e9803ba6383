/* sweep_out.c: the output directory of `loupe attribute` and `loupe patch`, kept whole
 * across kills, full disks and restarts.
 *
 *   job.json        the settings that shape the results; a restart with other ones is refused
 *   results.jsonl   one line per pair, appended a batch at a time in one write, then fsync'ed
 *   scores-*.safetensors  written under a unique temporary name and renamed BEFORE the
 *                   batch's results lines are appended
 *
 * So after any kill a pair is in results.jsonl only if its scores are on disk. On a restart
 * a torn last line is cut away, a scores file whose pairs never reached results.jsonl is
 * removed (they will be recomputed), and the pairs in results.jsonl are skipped: none is
 * written twice. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/output.h"
#include "loupe/safetensors.h"
#include "cli.h"

/* ---- job.json ---- */

static void add_fingerprint(cJSON *j, const char *key, const char *path, int content) {
    int64_t size = 0;
    uint64_t hash = 0;
    char buf[96];
    struct stat sb;
    if (!content && stat(path, &sb) == 0 && !S_ISDIR(sb.st_mode)) { /* a large model file: its size is enough */
        snprintf(buf, sizeof buf, "%lld bytes", (long long)sb.st_size);
    } else if (lp_fingerprint(path, &size, &hash) == LP_OK) {
        snprintf(buf, sizeof buf, "%lld bytes, hash %016llx", (long long)size, (unsigned long long)hash);
    } else {
        snprintf(buf, sizeof buf, "unreadable");
    }
    cJSON_AddStringToObject(j, key, buf);
}

/* Every setting that changes what a pair's results are, by its config key. */
static cJSON *job_json(const args *a, int exact, lp_model *m) {
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "command", exact ? "patch" : "attribute");
    add_fingerprint(j, "attrib.pairs", lp_cfg_str(&a->cfg, "attrib.pairs"), 1);
    cJSON_AddStringToObject(j, "model.path", lp_cfg_str(&a->cfg, "model.path"));
    add_fingerprint(j, "model.path (size)", lp_cfg_str(&a->cfg, "model.path"), 0);
    cJSON_AddStringToObject(j, "model.dtype", lp_model_ctx(m)->dtype == LP_BF16 ? "bf16" : "f32");
    const char *keys[] = {"attrib.metric", "attrib.nodes", "attrib.grad_at", "attrib.align", NULL};
    for (int i = 0; keys[i]; i++) cJSON_AddStringToObject(j, keys[i], lp_cfg_str(&a->cfg, keys[i]));
    cJSON_AddNumberToObject(j, "attrib.ig_steps", (double)lp_cfg_int(&a->cfg, "attrib.ig_steps"));
    cJSON_AddNumberToObject(j, "attrib.top", (double)lp_cfg_int(&a->cfg, "attrib.top"));
    const char *sae = lp_cfg_str(&a->cfg, "attrib.sae");
    cJSON_AddStringToObject(j, "attrib.sae", sae ? sae : "");
    if (sae) add_fingerprint(j, "attrib.sae (files)", sae, 1);
    if (exact) cJSON_AddStringToObject(j, "patch.compare_atp", lp_cfg_str(&a->cfg, "patch.compare_atp"));
    /* between components (paths.h): which method, and its settings */
    const char *mode = exact ? "patch.kind" : "attrib.edges";
    cJSON_AddStringToObject(j, mode, lp_cfg_str(&a->cfg, mode));
    int between = exact ? strcmp(lp_cfg_str(&a->cfg, mode), "path") == 0 : strcmp(lp_cfg_str(&a->cfg, mode), "true") == 0;
    const char *pk[] = {"path.sender", "path.receivers", "path.freeze", NULL};
    for (int i = exact ? 0 : 2; between && pk[i]; i++) {
        const char *v = lp_cfg_str(&a->cfg, pk[i]);
        cJSON_AddStringToObject(j, pk[i], v ? v : "");
    }
    return j;
}

lp_status sweep_job_check(const args *a, const char *out, int exact, lp_model *m) {
    char path[1300];
    snprintf(path, sizeof path, "%s/job.json", out);
    cJSON *now = job_json(a, exact, m);
    if (!now) LP_FAIL(LP_ERR_OOM, "out of memory");
    size_t n;
    char *old_txt = lp_read_file(path, &n);
    lp_status st = LP_OK;
    if (!old_txt) { /* a new output: record the settings before any result */
        char *txt = cJSON_Print(now);
        st = txt ? lp_write_file_atomic(path, txt, strlen(txt)) : LP_ERR(LP_ERR_OOM, "out of memory");
        free(txt);
        cJSON_Delete(now);
        return st;
    }
    cJSON *old = cJSON_ParseWithLength(old_txt, n);
    free(old_txt);
    if (!cJSON_IsObject(old)) st = LP_ERR(LP_ERR_FORMAT, "%s: not a loupe job file; choose another attrib.out", path);
    for (const cJSON *e = now->child; st == LP_OK && e; e = e->next) {
        char *want = cJSON_PrintUnformatted(e), *had = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(old, e->string));
        if (!had || strcmp(want, had) != 0)
            st = LP_ERR(LP_ERR_ARG, "%s: this output was written with %s = %s, not %s; resume with the same setting, or choose another attrib.out",
                              path, e->string, had ? had : "(unset)", want);
        free(want), free(had);
    }
    cJSON_Delete(old);
    cJSON_Delete(now);
    return st;
}

/* ---- results.jsonl ---- */

/* Cuts a torn or unparsable tail (a kill or a full disk mid-line) back to the last whole
 * result line, marks the pairs done, and refuses a file with foreign lines inside. */
static lp_status repair_results(sweep_out *r, int n_max) {
    size_t len;
    char *txt = lp_read_file(r->path, &len);
    if (!txt) return LP_OK; /* a new output */
    size_t keep = 0, pos = 0;
    int line = 0;
    lp_status st = LP_OK;
    while (pos < len && st == LP_OK) {
        char *nl = memchr(txt + pos, '\n', len - pos);
        line++;
        if (!nl) break; /* torn: no newline */
        *nl = 0;
        cJSON *j = cJSON_Parse(txt + pos);
        const cJSON *ix = cJSON_GetObjectItemCaseSensitive(j, "index");
        int ok = cJSON_IsNumber(ix) && ix->valueint >= 0 && ix->valueint < n_max;
        if (ok) r->done[ix->valueint] = 1;
        cJSON_Delete(j);
        pos = (size_t)(nl - txt) + 1;
        if (ok) {
            keep = pos;
        } else if (memchr(txt + pos, '\n', len - pos)) { /* a bad line with whole lines after it: not ours to cut */
            st = LP_ERR(LP_ERR_FORMAT, "%s: line %d is not a result of this pairs file; choose another attrib.out", r->path, line);
        }
    }
    free(txt);
    if (st == LP_OK && keep < len) {
        fprintf(stderr, "loupe: %s: cut an incomplete last line (%zu bytes) left by an interrupted run\n", r->path, len - keep);
        if (truncate(r->path, (off_t)keep) != 0)
            st = LP_ERR(lp_write_status(errno), "%s: cannot cut the incomplete last line: %s", r->path, strerror(errno));
    }
    return st;
}

/* The pair index of a score tensor "pair000012.atp.hook_z", or -1. */
static int pair_of(const char *name) {
    int ix;
    return sscanf(name, "pair%d.", &ix) == 1 ? ix : -1;
}

/* One scores file against results.jsonl: kept when all its pairs are done, removed when
 * none is (a kill between its rename and the results lines), cut down to the done ones
 * otherwise. Marks have[] for the pairs it holds. */
static lp_status reconcile_scores(sweep_out *r, const char *path, const char *method, unsigned char *have) {
    lp_st_file f;
    LP_CHECK(lp_st_open(&f, path));
    int n_done = 0, n_other = 0, first = -1;
    for (int i = 0; i < f.n; i++) {
        int ix = pair_of(f.tensors[i].name);
        int done = ix >= 0 && ix < r->n_max && r->done[ix];
        n_done += done, n_other += !done;
        if (done && (first < 0 || ix < first)) first = ix;
    }
    lp_status st = LP_OK;
    if (n_other == 0) {
        for (int i = 0; i < f.n; i++) have[pair_of(f.tensors[i].name)] = 1;
    } else if (n_done > 0) {
        lp_st_spec *specs = calloc((size_t)n_done, sizeof *specs);
        const void **datas = calloc((size_t)n_done, sizeof *datas);
        int k = 0;
        for (int i = 0; specs && datas && i < f.n; i++) {
            const lp_st_tensor *t = &f.tensors[i];
            int ix = pair_of(t->name);
            if (ix < 0 || ix >= r->n_max || !r->done[ix]) continue;
            specs[k] = (lp_st_spec){.name = t->name, .dtype = t->dtype, .ndim = t->ndim};
            memcpy(specs[k].shape, t->shape, sizeof t->shape);
            datas[k++] = t->data;
            have[ix] = 1;
        }
        char dst[1400];
        snprintf(dst, sizeof dst, "%s/scores-%s-%06d.safetensors", r->dir, method, first);
        st = specs && datas ? lp_st_write(dst, specs, datas, k, NULL) : LP_ERR(LP_ERR_OOM, "out of memory");
        if (st == LP_OK && strcmp(dst, path) != 0 && unlink(path) != 0)
            st = LP_ERR(lp_write_status(errno), "%s: cannot remove: %s", path, strerror(errno));
        free(specs), free(datas);
    }
    lp_st_close(&f);
    if (st == LP_OK && n_done == 0 && unlink(path) != 0)
        st = LP_ERR(lp_write_status(errno), "%s: cannot remove: %s", path, strerror(errno));
    return st;
}

/* Every pair in results.jsonl has its scores in each method's files, and no file holds
 * pairs that results.jsonl lacks. */
static lp_status reconcile(sweep_out *r, const char *const *methods) {
    lp_status st = LP_OK;
    for (int m = 0; methods[m] && st == LP_OK; m++) {
        unsigned char *have = calloc((size_t)r->n_max + 1, 1);
        if (!have) LP_FAIL(LP_ERR_OOM, "out of memory");
        char prefix[32], path[1400];
        int np = snprintf(prefix, sizeof prefix, "scores-%s-", methods[m]);
        DIR *d = opendir(r->dir);
        struct dirent *e;
        char **names = NULL;
        int n = 0;
        while (d && (e = readdir(d))) {
            size_t len = strlen(e->d_name);
            if (strncmp(e->d_name, prefix, (size_t)np) != 0 || len < 12 || strcmp(e->d_name + len - 12, ".safetensors") != 0) continue;
            char **nn = realloc(names, (size_t)(n + 1) * sizeof *names);
            if (nn) names = nn;
            if (!nn || !(names[n++] = strdup(e->d_name))) {
                st = LP_ERR(LP_ERR_OOM, "out of memory");
                break;
            }
        }
        if (d) closedir(d);
        for (int i = 0; i < n; i++) {
            if (st == LP_OK) {
                snprintf(path, sizeof path, "%s/%s", r->dir, names[i]);
                st = reconcile_scores(r, path, methods[m], have);
            }
            free(names[i]);
        }
        free(names);
        for (int i = 0; st == LP_OK && i < r->n_max; i++)
            if (r->done[i] && !have[i])
                st = LP_ERR(LP_ERR_FORMAT, "%s lists pair %d but no scores-%s-*.safetensors holds its scores (was a file removed?); choose another "
                                  "attrib.out", r->path, i, methods[m]);
        free(have);
    }
    return st;
}

lp_status sweep_out_open(sweep_out *r, const char *dir, int n_max, const char *const *methods) {
    memset(r, 0, sizeof *r);
    r->fd = -1;
    r->n_max = n_max;
    snprintf(r->dir, sizeof r->dir, "%s", dir);
    snprintf(r->path, sizeof r->path, "%s/results.jsonl", dir);
    r->done = calloc((size_t)n_max + 1, 1);
    if (!r->done) LP_FAIL(LP_ERR_OOM, "out of memory");
    LP_CHECK(lp_remove_stale_tmp(dir)); /* the caller holds the lock: these are a dead run's */
    LP_CHECK(repair_results(r, n_max));
    LP_CHECK(reconcile(r, methods));
    r->fd = open(r->path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (r->fd < 0) LP_FAIL(lp_write_status(errno), "%s: cannot write: %s", r->path, strerror(errno));
    return LP_OK;
}

lp_status sweep_out_append(sweep_out *r, const char *lines, size_t n) {
    struct stat sb;
    if (fstat(r->fd, &sb) != 0) LP_FAIL(LP_ERR_WRITE, "%s: %s", r->path, strerror(errno));
    lp_status st = lp_write_fd(r->fd, lines, n, -1, r->path);
    if (st == LP_OK && fdatasync(r->fd) != 0) st = LP_ERR(LP_ERR_WRITE, "%s: cannot flush: %s", r->path, strerror(errno));
    if (st != LP_OK) { /* leave no half batch behind (best effort: a restart cuts it too) */
        int rc = ftruncate(r->fd, sb.st_size);
        (void)rc;
    }
    return st;
}

lp_status sweep_out_close(sweep_out *r, lp_status st) {
    if (r->fd >= 0 && close(r->fd) != 0 && st == LP_OK)
        st = LP_ERR(LP_ERR_WRITE, "%s: cannot close: %s", r->path, strerror(errno));
    r->fd = -1;
    free(r->done);
    r->done = NULL;
    return st;
}
