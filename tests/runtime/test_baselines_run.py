"""moe-run and the runtime with the lossless baselines: lfu, lfru and static run; static pins the profile's most
frequent experts and never evicts them; the oracle and bad combinations are one-line errors."""
import json
import shutil

import pytest
import torch

from runtime import Runtime
from runtime.cli import main
from runtime.policy.static import static_pins


def _run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


@pytest.mark.parametrize("policy", ["lfu", "lfru"])
def test_run_lfu_and_lfru(policy, fixture_model, tmp_path, capsys):
    code, out, err = _run(capsys, fixture_model, "--policy", policy, "--cache", "25%", "--prompt", "The function",
                          "--max-new-tokens", 6, "--stats-json", tmp_path / "s.json")
    assert code == 0 and out.startswith("The function") and err[0].startswith("expert cache: 16 slots")
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["policy"] == policy and stats["loads"] > 0 and stats["substitution_rate"] == stats["drop_rate"] == 0


def test_static_pins_the_profiles_most_frequent_experts(fixture_model, small_profile, capsys):
    from artifacts.profile import Profile

    with Runtime.load(fixture_model, policy="lru", cache="50%", lossless=True) as rt:
        ids, _ = rt.encode(["In the beginning"])
        want = rt.generate_ids(ids, max_new_tokens=8)
    with Runtime.load(fixture_model, policy="static", cache="50%", profile=small_profile) as rt:
        pins = static_pins(Profile.load(small_profile, with_trace=False).frequency, rt.cache.slots)
        assert all(len(p) == 7 for p in pins.values())              # 8 slots a layer: 7 pinned, 1 streaming
        assert all(set(p) <= set(rt.cache.where[l]) for l, p in pins.items())
        got = rt.generate_ids(ids, max_new_tokens=8)
        assert all(set(p) <= set(rt.cache.where[l]) for l, p in pins.items())      # never evicted
        s = rt.stats.to_dict()
        assert s["policy"] == "static" and s["loads"] > 0 and s["hits"] > 0
        assert s["cache_capacity_bytes"] == s["peak_cache_bytes"]    # pinned + streaming = the --cache budget
    assert torch.equal(got, want)                                    # lossless: the same tokens as lru


def test_run_static_cli(fixture_model, small_profile, capsys):
    code, out, err = _run(capsys, fixture_model, "--policy", "static", "--cache", 4, "--profile", small_profile,
                          "--prompt", "import os", "--max-new-tokens", 4)
    assert code == 0 and out.startswith("import os") and "[static]" in err[-1]


@pytest.mark.parametrize("args,message", [
    (["--policy", "static", "--cache", "25%"], "--profile PROFILE_DIR"),
    (["--policy", "lfu", "--cache", "25%", "--profile", "PROFILE"], "--profile is read by policy static only"),
    (["--policy", "oracle", "--cache", "25%"], "only the simulator runs it"),
    (["--policy", "lfru"], "needs a cache size"),
    (["--policy", "static", "--profile", "PROFILE"], "needs a cache size"),
    (["--policy", "static", "--cache", "25%", "--profile", "/nonexistent/profile"], "/nonexistent/profile"),
    (["--policy", "static", "--cache", "25%", "--profile", "OTHER"], "another model"),
])
def test_bad_combinations(fixture_model, small_profile, tmp_path, capsys, args, message):
    other = tmp_path / "other"
    shutil.copytree(small_profile, other)
    h = json.loads((other / "profile.json").read_text())
    h["model"]["fingerprint"] = "0" * 32
    (other / "profile.json").write_text(json.dumps(h))
    args = [{"PROFILE": small_profile, "OTHER": other}.get(a, a) for a in args]
    code, _, err = _run(capsys, fixture_model, "--prompt", "x", *args)
    assert code == 2 and len(err) == 1 and message in err[0], err
