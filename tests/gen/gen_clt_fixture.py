#!/usr/bin/env python3
"""Reference fixtures for loupe's transcoder sets in circuit-tracer's layout
(host/sae/clt*.c, tests/test_clt.c).

Writes into OUTDIR (normally tests/fixtures/clt), for the shapes of
tests/fixtures/llama-tiny (2 layers, d_model 64), with d_transcoder 96:

  plt_relu_skip/    per-layer ReLU transcoders with W_skip   (TranscoderSet.to_safetensors)
  plt_jumprelu/     per-layer JumpReLU transcoders            (same)
  clt_relu/         a cross-layer transcoder, ReLU            (CrossLayerTranscoder.to_safetensors)
  clt_jumprelu/     a cross-layer transcoder, JumpReLU        (same)
                    each with the config.yaml circuit-tracer's cache writes (model_kind,
                    feature_input_hook "mlp.hook_in", feature_output_hook "mlp.hook_out",
                    scan, model_name)
  reference.safetensors
                    for each set NAME: NAME.x (F32 [L, N, D], layer l's inputs), NAME.pre
                    and NAME.encode (F64 [L, N, S]: encode_layer without and with the
                    activation), NAME.decode (F64 [L, N, D]: the set's decode of NAME.encode,
                    with the skip of NAME.x where there is one)
  loupe_written/NAME/, loupe_written/reference.safetensors
                    the sets as loupe re-wrote them (`LOUPE_WRITE_CLT_FIXTURE=1
                    build/test_clt`), loaded by circuit-tracer's own loaders and run on the
                    same inputs; this script asserts they give the reference outputs
                    (max abs difference 0, both in float64 from the same float32 values)
                    and records what circuit-tracer computed.

Every reference is computed in float64 by circuit-tracer 0.5.0 itself, on the sets it
loaded back from the files it wrote (load_transcoder_set / load_clt, dtype float64,
lazy_decoder both ways). Inputs are float32 rows picked so every pre-activation is at
least MARGIN from 0 and from its threshold, so a float32 engine activates the same features.

Pinned (requirements-circuit-tracer.txt). Offline; deterministic. From the repository root:
    python3 tests/gen/gen_clt_fixture.py tests/fixtures/clt --loupe-test build/test_clt
"""
import argparse
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import torch
import yaml
from safetensors.numpy import save_file as np_save_file

warnings.filterwarnings("ignore")

L, D, S, N = 2, 64, 96, 6
MARGIN = 2e-3
HOOK_IN, HOOK_OUT = "mlp.hook_in", "mlp.hook_out"
SETS = [("plt_relu_skip", "plt", False, True), ("plt_jumprelu", "plt", True, False),
        ("clt_relu", "clt", False, False), ("clt_jumprelu", "clt", True, False)]


def check_versions():
    import circuit_tracer
    if circuit_tracer.__version__ != "0.5.0":
        sys.exit(f"needs circuit-tracer 0.5.0 (have {circuit_tracer.__version__}): "
                 "pip install -r tests/gen/requirements-circuit-tracer.txt")


def write_config(path, kind, name):
    cfg = {"model_kind": "transcoder_set" if kind == "plt" else "cross_layer_transcoder",
           "feature_input_hook": HOOK_IN, "feature_output_hook": HOOK_OUT,
           "model_name": "llama-tiny", "scan": f"loupe-fixture/{name}"}
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.dump(cfg, f)


def rand(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).float()


def make_plt(path, gen, jump, skip):
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
    tcs = {}
    for l in range(L):
        act = JumpReLU(torch.rand(S, generator=gen) * 0.3 + 0.05, 0.1) if jump else torch.nn.functional.relu
        t = SingleLayerTranscoder(D, S, act, l, skip_connection=skip, device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            t.W_enc.copy_(rand(gen, S, D, scale=D ** -0.5))
            t.W_dec.copy_(rand(gen, S, D, scale=0.1))
            t.b_enc.copy_(rand(gen, S, scale=0.1))
            t.b_dec.copy_(rand(gen, D, scale=0.1))
            if skip:
                t.W_skip.copy_(rand(gen, D, D, scale=0.05))
        tcs[l] = t
    TranscoderSet(tcs, HOOK_IN, HOOK_OUT).to_safetensors(path)


def make_clt(path, gen, jump):
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
    c = CrossLayerTranscoder(L, S, D, activation_function="jump_relu" if jump else "relu", lazy_decoder=False,
                             device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        c.W_enc.copy_(rand(gen, L, S, D, scale=D ** -0.5))
        c.b_enc.copy_(rand(gen, L, S, scale=0.1))
        c.b_dec.copy_(rand(gen, L, D, scale=0.1))
        for i in range(L):
            c.W_dec[i].copy_(rand(gen, S, L - i, D, scale=0.1))
        if jump:
            c.activation_function.threshold.copy_(torch.rand(L, 1, S, generator=gen) * 0.3 + 0.05)
    c.to_safetensors(path)


def load(path, kind, lazy):
    """circuit-tracer's own loaders, float64."""
    dev, dt = torch.device("cpu"), torch.float64
    if kind == "plt":
        from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
        paths = {l: os.path.join(path, f"layer_{l}.safetensors") for l in range(L)}
        return load_transcoder_set(paths, "scan", HOOK_IN, HOOK_OUT, device=dev, dtype=dt, lazy_encoder=lazy,
                                   lazy_decoder=lazy)
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    return load_clt(path, HOOK_IN, HOOK_OUT, device=dev, dtype=dt, lazy_decoder=lazy)


def thresholds(ts, kind):
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    if kind == "plt":
        return [t.activation_function.threshold.detach().double() if isinstance(t.activation_function, JumpReLU) else None
                for t in ts]
    if isinstance(ts.activation_function, JumpReLU):
        return [ts.activation_function.threshold[l, 0].detach().double() for l in range(L)]
    return [None] * L


def pick_inputs(ts, kind, gen_np):
    """Rows of float32 inputs whose pre-activations keep MARGIN from every discontinuity."""
    thr = thresholds(ts, kind)
    x = np.zeros((L, N, D), np.float32)
    with torch.no_grad():
        for l in range(L):
            n = 0
            while n < N:
                row = gen_np.standard_normal(D).astype(np.float32)
                pre = ts.encode_layer(torch.from_numpy(row.astype(np.float64))[None], l,
                                      apply_activation_function=False)[0]
                bad = (pre.abs() < MARGIN).any() or (thr[l] is not None and ((pre - thr[l]).abs() < MARGIN).any())
                if not bad:
                    x[l, n] = row
                    n += 1
    return x


def run(ts, kind, x):
    xt = torch.from_numpy(x.astype(np.float64))
    with torch.no_grad():
        pre = torch.stack([ts.encode_layer(xt[l], l, apply_activation_function=False) for l in range(L)])
        f = torch.stack([ts.encode_layer(xt[l], l) for l in range(L)])
        if kind == "plt":
            y = ts.decode(f, xt if ts.skip_connection else None)
        else:
            y = ts.decode(f, None)
    return pre.numpy(), f.numpy(), y.numpy()


def record(ref, name, ts, kind, x):
    pre, f, y = run(ts, kind, x)
    ref[f"{name}.x"], ref[f"{name}.pre"], ref[f"{name}.encode"], ref[f"{name}.decode"] = x, pre, f, y
    # the CLT decoder really crosses layers: layer 1's output has layer 0's features in it
    assert (f > 0).sum() > 0 and (f == 0).sum() > 0, name
    return pre, f, y


def check_loupe_written(out, ref):
    base = os.path.join(out, "loupe_written")
    got = {}
    for name, kind, _, _ in SETS:
        with open(os.path.join(base, name, "config.yaml")) as fh:
            cfg = yaml.safe_load(fh)  # what circuit-tracer's cache loader reads
        with open(os.path.join(out, name, "config.yaml")) as fh:
            mine = yaml.safe_load(fh)
        for key in ("model_kind", "feature_input_hook", "feature_output_hook", "scan", "model_name"):
            if cfg.get(key) != mine[key]:
                sys.exit(f"loupe_written/{name}/config.yaml: {key} = {cfg.get(key)!r}, expected {mine[key]!r}")
        for lazy in (False, True):
            ts = load(os.path.join(base, name), kind, lazy)
            pre, f, y = run(ts, kind, ref[f"{name}.x"])
            for what, a in (("pre", pre), ("encode", f), ("decode", y)):
                d = float(np.abs(a - ref[f"{name}.{what}"]).max())
                if d != 0.0:
                    sys.exit(f"loupe_written/{name}: circuit-tracer's {what} differs from the reference by {d:g}")
        got[f"{name}.pre"], got[f"{name}.encode"], got[f"{name}.decode"] = pre, f, y
        print(f"loupe_written/{name}: circuit-tracer loads it; encode and decode identical to the reference")
    np_save_file(got, os.path.join(base, "reference.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--loupe-test", help="build/test_clt: run it to write loupe_written/ first")
    args = ap.parse_args()
    check_versions()
    out = args.outdir
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(1313)
    gen_np = np.random.default_rng(1313)
    ref = {}
    for name, kind, jump, skip in SETS:
        path = os.path.join(out, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        (make_plt(path, gen, jump, skip) if kind == "plt" else make_clt(path, gen, jump))
        write_config(path, kind, name)
        ts = load(path, kind, False)
        x = pick_inputs(ts, kind, gen_np)
        _, _, y = record(ref, name, ts, kind, x)
        _, _, y_lazy = run(load(path, kind, True), kind, x)
        assert np.array_equal(y, y_lazy), name
    np_save_file(ref, os.path.join(out, "reference.safetensors"))
    if args.loupe_test:
        env = dict(os.environ, LOUPE_WRITE_CLT_FIXTURE="1")
        subprocess.run([args.loupe_test, "--filter", "clt/loupe_written"], check=True, env=env)
    if os.path.isdir(os.path.join(out, "loupe_written", SETS[0][0])):
        check_loupe_written(out, ref)
    else:
        print("loupe_written/ absent: run with --loupe-test build/test_clt to record it")
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
