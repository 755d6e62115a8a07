#!/usr/bin/env bash
# The command line end to end on the embedded test model (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
memedit=.venv/bin/memedit
runs=runs/example-cli
mkdir -p "$runs"
testbed=$(.venv/bin/python -c "import memedit.testbed as t; print(t.prompt_file('memorized_locate').parent)")

# 1. Locate on two halves of the locate prompts separately, and compare: a shared subspace
#    shows as a high IoU (the paper's evidence).
head -n 5 "$testbed/memorized_locate.jsonl" > "$runs/first.jsonl"
tail -n +6 "$testbed/memorized_locate.jsonl" > "$runs/second.jsonl"
$memedit locate --memorized "$runs/first.jsonl" --out "$runs/sub-first" --overwrite \
  --save-stats "$runs/stats-first"
$memedit locate --memorized "$runs/second.jsonl" --out "$runs/sub-second" --overwrite \
  --save-stats "$runs/stats-second"
$memedit compare "$runs/sub-first" "$runs/sub-second"

# 2. Statistics are sums: merging both runs equals one run over all prompts.
$memedit merge-stats "$runs/stats-first/memorized.stats.safetensors" \
  "$runs/stats-second/memorized.stats.safetensors" --out "$runs/merged.stats.safetensors" \
  --overwrite
$memedit locate --memorized-stats "$runs/merged.stats.safetensors" \
  --reference-stats "$runs/stats-first/reference.stats.safetensors" \
  --out "$runs/sub-merged" --overwrite

# 3. Bake the merged subspace, then verify the result weight by weight.
$memedit bake --subspace "$runs/sub-merged" --out "$runs/sanitized" --overwrite
$memedit inspect "$runs/sanitized"

# 4. Export to ONNX (parity and sanitization audit run by default) and generate with ORT.
$memedit export --onnx "$runs/sanitized" --out "$runs/onnx" --overwrite
$memedit generate --onnx "$runs/onnx" "a red circle on the left" --out "$runs/generated" \
  --overwrite

# 5. Attack the sanitized model: optimize each held-out prompt's text embedding towards its
#    training image and see whether the copies come back (a control aims at never-trained
#    images and must stay at zero).
$memedit attack --model "$runs/sanitized" --lr 0.01 --attack-steps 10 --prompt-batch 10 \
  --seeds 2 --out "$runs/attack" --overwrite
