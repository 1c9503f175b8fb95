#!/usr/bin/env bash
# Packaging check: install Understudy non-editable (`pip install .`) into a fresh venv and run every command from
# that install, outside the source tree, on the demo model: what a user who pip-installs the project gets.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
pip install --quiet --disable-pip-version-check "torch==${UNDERSTUDY_TORCH:-2.13.0}"
pip install --quiet --disable-pip-version-check "$ROOT"
cd "$WORK"                                   # nothing from the source tree is importable from here
python - <<'PY'
import importlib, pathlib, sys
for m in ("artifacts", "compiler", "profiler", "runtime", "evaluation"):
    f = pathlib.Path(importlib.import_module(m).__file__)
    assert "site-packages" in str(f), f"{m} imported from {f}, not from the install"
PY
for c in moe-profile moe-compile moe-run moe-eval; do "$c" --version; done
M="$ROOT/demo/model"
moe-profile "$M" --calib "$ROOT/demo/data/calib.jsonl" -o prof --samples 4 --seq-len 64 --sensitivity-tokens 256 --quiet
moe-compile prof --budget 25% -o plan --search-tokens 64 --quiet
moe-compile prof --budget 2GiB --target rtx3080ti-laptop -o plan-abs --search-tokens 64 --no-report --quiet
moe-run "$M" --plan plan --prompt "The function returns" --max-new-tokens 8 --stats-json run.json
moe-eval "$M" --data "$ROOT/demo/data/dev.jsonl" --plan plan --policies resident,lru,plan --max-tokens 128 \
  --quiet --json eval.json
python -c "import json; r = json.load(open('eval.json')); assert set(r['policies']) == {'resident', 'lru', 'plan'}"
set +e
moe-compile prof --budget 25 -o bad 2> err.txt; code=$?
set -e
[ "$code" = 2 ] && grep -q "did you mean 25%" err.txt && [ ! -e bad ]
echo "smoke: installed package OK"
