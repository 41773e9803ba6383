/* mpitest.h: how the tests launch ranks. One BLAS thread per rank (a multi-threaded GEMM sums
 * in another order, and mpirun gives each rank one core); ranks yield while they wait, so an
 * oversubscribed machine still moves. OpenMPI's own start and shutdown leave allocations
 * LeakSanitizer reports (a bare MPI_Init/MPI_Finalize program does too): leak checks are off
 * for the ranks of a SAN build, every other sanitizer check stays on. */
#ifndef LOUPE_TESTS_MPITEST_H
#define LOUPE_TESTS_MPITEST_H

#define MPIRUN                                                                                                      \
    "mpirun --allow-run-as-root --oversubscribe --mca mpi_yield_when_idle 1 -x OPENBLAS_NUM_THREADS -x OMP_NUM_THREADS " \
    "-x ASAN_OPTIONS=detect_leaks=0 "

#endif
