#!/usr/bin/env python3
"""Generate loupe's attribution-graph reference fixture with circuit-tracer 0.5.0.

Usage: python3 tests/gen/gen_graph_fixture.py OUTDIR        (normally OUTDIR = tests/fixtures/graph)
Requirements: tests/gen/requirements-graph.txt (runs offline: nothing is downloaded).

The model is a small random Llama built from a config here (grouped-query attention, default
rotary, tied embeddings), saved as a Hugging Face checkpoint for loupe and converted to a
TransformerLens model for circuit-tracer; the transcoders are random per-layer ReLU transcoders with
a skip connection (mlp.hook_in -> mlp.hook_out), written in circuit-tracer's layout. circuit-tracer
builds the graph for a fixed prompt (token ids, BOS first) with its defaults (at most 10 logits up to
cumulative probability 0.95, node threshold 0.8, edge threshold 0.98), once with every active feature
and once with max_feature_nodes=MAXF, which exercises its influence-ordered selection.

Writes:
  OUTDIR/model/config.json, model.safetensors          the Llama (loupe reads it)
  OUTDIR/transcoders/layer_{i}.safetensors            W_enc [d_tc,d], W_dec [d_tc,d], b_enc, b_dec, W_skip [d,d]
  OUTDIR/reference.safetensors:
    tokens I32 [T]; active_features I32 [n,3] (layer, pos, feature); activation_values F32 [n]
    logit_targets I32 [k]; logit_probabilities F32 [k]
    full.selected I32, full.adjacency F32 [N,N], full.node_mask U8 [N], full.edge_mask U8 [N,N],
    full.cumulative_scores F32 [N], full.scores F64 [2] (replacement, completeness)
    sel.* the same for max_feature_nodes=MAXF
    clt.* the same (and clt.active_features, clt.activation_values, clt.logit_targets) with a random
      cross-layer transcoder (OUTDIR/clt: W_enc_{i}, W_dec_{i} files and config.yaml) in place of the
      per-layer ones
  OUTDIR/reference.json: the figures above in words, versions, the prompt
  OUTDIR/graph-full.json: the viewer's JSON of the full graph as create_graph_files writes it
    (slug tiny-llama-graph, scan tiny-llama-plt, token strings "<id>")
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_llama_weights

import circuit_tracer
from circuit_tracer import attribute
from circuit_tracer.graph import compute_graph_scores, prune_graph
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
from circuit_tracer.utils.create_graph_files import build_model as ct_build_model, create_nodes, create_used_nodes_and_edges

D, H, HKV, DH, F_MLP, L, V, D_TC = 64, 4, 2, 16, 160, 3, 256, 48
TOKENS = [1, 17, 200, 33, 91, 150, 7, 64, 120, 5]
MAXF = 40


class FakeTokenizer:
    """What circuit-tracer asks of a tokenizer when the prompt is given as ids."""

    vocab_size = V
    all_special_ids = [1]
    bos_token_id = 1
    pad_token_id = None
    eos_token_id = 2
    padding_side = "right"

    def decode(self, ids):
        if isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.ndim == 0):
            return f"<{int(ids)}>"
        return "".join(f"<{int(i)}>" for i in ids)


def build_model(outdir):
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=HKV, head_dim=DH,
                         intermediate_size=F_MLP, num_hidden_layers=L, vocab_size=V, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.2, torch_dtype="float32")
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norm weights away from 1 so that frozen scales matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    hf.save_pretrained(os.path.join(outdir, "model"), safe_serialization=True)
    tl_cfg = HookedTransformerConfig(d_model=D, d_head=DH, n_heads=H, n_key_value_heads=HKV, d_mlp=F_MLP, n_layers=L,
                                     n_ctx=128, d_vocab=V, act_fn="silu", normalization_type="RMS",
                                     positional_embedding_type="rotary", rotary_dim=DH, rotary_base=10000,
                                     rotary_adjacent_pairs=False, gated_mlp=True, final_rms=True, eps=1e-5,
                                     original_architecture="LlamaForCausalLM", model_name="tiny-llama",
                                     default_prepend_bos=False, dtype=torch.float32, device="cpu")
    return hf, tl_cfg, convert_llama_weights(hf, tl_cfg)


def build_transcoders(outdir):
    g = torch.Generator().manual_seed(1)
    tcs = {}
    os.makedirs(os.path.join(outdir, "transcoders"), exist_ok=True)
    for layer in range(L):
        t = SingleLayerTranscoder(D, D_TC, F.relu, layer, skip_connection=True, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            t.W_enc.copy_(torch.randn(D_TC, D, generator=g) / D**0.5)
            t.W_dec.copy_(torch.randn(D_TC, D, generator=g) * 0.3)
            t.b_enc.copy_(torch.randn(D_TC, generator=g) * 0.5 - 0.4)
            t.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
            t.W_skip.copy_(torch.randn(D, D, generator=g) * 0.05)
        save_file({k: getattr(t, k).detach().numpy().copy() for k in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip")},
                  os.path.join(outdir, "transcoders", f"layer_{layer}.safetensors"))
        tcs[layer] = t
    write_config(os.path.join(outdir, "transcoders"), "transcoder_set", "tiny-llama-plt")
    return TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="tiny-llama-plt")


def build_clt(outdir):
    """A random cross-layer transcoder (ReLU, no skip: circuit-tracer's CLT files carry none)."""
    g = torch.Generator().manual_seed(2)
    clt = CrossLayerTranscoder(L, D_TC, D, activation_function="relu", skip_connection=False, lazy_decoder=False,
                               feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="tiny-llama-clt",
                               device="cpu", dtype=torch.float32)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(L, D_TC, D, generator=g) / D**0.5)
        clt.b_enc.copy_(torch.randn(L, D_TC, generator=g) * 0.5 - 0.4)
        clt.b_dec.copy_(torch.randn(L, D, generator=g) * 0.1)
        for i in range(L):
            clt.W_dec[i].copy_(torch.randn(D_TC, L - i, D, generator=g) * 0.2)
    path = os.path.join(outdir, "clt")
    clt.to_safetensors(path)
    write_config(path, "cross_layer_transcoder", "tiny-llama-clt")
    return clt


def write_config(path, kind, scan):
    """circuit-tracer's config.yaml (what its cache loader reads)."""
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(f"model_kind: {kind}\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n"
                f"model_name: tiny-llama\nscan: {scan}\n")


def record(prefix, graph, out):
    pr = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    rep, comp = compute_graph_scores(graph)
    out[prefix + "selected"] = graph.selected_features.numpy().astype(np.int32)
    out[prefix + "adjacency"] = graph.adjacency_matrix.numpy().astype(np.float32)
    out[prefix + "node_mask"] = pr.node_mask.numpy().astype(np.uint8)
    out[prefix + "edge_mask"] = pr.edge_mask.numpy().astype(np.uint8)
    out[prefix + "cumulative_scores"] = pr.cumulative_scores.numpy().astype(np.float32)
    out[prefix + "scores"] = np.array([rep, comp], dtype=np.float64)
    return {"n_nodes": int(graph.adjacency_matrix.shape[0]), "n_selected": int(len(graph.selected_features)),
            "kept_nodes": int(pr.node_mask.sum()), "kept_edges": int(pr.edge_mask.sum()),
            "replacement_score": rep, "completeness_score": comp}


def write_json(graph, path):
    """What create_graph_files writes, with the tokenizer above (it would load one from the hub)."""
    pr = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    tok = FakeTokenizer()
    nodes = create_nodes(graph, pr.node_mask, tok, pr.cumulative_scores)
    used_nodes, used_edges = create_used_nodes_and_edges(graph, nodes, pr.edge_mask)
    model = ct_build_model(graph, used_nodes, used_edges, "tiny-llama-graph", "tiny-llama-plt", 0.8, tok)
    with open(path, "w") as f:
        f.write(model.model_dump_json(indent=2))


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/graph"
    os.makedirs(outdir, exist_ok=True)
    hf, tl_cfg, state = build_model(outdir)
    tcs = build_transcoders(outdir)
    model = TransformerLensReplacementModel(tl_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    model._configure_replacement_model(tcs)
    model.tokenizer = FakeTokenizer()
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():  # the TransformerLens model is the Hugging Face one
        ref = hf(tokens[None]).logits[0]
        got = model(tokens[None])[0]
        assert (ref - got).abs().max() < 1e-4, (ref - got).abs().max()
    out, info = {}, {"circuit_tracer": circuit_tracer.__version__ if hasattr(circuit_tracer, "__version__") else "0.5.0",
                     "torch": torch.__version__, "tokens": TOKENS, "max_feature_nodes": MAXF}
    g_full = attribute(tokens, model, batch_size=16)
    g_sel = attribute(tokens, model, batch_size=8, max_feature_nodes=MAXF, update_interval=2)
    out["tokens"] = tokens.numpy().astype(np.int32)
    out["active_features"] = np.ascontiguousarray(g_full.active_features.cpu().clone().contiguous().numpy()).astype(np.int32)
    assert out["active_features"][:, 0].max() == L - 1, "active_features did not survive the conversion"
    out["activation_values"] = g_full.activation_values.numpy().astype(np.float32)
    out["logit_targets"] = np.array([t.vocab_idx for t in g_full.logit_targets], dtype=np.int32)
    out["logit_probabilities"] = g_full.logit_probabilities.numpy().astype(np.float32)
    info["full"] = record("full.", g_full, out)
    write_json(g_full, os.path.join(outdir, "graph-full.json"))
    info["sel"] = record("sel.", g_sel, out)
    info["n_active"] = int(len(g_full.active_features))
    # the same model with a cross-layer transcoder
    clt_model = TransformerLensReplacementModel(tl_cfg)
    clt_model.load_state_dict(state, strict=False)
    clt_model._configure_replacement_model(build_clt(outdir))
    clt_model.tokenizer = FakeTokenizer()
    g_clt = attribute(tokens, clt_model, batch_size=16)
    out["clt.active_features"] = np.ascontiguousarray(g_clt.active_features.cpu().clone().contiguous().numpy()).astype(np.int32)
    out["clt.activation_values"] = g_clt.activation_values.numpy().astype(np.float32)
    out["clt.logit_targets"] = np.array([t.vocab_idx for t in g_clt.logit_targets], dtype=np.int32)
    info["clt"] = record("clt.", g_clt, out)
    info["clt"]["n_active"] = int(len(g_clt.active_features))
    info["n_logits"] = int(len(g_full.logit_targets))
    save_file(out, os.path.join(outdir, "reference.safetensors"))
    with open(os.path.join(outdir, "reference.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
