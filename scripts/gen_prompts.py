#!/usr/bin/env python3
"""Write loupe's clean/corrupted prompt pairs for attribution and activation patching.

Usage: python3 scripts/gen_prompts.py MODEL_GGUF [OUTDIR]
       (normally: models/SmolLM2-135M-Instruct.Q4_1.gguf configs/prompts)

Writes OUTDIR/ioi.jsonl (indirect object identification, 100 pairs) and OUTDIR/factual.jsonl
(factual recall, 40 pairs), one JSON object a line:

    {"clean": "...", "corrupted": "...", "answer": " Mary", "wrong_answer": " John"}

The metric these are made for is logit(answer) - logit(wrong_answer) at the last position: high on
the clean prompt, low on the corrupted one.

- ioi: "When Mary and John went to the store, John gave a drink to" -> " Mary" (wrong " John").
  The corrupted prompt flips the answer in one of two ways, alternating: the second mention of the
  subject becomes the indirect object ("..., Mary gave a drink to", answer " John"), or the first
  two names trade places ("When John and Mary went ..., Mary gave a drink to", answer " John").
  Twelve sentence templates, 40 first names, 16 places and 16 objects, all written here.
- factual: "The Eiffel Tower is located in the city of" -> " Paris"; the corrupted prompt uses
  another subject of the same template with another answer ("The Colosseum is located in the city
  of" -> " Rome", so wrong_answer " Rome"). Four relation templates (landmark -> city, country ->
  capital, country -> language, country -> currency) over facts written here.

Every pair is checked with SmolLM2's tokenizer read from the GGUF (transformers
AutoTokenizer.from_pretrained(dir, gguf_file=...), add_special_tokens=False), and cross-checked
with a `tokenizers` BPE built from the GGUF with SmolLM2's own pre-tokenizer
(tests/gen/gen_tokenizer_fixture.py from_gguf, the tokenizer loupe is tested against): answer and
wrong_answer must be single tokens, clean and corrupted must have the same number of tokens, both
tokenizers must agree and decode must give the text back. Pairs that fail are dropped (and
counted). No digits appear anywhere (transformers' GGUF tokenizer does not split digits the way
SmolLM2 does). Output is deterministic (seeded).
"""

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "gen"))

SEED = 20250
N_IOI = 100
N_FACTUAL = 40

# ---------------------------------------------------------------------------------------------
# IOI: {A} is the indirect object (the answer), {B} the subject, named twice.

IOI_TEMPLATES = [
    "When {A} and {B} went to the {place}, {B} gave a {obj} to",
    "After {A} and {B} arrived at the {place}, {B} handed a {obj} to",
    "While {A} and {B} were waiting at the {place}, {B} passed the {obj} to",
    "{A} and {B} spent the whole afternoon at the {place}. Later, {B} offered a {obj} to",
    "Then {A} and {B} had a long day at the {place}, and {B} decided to give the {obj} to",
    "At the {place}, {A} ran into {B}. Afterwards {B} gave a {obj} to",
    "Once {A} and {B} reached the {place}, {B} showed the {obj} to",
    "Because {A} and {B} were hungry at the {place}, {B} brought a {obj} to",
    "Yesterday {A} and {B} walked over to the {place}, and {B} lent a {obj} to",
    "{A} and {B} found a {obj} near the {place}, so {B} returned it to",
    "On the way to the {place}, {A} and {B} talked for hours, and then {B} threw a {obj} to",
    "The friends {A} and {B} met at the {place}, where {B} sold a {obj} to",
]
NAMES = [
    "Mary", "John", "Alice", "Bob", "Tom", "James", "Sarah", "David", "Emma", "Paul", "Kate", "Mark",
    "Anna", "Peter", "Lucy", "Jack", "Laura", "Michael", "Lisa", "Daniel", "Rachel", "Steve", "Susan",
    "Henry", "Grace", "Adam", "Helen", "Chris", "Emily", "Kevin", "Jane", "Frank", "Rose", "George",
    "Julia", "Sam", "Linda", "Ben", "Claire", "Eric",
]
PLACES = [
    "store", "park", "school", "beach", "library", "market", "station", "museum", "garden", "office",
    "restaurant", "hospital", "cinema", "zoo", "bakery", "harbor",
]
OBJECTS = [
    "drink", "book", "ball", "letter", "cake", "ring", "pen", "gift", "key", "bag", "cup", "hat",
    "map", "coin", "kite", "basket",
]

# ---------------------------------------------------------------------------------------------
# factual recall: (template, [(subject, answer), ...]); answers carry no leading space here.

FACTS = [
    ("{S} is located in the city of", [
        ("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("Big Ben", "London"),
        ("The Brandenburg Gate", "Berlin"), ("The Sagrada Familia", "Barcelona"), ("The Acropolis", "Athens"),
        ("The Kremlin", "Moscow"), ("The Forbidden City", "Beijing"), ("The Sydney Opera House", "Sydney"),
        ("The Leaning Tower", "Pisa"), ("The Space Needle", "Seattle"), ("The Hagia Sophia", "Istanbul"),
        ("The Burj Khalifa", "Dubai"), ("The Prado Museum", "Madrid"), ("The Rijksmuseum", "Amsterdam"),
        ("The Charles Bridge", "Prague"), ("The CN Tower", "Toronto"), ("The Gateway of India", "Mumbai"),
        ("The Alhambra", "Granada"), ("Buckingham Palace", "London"), ("The Willis Tower", "Chicago"),
        ("The Atomium", "Brussels"), ("The Hofburg Palace", "Vienna"), ("The Belem Tower", "Lisbon"),
        ("The Golden Pavilion", "Kyoto"), ("The Blue Mosque", "Istanbul"), ("The Louvre", "Paris"),
    ]),
    ("The capital of {S} is the city of", [
        ("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
        ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"),
        ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
        ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
        ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Thailand", "Bangkok"), ("Cuba", "Havana"),
        ("Turkey", "Ankara"), ("China", "Beijing"), ("Chile", "Santiago"), ("Belgium", "Brussels"),
        ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Syria", "Damascus"), ("Lebanon", "Beirut"),
        ("Australia", "Canberra"), ("Indonesia", "Jakarta"), ("South Korea", "Seoul"), ("Vietnam", "Hanoi"),
    ]),
    ("In {S}, most people speak the language called", [
        ("France", "French"), ("Germany", "German"), ("Spain", "Spanish"), ("Italy", "Italian"),
        ("Japan", "Japanese"), ("Portugal", "Portuguese"), ("Russia", "Russian"), ("the Netherlands", "Dutch"),
        ("Greece", "Greek"), ("Turkey", "Turkish"), ("Poland", "Polish"), ("Sweden", "Swedish"),
        ("Finland", "Finnish"), ("Hungary", "Hungarian"), ("Norway", "Norwegian"), ("Denmark", "Danish"),
        ("Israel", "Hebrew"), ("Thailand", "Thai"), ("Vietnam", "Vietnamese"), ("South Korea", "Korean"),
        ("Egypt", "Arabic"), ("Iran", "Persian"), ("China", "Chinese"), ("Brazil", "Portuguese"),
    ]),
    ("The money used in {S} is called the", [
        ("Japan", "yen"), ("the United Kingdom", "pound"), ("India", "rupee"), ("Mexico", "peso"),
        ("Switzerland", "franc"), ("Germany", "euro"), ("Russia", "ruble"), ("China", "yuan"),
        ("South Korea", "won"), ("Sweden", "krona"), ("Thailand", "baht"), ("Turkey", "lira"),
        ("the United States", "dollar"), ("Brazil", "real"), ("Italy", "euro"), ("Canada", "dollar"),
    ]),
]


# ---------------------------------------------------------------------------------------------

class Checker:
    """SmolLM2 tokenization by transformers' GGUF tokenizer, cross-checked with the tokenizers BPE."""

    def __init__(self, gguf_path):
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        import gen_tokenizer_fixture as gt

        hf_logging.set_verbosity_error()
        d, f = os.path.split(os.path.abspath(gguf_path))
        self.hf = AutoTokenizer.from_pretrained(d, gguf_file=f)
        self.bpe = gt.from_gguf(gguf_path)
        self.why = {}

    def ids(self, s):
        a = self.hf(s, add_special_tokens=False).input_ids
        b = self.bpe.encode(s, add_special_tokens=False).ids
        if a != b:
            return None, "tokenizers disagree"
        if self.hf.decode(a) != s:
            return None, "decode differs"
        return a, None

    def ok(self, clean, corrupted, answer, wrong):
        """None when the pair passes, else the reason it fails."""
        for s in (clean, corrupted, answer, wrong):
            if any(c.isdigit() for c in s):
                return "digit"
        if answer == wrong:
            return "answer == wrong"
        ids = {}
        for s in (clean, corrupted, answer, wrong):
            ids[s], why = self.ids(s)
            if why:
                return why
        if len(ids[answer]) != 1 or len(ids[wrong]) != 1:
            return "answer or wrong answer not a single token"
        if len(ids[clean]) != len(ids[corrupted]):
            return "clean and corrupted lengths differ"
        # the answer token after the prompt is the token the answer encodes to on its own
        if self.ids(clean + answer)[0] != ids[clean] + ids[answer]:
            return "answer merges with the prompt"
        if self.ids(corrupted + wrong)[0] != ids[corrupted] + ids[wrong]:
            return "wrong answer merges with the prompt"
        return None

    def keep(self, pair):
        why = self.ok(pair["clean"], pair["corrupted"], pair["answer"], pair["wrong_answer"])
        if why:
            self.why[why] = self.why.get(why, 0) + 1
            return False
        return True


def ioi_pairs(chk, rng):
    out, seen, tries = [], set(), 0
    while len(out) < N_IOI:
        tries += 1
        assert tries < 100 * N_IOI, "too many IOI candidates rejected"
        tpl = IOI_TEMPLATES[len(out) % len(IOI_TEMPLATES)]
        a, b = rng.sample(NAMES, 2)
        kw = dict(place=rng.choice(PLACES), obj=rng.choice(OBJECTS))
        clean = tpl.format(A=a, B=b, **kw)
        if len(out) % 2 == 0:
            i = tpl.rindex("{B}")  # the second mention of the subject becomes the indirect object
            corrupted = (tpl[:i] + "{A}" + tpl[i + 3:]).format(A=a, B=b, **kw)
        else:
            corrupted = tpl.format(A=b, B=a, **kw)  # the two names trade places
        pair = {"clean": clean, "corrupted": corrupted, "answer": " " + a, "wrong_answer": " " + b}
        if clean in seen or not chk.keep(pair):
            continue
        seen.add(clean)
        out.append(pair)
    return out


def factual_pairs(chk, rng):
    per_template = []
    for tpl, facts in FACTS:
        pairs = []
        order = list(range(len(facts)))
        rng.shuffle(order)
        for i in order:
            s, ans = facts[i]
            cands = [j for j in range(len(facts)) if facts[j][1] != ans]
            rng.shuffle(cands)
            for j in cands:
                pair = {"clean": tpl.format(S=s), "corrupted": tpl.format(S=facts[j][0]),
                        "answer": " " + ans, "wrong_answer": " " + facts[j][1]}
                if chk.keep(pair):
                    pairs.append(pair)
                    break
        per_template.append(pairs)
    out = []
    while len(out) < N_FACTUAL and any(per_template):
        for pairs in per_template:  # round robin over the templates
            if pairs and len(out) < N_FACTUAL:
                out.append(pairs.pop(0))
    assert len(out) == N_FACTUAL, f"only {len(out)} factual pairs"
    return out


def write_jsonl(path, pairs):
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps({k: p[k] for k in ("clean", "corrupted", "answer", "wrong_answer")}) + "\n")


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    outdir = sys.argv[2] if len(sys.argv) == 3 else os.path.join(ROOT, "configs", "prompts")
    os.makedirs(outdir, exist_ok=True)
    chk = Checker(sys.argv[1])
    rng = random.Random(SEED)
    ioi = ioi_pairs(chk, rng)
    why_ioi, chk.why = chk.why, {}
    fact = factual_pairs(chk, rng)
    write_jsonl(os.path.join(outdir, "ioi.jsonl"), ioi)
    write_jsonl(os.path.join(outdir, "factual.jsonl"), fact)
    print(f"ioi.jsonl: {len(ioi)} pairs (dropped: {why_ioi or 'none'})")
    print(f"factual.jsonl: {len(fact)} pairs (dropped candidates: {chk.why or 'none'})")


if __name__ == "__main__":
    main()
