#!/usr/bin/env python3
"""Generate loupe's Gemma 2 and Gemma 3 reference fixtures (tiny random models).

Usage: python3 tests/gen/gen_gemma_fixture.py OUTDIR        (normally OUTDIR = tests/fixtures)

Writes, for NAME in gemma2-tiny, gemma3-tiny:
  OUTDIR/NAME/                 save_pretrained layout (config.json, generation_config.json,
                               model.safetensors in float32)
      gemma2-tiny: Gemma2ForCausalLM, 3 layers (sliding, full, sliding), GQA 4/2, head_dim 8
                   (not d_model / n_heads), sliding window 4 < the 9 tokens of a row,
                   attention-logit soft-cap 2 and final-logit soft-cap 3 (low, so that they
                   bend), query_pre_attn_scalar 12 (not head_dim), tied embeddings
      gemma3-tiny: Gemma3ForCausalLM (model_type gemma3_text), 6 layers in the 5 local :
                   1 global pattern (layer 5 global), q/k RMSNorm, sliding window 4, rope
                   theta 1e4 on local layers and 1e6 on the global one, no soft-capping,
                   query_pre_attn_scalar 10, tied embeddings
  OUTDIR/NAME/tokens.npy       int32 [2, 9]: the reference tokens
  OUTDIR/NAME/reference.safetensors
      `tokens` (int32), `logits` [2, 9, vocab] and `loss` (mean next-token cross-entropy)
      from Hugging Face transformers in float64 with its float32 islands removed (below);
      every hook TransformerLens's HookedTransformer fires in a default forward, named and
      shaped as TransformerLens names and shapes them (from_pretrained_no_processing: no
      folding, no centering), and `grad.NAME`, the gradient of the loss at each of those
      hooks (TransformerLens's backward hooks, torch autograd). All stored as float32,
      computed in float64.

The HookedTransformer is built offline: TransformerLens 3.9 knows Gemma only through the
hard-coded configs of the official checkpoints (convert_hf_model_config picks them by name),
so this script writes the same HookedTransformerConfig fields those entries use
(google/gemma-2-2b and google/gemma-3-270m) with the tiny models' sizes, then runs
TransformerLens's own weight converter (convert_gemma_weights) and
load_and_process_state_dict with every processing step off.

transformers 5 computes the RMSNorm (x.float(), weight.float()), the rotary tables
(inv_freq and positions .float()) and the eager attention softmax (dtype=torch.float32) in
float32 even in a float64 model. `exact_float64` removes those islands (as in
gen_llama_fixture.py) for the reference run; the script checks that plain float64 HF
agrees with it to float32 rounding, that TransformerLens's logits agree with it to float64
rounding (the hooks then come from a computation equal to HF's), and that TransformerLens's
gradients at every layer's residual stream equal torch autograd's through the exact HF
model.

TransformerLens 3.9 passes every weight through float32 on loading (process_weights upcasts
reduced precisions to float32 and so also rounds float64 down), and its converter forms each
Gemma norm weight (1 + w) in float32 and the embedding sqrt(d_model) * W_E. The checkpoint is
float32, so only those two derived weights could round: the random norm weights here are
multiples of 2^-10 and the embeddings multiples of 2^-12, with d_model = 36 (sqrt 6, which
HF's float32 embed_scale buffer also holds exactly), so both are exact in float32 and the
comparison stays at float64 rounding. process_weights also rounds the rotary sin/cos tables
(buffers in the state dict); they are rebuilt in float64 by TransformerLens's own
calculate_sin_cos_rotary after loading.

Pinned: tests/gen/requirements-gemma.txt (torch, transformers, transformer-lens, tokenizers,
safetensors, numpy). Deterministic: fixed seeds, one thread.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import contextlib
import importlib.metadata
import math
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from transformer_lens import HookedTransformer
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights

PINS = {"torch": "2.15.0", "transformers": "5.25.0", "transformer-lens": "3.9.0", "safetensors": "0.8.0",
        "numpy": "2.4.6"}

B, T = 2, 9
F64 = torch.float64

COMMON = dict(vocab_size=131, hidden_size=36, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
              sliding_window=4, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
              attention_bias=False)

SPECS = {
    "gemma2-tiny": dict(
        seed=21, cls=Gemma2ForCausalLM,
        cfg=lambda: Gemma2Config(**COMMON, num_hidden_layers=3, query_pre_attn_scalar=12,
                                 attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "gemma3-tiny": dict(
        seed=31, cls=Gemma3ForCausalLM,
        cfg=lambda: Gemma3TextConfig(**COMMON, num_hidden_layers=6, query_pre_attn_scalar=10,
                                     attn_logit_softcapping=None, final_logit_softcapping=None,
                                     layer_types=["sliding_attention"] * 5 + ["full_attention"],
                                     rope_parameters={
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
    ),
}


def check_pins():
    for pkg, want in PINS.items():
        have = importlib.metadata.version(pkg)
        if have != want:
            sys.exit(f"gen_gemma_fixture.py: needs {pkg}=={want}, found {have}")


# ---------------------------------------------------------------------------------------------
# the model

def build_model(spec):
    torch.manual_seed(spec["seed"])
    cfg = spec["cfg"]()
    cfg._attn_implementation = "eager"
    model = spec["cls"](cfg).to(torch.float32)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # 1 + w must be exact in float32 (TransformerLens forms it there): a 2^-10 grid
                p.copy_(torch.round(torch.randn(p.shape, generator=g) * 0.3 * 1024) / 1024)
            elif "embed_tokens" in name:
                # sqrt(d_model) * w must be exact in float32 too: a 2^-12 grid, d_model = 36
                p.copy_(torch.round(torch.randn(p.shape, generator=g) * 0.5 * 4096) / 4096)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.2 / math.sqrt(p.shape[-1])))
    model.eval()
    return model


def inv_freq(theta, dim):
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(F64) / dim))


@contextlib.contextmanager
def exact_float64(model):
    """Removes transformers' float32 islands (RMSNorm, rotary, softmax) in a float64 Gemma."""
    assert model.dtype == F64
    saved = []
    cfg = model.config
    dim = cfg.head_dim
    rp = cfg.rope_parameters
    per_type = {k: inv_freq(v["rope_theta"], dim) for k, v in rp.items()} if "rope_theta" not in rp else None
    single = inv_freq(rp["rope_theta"], dim) if per_type is None else None

    def rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + self.eps)) * (1.0 + self.weight)

    def table(inv, x, position_ids):
        freqs = position_ids[:, :, None].to(F64) * inv[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def rope2(self, x, position_ids):
        return table(single, x, position_ids)

    def rope3(self, x, position_ids, layer_type):
        return table(per_type[layer_type], x, position_ids)

    for mod in model.modules():
        cname = type(mod).__name__
        if cname.endswith("RMSNorm"):
            saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = types.MethodType(rms_forward, mod)
        elif cname.endswith("RotaryEmbedding"):
            if per_type is None:
                hf = mod.inv_freq.to(F64)
                assert ((hf - single).abs() / single).max().item() < 1e-6
                assert mod.attention_scaling == 1.0
            else:
                for k, inv in per_type.items():
                    hf = getattr(mod, f"{k}_inv_freq").to(F64)
                    assert ((hf - inv).abs() / inv).max().item() < 1e-6, k
                    assert getattr(mod, f"{k}_attention_scaling") == 1.0
            saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = types.MethodType(rope2 if per_type is None else rope3, mod)
    orig_softmax = F.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if dtype == torch.float32 and input.dtype == F64:
            dtype = None
        return orig_softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = orig_softmax
        for mod, fwd in saved:
            if fwd is not None:
                mod.forward = fwd
            else:
                del mod.forward


# ---------------------------------------------------------------------------------------------
# TransformerLens

def tl_config(hf):
    """The HookedTransformerConfig fields TransformerLens 3.9 writes for google/gemma-2-2b and
    google/gemma-3-270m, with this model's sizes."""
    c = hf.config
    gemma3 = c.model_type == "gemma3_text"
    local = ["local" if t == "sliding_attention" else "global" for t in c.layer_types]
    d = dict(
        d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        act_fn="gelu_pytorch_tanh", initializer_range=0.02, normalization_type="RMS",
        positional_embedding_type="rotary", use_attn_scale=True, attn_scale=math.sqrt(c.query_pre_attn_scalar),
        n_key_value_heads=c.num_key_value_heads, window_size=c.sliding_window, use_local_attn=True,
        attn_types=local, gated_mlp=True, final_rms=True, use_normalization_before_and_after=True,
        original_architecture="Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM",
        model_name="tiny", init_weights=False, tokenizer_name=None, device="cpu", dtype=F64,
        default_prepend_bos=True,
    )
    if gemma3:
        d.update(rotary_base=c.rope_parameters["full_attention"]["rope_theta"],
                 rotary_base_local=c.rope_parameters["sliding_attention"]["rope_theta"], use_qk_norm=True)
    else:
        d.update(rotary_base=c.rope_parameters["rope_theta"], attn_scores_soft_cap=c.attn_logit_softcapping,
                 output_logits_soft_cap=c.final_logit_softcapping)
    return HookedTransformerConfig.from_dict(d)


def build_tl(hf64):
    cfg = tl_config(hf64)
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(convert_gemma_weights(hf64, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)
    # process_weights also passed the rotary sin/cos buffers through float32: rebuild them
    # in float64 with TransformerLens's own calculate_sin_cos_rotary
    for blk in model.blocks:
        a = blk.attn
        sin, cos = a.calculate_sin_cos_rotary(cfg.rotary_dim, a.rotary_sin.shape[0], base=a._rotary_base(), dtype=F64)
        assert (sin - a.rotary_sin).abs().max().item() < 1e-7 and (cos - a.rotary_cos).abs().max().item() < 1e-7
        a.rotary_sin.copy_(sin)
        a.rotary_cos.copy_(cos)
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------

def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_resid_grads(hf64, tokens):
    """Loss, logits and d loss / d (each decoder layer's input and the final norm's input),
    by torch autograd through the exact float64 HF model."""
    acts = {}
    handles = []
    for L, layer in enumerate(hf64.model.layers):
        def pre(_m, args, kwargs, L=L):
            x = args[0] if args else kwargs["hidden_states"]
            x.retain_grad()
            acts[f"blocks.{L}.hook_resid_pre"] = x
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))

    def pre_norm(_m, args):
        args[0].retain_grad()
        acts[f"blocks.{len(hf64.model.layers) - 1}.hook_resid_post"] = args[0]
    handles.append(hf64.model.norm.register_forward_pre_hook(pre_norm))
    with exact_float64(hf64):
        out = hf64(tokens)
    logits = out.logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    for h in handles:
        h.remove()
    return logits.detach(), loss.detach(), {k: (v.detach(), v.grad) for k, v in acts.items()}


def make_fixture(name, spec, outroot):
    out = os.path.join(outroot, name)
    os.makedirs(out, exist_ok=True)
    model = build_model(spec)
    model.save_pretrained(out, safe_serialization=True)
    g = torch.Generator().manual_seed(spec["seed"] + 2)
    tokens = torch.randint(3, model.config.vocab_size, (B, T), generator=g)
    tokens[:, 0] = model.config.bos_token_id
    np.save(os.path.join(out, "tokens.npy"), tokens.to(torch.int32).numpy())

    # reload from disk, so the reference is of the checkpoint as written
    hf64 = spec["cls"].from_pretrained(out, dtype=F64, attn_implementation="eager")
    hf64.eval()
    with torch.no_grad():
        plain = hf64(tokens).logits
    ref_logits, ref_loss, hf_acts = hf_resid_grads(hf64, tokens)
    mr = max_rel(plain, ref_logits)
    print(f"[{name}] plain HF float64 (float32 islands) vs exact float64 logits: max rel {mr:.2e}")
    assert mr < 1e-5, name

    tl = build_tl(hf64)
    # every hook a default forward fires, and the loss's gradient at each (backward hooks)
    loss, cache = tl.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    fwd = {k: v.detach() for k, v in cache.items() if not k.endswith("_grad")}
    bwd = {k[: -len("_grad")]: v.detach() for k, v in cache.items() if k.endswith("_grad")}
    with torch.no_grad():
        logits = tl(tokens)
    err = max_rel(logits, ref_logits)
    print(f"[{name}] TransformerLens vs exact HF float64 logits: max rel {err:.2e}; loss {loss.item():.12f} vs "
          f"{ref_loss.item():.12f}")
    assert err < 1e-12, f"{name}: TransformerLens logits differ from HF's (max rel {err:.3g})"
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    # TransformerLens soft-caps the final logits after unembed.hook_out: the hook holds them uncapped
    cap = getattr(hf64.config, "final_logit_softcapping", None)
    capped = cap * torch.tanh(fwd["unembed.hook_out"] / cap) if cap else fwd["unembed.hook_out"]
    assert max_rel(capped, logits) < 1e-14, f"{name}: unembed.hook_out is not the (uncapped) logits"
    for k, (x, gx) in hf_acts.items():
        e1, e2 = max_rel(fwd[k], x), max_rel(bwd[k], gx)
        assert e1 < 1e-12 and e2 < 1e-10, f"{name} {k}: activation {e1:.3g}, gradient {e2:.3g} vs HF autograd"
    print(f"[{name}] {len(fwd)} hooks, {len(bwd)} gradients; residual-stream gradients match HF autograd")
    # the sliding window must matter: the last query of a row sees the first key only on global layers
    for L, t in enumerate(hf64.config.layer_types):
        far = fwd[f"blocks.{L}.attn.hook_pattern"][:, :, T - 1, 0].abs().max().item()
        assert (far > 1e-3) == (t == "full_attention"), f"{name} layer {L} ({t}): pattern[T-1, 0] = {far:g}"
    missing = sorted(set(fwd) - set(bwd))
    assert not missing, f"{name}: hooks without a gradient: {missing}"

    ref = {"tokens": tokens.to(torch.int32).contiguous(), "logits": ref_logits.to(torch.float32).contiguous(),
           "loss": ref_loss.to(torch.float32).reshape(())}
    for k in sorted(fwd):
        ref[k] = fwd[k].to(torch.float32).contiguous()
        ref["grad." + k] = bwd[k].to(torch.float32).contiguous()
    meta = {"generator": f"gen_gemma_fixture.py: transformers {transformers.__version__}, torch {torch.__version__}, "
                         f"transformer_lens {importlib.metadata.version('transformer-lens')}; {len(fwd)} hooks"}
    save_file(ref, os.path.join(out, "reference.safetensors"), metadata=meta)
    return fwd


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gen_gemma_fixture.py OUTDIR")
    check_pins()
    torch.set_num_threads(1)
    for name, spec in SPECS.items():
        make_fixture(name, spec, sys.argv[1])


if __name__ == "__main__":
    main()
