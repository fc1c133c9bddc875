#!/usr/bin/env bash
# Set up, lint and run the whole test suite: ruff ([tool.ruff] in pyproject.toml), the fast default suite, then the
# slow real-model checks (`-m slow`). A lint finding fails the run before any test starts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/python -m pytest -q
.venv/bin/python -m pytest -q -m slow
