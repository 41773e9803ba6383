#!/usr/bin/env python3
"""Generate loupe's Llama-family reference fixtures (Llama 3 style, Qwen2, Mistral).

Usage: python3 tests/gen/gen_llama_fixture.py OUTDIR        (normally OUTDIR = tests/fixtures)

Writes, for NAME in llama-tiny, qwen2-tiny, mistral-tiny:
  OUTDIR/NAME/                 save_pretrained layout (config.json, generation_config.json, safetensors)
      llama-tiny:   LlamaForCausalLM, float32, tied embeddings (no lm_head.weight written),
                    GQA 4/2, rope_theta 5e5 with llama3 rope scaling
      qwen2-tiny:   Qwen2ForCausalLM, bfloat16, q/k/v biases, untied lm_head, GQA 4/1 (MQA),
                    rope_theta 1e6, two shards + model.safetensors.index.json
      mistral-tiny: MistralForCausalLM, float16, untied lm_head, 4/4 heads (no GQA),
                    sliding_window null
  OUTDIR/NAME/reference.safetensors
                               float64 reference run (stored as float32; ids int32) of every
                               TransformerLens hook point (from_pretrained_no_processing names and
                               shapes), `logits`, `loss`, `per_seq_loss`, `tokens`, edited runs
                               (`edit.*`) and a greedy continuation (`greedy.*`)
  OUTDIR/NAME/tokens.npy       int32 [B,T]: the reference tokens

Models are small, seeded, randomly initialised with a larger spread than the default init so the
hooks are far from degenerate. The float64 reference is run from the weights exactly as stored in
the checkpoint (bf16/f16 upcast). Activations are recorded with forward hooks / pre-hooks on the
Hugging Face modules; rotary, scores, pattern and RMSNorm scale/normalized are recomputed from the
hooked values with the model's own rotary module and apply_rotary_pos_emb and checked against
what the model itself computed.

transformers 4.46.3 computes three things in float32 even in a float64 model: RMSNorm
(hidden_states.to(torch.float32)), the rotary cos/sin (inv_freq and positions .float()) and the
attention softmax (dtype=torch.float32). `exact_float64` below removes those islands for the
reference runs (RMSNorm in the input dtype, rotary from a float64 inv_freq computed here and
checked against HF's, softmax in float64); the script checks that the plain HF float64 run agrees
with the exact one to float32 rounding, so the patches change rounding only.

The helpers (exact_float64, Recorder, reference_hooks) are shared with gen_smollm2_fixture.py.
"""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import contextlib
import json
import math
import shutil
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

B, T = 2, 16
GREEDY_PROMPT, GREEDY_NEW = 8, 16
GREEDY_CANDIDATES = 64
GREEDY_MIN_MARGIN = 1e-2  # float64 top-1 minus top-2 logit; far above fp32 noise (~1e-5 here)

SPECS = {
    "llama-tiny": dict(
        cls=LlamaForCausalLM, cfg_cls=LlamaConfig, seed=10, vocab=1000, layers=2, d=64, heads=4, kv=2, mlp=160,
        eps=1e-5, tied=True, embed_std=0.25, dtype=torch.float32, shard=None,
        extra=dict(
            rope_theta=500000.0,
            # llama3 scaling with original context 64: with d_head 16 and theta 5e5 the wavelengths are
            # 6.3, 32.4, 167, ... so one frequency is kept (< 64/4), one is smoothed (16..64) and the
            # rest are divided by 8: all three branches of the llama3 rule are exercised.
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64},
            max_position_embeddings=512, attention_bias=False, mlp_bias=False,
            bos_token_id=1, eos_token_id=2),
        edits=(("z", 0, 1), ("v", 1, 1)),
    ),
    "qwen2-tiny": dict(
        cls=Qwen2ForCausalLM, cfg_cls=Qwen2Config, seed=20, vocab=1000, layers=2, d=64, heads=4, kv=1, mlp=128,
        eps=1e-6, tied=False, dtype=torch.bfloat16, shard="260KB",
        extra=dict(rope_theta=1000000.0, max_position_embeddings=128, use_sliding_window=False,
                   bos_token_id=998, eos_token_id=999),
        edits=(("z", 1, 2),),
    ),
    "mistral-tiny": dict(
        cls=MistralForCausalLM, cfg_cls=MistralConfig, seed=30, vocab=1000, layers=2, d=64, heads=4, kv=4, mlp=192,
        eps=1e-5, tied=False, dtype=torch.float16, shard=None,
        extra=dict(rope_theta=10000.0, max_position_embeddings=128, sliding_window=None,
                   bos_token_id=1, eos_token_id=2),
        edits=(("z", 0, 3),),
    ),
}


def check_close(name, a, b, atol=1e-10, rtol=1e-10):
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
    fa, fb = torch.isinf(a), torch.isinf(b)
    if not torch.equal(fa, fb) or not torch.equal(a[fa], b[fb]):
        raise AssertionError(f"{name}: infinities differ")
    a, b = a[~fa], b[~fb]
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        raise AssertionError(f"{name}: max abs diff {(a - b).abs().max().item():g}")


def max_rel(a, b):
    """max |a - b| / max |b|: the metric the C tests use for logits."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def nmse(a, b):
    fin = torch.isfinite(b)
    a, b = a.double()[fin], b.double()[fin]
    return (((a - b) ** 2).sum() / (b ** 2).sum()).item()


# ---------------------------------------------------------------------------------------------
# float64 rotary frequencies, written from the Llama 3.1 reference rule (not from HF's code)

def inv_freq_f64(config):
    dh = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv = 1.0 / (float(config.rope_theta) ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
    rs = getattr(config, "rope_scaling", None)
    kind = (rs or {}).get("rope_type", (rs or {}).get("type", "default"))
    if kind == "default":
        return torch.from_numpy(inv), ["plain"] * len(inv)
    assert kind == "llama3", kind
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    out, bands = [], []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(f)
            bands.append("kept")
        elif wavelen > old / lo:
            out.append(f / factor)
            bands.append("divided")
        else:
            s = (old / wavelen - lo) / (hi - lo)
            out.append((1 - s) * f / factor + s * f)
            bands.append(f"smoothed(s={s:.3f})")
    return torch.tensor(out, dtype=torch.float64), bands


@contextlib.contextmanager
def exact_float64(model):
    """Removes transformers' float32 islands (RMSNorm, rotary, softmax) for a float64 model."""
    assert model.dtype == torch.float64
    saved = []
    inv64, _ = inv_freq_f64(model.config)

    def rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        freqs = position_ids[:, :, None].to(torch.float64) * inv64[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    for mod in model.modules():
        cname = type(mod).__name__
        if cname.endswith("RMSNorm"):
            saved.append((mod, "forward" in mod.__dict__, mod.__dict__.get("forward")))
            mod.forward = types.MethodType(rms_forward, mod)
        elif cname.endswith("RotaryEmbedding"):
            hf = mod.inv_freq.to(torch.float64)
            rel = ((hf - inv64).abs() / inv64).max().item()
            assert rel < 1e-6, f"{cname}: HF inv_freq differs from the float64 rule by {rel:g}"
            assert getattr(mod, "attention_scaling", 1.0) == 1.0
            saved.append((mod, "forward" in mod.__dict__, mod.__dict__.get("forward")))
            mod.forward = types.MethodType(rope_forward, mod)
    orig_softmax = F.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and input.dtype == torch.float64:
            dtype = None
        return orig_softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = orig_softmax
        for mod, had, fwd in saved:
            if had:
                mod.forward = fwd
            else:
                del mod.forward


# ---------------------------------------------------------------------------------------------
# hook recording

class Recorder:
    """Forward hooks on the HF Llama-family modules, recording the raw values the hooks need."""

    def __init__(self, model):
        self.acts = {}
        self.handles = []
        m = model.model
        self._hook(m.embed_tokens, "hook_embed")
        for L, blk in enumerate(m.layers):
            p = f"blocks.{L}."
            at = blk.self_attn
            self._pre(blk, p + "hook_resid_pre")
            self._hook(blk, p + "hook_resid_post")
            self._pre(blk.input_layernorm, p + "ln1.input")
            self._hook(blk.input_layernorm, p + "ln1.output")
            self._pre(at.q_proj, p + "attn.input")
            self._hook(at.q_proj, p + "attn.q_proj")
            self._hook(at.k_proj, p + "attn.k_proj")
            self._hook(at.v_proj, p + "attn.v_proj")
            self._pre(at.o_proj, p + "attn.o_proj.input")
            self._hook(at.o_proj, p + "attn.o_proj.output")
            self._hook(at, p + "attn.output", keep_tuple=True)
            self._pre(blk.post_attention_layernorm, p + "ln2.input")
            self._hook(blk.post_attention_layernorm, p + "ln2.output")
            self._pre(blk.mlp, p + "mlp.input")
            self._hook(blk.mlp.gate_proj, p + "mlp.hook_pre")
            self._hook(blk.mlp.up_proj, p + "mlp.hook_pre_linear")
            self._pre(blk.mlp.down_proj, p + "mlp.hook_post")
            self._hook(blk.mlp, p + "hook_mlp_out")
        self._pre(m.norm, "ln_final.input")
        self._hook(m.norm, "ln_final.output")
        self._pre(model.lm_head, "lm_head.input")

    def _hook(self, mod, name, keep_tuple=False):
        def fn(_m, _args, out):
            if keep_tuple:
                self.acts[name] = tuple(o.detach().clone() if torch.is_tensor(o) else o for o in out)
            else:
                self.acts[name] = (out[0] if isinstance(out, (tuple, list)) else out).detach().clone()

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


def rotary_module(model, L):
    """The rotary module the model itself uses for layer L (model-level in Llama/Qwen2, per layer in Mistral)."""
    rot = getattr(model.model, "rotary_emb", None)
    return rot if rot is not None else model.model.layers[L].self_attn.rotary_emb


def rms_hooks(x, eps):
    """TransformerLens RMSNorm hook values: scale = sqrt(mean(x^2) + eps), normalized = x / scale."""
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return scale, x / scale


def reference_hooks(model, tokens, keep=None):
    """One float64 forward (inside exact_float64) with every TransformerLens hook recomputed from the
    hooked HF values and cross-checked against the model's own computation. Returns (ref, logits).
    keep: None for every hook, else a set of hook names to return."""
    cfg = model.config
    nb, nt = tokens.shape
    D, H, KV = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    DH = getattr(cfg, "head_dim", None) or D // H
    G = H // KV
    eps = cfg.rms_norm_eps
    rec = Recorder(model)
    try:
        out = run(model, tokens, output_attentions=True)
    finally:
        rec.remove()
    a = rec.acts
    ref = {}

    def put(name, val):
        if keep is None or name in keep:
            ref[name] = val

    put("hook_embed", a["hook_embed"])
    check_close("embed == embedding rows", a["hook_embed"], model.model.embed_tokens.weight[tokens.long()])
    causal = torch.tril(torch.ones(nt, nt, dtype=torch.bool))
    pos_ids = torch.arange(nt)[None, :].expand(nb, nt)
    prev_post = None
    for L, blk in enumerate(model.model.layers):
        p = f"blocks.{L}."
        at = blk.self_attn
        resid_pre = a[p + "hook_resid_pre"]
        check_close(f"{p}resid_pre == previous output", resid_pre, a["hook_embed"] if L == 0 else prev_post)
        put(p + "hook_resid_pre", resid_pre)
        check_close(f"{p}ln1 input == resid_pre", a[p + "ln1.input"], resid_pre)
        scale, normed = rms_hooks(resid_pre, eps)
        check_close(f"{p}ln1 normalized*w == HF output", normed * blk.input_layernorm.weight, a[p + "ln1.output"])
        check_close(f"{p}attn input == ln1 output", a[p + "attn.input"], a[p + "ln1.output"])
        put(p + "ln1.hook_scale", scale)
        put(p + "ln1.hook_normalized", normed)
        q = a[p + "attn.q_proj"].reshape(nb, nt, H, DH)
        k = a[p + "attn.k_proj"].reshape(nb, nt, KV, DH)
        v = a[p + "attn.v_proj"].reshape(nb, nt, KV, DH)
        x1 = a[p + "ln1.output"]
        lin = lambda lay, x: F.linear(x, lay.weight, lay.bias)  # noqa: E731
        check_close(f"{p}q == q_proj(x)", q.reshape(nb, nt, -1), lin(at.q_proj, x1))
        put(p + "attn.hook_q", q)
        put(p + "attn.hook_k", k)
        put(p + "attn.hook_v", v)
        cos, sin = rotary_module(model, L)(v, pos_ids)
        rq, rk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        rq, rk = rq.transpose(1, 2), rk.transpose(1, 2)  # [B,T,H,DH], [B,T,KV,DH]
        put(p + "attn.hook_rot_q", rq)
        put(p + "attn.hook_rot_k", rk)
        rk_h = rk.repeat_interleave(G, dim=2)  # query head h reads kv head h // G
        v_h = v.repeat_interleave(G, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", rq, rk_h) / math.sqrt(DH)
        scores = scores.masked_fill(~causal, float("-inf"))
        put(p + "attn.hook_attn_scores", scores)
        attn_out_tuple = a[p + "attn.output"]
        pattern = attn_out_tuple[1]
        assert pattern.shape == (nb, H, nt, nt), pattern.shape
        check_close(f"{p}pattern == softmax(scores) (HF eager attention weights)", pattern, torch.softmax(scores, -1))
        put(p + "attn.hook_pattern", pattern)
        z = a[p + "attn.o_proj.input"].reshape(nb, nt, H, DH)
        check_close(f"{p}z == pattern @ v", z, torch.einsum("bhqk,bkhd->bqhd", pattern, v_h))
        put(p + "attn.hook_z", z)
        attn_out = a[p + "attn.o_proj.output"]
        check_close(f"{p}attn_out == o_proj(z)", attn_out, lin(at.o_proj, z.reshape(nb, nt, H * DH)))
        check_close(f"{p}attn_out == self_attn output", attn_out, attn_out_tuple[0])
        put(p + "hook_attn_out", attn_out)
        resid_mid = resid_pre + attn_out
        check_close(f"{p}resid_mid == ln2 input", resid_mid, a[p + "ln2.input"])
        put(p + "hook_resid_mid", resid_mid)
        scale2, normed2 = rms_hooks(resid_mid, eps)
        check_close(f"{p}ln2 normalized*w == HF output", normed2 * blk.post_attention_layernorm.weight, a[p + "ln2.output"])
        check_close(f"{p}mlp input == ln2 output", a[p + "mlp.input"], a[p + "ln2.output"])
        put(p + "ln2.hook_scale", scale2)
        put(p + "ln2.hook_normalized", normed2)
        x2 = a[p + "ln2.output"]
        pre, pre_lin = a[p + "mlp.hook_pre"], a[p + "mlp.hook_pre_linear"]
        check_close(f"{p}mlp pre == gate_proj(x)", pre, lin(blk.mlp.gate_proj, x2))
        check_close(f"{p}mlp pre_linear == up_proj(x)", pre_lin, lin(blk.mlp.up_proj, x2))
        post = a[p + "mlp.hook_post"]
        check_close(f"{p}mlp post == silu(pre) * pre_linear", post, F.silu(pre) * pre_lin)
        put(p + "mlp.hook_pre", pre)
        put(p + "mlp.hook_pre_linear", pre_lin)
        put(p + "mlp.hook_post", post)
        mlp_out = a[p + "hook_mlp_out"]
        check_close(f"{p}mlp_out == down_proj(post)", mlp_out, lin(blk.mlp.down_proj, post))
        put(p + "hook_mlp_out", mlp_out)
        resid_post = a[p + "hook_resid_post"]
        check_close(f"{p}resid_post == resid_mid + mlp_out", resid_post, resid_mid + mlp_out)
        put(p + "hook_resid_post", resid_post)
        prev_post = resid_post
    check_close("ln_final input == last resid_post", a["ln_final.input"], prev_post)
    scale, normed = rms_hooks(prev_post, eps)
    check_close("ln_final normalized*w == HF output", normed * model.model.norm.weight, a["ln_final.output"])
    put("ln_final.hook_scale", scale)
    put("ln_final.hook_normalized", normed)
    logits = out.logits.detach().clone()
    assert logits.dtype == torch.float64
    check_close("logits == (normalized*w) @ W_U^T", logits, (normed * model.model.norm.weight) @ model.lm_head.weight.T)
    return ref, logits


# ---------------------------------------------------------------------------------------------
# the tiny models

def build_config(spec):
    kw = dict(
        vocab_size=spec["vocab"], hidden_size=spec["d"], intermediate_size=spec["mlp"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv"],
        rms_norm_eps=spec["eps"], hidden_act="silu", tie_word_embeddings=spec["tied"], attention_dropout=0.0,
        torch_dtype=spec["dtype"],
    )
    kw.update(spec["extra"])
    return spec["cfg_cls"](**kw)


def build_model(spec):
    torch.manual_seed(spec["seed"])
    model = spec["cls"]._from_config(build_config(spec), attn_implementation="eager", torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is listed once (as embed_tokens)
            if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                p.normal_(0.0, spec.get("embed_std", 0.5))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
            elif name.endswith(".weight") and p.dim() == 2:
                p.normal_(0.0, 0.1)
            else:
                raise RuntimeError(f"unhandled parameter {name} {tuple(p.shape)}")
    if spec["tied"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.eval()
    return model.to(spec["dtype"])


def greedy(model, prompt, n_new):
    """Greedy continuation by full recomputation (no cache): tokens and top-1 minus top-2 margins."""
    ids = prompt.clone().long()[None, :]
    toks, margins = [], []
    for _ in range(n_new):
        logits = run(model, ids).logits[0, -1]
        top = torch.topk(logits, 2)
        toks.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        ids = torch.cat([ids, top.indices[:1][None, :]], dim=1)
    return toks, margins


def greedy_cached(model, prompt, n_new):
    """The same greedy continuation through HF's KV cache (one new token per forward)."""
    with torch.no_grad():
        out = model(input_ids=prompt.long()[None, :], use_cache=True)
        toks = []
        for i in range(n_new):
            nxt = out.logits[0, -1].argmax()
            toks.append(int(nxt))
            if i + 1 < n_new:
                out = model(input_ids=nxt.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return toks


def edited_run(model, tokens, what, layer, head):
    """zero one head of hook_z (query head) or hook_v (kv head) at every position."""
    cfg = model.config
    DH = cfg.hidden_size // cfg.num_attention_heads
    at = model.model.layers[layer].self_attn
    sl = slice(head * DH, (head + 1) * DH)
    if what == "z":
        def fn(_m, args):
            z = args[0].clone()
            z[..., sl] = 0.0
            return (z,) + tuple(args[1:])

        h = at.o_proj.register_forward_pre_hook(fn)
    else:
        def fn(_m, _args, out):
            out = out.clone()
            out[..., sl] = 0.0
            return out

        h = at.v_proj.register_forward_hook(fn)
    try:
        return run(model, tokens).logits
    finally:
        h.remove()


def make_fixture(name, spec, outroot):
    d = os.path.join(outroot, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    model = build_model(spec)
    kw = {"safe_serialization": True}
    if spec["shard"]:
        kw["max_shard_size"] = spec["shard"]
    model.save_pretrained(d, **kw)
    files = sorted(os.listdir(d))
    st = [f for f in files if f.endswith(".safetensors")]
    if spec["shard"]:
        assert len(st) == 2 and "model.safetensors.index.json" in files, files
    else:
        assert st == ["model.safetensors"], files
    keys = set()
    for f in st:
        sd = load_file(os.path.join(d, f))
        keys |= set(sd)
        want = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}[spec["dtype"]]
        assert all(v.dtype == want for v in sd.values()), f"{f}: dtypes {set(v.dtype for v in sd.values())}"
    assert ("lm_head.weight" in keys) == (not spec["tied"]), sorted(keys)
    cfgj = json.load(open(os.path.join(d, "config.json")))
    print(f"[{name}] {cfgj['architectures']} torch_dtype={cfgj['torch_dtype']} tie={cfgj['tie_word_embeddings']} "
          f"files={files}")

    g = torch.Generator().manual_seed(spec["seed"] + 1)
    tokens = torch.randint(0, spec["vocab"], (B, T), generator=g).to(torch.int32)

    # The reference runs from the checkpoint as written (bf16/f16 weights upcast exactly).
    m32 = spec["cls"].from_pretrained(d, attn_implementation="eager", torch_dtype=torch.float32).eval()
    mine = dict(model.named_parameters())
    for n, p in m32.named_parameters():
        assert torch.equal(p, mine[n].float()), f"reloaded {d}: {n} differs"
    got32 = run(m32, tokens).logits
    if spec["dtype"] == torch.float32:
        assert torch.equal(got32, run(model, tokens).logits), f"reloaded {d}: logits differ"
    m64 = spec["cls"].from_pretrained(d, attn_implementation="eager", torch_dtype=torch.float64).eval()
    for (n1, p1), (n2, p2) in zip(m32.named_parameters(), m64.named_parameters()):
        assert n1 == n2 and torch.equal(p1.double(), p2), n1
    if spec["tied"]:
        assert m64.lm_head.weight.data_ptr() == m64.model.embed_tokens.weight.data_ptr()
    inv, bands = inv_freq_f64(m64.config)
    print(f"[{name}] rotary inv_freq: " + ", ".join(f"{f:.4g} {b}" for f, b in zip(inv.tolist(), bands)))

    plain64 = run(m64, tokens).logits  # HF float64 with its float32 islands
    with exact_float64(m64):
        ref, logits = reference_hooks(m64, tokens)
        hf_loss = run(m64, tokens, labels=tokens.long()).loss
        edits = {}
        for what, layer, head in spec["edits"]:
            e = edited_run(m64, tokens, what, layer, head)
            assert not torch.allclose(e, logits), f"edit {what} L{layer} H{head} had no effect"
            edits[f"edit.zero_{what}_L{layer}_H{head}.logits"] = e
        assert torch.equal(run(m64, tokens).logits, logits), "hooks leaked into the unedited run"
        # greedy: of a few seeded random prompts, the one with the most distinct new tokens among
        # those whose every float64 margin is comfortable (random models like to repeat a token)
        g2 = torch.Generator().manual_seed(spec["seed"] + 2)
        best = None
        for cand in range(GREEDY_CANDIDATES):
            p = torch.randint(0, spec["vocab"], (GREEDY_PROMPT,), generator=g2).to(torch.int32)
            gt, gm = greedy(m64, p, GREEDY_NEW)
            if min(gm) > GREEDY_MIN_MARGIN and (best is None or len(set(gt)) > len(set(best[1]))):
                best = (p, gt, gm, cand)
        assert best is not None, f"{name}: no prompt with all greedy margins > {GREEDY_MIN_MARGIN}"
        prompt, gtoks, gmarg, start = best
        # greedy with HF's KV cache agrees with the full recomputation
        assert greedy_cached(m64, prompt, GREEDY_NEW) == gtoks
    mr = max_rel(plain64, logits)
    print(f"[{name}] plain HF float64 (float32 islands) vs exact float64 logits: max_rel {mr:.2e}")
    assert mr < 1e-5
    mr = max_rel(got32, logits)
    print(f"[{name}] HF float32 vs exact float64 logits: max_rel {mr:.2e}")
    assert mr < 1e-4

    # calibration for the C budgets: HF's own float32 run against the reference, hook by hook
    worst = calibrate_f32(spec, d, tokens, ref)
    print(f"[{name}] HF float32 hooks vs reference: worst nmse {worst[1]:.2e} at {worst[0]}")

    tgt = tokens.long()[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, spec["vocab"]), tgt.reshape(-1), reduction="none").view(B, T - 1)
    assert abs(hf_loss.item() - nll.mean().item()) < 1e-5, (hf_loss.item(), nll.mean().item())
    n_hooks = 1 + 20 * spec["layers"] + 2
    assert len(ref) == n_hooks, (len(ref), n_hooks)

    tensors = {k: v.to(torch.float32).contiguous() for k, v in ref.items()}
    tensors["logits"] = logits.to(torch.float32).contiguous()
    tensors["loss"] = nll.mean().reshape(1).to(torch.float32)
    tensors["per_seq_loss"] = nll.mean(dim=1).to(torch.float32)
    tensors["tokens"] = tokens.contiguous()
    for k, v in edits.items():
        tensors[k] = v.to(torch.float32).contiguous()
    tensors["greedy.prompt"] = prompt.to(torch.int32).clone()
    tensors["greedy.tokens"] = torch.tensor(gtoks, dtype=torch.int32)
    tensors["greedy.margin"] = torch.tensor(gmarg, dtype=torch.float32)
    save_file(tensors, os.path.join(d, "reference.safetensors"), metadata={"format": "pt"})
    np.save(os.path.join(d, "tokens.npy"), tokens.numpy().astype(np.int32))

    total = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"[{name}] hooks {len(ref)}, loss {nll.mean().item():.6f}, greedy from candidate {start}: {gtoks} "
          f"(min margin {min(gmarg):.4f}), edits {list(edits)}")
    print(f"[{name}] {total} bytes ({total / 2**20:.2f} MiB)")
    assert total < 1.5 * 2**20, f"{name}: fixture too large"
    return total


def calibrate_f32(spec, d, tokens, ref):
    """Runs the checkpoint in HF float32 and returns the worst (hook, nmse) against the reference."""
    m32 = spec["cls"].from_pretrained(d, attn_implementation="eager", torch_dtype=torch.float32).eval()
    rec = Recorder(m32)
    try:
        run(m32, tokens)
    finally:
        rec.remove()
    worst = ("", 0.0)
    for k in sorted(set(rec.acts) & set(ref)):
        e = nmse(rec.acts[k], ref[k])
        if e > worst[1]:
            worst = (k, e)
    return worst


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    outroot = sys.argv[1]
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    total = 0
    for name, spec in SPECS.items():
        total += make_fixture(name, spec, outroot)
    print(f"total: {total} bytes ({total / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
