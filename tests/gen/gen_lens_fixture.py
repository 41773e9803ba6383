#!/usr/bin/env python3
"""Record TransformerLens 3.x's logit lens and direct logit attribution on loupe's tiny models.

Usage: python3 tests/gen/gen_lens_fixture.py FIXTURES      (normally FIXTURES = tests/fixtures)

Pinned in tests/gen/requirements-tl.txt (transformer-lens 3.9.0). For NAME in gpt2-tiny (LayerNorm,
learned positions, attention output bias) and llama-tiny (RMSNorm, GQA 4/2, tied unembedding) this
reads FIXTURES/NAME (left untouched) and writes FIXTURES/lens/NAME.safetensors.

The HookedTransformer is built offline from the fixture checkpoint exactly as gen_tl_fixture.py
builds it (its `build`), then with TransformerLens's own fold_ln: the final norm's weight is folded
into W_U (and, for LayerNorm, its bias into b_U), which is the form in which TransformerLens's
logit_attrs gives attributions that add up to the logit. The residual stream is the same either
way (checked: the folded model's logits equal the unprocessed model's to 1e-10 relative).

Each case runs run_with_cache in float64 on one prompt (batch 1), at one position p, for an answer
token (and a wrong-answer token: a logit difference). Stored per case, under "caseK.":

  tokens (I32 [T]), pos, answer, wrong (I32 [1]; wrong = -1: the metric is the answer's logit)
  resid            accumulated_resid(incl_mid=True, pos_slice=p)            [2L+1, d_model]
  lens_cached      its final-norm scaling from the cache, then unembed     [2L+1, d_vocab]
                   (apply_ln_to_stack(recompute_ln=False) + model.unembed: W_U and b_U)
  lens_recomputed  accumulated_resid(incl_mid=True, apply_ln=True, pos_slice=p) + model.unembed,
                   the final norm recomputed per entry (TransformerLens's logit lens)
  decomp_ln        decompose_resid(apply_ln=True, pos_slice=p)              [n_comp, d_model]
  heads_ln         stack_head_results(apply_ln=True, pos_slice=p)           [L*H, d_model]
  attr_comp_cached logit_attrs(decompose_resid(pos_slice=p), answer[, wrong], pos_slice=p)  [n_comp]
  attr_head_cached logit_attrs(stack_head_results(pos_slice=p), ...)        [L*H]
  attr_bias_cached logit_attrs of each layer's attention output bias b_O   [L]
  attr_comp_recomputed, attr_head_recomputed, attr_bias_recomputed: the same stacks through
                   apply_ln_to_stack(recompute_ln=True), dotted with tokens_to_residual_directions
  metric           logits[p, answer] (- logits[p, wrong]) of the run        [1]
  unembed_bias     b_U[answer] (- b_U[wrong]) of the folded model           [1]

The script asserts TransformerLens's own sum identities in float64: the component attributions plus
unembed_bias give metric (1e-9), and so do the head attributions plus b_O, embeddings and MLPs.
Values are stored as float32. `__metadata__` (`generator`) records the versions.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import importlib.metadata
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

import transformer_lens
from transformer_lens import ActivationCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_tl_fixture  # noqa: E402

NAMES = ["gpt2-tiny", "llama-tiny"]
# (token row of NAME/tokens.npy, tokens kept, position, answer, wrong answer or -1)
CASES = [(0, 16, 15, 5, 17), (1, 11, 6, 42, -1), (1, 9, 8, 300, 7)]


def build_folded(src_dir, work):
    """gen_tl_fixture.build, and the same model through TransformerLens's fold_ln (nothing else).

    TransformerLens 3.9's weight processing runs in float32 even for a float64 model, so its
    folded W_U and b_U are within 1e-6 of the exact fold (checked here) and are then replaced by
    the same fold done in float64: w[:, None] * W_U (centred over d_model for LayerNorm, as
    fold_ln does) and b @ W_U + b_U."""
    plain = gen_tl_fixture.build(src_dir, os.path.join(work, "a"))
    folded = gen_tl_fixture.build(src_dir, os.path.join(work, "b"))
    layer_norm = plain.cfg.normalization_type == "LN"
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    folded.load_and_process_state_dict(
        state,
        fold_ln=True,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    folded.eval()
    with torch.no_grad():
        W_U = plain.ln_final.w[:, None] * plain.W_U
        b_U = plain.b_U.clone()
        if layer_norm:
            W_U = W_U - W_U.mean(0, keepdim=True)
            b_U = b_U + plain.ln_final.b @ plain.W_U
        for what, tl, exact in (("W_U", folded.W_U, W_U), ("b_U", folded.b_U, b_U)):
            err = ((tl - exact).abs().max() / exact.abs().max().clamp(min=1)).item()
            assert err < 1e-6, f"TransformerLens's folded {what} is {err:.3g} from the exact fold"
        folded.unembed.W_U.copy_(W_U)
        folded.unembed.b_U.copy_(b_U)
    assert folded.cfg.normalization_type == ("LNPre" if layer_norm else "RMSPre")
    return plain, folded


def one_case(plain, model, tokens, pos, answer, wrong):
    out = {}
    toks = torch.tensor(tokens, dtype=torch.int64)[None]
    with torch.no_grad():
        logits, plain_cache = plain.run_with_cache(toks)
    # the unprocessed model's activations, read through the folded model's final norm and W_U
    cache = ActivationCache(plain_cache.cache_dict, model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    p = pos
    bos = {"pos_slice": p}
    with torch.no_grad():
        resid = cache.accumulated_resid(incl_mid=True, **bos)  # [2L+1, 1, D]
        cached = cache.apply_ln_to_stack(resid, layer=L, pos_slice=p)
        recomputed = cache.accumulated_resid(incl_mid=True, apply_ln=True, **bos)
        out["resid"] = resid[:, 0]
        out["lens_cached"] = model.unembed(cached[:, :, None, :])[:, 0, 0]
        out["lens_recomputed"] = model.unembed(recomputed[:, :, None, :])[:, 0, 0]
        # the last entry is the run's own final residual: both lenses give the real logits
        for k in ("lens_cached", "lens_recomputed"):
            e = (out[k][-1] - logits[0, p]).abs().max().item()
            assert e < 1e-9, f"{k}: final_post is not the logits ({e:.3g})"

        decomp = cache.decompose_resid(**bos)  # [n_comp, 1, D]
        heads = cache.stack_head_results(**bos)  # [L*H, 1, D]
        b_O = torch.stack([model.blocks[l].attn.b_O for l in range(L)])[:, None, :]  # [L, 1, D]
        out["decomp_ln"] = cache.decompose_resid(apply_ln=True, **bos)[:, 0]
        out["heads_ln"] = cache.stack_head_results(apply_ln=True, **bos)[:, 0]

        ans = torch.tensor([answer])
        wr = torch.tensor([wrong]) if wrong >= 0 else None
        kw = {"tokens": ans, "incorrect_tokens": wr, "pos_slice": p}
        direction = model.tokens_to_residual_directions(ans)  # [D] for one token
        if wr is not None:
            direction = direction - model.tokens_to_residual_directions(wr)

        def recomputed_attr(stack):
            return (cache.apply_ln_to_stack(stack, layer=L, pos_slice=p, recompute_ln=True) * direction).sum(-1)

        for name, stack in (("comp", decomp), ("head", heads), ("bias", b_O)):
            out[f"attr_{name}_cached"] = cache.logit_attrs(stack, **kw)[:, 0]
            out[f"attr_{name}_recomputed"] = recomputed_attr(stack)[:, 0]

        metric = logits[0, p, answer] - (logits[0, p, wrong] if wrong >= 0 else 0)
        ubias = model.b_U[answer] - (model.b_U[wrong] if wrong >= 0 else 0)
        out["metric"] = metric.reshape(1)
        out["unembed_bias"] = ubias.reshape(1)

    # TransformerLens's decomposition adds up to the metric
    s = out["attr_comp_cached"].sum() + ubias
    assert abs(s - metric) < 1e-9 * max(1, abs(metric)), f"components sum to {s}, metric {metric}"
    n_embed = out["attr_comp_cached"].shape[0] - 2 * L
    mlp = out["attr_comp_cached"][n_embed + 1 :: 2].sum()
    s2 = out["attr_head_cached"].sum() + out["attr_bias_cached"].sum() + out["attr_comp_cached"][:n_embed].sum() + mlp + ubias
    assert abs(s2 - metric) < 1e-9 * max(1, abs(metric)), f"heads path sums to {s2}, metric {metric}"
    res = {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}
    res["tokens"] = torch.tensor(tokens, dtype=torch.int32)
    res["pos"] = torch.tensor([pos], dtype=torch.int32)
    res["answer"] = torch.tensor([answer], dtype=torch.int32)
    res["wrong"] = torch.tensor([wrong], dtype=torch.int32)
    return res, metric.item()


def record(fixtures, name):
    rows = np.load(os.path.join(fixtures, name, "tokens.npy")).astype(np.int64)
    out = {}
    with tempfile.TemporaryDirectory() as work:
        plain, folded = build_folded(os.path.join(fixtures, name), work)
        for k, (row, n, pos, answer, wrong) in enumerate(CASES):
            res, metric = one_case(plain, folded, rows[row, :n].tolist(), pos, answer, wrong)
            for key, v in res.items():
                out[f"case{k}.{key}"] = v
            print(f"{name} case{k}: {n} tokens, pos {pos}, answer {answer}, wrong {wrong}: metric {metric:.6f}")
    tl_version = getattr(transformer_lens, "__version__", None) or importlib.metadata.version("transformer-lens")
    meta = {
        "generator": f"gen_lens_fixture.py from {name}/: transformer_lens {tl_version}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {len(CASES)} cases"
    }
    path = os.path.join(fixtures, "lens", name + ".safetensors")
    save_file(out, path, metadata=meta)
    print(f"{name}: -> {path}")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_lens_fixture.py FIXTURES")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    fixtures = sys.argv[1]
    os.makedirs(os.path.join(fixtures, "lens"), exist_ok=True)
    for name in NAMES:
        record(fixtures, name)


if __name__ == "__main__":
    main()
