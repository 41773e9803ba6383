/* files.c: whole-file reads, atomic whole-file writes, directory trees: the file helpers
 * every reader and writer above shares (declared in loupe/output.h). */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/output.h"

char *lp_read_file(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    char *buf = NULL;
    long n = fseek(fp, 0, SEEK_END) == 0 ? ftell(fp) : -1;
    if (n >= 0 && fseek(fp, 0, SEEK_SET) == 0 && (buf = malloc((size_t)n + 1)) && fread(buf, 1, (size_t)n, fp) != (size_t)n) {
        free(buf);
        buf = NULL;
        errno = EIO;
    }
    fclose(fp);
    if (buf) {
        buf[n] = 0;
        if (len) *len = (size_t)n;
    }
    return buf;
}

lp_status lp_write_file_atomic(const char *path, const void *data, size_t n) {
    char tmp[4200];
    lp_tmp_name(tmp, sizeof tmp, path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) LP_FAIL(lp_write_status(errno), "%s: cannot create: %s", tmp, strerror(errno));
    lp_status st = lp_write_fd(fd, data, n, 0, tmp);
    if (st == LP_OK && fsync(fd) != 0) st = LP_ERR(LP_ERR_WRITE, "%s: cannot flush: %s", tmp, strerror(errno));
    if (close(fd) != 0 && st == LP_OK) st = LP_ERR(LP_ERR_WRITE, "%s: cannot close: %s", tmp, strerror(errno));
    if (st == LP_OK && rename(tmp, path) != 0)
        st = LP_ERR(lp_write_status(errno), "%s: cannot rename to %s: %s", tmp, path, strerror(errno));
    if (st != LP_OK) unlink(tmp);
    return st;
}

lp_status lp_mkdir_p(const char *dir) {
    char p[4096];
    if (snprintf(p, sizeof p, "%s", dir) >= (int)sizeof p) LP_FAIL(LP_ERR_ARG, "%s: path too long", dir);
    for (char *q = p + 1; *q; q++) {
        if (*q != '/') continue;
        *q = 0;
        if (mkdir(p, 0755) != 0 && errno != EEXIST) LP_FAIL(lp_write_status(errno), "%s: cannot create directory: %s", p, strerror(errno));
        *q = '/';
    }
    if (mkdir(p, 0755) != 0 && errno != EEXIST) LP_FAIL(lp_write_status(errno), "%s: cannot create directory: %s", p, strerror(errno));
    return LP_OK;
}

static int remove_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

lp_status lp_remove_tree(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return LP_OK;
    if (nftw(path, remove_one, 16, FTW_DEPTH | FTW_PHYS) != 0) LP_FAIL(lp_write_status(errno), "%s: cannot remove: %s", path, strerror(errno));
    return LP_OK;
}
