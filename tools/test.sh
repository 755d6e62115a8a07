#!/usr/bin/env bash
# Run the linter and the whole test suite (fast and slow groups) offline, on one thread.
# Extra arguments go to pytest, e.g. `tools/test.sh -m "not slow"` for the quick group only.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
