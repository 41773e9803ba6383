#!/usr/bin/env python3
"""SAELens training step of TopK (k 32) and standard (ReLU/L1) SAEs on synthetic
activations, for the ratio beside build/bench_sae's CPU training figures (d_in 256,
d_sae 4096, batch 1024 tokens, 20 steps, F32). Run by hand where sae-lens is installed
(tests/gen/requirements-sae.txt), with the same thread count as loupe:

    OMP_NUM_THREADS=2 python3 bench/peers/saelens_train.py

build/bench_sae runs it itself (LOUPE_PYTHON names the interpreter, python3 by default)
and prints the ratio beside its own figure from the same run.

Only the per-batch training step is timed: the activations are generated the way
bench_sae.c's write_store makes its store (8 random superposed features per token out of
4 * d_in random directions, magnitudes 0.5..1.5) and held in memory as one torch tensor,
with no model and no reading from disk. loupe's figure also includes reading and shuffling
its activation store, which is small at this size.

The step is SAELens's own: sae_lens.training.sae_trainer.SAETrainer._train_step, the body
of SAETrainer.fit's loop, on a TopKTrainingSAE / StandardTrainingSAE. It runs
training_forward_pass (encode, decode, MSE summed over dims and averaged over tokens, plus
the architecture's loss: for standard, l1_coefficient * sum f * ||W_dec row||; for topk,
AuxK over dead latents, none of which are dead this early), the dead-latent and firing
bookkeeping, backward, clip_grad_norm_(1.0), torch.optim.Adam's step, zero_grad and the
lr and coefficient schedulers; the batch goes through the trainer's ActivationScaler first
(normalize_activations "expected_average_only_in", as in loupe's default). Settings match
bench_sae.c: lr 1e-3, Adam betas 0.9/0.999, constant schedule, l1_coefficient 1.0, b_dec
initialised to the mean. SAELens 6.5.3 keeps no decoder rows at unit norm during training
(it scales them to 0.1 at init and, for standard, weights the L1 penalty by the row norms);
loupe instead removes the gradient component parallel to each row before each Adam step.
"""
import argparse
import itertools
import os
import tempfile
import time
import warnings

import torch
import sae_lens
from sae_lens import (
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

p = argparse.ArgumentParser()
p.add_argument("--d-in", type=int, default=256)
p.add_argument("--d-sae", type=int, default=4096)
p.add_argument("--k", type=int, default=32)
p.add_argument("--batch", type=int, default=1024)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--reps", type=int, default=3, help="timed runs of --steps steps; the median is printed")
p.add_argument("--arch", choices=["topk", "standard", "both"], default="both")
a = p.parse_args()

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
torch.manual_seed(0)
# SAE.__init__ in 6.5.3 warns about model_from_pretrained_kwargs whenever cfg.metadata
# exists, which it always does; nothing here loads a model
warnings.filterwarnings("ignore", message=r"(?s).*model_from_pretrained_kwargs")


def synthetic_acts(n_tokens, d, gen):
    """write_store's distribution: each token is the sum of 8 features drawn (with
    replacement) from 4*d directions uniform in [-0.5, 0.5)^d, each scaled by a magnitude
    uniform in [0.5, 1.5)."""
    nf = 4 * d
    dirs = torch.rand(nf, d, generator=gen) - 0.5
    f = torch.randint(0, nf, (n_tokens, 8), generator=gen)
    mag = 0.5 + torch.randint(0, 1024, (n_tokens, 8), generator=gen).float() / 1024.0
    return torch.einsum("nj,njd->nd", mag, dirs[f]).contiguous()


# as many tokens as bench_sae's store (16 batches, whole 128-token sequences)
n_tokens = (16 * a.batch + 127) // 128 * 128
acts = synthetic_acts(n_tokens, a.d_in, torch.Generator().manual_seed(1))
n_batches = n_tokens // a.batch
batches = [acts[i * a.batch:(i + 1) * a.batch] for i in range(n_batches)]

total_steps = a.warmup + a.reps * a.steps
archs = [
    ("topk", TopKTrainingSAE, TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k, dtype="float32", device="cpu",
                                                    normalize_activations="expected_average_only_in")),
    ("standard", StandardTrainingSAE, StandardTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, l1_coefficient=1.0,
                                                                dtype="float32", device="cpu",
                                                                normalize_activations="expected_average_only_in")),
]
archs = [x for x in archs if a.arch in (x[0], "both")]
with tempfile.TemporaryDirectory() as ckpt:
    for name, cls, scfg in archs:
        sae = cls(scfg)
        tcfg = SAETrainerConfig(
            n_checkpoints=0, checkpoint_path=ckpt, total_training_samples=total_steps * a.batch, device="cpu",
            autocast=False, lr=1e-3, lr_end=1e-4, lr_scheduler_name="constant", lr_warm_up_steps=0,
            adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1,
            train_batch_size_samples=a.batch, dead_feature_window=1000, feature_sampling_window=2000,
            logger=LoggingConfig(log_to_wandb=False))
        provider = itertools.cycle(batches)
        trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=provider)
        # what ActivationScaler.estimate_scaling_factor computes (sqrt(d_in) / mean token
        # norm), over the whole in-memory store and without its progress bar
        trainer.activation_scaler.scaling_factor = a.d_in**0.5 / acts.norm(dim=-1).mean().item()
        with torch.no_grad():
            sae.b_dec.copy_(trainer.activation_scaler(acts).mean(0))

        def step():
            # SAETrainer.fit's loop body without wandb, checkpoints and the progress bar
            batch = next(trainer.data_provider).to(sae.device)
            trainer.n_training_samples += batch.shape[0]
            out = trainer._train_step(sae=sae, sae_in=trainer.activation_scaler(batch))
            trainer.n_training_steps += 1
            return out

        first = step().losses["mse_loss"].item()
        for _ in range(a.warmup - 1):
            step()
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            for _ in range(a.steps):
                out = step()
            times.append(time.perf_counter() - t)
        last = out.losses["mse_loss"].item()
        if not (last == last and last < first):
            raise SystemExit(f"saelens_train: {name}: the MSE did not fall ({first:.4g} after 1 step, {last:.4g} at the end)")
        times.sort()
        tps = a.steps * a.batch / times[len(times) // 2]
        print(f"saelens {sae_lens.__version__} {name} d_in {a.d_in} d_sae {a.d_sae} batch {a.batch}, "
              f"{torch.get_num_threads()} threads: {tps:.0f} tokens/s  (median of {a.reps} x {a.steps} steps; "
              f"MSE {first:.3g} after 1 step, {last:.3g} after {total_steps})")
