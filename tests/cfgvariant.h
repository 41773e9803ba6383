/* cfgvariant.h: a committed checkpoint fixture with an edited config.json, for tests of
 * how loupe reads configs. The variant is a fresh directory under /tmp holding links to
 * the fixture's files and a config.json with the patch's top-level keys replacing the
 * fixture's (a value of "<delete>" removes the key). */
#ifndef LOUPE_CFGVARIANT_H
#define LOUPE_CFGVARIANT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* mkdtemp, realpath, symlink: include this header first */
#endif
#include <cjson/cJSON.h>
#include <dirent.h>
#include <time.h>
#include <unistd.h>

#include "loupe/model.h"
#include "testutil.h"

typedef struct cfg_variant {
    char dir[256];
} cfg_variant;

static inline void cfg_variant_make(cfg_variant *v, const char *fixture, const char *patch) {
    snprintf(v->dir, sizeof v->dir, "/tmp/loupe-cfg-XXXXXX");
    cr_assert(mkdtemp(v->dir) != NULL);
    char src[512], path[768], target[768];
    snprintf(src, sizeof src, "%s/%s", LP_FIXTURES, fixture);
    DIR *d = opendir(src);
    cr_assert(d != NULL, "cannot list %s", src);
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, "config.json") == 0) continue;
        char *abs = realpath(src, NULL);
        snprintf(target, sizeof target, "%s/%s", abs, e->d_name);
        free(abs);
        snprintf(path, sizeof path, "%s/%s", v->dir, e->d_name);
        cr_assert(symlink(target, path) == 0);
    }
    closedir(d);
    snprintf(path, sizeof path, "%s/config.json", src);
    FILE *f = fopen(path, "rb");
    cr_assert(f != NULL);
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    cJSON *root = cJSON_Parse(buf), *p = cJSON_Parse(patch);
    cr_assert(root && p, "bad JSON in the test's patch: %s", patch);
    for (cJSON *e = p->child; e; e = e->next) {
        cJSON_DeleteItemFromObjectCaseSensitive(root, e->string);
        if (!(cJSON_IsString(e) && strcmp(e->valuestring, "<delete>") == 0))
            cJSON_AddItemToObject(root, e->string, cJSON_Duplicate(e, 1));
    }
    char *out = cJSON_Print(root);
    snprintf(path, sizeof path, "%s/config.json", v->dir);
    f = fopen(path, "wb");
    cr_assert(f != NULL);
    fputs(out, f);
    fclose(f);
    free(out);
    cJSON_Delete(root);
    cJSON_Delete(p);
}

static inline void cfg_variant_free(cfg_variant *v) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", v->dir);
    cr_expect(system(cmd) == 0);
}

/* Loads a variant; returns the status, the model in *out when it loaded (else NULL). */
static inline lp_status cfg_variant_load(const char *fixture, const char *patch, lp_model **out) {
    cfg_variant v;
    cfg_variant_make(&v, fixture, patch);
    lp_model *m = NULL;
    lp_status st = lp_model_load(&m, v.dir, LP_CPU, LP_F32);
    cfg_variant_free(&v);
    if (out) *out = m;
    else lp_model_free(m);
    return st;
}

static inline double cfg_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The variant is refused with status `want` (or any bad-input status when want is LP_OK),
 * with a message containing each of the NULL-terminated needles, within a second. */
static inline void cfg_expect_refused(const char *fixture, const char *patch, lp_status want, const char *const *needles) {
    double t0 = cfg_now();
    lp_status st = cfg_variant_load(fixture, patch, NULL);
    double dt = cfg_now() - t0;
    const char *msg = lp_last_error();
    cr_expect_neq(st, LP_OK, "%s with %s: loaded", fixture, patch);
    if (want != LP_OK) cr_expect_eq(st, want, "%s with %s: status %s, expected %s (%s)", fixture, patch, lp_status_name(st),
                                    lp_status_name(want), msg);
    cr_expect_eq(lp_status_exit_code(st), 2, "%s with %s: %s is not bad input", fixture, patch, lp_status_name(st));
    for (const char *const *n = needles; *n; n++)
        cr_expect(strstr(msg, *n) != NULL, "%s with %s: message '%s' lacks '%s'", fixture, patch, msg, *n);
    cr_expect(strchr(msg, '\n') == NULL, "message is not one line: %s", msg);
    cr_expect(dt < 1.0, "%s with %s: took %.2f s to refuse", fixture, patch, dt);
    fprintf(stderr, "  refused in %.3f s: %s\n", dt, msg);
}
#define CFG_REFUSED(fixture, patch, want, ...) \
    cfg_expect_refused((fixture), (patch), (want), (const char *const[]){__VA_ARGS__, NULL})

#endif
