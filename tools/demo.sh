#!/usr/bin/env bash
# The main job on the embedded test model, from a fresh clone: set up .venv (pinned), locate the
# memorization subspace on the model's locate prompts and bake it, verify the result weight by
# weight, then evaluate it on the held-out memorized prompts and ordinary prompts (with the
# original, a random mask of the same size and NeMo as controls).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
export HF_HUB_OFFLINE=1
out=${1:-runs/demo}
memedit=.venv/bin/memedit
$memedit locate-and-bake --out "$out/sanitized" --overwrite
$memedit inspect "$out/sanitized"
$memedit evaluate --model "$out/sanitized" --out "$out/evaluation" --overwrite
echo "sanitized model: $out/sanitized   evaluation: $out/evaluation (report.json, grid.png)"
