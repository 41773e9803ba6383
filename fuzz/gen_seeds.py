#!/usr/bin/env python3
"""Writes the seed corpora of the reader harnesses in fuzz/ (standard library only):
small, valid inputs in each harness's framing (see the harness's header comment), so the
fuzzers start from files the readers accept and mutate from there.

    python3 fuzz/gen_seeds.py fuzz/corpus

The gguf and safetensors corpora come from tests/gen/gen_gguf_fixture.py --fuzz-corpus."""
import json
import os
import struct
import sys
import zipfile
import io

SEP = b"\n--8<--\n"


def npy(descr, shape, data, version=1):
    d = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, shape)
    pre = 10 if version == 1 else 12
    hl = (len(d) + 1 + pre + 63) // 64 * 64 - pre
    hdr = (d + " " * (hl - len(d) - 1) + "\n").encode()
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", hl) + hdr + data
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", hl) + hdr + data


def safetensors(tensors, meta=None):
    """tensors: list of (name, dtype, shape, bytes)."""
    hdr, off, blob = {}, 0, b""
    if meta:
        hdr["__metadata__"] = meta
    for name, dt, shape, data in tensors:
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
        blob += data
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob


def f32(n, scale=0.25):
    return struct.pack("<%df" % n, *[(i % 5) * scale for i in range(n)])


def gguf(kv, tensors=()):
    def s(x):
        b = x.encode() if isinstance(x, str) else x
        return struct.pack("<Q", len(b)) + b

    def val(t, v):
        fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
        if t == 8:
            return s(v)
        if t == 9:
            et, items = v
            return struct.pack("<IQ", et, len(items)) + b"".join(val(et, x) for x in items)
        return struct.pack(fmt[t], v)

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, t, v in kv:
        out += s(k) + struct.pack("<I", t) + val(t, v)
    off, blob = 0, b""
    for name, dims, data in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", 0, off)  # F32
        blob += data + b"\0" * (-len(data) % 32)
        off = len(blob)
    out += b"\0" * (-len(out) % 32)
    return out + blob


# a byte-level BPE vocabulary: the printable bytes as themselves plus a few merges
def byte_vocab():
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["\u0120", "\u010a", "\u0109"]  # Ġ (space), Ċ (\n), ĉ (\t)
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("H", "e"), ("l", "l"), ("He", "ll"), ("\u0120", "w"), ("o", "r")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


def tokenizer_json(variant):
    vocab, merges = byte_vocab()
    pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
          "pre_tokenizer": pre, "post_processor": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                    "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                    "vocab": vocab, "merges": [a + " " + b for a, b in merges]}}
    if variant >= 1:
        n = len(vocab)
        tj["added_tokens"] = [
            {"id": n, "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True},
            {"id": n + 1, "content": "<|im_start|>", "single_word": False, "lstrip": True, "rstrip": True,
             "normalized": False, "special": True}]
        tj["post_processor"] = {"type": "TemplateProcessing",
                                "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                           {"Sequence": {"id": "A", "type_id": 0}}],
                                "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [n],
                                                                     "tokens": ["<|endoftext|>"]}}}
    if variant >= 2:
        tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}]}
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "Split", "pattern": {"Regex": "\\p{L}+| ?\\p{N}"}, "behavior": "Isolated", "invert": False},
            dict(pre, use_regex=False)]}
        tj["model"]["merges"] = [[a, b] for a, b in merges]
        tj["model"]["ignore_merges"] = True
    return json.dumps(tj, ensure_ascii=False).encode()


def write(root, name, files):
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    for fn, data in files.items():
        with open(os.path.join(d, fn), "wb") as f:
            f.write(data)


def main(root):
    ids = struct.pack("<6i", 1, 2, 3, 4, 5, 6)
    write(root, "tokens", {
        "seed-2d.npy": bytes([0, 3]) + npy("<i4", "(2, 3)", ids),
        "seed-flat-u2.npy": bytes([8, 4]) + npy("<u2", "(6,)", struct.pack("<6H", 1, 2, 3, 4, 5, 6)),
        "seed-v2-i8.npy": bytes([0, 2]) + npy("<i8", "(4,)", struct.pack("<4q", 1, 2, 3, 4), version=2),
        "seed-u4.bin": bytes([4, 2]) + struct.pack("<4I", 1, 2, 3, 4),
        "seed-u2.bin": bytes([3, 3]) + struct.pack("<6H", 9, 8, 7, 6, 5, 4),
    })
    cfg = json.dumps({"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"}}).encode()
    write(root, "tokenizer_json", {
        "seed-plain.json": tokenizer_json(0),
        "seed-added.json": tokenizer_json(1) + SEP + cfg + SEP + b"<|endoftext|>Hello world",
        "seed-split.json": tokenizer_json(2) + SEP + b"{}" + SEP + "Caf\u00e9 42".encode(),
    })
    vocab, merges = byte_vocab()
    toks = sorted(vocab, key=vocab.get) + ["<|endoftext|>"]
    types = [1] * (len(toks) - 1) + [3]
    tok_kv = [("tokenizer.ggml.model", 8, "gpt2"), ("tokenizer.ggml.pre", 8, "smollm"),
              ("tokenizer.ggml.tokens", 9, (8, toks)), ("tokenizer.ggml.token_type", 9, (5, types)),
              ("tokenizer.ggml.merges", 9, (8, [a + " " + b for a, b in merges])),
              ("tokenizer.ggml.bos_token_id", 4, len(toks) - 1), ("tokenizer.ggml.eos_token_id", 4, len(toks) - 1),
              ("tokenizer.ggml.add_bos_token", 7, True)]
    write(root, "tokenizer_gguf", {
        "seed-smollm.gguf": gguf([("general.architecture", 8, "llama")] + tok_kv),
        "seed-llama3.gguf": gguf([("general.architecture", 8, "llama")] + [
            (k, t, "llama-bpe" if k == "tokenizer.ggml.pre" else v) for k, t, v in tok_kv]),
    })
    V, D, F, L = len(toks), 8, 16, 1
    kv = [("general.architecture", 8, "llama"), ("general.alignment", 4, 32), ("llama.block_count", 4, L),
          ("llama.context_length", 4, 16), ("llama.embedding_length", 4, D), ("llama.feed_forward_length", 4, F),
          ("llama.attention.head_count", 4, 2), ("llama.attention.head_count_kv", 4, 1),
          ("llama.attention.layer_norm_rms_epsilon", 6, 1e-5), ("llama.rope.freq_base", 6, 10000.0)] + tok_kv
    kvD = 4
    ts = [("token_embd.weight", [D, V], f32(D * V)), ("blk.0.attn_norm.weight", [D], f32(D)),
          ("blk.0.attn_q.weight", [D, D], f32(D * D)), ("blk.0.attn_k.weight", [D, kvD], f32(D * kvD)),
          ("blk.0.attn_v.weight", [D, kvD], f32(D * kvD)), ("blk.0.attn_output.weight", [D, D], f32(D * D)),
          ("blk.0.ffn_norm.weight", [D], f32(D)), ("blk.0.ffn_gate.weight", [D, F], f32(D * F)),
          ("blk.0.ffn_up.weight", [D, F], f32(D * F)), ("blk.0.ffn_down.weight", [F, D], f32(D * F)),
          ("output_norm.weight", [D], f32(D))]
    write(root, "model_gguf", {"seed-llama.gguf": gguf(kv, ts)})
    gpt2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "n_positions": 16, "vocab_size": 32,
            "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 8,
             "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16,
             "vocab_size": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
             "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8}}
    index = json.dumps({"metadata": {"total_size": 64}, "weight_map": {"wte.weight": "a.safetensors",
                                                                         "h.0.ln_1.weight": "b.safetensors"}}).encode()
    write(root, "hf_config", {
        "seed-gpt2.json": json.dumps(gpt2).encode(),
        "seed-llama.json": json.dumps(llama).encode() + SEP + index,
        "seed-qwen2.json": json.dumps(dict(llama, model_type="qwen2", rope_scaling=None, sliding_window=8,
                                           use_sliding_window=False)).encode(),
    })
    sa = safetensors([("wte.weight", "F32", [2, 4], f32(8)), ("x", "BF16", [3], b"\0\x3f" * 3)])
    sb = safetensors([("h.0.ln_1.weight", "F32", [4], f32(4))], {"format": "pt"})
    write(root, "st_index", {"seed-two.json": index + SEP + sa + SEP + sb,
                             "seed-one.json": json.dumps({"weight_map": {"x": "a.safetensors"}}).encode() + SEP + sa})
    write(root, "ini", {
        "seed-a.ini": b"[model]\npath = models/x.gguf\ndtype = bf16\n\n[cache]\nbatch = 5\n",
        "seed-b.ini": b"; comment\n[train]\ntokens = 1000000\nlr = 3e-4\n[data]\npath = \"a b\"\n",
    })
    d_in, d_sae = 4, 8
    saelens = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "architecture": "jumprelu",
               "metadata": {"model_name": "gpt2", "hook_name": "blocks.2.hook_resid_post", "context_size": 128}}
    write(root, "sae_cfg", {
        "seed-saelens-jumprelu.json": b"\0" + json.dumps(saelens).encode(),
        "seed-saelens-topk.json": b"\0" + json.dumps(dict(saelens, architecture="topk", k=4)).encode(),
        "seed-saelens-v5.json": b"\0" + json.dumps({"d_in": 4, "d_sae": 8, "activation_fn_str": "topk",
                                                    "activation_fn_kwargs": {"k": 2}, "hook_point": "blocks.0.hook_resid_pre",
                                                    "model_name": "gpt2", "apply_b_dec_to_input": False}).encode(),
        "seed-saelens-skip.json": b"\0" + json.dumps(dict(saelens, architecture="jumprelu_skip_transcoder",
                                                          apply_b_dec_to_input=False, d_out=4,
                                                          metadata=dict(saelens["metadata"], hook_name_out="blocks.2.hook_mlp_out"))).encode(),
        "seed-sparsify.json": b"\1" + json.dumps({"activation": "topk", "expansion_factor": 2, "num_latents": 0, "k": 2,
                                                  "skip_connection": True, "transcode": False, "d_in": 4}).encode()
                              + SEP + json.dumps({"model": "gpt2", "ctx_len": 64}).encode(),
    })

    def npz(entries, zip64=False, compress=False):
        b = io.BytesIO()
        with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
            for name, data in entries:
                with z.open(name, "w", force_zip64=zip64) as f:
                    f.write(data)
        return b.getvalue()

    ents = [("W_enc.npy", npy("<f4", "(4, 8)", f32(32))), ("W_dec.npy", npy("<f4", "(8, 4)", f32(32))),
            ("b_enc.npy", npy("<f4", "(8,)", f32(8))), ("b_dec.npy", npy("<f4", "(4,)", f32(4))),
            ("threshold.npy", npy("<f4", "(8,)", f32(8)))]
    write(root, "npz", {"seed-params.npz": npz(ents), "seed-zip64.npz": npz(ents, zip64=True),
                        "seed-f2.npz": npz([(n, npy("<f2", s, b"\0\x3c" * c)) for n, s, c in
                                            [("W_enc.npy", "(2, 2)", 4), ("W_dec.npy", "(2, 2)", 4), ("b_enc.npy", "(2,)", 2),
                                             ("b_dec.npy", "(2,)", 2), ("threshold.npy", "(2,)", 2)]])})
    hook = "blocks.0.hook_resid_post"
    meta = json.dumps({"model": "gpt2", "tokens": "t.npy", "context": 3, "dtype": "f32", "shard_sequences": 2,
                       "hooks": [hook], "n_sequences_planned": 3, "shards": [{"file": "shard-00000.safetensors"},
                                                                          {"file": "shard-00001.safetensors"}]}).encode()
    sh0 = safetensors([(hook, "F32", [2, 3, 4], f32(24)), ("tokens", "I32", [2, 3], struct.pack("<6i", *range(6)))])
    sh1 = safetensors([(hook, "BF16", [1, 3, 4], b"\x80\x3f" * 12)])
    write(root, "store", {"seed-one": meta + SEP + sh0, "seed-two": meta + SEP + sh0 + SEP + sh1})
    nf = d_in * d_sae * 2 + d_sae + d_in  # standard SAE 4 -> 8
    state = json.dumps({"step": 7, "tokens": 7000, "scale": "0x1p+0", "batchtopk_threshold": "0x0p+0",
                        "signature": "@SIG@"}).encode()
    st = safetensors([("params", "F32", [nf], f32(nf)), ("adam_m", "F32", [nf], f32(nf)),
                      ("adam_v", "F32", [nf], f32(nf)), ("since_fired", "I64", [d_sae], struct.pack("<8q", *range(8)))])
    metrics = b"".join(json.dumps({"step": s, "mse": 0.5}).encode() + b"\n" for s in range(1, 10))
    write(root, "checkpoint", {"seed-state": state + SEP + st + SEP + metrics,
                               "seed-nosig": state.replace(b"@SIG@", b"other") + SEP + st + SEP + metrics[:-1]})

    pairs = b"".join(json.dumps(d).encode() + b"\n" for d in [
        {"clean": "ab ab", "corrupted": "ab c", "answer": "a", "wrong_answer": "c"},
        {"clean": [0, 1, 2], "corrupted": [2, 1, 0], "answer": 3, "wrong_answer": [4]},
        {"clean": "ab", "corrupted": "a b c", "answer": " ", "wrong_answer": "b"}])
    results = b"".join(json.dumps({"index": i, "metric": 0.5}).encode() + b"\n" for i in range(2)) + b'{"index": 2'
    write(root, "pairs", {"seed-exact.jsonl": b"\0" + pairs + SEP + results,
                          "seed-pad.jsonl": b"\1" + pairs + b"not json\n\n  {}\n" + SEP + results})
    # a resumed sweep: pairs 0 and 1 done, a scores file holding pairs 0 to 2 (2 is cut away)
    scores = safetensors([(f"pair{i:06d}.atp.{h}", "F32", [2], f32(2)) for i in (0, 1, 2) for h in ("hook_z", "mlp_out")])
    write(root, "pairs", {"seed-resume.jsonl": b"\0" + pairs + SEP + results + b"\n" + SEP + scores})
    prompts = b"".join(json.dumps(d).encode() + b"\n" for d in [
        {"prompt": "ab ab c", "answer": "a", "wrong_answer": "c", "position": -2},
        {"prompt": [0, 1, 2], "answer": 3}, {"prompt": "ab"}])
    write(root, "pairs", {"seed-lens.jsonl": b"\2" + prompts})
    graph_seeds(root)


def graph_seeds(root):
    """Attribution graph JSON in circuit-tracer's layout: each node kind, links of both signs,
    a pinned node, a token that needs escaping; and the same with integer layers, no links."""
    def node(nid, layer, pos, kind, feature, **extra):
        d = {"node_id": nid, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind,
             "jsNodeId": nid, "clerp": "", "influence": 0.25}
        d.update(extra)
        return d
    nodes = [node("E_5_0", "E", 0, "embedding", 0), node("E_9_1", "E", 1, "embedding", 1),
             node("0_3_1", "0", 1, "cross layer transcoder", 9, activation=1.5),
             node("0_1_1", "1", 1, "mlp reconstruction error", -1),
             node("3_7_1", "3", 1, "logit", 7, influence=None, token_prob=0.5, is_target_logit=True,
                  clerp='Output " x" (p=0.500)')]
    links = [{"source": "E_5_0", "target": "0_3_1", "weight": 1.25}, {"source": "0_3_1", "target": "3_7_1", "weight": -0.5},
             {"source": "0_1_1", "target": "3_7_1", "weight": 2e-3}, {"source": "E_9_1", "target": "0_1_1", "weight": 3}]
    g = {"metadata": {"slug": "s", "scan": "m", "prompt_tokens": ["<s>", "</script>"], "prompt": "</script>",
                      "node_threshold": 0.8},
         "qParams": {"pinnedIds": ["0_3_1"], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
         "nodes": nodes, "links": links}
    flat = json.loads(json.dumps(g))
    for n in flat["nodes"]:
        n["layer"] = n["layer"] if n["layer"] == "E" else int(n["layer"])
    flat["links"] = []
    write(root, "graph", {"seed-graph.json": json.dumps(g, indent=1).encode(),
                          "seed-int-layers.json": json.dumps(flat).encode()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus"))
