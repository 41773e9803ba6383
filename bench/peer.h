/* peer.h: runs a peer of bench/peers/ from the same benchmark run, with the same thread
 * count, and reads back the figure it prints, so that a bench can print loupe's figure, the
 * peer's and their ratio side by side. The peer runs with $LOUPE_PYTHON (default python3);
 * when it cannot run (torch or transformer_lens missing) the bench says so and goes on. */
#ifndef LOUPE_BENCH_PEER_H
#define LOUPE_BENCH_PEER_H

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Threads loupe's CPU GEMMs use (OpenBLAS's), which the peer is given too. */
static int peer_threads(void) { return openblas_get_num_threads(); }

/* Runs `python3 bench/peers/<script> <args>` with OMP_NUM_THREADS set to loupe's thread count,
 * echoes its output, and returns the number printed right before `unit` on its last line that
 * has one (0: the peer did not run). */
static double peer_run(const char *script, const char *args, const char *unit) {
    const char *py = getenv("LOUPE_PYTHON") ? getenv("LOUPE_PYTHON") : "python3";
    char cmd[1024], line[1024];
    snprintf(cmd, sizeof cmd, "OMP_NUM_THREADS=%d MKL_NUM_THREADS=%d %s bench/peers/%s %s 2>&1", peer_threads(), peer_threads(), py,
             script, args);
    fflush(stdout);
    FILE *p = popen(cmd, "r");
    if (!p) return 0;
    double v = 0;
    while (fgets(line, sizeof line, p)) {
        const char *u = strstr(line, unit);
        if (u) { /* the number before " unit" */
            const char *s = u;
            while (s > line && s[-1] == ' ') s--;
            while (s > line && (s[-1] == '.' || (s[-1] >= '0' && s[-1] <= '9'))) s--;
            v = atof(s);
        }
        printf("  peer: %s", line);
    }
    int rc = pclose(p);
    if (rc != 0) {
        printf("  peer bench/peers/%s not run (%s exited with %d; install its requirements or set LOUPE_PYTHON)\n", script, py, rc);
        return 0;
    }
    return v;
}

#endif
