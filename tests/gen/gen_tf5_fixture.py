#!/usr/bin/env python3
"""Generate loupe's transformers-5 Llama-family fixtures: checkpoints whose config.json has the
transformers >= 5 layout (rotary settings under "rope_parameters", no top-level rope_theta or
rope_scaling), with a float64 reference run.

Usage: python3 tests/gen/gen_tf5_fixture.py OUTDIR        (normally OUTDIR = tests/fixtures)
Pinned environment: tests/gen/requirements-tf5.txt (checked at start).

Writes, for NAME in llama-tiny-tf5, mistral-tiny-tf5, qwen2-tiny-tf5:
  OUTDIR/NAME/            save_pretrained layout (config.json, generation_config.json, model.safetensors)
      llama-tiny-tf5:   LlamaForCausalLM, float32, tied embeddings, GQA 4/2,
                        rope_parameters {rope_type llama3, rope_theta 5e5, factor 8, low 1, high 4,
                        original_max_position_embeddings 64}
      mistral-tiny-tf5: MistralForCausalLM, float16, untied, GQA 4/2, head_dim 24 (4 x 24 = 96 is
                        not d_model 64), rope_parameters {rope_type default, rope_theta 1e6},
                        sliding_window null
      qwen2-tiny-tf5:   Qwen2ForCausalLM, bfloat16, q/k/v biases, tied, GQA 4/1,
                        rope_parameters {rope_type linear, factor 2, rope_theta 1e6}
  OUTDIR/NAME/reference.safetensors
      float64 run stored as float32 (ids int32): `tokens` [2,16], `logits` [2,16,V], `loss` [],
      `per_seq_loss` [2], and the TransformerLens hooks `hook_embed`, `blocks.L.hook_resid_pre`,
      `blocks.L.attn.hook_q`, `hook_k`, `hook_rot_q`, `hook_rot_k`, `hook_z` ([B,T,heads,d_head]),
      `blocks.L.hook_resid_post`, `ln_final.hook_normalized`.
  OUTDIR/NAME/tokens.npy  int32 [2,16]

The reference is this script's own float64 forward of the Llama family (`forward64`), written from
the weights in the checkpoint (f16/bf16 upcast) and from the rotary frequencies computed here from
the *loaded* config's rope_parameters (the default, linear and llama3 rules). Before writing, the
script checks that:
  - config.json as written has "rope_parameters" and neither "rope_theta" nor "rope_scaling" at
    the top level (the layout loupe must read);
  - transformers' own inverse frequencies (model.model.rotary_emb.inv_freq) equal ours to 1e-6
    relative (transformers computes them in float32);
  - transformers' float64 run (eager attention; RMSNorm, rotary and softmax still in float32)
    agrees with ours: logits max_rel < 1e-5 and every hidden state max_rel < 1e-5;
  - the same weights run with a wrong theta (10000) differ from the reference by far more than
    loupe's test budgets, so a reader that ignored rope_parameters would fail the tests.

It also prints what transformers 5 does with edge cases of the layout (rope_parameters without
rope_theta, a top-level rope_theta beside rope_parameters, rope_scaling beside rope_parameters),
which tests/test_tf5.c mirrors.
"""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import json
import math
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

PINS = {"torch": "2.15.0", "transformers": "5.25.0", "safetensors": "0.8.0", "numpy": "2.4.6"}

import safetensors  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

B, T = 2, 16

SPECS = {
    "llama-tiny-tf5": dict(
        cls=LlamaForCausalLM, cfg_cls=LlamaConfig, seed=110, vocab=512, layers=2, d=64, heads=4, kv=2, mlp=160,
        eps=1e-5, tied=True, dtype=torch.float32,
        extra=dict(
            # with d_head 16 and theta 5e5 the wavelengths are 6.3, 32.4, 167, ...: against an original
            # context of 64 one frequency is kept, one smoothed and the rest divided by 8
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2),
    ),
    "mistral-tiny-tf5": dict(
        cls=MistralForCausalLM, cfg_cls=MistralConfig, seed=130, vocab=512, layers=2, d=64, heads=4, kv=2, mlp=128,
        eps=1e-6, tied=False, dtype=torch.float16,
        extra=dict(head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                   max_position_embeddings=128, sliding_window=None, bos_token_id=1, eos_token_id=2),
    ),
    "qwen2-tiny-tf5": dict(
        cls=Qwen2ForCausalLM, cfg_cls=Qwen2Config, seed=120, vocab=512, layers=2, d=64, heads=4, kv=1, mlp=128,
        eps=1e-6, tied=True, dtype=torch.bfloat16,
        extra=dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                   max_position_embeddings=128, use_sliding_window=False, bos_token_id=510, eos_token_id=511),
    ),
}


def check_pins():
    got = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
           "safetensors": safetensors.__version__, "numpy": np.__version__}
    bad = {k: (got[k], v) for k, v in PINS.items() if got[k] != v}
    if bad:
        sys.exit(f"gen_tf5_fixture.py: versions differ from tests/gen/requirements-tf5.txt: {bad}")


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------
# float64 rotary frequencies from the rope_parameters rules (not from transformers' code)

def inv_freq64(rp, d_head):
    theta = float(rp["rope_theta"])
    inv = 1.0 / (theta ** (np.arange(0, d_head, 2, dtype=np.float64) / d_head))
    kind = rp.get("rope_type", "default")
    if kind == "default":
        return torch.from_numpy(inv)
    if kind == "linear":
        return torch.from_numpy(inv / rp["factor"])
    assert kind == "llama3", kind
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(f)
        elif wavelen > old / lo:
            out.append(f / factor)
        else:
            s = (old / wavelen - lo) / (hi - lo)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# the float64 reference forward, with TransformerLens hook names

def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def forward64(sd, cfg, tokens, inv):
    """sd: float64 state dict (HF names); cfg: the loaded transformers config. Returns (hooks, logits)."""
    D, H, KV = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    DH = getattr(cfg, "head_dim", None) or D // H
    G, eps = H // KV, cfg.rms_norm_eps
    nb, nt = tokens.shape
    ang = torch.arange(nt, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat((ang.cos(), ang.cos()), -1)[None, :, None, :]
    sin = torch.cat((ang.sin(), ang.sin()), -1)[None, :, None, :]
    causal = torch.tril(torch.ones(nt, nt, dtype=torch.bool))

    def rms(x, w):
        return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w

    def lin(x, name):
        b = sd.get(name + ".bias")
        return F.linear(x, sd[name + ".weight"], b)

    hk = {}
    x = sd["model.embed_tokens.weight"][tokens.long()]
    hk["hook_embed"] = x
    for L in range(cfg.num_hidden_layers):
        p, w = f"blocks.{L}.", f"model.layers.{L}."
        hk[p + "hook_resid_pre"] = x
        h = rms(x, sd[w + "input_layernorm.weight"])
        q = lin(h, w + "self_attn.q_proj").reshape(nb, nt, H, DH)
        k = lin(h, w + "self_attn.k_proj").reshape(nb, nt, KV, DH)
        v = lin(h, w + "self_attn.v_proj").reshape(nb, nt, KV, DH)
        rq, rk = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        hk[p + "attn.hook_q"], hk[p + "attn.hook_k"] = q, k
        hk[p + "attn.hook_rot_q"], hk[p + "attn.hook_rot_k"] = rq, rk
        s = torch.einsum("bqhd,bkhd->bhqk", rq, rk.repeat_interleave(G, 2)) / math.sqrt(DH)
        pat = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        z = torch.einsum("bhqk,bkhd->bqhd", pat, v.repeat_interleave(G, 2))
        hk[p + "attn.hook_z"] = z
        x = x + lin(z.reshape(nb, nt, H * DH), w + "self_attn.o_proj")
        h = rms(x, sd[w + "post_attention_layernorm.weight"])
        x = x + lin(F.silu(lin(h, w + "mlp.gate_proj")) * lin(h, w + "mlp.up_proj"), w + "mlp.down_proj")
        hk[p + "hook_resid_post"] = x
    normed = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    hk["ln_final.hook_normalized"] = normed
    unembed = sd.get("lm_head.weight", sd["model.embed_tokens.weight"]) if not cfg.tie_word_embeddings \
        else sd["model.embed_tokens.weight"]
    logits = F.linear(normed * sd["model.norm.weight"], unembed)
    return hk, logits


def losses(logits, tokens):
    lp = torch.log_softmax(logits[:, :-1], -1)
    return -lp.gather(-1, tokens[:, 1:].long()[..., None])[..., 0]  # [B, T-1]


# ---------------------------------------------------------------------------------------------

def build(name, spec, outdir):
    torch.manual_seed(spec["seed"])
    cfg = spec["cfg_cls"](
        vocab_size=spec["vocab"], hidden_size=spec["d"], intermediate_size=spec["mlp"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv"],
        rms_norm_eps=spec["eps"], tie_word_embeddings=spec["tied"], hidden_act="silu", **spec["extra"])
    model = spec["cls"](cfg).eval()
    with torch.no_grad():  # a wider spread than the default init, so the hooks are far from degenerate
        for pname, prm in model.named_parameters():
            if pname.endswith("norm.weight"):
                prm.copy_(1.0 + 0.2 * torch.randn_like(prm))
            elif pname.endswith("embed_tokens.weight"):
                prm.normal_(0.0, 0.25)
            else:
                prm.normal_(0.0, 0.12 if pname.endswith(".weight") else 0.05)
    model = model.to(spec["dtype"])
    d = os.path.join(outdir, name)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    with open(os.path.join(d, "config.json")) as f:
        written = json.load(f)
    assert "rope_parameters" in written and "rope_theta" not in written and "rope_scaling" not in written, written
    print(f"{name}: config.json rope_parameters = {written['rope_parameters']}")

    # the reference, from the weights as stored and the config as transformers 5 reads it back
    loaded = spec["cls"].from_pretrained(d, dtype=torch.float64, attn_implementation="eager").eval()
    lcfg = loaded.config
    sd = {k: v.to(torch.float64) for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
    dh = getattr(lcfg, "head_dim", None) or lcfg.hidden_size // lcfg.num_attention_heads
    inv = inv_freq64(lcfg.rope_parameters, dh)
    rel = ((loaded.model.rotary_emb.inv_freq.double() - inv).abs() / inv).max().item()
    assert rel < 1e-6, f"{name}: transformers' inv_freq differs from the float64 rule by {rel:g}"

    g = torch.Generator().manual_seed(spec["seed"] + 1)
    tokens = torch.randint(0, spec["vocab"], (B, T), generator=g, dtype=torch.int32)
    hk, logits = forward64(sd, lcfg, tokens, inv)
    with torch.no_grad():
        out = loaded(input_ids=tokens.long(), use_cache=False, output_hidden_states=True)
    r = max_rel(out.logits, logits)
    assert r < 1e-5, f"{name}: transformers float64 logits differ from ours by max_rel {r:g}"
    for L in range(lcfg.num_hidden_layers):  # hidden_states[L] is resid_pre of layer L
        hr = max_rel(out.hidden_states[L], hk[f"blocks.{L}.hook_resid_pre"])
        assert hr < 1e-5, f"{name}: hidden state {L} differs by {hr:g}"
    per_tok = losses(logits, tokens)
    wrong = dict(lcfg.rope_parameters, rope_theta=10000.0)
    _, logits_wrong = forward64(sd, lcfg, tokens, inv_freq64(wrong, dh))
    off = max_rel(logits_wrong, logits)
    assert off > 1e-3, f"{name}: theta 10000 changes logits by only {off:g}"
    print(f"{name}: HF float64 vs reference logits max_rel {r:.2e}; theta 10000 instead: max_rel {off:.2e}, "
          f"loss {per_tok.mean().item():.6f} vs {losses(logits_wrong, tokens).mean().item():.6f}")

    ref = {k: v.to(torch.float32).contiguous() for k, v in hk.items()}
    ref["logits"] = logits.to(torch.float32).contiguous()
    ref["loss"] = per_tok.mean().to(torch.float32).reshape(())
    ref["per_seq_loss"] = per_tok.mean(-1).to(torch.float32).contiguous()
    ref["tokens"] = tokens.contiguous()
    save_file(ref, os.path.join(d, "reference.safetensors"))
    np.save(os.path.join(d, "tokens.npy"), tokens.numpy().astype(np.int32))


def edge_cases():
    """What transformers 5 makes of unusual rotary layouts (tests/test_tf5.c mirrors these)."""
    base = dict(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    cases = {
        "rope_parameters without rope_theta": dict(rope_parameters={"rope_type": "default"}),
        "rope_parameters without rope_theta, top-level rope_theta 5e5": dict(
            rope_parameters={"rope_type": "default"}, rope_theta=500000.0),
        "rope_parameters theta 1e6 and top-level rope_theta 5e5": dict(
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rope_theta=500000.0),
        "rope_scaling linear beside rope_parameters theta 1e6": dict(
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "no rotary keys at all": dict(),
    }
    for what, kw in cases.items():
        c = LlamaConfig.from_dict(dict(base, model_type="llama", **kw))
        print(f"transformers {transformers.__version__}: {what}: rope_parameters = {c.rope_parameters}")
    c = LlamaConfig.from_dict(dict(base, model_type="llama", rope_parameters={"rope_type": "default"}))
    assert c.rope_parameters["rope_theta"] == 10000.0


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    check_pins()
    torch.set_grad_enabled(False)
    for name, spec in SPECS.items():
        build(name, spec, sys.argv[1])
    edge_cases()


if __name__ == "__main__":
    main()
