#!/usr/bin/env python3
"""scikit-learn's LogisticRegression (lbfgs, L2) per layer on build/bench_probe's data, for
the ratio beside loupe's logistic-probe training time. bench_probe runs it itself when
scikit-learn is installed (tests/gen/requirements-probe.txt); by hand:

    python3 bench/peers/sklearn_probe.py --x X.npy --y Y.npy --C 1 --tol 1e-6 --threads 2

X is float32 [layers, N, d], Y int32 [layers, N]. Each layer's X is converted to float64
before the clock starts (loupe also fits in double precision), and only .fit() is timed.
Both solvers stop when the largest gradient entry of (mean log-loss + ||w||^2 / (2 C N))
falls below tol; BLAS threads are limited to --threads with threadpoolctl, and sklearn's
own loss loops get the same n_threads through OpenMP (OMP_NUM_THREADS)."""
import argparse
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--x", required=True)
    ap.add_argument("--y", required=True)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--loupe-seconds", type=float, default=0.0, help="loupe's mean time per layer, for the ratio")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import numpy as np
    import sklearn
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    X, Y = np.load(a.x), np.load(a.y)
    print(f"scikit-learn {sklearn.__version__}: LogisticRegression(lbfgs, C {a.C:g}, tol {a.tol:g}), {a.threads} thread(s)")
    total = 0.0
    with threadpool_limits(limits=a.threads):
        for l in range(X.shape[0]):
            x, y = X[l].astype(np.float64), Y[l]
            lr = LogisticRegression(C=a.C, tol=a.tol, max_iter=10000)
            t0 = time.perf_counter()
            lr.fit(x, y)
            t = time.perf_counter() - t0
            total += t
            print(f"  layer {l}: {t:.3f} s, {int(lr.n_iter_[0])} iterations")
    mean = total / X.shape[0]
    print(f"scikit-learn: {mean:.3f} s per layer (mean of {X.shape[0]})")
    if a.loupe_seconds > 0:
        print(f"loupe / scikit-learn time per layer: {a.loupe_seconds / mean:.2f}x ({mean / a.loupe_seconds:.2f}x faster)")


if __name__ == "__main__":
    main()
