#!/usr/bin/env python3
"""PyTorch eager forward of a GPT-2-small-shaped model (random weights), for the ratio
beside build/bench_forward's CPU figure. Run by hand where torch and transformers are
installed (tests/gen/requirements.txt), with the same thread count as loupe:

    OMP_NUM_THREADS=2 python3 bench/peers/torch_forward.py --batch 1 --seq 256
"""
import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=1)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--reps", type=int, default=3)
a = p.parse_args()

torch.manual_seed(0)
cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
model = GPT2LMHeadModel(cfg).eval()
tok = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))
with torch.inference_mode():
    model(tok, labels=tok)  # warm-up
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        model(tok, labels=tok)
        times.append(time.perf_counter() - t)
times.sort()
# the BLAS behind torch's CPU matmuls, for the line beside loupe's (MKL takes its AVX-512
# kernels only on Intel CPUs)
blas = [l.strip(" -") for l in torch.__config__.show().splitlines() if "Math Kernel Library" in l or "OpenBLAS" in l]
print(f"torch BLAS: {blas[0] if blas else 'unknown'}; CPU capability {torch.backends.cpu.get_cpu_capability()}")
print(f"torch {torch.__version__} eager, {torch.get_num_threads()} threads, batch {a.batch} x {a.seq}: "
      f"{a.batch * a.seq / times[len(times) // 2]:.0f} tokens/s")
