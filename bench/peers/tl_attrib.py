#!/usr/bin/env python3
"""Attribution patching over the whole node grid with TransformerLens, for the ratio beside
build/bench_attrib's figure (the issue's target: loupe >= 10x this loop on the same GPU).
A GPT-2-small-shaped HookedTransformer with random weights, pairs of prompts that differ at
one position, the logit-difference metric at the last position, and for every node of
loupe's grid (resid_pre/mid/post, attn_out, mlp_out per layer and position; z/q/k/v per
layer, position and head; pattern per layer and head) the score
(a_clean - a_corrupted) . d metric / d a at the corrupted run: one cached clean forward, one
corrupted forward with the grid's activations and gradients hooked, one backward, and the
per-node sums. Run by hand where torch and transformer_lens are installed
(tests/gen/requirements-sae.txt pins transformer-lens 2.15.4):

    python3 bench/peers/tl_attrib.py --device cuda --pairs 8 --seq 64
    OMP_NUM_THREADS=2 python3 bench/peers/tl_attrib.py --device cpu --pairs 4 --seq 64
"""
import argparse
import time

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--pairs", type=int, default=8)
p.add_argument("--seq", type=int, default=64)
p.add_argument("--reps", type=int, default=3)
a = p.parse_args()

torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257,
                              act_fn="gelu_new", normalization_type="LN", device=a.device)
model = HookedTransformer(cfg).eval()
B, T = a.pairs, a.seq
clean = torch.randint(0, cfg.d_vocab, (B, T), device=a.device)
corrupted = clean.clone()
corrupted[:, T // 2] = (clean[:, T // 2] + 1) % cfg.d_vocab
answer = torch.randint(0, cfg.d_vocab, (B,), device=a.device)
wrong = torch.randint(0, cfg.d_vocab, (B,), device=a.device)

GRID = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
        "attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern"]
names = {f"blocks.{L}.{h}" for L in range(cfg.n_layers) for h in GRID}
is_grid = lambda name: name in names


def metric(logits):
    last = logits[:, -1]
    return (last.gather(1, answer[:, None]) - last.gather(1, wrong[:, None])).sum()


def attribution():
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=is_grid)
    acts, grads = {}, {}

    def fwd(t, hook):
        acts[hook.name] = t.detach()

    def bwd(g, hook):
        grads[hook.name] = g.detach()

    model.reset_hooks()
    for n in names:
        model.add_hook(n, fwd, "fwd")
        model.add_hook(n, bwd, "bwd")
    metric(model(corrupted)).backward()
    model.reset_hooks()
    scores = {}
    for n in names:  # sum over each node's values
        s = (clean_cache[n] - acts[n]) * grads[n]
        if n.endswith("hook_pattern"):
            scores[n] = s.sum((-1, -2))           # [B, heads]
        elif s.dim() == 4:
            scores[n] = s.sum(-1)                 # [B, pos, heads]
        else:
            scores[n] = s.sum(-1)                 # [B, pos]
    return scores


def sync():
    if a.device == "cuda":
        torch.cuda.synchronize()


attribution()  # warm-up
sync()
times = []
for _ in range(a.reps):
    t = time.perf_counter()
    attribution()
    sync()
    times.append(time.perf_counter() - t)
times.sort()
dt = times[len(times) // 2]
with torch.no_grad():
    model(corrupted)
    sync()
    t = time.perf_counter()
    model(corrupted)
    sync()
    fwd_t = time.perf_counter() - t
print(f"transformer_lens attribution patching, GPT-2 small shape, {B} pairs x {T} tokens on {a.device}: "
      f"{B / dt:.2f} pairs/s ({dt / fwd_t:.2f} forward-pass equivalents per pair)")
