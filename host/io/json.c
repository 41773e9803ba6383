/* json.c: typed, range-checked reads of JSON configuration values (see json.h). A value
 * of the wrong JSON type is refused rather than replaced by a default: a string "1e-5" or
 * a boolean "true" in quotes would otherwise silently change the model. */
#include "io/json.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/output.h"

static const cJSON *get(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNull(v) ? NULL : v;
}

cJSON *json_load(const char *path, int *absent) {
    size_t n;
    char *buf = lp_read_file(path, &n);
    *absent = buf == NULL;
    if (!buf) return NULL;
    cJSON *r = cJSON_ParseWithLength(buf, n);
    free(buf);
    return r;
}

lp_status jcfg_open(const char *path, cJSON **root) {
    int absent;
    cJSON *r = json_load(path, &absent);
    *root = NULL;
    if (absent) LP_FAIL(LP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (!cJSON_IsObject(r)) {
        cJSON_Delete(r);
        LP_FAIL(LP_ERR_FORMAT, "%s: not a JSON object", path);
    }
    *root = r;
    return LP_OK;
}

lp_status jcfg_int(const char *path, const cJSON *o, const char *key, int lo, int hi, int dflt, int *out) {
    const cJSON *v = get(o, key);
    if (!v) {
        if (dflt < 0) LP_FAIL(LP_ERR_FORMAT, "%s: \"%s\" is missing", path, key);
        *out = dflt;
        return LP_OK;
    }
    double d = v->valuedouble;
    if (!cJSON_IsNumber(v) || d != floor(d)) LP_FAIL(LP_ERR_FORMAT, "%s: \"%s\" is not an integer", path, key);
    if (d < lo || d > hi) LP_FAIL(LP_ERR_FORMAT, "%s: \"%s\" = %.17g is outside [%d, %d]", path, key, d, lo, hi);
    *out = (int)d;
    return LP_OK;
}

lp_status jcfg_num(const char *path, const cJSON *o, const char *where, const char *key, double lo, double hi, double dflt,
                     double *out) {
    const cJSON *v = get(o, key);
    if (!v) {
        if (isnan(dflt)) LP_FAIL(LP_ERR_FORMAT, "%s: \"%s%s\" is missing", path, where, key);
        *out = dflt;
        return LP_OK;
    }
    if (!cJSON_IsNumber(v)) LP_FAIL(LP_ERR_FORMAT, "%s: \"%s%s\" is not a number", path, where, key);
    /* cJSON reads 1e999 as inf; NaN cannot be written in JSON but the test is free */
    double d = v->valuedouble;
    if (!isfinite(d) || !(d > lo && d < hi))
        LP_FAIL(LP_ERR_FORMAT, "%s: \"%s%s\" = %g is outside (%g, %g)", path, where, key, d, lo, hi);
    *out = d;
    return LP_OK;
}

lp_status jcfg_bool(const char *path, const cJSON *o, const char *key, int dflt, int *out) {
    const cJSON *v = get(o, key);
    if (!v) {
        *out = dflt;
        return LP_OK;
    }
    if (!cJSON_IsBool(v)) LP_FAIL(LP_ERR_FORMAT, "%s: \"%s\" is not true or false", path, key);
    *out = cJSON_IsTrue(v);
    return LP_OK;
}

lp_status jcfg_str(const char *path, const cJSON *o, const char *where, const char *key, const char *dflt, const char **out) {
    const cJSON *v = get(o, key);
    if (!v) {
        *out = dflt;
        return LP_OK;
    }
    if (!cJSON_IsString(v)) LP_FAIL(LP_ERR_FORMAT, "%s: \"%s%s\" is not a string", path, where, key);
    *out = v->valuestring;
    return LP_OK;
}
