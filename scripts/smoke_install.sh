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
for c in moe-profile moe-compile moe-run moe-eval moe-serve; do "$c" --version; done
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
# the optional extras: without them, one line saying which extra to install
set +e
moe-serve "$M" --plan plan 2> err.txt; code=$?
set -e
[ "$code" = 2 ] && grep -q "understudy\[serve\]" err.txt && [ "$(wc -l < err.txt)" = 1 ]
# with the serve extra: the installed moe-serve answers an OpenAI-style request on 127.0.0.1
pip install --quiet --disable-pip-version-check "$ROOT[serve]"
PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
moe-serve "$M" --plan plan --port "$PORT" 2> serve.txt &
SERVER=$!
python - "$PORT" <<'PY'
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(300):
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
        break
    except OSError:
        time.sleep(0.2)
body = json.dumps({"model": "model", "prompt": "The function returns", "max_tokens": 8}).encode()
req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=60))
assert r["usage"]["completion_tokens"] >= 1, r
assert b"understudy_cache_peak_bytes" in urllib.request.urlopen(url + "/metrics", timeout=10).read()
PY
kill "$SERVER"; wait "$SERVER" || true
echo "smoke: installed package OK"
