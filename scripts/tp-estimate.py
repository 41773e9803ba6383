#!/usr/bin/env python3
"""Tensor-parallel scaling estimate for one forward, layer by layer (README, "Running on a cluster").

Megatron-style TP splits every GEMM of a layer evenly over the n ranks and adds two
all-reduces of the residual stream per layer forward (after attention-out and MLP-out):
each of B*T*d values in the activation dtype. With NCCL's ring all-reduce each rank sends
and receives 2(n-1)/n of the buffer, and NCCL reports "bus bandwidth" so that

    time = bytes * 2(n-1)/n / busbw

Compute per rank is the layer's FLOPs / n at a stated fraction of the GPU's dense peak
(--mfu; or --layer-ms, a measured time of one whole layer on one GPU). With no overlap of
communication and compute, the efficiency is compute / (compute + communication): the
speed-up over one GPU divided by n. The same GEMM fraction is assumed at n = 1 and at n,
which flatters the split (each rank's GEMMs are n times narrower).

    python3 scripts/tp-estimate.py                 # Llama-3-8B shape, 8 x 1024 tokens, TP=8, H100
    python3 scripts/tp-estimate.py --mfu 0.4 --tp 4
"""
import argparse


def layer_flops(a):
    """Forward matmul FLOPs of one layer for the whole batch (causal attention counted on half)."""
    n = a.batch * a.seq
    q, kv = a.heads * a.d_head, a.kv_heads * a.d_head
    proj = 2 * n * a.d_model * (q + 2 * kv) + 2 * n * q * a.d_model  # q, k, v in; attention out
    mlp = (3 if a.gated else 2) * 2 * n * a.d_model * a.d_mlp  # gate, up, down (or in, out)
    attn = 2 * 2 * a.batch * a.heads * a.d_head * a.seq * (a.seq + 1) / 2  # QK^T and PV
    return proj + mlp + attn


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=128)
    p.add_argument("--d-mlp", type=int, default=14336)
    p.add_argument("--gated", type=int, default=1, help="1: SwiGLU (3 MLP matrices), 0: GELU (2)")
    p.add_argument("--bytes", type=int, default=2, help="bytes per activation value (bf16: 2)")
    p.add_argument("--peak-tflops", type=float, default=990.0, help="dense bf16 peak of one GPU (H100 SXM: 989.5)")
    p.add_argument("--mfu", type=float, nargs="+", default=[0.4, 0.6, 0.75], help="fractions of the peak the GEMMs reach")
    p.add_argument("--layer-ms", type=float, default=None, help="measured ms of one layer on one GPU (replaces --mfu)")
    p.add_argument("--busbw", type=float, nargs="+", default=[370.0, 480.0], help="NCCL all-reduce bus bandwidth, GB/s")
    p.add_argument("--latency-us", type=float, default=0.0, help="fixed cost of one all-reduce, microseconds")
    p.add_argument("--target", type=float, default=0.80)
    a = p.parse_args()

    n = a.tp
    fl = layer_flops(a)
    buf = a.batch * a.seq * a.d_model * a.bytes
    moved = buf * 2 * (n - 1) / n
    print(f"shape: {a.layers} layers, d_model {a.d_model}, {a.heads} heads ({a.kv_heads} kv) x {a.d_head}, d_mlp {a.d_mlp}; "
          f"batch {a.batch} x {a.seq} = {a.batch * a.seq} tokens; TP={n}")
    print(f"per layer forward: {fl / 1e12:.3f} TFLOP in all, {fl / n / 1e12:.4f} TFLOP per rank; "
          f"2 all-reduces of {buf / 2**20:.0f} MiB, each moving {moved / 2**20:.0f} MiB per rank (ring: 2(n-1)/n)")
    cases = [(f"measured {a.layer_ms} ms/layer on one GPU", a.layer_ms / 1e3 / n)] if a.layer_ms else \
        [(f"{m:.0%} of {a.peak_tflops:.0f} TFLOP/s", fl / n / (a.peak_tflops * 1e12 * m)) for m in a.mfu]
    print(f"{'compute':>24} {'busbw GB/s':>10} {'compute ms':>10} {'comm ms':>8} {'efficiency':>10} {'target':>7}  hidden comm needed")
    for what, tc in cases:
        for bw in a.busbw:
            tm = 2 * (moved / (bw * 1e9) + a.latency_us * 1e-6)
            eff = tc / (tc + tm)
            need = max(0.0, 1 - tc * (1 / a.target - 1) / tm)  # share of comm to hide behind compute
            print(f"{what:>24} {bw:>10.0f} {tc * 1e3:>10.3f} {tm * 1e3:>8.3f} {eff:>10.1%} {'met' if eff >= a.target else 'missed':>7}"
                  f"  {need:.0%}")


if __name__ == "__main__":
    main()
