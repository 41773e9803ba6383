/* clitest.h: running the `loupe` command line from a test. The including file declares
 * `static char dir[64]` (its suite's temporary directory) before including this; loupe()
 * runs build/loupe (or $LOUPE_CLI) there and leaves its stdout and stderr in out_txt and
 * err_txt, for the assertions on exit status and messages. */
#ifndef LOUPE_CLITEST_H
#define LOUPE_CLITEST_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

static char out_txt[1 << 16], err_txt[1 << 16];

static void slurp(const char *path, char *buf, size_t n) {
    FILE *f = fopen(path, "rb");
    size_t k = f ? fread(buf, 1, n - 1, f) : 0;
    buf[k] = 0;
    if (f) fclose(f);
}

/* Runs `loupe ARGS` (printf-style); returns the exit status, -1 if it did not exit. */
static int loupe(const char *fmt, ...) {
    char args[2048], cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    const char *bin = getenv("LOUPE_CLI") ? getenv("LOUPE_CLI") : "build/loupe";
    snprintf(cmd, sizeof cmd, "%s %s >%s/out.txt 2>%s/err.txt", bin, args, dir, dir);
    int rc = system(cmd);
    char p[128];
    snprintf(p, sizeof p, "%s/out.txt", dir);
    slurp(p, out_txt, sizeof out_txt);
    snprintf(p, sizeof p, "%s/err.txt", dir);
    slurp(p, err_txt, sizeof err_txt);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

#endif
