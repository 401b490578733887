#!/usr/bin/env bash
# Set up (if needed) and run the test suite: the README's test command, and CI's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c "import torch;print('cuda' if torch.cuda.is_available() else 'cpu')")}
python -m pytest "$@"
