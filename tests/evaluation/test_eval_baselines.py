"""moe-eval with the lossless baselines: lfu, lfru and static (with --profile) over the same tokens as lru, all
agreeing with resident; the oracle and bad combinations are one-line errors."""
import json

import pytest

from evaluation.cli import main
from helpers import DATA


def _run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def test_eval_baselines(fixture_model, small_profile, tmp_path, capsys):
    out = tmp_path / "o.json"
    code, table, _ = _run(capsys, fixture_model, "--data", DATA / "dev.jsonl", "--policies", "lru,lfu,lfru,static",
                          "--cache", "50%", "--profile", small_profile, "--max-tokens", 48, "--window", 24,
                          "--tasks", "none", "--json", out, "--quiet")
    assert code == 0
    r = json.loads(out.read_text())
    assert list(r["policies"]) == ["lru", "lfu", "lfru", "static"] and r["profile"] == str(small_profile)
    ppl = r["policies"]["lru"]["perplexity"]
    for name, d in r["policies"].items():
        assert d["top1_agreement"] == 1.0 and d["greedy_agreement"] == 1.0        # lossless: resident's outputs
        assert d["perplexity"] == pytest.approx(ppl, rel=1e-5) and d["substitution_rate"] == d["drop_rate"] == 0
        assert d["cache_capacity_bytes"] == r["policies"]["lru"]["cache_capacity_bytes"]   # one budget for all
        assert any(line.startswith(name + " ") for line in table.splitlines())
    assert len({d["loads_per_token"] for d in r["policies"].values()}) > 1        # the rules differ


@pytest.mark.parametrize("argv,message", [
    (["--policies", "lru,static"], "--profile PROFILE_DIR"),
    (["--policies", "lru,lfu", "--profile", "PROFILE"], "--profile is read by policy static only"),
    (["--policies", "lru,oracle"], "only the simulator runs it"),
    (["--plan", "static=/some/plan"], "must be new"),
])
def test_bad_combinations(fixture_model, small_profile, tmp_path, capsys, argv, message):
    argv = [str(small_profile) if a == "PROFILE" else a for a in argv]
    code, _, err = _run(capsys, fixture_model, "--data", DATA / "dev.jsonl", "--json", tmp_path / "o.json", *argv)
    assert code == 2 and len(err) == 1 and message in err[0], err
