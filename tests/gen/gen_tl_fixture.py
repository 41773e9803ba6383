#!/usr/bin/env python3
"""Record TransformerLens 3.x's own hooks on loupe's committed tiny models.

Usage: python3 tests/gen/gen_tl_fixture.py FIXTURES      (normally FIXTURES = tests/fixtures)

For NAME in gpt2-tiny, llama-tiny, qwen2-tiny, mistral-tiny this reads FIXTURES/NAME (the
checkpoint and tokens.npy written by gen_gpt2_fixture.py / gen_llama_fixture.py, left untouched)
and writes FIXTURES/tl/NAME.safetensors:

  every hook that HookedTransformer fires in a default forward (run_with_cache with no names
  filter), named exactly as TransformerLens names it, with its TransformerLens shape;
  `loss` (scalar: mean next-token loss over every predicted position, return_type="loss");
  `tokens` (int32 [B,T]: the ids it ran on, FIXTURES/NAME/tokens.npy).

Activations are computed in float64 and stored as float32. `__metadata__` (`generator`) records
the transformer_lens, torch and transformers versions and the hook count.

The HookedTransformer is built the way from_pretrained_no_processing builds it, but offline and
from the fixture directory: transformers loads the checkpoint (float64); TransformerLens's own
get_pretrained_model_config (which calls convert_hf_model_config on the local directory) turns
its config.json into a HookedTransformerConfig, get_pretrained_state_dict runs its weight
converter (convert_gpt2_weights, convert_llama_weights, convert_qwen2_weights,
convert_mistral_weights), and load_and_process_state_dict loads it with every processing step
off (no fold_ln, no centering, no value-bias folding, no attention refactoring). Nothing is
fetched: HF_HUB_OFFLINE is set, and the checkpoint is read through a copy under a neutral
directory name, because convert_hf_model_config picks the architecture from the *name* when
it contains "llama" or "gemma" (and then never reads config.json). GPT-2's copied config.json
gets `n_ctx` (= n_positions, as the hub's gpt2 config.json has it), which the converter reads
and transformers 5 no longer provides.

The script checks that TransformerLens's logits agree with the committed float64 reference
logits of FIXTURES/NAME/reference.safetensors (transformers with its float32 islands removed; see
gen_gpt2_fixture.py and gen_llama_fixture.py) to that file's float32 storage rounding (max
relative difference 1e-7), so the conversion, not only the hooks, is what loupe is compared
against; and that unembed.hook_out is the logits. (transformers 5's own float64 run is not used
as the check: it computes the rotary tables in float32, 2e-7 off.)
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import importlib.metadata
import json
import shutil
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import transformer_lens
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as loading

NAMES = ["gpt2-tiny", "llama-tiny", "qwen2-tiny", "mistral-tiny"]
DTYPE = torch.float64


def build(src_dir, work):
    """HookedTransformer (no processing), float64, from a fixture dir."""
    local = os.path.join(work, "model")  # a name without "llama"/"gemma" in it: see the docstring
    shutil.copytree(src_dir, local)
    with open(os.path.join(local, "config.json")) as f:
        hf_json = json.load(f)
    if hf_json.get("model_type") == "gpt2" and "n_ctx" not in hf_json:
        # the hub's gpt2 config.json carries n_ctx (= n_positions), which convert_hf_model_config
        # reads; transformers 5's GPT2Config no longer derives it from n_positions
        hf_json["n_ctx"] = hf_json["n_positions"]
        with open(os.path.join(local, "config.json"), "w") as f:
            json.dump(hf_json, f, indent=2)
    hf = AutoModelForCausalLM.from_pretrained(local, dtype=DTYPE)
    hf.eval()
    cfg = loading.get_pretrained_model_config(
        local, hf_cfg=hf.config.to_dict(), fold_ln=False, device="cpu", dtype=DTYPE
    )
    cfg.tokenizer_name = None  # token ids only: no tokenizer to fetch
    state = loading.get_pretrained_state_dict(local, cfg, hf, dtype=DTYPE)
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    return model


def record(fixtures, name):
    tokens = torch.from_numpy(np.load(os.path.join(fixtures, name, "tokens.npy")).astype(np.int64))
    with tempfile.TemporaryDirectory() as work:
        model = build(os.path.join(fixtures, name), work)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
            loss = model(tokens, return_type="loss")
    # the committed float64 reference (transformers 4.46.3 with its float32 islands removed,
    # stored as float32): agreement to its storage rounding, 2^-24 of the largest logit
    ref_logits = safe_open(os.path.join(fixtures, name, "reference.safetensors"), "pt").get_tensor("logits").double()
    err = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert err < 1e-7, f"{name}: TransformerLens logits differ from {name}/reference.safetensors (max rel {err:.3g})"
    assert torch.equal(cache["unembed.hook_out"], logits), f"{name}: unembed.hook_out is not the logits"
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert abs(ref.item() - loss.item()) < 1e-12, f"{name}: loss {loss.item()} vs {ref.item()}"
    out = {k: v.detach().to(torch.float32).contiguous() for k, v in cache.items()}
    out["loss"] = loss.detach().to(torch.float32).reshape(())
    out["tokens"] = tokens.to(torch.int32).contiguous()
    # one metadata key: safetensors writes several in no fixed order, and the files must be
    # byte-identical from run to run
    tl_version = getattr(transformer_lens, "__version__", None) or importlib.metadata.version("transformer-lens")
    meta = {
        "generator": f"gen_tl_fixture.py from {name}/: transformer_lens {tl_version}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {len(cache)} hooks"
    }
    path = os.path.join(fixtures, "tl", name + ".safetensors")
    save_file(out, path, metadata=meta)
    print(f"{name}: {len(cache)} hooks, loss {loss.item():.6f}, vs reference logits max rel {err:.2e} -> {path}")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_tl_fixture.py FIXTURES")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    fixtures = sys.argv[1]
    os.makedirs(os.path.join(fixtures, "tl"), exist_ok=True)
    for name in NAMES:
        record(fixtures, name)


if __name__ == "__main__":
    main()
