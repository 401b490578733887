#!/usr/bin/env bash
# Create .venv (if missing) and install ospo with its test dependencies.
# torch: a CPU machine gets torch 2.13.0 (pinned so pip does not pull a multi-GB CUDA
# build); on a GPU machine install your CUDA torch first, it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test,notebooks]"
