/* parallel.c: a parallel for over [0, n) for the CPU ops that are not a BLAS call, on as
 * many threads as OpenBLAS uses, so that the work between two GEMMs does not leave all but
 * one core idle. Each call splits [0, n) into one contiguous range per thread; callers give
 * every index's result to exactly one thread, so the result does not depend on the number
 * of threads. Threads are started per call: the ops that use it run for milliseconds, and
 * a start costs microseconds. */
#include <cblas.h>
#include <pthread.h>

#include "ops/ops_internal.h"

enum { MAX_THREADS = 64 };

typedef struct {
    void (*fn)(void *arg, size_t i0, size_t i1);
    void *arg;
    size_t i0, i1;
} range;

static void *run_range(void *p) {
    range *r = p;
    r->fn(r->arg, r->i0, r->i1);
    return NULL;
}

int cpu_threads(void) {
    int t = openblas_get_num_threads();
    return t < 1 ? 1 : t > MAX_THREADS ? MAX_THREADS : t;
}

void cpu_parallel_for(size_t n, size_t min_per_thread, void (*fn)(void *arg, size_t i0, size_t i1), void *arg) {
    size_t nt = (size_t)cpu_threads();
    if (min_per_thread < 1) min_per_thread = 1;
    if (nt > n / min_per_thread) nt = n / min_per_thread;
    if (nt <= 1) {
        if (n) fn(arg, 0, n);
        return;
    }
    range r[MAX_THREADS];
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (size_t t = 0; t < nt; t++) r[t] = (range){fn, arg, n * t / nt, n * (t + 1) / nt};
    /* thread 0's range runs here; a thread that cannot start runs here too */
    for (size_t t = 1; t < nt; t++) started[t] = pthread_create(&th[t], NULL, run_range, &r[t]) == 0;
    run_range(&r[0]);
    for (size_t t = 1; t < nt; t++) {
        if (started[t]) pthread_join(th[t], NULL);
        else run_range(&r[t]);
    }
}
