#!/usr/bin/env python3
"""Generate loupe's Gemma attribution-graph reference fixtures with circuit-tracer 0.5.0.

Usage: python3 tests/gen/gen_graph_gemma_fixture.py OUTDIR   (normally OUTDIR = tests/fixtures/graph_gemma)
Requirements: tests/gen/requirements-graph.txt (as gen_graph_fixture.py; runs offline).

Two tiny random Gemmas built from configs here, saved as Hugging Face checkpoints for loupe and
converted with TransformerLens 2.16's convert_gemma_weights for circuit-tracer's TransformerLens
backend (the one circuit-tracer uses for Gemma 2):
  gemma2: Gemma2ForCausalLM, 3 layers (sliding, full, sliding; window 4 < the 10 prompt tokens),
          GQA 4/2, head_dim 16, query_pre_attn_scalar 24 (not head_dim), attention soft-cap 5 and
          final soft-cap 4 (small enough to bend), post-norms, norm weights away from 0 (1 + w).
  gemma3: Gemma3ForCausalLM (gemma3_text), 3 layers (sliding, sliding, full; pattern 3), q/k
          RMSNorms, no soft-caps, post-norms. TransformerLens 2.16 has q/k norms but its
          converter does not carry Gemma 3's, so they are added here (1 + w), and the local
          rotary base equals the global one (TransformerLens 2.16 has one base).
TransformerLens's attn_types are set to Hugging Face's layer_types (TransformerLens 2.16's own
Gemma 2 entries start with a global layer where Hugging Face starts with a local one); the
script checks the TransformerLens logits against Hugging Face's before attributing.

Transcoder sets (circuit-tracer's per-layer layout, config.yaml beside):
  gemma2/scope: JumpReLU, no skip, ln2.hook_normalized -> hook_mlp_out (Gemma Scope's sites)
  gemma2/skip:  ReLU with skip, mlp.hook_in -> mlp.hook_out (the MLP's output before its post-norm)
  gemma2/topk:  TopK (k 4, no relu after the selection, circuit-tracer's TopK) with skip,
                mlp.hook_in -> hook_mlp_out; encoder biases low, so many chosen values are negative
                (config.yaml carries loupe's activation_function/k keys)
  gemma3/skip:  ReLU with skip, mlp.hook_in -> hook_mlp_out; also run with
                circuit-tracer's zero_positions of instruction-tuned Gemma 3, the first 4 (g3it)
Each graph: every active feature, batch 16, circuit-tracer's default thresholds.

Writes OUTDIR/{gemma2,gemma3}/model (config.json, model.safetensors), the transcoder directories,
OUTDIR/reference.safetensors with, per graph P in (g2scope, g2skip, g2topk, g3skip, g3it):
  P.active_features I32 [n,3], P.activation_values F32, P.logit_targets I32, P.logit_probabilities F32,
  P.selected, P.adjacency, P.node_mask, P.edge_mask, P.cumulative_scores, P.scores (as gen_graph_fixture.py)
and tokens I32 [T]; OUTDIR/reference.json the figures in words.
"""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights

from circuit_tracer import attribute
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
from circuit_tracer.transcoder.activation_functions import JumpReLU, TopK
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_graph_fixture import FakeTokenizer, record  # noqa: E402

D, H, HKV, DH, F_MLP, L, V, D_TC = 48, 4, 2, 16, 96, 3, 256, 24
TOKENS = [2, 17, 200, 33, 91, 150, 7, 64, 120, 5]
QPAS = 24
COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=F_MLP, num_attention_heads=H, num_key_value_heads=HKV,
              head_dim=DH, num_hidden_layers=L, max_position_embeddings=128, rms_norm_eps=1e-6,
              hidden_activation="gelu_pytorch_tanh", sliding_window=4, tie_word_embeddings=True, bos_token_id=2,
              eos_token_id=1, pad_token_id=0, attention_bias=False, query_pre_attn_scalar=QPAS, rope_theta=10000.0,
              torch_dtype="float32")


class Tok(FakeTokenizer):
    bos_token_id = 2
    all_special_ids = [2]


def build(kind, outdir):
    torch.manual_seed(5 if kind == "gemma2" else 6)
    if kind == "gemma2":
        cfg = Gemma2Config(**COMMON, attn_logit_softcapping=5.0, final_logit_softcapping=4.0,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        hf = Gemma2ForCausalLM(cfg)
    else:
        cfg = Gemma3TextConfig(**COMMON, attn_logit_softcapping=None, final_logit_softcapping=None,
                               rope_local_base_freq=10000.0, sliding_window_pattern=3,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        hf = Gemma3ForCausalLM(cfg)
    cfg._attn_implementation = "eager"
    hf = hf.float().eval()
    g = torch.Generator().manual_seed(7 if kind == "gemma2" else 8)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):  # the model uses 1 + w: w away from 0
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
    hf.save_pretrained(os.path.join(outdir, kind, "model"), safe_serialization=True)
    types = ["local" if t == "sliding_attention" else "global" for t in cfg.layer_types]
    tl_cfg = HookedTransformerConfig(
        d_model=D, d_head=DH, n_heads=H, n_key_value_heads=HKV, d_mlp=F_MLP, n_layers=L, n_ctx=128, d_vocab=V,
        act_fn="gelu_pytorch_tanh", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=DH,
        rotary_base=10000, gated_mlp=True, final_rms=True, eps=1e-6, use_attn_scale=True, attn_scale=QPAS**0.5,
        use_local_attn=True, window_size=4, attn_types=types,
        attn_scores_soft_cap=5.0 if kind == "gemma2" else -1.0, output_logits_soft_cap=4.0 if kind == "gemma2" else -1.0,
        use_normalization_before_and_after=True, use_qk_norm=kind == "gemma3",
        original_architecture="Gemma2ForCausalLM" if kind == "gemma2" else "Gemma3ForCausalLM",
        model_name="tiny-" + kind, default_prepend_bos=False, dtype=torch.float32, device="cpu")
    state = convert_gemma_weights(hf, tl_cfg)
    if kind == "gemma3":
        for layer in range(L):
            at = hf.model.layers[layer].self_attn
            state[f"blocks.{layer}.attn.q_norm.w"] = at.q_norm.weight.float() + 1.0
            state[f"blocks.{layer}.attn.k_norm.w"] = at.k_norm.weight.float() + 1.0
    return hf, tl_cfg, state


def transcoders(path, relu_skip, in_hook, out_hook, scan, seed, topk=0):
    """relu_skip: ReLU with W_skip (topk > 0: TopK(topk) with W_skip instead); else JumpReLU."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    tcs = {}
    for layer in range(L):
        thr = torch.rand(D_TC, generator=g) * 0.3 + 0.05
        act = TopK(topk) if topk else F.relu if relu_skip else JumpReLU(thr.clone(), 0.1)
        t = SingleLayerTranscoder(D, D_TC, act, layer, skip_connection=relu_skip, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            t.W_enc.copy_(torch.randn(D_TC, D, generator=g) / D**0.5 * (2.0 if not relu_skip else 1.0))
            t.W_dec.copy_(torch.randn(D_TC, D, generator=g) * 0.3)
            t.b_enc.copy_(torch.randn(D_TC, generator=g) * 0.5 - (1.5 if topk else 0.4))
            t.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
            if relu_skip:
                t.W_skip.copy_(torch.randn(D, D, generator=g) * 0.05)
        keys = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["W_skip"] if relu_skip else [])
        tensors = {k: getattr(t, k).detach().numpy().copy() for k in keys}
        if not relu_skip:
            tensors["activation_function.threshold"] = thr.numpy().copy()
        save_file(tensors, os.path.join(path, f"layer_{layer}.safetensors"))
        tcs[layer] = t
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(f"model_kind: transcoder_set\nfeature_input_hook: {in_hook}\nfeature_output_hook: {out_hook}\n"
                f"model_name: tiny\nscan: {scan}\n")
        if topk:  # loupe's keys for TopK (circuit-tracer 0.5.0's loader has no file form for it)
            f.write(f"activation_function: topk\nk: {topk}\n")
    return TranscoderSet(tcs, feature_input_hook=in_hook, feature_output_hook=out_hook, scan=scan)


def run(prefix, tl_cfg, state, tcs, out, info, zero_positions=None):
    model = TransformerLensReplacementModel(tl_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    model._configure_replacement_model(tcs)
    if zero_positions is not None:
        model.zero_positions = zero_positions
    model.tokenizer = Tok()
    g = attribute(torch.tensor(TOKENS), model, batch_size=16)
    out[prefix + "active_features"] = np.ascontiguousarray(g.active_features.numpy()).astype(np.int32)
    out[prefix + "activation_values"] = g.activation_values.numpy().astype(np.float32)
    out[prefix + "logit_targets"] = np.array([t.vocab_idx for t in g.logit_targets], dtype=np.int32)
    out[prefix + "logit_probabilities"] = g.logit_probabilities.numpy().astype(np.float32)
    info[prefix[:-1]] = record(prefix, g, out)
    info[prefix[:-1]]["n_active"] = int(len(g.active_features))
    info[prefix[:-1]]["n_logits"] = int(len(g.logit_targets))
    return model


def check_logits(hf, model):
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0]
        got = model(tokens[None])[0]
    err = (ref - got).abs().max().item()
    assert err < 1e-4, err
    return err


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/graph_gemma"
    os.makedirs(outdir, exist_ok=True)
    out, info = {"tokens": np.array(TOKENS, dtype=np.int32)}, {"tokens": TOKENS, "torch": torch.__version__}
    hf2, cfg2, st2 = build("gemma2", outdir)
    tc = transcoders(os.path.join(outdir, "gemma2", "scope"), False, "ln2.hook_normalized", "hook_mlp_out", "tiny-g2-scope", 11)
    m = run("g2scope.", cfg2, st2, tc, out, info)
    info["gemma2_tl_vs_hf_logits"] = check_logits(hf2, m)
    tc = transcoders(os.path.join(outdir, "gemma2", "skip"), True, "mlp.hook_in", "mlp.hook_out", "tiny-g2-skip", 12)
    run("g2skip.", cfg2, st2, tc, out, info)
    tc = transcoders(os.path.join(outdir, "gemma2", "topk"), True, "mlp.hook_in", "hook_mlp_out", "tiny-g2-topk", 14, topk=4)
    run("g2topk.", cfg2, st2, tc, out, info)
    info["g2topk"]["negative_activations"] = int((out["g2topk.activation_values"] < 0).sum())
    hf3, cfg3, st3 = build("gemma3", outdir)
    tc = transcoders(os.path.join(outdir, "gemma3", "skip"), True, "mlp.hook_in", "hook_mlp_out", "tiny-g3-skip", 13)
    m = run("g3skip.", cfg3, st3, tc, out, info)
    info["gemma3_tl_vs_hf_logits"] = check_logits(hf3, m)
    # circuit-tracer zeroes positions 0..3 (<bos><start_of_turn>user\n) instead of position 0
    # alone for a model named gemma-3*-it (its zero_positions); that name also makes it demand
    # those four token ids, which a 256-token vocabulary lacks, so zero_positions is set as
    # _configure_replacement_model sets it for such a model
    run("g3it.", cfg3, st3, tc, out, info, zero_positions=slice(0, 4))
    save_file(out, os.path.join(outdir, "reference.safetensors"))
    with open(os.path.join(outdir, "reference.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
