#!/usr/bin/env python3
"""Reference fixtures for loupe's SAE files (host/sae/sae.c, tests/test_sae_io.c).

Writes into OUTDIR (normally tests/fixtures/sae):

  saelens_standard/, saelens_topk/, saelens_jumprelu/, saelens_skip_transcoder/,
  saelens_jumprelu_transcoder/   SAEs written by SAELens's own SAE.save_model
  saelens_v5_topk/               the topk weights with a cfg.json in the flat pre-6.0
                                 layout (checked here to load in SAELens to the same SAE)
  gemmascope_npz/params.npz, gemmascope_st/params.safetensors,
  gemmascope_compressed/params.npz
                                 Gemma Scope layouts (np.savez; safetensors with the
                                 lowercase w_enc/w_dec of Gemma Scope 2; savez_compressed,
                                 which loupe refuses)
  sparsify/layers.3/, sparsify/layers.3.mlp/, sparsify/config.json
                                 written by EleutherAI sparsify's SparseCoder.save_to_disk
                                 and RunConfig.save_json (an SAE; a transcoder with a skip)
  reference.safetensors          for each SAE NAME: NAME.x (F32 [8, d_in], the inputs),
                                 NAME.encode (F64 [8, d_sae]), NAME.decode (F64 [8, d_out],
                                 the decode of NAME.encode), and for transcoders NAME.forward
                                 (F64, skip connection included)
  loupe_written/reference.safetensors
                                 the same for the SAEs loupe wrote into loupe_written/ (by
                                 `LOUPE_WRITE_SAE_FIXTURE=1 build/test_sae_io`), as SAELens
                                 loads and runs them

Every reference output is computed in float64 by the project's own code (SAELens
SAE.load_from_disk(dtype="float64") .encode/.decode/.forward; sparsify SparseCoder in
float64 .encode/.decode/.forward; Gemma Scope: the JumpReLU of its tutorial, in numpy,
cross-checked against SAELens's JumpReLUSAE). The float32 inputs are chosen so that every
discontinuity is at least MARGIN away (jumprelu: |pre - threshold|; topk: the gap between
the k-th and (k+1)-th pre-activation), so a float32 engine selects the same latents.

Pinned (requirements-sae.txt): sae-lens==6.5.3 (the newest whose dependencies allow
torch 2.5.1: later releases need transformer-lens >= 2.16, which needs torch >= 2.6),
transformer-lens==2.15.4, eai-sparsify==1.3.3, torch==2.5.1, numpy==1.26.4,
safetensors==0.4.5, transformers==4.46.3, pyarrow==18.1.0 (newer pyarrow needs numpy 2).
Install the pins:
    pip install -r tests/gen/requirements-sae.txt

Usage, from the repository root (deterministic: a second run writes identical files):
    python3 tests/gen/gen_sae_fixture.py tests/fixtures/sae --loupe-test build/test_sae_io
--loupe-test first runs the test binary with LOUPE_WRITE_SAE_FIXTURE=1 so that loupe
writes loupe_written/, then records SAELens's outputs on it.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file

warnings.filterwarnings("ignore")

import sae_lens  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.saes.transcoder import (  # noqa: E402
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
)
os.environ["SPARSIFY_DISABLE_TRITON"] = "1"  # its Triton decoder needs a GPU; the eager one is the reference
import sparsify  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402
from sparsify.__main__ import RunConfig  # noqa: E402

PINS = {"sae_lens": "6.5.3", "torch": "2.5.1", "numpy": "1.26.4"}
N_ROWS = 8
MARGIN = 1e-3

torch.set_num_threads(1)


def check_versions():
    got = {"sae_lens": sae_lens.__version__, "torch": torch.__version__.split("+")[0], "numpy": np.__version__}
    for k, v in PINS.items():
        if got[k] != v:
            sys.exit(f"{k} {got[k]} installed, the fixtures are pinned to {v}: see tests/gen/requirements-sae.txt")
    from importlib.metadata import version

    if version("eai-sparsify") != "1.3.3":
        sys.exit("eai-sparsify 1.3.3 expected")


def metadata(hook, hook_out=None):
    md = dict(model_name="gpt2", hook_name=hook, context_size=128)
    if hook_out:
        md["hook_name_out"] = hook_out
    return SAEMetadata(**md)


def randomize(sae, gen, d_in, d_sae, d_out):
    """Weights far from SAELens's init, so that orientation mistakes show."""
    sd = {
        "W_enc": torch.randn(d_in, d_sae, generator=gen) / d_in**0.5,
        "b_enc": torch.randn(d_sae, generator=gen) * 0.3,
        "W_dec": torch.randn(d_sae, d_out, generator=gen) * 0.3,
        "b_dec": torch.randn(d_out, generator=gen) * 0.3,
    }
    names = set(sae.state_dict().keys())
    if "threshold" in names:
        sd["threshold"] = torch.rand(d_sae, generator=gen) * 0.8 + 0.2
    if "W_skip" in names:
        sd["W_skip"] = torch.randn(d_out, d_in, generator=gen) * 0.2
    assert set(sd) == names, (set(sd), names)
    sae.load_state_dict({k: v.float() for k, v in sd.items()})


def margins_ok(pre, arch, k=None, threshold=None):
    """pre: float64 [n, d_sae]; True per row whose latent selection is robust."""
    if arch == "jumprelu":
        return (np.abs(pre - threshold[None, :]) > MARGIN).all(axis=1)
    if arch == "topk":
        s = -np.sort(-pre, axis=1)
        return (s[:, k - 1] - s[:, k]) > MARGIN
    return np.ones(pre.shape[0], dtype=bool)


def pick_rows(gen_np, d_in, pre_fn, arch, **kw):
    """N_ROWS float32 inputs ~ N(0, 1) whose selection is robust (deterministic)."""
    rows = []
    while len(rows) < N_ROWS:
        x = gen_np.standard_normal((64, d_in)).astype(np.float32)
        ok = margins_ok(pre_fn(x.astype(np.float64)), arch, **kw)
        rows.extend(x[ok])
    return np.stack(rows[:N_ROWS])


def saelens_pre(sae):
    def f(x):
        with torch.no_grad():
            xin = torch.from_numpy(x)
            if getattr(sae.cfg, "apply_b_dec_to_input", False):
                xin = xin - sae.b_dec
            return (xin @ sae.W_enc + sae.b_enc).numpy()

    return f


def saelens_arch_kind(sae):
    a = sae.cfg.architecture()
    if "jumprelu" in a:
        return "jumprelu", dict(threshold=sae.threshold.detach().numpy())
    if "topk" in a:
        return "topk", dict(k=sae.cfg.k)
    return "standard", {}


def record_saelens(ref, name, path, gen_np, transcoder):
    """Loads the SAE at path with SAELens in float64 and records its outputs on robust inputs."""
    sae = SAE.load_from_disk(path, device="cpu", dtype="float64")
    sae.eval()
    if getattr(sae, "W_skip", None) is not None:
        # SAELens 6.5.3's SkipTranscoder creates W_skip without the config's dtype, so
        # load_from_disk(dtype="float64") leaves it float32 (loaded exactly from the
        # float32 file) and forward() fails on mixed dtypes: widen it (exact).
        sae.W_skip.data = sae.W_skip.data.double()
    kind, kw = saelens_arch_kind(sae)
    x = pick_rows(gen_np, sae.cfg.d_in, saelens_pre(sae), kind, **kw)
    with torch.no_grad():
        xt = torch.from_numpy(x.astype(np.float64))
        f = sae.encode(xt)
        ref[f"{name}.x"] = x
        ref[f"{name}.encode"] = f.numpy().astype(np.float64)
        ref[f"{name}.decode"] = sae.decode(f).numpy().astype(np.float64)
        if transcoder:
            ref[f"{name}.forward"] = sae.forward(xt).numpy().astype(np.float64)
    assert (ref[f"{name}.encode"] > 0).sum(axis=1).min() > 0, f"{name}: a row with no active latent"
    return sae


def write_saelens(out, ref, gen, gen_np):
    specs = [
        ("saelens_standard", StandardSAE, StandardSAEConfig(d_in=16, d_sae=64, apply_b_dec_to_input=True,
                                                            metadata=metadata("blocks.1.hook_resid_post")), False),
        ("saelens_topk", TopKSAE, TopKSAEConfig(d_in=24, d_sae=64, k=4, apply_b_dec_to_input=True,
                                                metadata=metadata("blocks.2.hook_resid_post")), False),
        ("saelens_jumprelu", JumpReLUSAE, JumpReLUSAEConfig(d_in=32, d_sae=64, apply_b_dec_to_input=False,
                                                            metadata=metadata("blocks.0.hook_mlp_out")), False),
        ("saelens_skip_transcoder", SkipTranscoder,
         SkipTranscoderConfig(d_in=16, d_sae=64, d_out=24, apply_b_dec_to_input=False,
                              metadata=metadata("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")), True),
        ("saelens_jumprelu_transcoder", JumpReLUTranscoder,
         JumpReLUTranscoderConfig(d_in=16, d_sae=64, d_out=16, apply_b_dec_to_input=False,
                                  metadata=metadata("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")), True),
    ]
    for name, cls, cfg, tc in specs:
        sae = cls(cfg)
        randomize(sae, gen, cfg.d_in, cfg.d_sae, getattr(cfg, "d_out", cfg.d_in))
        d = os.path.join(out, name)
        shutil.rmtree(d, ignore_errors=True)
        sae.save_model(d)
        loaded = record_saelens(ref, name, d, gen_np, tc)
        for k, v in sae.state_dict().items():  # the float64 load is the float32 file, exactly
            assert torch.equal(loaded.state_dict()[k], v.double()), (name, k)

    # The flat pre-6.0 layout of SAELens 5.x (fields at the top level, no metadata, k in
    # activation_fn_kwargs), with the saelens_topk weights; SAELens 6.5.3 must read it as
    # the same SAE.
    d = os.path.join(out, "saelens_v5_topk")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    shutil.copy(os.path.join(out, "saelens_topk", "sae_weights.safetensors"), d)
    old = {
        "architecture": "topk", "d_in": 24, "d_sae": 64, "dtype": "float32", "device": "cpu",
        "model_name": "gpt2", "hook_name": "blocks.2.hook_resid_post", "hook_layer": 2,
        "hook_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False, "sae_lens_training_version": "5.5.0",
        "prepend_bos": True, "dataset_path": "Skylion007/openwebtext", "context_size": 128,
        "normalize_activations": "none",
    }
    with open(os.path.join(d, "cfg.json"), "w") as f:
        json.dump(old, f)
    old_sae = SAE.load_from_disk(d, dtype="float64")
    assert old_sae.cfg.architecture() == "topk" and old_sae.cfg.k == 4
    assert old_sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    with torch.no_grad():
        x = torch.from_numpy(ref["saelens_topk.x"].astype(np.float64))
        assert torch.equal(old_sae.encode(x),
                           torch.from_numpy(ref["saelens_topk.encode"]))


def write_gemmascope(out, ref, gen_np):
    d_in, d_sae = 16, 64
    p = {
        "W_enc": (gen_np.standard_normal((d_in, d_sae)) / d_in**0.5).astype(np.float32),
        "W_dec": (gen_np.standard_normal((d_sae, d_in)) * 0.3).astype(np.float32),
        "b_enc": (gen_np.standard_normal(d_sae) * 0.3).astype(np.float32),
        "b_dec": (gen_np.standard_normal(d_in) * 0.3).astype(np.float32),
        "threshold": (gen_np.random(d_sae) * 0.8 + 0.2).astype(np.float32),
    }
    for sub in ("gemmascope_npz", "gemmascope_st", "gemmascope_compressed"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        os.makedirs(os.path.join(out, sub))
    np.savez(os.path.join(out, "gemmascope_npz", "params.npz"), **p)
    np.savez_compressed(os.path.join(out, "gemmascope_compressed", "params.npz"), **p)
    st = {("w_enc" if k == "W_enc" else "w_dec" if k == "W_dec" else k): v for k, v in p.items()}
    np_save_file(st, os.path.join(out, "gemmascope_st", "params.safetensors"))

    P = {k: v.astype(np.float64) for k, v in p.items()}

    def pre(x):
        return x @ P["W_enc"] + P["b_enc"]

    x = pick_rows(gen_np, d_in, pre, "jumprelu", threshold=P["threshold"])
    # Gemma Scope's tutorial JumpReLUSAE: mask = pre > threshold; acts = mask * relu(pre)
    h = pre(x.astype(np.float64))
    f = (h > P["threshold"]) * np.maximum(h, 0)
    ref["gemmascope.x"], ref["gemmascope.encode"], ref["gemmascope.decode"] = x, f, f @ P["W_dec"] + P["b_dec"]
    # the same through SAELens's JumpReLUSAE (what its gemma_2 loader builds)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False, dtype="float64"))
    sae.load_state_dict({k: torch.from_numpy(v) for k, v in P.items()})
    with torch.no_grad():
        g = sae.encode(torch.from_numpy(x.astype(np.float64))).numpy()
    assert np.abs(g - f).max() < 1e-12


def write_sparsify(out, ref, gen, gen_np):
    run = os.path.join(out, "sparsify")
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    specs = [
        ("sparsify_sae", "layers.3", SparseCoderConfig(num_latents=64, k=4)),
        ("sparsify_transcoder", "layers.3.mlp",
         SparseCoderConfig(num_latents=64, k=4, transcode=True, skip_connection=True)),
    ]
    for name, hookpoint, cfg in specs:
        d_in = 16
        sc = SparseCoder(d_in, cfg, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            sc.encoder.weight.copy_(torch.randn(64, d_in, generator=gen) / d_in**0.5)
            sc.encoder.bias.copy_(torch.randn(64, generator=gen) * 0.3)
            sc.W_dec.copy_(torch.randn(64, d_in, generator=gen) * 0.3)
            sc.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.3)
            if sc.W_skip is not None:
                sc.W_skip.copy_(torch.randn(d_in, d_in, generator=gen) * 0.2)
        sc.save_to_disk(os.path.join(run, hookpoint))
        # reload in float64 with sparsify's own loader path
        sc64 = SparseCoder(d_in, cfg, device="cpu", dtype=torch.float64)
        sd = load_file(os.path.join(run, hookpoint, "sae.safetensors"))
        sc64.load_state_dict({k: v.double() for k, v in sd.items()})

        def pre(x, sc64=sc64, cfg=cfg):
            xin = torch.from_numpy(x)
            if not cfg.transcode:
                xin = xin - sc64.b_dec
            with torch.no_grad():
                return torch.relu(xin @ sc64.encoder.weight.T + sc64.encoder.bias).numpy()

        x = pick_rows(gen_np, d_in, pre, "topk", k=cfg.k)
        with torch.no_grad():
            xt = torch.from_numpy(x.astype(np.float64))
            top_acts, top_idx, _ = sc64.encode(xt)
            dense = torch.zeros(N_ROWS, 64, dtype=torch.float64).scatter_(-1, top_idx, top_acts)
            ref[f"{name}.x"] = x
            ref[f"{name}.encode"] = dense.numpy()
            ref[f"{name}.decode"] = sc64.decode(top_acts, top_idx).numpy()
            ref[f"{name}.forward"] = sc64.forward(xt).sae_out.numpy()
    RunConfig(sae=specs[0][2], model="EleutherAI/pythia-70m", ctx_len=64,
              hookpoints=[h for _, h, _ in specs]).save_json(os.path.join(run, "config.json"))


LOUPE_WRITTEN = [("standard", False), ("topk", False), ("batchtopk", False), ("skip_transcoder", True),
                 ("jumprelu_transcoder", True)]


def record_loupe_written(out, gen_np):
    base = os.path.join(out, "loupe_written")
    ref = {}
    for name, tc in LOUPE_WRITTEN:
        record_saelens(ref, name, os.path.join(base, name), gen_np, tc)
    np_save_file(ref, os.path.join(base, "reference.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--loupe-test", help="build/test_sae_io: run it to write loupe_written/ first")
    args = ap.parse_args()
    check_versions()
    out = args.outdir
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(1234)
    gen_np = np.random.default_rng(1234)
    ref = {}
    write_saelens(out, ref, gen, gen_np)
    write_gemmascope(out, ref, gen_np)
    write_sparsify(out, ref, gen, gen_np)
    np_save_file(ref, os.path.join(out, "reference.safetensors"))
    if args.loupe_test:
        env = dict(os.environ, LOUPE_WRITE_SAE_FIXTURE="1")
        subprocess.run([args.loupe_test, "--filter", "sae_io/loupe_written"], check=True, env=env)
    if os.path.isdir(os.path.join(out, "loupe_written", "standard")):
        record_loupe_written(out, np.random.default_rng(4321))
    else:
        print("loupe_written/ absent: run with --loupe-test build/test_sae_io to record it")
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
