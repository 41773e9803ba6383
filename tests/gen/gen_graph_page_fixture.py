#!/usr/bin/env python3
"""Writes the attribution-graph JSON fixture of the graph page (tests/test_graph_page.c) with
circuit-tracer 0.5.0 itself, and validates it against Neuronpedia's graph-schema.json.

Usage: python3 tests/gen/gen_graph_page_fixture.py OUTDIR     (normally tests/fixtures/graph_page)
Requirements: tests/gen/requirements-graph-page.txt (runs offline: nothing is downloaded).

A small random Llama (2 layers) is built from a config and converted to a TransformerLens model;
random per-layer ReLU transcoders with a skip connection replace its MLPs. circuit-tracer's
`attribute` computes the graph for a fixed prompt of token ids (its defaults: at most 10 logits up
to cumulative probability 0.95), and its `create_graph_files` prunes it (node threshold 0.95, edge
threshold 0.98: its default 0.8 leaves a single feature of this random model) and writes the graph JSON and graph-metadata.json, as it does for Neuronpedia.
The only stand-in is the tokenizer (create_graph_files loads one by name): a fixed table that
turns each id into a word, some of them made to test the page's escaping ("</script>", "<!--",
"&amp;", a newline, quotes, U+2028, non-ASCII).

Writes:
  OUTDIR/tiny-graph.json        the graph JSON, as create_graph_files wrote it
  OUTDIR/graph-metadata.json    likewise
  OUTDIR/validation.json        versions, counts, and the jsonschema result (must be "valid")
The schema it validates against is OUTDIR/graph-schema.json (a copy of Neuronpedia's; see the
README there). It exits 1 if the graph does not validate.
"""

import importlib
import json
import os
import sys
from importlib.metadata import version

import jsonschema
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_llama_weights

from circuit_tracer import attribute
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

# the module, not the function of the same name that circuit_tracer.utils re-exports
cgf = importlib.import_module("circuit_tracer.utils.create_graph_files")

D, H, HKV, DH, F_MLP, L, V, D_TC = 48, 4, 2, 12, 96, 2, 128, 32
TOKENS = [1, 20, 3, 41, 4, 57, 5, 66, 6, 77, 7, 90]
SLUG = "tiny-graph"
SCAN = "tiny-llama-plt"
# circuit-tracer's default node threshold, 0.8, keeps one feature of this random model; 0.95 keeps 22
NODE_T, EDGE_T = 0.95, 0.98

# ids 3..8 decode to strings a careless page would execute or break on
SPECIAL = {1: "<s>", 2: "</s>", 3: "</script><b>x", 4: "<!--", 5: " &amp; \"q\"", 6: "\n", 7: " caf\u00e9\u2028", 8: "'"}


class FakeTokenizer:
    """What circuit-tracer asks of a tokenizer when the prompt is token ids."""

    vocab_size = V
    all_special_ids = [1]
    bos_token_id = 1
    pad_token_id = None
    eos_token_id = 2
    padding_side = "right"

    def decode(self, ids):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return "".join(SPECIAL.get(int(i), f" w{int(i)}") for i in ids)


class FakeAutoTokenizer:
    @staticmethod
    def from_pretrained(name, *a, **k):
        return FakeTokenizer()


def build_model():
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=HKV, head_dim=DH,
                         intermediate_size=F_MLP, num_hidden_layers=L, vocab_size=V, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.3, torch_dtype="float32")
    hf = LlamaForCausalLM(hf_cfg).eval()
    tl_cfg = HookedTransformerConfig(d_model=D, d_head=DH, n_heads=H, n_key_value_heads=HKV, d_mlp=F_MLP, n_layers=L,
                                     n_ctx=64, d_vocab=V, act_fn="silu", normalization_type="RMS",
                                     positional_embedding_type="rotary", rotary_dim=DH, rotary_base=10000,
                                     rotary_adjacent_pairs=False, gated_mlp=True, final_rms=True, eps=1e-5,
                                     original_architecture="LlamaForCausalLM", model_name="tiny-llama",
                                     default_prepend_bos=False, dtype=torch.float32,
                                     device="cpu")
    return tl_cfg, convert_llama_weights(hf, tl_cfg)


def build_transcoders():
    g = torch.Generator().manual_seed(1)
    tcs = {}
    for layer in range(L):
        t = SingleLayerTranscoder(D, D_TC, F.relu, layer, skip_connection=True, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            t.W_enc.copy_(torch.randn(D_TC, D, generator=g) / D**0.5)
            t.W_dec.copy_(torch.randn(D_TC, D, generator=g) * 0.3)
            t.b_enc.copy_(torch.randn(D_TC, generator=g) * 0.5 - 0.3)
            t.b_dec.copy_(torch.randn(D, generator=g) * 0.1)
            t.W_skip.copy_(torch.randn(D, D, generator=g) * 0.05)
        tcs[layer] = t
    return TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan=SCAN)


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/graph_page"
    os.makedirs(outdir, exist_ok=True)
    tl_cfg, state = build_model()
    model = TransformerLensReplacementModel(tl_cfg)
    _, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    model._configure_replacement_model(build_transcoders())
    model.tokenizer = FakeTokenizer()
    graph = attribute(torch.tensor(TOKENS), model, batch_size=32)
    graph.input_string = FakeTokenizer().decode(TOKENS)
    cgf.AutoTokenizer = FakeAutoTokenizer  # the one stand-in: no tokenizer is loaded by name
    meta = os.path.join(outdir, "graph-metadata.json")
    if os.path.exists(meta):
        os.remove(meta)
    cgf.create_graph_files(graph, slug=SLUG, output_path=outdir, scan=SCAN, node_threshold=NODE_T, edge_threshold=EDGE_T)

    with open(os.path.join(outdir, f"{SLUG}.json")) as f:
        doc = json.load(f)
    with open(os.path.join(outdir, "graph-schema.json")) as f:
        schema = json.load(f)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    kinds = {}
    for n in doc["nodes"]:
        kinds[n["feature_type"]] = kinds.get(n["feature_type"], 0) + 1
    info = {
        "versions": {p: version(p) for p in ("circuit-tracer", "jsonschema", "torch", "transformer-lens", "transformers", "pydantic")},
        "schema": "graph-schema.json (Draft7Validator)",
        "result": "valid" if not errors else "invalid",
        "errors": [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:20]],
        "tokens": TOKENS,
        "n_nodes": len(doc["nodes"]),
        "n_links": len(doc["links"]),
        "nodes_by_type": kinds,
        "unpruned_nodes": int(graph.adjacency_matrix.shape[0]),
    }
    with open(os.path.join(outdir, "validation.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    print(json.dumps(info, indent=1))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
