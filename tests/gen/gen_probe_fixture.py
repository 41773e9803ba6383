"""Reference fixtures for linear probes (tests/test_probe.c), from scikit-learn.

Synthetic activations (200 rows x 24 dims, float32, a planted direction / planted class
centroids plus noise) and, for each task, scikit-learn's LogisticRegression (lbfgs,
tol 1e-10) coefficients, intercepts, test probabilities, accuracy and roc_auc_score, and
numpy's difference-of-means probe. The train/test split and the folds are loupe's own
(splitmix64 Fisher-Yates over the sequences, reimplemented below), so the CLI's output
on a store made of these rows can be checked against the same numbers.

Tasks (prefix of every tensor):
  bin   200 sequences x 1 position, 2 classes, C = 1
  binc  the same rows and labels, C = 0.05
  multi 200 x 1, 3 classes, C = 0.5
  tok   the 200 rows as 50 sequences x 4 positions, per-token binary labels with some -1
  pool  50 x 4, one 3-class label per sequence, the mean over positions
  ties  a binary score with many ties and roc_auc_score on it

Run from the repository root: python tests/gen/gen_probe_fixture.py tests/fixtures/probe
(versions pinned in tests/gen/requirements-probe.txt)."""
import os
import sys

import numpy as np
from safetensors.numpy import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

M64 = (1 << 64) - 1


def splitmix64(state):
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def loupe_split(n_seq, folds, test_frac, seed):
    """host/analysis/probe_run.c lp_probe_split: fold of each sequence, or 1 = test / 0 = train."""
    perm = list(range(n_seq))
    s = seed
    for i in range(n_seq - 1, 0, -1):
        s, r = splitmix64(s)
        j = r % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    n_test = min(max(int(np.floor(test_frac * n_seq + 0.5)), 1), n_seq - 1)
    assign = np.zeros(n_seq, dtype=np.int32)
    for i, q in enumerate(perm):
        assign[q] = (i * folds) // n_seq if folds > 0 else int(i < n_test)
    return assign


def diffmean(x, y, k):
    rows = [1] if k == 2 else range(k)
    d, b = [], []
    for c in rows:
        mu, rest = x[y == c].mean(0), x[y != c].mean(0)
        d.append(mu - rest)
        b.append(-(mu - rest) @ (0.5 * (mu + rest)))
    return np.array(d), np.array(b)


def auroc(scores, y, k):
    if k == 2:
        return roc_auc_score(y == 1, scores[:, -1])
    return np.mean([roc_auc_score(y == c, scores[:, c]) for c in range(k)])


def accuracy(scores, y, k):
    pred = (scores[:, 0] > 0).astype(int) if k == 2 else scores.argmax(1)
    return np.mean(pred == y)


def fit(out, name, x, y, seq, assign, k, C):
    """sklearn on the rows whose sequence is in the training split; metrics on the rest."""
    tr, te = assign[seq] == 0, assign[seq] == 1
    lr = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(x[tr], y[tr])
    assert list(lr.classes_) == list(range(k)), lr.classes_
    proba = lr.predict_proba(x[te])
    out[f"{name}.coef"] = lr.coef_.astype(np.float64)
    out[f"{name}.intercept"] = lr.intercept_.astype(np.float64)
    out[f"{name}.proba"] = proba
    out[f"{name}.accuracy"] = np.array([np.mean(lr.predict(x[te]) == y[te])])
    if k == 2:
        out[f"{name}.auroc"] = np.array([roc_auc_score(y[te], proba[:, 1])])
    else:
        out[f"{name}.auroc"] = np.array([roc_auc_score(y[te], proba, multi_class="ovr", average="macro")])
    dd, db = diffmean(x[tr], y[tr], k)
    s = x[te] @ dd.T + db
    out[f"{name}.dm_dir"], out[f"{name}.dm_bias"] = dd, db
    out[f"{name}.dm_accuracy"] = np.array([accuracy(s, y[te], k)])
    out[f"{name}.dm_auroc"] = np.array([auroc(s, y[te], k)])
    out[f"{name}.n_iter"] = np.array([float(lr.n_iter_[0])])


def folds(out, name, x, y, seq, n_seq, k, C, n_folds):
    assign = loupe_split(n_seq, n_folds, 0.0, 0)
    acc, auc = [], []
    for f in range(n_folds):
        tr, te = assign[seq] != f, assign[seq] == f
        lr = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(x[tr], y[tr])
        acc.append(np.mean(lr.predict(x[te]) == y[te]))
        auc.append(roc_auc_score(y[te], lr.predict_proba(x[te])[:, 1]))
    out[f"{name}.fold_accuracy"], out[f"{name}.fold_auroc"] = np.array(acc), np.array(auc)


def main(outdir):
    os.makedirs(outdir, exist_ok=True)
    rng = np.random.default_rng(0)
    n, d = 200, 24
    u = rng.normal(size=d)
    x32 = (rng.normal(size=(n, d)) * 1.5).astype(np.float32)
    y2 = (x32 @ u + rng.normal(size=n) * 3.0 > 0).astype(np.int32)
    cent = rng.normal(size=(3, d)).astype(np.float32)
    y3 = rng.integers(0, 3, size=n).astype(np.int32)
    x3_32 = (x32 + cent[y3] * 0.8).astype(np.float32)
    x, x3 = x32.astype(np.float64), x3_32.astype(np.float64)
    out = {"x": x32, "x3": x3_32, "y2": y2, "y3": y3}
    seq200 = np.arange(n)
    a200 = loupe_split(n, 0, 0.2, 0)
    out["split200"] = a200
    fit(out, "bin", x, y2, seq200, a200, 2, 1.0)
    fit(out, "binc", x, y2, seq200, a200, 2, 0.05)
    fit(out, "multi", x3, y3, seq200, a200, 3, 0.5)
    folds(out, "bin", x, y2, seq200, n, 2, 1.0, 5)

    # per-token: x as [50, 4, 24], labels [50, 4], some -1 (no label)
    ytok = y2.reshape(50, 4).copy()
    ytok[(np.arange(200).reshape(50, 4) * 7) % 11 == 0] = -1
    keep = ytok.reshape(-1) >= 0
    seq_tok = np.repeat(np.arange(50), 4)[keep]
    a50 = loupe_split(50, 0, 0.2, 0)
    out["tok.labels"], out["split50"] = ytok.astype(np.int32), a50
    fit(out, "tok", x[keep], y2[keep], seq_tok, a50, 2, 1.0)

    # per-sequence labels on the mean over positions
    ypool = y3.reshape(50, 4)[:, 0].copy()
    xpool = x3_32.reshape(50, 4, d).astype(np.float64).mean(1)
    out["pool.labels"] = ypool.astype(np.int32)
    fit(out, "pool", xpool, ypool, np.arange(50), a50, 3, 1.0)

    # ties: scores rounded to one decimal
    ts = np.round(rng.normal(size=60), 1)
    ty = (ts + rng.normal(size=60) > 0).astype(np.int32)
    out["ties.score"], out["ties.y"] = ts, ty
    out["ties.auroc"] = np.array([roc_auc_score(ty, ts)])

    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, os.path.join(outdir, "probe.safetensors"))
    # label files as the CLI reads them
    np.save(os.path.join(outdir, "labels_bin.npy"), y2.astype(np.int64))
    np.save(os.path.join(outdir, "labels_multi.npy"), y3.astype(np.int8))
    np.save(os.path.join(outdir, "labels_tok.npy"), ytok.astype(np.int32))
    np.save(os.path.join(outdir, "labels_float.npy"), y2.astype(np.float32))
    for k in ("bin", "binc", "multi", "tok", "pool"):
        print(f"{k}: accuracy {out[k + '.accuracy'][0]:.3f} auroc {out[k + '.auroc'][0]:.4f} "
              f"diffmean accuracy {out[k + '.dm_accuracy'][0]:.3f} auroc {out[k + '.dm_auroc'][0]:.4f} "
              f"sklearn iterations {int(out[k + '.n_iter'][0])}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/probe")
