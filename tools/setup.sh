#!/usr/bin/env bash
# Create .venv with the project's pinned toolchain (idempotent: reinstalls only when
# pyproject.toml changed). torch goes first and pinned: otherwise a dependency's unpinned
# torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.memedit-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (pinned toolchain; about two minutes the first time)" >&2
python3 -m venv .venv
log=.venv/setup.log
# pip's build warnings are noise on success: keep them in a log, show it on failure.
if ! { .venv/bin/python -m pip install --quiet --upgrade pip &&
       .venv/bin/python -m pip install --quiet "torch==2.13.0" &&
       .venv/bin/python -m pip install --quiet -e ".[dev]" &&
       .venv/bin/python -m pip check; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "setting up .venv failed (log: $log)" >&2
  exit 1
fi
echo "$want" > "$stamp"
