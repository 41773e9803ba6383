#!/usr/bin/env python3
"""Reference for loupe's Gemma 3 270M (GGUF) against Hugging Face transformers.

Usage: python3 tests/gen/gen_gemma_real_fixture.py GGUF OUTDIR
       (normally GGUF = models/gemma-3-270m-q4_k_m.gguf from `make model-gemma`,
        OUTDIR = tests/fixtures/gemma3-270m)

Writes OUTDIR/reference.safetensors (a few KB):
  text.tokens        int32 [1, N]  a short English paragraph (TEXT below), tokenized by the
                                   tokenizer transformers builds from the GGUF, with
                                   add_special_tokens=True: <bos> first, as Gemma expects
  text.loss          float64 []    HF's mean next-token cross-entropy over the N-1 predictions,
                                   float64 model (float32 islands removed, below)
  text.loss_f32      float64 []    the same from HF's own float32 model (calibration)
  text.token_loss    float32 [N-1] HF float64's loss at each prediction
  text.token_loss_f32 float32 [N-1] HF float32's (calibration)
  prompt.tokens      int32 [P]     "<bos>The capital of France is"
  prompt.top_ids     int32 [K]     the K = 64 largest float64 logits at the prompt's last
  prompt.top_logits  float64 [K]   position, in decreasing order, and their values
  prompt.logsumexp   float64 []    logsumexp of that position's whole float64 logits
  prompt.top_logits_f32 float64 [K] HF float32's logits at the same ids (calibration)
  greedy.tokens      int32 [G]     HF float64's greedy continuation of the prompt (G = 12):
                                   argmax of a full forward over the growing sequence at each
                                   step, the same tokens as generate(do_sample=False), checked
  greedy.margin      float32 [G]   float64 top-1 minus top-2 logit at each step
  greedy.tokens_f32  int32 [G]     HF float32's greedy continuation (generate, do_sample=False)
The safetensors metadata records the versions, the text and the prompt.

The weights. transformers 5.25 loads this GGUF itself (from_pretrained(dir, gguf_file=...):
architecture "gemma3" is supported, as model_type gemma3_text). It dequantizes every tensor
with gguf-py (gguf.dequantize, as loupe's dequantizers do bit for bit:
tests/test_gemma_gguf.c) and maps the names; the script checks every parameter of the loaded
model against its own gguf-py dequantization: equal bit for bit, except the norms. What the
GGUF holds, as llama.cpp's converter (Gemma3Model) wrote it:
  - every RMSNorm weight (attn_norm, post_attention_norm, ffn_norm, post_ffw_norm,
    attn_q_norm, attn_k_norm, output_norm) is stored as (1 + w), the factor actually applied;
    HF's Gemma3RMSNorm holds w and multiplies by (1 + w), and its GGUF loader subtracts 1 in
    float32 (Gemma2TensorProcessor). The float64 model here gets w = stored - 1 in float64
    instead, so that its 1 + w is the stored value exactly (the float32 model keeps HF's own
    rounding: part of what its calibration measures).
  - Q and K rows are NOT permuted: llama.cpp runs Gemma 3 with NEOX (rotate-half) rotary, as
    HF does, and its converter applies llama's permutation only to Llama-family models; HF's
    loader undoes none for gemma3. The script shows the layout is HF's own: applying the
    Llama un-permutation to q/k (and their norms) raises the loss on TEXT from 2.63 to 4.58
    nats.
  - metadata: gemma3.attention.key_length 256 (head_dim, != d_model / n_heads = 160),
    head_count 4, head_count_kv 1, sliding_window 512, rope.freq_base 1e6 (the global layers),
    layer_norm_rms_epsilon 1e-6, context_length 32768, embedding_length 640, block_count 18,
    feed_forward_length 2048. It carries NO key for the local layers' rotary base, the
    local/global pattern, query_pre_attn_scalar or soft-capping: transformers takes them from
    Gemma3TextConfig's defaults (rope theta 1e4 on sliding layers, every 6th layer global,
    i.e. layers 5, 11, 17; query_pre_attn_scalar 256 = head_dim; no soft-capping), which are
    google/gemma-3-270m's own config values; llama.cpp hard-codes the same (swa pattern 6,
    freq_base_swa 10000, attention scale 1/sqrt(key_length)); gguf-py 0.19 defines keys a
    newer converter may write for them ({arch}.rope.freq_base_swa,
    {arch}.attention.sliding_window_pattern, {arch}.attention.scale,
    {arch}.attn_logit_softcapping, {arch}.final_logit_softcapping). Tied embeddings (no
    output.weight). The embedding is scaled by sqrt(640) (HF: a float32 buffer).
    tokenizer.ggml.model "llama" (SentencePiece), add_bos_token true, add_space_prefix false,
    bos 2, eos 1.

The float64 reference: transformers 5 computes RMSNorm, the rotary tables and the eager
softmax in float32 even in a float64 model; gen_gemma_fixture.exact_float64 removes those
islands (the script checks plain float64 HF agrees to float32 rounding). The float32 HF run
is the calibration for loupe's F32 budgets: it is what an independent float32
implementation of the same weights lands at.

Pinned: tests/gen/requirements-gemma.txt (torch, transformers, gguf, sentencepiece,
protobuf, safetensors, numpy). Deterministic: one thread, no sampling.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import copy
import importlib.metadata
import sys

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from gguf import GGUFReader, dequantize
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_gemma_fixture import exact_float64  # noqa: E402

PINS = {"torch": "2.15.0", "transformers": "5.25.0", "gguf": "0.19.0", "safetensors": "0.8.0", "numpy": "2.4.6"}

TEXT = ("The river rises in the hills above the old mill town and runs south through farmland for "
        "nearly forty miles before it reaches the sea. In the spring, when the snow melts, it often "
        "floods the lower fields, and the farmers move their animals to higher ground. The town "
        "built a stone bridge across it in 1820, and the bridge still carries the main road today.")
PROMPT = "The capital of France is"
N_GREEDY = 12
TOP_K = 64
F64 = torch.float64

# HF parameter name (without "model.") -> GGUF tensor name, per layer and global
LAYER_MAP = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_MAP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def check_pins():
    for pkg, want in PINS.items():
        have = importlib.metadata.version(pkg)
        if have != want:
            sys.exit(f"gen_gemma_real_fixture.py: needs {pkg}=={want}, found {have}")


def gguf_name(hf_name):
    if hf_name in GLOBAL_MAP:
        return GLOBAL_MAP[hf_name]
    parts = hf_name.split(".")  # model.layers.L.rest
    assert parts[0] == "model" and parts[1] == "layers", hf_name
    return f"blk.{parts[2]}." + LAYER_MAP[".".join(parts[3:])]


def check_weights(model, reader):
    """Every HF parameter is gguf-py's dequantization of its GGUF tensor (norms: stored - 1).
    Returns {hf name: float64 stored - 1} for the norms."""
    tensors = {t.name: t for t in reader.tensors}
    norms = {}
    seen = set()
    worst_norm = 0.0
    for name, p in model.named_parameters():
        g = gguf_name(name)
        seen.add(g)
        t = tensors[g]
        w = torch.from_numpy(np.ascontiguousarray(dequantize(t.data, t.tensor_type))).reshape(p.shape)
        if name.endswith("norm.weight"):
            assert t.tensor_type.name == "F32", g
            stored = w.to(F64)
            worst_norm = max(worst_norm, ((p.detach().to(F64) + 1) - stored).abs().max().item())
            norms[name] = stored - 1
        else:
            assert torch.equal(p.detach(), w.to(p.dtype)), f"{name} != gguf-py dequantization of {g}"
    assert seen == set(tensors), f"GGUF tensors HF did not load: {sorted(set(tensors) - seen)}"
    print(f"weights: {len(seen)} tensors equal gguf-py's dequantization; norms stored as 1 + w "
          f"(HF's float32 w + 1 off the stored value by at most {worst_norm:.1e})")
    return norms


def run_loss(model, ids, exact):
    ctx = exact_float64(model) if exact else _null()
    with torch.no_grad(), ctx:
        logits = model(ids).logits[0]
    per = F.cross_entropy(logits[:-1].to(F64), ids[0, 1:], reduction="none")
    return per.mean().item(), per


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def last_logits(model, ids, exact):
    ctx = exact_float64(model) if exact else _null()
    with torch.no_grad(), ctx:
        return model(ids).logits[0, -1].to(F64)


def greedy64(model, prompt):
    """Argmax of a full float64 forward over the growing sequence, and the top-1 margin."""
    seq = prompt.clone()
    toks, margins = [], []
    for _ in range(N_GREEDY):
        lg = last_logits(model, seq, exact=True)
        top = torch.topk(lg, 2)
        toks.append(int(top.indices[0]))
        margins.append((top.values[0] - top.values[1]).item())
        seq = torch.cat([seq, top.indices[:1].view(1, 1)], dim=1)
    return toks, margins


def unpermute_llama(w, n_head):
    """transformers' reverse_permute_weights for llama GGUFs (undoes llama.cpp's permute)."""
    dim = w.shape[0] // n_head // 2
    w = w.reshape(n_head, dim, 2, *w.shape[1:])
    return w.swapaxes(2, 1).reshape(-1, *w.shape[3:])


def permutation_check(m32, ids, base_loss):
    m = copy.deepcopy(m32)
    cfg = m.config
    with torch.no_grad():
        for layer in m.model.layers:
            a = layer.self_attn
            a.q_proj.weight.copy_(unpermute_llama(a.q_proj.weight, cfg.num_attention_heads))
            a.k_proj.weight.copy_(unpermute_llama(a.k_proj.weight, cfg.num_key_value_heads))
            a.q_norm.weight.copy_(unpermute_llama(a.q_norm.weight[None].T, 1).reshape(-1))
            a.k_norm.weight.copy_(unpermute_llama(a.k_norm.weight[None].T, 1).reshape(-1))
    loss, _ = run_loss(m, ids, exact=False)
    print(f"Q/K layout: loss {base_loss:.4f} as stored; {loss:.4f} with the Llama un-permutation applied")
    assert loss > base_loss + 1.0, "the Q/K layout check does not discriminate"


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: gen_gemma_real_fixture.py GGUF OUTDIR")
    check_pins()
    torch.set_num_threads(int(os.environ.get("GEN_THREADS", "1")))
    path, outdir = sys.argv[1], sys.argv[2]
    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    m32 = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
    m32.eval()
    c = m32.config
    print(f"config: {type(m32).__name__} layers {c.num_hidden_layers} d_model {c.hidden_size} heads "
          f"{c.num_attention_heads}/{c.num_key_value_heads} head_dim {c.head_dim} d_mlp {c.intermediate_size} "
          f"window {c.sliding_window} query_pre_attn_scalar {c.query_pre_attn_scalar} rope {c.rope_parameters} "
          f"softcap {c.attn_logit_softcapping}/{c.final_logit_softcapping} global layers "
          f"{[i for i, t in enumerate(c.layer_types) if t == 'full_attention']}")
    print(f"embed_scale buffer {m32.model.embed_tokens.embed_scale.item()!r} (sqrt(640) = {640 ** 0.5!r})")
    reader = GGUFReader(path)
    norms = check_weights(m32, reader)

    m64 = copy.deepcopy(m32).to(F64)
    with torch.no_grad():
        for name, p in m64.named_parameters():
            if name in norms:
                p.copy_(norms[name])

    ids = torch.tensor([tok(TEXT, add_special_tokens=True)["input_ids"]])
    pids = torch.tensor([tok(PROMPT, add_special_tokens=True)["input_ids"]])
    assert ids[0, 0].item() == c.bos_token_id == 2 and pids[0, 0].item() == 2, "no <bos> first"
    print(f"text: {ids.shape[1]} tokens; prompt {pids[0].tolist()} = {tok.convert_ids_to_tokens(pids[0])}")

    loss64, per64 = run_loss(m64, ids, exact=True)
    plain64, _ = run_loss(m64, ids, exact=False)
    loss32, per32 = run_loss(m32, ids, exact=False)
    print(f"text loss: float64 {loss64:.10f} (with transformers' float32 islands {plain64:.10f}); "
          f"float32 {loss32:.10f} (|diff| {abs(loss32 - loss64):.2e}, per token at most "
          f"{(per32 - per64).abs().max().item():.2e})")
    assert abs(plain64 - loss64) < 1e-5
    permutation_check(m32, ids, loss32)

    lg64 = last_logits(m64, pids, exact=True)
    lg32 = last_logits(m32, pids, exact=False)
    top = torch.topk(lg64, TOP_K)
    mr = ((lg32 - lg64).abs().max() / lg64.abs().max()).item()
    print(f"prompt last position: top-1 {tok.convert_ids_to_tokens([int(top.indices[0])])} margin "
          f"{(top.values[0] - top.values[1]).item():.4f}; float32 vs float64 max rel {mr:.2e}, on the top {TOP_K} "
          f"max abs {(lg32[top.indices] - top.values).abs().max().item():.2e}")

    toks64, margins = greedy64(m64, pids)
    with torch.no_grad():
        gen = m64.generate(pids, max_new_tokens=N_GREEDY, do_sample=False)[0, pids.shape[1]:].tolist()
        gen32 = m32.generate(pids, max_new_tokens=N_GREEDY, do_sample=False)[0, pids.shape[1]:].tolist()
    print(f"greedy float64: {toks64} {tok.decode(toks64)!r}")
    print(f"  margins {[round(x, 3) for x in margins]}")
    print(f"  generate(do_sample=False) float64 {gen}, float32 {gen32}")
    assert gen == toks64, "HF generate and full forwards disagree"

    ref = {
        "text.tokens": ids.to(torch.int32).contiguous(),
        "text.loss": torch.tensor(loss64, dtype=F64),
        "text.loss_f32": torch.tensor(loss32, dtype=F64),
        "text.token_loss": per64.to(torch.float32).contiguous(),
        "text.token_loss_f32": per32.to(torch.float32).contiguous(),
        "prompt.tokens": pids[0].to(torch.int32).contiguous(),
        "prompt.top_ids": top.indices.to(torch.int32).contiguous(),
        "prompt.top_logits": top.values.contiguous(),
        "prompt.logsumexp": torch.logsumexp(lg64, 0).reshape(()),
        "prompt.top_logits_f32": lg32[top.indices].contiguous(),
        "greedy.tokens": torch.tensor(toks64, dtype=torch.int32),
        "greedy.margin": torch.tensor(margins, dtype=torch.float32),
        "greedy.tokens_f32": torch.tensor(gen32, dtype=torch.int32),
    }
    meta = {"generator": f"gen_gemma_real_fixture.py: transformers {transformers.__version__}, torch {torch.__version__}, "
                         f"gguf {importlib.metadata.version('gguf')}; {f}",
            "text": TEXT, "prompt": PROMPT}
    os.makedirs(outdir, exist_ok=True)
    save_file(ref, os.path.join(outdir, "reference.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
