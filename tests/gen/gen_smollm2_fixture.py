#!/usr/bin/env python3
"""Generate loupe's SmolLM2-135M-Instruct (GGUF Q4_1) reference fixture.

Usage: python3 tests/gen/gen_smollm2_fixture.py MODEL_GGUF OUTDIR
       (normally: models/SmolLM2-135M-Instruct.Q4_1.gguf tests/fixtures/smollm2; `make model` fetches it)

Loads the GGUF with transformers' own GGUF reader (dequantization by gguf-py, q/k un-permuted by
transformers), runs it in float64 on the CPU with the float32 islands of transformers removed
(gen_llama_fixture.exact_float64) and writes:

  OUTDIR/reference.safetensors   for each prompt i (0..3):
      p{i}.tokens          I32 [1,T]   ids from the GGUF vocabulary (no BOS: the GGUF says add_bos_token false)
      p{i}.logit_pos       I32 [1]     the position whose logits are stored: T-1 (every position's
                                       final-norm output is among the hooks, so the logits of the
                                       others follow from the same unembedding; full rows are
                                       192 KiB each and the fixture stays under 2 MiB)
      p{i}.logits          F32 [1,V]   full-vocabulary logits at that position
      p{i}.logit_margin    F32 [1]     top-1 minus top-2 logit there (float64)
      p{i}.<hook>          F32 [1,T,...] for every hook in HOOKS, all positions
    and for the prompts in GREEDY:
      p{i}.greedy.tokens   I32 [20]    greedy (argmax) continuation, float64, recomputed from scratch each step
      p{i}.greedy.margin   F32 [20]    top-1 minus top-2 logit at each step
  OUTDIR/prompts.json            the prompt texts, ids, logit positions, greedy continuations (ids and text)
                                 and the calibration figures printed below

Prompts contain no digits: transformers 4.46.3 converts the GGUF tokenizer with a plain byte-level
pre-tokenizer, while SmolLM2's own splits digits one by one; without digits the two agree.

It also runs the model in HF float32 and bfloat16 and prints how far those land from the float64
reference (logits max_rel, hook nmse, top-1 and greedy agreement): the calibration behind the
budgets in tests/test_llama.c and tests/test_llama_cuda.c.
"""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import json
import sys

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, dequantize
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint, reverse_permute_weights
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_llama_fixture import Recorder, exact_float64, greedy, greedy_cached, max_rel, nmse, reference_hooks, run  # noqa: E402

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Water boils when it is heated, and ice melts when it is",
    "The capital of France is Paris, and the capital of Germany is",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY = (1, 3)
GREEDY_NEW = 20
GREEDY_MIN_MARGIN = 1e-2
HOOKS = [
    "blocks.0.hook_resid_post",
    "blocks.14.hook_resid_post",
    "blocks.29.hook_resid_post",
    "blocks.5.attn.hook_rot_q",
    "blocks.5.attn.hook_rot_k",
    "blocks.10.mlp.hook_post",
    "blocks.3.ln1.hook_scale",
    "blocks.3.ln1.hook_normalized",
    "ln_final.hook_scale",
    "ln_final.hook_normalized",
]


# ---- an independent check of the dequantization (ggml block layouts and float32 arithmetic as in
# ggml-quants.c dequantize_row_q4_1 / q8_0) ----

def my_dequant(raw, qtype, n):
    raw = np.frombuffer(np.ascontiguousarray(raw).tobytes(), dtype=np.uint8)
    if qtype == GGMLQuantizationType.F32:
        return raw.view(np.float32)[:n]
    if qtype == GGMLQuantizationType.Q8_0:  # f16 d, 32 x i8
        blk = raw.reshape(-1, 34)
        d = blk[:, :2].copy().view(np.float16).astype(np.float32)
        q = blk[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(-1)
    if qtype == GGMLQuantizationType.Q4_1:  # f16 d, f16 m, 16 bytes: low nibbles = 0..15, high = 16..31
        blk = raw.reshape(-1, 20)
        d = blk[:, 0:2].copy().view(np.float16).astype(np.float32)
        m = blk[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = blk[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        return (d * q + m).reshape(-1)
    raise ValueError(f"unexpected tensor type {qtype}")


def permute(w, n_head):
    """llama.cpp convert_hf_to_gguf's q/k permutation (HF rotate-half order -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_gguf(path, cfg):
    r = GGUFReader(path)
    names = set()
    for t in r.tensors:
        names.add(t.name)
        n = int(np.prod(t.shape))
        mine = my_dequant(t.data, t.tensor_type, n)
        theirs = dequantize(t.data, t.tensor_type).reshape(-1)
        assert mine.dtype == theirs.dtype == np.float32 and np.array_equal(mine, theirs), t.name
        if ".attn_q." in t.name or ".attn_k." in t.name:
            heads = cfg.num_attention_heads if ".attn_q." in t.name else cfg.num_key_value_heads
            w = theirs.reshape(-1, cfg.hidden_size)
            assert np.array_equal(permute(reverse_permute_weights(w, cfg.num_attention_heads, heads), heads), w)
    assert "output.weight" not in names and "token_embd.weight" in names
    types = sorted({t.tensor_type.name for t in r.tensors})
    print(f"GGUF: {len(r.tensors)} tensors ({', '.join(types)}); own Q4_1/Q8_0 dequantization == gguf-py's; "
          f"no output.weight (tied to token_embd)")


def load_model(path, dtype):
    d, f = os.path.split(path)
    cfg = AutoConfig.from_pretrained(d, gguf_file=f)
    # transformers 4.46.3 leaves tie_word_embeddings False for a GGUF without output.weight, which
    # would give a randomly initialised lm_head; llama.cpp (and loupe) use token_embd as the output.
    cfg.tie_word_embeddings = True
    tensors = load_gguf_checkpoint(path, return_tensors=True)["tensors"]
    # from_pretrained(gguf_file=) insists on `accelerate`; this is what it does without it.
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager", torch_dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"].to(dtype))
    return model.eval(), cfg


def reference_hooks_from(acts, model, T):
    """The HOOKS of the first T positions from a Recorder's raw values (no float64 cross-checks:
    this is for the calibration runs in float32 and bfloat16)."""
    cfg = model.config
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    DH = D // H
    out = {}
    for k in HOOKS:
        if k.endswith("hook_resid_post"):
            out[k] = acts[k]
        elif k.endswith("mlp.hook_post"):
            out[k] = acts[k]
        elif ".ln1." in k or k.startswith("ln_final."):
            x = acts[k.split(".ln1.")[0] + ".hook_resid_pre"] if ".ln1." in k else acts["ln_final.input"]
            x = x.double()
            scale = (x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps).sqrt()
            out[k] = scale if k.endswith("hook_scale") else x / scale
        elif k.endswith("hook_rot_q") or k.endswith("hook_rot_k"):
            L = int(k.split(".")[1])
            q = acts[f"blocks.{L}.attn.q_proj"]
            kk = acts[f"blocks.{L}.attn.k_proj"]
            nb, nt = q.shape[:2]
            q = q.reshape(nb, nt, H, DH).transpose(1, 2)
            kk = kk.reshape(nb, nt, KV, DH).transpose(1, 2)
            cos, sin = model.model.rotary_emb(q, torch.arange(nt)[None, :])
            rq, rk = apply_rotary_pos_emb(q, kk, cos, sin)
            out[k] = (rq if k.endswith("rot_q") else rk).transpose(1, 2)
        else:
            raise KeyError(k)
        out[k] = out[k][:, :T]
    return out


def margins(logits):
    top = torch.topk(logits.double(), 2, dim=-1).values
    return top[..., 0] - top[..., 1]


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    path, outdir = sys.argv[1], sys.argv[2]
    if not os.path.isfile(path):
        sys.exit(f"{path} not found: run `make model`")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)

    m64, cfg = load_model(path, torch.float64)
    check_gguf(path, cfg)
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)

    tensors, meta = {}, {"model": os.path.basename(path), "prompts": [], "hooks": HOOKS}
    ids_all, pos_all, ref_all = [], [], []
    with exact_float64(m64):
        for i, text in enumerate(PROMPTS):
            assert not any(c.isdigit() for c in text)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text, (tok.decode(ids), text)
            assert 6 <= len(ids) <= 20, len(ids)
            T = len(ids)
            tokens = torch.tensor([ids], dtype=torch.int32)
            ref, logits = reference_hooks(m64, tokens, keep=set(HOOKS))
            pos = [T - 1]
            lg = logits[0, pos]
            tensors[f"p{i}.tokens"] = tokens
            tensors[f"p{i}.logit_pos"] = torch.tensor(pos, dtype=torch.int32)
            tensors[f"p{i}.logits"] = lg.to(torch.float32).contiguous()
            tensors[f"p{i}.logit_margin"] = margins(lg).to(torch.float32)
            for k in HOOKS:
                tensors[f"p{i}.{k}"] = ref[k].to(torch.float32).contiguous()
            entry = {"index": i, "text": text, "ids": ids, "logit_pos": pos,
                     "logit_margin": [round(x, 4) for x in margins(lg).tolist()],
                     "top1": [int(x) for x in lg.argmax(-1)]}
            if i in GREEDY:
                gt, gm = greedy(m64, tokens[0], GREEDY_NEW)
                assert min(gm) > GREEDY_MIN_MARGIN, (i, gm)
                assert greedy_cached(m64, tokens[0], GREEDY_NEW) == gt  # HF's KV cache agrees
                tensors[f"p{i}.greedy.tokens"] = torch.tensor(gt, dtype=torch.int32)
                tensors[f"p{i}.greedy.margin"] = torch.tensor(gm, dtype=torch.float32)
                entry.update(greedy_ids=gt, greedy_text=tok.decode(gt), greedy_margin=[round(x, 4) for x in gm])
                print(f"p{i} greedy: {tok.decode(gt)!r}  min margin {min(gm):.4f} at step {gm.index(min(gm))}")
            meta["prompts"].append(entry)
            ids_all.append(tokens)
            pos_all.append(pos)
            ref_all.append((ref, lg))
            print(f"p{i}: T={T} pos={pos} margins={entry['logit_margin']} top1={entry['top1']}")
    plain = run(m64, ids_all[0]).logits[0, pos_all[0]]
    mr = max_rel(plain, ref_all[0][1])
    print(f"plain HF float64 (float32 islands) vs exact float64 logits: max_rel {mr:.2e}")
    assert mr < 1e-4

    # ---- calibration: HF float32 and bfloat16 against the float64 reference ----
    # Teacher-forced along each prompt (plus its greedy continuation): the float64 logits at every
    # position, then each dtype's logits, margins (the float64 top-1 minus top-2 pair, evaluated in
    # that dtype) and hooks. With no top-1 flip along a greedy path, that dtype's greedy run is identical.
    full_ids, full64 = [], []
    with exact_float64(m64):
        for i, tokens in enumerate(ids_all):
            full = tokens
            if i in GREEDY:
                full = torch.cat([tokens, tensors[f"p{i}.greedy.tokens"][None, :-1]], dim=1)
            full_ids.append(full)
            full64.append(run(m64, full).logits[0])
            assert max_rel(full64[i][pos_all[i]], ref_all[i][1]) < 1e-10  # same values, other summation order
    calib = {}
    for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        m, _ = load_model(path, dt)
        c = {"logits_max_rel": [], "logits_max_abs": [], "margin_error_max": 0.0, "top1_flips_at_float64_margin": [],
             "hook_nmse": {k: 0.0 for k in HOOKS}}
        for i, full in enumerate(full_ids):
            T = ids_all[i].shape[1]
            rec = Recorder(m)
            try:
                lg = run(m, full).logits[0].double()
            finally:
                rec.remove()
            l64 = full64[i]
            c["logits_max_rel"].append(max_rel(lg[pos_all[i]], l64[pos_all[i]]))
            c["logits_max_abs"].append((lg[pos_all[i]] - l64[pos_all[i]]).abs().max().item())
            top = torch.topk(l64, 2, dim=-1)
            m_ref = top.values[:, 0] - top.values[:, 1]
            m_dt = lg.gather(1, top.indices[:, :1])[:, 0] - lg.gather(1, top.indices[:, 1:2])[:, 0]
            c["margin_error_max"] = max(c["margin_error_max"], (m_dt - m_ref).abs().max().item())
            for j in range(full.shape[1]):
                if int(lg[j].argmax()) != int(top.indices[j, 0]):
                    c["top1_flips_at_float64_margin"].append(round(float(m_ref[j]), 4))
            # hooks of the prompt positions (the recorder saw the longer sequence; causal, so equal)
            hooks = reference_hooks_from(rec.acts, m, T)
            for k in HOOKS:
                c["hook_nmse"][k] = max(c["hook_nmse"][k], nmse(hooks[k], ref_all[i][0][k]))
        calib[name] = c
        worst = max(c["hook_nmse"].items(), key=lambda kv: kv[1])
        print(f"HF {name} vs float64: logits max_rel {max(c['logits_max_rel']):.2e} (abs {max(c['logits_max_abs']):.3f}); "
              f"margin error {c['margin_error_max']:.3f}; top-1 flips at float64 margins "
              f"{c['top1_flips_at_float64_margin']}; worst hook nmse {worst[1]:.2e} ({worst[0]})")
        print("   hook nmse: " + ", ".join(f"{k} {v:.1e}" for k, v in c["hook_nmse"].items()))
        del m
    meta["calibration"] = calib

    os.makedirs(outdir, exist_ok=True)
    save_file(tensors, os.path.join(outdir, "reference.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(outdir, "prompts.json"), "w") as fp:
        json.dump(meta, fp, indent=1, ensure_ascii=False)
        fp.write("\n")
    total = sum(os.path.getsize(os.path.join(outdir, x)) for x in os.listdir(outdir))
    print(f"{outdir}: {total} bytes ({total / 2**20:.2f} MiB), {len(tensors)} tensors")
    assert total < 3.5 * 2**20, "fixture too large"


if __name__ == "__main__":
    main()
