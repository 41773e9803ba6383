/* bench_probe.c: logistic-probe training time per layer (lp_logreg_fit) on synthetic
 * activations, beside scikit-learn's LogisticRegression on the same data, tolerance and
 * thread count when it is installed (bench/peers/sklearn_probe.py).
 *
 * Each "layer" is N rows of d Gaussian features with the two classes shifted apart along a
 * random direction (more at deeper layers). Before timing it validates on a small problem:
 * the fitted probe's gradient, recomputed here with plain loops, is at the tolerance, and
 * its training accuracy is well above chance. Both solvers stop on the same criterion
 * (max |gradient| of the objective divided by C n below tol), so their times compare like
 * for like; the iterations are printed beside them.
 *   build/bench_probe [--n 20000] [--d 768] [--layers 4] [--tol 1e-6] [--C 1] [--no-peer]
 * The peer runs with $LOUPE_PYTHON (default python3); threads: OPENBLAS_NUM_THREADS for
 * both (default: OpenBLAS's choice, passed on to the peer). */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "loupe/probe.h"
#include "core/rng.h"

extern int openblas_get_num_threads(void);

#define CHECK(x)                                                                              \
    do {                                                                                      \
        lp_status s_ = (x);                                                                   \
        if (s_ != LP_OK) {                                                                    \
            fprintf(stderr, "bench_probe: %s (%s)\n", lp_last_error(), lp_last_error_where()); \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double gauss(uint64_t *s) {
    double u = rng_uniform(s) + 1e-300, v = rng_uniform(s);
    return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}

/* Layer l: x = noise + (y ? +1 : -1) * sep * u, u a random unit direction. */
static void make_layer(float *x, int32_t *y, int n, int d, int layer, double sep) {
    uint64_t s = 1000 + layer;
    double *u = malloc(d * sizeof *u), nu = 0;
    for (int j = 0; j < d; j++) {
        u[j] = gauss(&s);
        nu += u[j] * u[j];
    }
    for (int i = 0; i < n; i++) {
        y[i] = rng_uniform(&s) < 0.5;
        for (int j = 0; j < d; j++) x[(size_t)i * d + j] = (float)(gauss(&s) + (y[i] ? 1 : -1) * sep * u[j] / sqrt(nu));
    }
    free(u);
}

/* The gradient of (mean log-loss + ||w||^2 / (2 C n)), in plain loops: the validation. */
static double grad_max(const double *x, const int32_t *y, int n, int d, const double *w, double b, double C) {
    double *g = calloc(d + 1, sizeof *g), m = 0;
    for (int i = 0; i < n; i++) {
        double z = b;
        for (int j = 0; j < d; j++) z += x[(size_t)i * d + j] * w[j];
        double r = 1 / (1 + exp(-z)) - y[i];
        for (int j = 0; j < d; j++) g[j] += r * x[(size_t)i * d + j] / n;
        g[d] += r / n;
    }
    for (int j = 0; j <= d; j++) m = fmax(m, fabs(g[j] + (j < d ? w[j] / (C * n) : 0)));
    free(g);
    return m;
}

static void validate(double tol, double C) {
    int n = 2000, d = 64;
    float *xf = malloc((size_t)n * d * sizeof *xf);
    double *x = malloc((size_t)n * d * sizeof *x), w[64], b, sc[2000];
    int32_t *y = malloc(n * sizeof *y);
    make_layer(xf, y, n, d, 99, 1.0);
    for (size_t i = 0; i < (size_t)n * d; i++) x[i] = xf[i];
    lp_logreg_opts o = {C, tol, 1000};
    lp_logreg_info info;
    CHECK(lp_logreg_fit(x, y, n, d, 2, &o, w, &b, &info));
    double gm = grad_max(x, y, n, d, w, b, C);
    CHECK(lp_probe_scores(x, n, d, 1, w, &b, sc));
    double acc = lp_probe_accuracy(sc, y, n, 2);
    printf("validate: n %d d %d: %d iterations, gradient %.2e (tol %.0e), train accuracy %.3f\n", n, d, info.iterations, gm, tol, acc);
    if (!info.converged || gm > 2 * tol || acc < 0.75) {
        fprintf(stderr, "bench_probe: validation failed\n");
        exit(1);
    }
    free(xf), free(x), free(y);
}

/* .npy of float32 [a, b, c] or int32 [a, b] (c = 0). */
static void write_npy(const char *path, const char *descr, const void *data, size_t nbytes, long a, long b, long c) {
    char hdr[128];
    int n = c ? snprintf(hdr, sizeof hdr, "{'descr': '%s', 'fortran_order': False, 'shape': (%ld, %ld, %ld), }", descr, a, b, c)
              : snprintf(hdr, sizeof hdr, "{'descr': '%s', 'fortran_order': False, 'shape': (%ld, %ld), }", descr, a, b);
    memset(hdr + n, ' ', sizeof hdr - 10 - n);
    hdr[sizeof hdr - 11] = '\n';
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(1); }
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(sizeof hdr - 10), 0};
    if (fwrite(pre, 1, 10, f) != 10 || fwrite(hdr, 1, sizeof hdr - 10, f) != sizeof hdr - 10 || fwrite(data, 1, nbytes, f) != nbytes) {
        perror(path);
        exit(1);
    }
    fclose(f);
}

int main(int argc, char **argv) {
    int n = 20000, d = 768, layers = 4, peer = 1;
    double tol = 1e-6, C = 1.0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--no-peer") == 0) peer = 0;
        else if (i + 1 < argc && strcmp(argv[i], "--n") == 0) n = atoi(argv[++i]);
        else if (i + 1 < argc && strcmp(argv[i], "--d") == 0) d = atoi(argv[++i]);
        else if (i + 1 < argc && strcmp(argv[i], "--layers") == 0) layers = atoi(argv[++i]);
        else if (i + 1 < argc && strcmp(argv[i], "--tol") == 0) tol = atof(argv[++i]);
        else if (i + 1 < argc && strcmp(argv[i], "--C") == 0) C = atof(argv[++i]);
        else { fprintf(stderr, "usage: bench_probe [--n N] [--d D] [--layers L] [--tol T] [--C C] [--no-peer]\n"); return 2; }
    }
    int threads = openblas_get_num_threads();
    validate(tol, C);
    float *xf = malloc((size_t)layers * n * d * sizeof *xf);
    double *x = malloc((size_t)n * d * sizeof *x), *w = malloc(d * sizeof *w), b;
    int32_t *y = malloc((size_t)layers * n * sizeof *y);
    if (!xf || !x || !w || !y) { fprintf(stderr, "bench_probe: out of memory\n"); return 1; }
    printf("logistic probe, binary, N %d x d %d, C %g, tol %g, %d OpenBLAS thread(s)\n", n, d, C, tol, threads);
    double total = 0;
    for (int l = 0; l < layers; l++) {
        make_layer(xf + (size_t)l * n * d, y + (size_t)l * n, n, d, l, 0.25 * (l + 1));
        for (size_t i = 0; i < (size_t)n * d; i++) x[i] = xf[(size_t)l * n * d + i];
        lp_logreg_opts o = {C, tol, 10000};
        lp_logreg_info info;
        double t0 = now();
        CHECK(lp_logreg_fit(x, y + (size_t)l * n, n, d, 2, &o, w, &b, &info));
        double t = now() - t0;
        total += t;
        printf("  layer %d: %.3f s, %d iterations%s, loss %.6f\n", l, t, info.iterations, info.converged ? "" : " (NOT converged)", info.loss);
    }
    printf("loupe: %.3f s per layer (mean of %d)\n", total / layers, layers);
    if (!peer) {
        free(xf), free(x), free(w), free(y);
        return 0;
    }
    char xp[] = "/tmp/loupe-bench-probe-XXXXXX", path_x[64], path_y[64], cmd[512];
    if (!mkdtemp(xp)) { perror("mkdtemp"); return 1; }
    snprintf(path_x, sizeof path_x, "%s/x.npy", xp);
    snprintf(path_y, sizeof path_y, "%s/y.npy", xp);
    write_npy(path_x, "<f4", xf, (size_t)layers * n * d * sizeof *xf, layers, n, d);
    write_npy(path_y, "<i4", y, (size_t)layers * n * sizeof *y, layers, n, 0);
    const char *py = getenv("LOUPE_PYTHON") ? getenv("LOUPE_PYTHON") : "python3";
    snprintf(cmd, sizeof cmd, "%s bench/peers/sklearn_probe.py --x %s --y %s --C %g --tol %g --threads %d --loupe-seconds %.6f", py, path_x,
             path_y, C, tol, threads, total / layers);
    fflush(stdout);
    int rc = system(cmd);
    if (rc != 0) printf("scikit-learn peer not run (%s exited with %d; install scikit-learn or set LOUPE_PYTHON)\n", py, rc);
    snprintf(cmd, sizeof cmd, "rm -rf %s", xp);
    if (system(cmd) != 0) fprintf(stderr, "bench_probe: could not remove %s\n", xp);
    free(xf), free(x), free(w), free(y);
    return 0;
}
