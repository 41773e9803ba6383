/* mpitest.h: how the tests launch ranks through the loupe binary. One BLAS thread per rank (a
 * multi-threaded GEMM sums in another order, and mpirun gives each rank one core); ranks
 * yield while they wait, so an oversubscribed machine still moves. OpenMPI's own start and
 * shutdown leave allocations LeakSanitizer reports (a bare MPI_Init/MPI_Finalize program does
 * too): leak checks are off for the ranks of a SAN build, every other sanitizer check stays on.
 * Include after criterion.h. */
#ifndef LOUPE_TESTS_MPITEST_H
#define LOUPE_TESTS_MPITEST_H

#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loupe/dist.h"

#define MPIRUN                                                                                                      \
    "mpirun --allow-run-as-root --oversubscribe --mca mpi_yield_when_idle 1 -x OPENBLAS_NUM_THREADS -x OMP_NUM_THREADS " \
    "-x ASAN_OPTIONS=detect_leaks=0 "

/* Skips the test, saying why, when this build has no MPI or mpirun is not on the PATH. */
static inline void mpitest_need_mpi(void) {
    if (!lp_dist_have_mpi()) cr_skip_test("this loupe was built without MPI (mpicc absent at build time)");
    if (system("command -v mpirun >/dev/null 2>&1") != 0) cr_skip_test("mpirun is not on the PATH (scripts/install-deps.sh installs OpenMPI)");
}

/* bin (n bytes) gets build/loupe beside this test binary; dir, a mkdtemp template, the scratch
 * directory. */
static inline void mpitest_paths(char *bin, size_t n, char *dir) {
    char self[PATH_MAX];
    ssize_t k = readlink("/proc/self/exe", self, sizeof self - 1);
    cr_assert(k > 0, "cannot find this test binary");
    self[k] = 0;
    snprintf(bin, n, "%s/loupe", dirname(self));
    cr_assert_eq(access(bin, X_OK), 0, "%s is missing (make builds it)", bin);
    cr_assert(mkdtemp(dir), "cannot make a scratch directory");
}

/* Removes the scratch directory mpitest_paths made (nothing when mkdtemp never ran). */
static inline void mpitest_remove(const char *dir) {
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (dir[strlen(dir) - 1] != 'X') (void)!system(cmd);
}

/* Runs a shell command, its stdout and stderr into out (n bytes, cut there); returns its exit
 * status (128 when it did not exit). */
static inline int mpitest_run(char *out, size_t n, const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    strncat(cmd, " 2>&1", sizeof cmd - strlen(cmd) - 1);
    FILE *p = popen(cmd, "r");
    cr_assert(p, "cannot run %s", cmd);
    size_t k = 0;
    out[0] = 0;
    char line[4096];
    while (fgets(line, sizeof line, p))
        if (k + strlen(line) < n) strcpy(out + k, line), k += strlen(line);
    int rc = pclose(p);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

/* build/dist_<prog> beside this test binary; skips (saying why) when it cannot run. */
static inline void mpitest_prog_path(char *out, size_t n, const char *prog) {
    mpitest_need_mpi();
    char self[PATH_MAX];
    ssize_t k = readlink("/proc/self/exe", self, sizeof self - 1);
    cr_assert(k > 0, "cannot find this test binary");
    self[k] = 0;
    snprintf(out, n, "%s/dist_%s", dirname(self), prog);
    cr_assert_eq(access(out, X_OK), 0, "%s is missing (make builds it)", out);
}

/* Runs build/dist_<prog> args under mpirun -np np (with mpirun options opts, each rank
 * through the command prefix pre, which may be ""): its verdict
 * line (the last that starts with "<prog>:") must hold `ok` (and `ok2` unless NULL), and
 * with `exit0` the job must end with status 0; the ranks' failure lines are shown when it
 * does not. */
static inline void mpitest_check(int np, const char *opts, const char *pre, const char *prog, const char *args, const char *ok,
                                 const char *ok2, int exit0) {
    char bin[PATH_MAX + 32], cmd[8192], tag[64];
    mpitest_prog_path(bin, sizeof bin, prog);
    snprintf(cmd, sizeof cmd, MPIRUN "%s -np %d %s %s %s 2>&1", opts, np, pre, bin, args);
    snprintf(tag, sizeof tag, "%s:", prog);
    FILE *p = popen(cmd, "r");
    cr_assert(p, "cannot start mpirun");
    char line[512], last[512] = "", fails[4096] = "";
    while (fgets(line, sizeof line, p)) {
        if (strncmp(line, tag, strlen(tag)) == 0) snprintf(last, sizeof last, "%s", line);
        else if ((strncmp(line, "rank ", 5) == 0 || strstr(line, "emulator")) && strlen(fails) + strlen(line) < sizeof fails)
            strcat(fails, line);
    }
    int rc = pclose(p);
    if (exit0) cr_assert_eq(rc, 0, "mpirun -np %d %s %s failed (status %d):\n%s%s", np, prog, args, rc, fails, last);
    cr_assert(strstr(last, ok) && (!ok2 || strstr(last, ok2)), "mpirun -np %d %s %s:\n%s%s", np, prog, args, fails, last);
}

#endif
