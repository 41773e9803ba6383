#!/usr/bin/env python3
"""Generate loupe's byte-level BPE tokenizer fixtures with Hugging Face `tokenizers`.

Usage: python3 tests/gen/gen_tokenizer_fixture.py OUTDIR [SMOLLM2.gguf]
       (normally OUTDIR = tests/fixtures/tokenizer, SMOLLM2.gguf = models/SmolLM2-135M-Instruct.Q4_1.gguf)

Writes:
  OUTDIR/corpus.json            {"strings": [...]}: the tricky strings every tokenizer is checked on
  OUTDIR/<name>/tokenizer.json  a small byte-level BPE trained here, one per pre-tokenizer family:
                                gpt2, llama3, qwen2, smollm2, flags (added-token flags, NFC, templates)
  OUTDIR/<name>/tokenizer_config.json  bos/eos names (as the real models' configs give them)
  OUTDIR/<name>/ids.json        {"ids": [[...] per string], "decoded": [...], "joined_ids": [...],
                                "nul_text_ids": [...]} (NUL_TEXT below: NULs, which the corpus avoids)
  OUTDIR/smollm2-gguf-ids.json  the same for the real SmolLM2 vocabulary read from the GGUF (the
                                tokenizer itself is not written: the C test builds it from the GGUF)

"joined" is every corpus string joined by "\n": one long text (about the size of a page of prose).
ids are `Tokenizer.encode(s).ids` (add_special_tokens=True); decoded is
`Tokenizer.decode(ids, skip_special_tokens=False)`.

Pinned versions: tokenizers 0.20.3, gguf 0.10.0 (tests/gen/requirements.txt). Training is
deterministic for a given input; the committed tokenizer.json files are what the C tests read.
"""

import json
import os
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

SMOLLM2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
                    "<jupyter_script>", "<empty_output>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Words added to the llama3 fixture's vocabulary without merges that build them: with
# ignore_merges a pre-token equal to one of them is emitted whole, without it never.
UNREACHABLE = ["ĠUnreachable", "Ġzyzzyva", "Quixotically", "ĠWORLD"]
UNREACHABLE_TEXT = "Quixotically World Unreachable zyzzyva WORLD Hello"

CORPUS = [
    "",
    " ",
    "x",
    "Hello world",
    "Hello, world! How are you?",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces",
    "trailing spaces   ",
    "   ",
    "                                        x",
    "tabs\tand\t\ttabs",
    "line1\nline2\n\nline4\n",
    "windows\r\nline endings\r\n\r\n",
    "a\r\rb\r",
    "\n\n\n",
    " \n \n ",
    "mixed \t \n whitespace  \n\t end",
    "trailing newline\n",
    "\t\tindented\n\t\t\tmore\n",
    "She's here, they'll go, we've done it, I'm sure, you'd know, it's fine.",
    "SHE'S WE'VE THEY'LL I'M YOU'D DON'T",
    "It'S and It'Ve mixed case, O'Neil's",
    "don't won't can't isn't n't",
    "don't\n's\n'll\n'",
    "long s: it'\u017f, kelvin: \u212a",
    "''''\"\"\"``",
    "I'm going to the store, it'll be 5 o'clock.",
    "1234567890",
    "The year 2024 had 366 days; pi = 3.14159265358979",
    "$1,000.50 and 12,345,678.90 and -0.001e-10",
    "Dates: 2024-01-15, 15/01/2024, 01.15.24, 12:30:45",
    "Phone: +1 (555) 123-4567",
    "Mixed123Letters456And789Digits",
    "\u00bd \u00be \u00b2 \u00b3 \u2074 \u216b \u2177 \u2460",
    "\u0661\u0662\u0663 \u0664\u0665\u0666 \u06f7\u06f8\u06f9 \u0967\u0968\u0969",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade",
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301",
    "\u00c5 vs A\u030a vs \u212b",
    "a\u0300\u0301\u0302\u0303 o\u0308\u0304",
    "\u1100\u1161\u11a8 \uac01",
    "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 \uff54\uff45\uff58\uff54",
    "\ufb01 ligature \ufb02",
    "\u00df \u1e9e \u01c5 \ufb00",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3067\u3059\u3002\u6771\u4eac\u306f\u5927\u304d\u3044\u90fd\u5e02\u3002",
    "\u4e2d\u6587\u6d4b\u8bd5\uff1a\u4f60\u597d\uff0c\u4e16\u754c\uff01",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u03ba\u03b5\u03af\u03bc\u03b5\u03bd\u03bf",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0421\u044a\u0435\u0448\u044c \u0436\u0435 "
    "\u0435\u0449\u0451 \u044d\u0442\u0438\u0445 \u043c\u044f\u0433\u043a\u0438\u0445 \u0431\u0443\u043b\u043e\u043a.",
    "\u05e2\u05d1\u05e8\u05d9\u05ea \u0e44\u0e17\u0e22 \u0e20\u0e32\u0e29\u0e32",
    "emoji \U0001f600\U0001f603\U0001f604 and \U0001f44d\U0001f3fd",
    "family \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 zwj",
    "flags \U0001f1fa\U0001f1f8\U0001f1ec\U0001f1e7\U0001f1ef\U0001f1f5",
    "\u2764\ufe0f \u2728 \u2615 keycap 1\ufe0f\u20e3",
    "Zalgo: Z\u0324\u0354\u0367\u0311\u0313a\u0308\u0356\u032d\u0308\u0307l\u036e\u0312\u036b"
    "g\u030c\u0317\u035a\u031ao\u0319\u0314\u036e\u0307\u0350\u0307",
    "4-byte: \U0001d573\U0001d58a\U0001d591\U0001d591\U0001d594 \U00010348 \U0001d11e",
    "private use \ue000\uf8ff and noncharacters \ufdd0 \uffff \U0010ffff",
    "\u03a9\u2248\u00e7\u221a\u222b\u02dc\u00b5\u2264\u2265\u00f7",
    "NBSP\u00a0here and\u2009thin\u3000ideographic\u00a0\u00a0",
    "mongolian\u180evowel separator, x  \u180ey \u180e\u180e z\u180e\n\u180e",
    "line\u2028separator\u2029paragraph\u0085nel",
    "zero\u200bwidth\u200dspace\ufeffbom",
    "control \x01\x02\x1f\x7f chars \x0b\x0c",
    "bytes SmolLM2 lacks: \x04\x06\x13 \U00050000 \U0008abcd\x1d.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "int main(void) {\n\tfor (int i = 0; i < 10; i++) {\n\t\tprintf(\"%d\\n\", i);\n\t}\n\treturn 0;\n}\n",
    "a += b; c -= d; e *= f; g /= h; x == y != z <= w >= v && u || !t",
    "ptr->field; arr[i][j]; {key: value}; (a, b); <html><body></body></html>",
    "https://example.com/path?query=1&other=two#frag email@example.com",
    "!!!???...,,,;;; ---___***",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    " <|endoftext|> spaced special ",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_start <|im_end| |endoftext|> <|",
    "<repo_name>loupe<file_sep>main.c<filename>x.py",
    "e\u0301<|im_end|>\u0301",
    UNREACHABLE_TEXT,
    "a <mask> b x<mask>y <mask>, <mask>",
    "[[sep]]   tail [[sep]]\t\tx",
    "hello hellos ahello hello_ hello. hello",
    "caf\u00e9 cafe\u0301 caf\u00e9s",
    "This program is free software: you can redistribute it and/or modify it under the terms of "
    "the GNU General Public License as published by the Free Software Foundation.",
]


def training_text():
    texts = []
    for path in ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
                 "/usr/share/common-licenses/GFDL-1.3"]:
        with open(path, encoding="utf-8") as f:
            texts.extend(line for line in f.read().split("\n\n") if line)
    return texts + [s for s in CORPUS if s != UNREACHABLE_TEXT] * 3


def train(tok, specials, vocab_size=3000):
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_text(), trainer=trainer)
    return tok


def edit_json(tok, fn):
    d = json.loads(tok.to_str())
    fn(d)
    return Tokenizer.from_str(json.dumps(d))


def make_gpt2():
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok = train(tok, [])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # GPT-2's <|endoftext|> is special but normalized: it sits in the normalized trie.
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=True)])
    return tok, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False}


def make_llama3():
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok = train(tok, [])

    def add_unreachable(d):
        d["model"]["ignore_merges"] = True
        n = len(d["model"]["vocab"])
        for w in UNREACHABLE:
            if w not in d["model"]["vocab"]:
                d["model"]["vocab"][w] = n
                n += 1
    tok = edit_json(tok, add_unreachable)
    # Specials after the model vocabulary, as in Llama 3 (ids 128000+ there).
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA3_SPECIALS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    return tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


def make_qwen2():
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok = train(tok, [])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN2_SPECIALS])
    return tok, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def smollm2_pre():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def make_smollm2():
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = smollm2_pre()
    tok.decoder = decoders.ByteLevel()
    # Specials first (ids 0..16), as in SmolLM2.
    tok = train(tok, SMOLLM2_SPECIALS)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}


def make_flags(gpt2):
    """The GPT-2 model with every added-token flag, an NFC Sequence normalizer, contiguous
    Digits before a prefix-space ByteLevel, and an EOS-appending template."""
    tok = Tokenizer.from_str(gpt2.to_str())
    tok.normalizer = normalizers.Sequence([normalizers.NFC()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)])
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, single_word=True, normalized=False)])
    tok.add_tokens([AddedToken("[[sep]]", special=False, rstrip=True, normalized=False),
                    AddedToken("caf\u00e9", special=False, normalized=True),
                    AddedToken("hello", special=False, single_word=True, normalized=False)])
    eos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A $B:1 <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", eos)])
    return tok, {"eos_token": "<|endoftext|>"}


# Text with NULs, which JSON strings in C cannot carry: the C test spells it out.
NUL_TEXT = "a\x00b\x00\x00 c <|endoftext|>\x00"


def record(tok):
    ids = [tok.encode(s).ids for s in CORPUS]
    decoded = [tok.decode(x, skip_special_tokens=False) for x in ids]
    joined = tok.encode("\n".join(CORPUS)).ids
    return {"ids": ids, "decoded": decoded, "joined_ids": joined, "nul_text_ids": tok.encode(NUL_TEXT).ids}


def write_json(path, obj, indent=None):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent, separators=(",", ":") if indent is None else None)
        f.write("\n")


def from_gguf(path):
    """A `tokenizers` BPE from the GGUF's vocabulary and merges with SmolLM2's real pre-tokenizer."""
    from gguf import GGUFReader

    r = GGUFReader(path)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def ints(key):
        f = r.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    assert strings("tokenizer.ggml.model") == ["gpt2"]
    assert strings("tokenizer.ggml.pre") == ["smollm"]
    tokens = strings("tokenizer.ggml.tokens")
    types = ints("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in strings("tokenizer.ggml.merges")]
    assert all(len(m) == 2 for m in merges)
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in the GGUF vocabulary"
    # SmolLM2 lacks 21 of the 256 byte-level characters (bytes never seen in training: C0, C1,
    # F1, F2, F5..FF and six control characters). Like the real tokenizer.json (unk_token null),
    # this model has no unk token, so `tokenizers` drops such bytes; the corpus checks that.
    missing = sorted(c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab)
    print(f"smollm2-gguf: {len(missing)} byte-level characters missing from the vocabulary")
    tok = Tokenizer(BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = smollm2_pre()
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4]
    assert [tok.token_to_id(t.content) for t in control] == list(range(17)), "expected the 17 control tokens 0..16"
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    add_bos = "tokenizer.ggml.add_bos_token" in r.fields and ints("tokenizer.ggml.add_bos_token") == [1]
    if add_bos:
        bos = ints("tokenizer.ggml.bos_token_id")[0]
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                           special_tokens=[(tokens[bos], bos)])
    return tok


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "corpus.json"), {"strings": CORPUS}, indent=1)

    gpt2, gpt2_cfg = make_gpt2()
    builds = {"gpt2": (gpt2, gpt2_cfg), "llama3": make_llama3(), "qwen2": make_qwen2(),
              "smollm2": make_smollm2(), "flags": make_flags(gpt2)}
    for name, (tok, cfg) in builds.items():
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        text = tok.to_str()
        if name == "gpt2":  # the older "a b" merges format (tokenizers < 0.20 wrote it; GPT-2's file has it)
            j = json.loads(text)
            j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
            text = json.dumps(j, ensure_ascii=False)
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(text)
        write_json(os.path.join(d, "tokenizer_config.json"), cfg, indent=2)
        write_json(os.path.join(d, "ids.json"), record(tok))
        # The file as written must give what the object gave.
        again = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        assert record(again) == record(tok), name
        print(f"{name}: vocab {tok.get_vocab_size()}, {sum(len(x) for x in record(tok)['ids'])} ids")

    if len(sys.argv) == 3:
        tok = from_gguf(sys.argv[2])
        write_json(os.path.join(out, "smollm2-gguf-ids.json"), record(tok))
        print(f"smollm2-gguf: vocab {tok.get_vocab_size()}, {len(record(tok)['joined_ids'])} ids joined")


if __name__ == "__main__":
    main()
