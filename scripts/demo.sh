#!/usr/bin/env bash
# The main job on the embedded demo model: profile its experts on the bundled calibration text, compile a plan for a
# cache of 25% of routed-expert bytes, then decode with it over an emulated slow link and compare with lru.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out/demo}
moe-profile demo/model --calib demo/data/calib.jsonl -o "$OUT/profile" --samples 64 --seq-len 128
moe-compile "$OUT/profile" --budget 25% -o "$OUT/plan"
for policy in lru plan; do
  echo "--- $policy"
  if [ "$policy" = plan ]; then args=(--plan "$OUT/plan"); else args=(--policy lru --cache 25%); fi
  moe-run demo/model "${args[@]}" --link 50MB/s,20us --max-new-tokens 48 \
    --prompt "The function returns" --stats-json "$OUT/run-$policy.json"
done
