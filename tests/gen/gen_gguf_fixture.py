#!/usr/bin/env python3
"""gen_gguf_fixture.py: reference fixtures for loupe's GGUF reader and ggml dequantizers,
made with gguf-py (the llama.cpp project's own Python package), an implementation
independent of loupe's C code.

    python3 tests/gen/gen_gguf_fixture.py OUT_DIR [--model MODEL.gguf] [--fuzz-corpus DIR]

writes into OUT_DIR (normally tests/fixtures/gguf):
  quant_blocks.safetensors  per type T of F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q4_K Q5_K Q6_K:
                            T.raw (U8: random blocks whose fp16 scales are overwritten with
                            finite, sensibly scaled values, plus zero, negative, subnormal and
                            large scales), T.f32 (F32: gguf.quants.dequantize of T.raw),
                            T.f16 (F16: T.f32 rounded by numpy) and T.bf16 (U16: the bf16 bits
                            of T.f32, rounded by gguf-py's BF16 quantizer)
  small.gguf                written by gguf.GGUFWriter: metadata of every value type
                            (scalars, strings, arrays of i32, f32, bool, u8 and strings; no
                            nested arrays), general.alignment = 64, and small tensors of
                            F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q4_K Q5_K Q6_K and Q5_0 (a type loupe
                            reads but cannot dequantize), including a 4-dimensional one
  small_expected.safetensors  every tensor of small.gguf read back with gguf.GGUFReader and
                            dequantized by gguf-py (F32, flattened); Q5_0 included
  smollm2_expected.safetensors  (only with --model) from the real SmolLM2 GGUF: the first
                            row of token_embd.weight (Q8_0), of blk.0.ffn_down.weight (Q4_1)
                            and all of blk.0.attn_norm.weight (F32), dequantized by gguf-py
With --fuzz-corpus DIR it also writes small seed inputs to DIR/gguf and DIR/safetensors.

Pinned: gguf==0.10.0, numpy==1.26.4 (safetensors==0.4.5 writes the .safetensors files).
Deterministic: fixed seeds; rerunning reproduces the committed files byte for byte.
"""
import argparse
import os
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize
from safetensors.numpy import save_file

PINS = {"gguf": "0.10.0", "numpy": "1.26.4"}

SUPPORTED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]

# Byte offsets of the fp16 scale fields inside one block of each quantized type.
SCALE_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],  # d, m
    "Q5_0": [0],
    "Q4_K": [0, 2],  # d, dmin
    "Q5_K": [0, 2],
    "Q6_K": [208],   # d comes last
}


def check_pins():
    import importlib.metadata as md
    for pkg, want in PINS.items():
        have = md.version(pkg)
        if have != want:
            sys.exit(f"gen_gguf_fixture.py: needs {pkg}=={want}, found {have}")


def f16_bytes(x):
    return np.asarray([x], dtype=np.float16).view(np.uint8)


def random_blocks(rng, name, n_blocks):
    """n_blocks random blocks of a quantized type, with sane fp16 scales; the first few
    blocks get special scales: zero, negative, subnormal and large."""
    blk, size = gguf.GGML_QUANT_SIZES[QT[name]]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    specials = [0.0, -0.03, 6e-8, 900.0]  # 6e-8 is an fp16 subnormal; 900*127 overflows fp16
    for b in range(n_blocks):
        for k, off in enumerate(SCALE_FIELDS[name]):
            if b < len(specials) and k == 0:
                v = specials[b]
            else:
                v = rng.uniform(-0.08, 0.08) if k == 0 else rng.uniform(-0.5, 0.5)
            raw[b, off:off + 2] = f16_bytes(v)
    return raw.reshape(-1), n_blocks * blk


def random_float_type(rng, name, n):
    """n random values of F32 / F16 / BF16 as raw bytes, finite except for +-inf, with
    zeros, subnormals and extremes among them (never NaN)."""
    if name == "F32":
        x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 20, n))).astype(np.float32)
        x[:8] = [0.0, -0.0, np.inf, -np.inf, 1e-45, -3e-39, 3.4e38, -1.0]
        return x.view(np.uint8).copy()
    if name == "F16":
        x = (rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))).astype(np.float16)
        x[:8] = [0.0, -0.0, np.inf, -np.inf, 6e-8, -3e-5, 65504.0, -1.0]
        return x.view(np.uint8).copy()
    if name == "BF16":
        bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
        nan = ((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0)
        bits[nan] &= 0xBFFF  # clear an exponent bit: finite
        bits[:6] = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x807F]  # +-0, +-inf, subnormals
        return bits.view(np.uint8).copy()
    raise ValueError(name)


def bf16_bits(f32):
    return gguf.quants.quantize(f32.astype(np.float32), QT.BF16).view(np.uint16)


def write_quant_blocks(out, rng):
    tensors = {}
    for name in SUPPORTED:
        if name in ("F32", "F16", "BF16"):
            raw, n = random_float_type(rng, name, 512), 512
        else:
            blk = gguf.GGML_QUANT_SIZES[QT[name]][0]
            raw, n = random_blocks(rng, name, 24 if blk == 32 else 6)
        ref = np.asarray(dequantize(raw, QT[name]), dtype=np.float32).reshape(-1)
        assert ref.size == n and not np.isnan(ref).any(), name
        with np.errstate(over="ignore"):
            tensors[f"{name}.f16"] = ref.astype(np.float16)
        tensors[f"{name}.raw"] = raw
        tensors[f"{name}.f32"] = ref
        tensors[f"{name}.bf16"] = bf16_bits(ref)
    save_file(tensors, os.path.join(out, "quant_blocks.safetensors"))


def add_metadata(w):
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 1.5)
    w.add_bool("test.bool", True)
    w.add_bool("test.bool_false", False)
    w.add_string("test.string", "h\u00e9llo w\u00f6rld")
    w.add_uint64("test.u64", 123456789012)
    w.add_uint64("test.u64_huge", 2**63 + 5)
    w.add_int64("test.i64", -(2**40))
    w.add_float64("test.f64", 3.141592653589793)
    w.add_array("test.arr_i32", [1, -2, 3])
    w.add_array("test.arr_f32", [0.5, -1.25])
    w.add_array("test.arr_bool", [True, False, True])
    w.add_array("test.arr_u8", b"\x01\xff")
    w.add_array("test.arr_str", ["a", "", "ccc", "\u00fcn\u00efcode"])


def quant_tensor(rng, name, rows, cols):
    blk, size = gguf.GGML_QUANT_SIZES[QT[name]]
    raw, _ = random_blocks(rng, name, rows * cols // blk)
    return raw.reshape(rows, cols // blk * size)


def write_small(out, rng):
    path = os.path.join(out, "small.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    add_metadata(w)
    w.add_tensor("t.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("t.f16", rng.standard_normal((2, 8)).astype(np.float16))
    w.add_tensor("t.bf16", random_float_type(rng, "BF16", 64).reshape(4, 32), raw_dtype=QT.BF16)
    for name, rows, cols in [("Q8_0", 2, 64), ("Q4_0", 3, 32), ("Q4_1", 1, 96), ("Q4_K", 2, 256),
                             ("Q5_K", 1, 256), ("Q6_K", 1, 512), ("Q5_0", 1, 32)]:
        w.add_tensor(f"t.{name.lower()}", quant_tensor(rng, name, rows, cols), raw_dtype=QT[name])
    w.add_tensor("t.4d", rng.standard_normal((2, 1, 3, 2)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    r = gguf.GGUFReader(path)
    expected = {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)
                for t in r.tensors}
    save_file(expected, os.path.join(out, "small_expected.safetensors"))


def write_model_expected(out, model):
    r = gguf.GGUFReader(model)
    t = {x.name: x for x in r.tensors}

    def first_row(name):
        x = t[name]
        row = int(x.shape[0])  # gguf-py's shape is in ggml order: ne[0] first
        blk, size = gguf.GGML_QUANT_SIZES[x.tensor_type]
        raw = np.asarray(x.data).reshape(-1).view(np.uint8)[: row // blk * size]
        return np.asarray(dequantize(raw, x.tensor_type), dtype=np.float32).reshape(-1)

    expected = {
        "token_embd.weight.row0": first_row("token_embd.weight"),
        "blk.0.ffn_down.weight.row0": first_row("blk.0.ffn_down.weight"),
        "blk.0.attn_norm.weight": first_row("blk.0.attn_norm.weight"),
    }
    save_file(expected, os.path.join(out, "smollm2_expected.safetensors"))


def write_fuzz_seeds(corpus, rng):
    gdir, sdir = os.path.join(corpus, "gguf"), os.path.join(corpus, "safetensors")
    os.makedirs(gdir, exist_ok=True)
    os.makedirs(sdir, exist_ok=True)

    p = os.path.join(gdir, "tiny.gguf")
    w = gguf.GGUFWriter(p, "llama")
    w.add_uint32("a.u32", 7)
    w.add_float32("a.f32", 0.25)
    w.add_string("a.s", "xy")
    w.add_array("a.arr", ["p", "qq"])
    w.add_array("a.ints", [1, 2])
    w.add_tensor("w", rng.standard_normal(4).astype(np.float32))
    w.add_tensor("q", quant_tensor(rng, "Q8_0", 1, 32), raw_dtype=QT.Q8_0)
    w.add_tensor("k", quant_tensor(rng, "Q4_K", 1, 256), raw_dtype=QT.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(open(p, "rb").read())
    data[4] = 2  # the same file as GGUF version 2
    open(os.path.join(gdir, "tiny_v2.gguf"), "wb").write(bytes(data))

    p = os.path.join(gdir, "kv_only.gguf")
    w = gguf.GGUFWriter(p, "x")
    w.add_custom_alignment(16)
    w.add_bool("b", True)
    w.add_int64("i", -5)
    w.add_float64("d", 2.5)
    w.add_array("u8s", b"\x00\x01")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([7, -8], dtype=np.int32)},
              os.path.join(sdir, "two.safetensors"), metadata={"format": "pt"})
    save_file({"h": np.ones((2, 2), dtype=np.float16), "e": np.zeros((0, 3), dtype=np.float32),
               "u": np.array([1, 2, 3], dtype=np.uint8)}, os.path.join(sdir, "mixed.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--model", help="the SmolLM2 GGUF; skipped if absent")
    ap.add_argument("--fuzz-corpus", help="also write fuzzer seeds under this directory")
    a = ap.parse_args()
    check_pins()
    os.makedirs(a.out, exist_ok=True)
    write_quant_blocks(a.out, np.random.default_rng(1234))
    write_small(a.out, np.random.default_rng(5678))
    if a.model and os.path.exists(a.model):
        write_model_expected(a.out, a.model)
    elif a.model:
        print(f"gen_gguf_fixture.py: {a.model} not found; skipping smollm2_expected.safetensors", file=sys.stderr)
    if a.fuzz_corpus:
        write_fuzz_seeds(a.fuzz_corpus, np.random.default_rng(42))


if __name__ == "__main__":
    main()
