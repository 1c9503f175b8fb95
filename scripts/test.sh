#!/usr/bin/env bash
# Set up .venv and run the test suite on the CPU (GPU tests skip without CUDA). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
