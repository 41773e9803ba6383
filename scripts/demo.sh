#!/usr/bin/env bash
# demo.sh: what `make demo` runs. Loads a GPT-2 checkpoint, lists its hook points,
# reports the mean next-token loss on a token file, and caches the residual stream of
# every layer into an activation store that numpy/torch/safetensors read directly.
# The model is the small GPT-2 of tests/fixtures (random weights, saved by Hugging Face
# transformers); a real pretrained model joins the demo with the Llama/GGUF work.
set -euo pipefail
cd "$(dirname "$0")/.."
LOUPE=build/loupe
MODEL=${MODEL:-tests/fixtures/gpt2-tiny}
TOKENS=${TOKENS:-tests/fixtures/gpt2-tiny/tokens.npy}
OUT=${OUT:-build/demo-store}

echo "== loupe info $MODEL"
$LOUPE info "$MODEL" | head -n 3
echo "   ... ($($LOUPE info "$MODEL" --json | grep -o '"name"' | wc -l) hook points in all; loupe info MODEL lists them)"
echo
echo "== loupe run $MODEL --tokens $TOKENS"
$LOUPE run "$MODEL" --tokens "$TOKENS"
echo
echo "== loupe cache configs/cache_gpt2.ini (residual stream of every layer)"
rm -rf "$OUT"
$LOUPE cache configs/cache_gpt2.ini --model.path="$MODEL" --data.tokens="$TOKENS" --cache.out="$OUT"
echo
echo "== the store"
ls -l "$OUT"
head -c 400 "$OUT/meta.json"; echo " ..."
