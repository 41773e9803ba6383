/* npy.c: the .npy header (see npy.h). The header is a Python dict literal; we accept the
 * keys numpy writes ('descr', 'fortran_order', 'shape') and refuse anything else we would
 * have to guess at. The header text is copied and NUL-terminated, so every scan below
 * stops at its end. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loupe/status.h"
#include "io/npy.h"

/* The text after 'key': (spaces skipped), or NULL. */
static const char *dict_value(const char *hdr, const char *key) {
    char pat[32];
    snprintf(pat, sizeof pat, "'%s':", key);
    const char *p = strstr(hdr, pat);
    if (!p) return NULL;
    p += strlen(pat);
    while (*p == ' ') p++;
    return p;
}

/* "(2, 3)" or "(5,)" or "()" into h->shape; 0 on anything else. */
static int parse_shape(const char *s, lp_npy *h) {
    if (!s || *s != '(') return 0;
    s++;
    h->ndim = 0;
    for (;;) {
        while (*s == ' ') s++;
        if (*s == ')') return 1;
        if (*s < '0' || *s > '9' || h->ndim == LP_MAX_DIMS) return 0;
        char *end;
        errno = 0;
        long long v = strtoll(s, &end, 10);
        if (errno == ERANGE) return 0;
        h->shape[h->ndim++] = v;
        s = end;
        while (*s == ' ') s++;
        if (*s == ',') s++;
        else if (*s != ')') return 0;
    }
}

lp_status npy_parse_buf(const unsigned char *p, size_t n, const char *what, lp_npy *h) {
    memset(h, 0, sizeof *h);
    if (n < 10 || memcmp(p, "\x93NUMPY", 6) != 0)
        LP_FAIL(LP_ERR_FORMAT, "%s: %s", what, n == 0 ? "empty file" : "not a .npy array (bad magic)");
    size_t hlen, hstart;
    if (p[6] == 1) {
        hlen = (size_t)p[8] | (size_t)p[9] << 8, hstart = 10;
    } else if (p[6] == 2 || p[6] == 3) {
        if (n < 12) LP_FAIL(LP_ERR_FORMAT, "%s: truncated .npy header (%zu bytes)", what, n);
        hlen = (size_t)p[8] | (size_t)p[9] << 8 | (size_t)p[10] << 16 | (size_t)p[11] << 24, hstart = 12;
    } else {
        LP_FAIL(LP_ERR_FORMAT, "%s: .npy version %d is not 1, 2 or 3", what, p[6]);
    }
    if (hlen > n - hstart)
        LP_FAIL(LP_ERR_FORMAT, "%s: truncated .npy header: %zu bytes, the file has %zu after the preamble", what, hlen,
                n - hstart);
    char *hdr = malloc(hlen + 1);
    if (!hdr) LP_FAIL(LP_ERR_OOM, "%s: out of memory for a %zu-byte .npy header", what, hlen);
    memcpy(hdr, p + hstart, hlen);
    hdr[hlen] = 0;
    const char *descr = dict_value(hdr, "descr"), *fo = dict_value(hdr, "fortran_order");
    const char *close = descr && descr[0] == '\'' ? strchr(descr + 1, '\'') : NULL;
    lp_status st = LP_OK;
    if (!close || close - descr - 1 >= (long)sizeof h->descr)
        st = LP_ERR(LP_ERR_FORMAT, "%s: malformed .npy header: 'descr' is not a short quoted string", what);
    else if (!fo || !(strncmp(fo, "False", 5) == 0 || strncmp(fo, "True", 4) == 0))
        st = LP_ERR(LP_ERR_FORMAT, "%s: malformed .npy header: 'fortran_order' is not True or False", what);
    else if (fo[0] == 'T')
        st = LP_ERR(LP_ERR_FORMAT, "%s: Fortran-ordered arrays are not supported", what);
    else if (!parse_shape(dict_value(hdr, "shape"), h))
        st = LP_ERR(LP_ERR_FORMAT, "%s: malformed .npy header: 'shape' is not a tuple of at most %d non-negative integers", what,
                          LP_MAX_DIMS);
    if (st == LP_OK) memcpy(h->descr, descr + 1, (size_t)(close - descr - 1));
    free(hdr);
    h->data_off = hstart + hlen;
    h->data_avail = n - h->data_off;
    return st;
}

lp_status npy_data_bytes(const lp_npy *h, size_t itemsize, const char *what, size_t *bytes) {
    size_t need = itemsize;
    int over = 0;
    for (int i = 0; i < h->ndim; i++) over |= __builtin_mul_overflow(need, (size_t)h->shape[i], &need);
    char sh[128];
    if (over)
        LP_FAIL(LP_ERR_FORMAT, "%s: .npy shape %s of %zu-byte items overflows", what,
                lp_shape_str(h->shape, h->ndim, sh, sizeof sh), itemsize);
    if (need > h->data_avail)
        LP_FAIL(LP_ERR_FORMAT, "%s: truncated: .npy shape %s needs %zu data bytes, the file has %zu", what,
                lp_shape_str(h->shape, h->ndim, sh, sizeof sh), need, h->data_avail);
    *bytes = need;
    return LP_OK;
}
