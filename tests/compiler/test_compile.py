"""moe-compile: budgets, targets, the plan it writes, and its errors."""
import json
import subprocess
import sys

import pytest

from artifacts import Plan, UserError
from compiler.cli import main
from compiler.compile_plan import ALPHAS, DEPTHS, CompileConfig, compile_plan
from compiler.memory import split_budget
from compiler.targets import load_target, presets

MODEL = {"moe_layers": [0, 1, 2], "expert_bytes": 1000, "routed_expert_bytes": 1000 * 8 * 3, "dense_bytes": 50_000,
         "kv_bytes_per_token": 10, "num_layers": 3}




def test_percentage_budget():
    s = split_budget("25%", MODEL, load_target("dev-emulated"), 1, 128)
    assert s.total_slots == 6 and s.cache_bytes <= 0.25 * MODEL["routed_expert_bytes"]
    with pytest.raises(UserError, match="fewer than one per MoE layer.*--budget 12.5%"):
        split_budget("5%", MODEL, load_target("dev-emulated"), 1, 128)


def test_absolute_budget_split_and_minimum():
    t = load_target("dev-emulated")
    need = 50_000 + 10 * 128 * 2 + t.workspace + 3 * 1000
    s = split_budget(f"{need + 4500}B", MODEL, t, 2, 128)
    assert s.total_slots == 7 and s.dense_bytes + s.kv_bytes + s.workspace_bytes + s.total_slots * 1000 <= need + 4500
    with pytest.raises(UserError, match=r"below the .* needed .* try --budget"):
        split_budget(f"{need - 1}B", MODEL, t, 2, 128)
    with pytest.raises(UserError, match="exceeds the target"):
        split_budget("1TiB", MODEL, t, 1, 128)


def test_targets():
    assert {"rtx3080ti-laptop", "jetson-orin-nvme", "cpu-nvme", "dev-emulated"} <= set(presets())
    for name in presets():
        t = load_target(name)
        assert t.link_bandwidth > 0 and t.device_memory > 0 and t.t_load(1e6) > t.link_latency
    with pytest.raises(UserError, match="unknown target"):
        load_target("tpu-v9")


def test_plan_contents(tiny_profile, tmp_path):
    plan = compile_plan(tiny_profile, CompileConfig(budget="25%", search_tokens=64), log=lambda *a: None)
    plan.save(tmp_path / "plan")
    p = Plan.load(tmp_path / "plan")
    assert sum(p.slots.values()) * p.expert_bytes <= 0.25 * 8 * 3 * p.expert_bytes
    assert set(p.slots) == {0, 1, 2} and all(n >= 1 for n in p.slots.values())
    assert 0 <= p.alpha <= max(ALPHAS) and p.tau > 0 and p.choices.pool_depth in DEPTHS
    assert set(p.predicted) >= {"plan", "lru", "smoe"}
    for name in ("plan", "lru", "smoe"):
        assert {"hit_rate", "loads_per_token", "tpot_ms"} <= set(p.predicted[name])
    for l in p.slots:                      # near-twin candidates: same cluster only, best first
        for i, ranked in p.substitutes[l].items():
            assert [r[2] for r in ranked] == sorted(r[2] for r in ranked)
            assert all(p.clusters[l][j] == p.clusters[l][i] for j, _, _ in ranked)
    assert set(p.not_taken[0]) == set(range(8)) and sum(len(c["members"]) for c in p.cluster_table[0]) == 8
    assert p.header["model"]["fingerprint"] and p.header["profile"]["sha256"]
    # the profile kept its measurements per window: every prediction carries its interval, and the default limit
    # applies to the interval's upper end (each candidate the search kept is judged by it)
    pr = p.predicted["plan"]
    assert pr["ppl_low"] <= pr["ppl_increase"] <= pr["ppl_high"]
    assert p.choices.error_bound == "ppl_high" and p.choices.objective.startswith("least modeled TPOT with ppl_high")
    assert all(c["ppl_high"] is not None for c in p.header["search"])


def test_max_error_and_tpot_target(tiny_profile):
    strict = compile_plan(tiny_profile, CompileConfig(budget="25%", max_error=0.0, search_tokens=64), log=lambda *a: None)
    assert strict.predicted["plan"]["ppl_increase"] == 0.0 and strict.predicted["plan"]["drop_rate"] == 0.0
    assert strict.predicted["plan"]["substitution_rate"] == 0.0
    fast = compile_plan(tiny_profile, CompileConfig(budget="25%", tpot_target_ms=1e9, search_tokens=64),
                        log=lambda *a: None)
    assert fast.choices.objective.startswith("least ppl_increase with modeled TPOT")


def _run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def test_cli_writes_plan_and_report(tiny_profile, tmp_path, capsys):
    code, _ = _run(capsys, tiny_profile, "--budget", "50%", "-o", tmp_path / "plan", "--search-tokens", 64)
    assert code == 0
    assert {"plan.json", "cache_plan.json", "substitution_map.json", "report.md", "budget_sweep.png",
            "similarity.png"} <= {f.name for f in (tmp_path / "plan").iterdir()}


@pytest.mark.parametrize("args,message", [
    (["--budget", "1KiB", "--target", "dev-emulated"], "below the"),
    (["--budget", "25%", "--target", "abacus"], "unknown target"),
    (["--budget", "lots"], "cannot read budget"),
])
def test_cli_errors(tiny_profile, tmp_path, capsys, args, message):
    code, err = _run(capsys, tiny_profile, "-o", tmp_path / "plan", *args)
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "plan").exists()


def test_cli_refuses_other_version_and_corrupt_profile(tiny_profile, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_profile, bad)
    h = json.loads((bad / "profile.json").read_text())
    h["format_version"] = 99
    (bad / "profile.json").write_text(json.dumps(h))
    code, err = _run(capsys, bad, "--budget", "25%", "-o", tmp_path / "plan")
    assert code == 2 and len(err) == 1 and "format version 99" in err[0]
    h["format_version"] = 1
    (bad / "profile.json").write_text(json.dumps(h))
    (bad / "trace.safetensors").write_bytes(b"\x00" * 10)
    code, err = _run(capsys, bad, "--budget", "25%", "-o", tmp_path / "plan")
    assert code == 2 and len(err) == 1 and "corrupt" in err[0]
    assert not (tmp_path / "plan").exists()


def test_compiler_needs_no_torch(tiny_profile, tmp_path):
    code = ("import sys; from compiler.compile_plan import compile_plan, CompileConfig; "
            f"compile_plan({str(tiny_profile)!r}, CompileConfig(search_tokens=32), log=lambda *a: None); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_report_is_the_plans_numbers_and_custom_targets_report(tiny_profile, tmp_path, capsys):
    """report.md's own-budget rows are plan.json's predictions; replaying the plan through compiler.predict gives the
    same numbers; a --target FILE compiles and reports; every row's shares add up to 1."""
    from artifacts.profile import Profile
    from compiler.loss_model import LossModel
    from compiler.predict import simulate_plan
    from compiler.report import budget_sweep
    from compiler.simulator import Costs
    from compiler.targets import Target

    target = tmp_path / "my_gpu.yaml"
    target.write_text("name: my_gpu\ndevice_memory: 4GiB\ndevice_mem_bandwidth: 200GB/s\nlink_bandwidth: 8GB/s\n"
                      "link_latency: 10us\nhost_mem_bandwidth: 20GB/s\n")
    code, _ = _run(capsys, tiny_profile, "--budget", "25%", "--target", target, "-o", tmp_path / "plan",
                   "--search-tokens", 64)
    assert code == 0
    plan, profile = Plan.load(tmp_path / "plan"), Profile.load(tiny_profile)
    assert plan.header["target"]["name"] == "my_gpu"
    replay = simulate_plan(profile, plan.slots, plan.choices, plan.substitution_map(),
                           Costs.of(Target.from_dict(plan.header["target"]), plan.header["model"] | profile.header["model"]),
                           plan.predicted["tokens"], LossModel.from_profile(profile), plan.initial).to_dict()
    assert replay == {k: v for k, v in plan.predicted["plan"].items() if k in replay}
    rows = budget_sweep(plan, profile)
    own = {r["policy"]: r for r in rows if r["this_plan"]}
    for name in ("plan", "lru", "smoe"):
        assert {k: own[name][k] for k in plan.predicted[name]} == plan.predicted[name]
    for r in rows:
        shares = [r[k] for k in ("exact_hit_rate", "substitution_rate", "drop_rate", "host_rate", "miss_rate")]
        assert abs(sum(shares) - 1) < 1e-9 and abs(r["hit_rate"] - shares[0] - shares[1]) < 1e-9
    report = (tmp_path / "plan" / "report.md").read_text()
    p = plan.predicted["plan"]
    assert f"| plan | {p['exact_hit_rate']:.3f} | {p['substitution_rate']:.3f} |" in report
    assert "(this plan)" in report
