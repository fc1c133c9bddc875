#!/usr/bin/env bash
# Set up and run the whole test suite: the fast default suite, then the slow real-model checks (`-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q
.venv/bin/python -m pytest -q -m slow
