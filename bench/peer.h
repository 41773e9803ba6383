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

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

/* 1 when the CPU has AVX-512 F, DQ, BW and VL (CPUID leaf 7: EBX bits 16, 17, 30, 31) and
 * the OS saves the vector state they need (XCR0 bits 1, 2, 5, 6, 7). */
static inline int peer_cpu_avx512(void) {
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid(1, a, b, c, d);
    if (!(c & (1u << 27))) return 0; /* OSXSAVE: xgetbv exists */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xe6) != 0xe6) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned need = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);
    return (b & need) == need;
}
#else
static inline int peer_cpu_avx512(void) { return 0; }
#endif

/* The BLAS of loupe's CPU figures: OpenBLAS's build, the kernels it runs (its core name) and
 * its threads. OpenBLAS chooses its kernels when the library loads, before main, from CPUID,
 * unless OPENBLAS_CORETYPE names a core; a named core is the user's to choose, so the bench
 * only says when it holds the kernels below what this CPU runs. */
static inline void peer_print_blas(void) {
    const char *forced = getenv("OPENBLAS_CORETYPE");
    printf("CPU BLAS: %s; kernels: %s (%s), %d threads\n", openblas_get_config(), openblas_get_corename(),
           forced ? "named by OPENBLAS_CORETYPE" : "detected", openblas_get_num_threads());
    if (forced && peer_cpu_avx512() && !strstr(openblas_get_corename(), "Skylake") && !strstr(openblas_get_corename(), "Cooper") &&
        !strstr(openblas_get_corename(), "Sapphire"))
        printf("  note: OPENBLAS_CORETYPE=%s holds OpenBLAS to kernels without AVX-512 on a CPU with AVX-512 F/DQ/BW/VL; "
               "unset it to let OpenBLAS detect the core\n", forced);
}

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
