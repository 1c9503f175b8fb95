"""moe-compile --budget auto: the target device's free memory minus a headroom, derived in one printed line and
recorded in the plan."""
import subprocess
import sys

import pytest

from artifacts import Plan, UserError
from compiler import auto_budget as ab
from compiler.cli import main
from compiler.compile_plan import CompileConfig, compile_plan
from compiler.targets import Target, load_target

GiB, MiB = 2**30, 2**20
MODEL = {"moe_layers": [0, 1, 2], "expert_bytes": 100 * MiB, "routed_expert_bytes": 100 * MiB * 128 * 3,
         "dense_bytes": GiB, "kv_bytes_per_token": 1000}




def _run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def test_derivation_from_injected_free_memory():
    t = load_target("cpu-nvme")                    # 32 GiB device memory, 1 GiB workspace
    fixed = GiB + 1000 * 2048 + GiB
    a = ab.derive(20 * GiB, "available RAM (test)", MODEL, t, 1, 2048)
    assert a.headroom_bytes == 2 * GiB and a.budget_bytes == 18 * GiB and a.cache_bytes == 18 * GiB - fixed
    assert not a.capped
    line = a.describe()
    assert "\n" not in line and line.startswith("budget auto: 20.00 GiB available RAM (test) - 2.00 GiB headroom")
    assert "1.00 GiB dense weights" in line and "1.00 GiB workspace" in line and line.endswith("budget 18.00 GiB")
    # the default headroom is at least 1 GiB; an explicit one is a size or a share of free
    assert ab.derive(5 * GiB, "x", MODEL, t, 1, 2048).headroom_bytes == GiB
    assert ab.derive(20 * GiB, "x", MODEL, t, 1, 2048, headroom="512MiB").budget_bytes == 20 * GiB - 512 * MiB
    assert ab.derive(20 * GiB, "x", MODEL, t, 1, 2048, headroom="25%").budget_bytes == 15 * GiB
    # capped by the target's device memory, then by what holds every routed expert
    cap = ab.derive(100 * GiB, "x", MODEL, t, 1, 2048)
    assert cap.budget_bytes == t.device_memory and "device_memory" in cap.capped and "capped at" in cap.describe()
    small = dict(MODEL, routed_expert_bytes=100 * MiB * 32 * 3)
    full = ab.derive(30 * GiB, "x", small, t, 1, 2048)
    assert full.cache_bytes == small["routed_expert_bytes"] and full.capped == "100% of routed-expert bytes"
    assert "(100% of routed-expert bytes)" in full.describe()
    # batch and context count as in an absolute budget
    assert ab.derive(20 * GiB, "x", MODEL, t, 4, 2048).kv_bytes == 4 * 1000 * 2048


def test_too_little_for_one_expert_per_layer():
    t = load_target("dev-emulated")
    with pytest.raises(UserError, match="less than one expert per MoE layer .3 x 100.00 MiB.*explicit --budget"):
        ab.derive(5 * GiB // 2, "available RAM (test)", MODEL, t, 1, 2048)
    with pytest.raises(UserError, match="less than one expert per MoE layer"):
        ab.derive(20 * GiB, "x", MODEL, t, 1, 2048, headroom="100%")


def test_headroom_goes_with_auto_only():
    ab.check_headroom("auto", "2GiB")
    ab.check_headroom("AUTO", "15%")
    with pytest.raises(UserError, match="--headroom applies to --budget auto only"):
        ab.check_headroom("25%", "2GiB")
    with pytest.raises(UserError, match="cannot read --headroom"):
        ab.check_headroom("auto", "lots")
    with pytest.raises(UserError, match="no unit"):
        ab.check_headroom("auto", "2")


def test_cpu_probe_reads_this_machine_without_torch():
    code = ("import sys; from compiler.auto_budget import probe_free_memory as p; free, src = p('cpu'); "
            "assert free > 0 and 'available RAM' in src, (free, src); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(free)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < int(r.stdout) <= total


def test_cpu_probe_without_psutil_reads_meminfo(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)          # import psutil -> ImportError
    free, src = ab.probe_free_memory("cpu")
    assert free > 0 and src == "available RAM (/proc/meminfo MemAvailable)"


def test_cuda_target_without_gpu(monkeypatch, tiny_profile, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA target .rtx3080ti-laptop. needs a visible GPU"):
        ab.probe_free_memory("cuda", "rtx3080ti-laptop")
    code, err = _run(capsys, tiny_profile, "--budget", "auto", "--target", "rtx3080ti-laptop", "-o", tmp_path / "plan")
    assert code == 2 and len(err) == 1 and "needs a visible GPU" in err[0] and "explicit --budget" in err[0]
    assert not (tmp_path / "plan").exists()


def test_cli_auto_on_this_machine_records_the_derivation(tiny_profile, tmp_path, capsys):
    code, err = _run(capsys, tiny_profile, "--budget", "auto", "--target", "dev-emulated", "-o", tmp_path / "plan",
                     "--search-tokens", 32, "--no-report")
    assert code == 0, err
    lines = [l for l in err if l.startswith("budget auto:")]
    assert len(lines) == 1 and "available RAM" in lines[0], err
    print(lines[0])
    plan = Plan.load(tmp_path / "plan")
    b = plan.budget
    assert b["text"] == "auto" and b["kind"] == "bytes" and b["auto"]["description"] == lines[0]
    a = b["auto"]
    assert a["free_bytes"] > 0 and "available RAM" in a["source"] and a["budget_bytes"] == b["budget"]
    assert a["cache_bytes"] == b["cache_bytes"] and a["workspace_bytes"] == load_target("dev-emulated").workspace
    # the tiny model fits many times over: every routed expert gets a slot
    assert a["capped"] == "100% of routed-expert bytes" and sum(plan.slots.values()) == 8 * 3
    assert plan.header["target"]["device_kind"] == "cpu"


def test_cli_too_little_memory(monkeypatch, tiny_profile, tmp_path, capsys):
    monkeypatch.setattr(ab, "probe_free_memory", lambda kind, name="": (300 * MiB, "available RAM (test)"))
    code, err = _run(capsys, tiny_profile, "--budget", "auto", "-o", tmp_path / "plan")
    assert code == 2 and len(err) == 1 and "less than one expert per MoE layer" in err[0], err
    assert err[0].startswith("moe-compile: error: --budget auto: 300.00 MiB available RAM (test) - 1.00 GiB headroom")
    assert not (tmp_path / "plan").exists()
    code, err = _run(capsys, tiny_profile, "--budget", "25%", "--headroom", "1GiB", "-o", tmp_path / "plan")
    assert code == 2 and len(err) == 1 and "--headroom applies to --budget auto only" in err[0]
    assert not (tmp_path / "plan").exists()


def test_plans_with_and_without_the_derivation_validate(monkeypatch, tiny_profile):
    monkeypatch.setattr(ab, "probe_free_memory", lambda kind, name="": (4 * GiB, "free memory of cuda:0 (test)"))
    logged = []
    plan = compile_plan(tiny_profile, CompileConfig(budget="auto", target="rtx3080ti-laptop", search_tokens=32,
                                                    headroom="1GiB"), log=logged.append)
    assert logged[0] == plan.budget["auto"]["description"] and "- 1.00 GiB headroom (--headroom 1GiB)" in logged[0]
    plan.validate()
    del plan.header["budget"]["auto"]                          # a plan from before --budget auto
    plan.validate()
    plan.header["budget"]["auto"] = {"free_bytes": -1, "headroom_bytes": 0, "budget_bytes": 0}
    with pytest.raises(UserError, match="budget.auto.free_bytes"):
        plan.validate()
    old = {k: v for k, v in plan.header["target"].items() if k != "device_kind"}   # a target recorded before
    assert Target.from_dict(old).device_kind == "cuda"
