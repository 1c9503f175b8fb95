"""The plan's budget is a guarantee in every compute dtype: the cache holds experts in the dtype the plan counted
(the checkpoint's), so a float32 run of a bf16 plan holds and moves exactly the plan's bytes."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from artifacts import Plan
from compiler.compile_plan import CompileConfig, compile_plan
from helpers import sample_texts, write_jsonl
from profiler.profile_model import ProfileConfig, profile
from runtime import Runtime
from runtime.cli import main as run_main
from tiny_models import build_tiny


@pytest.fixture(scope="module")
def bf16_plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    model = build_tiny("qwen3_moe", d / "model")
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(model / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg | {"dtype": "bfloat16"}))
    calib = write_jsonl(d / "c.jsonl", sample_texts(6, 31))
    profile(model, str(calib), ProfileConfig(samples=6, seq_len=32, probe_tokens=64, sensitivity_tokens=64,
                                         quant_tokens=0),
            progress=False).save(d / "profile")
    compile_plan(d / "profile", CompileConfig(budget="25%", search_tokens=64), log=lambda *a: None).save(d / "plan")
    return model, d / "plan"


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_cache_within_plan_budget_in_every_dtype(bf16_plan, dtype):
    model, plan_dir = bf16_plan
    plan = Plan.load(plan_dir)
    assert plan.expert_dtype == "bfloat16"
    with Runtime.load(model, plan=plan_dir, dtype=dtype) as rt:
        assert rt.lm.dtype == (torch.float32 if dtype == "float32" else torch.bfloat16)   # default: checkpoint's
        assert rt.store.dtype == torch.bfloat16 and rt.cache.expert_bytes == plan.expert_bytes
        assert rt.cache.capacity_bytes <= plan.cache_budget_bytes
        assert rt.budget.capacity_bytes == rt.cache.capacity_bytes and rt.budget.limit_bytes == plan.cache_budget_bytes
        rt.generate(["the expert cache", "router score"], max_new_tokens=12)
        stats = rt.stats.to_dict()
        assert stats["loads"] > 0
        shares = [stats[k] for k in ("exact_hit_rate", "substitution_rate", "drop_rate", "host_rate", "miss_rate")]
        assert abs(sum(shares) - 1) < 1e-9                                 # every pair counted exactly once
        assert stats["peak_cache_bytes"] <= plan.cache_budget_bytes
        assert stats["bytes_loaded"] == stats["loads"] * plan.expert_bytes   # bytes moved are bf16 bytes
        assert rt.cache.allocated_bytes() == rt.cache.capacity_bytes    # storage behind the slots, each once


def test_float32_run_of_bf16_plan_is_exact(bf16_plan):
    """Experts widened from the bf16 cache compute exactly what HF computes with the checkpoint in float32."""
    import transformers

    model, plan_dir = bf16_plan
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(2))
    with Runtime.load(model, plan=plan_dir, dtype="float32", lossless=True) as rt:
        ours = rt.forward(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32,
                                                           experts_implementation="eager").eval()
    assert torch.equal(ours, hf(ids).logits)


def test_moe_run_prints_the_budget(bf16_plan, capsys):
    model, plan_dir = bf16_plan
    capsys.readouterr()
    assert run_main([str(model), "--plan", str(plan_dir), "--prompt", "the", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if l.startswith("expert cache:"))
    assert "(bfloat16)" in line and "within the plan's" in line


@pytest.mark.parametrize("how", ["plan", "lru"])
def test_a_failed_load_reaches_the_caller_as_one_line(bf16_plan, monkeypatch, how):
    """An I/O error in a load mid-decode is raised in the decoding thread as one line: no hang, no traceback. plan:
    from its first load (the general path, the loader thread); lru: from the second token on, one token per call,
    so the failing copies are the lean path's, made inline on the decoding thread."""
    import errno
    import threading

    from artifacts import UserError

    model, plan_dir = bf16_plan
    with (Runtime.load(model, plan=plan_dir) if how == "plan" else Runtime.load(model, policy="lru", cache="50%")) as rt:
        def broken(layer, e, dst, non_blocking=False):
            raise OSError(errno.EIO, "Input/output error")
        result = {}

        def decode():
            try:
                if how == "plan":
                    monkeypatch.setattr(rt.store, "copy_into", broken)
                    rt.generate(["the expert cache", "router score"], max_new_tokens=12)
                else:
                    ids = torch.tensor([[104, 101, 32]])
                    rt.generate_ids(ids, torch.ones_like(ids), max_new_tokens=24,
                                    on_step=lambda _: setattr(rt.store, "copy_into", broken))
            except UserError as exc:
                result["error"] = str(exc)
        t = threading.Thread(target=decode)
        t.start()
        t.join(timeout=60)
        assert not t.is_alive(), "decoding hung on a failed load"
        assert how == "plan" or rt.loader.inline
    assert "failed (Input/output error)" in result["error"] and "\n" not in result["error"]
