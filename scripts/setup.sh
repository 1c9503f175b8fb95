#!/usr/bin/env bash
# Create .venv (once) and install Understudy into it. torch is installed first and pinned: an unpinned torch
# would pull a multi-GB CUDA build; 2.13.0 is the CPU wheel this machine kind serves locally.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${UNDERSTUDY_TORCH:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION}"
fi
pip install --quiet --disable-pip-version-check -e ".[test]"
