#!/usr/bin/env bash
# Set up (if needed) and run one full iteration with the default config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m ospo.run --stage all "$@"
