#!/usr/bin/env python3
"""Generate loupe's GPT-2 reference fixtures.

Usage: python3 tests/gen/gen_gpt2_fixture.py OUTDIR        (normally OUTDIR = tests/fixtures)

Writes:
  OUTDIR/gpt2-tiny/            save_pretrained layout (config.json, generation_config.json,
                               model.safetensors with `transformer.` prefix, tied lm_head not written)
  OUTDIR/gpt2-tiny/reference.safetensors
                               float64 reference run (stored as float32; tokens int32) of every
                               TransformerLens hook point, logits, loss, and four edited runs
  OUTDIR/gpt2-tiny/tokens.npy       int32 [B,T] tokens of the reference run
  OUTDIR/gpt2-tiny/tokens_flat.npy  int64 [B*T] the same tokens, flattened
  OUTDIR/gpt2-tiny-hub/        the same weights in the layout of the HF hub `gpt2` model.safetensors
                               (no `transformer.` prefix, no lm_head, attn.bias / attn.masked_bias buffers)

The model is a small randomly initialised GPT2LMHeadModel; everything is seeded and runs on CPU.
Activations are recorded with forward hooks / pre-hooks on the Hugging Face modules, named and
shaped as TransformerLens hook points (from_pretrained_no_processing semantics).
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
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 997
N_CTX = 32
D = 64
N_LAYER = 2
N_HEAD = 4
DH = D // N_HEAD
EPS = 1e-5
B, T = 2, 16

SEED_MODEL = 0
SEED_TOKENS = 1234
SEED_STEER = 7
SEED_PATCH_TOKENS = 99
STEER_SCALE = 2.0
ZERO_HEAD_LAYER, ZERO_HEAD = 0, 1
ZERO_MLP_LAYER, ZERO_MLP_POS = 1, (3, 5)
STEER_LAYER = 0
PATCH_LAYER, PATCH_POS = 1, (2, 7)  # inclusive


def check_close(name, a, b, atol=1e-10, rtol=1e-10):
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        diff = (a - b).abs().max().item()
        raise AssertionError(f"{name}: max abs diff {diff:g}")


def build_model():
    torch.manual_seed(SEED_MODEL)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=N_CTX,
        n_embd=D,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_inner=None,
        layer_norm_epsilon=EPS,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    # Re-draw every parameter so the model is far from the default (near-identity) init.
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head.weight is listed once (as wte)
            if name.endswith("wte.weight") or name.endswith("wpe.weight"):
                p.normal_(0.0, 0.5)
            elif ".ln_" in name or "ln_f." in name:
                if name.endswith(".weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith(".weight") and p.dim() == 2:
                p.normal_(0.0, 0.2)
            else:
                raise RuntimeError(f"unhandled parameter {name} {tuple(p.shape)}")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    model.eval()
    return model


def save_hub_layout(model, outdir, src_config):
    os.makedirs(outdir, exist_ok=True)
    shutil.copyfile(src_config, os.path.join(outdir, "config.json"))
    sd = {}
    for k, v in model.transformer.state_dict().items():
        sd[k] = v.detach().to(torch.float32).contiguous().clone()
    tril = torch.tril(torch.ones(N_CTX, N_CTX, dtype=torch.float32)).view(1, 1, N_CTX, N_CTX)
    for L in range(N_LAYER):
        sd[f"h.{L}.attn.bias"] = tril.clone()
        sd[f"h.{L}.attn.masked_bias"] = torch.tensor(-1e4, dtype=torch.float32)
    assert not any(k.startswith("transformer.") or k.startswith("lm_head") for k in sd)
    save_file(sd, os.path.join(outdir, "model.safetensors"), metadata={"format": "pt"})


def tl_layernorm(x):
    """TransformerLens LayerNorm hook values (before the affine weight/bias)."""
    x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + EPS).sqrt()
    return scale, x / scale


class Recorder:
    """Forward hooks on the HF GPT-2 modules, recording TransformerLens hook points."""

    def __init__(self, model):
        self.model = model
        self.acts = {}
        self.handles = []
        tr = model.transformer
        self._hook(tr.wte, "hook_embed")
        self._hook(tr.wpe, "hook_pos_embed")
        for L, blk in enumerate(tr.h):
            p = f"blocks.{L}."
            self._pre(blk, p + "hook_resid_pre")
            self._hook(blk, p + "hook_resid_post")
            self._pre(blk.ln_1, p + "ln1.input")
            self._hook(blk.ln_1, p + "ln1.output")
            self._hook(blk.attn.c_attn, p + "attn.c_attn.output")
            self._pre(blk.attn.c_proj, p + "attn.hook_z")
            self._hook(blk.attn, p + "hook_attn_out")
            self._pre(blk.ln_2, p + "ln2.input")
            self._hook(blk.ln_2, p + "ln2.output")
            self._hook(blk.mlp.c_fc, p + "mlp.hook_pre")
            self._pre(blk.mlp.c_proj, p + "mlp.hook_post")
            self._hook(blk.mlp, p + "hook_mlp_out")
        self._pre(tr.ln_f, "ln_final.input")
        self._hook(tr.ln_f, "ln_final.output")

    @staticmethod
    def _first(x):
        return x[0] if isinstance(x, (tuple, list)) else x

    def _hook(self, mod, name):
        def fn(_m, _args, out):
            self.acts[name] = self._first(out).detach().clone()

        self.handles.append(mod.register_forward_hook(fn))

    def _pre(self, mod, name):
        def fn(_m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self.acts[name] = x.detach().clone()

        self.handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def run(model, tokens, **kw):
    with torch.no_grad():
        return model(input_ids=tokens.long(), use_cache=False, **kw)


def reference_run(model, tokens):
    rec = Recorder(model)
    try:
        out = run(model, tokens, labels=tokens.long(), output_attentions=True)
    finally:
        rec.remove()
    a = rec.acts
    ref = {}
    ref["hook_embed"] = a["hook_embed"]
    ref["hook_pos_embed"] = a["hook_pos_embed"].expand(B, T, D)
    assert ref["hook_embed"].shape == (B, T, D)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for L in range(N_LAYER):
        p = f"blocks.{L}."
        resid_pre = a[p + "hook_resid_pre"]
        if L == 0:
            check_close("resid_pre0 == embed + pos_embed", resid_pre, ref["hook_embed"] + ref["hook_pos_embed"])
        else:
            check_close(f"resid_pre{L} == resid_post{L-1}", resid_pre, ref[f"blocks.{L-1}.hook_resid_post"])
        ref[p + "hook_resid_pre"] = resid_pre
        blk = model.transformer.h[L]
        for tl, hf, ln in (("ln1", "ln1", blk.ln_1), ("ln2", "ln2", blk.ln_2)):
            scale, normed = tl_layernorm(a[p + hf + ".input"])
            check_close(f"{p}{tl} normalized*w+b == HF output", normed * ln.weight + ln.bias, a[p + hf + ".output"])
            ref[p + tl + ".hook_scale"] = scale
            ref[p + tl + ".hook_normalized"] = normed
        qkv = a[p + "attn.c_attn.output"]
        q, k, v = qkv.split(D, dim=2)
        q = q.reshape(B, T, N_HEAD, DH)
        k = k.reshape(B, T, N_HEAD, DH)
        v = v.reshape(B, T, N_HEAD, DH)
        ref[p + "attn.hook_q"] = q
        ref[p + "attn.hook_k"] = k
        ref[p + "attn.hook_v"] = v
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(DH)
        scores = scores.masked_fill(~causal, float("-inf"))
        ref[p + "attn.hook_attn_scores"] = scores
        pattern = out.attentions[L].detach().clone()
        assert pattern.shape == (B, N_HEAD, T, T)
        check_close(f"{p}pattern == softmax(scores)", pattern, torch.softmax(scores, dim=-1))
        ref[p + "attn.hook_pattern"] = pattern
        z = a[p + "attn.hook_z"].reshape(B, T, N_HEAD, DH)
        check_close(f"{p}z == pattern @ v", z, torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        ref[p + "attn.hook_z"] = z
        ref[p + "hook_attn_out"] = a[p + "hook_attn_out"]
        resid_mid = resid_pre + a[p + "hook_attn_out"]
        check_close(f"{p}resid_mid == ln_2 input", resid_mid, a[p + "ln2.input"])
        ref[p + "hook_resid_mid"] = resid_mid
        ref[p + "mlp.hook_pre"] = a[p + "mlp.hook_pre"]
        ref[p + "mlp.hook_post"] = a[p + "mlp.hook_post"]
        ref[p + "hook_mlp_out"] = a[p + "hook_mlp_out"]
        ref[p + "hook_resid_post"] = a[p + "hook_resid_post"]
        check_close(f"{p}resid_post == resid_mid + mlp_out", ref[p + "hook_resid_post"], resid_mid + a[p + "hook_mlp_out"])
    check_close("ln_f input == last resid_post", a["ln_final.input"], ref[f"blocks.{N_LAYER-1}.hook_resid_post"])
    scale, normed = tl_layernorm(a["ln_final.input"])
    ln_f = model.transformer.ln_f
    check_close("ln_final normalized*w+b == HF output", normed * ln_f.weight + ln_f.bias, a["ln_final.output"])
    ref["ln_final.hook_scale"] = scale
    ref["ln_final.hook_normalized"] = normed

    logits = out.logits.detach().clone()
    ref["logits"] = logits
    tgt = tokens.long()[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tgt.reshape(-1), reduction="none").view(B, T - 1)
    check_close("HF loss == mean of per-position NLL", out.loss, nll.mean())
    ref["loss"] = out.loss.detach().reshape(1)
    ref["per_seq_loss"] = nll.mean(dim=1)
    return ref


def edited_runs(model, tokens):
    tr = model.transformer
    ed = {}

    # 1. zero head 1 of blocks.0.attn.hook_z at all positions
    def zero_head(_m, args):
        z = args[0].clone()
        z[..., ZERO_HEAD * DH:(ZERO_HEAD + 1) * DH] = 0.0
        return (z,) + tuple(args[1:])

    h = tr.h[ZERO_HEAD_LAYER].attn.c_proj.register_forward_pre_hook(zero_head)
    try:
        ed[f"edit.zero_z_L{ZERO_HEAD_LAYER}_H{ZERO_HEAD}.logits"] = run(model, tokens).logits
    finally:
        h.remove()

    # 2. zero blocks.1.hook_mlp_out at positions 3 and 5
    def zero_mlp(_m, _args, out):
        out = out.clone()
        out[:, list(ZERO_MLP_POS), :] = 0.0
        return out

    h = tr.h[ZERO_MLP_LAYER].mlp.register_forward_hook(zero_mlp)
    try:
        ed[f"edit.zero_mlp_out_L{ZERO_MLP_LAYER}_pos{ZERO_MLP_POS[0]}_{ZERO_MLP_POS[1]}.logits"] = run(model, tokens).logits
    finally:
        h.remove()

    # 3. steer: add 2.0 * vector to blocks.0.hook_resid_post at all positions
    g = torch.Generator().manual_seed(SEED_STEER)
    vec32 = torch.randn(D, generator=g, dtype=torch.float32)
    vec = vec32.to(torch.float64)

    def steer(_m, _args, out):
        return (out[0] + STEER_SCALE * vec,) + tuple(out[1:])

    h = tr.h[STEER_LAYER].register_forward_hook(steer)
    try:
        ed[f"edit.steer_resid_post_L{STEER_LAYER}.logits"] = run(model, tokens).logits
    finally:
        h.remove()
    ed[f"edit.steer_resid_post_L{STEER_LAYER}.vector"] = vec32

    # 4. activation patching of blocks.1.hook_resid_pre at positions 2..7 from a second batch
    g = torch.Generator().manual_seed(SEED_PATCH_TOKENS)
    ptoks = torch.randint(0, VOCAB, (B, T), generator=g).to(torch.int32)
    src = {}

    def grab(_m, args, kwargs):
        src["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    h = tr.h[PATCH_LAYER].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run(model, ptoks)
    finally:
        h.remove()
    lo, hi = PATCH_POS

    def patch(_m, args, kwargs):
        if args:
            x = args[0].clone()
            x[:, lo:hi + 1] = src["x"][:, lo:hi + 1]
            return (x,) + tuple(args[1:]), kwargs
        x = kwargs["hidden_states"].clone()
        x[:, lo:hi + 1] = src["x"][:, lo:hi + 1]
        kwargs = dict(kwargs, hidden_states=x)
        return args, kwargs

    h = tr.h[PATCH_LAYER].register_forward_pre_hook(patch, with_kwargs=True)
    try:
        ed[f"edit.patch_resid_pre_L{PATCH_LAYER}.logits"] = run(model, tokens).logits
    finally:
        h.remove()
    ed["edit.patch.tokens"] = ptoks
    ed["edit.patch.source"] = src["x"]

    # sanity: every edit changed the logits, and the unedited model is unchanged afterwards
    base = run(model, tokens).logits
    for k, v in ed.items():
        if k.endswith(".logits"):
            assert not torch.allclose(v, base), f"{k}: edit had no effect"
    return ed, base


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    outroot = sys.argv[1]
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    tiny = os.path.join(outroot, "gpt2-tiny")
    hub = os.path.join(outroot, "gpt2-tiny-hub")
    for d in (tiny, hub):
        if os.path.isdir(d):
            shutil.rmtree(d)
    os.makedirs(tiny)

    model = build_model()
    model.save_pretrained(tiny, safe_serialization=True)
    save_hub_layout(model, hub, os.path.join(tiny, "config.json"))

    # reload both layouts and compare logits with the in-memory fp32 model
    g = torch.Generator().manual_seed(SEED_TOKENS)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g).to(torch.int32)
    want = run(model, tokens).logits
    keys_tiny = set(load_file(os.path.join(tiny, "model.safetensors")).keys())
    assert all(k.startswith("transformer.") for k in keys_tiny) and "lm_head.weight" not in keys_tiny, keys_tiny
    for d in (tiny, hub):
        m = GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager", torch_dtype=torch.float32).eval()
        got = run(m, tokens).logits
        assert torch.equal(got, want), f"reloaded {d}: logits differ by {(got - want).abs().max().item():g}"
        del m

    model = model.double()
    ref = reference_run(model, tokens)
    ed, base = edited_runs(model, tokens)
    assert torch.equal(base, ref["logits"]), "hooks leaked into the unedited run"
    check_close("fp64 vs fp32 logits", ref["logits"], want.double(), atol=1e-3, rtol=1e-3)

    tensors = {}
    for k, v in list(ref.items()) + list(ed.items()):
        if v.dtype in (torch.int32, torch.int64):
            tensors[k] = v.to(torch.int32).contiguous()
        else:
            tensors[k] = v.detach().to(torch.float32).contiguous()
    tensors["tokens"] = tokens.contiguous()
    save_file(tensors, os.path.join(tiny, "reference.safetensors"), metadata={"format": "pt"})
    np.save(os.path.join(tiny, "tokens.npy"), tokens.numpy().astype(np.int32))
    np.save(os.path.join(tiny, "tokens_flat.npy"), tokens.numpy().astype(np.int64).reshape(-1))

    # summary
    total = 0
    for d in (tiny, hub):
        for f in sorted(os.listdir(d)):
            n = os.path.getsize(os.path.join(d, f))
            total += n
            print(f"  {os.path.join(d, f)}  {n} bytes")
    print(f"total fixture size: {total} bytes ({total / 2**20:.2f} MiB)")
    print(f"reference tensors: {len(tensors)}")
    print(f"loss = {ref['loss'].item():.9f}  per_seq_loss = {[round(x, 9) for x in ref['per_seq_loss'].tolist()]}")
    assert total < 3 * 2**20, "fixtures too large"


if __name__ == "__main__":
    main()
