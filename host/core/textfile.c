/* textfile.c: whole-file reads and the UTF-8 check behind textfile.h. Reading with
 * fread until end of file (not fseek/ftell) also works for pipes, so `--text <(cmd)`
 * reads what the command wrote; a directory is refused by name, since fopen accepts
 * one and reading it would look like an empty file. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>

#include "loupe/textfile.h"

lp_status lp_text_read(const char *path, const char *what, char **out, size_t *len) {
    *out = NULL, *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) LP_FAIL(LP_ERR_IO, "%s: cannot read the %s: %s", path, what, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) == 0 && S_ISDIR(sb.st_mode)) {
        fclose(f);
        LP_FAIL(LP_ERR_IO, "%s: is a directory, not a %s", path, what);
    }
    size_t cap = S_ISREG(sb.st_mode) && sb.st_size > 0 ? (size_t)sb.st_size + 1 : 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - 1 - n, f);
        if (n < cap - 1) break; /* end of file or an error */
        char *b = realloc(buf, 2 * cap);
        if (!b) free(buf);
        buf = b, cap *= 2;
    }
    int err = ferror(f) ? errno : 0;
    fclose(f);
    if (!buf) LP_FAIL(LP_ERR_OOM, "%s: out of memory reading the %s", path, what);
    if (err) {
        free(buf);
        LP_FAIL(LP_ERR_IO, "%s: cannot read the %s: %s", path, what, strerror(err));
    }
    buf[n] = 0;
    *out = buf, *len = n;
    return LP_OK;
}

size_t lp_utf8_invalid_at(const char *s, size_t n) {
    const utf8proc_uint8_t *u = (const utf8proc_uint8_t *)s;
    size_t i = 0;
    while (i < n) {
        if (u[i] < 0x80) { /* ASCII, the common case, without a call */
            i++;
            continue;
        }
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate(u + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0) return i;
        i += (size_t)k;
    }
    return n;
}

lp_status lp_utf8_check(const char *s, size_t n, const char *name) {
    size_t bad = lp_utf8_invalid_at(s, n);
    if (bad < n) LP_FAIL(LP_ERR_FORMAT, "%s: not valid UTF-8: byte 0x%02x at offset %zu", name, (unsigned char)s[bad], bad);
    return LP_OK;
}
