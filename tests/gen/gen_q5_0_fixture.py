#!/usr/bin/env python3
"""gen_q5_0_fixture.py: reference blocks for loupe's Q5_0 dequantizer, made with gguf-py.

    python3 tests/gen/gen_q5_0_fixture.py OUT_DIR

writes OUT_DIR/quant_blocks_q5_0.safetensors (normally into tests/fixtures/gguf) in the
layout of gen_gguf_fixture.py's quant_blocks.safetensors: Q5_0.raw (U8: random blocks whose
fp16 scales are finite and sensibly scaled, plus zero, negative, subnormal and large ones),
Q5_0.f32 (F32: gguf.quants.dequantize of Q5_0.raw), Q5_0.f16 (F16: Q5_0.f32 rounded by
numpy) and Q5_0.bf16 (U16: the bf16 bits of Q5_0.f32, rounded by gguf-py's BF16 quantizer).

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
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
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


if __name__ == "__main__":
    main()
