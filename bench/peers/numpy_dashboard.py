#!/usr/bin/env python3
"""A numpy baseline for build/bench_dashboard: the same dashboards (every latent's firing
count, maximum, 64-bin linear histogram, top 20 activations with 16 + 4 tokens of context
and their activations, 5 samples from each of 16 activation bands, top and bottom 10
logits of the decoder direction and a 40-bin logit histogram) over the same store, SAE and
unembedding, written by `build/bench_dashboard --keep DIR`. Run with the same threads:

    OPENBLAS_NUM_THREADS=2 build/bench_dashboard --keep /tmp/dash
    OPENBLAS_NUM_THREADS=2 python3 bench/peers/numpy_dashboard.py /tmp/dash

It is a vectorised brute force, not SAEDashboard (which needs torch, TransformerLens and a
model forward per batch): one pass encodes the store in batches of 4096 tokens (GEMM,
argpartition top-k) and keeps every nonzero activation (token, latent, value); the
statistics then come from sorts over those triplets. It prints the total of nonzero
activations and the latents that never fire, which bench_dashboard prints too (they must
agree: same data, same SAE). Needs numpy only.
"""
import json
import os
import struct
import sys
import time

import numpy as np

HOOK = "blocks.0.hook_resid_post"
TOP, LEFT, RIGHT, SAMPLES, NLOG, BINS, PER_BAND, LBINS = 20, 16, 4, 5, 10, 64, 4, 40


def st_open(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        raw = mm[8 + n + a: 8 + n + b]
        if v["dtype"] == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.view({"F32": np.float32, "I32": np.int32}[v["dtype"]])
        out[k] = arr.reshape(v["shape"])
    return out


def splitmix(x):
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def group_rank(keys_sorted):
    """Rank of each element within its run of equal keys (keys already sorted)."""
    start = np.r_[0, np.flatnonzero(keys_sorted[1:] != keys_sorted[:-1]) + 1]
    run = np.repeat(start, np.diff(np.r_[start, len(keys_sorted)]))
    return np.arange(len(keys_sorted)) - run


def main(d):
    cfg = json.load(open(os.path.join(d, "sae", "cfg.json")))
    w = st_open(os.path.join(d, "sae", "sae_weights.safetensors"))
    W_enc, b_enc, W_dec, b_dec = (np.ascontiguousarray(w[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    S, k = cfg["d_sae"], cfg["k"]
    shards = sorted(f for f in os.listdir(os.path.join(d, "store")) if f.startswith("shard-"))
    t_start, c_start = time.time(), time.process_time()
    toks, T, L, A = [], [], [], []
    t0 = 0
    for sh in shards:
        st = st_open(os.path.join(d, "store", sh))
        x_all, tk = st[HOOK], st["tokens"]
        ctx = tk.shape[1]
        toks.append(np.array(tk).reshape(-1))
        x_all = x_all.reshape(-1, x_all.shape[-1])
        for b0 in range(0, len(x_all), 4096):
            x = x_all[b0: b0 + 4096] - b_dec
            pre = x @ W_enc + b_enc
            idx = np.argpartition(-pre, k - 1, axis=1)[:, :k]
            val = np.maximum(np.take_along_axis(pre, idx, axis=1), 0)
            nz = val > 0
            T.append((np.arange(len(x))[:, None] + t0 + b0).repeat(k, 1)[nz])
            L.append(idx[nz].astype(np.int32))
            A.append(val[nz])
        t0 += len(x_all)
    toks = np.concatenate(toks)
    T, L, A = np.concatenate(T), np.concatenate(L), np.concatenate(A)
    t_pass = time.time() - t_start
    # per latent, by value descending then token
    o = np.lexsort((T, -A, L))
    T, L, A = T[o], L[o], A[o]
    fires = np.bincount(L, minlength=S)
    first = np.r_[0, np.cumsum(fires)[:-1]]
    mx = np.zeros(S, np.float32)
    mx[fires > 0] = A[first[fires > 0]]
    e = np.frexp(np.where(mx > 0, mx, 1))[1] - 6
    bins = np.minimum(np.floor(np.ldexp(A.astype(np.float64), -e[L])).astype(np.int64), BINS - 1)
    hist = np.bincount(L.astype(np.int64) * BINS + bins, minlength=S * BINS).reshape(S, BINS)
    rank = group_rank(L)
    top = np.flatnonzero(rank < TOP)
    # band samples: the SAMPLES smallest hashes per (latent, band)
    h = splitmix(T.astype(np.uint64))
    band = L.astype(np.int64) * 16 + bins // PER_BAND
    ob = np.lexsort((T, h, band))
    pick = ob[group_rank(band[ob]) < SAMPLES]
    ex = np.r_[top, pick]
    # contexts: each example's window, that latent's activation at each position
    keys = T.astype(np.int64) * S + L
    ko = np.argsort(keys)
    ks = keys[ko]
    pos = T[ex] % ctx
    offs = np.arange(-LEFT, RIGHT + 1)
    wt = T[ex][:, None] + offs
    inside = (pos[:, None] + offs >= 0) & (pos[:, None] + offs < ctx)
    q = np.where(inside, wt, 0) * S + L[ex][:, None]
    j = np.minimum(np.searchsorted(ks, q), len(ks) - 1)
    ctx_acts = np.where(inside & (ks[j] == q), A[ko[j]], 0)
    ctx_toks = np.where(inside, toks[np.where(inside, wt, 0)], -1)
    # logits
    u = st_open(os.path.join(d, "unembed.safetensors"))
    W_U, ln = np.ascontiguousarray(u["W_U"]), u["ln_final_w"]
    pos_ids = np.zeros((S, NLOG), np.int64)
    neg_ids = np.zeros((S, NLOG), np.int64)
    lhist = np.zeros((S, LBINS), np.int64)
    for c0 in range(0, S, 64):
        lg = ((W_dec[c0: c0 + 64] * ln) @ W_U.T).astype(np.float64)
        lg -= lg.mean(1, keepdims=True)
        pos_ids[c0: c0 + 64] = np.argpartition(-lg, NLOG, axis=1)[:, :NLOG]
        neg_ids[c0: c0 + 64] = np.argpartition(lg, NLOG, axis=1)[:, :NLOG]
        lo, hi = lg.min(1, keepdims=True), lg.max(1, keepdims=True)
        b = np.minimum(((lg - lo) / (hi - lo) * LBINS).astype(np.int64), LBINS - 1)
        lhist[c0: c0 + 64] = np.stack([np.bincount(r, minlength=LBINS) for r in b])
    total, cpu = time.time() - t_start, time.process_time() - c_start
    assert ctx_acts.shape == ctx_toks.shape and hist.sum() == fires.sum()
    print(f"numpy dashboards: {S} latents over {len(toks)} tokens (threads "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'default')}): pass {t_pass:.2f} s, all {total:.2f} s: "
          f"{S / total:.0f} latents/s, {len(toks) / total:.0f} tokens/s; {int(fires.sum())} nonzero activations, "
          f"{int((fires == 0).sum())} latents never fire")
    print(f"CPU time of the whole run, all threads: {cpu:.2f} s ({S / cpu:.0f} latents per CPU-second)")


if __name__ == "__main__":
    main(sys.argv[1])
