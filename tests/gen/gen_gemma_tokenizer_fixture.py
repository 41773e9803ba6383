#!/usr/bin/env python3
"""Generate loupe's Gemma (SentencePiece-style BPE with byte fallback) tokenizer fixtures.

Usage: python3 tests/gen/gen_gemma_tokenizer_fixture.py OUTDIR [GEMMA.gguf]
       (normally OUTDIR = tests/fixtures/tokenizer, GEMMA.gguf = models/gemma-3-270m-q4_k_m.gguf)

Writes:
  OUTDIR/gemma/tokenizer.json   a small tokenizer in the layout transformers writes for Gemma
                                (and produces from Gemma's GGUF): normalizer Replace " " -> "▁",
                                pre-tokenizer Split " " MergedWithPrevious (after the normalizer it
                                never matches: one BPE word per text between added tokens), model
                                BPE with byte_fallback and fuse_unk, unk "<unk>", the 256 byte
                                tokens <0x00>..<0xFF> in the vocabulary (not added tokens),
                                specials <pad> <eos> <bos> <unk> <mask> as ids 0..4, decoder
                                Replace "▁" -> " ", ByteFallback, Fuse; post-processor "<bos> $A".
                                Its pieces are trained here on a few licences and the corpus with
                                a small alphabet (so byte fallback happens), plus merges for runs
                                of "▁" and of "\\n" ranked first, as Gemma's vocabulary has them.
  OUTDIR/gemma/ids.json         as gen_tokenizer_fixture.py's ids.json: `ids` per corpus string
                                (Tokenizer.encode(s).ids, so with <bos>), `decoded`, `joined_ids`,
                                `nul_text_ids`
  OUTDIR/gemma3-gguf-ids.json   (with GEMMA.gguf) the same for the real Gemma 3 vocabulary: the
                                tokenizer is what transformers builds from the GGUF's
                                tokenizer.ggml.* metadata (AutoTokenizer.from_pretrained(gguf_file=)),
                                not written (38 MB); `rule` says how its merges are ranked

The corpus is tests/gen/gen_tokenizer_fixture.py's CORPUS (and NUL_TEXT), imported.

transformers ranks the merges of Gemma's GGUF vocabulary (generate_merges) by the id of the
merged piece, then by the length of its left part, longer first; pieces that are special
tokens take no part. A C reader can therefore rank a pair (a, b) as (id(a + b), -len(a))
when a, b and a + b are all ordinary pieces, without listing the 515k merges. The script checks that rule against the merges transformers produced.

SentencePiece itself merges by piece score and treats runs of spaces differently (it keeps
"▁" glued to the next word: "a  b" is "a", "▁", "▁b"), while the converted BPE gives "a",
"▁▁", "b"; these fixtures follow Hugging Face's converted tokenizer, which is what a
tokenizer.json holds and what TransformerLens and SAELens tokenize with.

Pinned: tests/gen/requirements-gemma.txt. Deterministic.
"""

import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_tokenizer_fixture import CORPUS, NUL_TEXT, training_text, write_json  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from tokenizers.trainers import BpeTrainer  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
RUNS = [("▁", "▁"), ("▁▁", "▁"), ("▁▁", "▁▁"), ("\n", "\n"), ("\n\n", "\n")]


def gemma_layout(tok):
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos>:1 $B:1",
                                                       special_tokens=[("<bos>", 2)])


def make_small():
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # training only: words start at "▁", as SentencePiece's pieces do
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    # a small alphabet, so that byte fallback happens: the 90 most frequent characters (ties by
    # code point; the trainer's own limit_alphabet breaks ties in hash order, not reproducibly)
    texts = [t.replace(" ", "▁") for t in training_text()]
    counts = {}
    for t in texts:
        for c in t:
            counts[c] = counts.get(c, 0) + 1
    alphabet = set(sorted(counts, key=lambda c: (-counts[c], ord(c)))[:90]) | {"▁", "\n"}
    texts = ["".join(c for c in t if c in alphabet) for t in texts]
    trainer = BpeTrainer(vocab_size=1200, show_progress=False, special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    j = json.loads(tok.to_str())
    trained = sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1])
    pieces = SPECIALS + BYTES + [p for p, _ in trained if p not in SPECIALS and p not in BYTES]
    for a, b in RUNS:
        if a + b not in pieces:
            pieces.append(a + b)
    for p in ["▁", "\n"]:
        assert p in pieces, p
    merges = [list(m) for m in RUNS] + [m if isinstance(m, list) else m.split(" ") for m in j["model"]["merges"]]
    vocab = {p: i for i, p in enumerate(pieces)}
    model = BPE(vocab=vocab, merges=[tuple(m) for m in merges], unk_token="<unk>", byte_fallback=True,
                fuse_unk=True)
    out = Tokenizer(model)
    gemma_layout(out)
    out.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return out


def record(tok):
    ids = [tok.encode(s).ids for s in CORPUS]
    decoded = [tok.decode(x, skip_special_tokens=False) for x in ids]
    joined = tok.encode("\n".join(CORPUS)).ids
    return {"ids": ids, "decoded": decoded, "joined_ids": joined, "nul_text_ids": tok.encode(NUL_TEXT).ids}


def from_gguf(path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    tok = hf.backend_tokenizer
    j = json.loads(tok.to_str())
    m = j["model"]
    assert m["type"] == "BPE" and m["byte_fallback"] and m["fuse_unk"] and m["unk_token"] == "<unk>"
    assert j["normalizer"] == {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}, j["normalizer"]
    # the ranking rule stated in the docstring, checked against every merge transformers made
    vocab = m["vocab"]
    special = {t["content"] for t in j["added_tokens"] if t["special"]}
    keys = []
    for a, b in m["merges"]:
        assert a not in special and b not in special and a + b not in special
        keys.append((vocab[a + b], -len(a)))
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "merges are not ranked by (id(a+b), -len(a))"
    n = 0
    for piece, i in vocab.items():
        if piece in special:
            continue
        n += sum(1 for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab and piece[:k] not in special and piece[k:] not in special)
    assert n == len(m["merges"]), f"{n} splits of ordinary pieces vs {len(m['merges'])} merges"
    print(f"gemma3-gguf: {len(vocab)} pieces, {len(m['merges'])} merges ranked by (id(a+b), -len(a))")
    return tok


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1]
    d = os.path.join(out, "gemma")
    os.makedirs(d, exist_ok=True)
    tok = make_small()
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok.to_str())
    write_json(os.path.join(d, "tokenizer_config.json"),
               {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                "add_bos_token": True, "add_eos_token": False}, indent=1)
    rec = record(Tokenizer.from_file(os.path.join(d, "tokenizer.json")))
    write_json(os.path.join(d, "ids.json"), rec)
    fallback = sum(1 for ids in rec["ids"] for i in ids if 5 <= i < 261)
    print(f"gemma: {tok.get_vocab_size()} pieces, {fallback} byte-fallback ids over the corpus")
    if len(sys.argv) == 3:
        if os.path.exists(sys.argv[2]):
            g = record(from_gguf(sys.argv[2]))
            g["rule"] = "BPE merges ranked by (id(a+b), -len(a)) over ordinary pieces; transformers' GGUF conversion"
            write_json(os.path.join(out, "gemma3-gguf-ids.json"), g)
        else:
            print(f"gen_gemma_tokenizer_fixture.py: {sys.argv[2]} not found; skipping gemma3-gguf-ids.json",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
