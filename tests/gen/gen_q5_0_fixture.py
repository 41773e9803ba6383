#!/usr/bin/env python3
"""gen_q5_0_fixture.py: reference blocks for loupe's Q5_0 dequantizer, made with gguf-py.

    python3 tests/gen/gen_q5_0_fixture.py OUT_DIR [--model GEMMA.gguf]

writes OUT_DIR/quant_blocks_q5_0.safetensors (normally into tests/fixtures/gguf) in the
layout of gen_gguf_fixture.py's quant_blocks.safetensors: Q5_0.raw (U8: random blocks whose
fp16 scales are finite and sensibly scaled, plus zero, negative, subnormal and large ones),
Q5_0.f32 (F32: gguf.quants.dequantize of Q5_0.raw), Q5_0.f16 (F16: Q5_0.f32 rounded by
numpy) and Q5_0.bf16 (U16: the bf16 bits of Q5_0.f32, rounded by gguf-py's BF16 quantizer).

With --model (models/gemma-3-270m-q4_k_m.gguf, `make model-gemma`) it also writes
OUT_DIR/gemma3_expected.safetensors: the first row of one tensor of each type in that file,
dequantized by gguf-py (blk.0.attn_q.weight Q5_0, blk.0.attn_v.weight Q8_0,
blk.0.attn_output.weight Q4_K, blk.0.ffn_down.weight Q6_K, blk.0.attn_q_norm.weight F32).

Q5_0 came after quant_blocks.safetensors was committed; that file stays as it is, and the
new type gets its own file from the same block generator (own seed).

Pinned as gen_gguf_fixture.py: gguf==0.10.0, numpy==1.26.4, safetensors==0.4.5.
Deterministic: rerunning reproduces the file byte for byte.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_gguf_fixture import bf16_bits, check_pins, random_blocks  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGUFReader  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402


GEMMA_ROWS = ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
              "blk.0.ffn_down.weight", "blk.0.attn_q_norm.weight"]


def write_gemma_expected(out, model):
    r = GGUFReader(model)
    t = {x.name: x for x in r.tensors}
    expected = {}
    for name in GEMMA_ROWS:
        x = t[name]
        row = int(x.shape[0])  # gguf-py's shape is in ggml order: ne[0] first
        blk, size = GGML_QUANT_SIZES[x.tensor_type]
        raw = np.asarray(x.data).reshape(-1).view(np.uint8)[: row // blk * size]
        expected[name + ".row0"] = np.asarray(dequantize(raw, x.tensor_type), dtype=np.float32).reshape(-1)
    save_file(expected, os.path.join(out, "gemma3_expected.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--model", help="the Gemma 3 270M GGUF; skipped if absent")
    a = ap.parse_args()
    check_pins()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(2468)
    raw, n = random_blocks(rng, "Q5_0", 24)
    ref = np.asarray(dequantize(raw, QT.Q5_0), dtype=np.float32).reshape(-1)
    assert ref.size == n and not np.isnan(ref).any()
    with np.errstate(over="ignore"):
        f16 = ref.astype(np.float16)
    save_file({"Q5_0.f16": f16, "Q5_0.raw": raw, "Q5_0.f32": ref, "Q5_0.bf16": bf16_bits(ref)},
              os.path.join(a.out, "quant_blocks_q5_0.safetensors"))
    if a.model and os.path.exists(a.model):
        write_gemma_expected(a.out, a.model)
    elif a.model:
        print(f"gen_q5_0_fixture.py: {a.model} not found; skipping gemma3_expected.safetensors", file=sys.stderr)


if __name__ == "__main__":
    main()
