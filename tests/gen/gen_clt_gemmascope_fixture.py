#!/usr/bin/env python3
"""Generate loupe's Gemma Scope transcoder fixture with circuit-tracer 0.5.0's own loader.

Usage: python3 tests/gen/gen_clt_gemmascope_fixture.py OUTDIR   (normally tests/fixtures/clt_gemmascope)
Requirements: tests/gen/requirements-circuit-tracer.txt (offline).

Gemma Scope's transcoders (google/gemma-scope-2b-pt-transcoders) are one params.npz per layer
(np.savez, uncompressed): W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc [d_sae],
b_dec [d_model], threshold [d_sae]; circuit-tracer reads them with load_gemma_scope_transcoder
(transposing W_enc, JumpReLU with the threshold, no skip) when its config.yaml (model_kind
transcoder_set, feature_input_hook ln2.hook_normalized, feature_output_hook hook_mlp_out, scan,
and a 'transcoders' list of the files) comes from a gemma-scope repository. This script writes
two random layers in that form (d_model 16, d_sae 40; thresholds positive and some negative
pre-activations in play), the config.yaml with the local files listed, and
reference.safetensors: for each layer i, x_i [8, 16] (float32 inputs), feat_i [8, 40] and
recon_i [8, 16]: circuit-tracer's encode and decode in float64 of the set its loader read
(load_transcoder_set with special_load_fn "gemma-scope"). Every pre-activation is kept 2e-3
from its threshold, so float32 rounding cannot flip a feature.
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import save_file

from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

L, D, S, N = 2, 16, 40, 8


def write_bad(bad, p):
    os.makedirs(bad, exist_ok=True)
    np.savez(os.path.join(bad, "no_threshold.npz"), **{k: v for k, v in p.items() if k != "threshold"})
    np.savez(os.path.join(bad, "enc_untransposed.npz"), **{**p, "W_enc": np.ascontiguousarray(p["W_enc"].T)})
    np.savez_compressed(os.path.join(bad, "compressed.npz"), **p)
    w = p["W_dec"].copy()
    w[3, 5] = np.nan
    np.savez(os.path.join(bad, "nan.npz"), **{**p, "W_dec": w})
    np.savez(os.path.join(bad, "int_bias.npz"), **{**p, "b_enc": np.arange(S, dtype=np.int32)})


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/clt_gemmascope"
    rng = np.random.default_rng(3)
    paths = {}
    for layer in range(L):
        os.makedirs(os.path.join(out, f"layer_{layer}"), exist_ok=True)
        p = {"W_enc": (rng.standard_normal((D, S)) / D**0.5).astype(np.float32),
             "W_dec": (rng.standard_normal((S, D)) * 0.3).astype(np.float32),
             "b_enc": (rng.standard_normal(S) * 0.3).astype(np.float32),
             "b_dec": (rng.standard_normal(D) * 0.1).astype(np.float32),
             "threshold": (rng.random(S) * 0.4 + 0.05).astype(np.float32)}
        paths[layer] = os.path.join(out, f"layer_{layer}", "params.npz")
        np.savez(paths[layer], **p)
        if layer == 0:
            write_bad(os.path.join(out, "bad"), p)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write("model_kind: transcoder_set\nmodel_name: tiny-gemma-scope\nfeature_input_hook: ln2.hook_normalized\n"
                "feature_output_hook: hook_mlp_out\nscan: tiny-gemma-scope\ntranscoders:\n"
                + "".join(f"  - layer_{i}/params.npz\n" for i in range(L)))
    ts = load_transcoder_set(paths, scan="tiny-gemma-scope", feature_input_hook="ln2.hook_normalized",
                             feature_output_hook="hook_mlp_out", special_load_fn="gemma-scope", dtype=torch.float64,
                             device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False)
    ref, info = {}, {"layers": L, "d_model": D, "d_sae": S, "tokens": N}
    for layer in range(L):
        t = ts[layer]
        for _ in range(100):  # inputs whose pre-activations keep clear of the thresholds
            x = (rng.standard_normal((N, D)) * 1.5).astype(np.float32)
            with torch.no_grad():
                pre = t.encode(torch.from_numpy(x).double(), apply_activation_function=False)
            gap = (pre - t.activation_function.threshold).abs().min().item()
            if gap > 2e-3:
                break
        else:
            sys.exit("no input kept clear of the thresholds")
        with torch.no_grad():
            feat = t.encode(torch.from_numpy(x).double())
            recon = t.decode(feat)
        ref[f"x_{layer}"] = x
        ref[f"feat_{layer}"] = feat.numpy().astype(np.float32)
        ref[f"recon_{layer}"] = recon.numpy().astype(np.float32)
        info[f"layer_{layer}"] = {"active": int((feat != 0).sum()), "negative_pre": int((pre < 0).sum()), "min_gap": gap}
    save_file(ref, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
