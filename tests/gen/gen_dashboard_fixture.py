#!/usr/bin/env python3
"""Reference fixture for `loupe dashboard` (tests/test_dashboard.c), by brute force in numpy.

Writes into OUT (tests/fixtures/dashboard):
  store/shard-00000.safetensors, shard-00001.safetensors   a tiny activation store: "tokens"
        (I32 [n_seq, 16]) and "blocks.0.hook_resid_post" (F32 [n_seq, 16, 8]); 7 + 5 sequences
  sae_standard/, sae_jumprelu/, sae_topk/   SAELens layout (cfg.json + sae_weights.safetensors)
  unembed.safetensors   W_U (F32 [128, 8], row v = token v) and ln_final_w (F32 [8])
  expected.json         per case: the options and, per latent, what lp_dash_run must give

Every number is a small dyadic rational (activations multiples of 1/4, weights multiples of
1/8), so every dot product is exact in float32 whatever the summation order: OpenBLAS and
numpy agree bit for bit, ties are real, and the comparison can be exact.

The conventions checked (see include/loupe/dashboard.h):
  top activations: value descending, ties by token index ascending;
  histogram: nonzero activations in linear bins of width 2^e, e = frexp(max)[1] - 6,
    bin = floor(v / 2^e); n_bins = floor(max / 2^e) + 1;
  bands of 4 bins; samples: the `samples` smallest splitmix64(token ^ seed) (ties by token),
    shown value descending, ties by token;
  contexts: positions [pos - left, pos + right] clipped to the sequence;
  logits: (W_dec[s] * ln_final_w) @ W_U.T in float32; tables on those raw values (ties:
    lower id first), values and histogram after removing the mean over the vocabulary (float64),
    40 bins over [min, max].
Usage: python3 tests/gen/gen_dashboard_fixture.py tests/fixtures/dashboard   (numpy only)
"""
import json
import os
import struct
import sys

import numpy as np

HOOK = "blocks.0.hook_resid_post"
N_SEQ, CTX, D, S, V = 12, 16, 8, 12, 128
BINS, PER_BAND, LOGIT_BINS = 64, 4, 40
M64 = (1 << 64) - 1


def save_st(path, tensors):
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        dt = {np.dtype("float32"): "F32", np.dtype("int32"): "I32"}[arr.dtype]
        b = arr.tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def splitmix(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def make_sae(rng, arch):
    W_enc = (rng.integers(-8, 9, size=(D, S)) / 8).astype(np.float32)
    b_enc = (rng.integers(-4, 5, size=S) / 8).astype(np.float32)
    W_dec = (rng.integers(-8, 9, size=(S, D)) / 8).astype(np.float32)
    b_dec = (rng.integers(-2, 3, size=D) / 4).astype(np.float32)
    p = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    cfg = {"architecture": arch, "d_in": D, "d_sae": S, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": arch != "jumprelu", "normalize_activations": "none",
           "metadata": {"model_name": "tiny", "hook_name": HOOK, "context_size": CTX}}
    if arch == "standard":
        b_enc[11] = -100  # a latent that never fires
    if arch == "jumprelu":
        p["threshold"] = (rng.integers(0, 9, size=S) / 4).astype(np.float32)
    if arch == "topk":
        cfg["k"] = 3
    return cfg, p


def encode(cfg, p, x):
    xin = x - p["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = (xin @ p["W_enc"] + p["b_enc"]).astype(np.float32)
    if cfg["architecture"] == "standard":
        return np.maximum(pre, 0)
    if cfg["architecture"] == "jumprelu":
        return np.maximum(pre, 0) * (pre > p["threshold"])
    f = np.zeros_like(pre)  # topk: the k largest (ties: lower index first), relu'd
    for n in range(pre.shape[0]):
        order = sorted(range(S), key=lambda s: (-pre[n, s], s))[: cfg["k"]]
        f[n, order] = np.maximum(pre[n, order], 0)
    return f


def example(f, toks, t, s, left, right):
    pos = t % CTX
    a, b = max(0, pos - left), min(CTX - 1, pos + right)
    base = t - pos
    return [int(t), float(f[t, s]), a, [int(toks[base + q]) for q in range(a, b + 1)],
            [float(f[base + q, s]) for q in range(a, b + 1)]]


def latent(f, toks, s, o, W_dec, W_U, ln_w):
    t_all = np.arange(f.shape[0])
    a = f[:, s]
    nz = [int(t) for t in t_all if t % CTX >= o["skip_positions"] and a[t] > 0]
    r = {"latent": s, "fires": len(nz)}
    if nz:
        mx = float(max(a[t] for t in nz))
        e = int(np.frexp(np.float32(mx))[1]) - 6
        bins = {t: int(np.floor(np.ldexp(np.float64(a[t]), -e))) for t in nz}
        hist = np.bincount(list(bins.values()), minlength=BINS)
        n_bins = int(np.floor(np.ldexp(np.float64(mx), -e))) + 1
        top = sorted(nz, key=lambda t: (-a[t], t))[: o["top"]]
        bands = []
        for b in range((n_bins + PER_BAND - 1) // PER_BAND):
            members = [t for t in nz if bins[t] // PER_BAND == b]
            pick = sorted(members, key=lambda t: (splitmix(t ^ o["seed"]), t))[: o["samples"]]
            pick = sorted(pick, key=lambda t: (-a[t], t))
            bands.append([float(np.ldexp(b * PER_BAND, e)), float(np.ldexp((b + 1) * PER_BAND, e)), len(members),
                          [example(f, toks, t, s, o["left"], o["right"]) for t in pick]])
        r.update(max=mx, hist_exp=e, n_bins=n_bins, hist=[int(h) for h in hist[:n_bins]],
                 top=[example(f, toks, t, s, o["left"], o["right"]) for t in top], bands=bands)
    else:
        r.update(max=0.0, n_bins=0, hist=[], top=[], bands=[])
    row = ((W_dec[s] * ln_w).astype(np.float32) @ W_U.T).astype(np.float32)
    n = o["n_logits"]
    pos_ids = sorted(range(V), key=lambda v: (-row[v], v))[:n]
    neg_ids = sorted(range(V), key=lambda v: (row[v], v))[:n]
    c = row.astype(np.float64) - row.astype(np.float64).sum() / V
    lo, hi = c.min(), c.max()
    lb = np.minimum(((c - lo) / (hi - lo) * LOGIT_BINS).astype(np.int64), LOGIT_BINS - 1)
    r.update(pos_ids=pos_ids, pos_vals=[float(np.float32(c[v])) for v in pos_ids], neg_ids=neg_ids,
             neg_vals=[float(np.float32(c[v])) for v in neg_ids], logit_lo=float(np.float32(lo)),
             logit_hi=float(np.float32(hi)), logit_hist=[int(x) for x in np.bincount(lb, minlength=LOGIT_BINS)])
    return r


def main(out):
    rng = np.random.default_rng(20261207)
    os.makedirs(os.path.join(out, "store"), exist_ok=True)
    toks = rng.integers(0, V, size=(N_SEQ, CTX)).astype(np.int32)
    # a sequence spelling markup in the GPT-2 byte vocabulary ('!' is id 0): the page must escape it
    toks[3, :16] = [ord(ch) - 33 for ch in "</script><b>&a\"'"]
    x = (rng.integers(-8, 9, size=(N_SEQ, CTX, D)) / 4).astype(np.float32)
    x[::3] *= 4  # a wider range of activations, so histograms widen while the pass runs
    save_st(os.path.join(out, "store", "shard-00000.safetensors"), {"tokens": toks[:7], HOOK: x[:7]})
    save_st(os.path.join(out, "store", "shard-00001.safetensors"), {"tokens": toks[7:], HOOK: x[7:]})
    W_U = (rng.integers(-8, 9, size=(V, D)) / 8).astype(np.float32)
    ln_w = (rng.integers(1, 9, size=D) / 4).astype(np.float32)
    save_st(os.path.join(out, "unembed.safetensors"), {"W_U": W_U, "ln_final_w": ln_w})
    cases = [
        ("standard", dict(latents=[0, 2, 3, 5, 7, 8, 11], top=5, left=3, right=2, samples=2, n_logits=4,
                          skip_positions=1, seed=7, batch_tokens=32)),
        ("jumprelu", dict(latents=[1, 4, 6, 9, 10], top=4, left=2, right=3, samples=3, n_logits=3,
                          skip_positions=0, seed=0, batch_tokens=48)),
        ("topk", dict(latents=list(range(S)), top=6, left=4, right=1, samples=2, n_logits=5,
                      skip_positions=0, seed=123, batch_tokens=16)),
    ]
    expected = {"n_seq": N_SEQ, "ctx": CTX, "cases": []}
    flat_x, flat_t = x.reshape(-1, D), toks.reshape(-1)
    for arch, o in cases:
        cfg, p = make_sae(rng, arch)
        d = os.path.join(out, "sae_" + arch)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "cfg.json"), "w") as fh:
            json.dump(cfg, fh, indent=1)
        save_st(os.path.join(d, "sae_weights.safetensors"), p)
        f = encode(cfg, p, flat_x)
        lats = [latent(f, flat_t, s, o, p["W_dec"], W_U, ln_w) for s in o["latents"]]
        expected["cases"].append({"sae": "sae_" + arch, "opts": o, "latents": lats})
    with open(os.path.join(out, "expected.json"), "w") as fh:
        json.dump(expected, fh, separators=(",", ":"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/dashboard")
