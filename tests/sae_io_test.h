/* sae_io_test.h: what the SAE file tests (test_sae_io.c, test_sae_io_bad.c) share: the
 * suite's CPU context and temporary directory, loading, and the bad-input builders (copies
 * of the fixtures with one thing changed). */
#ifndef LOUPE_TEST_SAE_IO_H
#define LOUPE_TEST_SAE_IO_H

#include <cjson/cJSON.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/sae.h"
#include "loupe/safetensors.h"
#include "testutil.h"

#define SAE_FIX LP_FIXTURES "/sae"

static lp_ctx ctx;
static char tmp[64];

static inline void setup(void) {
    cr_assert_eq(lp_ctx_init(&ctx, LP_CPU, LP_F32), LP_OK, "%s", lp_last_error());
    snprintf(tmp, sizeof tmp, "/tmp/loupe-sae-XXXXXX");
    cr_assert(mkdtemp(tmp) != NULL);
}
static inline void teardown(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    cr_expect(system(cmd) == 0);
    lp_ctx_free(&ctx);
}
TestSuite(sae_io, .init = setup, .fini = teardown);

static inline char *in_tmp(const char *name) {
    static char p[8][512];
    static int i;
    i = (i + 1) % 8;
    snprintf(p[i], sizeof p[i], "%s/%s", tmp, name);
    return p[i];
}

static inline lp_sae *load_ok(const char *path) {
    lp_sae *s = NULL;
    lp_status st = lp_sae_load(&s, &ctx, path);
    cr_assert_eq(st, LP_OK, "load %s: %s", path, lp_last_error());
    cr_assert(s != NULL);
    return s;
}

/* ---- bad input: one line naming the file and the problem ---- */

static inline void expect_load_error(const char *path, lp_status want, const char *names, const char *phrase) {
    lp_sae *s = (lp_sae *)1;
    lp_status st = lp_sae_load(&s, &ctx, path);
    cr_expect_eq(st, want, "%s: status %s, want %s; message: %s", path, lp_status_name(st), lp_status_name(want),
                 lp_last_error());
    cr_expect(s == NULL, "%s: *out not NULL after a failure", path);
    cr_expect(strstr(lp_last_error(), names) != NULL, "message does not name %s: %s", names, lp_last_error());
    cr_expect(strstr(lp_last_error(), phrase) != NULL, "message '%s' lacks '%s'", lp_last_error(), phrase);
    cr_expect(strchr(lp_last_error(), '\n') == NULL);
    if (st == LP_OK) lp_sae_free(s, &ctx);
}

static inline void copy_file(const char *src, const char *dst, size_t truncate_to) {
    size_t n;
    char *buf = lp_read_file(src, &n);
    cr_assert(buf, "cannot read %s", src);
    FILE *fp = fopen(dst, "wb");
    cr_assert(fp);
    fwrite(buf, 1, truncate_to && truncate_to < n ? truncate_to : n, fp);
    fclose(fp);
    free(buf);
}

static inline void write_text(const char *path, const char *text) {
    FILE *fp = fopen(path, "w");
    cr_assert(fp);
    fputs(text, fp);
    fclose(fp);
}

/* A new directory `name` in tmp with the fixture's cfg.json, `key` set to the JSON `value`
 * (NULL: removed), and the fixture's weights (unless no_weights). Returns the directory. */
static inline char *cfg_variant(const char *fixture, const char *cfgname, const char *weights, const char *name, const char *key,
                         const char *value, int no_weights) {
    char *dir = in_tmp(name), src[512], dst[512];
    mkdir(dir, 0755);
    snprintf(src, sizeof src, "%s/%s/%s", SAE_FIX, fixture, cfgname);
    size_t n;
    char *txt = lp_read_file(src, &n);
    cJSON *j = cJSON_ParseWithLength(txt, n);
    free(txt);
    cr_assert(j);
    if (key) {
        cJSON_DeleteItemFromObjectCaseSensitive(j, key);
        if (value) cJSON_AddItemToObject(j, key, cJSON_Parse(value));
    }
    char *out = cJSON_Print(j);
    cJSON_Delete(j);
    snprintf(dst, sizeof dst, "%s/%s", dir, cfgname);
    write_text(dst, out);
    free(out);
    if (!no_weights) {
        snprintf(src, sizeof src, "%s/%s/%s", SAE_FIX, fixture, weights);
        snprintf(dst, sizeof dst, "%s/%s", dir, weights);
        copy_file(src, dst, 0);
    }
    return dir;
}

/* Rewrites src's tensors into dst: `drop` left out, `transpose` stored with its two dims
 * swapped (same bytes), `poison` given value v at flat index 3, `retype` stored as I32. */
static inline void weights_variant(const char *src, const char *dst, const char *drop, const char *transpose, const char *poison,
                            float v, const char *retype) {
    lp_st_file f;
    cr_assert_eq(lp_st_open(&f, src), LP_OK, "%s", lp_last_error());
    lp_st_spec specs[16];
    const void *datas[16];
    void *owned[16] = {0};
    int n = 0;
    for (int i = 0; i < f.n && n < 16; i++) {
        const lp_st_tensor *t = &f.tensors[i];
        if (drop && strcmp(t->name, drop) == 0) continue;
        specs[n] = (lp_st_spec){.name = t->name, .dtype = t->dtype, .ndim = t->ndim};
        memcpy(specs[n].shape, t->shape, sizeof t->shape);
        datas[n] = t->data;
        if (transpose && strcmp(t->name, transpose) == 0) {
            specs[n].shape[0] = t->shape[1];
            specs[n].shape[1] = t->shape[0];
        }
        if (poison && strcmp(t->name, poison) == 0) {
            float *c = malloc(t->nbytes);
            memcpy(c, t->data, t->nbytes);
            c[3] = v;
            datas[n] = owned[n] = c;
        }
        if (retype && strcmp(t->name, retype) == 0) specs[n].dtype = LP_I32;
        n++;
    }
    cr_assert_eq(lp_st_write(dst, specs, datas, n, NULL), LP_OK, "%s", lp_last_error());
    for (int i = 0; i < n; i++) free(owned[i]);
    lp_st_close(&f);
}

static inline char *saelens_weights_variant(const char *fixture, const char *name, const char *drop, const char *transpose,
                                     const char *poison, float v, const char *retype) {
    char *dir = cfg_variant(fixture, "cfg.json", "sae_weights.safetensors", name, NULL, NULL, 1);
    char src[512], dst[512];
    snprintf(src, sizeof src, "%s/%s/sae_weights.safetensors", SAE_FIX, fixture);
    snprintf(dst, sizeof dst, "%s/sae_weights.safetensors", dir);
    weights_variant(src, dst, drop, transpose, poison, v, retype);
    return dir;
}

#endif
