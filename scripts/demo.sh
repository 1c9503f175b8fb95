#!/usr/bin/env bash
# The main job on the embedded demo model: profile its experts on the bundled calibration text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out/demo}
moe-profile demo/model --calib demo/data/calib.jsonl -o "$OUT/profile" --samples 64 --seq-len 128
