#!/usr/bin/env bash
# The main job on the embedded test model, from a fresh clone: set up .venv (pinned), locate the
# memorization subspace on the model's locate prompts and bake it, verify the result weight by
# weight, bake a second edit whose k is calibrated against the embedding attack, then evaluate
# both on the held-out memorized prompts and ordinary prompts, each also under the attack, with
# the original, a random mask of each edit's size and NeMo as controls.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
export HF_HUB_OFFLINE=1
out=${1:-runs/demo}
memedit=.venv/bin/memedit
$memedit locate-and-bake --out "$out/sanitized" --overwrite
$memedit inspect "$out/sanitized"
# k chosen on a validation part of the locate prompts so that the attack (Adam lr 0.01, 50
# steps on the text conditioning) gets back at most 10% copies, accepting up to 0.06 of scene
# utility: the trade-off the README's table shows.
$memedit locate-and-bake --target-rate 0.1 --under-attack --utility-budget 0.06 \
  --calibration-ks 0.05,0.1,0.15,0.2 --out "$out/hardened" --overwrite
$memedit evaluate --model "$out/sanitized" --also "$out/hardened" --attack-steps 50 \
  --out "$out/evaluation" --overwrite
echo "sanitized: $out/sanitized   hardened: $out/hardened   evaluation: $out/evaluation" \
  "(report.json, table.txt, grid.png)"
