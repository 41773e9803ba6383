/* fuzz_util.h: what the file-reading harnesses share. Readers that take paths get each
 * input written to files in a private directory on /dev/shm (memory, not disk; /tmp when
 * /dev/shm is missing). An input for a reader of several files is split at FUZZ_SEP into
 * the files' contents, in order (a missing part is an empty file). */
#ifndef LOUPE_FUZZ_UTIL_H
#define LOUPE_FUZZ_UTIL_H

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "loupe/status.h"

#define FUZZ_SEP "\n--8<--\n"

static char fuzz_root[128];

static int fuzz_rm(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}
static void fuzz_cleanup(void) { nftw(fuzz_root, fuzz_rm, 16, FTW_DEPTH | FTW_PHYS); }

/* The harness's directory (created once per process, removed when it exits normally). */
static const char *fuzz_dir(void) {
    if (!fuzz_root[0]) {
        snprintf(fuzz_root, sizeof fuzz_root, "%s/loupe-fuzz-%d", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp",
                 (int)getpid());
        mkdir(fuzz_root, 0700);
        atexit(fuzz_cleanup);
    }
    return fuzz_root;
}

/* dir/name into out[n]; subdirectories of name are created. */
static const char *fuzz_path(char *out, size_t n, const char *name) {
    snprintf(out, n, "%s/%s", fuzz_dir(), name);
    for (char *s = out + strlen(fuzz_root) + 1; (s = strchr(s, '/')); s++) {
        *s = 0;
        mkdir(out, 0700);
        *s = '/';
    }
    return out;
}

static void fuzz_write(const char *path, const void *data, size_t size) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) abort();
    for (size_t off = 0; off < size;) {
        ssize_t w = write(fd, (const char *)data + off, size - off);
        if (w <= 0) abort();
        off += (size_t)w;
    }
    close(fd);
}

/* Writes data as the file name in the harness directory and returns its path (static). */
static const char *fuzz_file(const char *name, const void *data, size_t size) {
    static char p[4][512];
    static int k;
    char *out = p[k++ & 3];
    fuzz_path(out, 512, name);
    fuzz_write(out, data, size);
    return out;
}

/* Removes the file name from the harness directory (a reader must not see it). */
static void fuzz_unlink(const char *name) {
    char p[512];
    unlink(fuzz_path(p, sizeof p, name));
}

/* Splits [data, data+size) at FUZZ_SEP into at most n parts; returns how many. */
static int fuzz_split(const uint8_t *data, size_t size, const uint8_t **part, size_t *len, int n) {
    size_t sl = strlen(FUZZ_SEP);
    int k = 0;
    while (k < n - 1) {
        const uint8_t *s = size >= sl ? memmem(data, size, FUZZ_SEP, sl) : NULL;
        if (!s) break;
        part[k] = data, len[k] = (size_t)(s - data);
        k++;
        size -= (size_t)(s - data) + sl;
        data = s + sl;
    }
    part[k] = data, len[k] = size;
    for (int i = k + 1; i < n; i++) part[i] = (const uint8_t *)"", len[i] = 0;
    return k + 1;
}

/* A refusal must leave one non-empty line (FUZZ_VERBOSE=1 in the environment prints it); with `must_name` it must name that path (or
 * the harness directory, for a reader of several files). */
static void fuzz_check_error(const char *must_name) {
    const char *m = lp_last_error();
    if (getenv("FUZZ_VERBOSE")) fprintf(stderr, "refused: %s\n", m); /* what a replayed input hits */
    if (!m[0] || strchr(m, '\n')) __builtin_trap();
    if (must_name && !strstr(m, must_name) && !strstr(m, fuzz_dir())) __builtin_trap();
}

#endif
