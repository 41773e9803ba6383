#!/usr/bin/env python3
"""PyTorch eager forward of SmolLM2-135M-Instruct (the GGUF of `make model`, dequantized
to float32 by transformers), for the ratio beside build/bench_forward's CPU SmolLM2
figure. Run by hand where torch, transformers and gguf are installed
(tests/gen/requirements.txt), with the same thread count as loupe:

    OMP_NUM_THREADS=2 python3 bench/peers/torch_smollm2.py --batch 1 --seq 256
"""
import argparse
import os
import time

import torch
from transformers import AutoConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

p = argparse.ArgumentParser()
p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
p.add_argument("--batch", type=int, default=1)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--reps", type=int, default=3)
a = p.parse_args()

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
# what from_pretrained(gguf_file=) does, without needing accelerate; the GGUF has no
# output.weight, so the unembedding is tied to the embedding
cfg = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(a.model)), gguf_file=os.path.basename(a.model))
cfg.tie_word_embeddings = True
model = LlamaForCausalLM(cfg)
# transformers 5 maps the GGUF's tensor names through the model it loads into (model_to_load);
# 4.x takes no such argument
try:
    tensors = load_gguf_checkpoint(a.model, return_tensors=True, model_to_load=model)["tensors"]
except TypeError:
    tensors = load_gguf_checkpoint(a.model, return_tensors=True)["tensors"]
model.load_state_dict(tensors, strict=False)
model.tie_weights()
model = model.float().eval()
g = torch.Generator().manual_seed(0)
tok = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=g)
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
print(f"torch {torch.__version__} eager, SmolLM2-135M f32, batch {a.batch} x {a.seq}, "
      f"{torch.get_num_threads()} threads: {a.batch * a.seq / times[len(times) // 2]:.0f} tokens/s")
