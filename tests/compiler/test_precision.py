"""Precision plans (issue #12): pools in the cache model, the compiler's choice, the plan schema, and the runtime
holding quantized copies (the bytes it moves and holds, its logits, --lossless)."""
import json
import random
import shutil

import numpy as np
import pytest
import torch

from artifacts import UserError
from artifacts.plan import Plan
from compiler.compile_plan import CompileConfig, compile_plan
from compiler.precision import NATIVE, options
from helpers import DATA
from profiler.profile_model import ProfileConfig, profile
from runtime import Runtime
from runtime.policy.config import preset
from runtime.policy.plan_params import substitution_params
from runtime.policy.pools import Pools, native_slots
from runtime.policy.schedule import CacheModel
from runtime.quantize import (INT4, INT8, QuantizedWeight, dequantize, expert_packed_bytes,
                              expert_specs, kernel_expert, quantize_expert)


# ---- pure: pools in the cache model ------------------------------------------------------------------------------
def _replay(model: CacheModel, layers, trace, k):
    out = []
    for row in trace:
        for l in layers:
            s = model.schedule(l, [dict(zip(row, [1.0 / (i + 1) for i in range(len(row))]))], [row[:k]])
            out.append((s.ops, s.counts.hits, s.counts.loads))
    return out


@pytest.mark.parametrize("rule", ["lru", "lfu", "lfru"])
def test_one_pool_per_layer_is_the_cache_without_pools(rule):
    """Pools that put every expert in pool 0 with the layer's slots decide exactly as no pools."""
    e, k, layers = 16, 4, [0, 1]
    rng = random.Random(1)
    trace = [rng.sample(range(e), 6) for _ in range(200)]
    pol = preset(rule)
    params = substitution_params(pol, layers)
    pools = Pools(("bfloat16",), (100,), {l: (0,) * e for l in layers}, {l: (6,) for l in layers})
    a = _replay(CacheModel({l: 6 for l in layers}, e, k, pol, params), layers, trace, k)
    b = _replay(CacheModel({l: 6 for l in layers}, e, k, pol, params, pools=pools), layers, trace, k)
    assert a == b


def test_an_expert_only_evicts_its_own_pool():
    e, k, layers = 8, 2, [0]
    of = (0, 0, 1, 1, 1, 1, 1, 1)                 # experts 0-1 native, 2-7 int4
    pools = Pools(("bfloat16", "int4"), (100, 28), {0: of}, {0: (1, 3)})
    pol = preset("lru")
    m = CacheModel({0: 4}, e, k, pol, substitution_params(pol, layers), pools=pools)
    rng = random.Random(0)
    for _ in range(300):
        row = rng.sample(range(e), 3)
        s = m.schedule(0, [dict.fromkeys(row, 1.0)], [row[:k]])
        for kind, _, x, victim in s.ops:
            if kind == "load" and victim is not None:
                assert of[x] == of[victim]
        held = [of[x] for x in m.resident[0]]
        assert held.count(0) <= 1 and held.count(1) <= 3
        q = sum(1 for x in row[:k] if of[x] == 1)
        assert s.counts.quantized.get("int4", 0) == q          # every pair an int4 expert computed


def test_native_slots_fit_the_budget():
    pools = Pools(("bfloat16", "int4"), (100, 28), {0: (0,) * 4 + (1,) * 12, 1: (1,) * 16},
                  {0: (2, 7), 1: (0, 10)})
    assert pools.layer_bytes(0) == 396 and pools.layer_bytes(1) == 280
    got = native_slots(pools, pools.total_bytes)
    assert got == {0: 3, 1: 2} and sum(got.values()) * 100 <= pools.total_bytes
    with pytest.raises(UserError, match="--precision off"):
        native_slots(pools, 150)


def test_options_never_give_a_more_important_class_fewer_bits():
    bits = {"int8": 8, "int4": 4}
    auto = options(("int8", "int4"), bits, 3, "auto")
    assert len(auto) == 10 and auto[0].native_only
    rank = {NATIVE: 16, "int8": 8, "int4": 4}
    assert all(rank[o.classes[0]] >= rank[o.classes[1]] >= rank[o.classes[2]] for o in auto)
    assert all("int4" not in o.classes for o in options(("int8", "int4"), bits, 3, "int8"))


@pytest.mark.parametrize("scheme", [INT8, INT4])
def test_slot_specs_hold_what_quantize_expert_makes(scheme):
    from runtime.families.arch import ExpertFormat

    fmt = ExpertFormat(kind="glu", hidden=64, intermediate=32)
    w = {k: torch.randn(s, dtype=torch.bfloat16) for k, s in fmt.shapes().items()}
    q = quantize_expert(w, fmt, scheme)
    specs = expert_specs(fmt, scheme, torch.bfloat16)
    assert {k: (tuple(v.shape), v.dtype) for k, v in q.items()} == {k: (s.shape, s.dtype) for k, s in specs.items()}
    assert sum(s.nbytes for s in specs.values()) == expert_packed_bytes(fmt, scheme, torch.bfloat16)


# ---- the compiler, the plan and the runtime on the shared fixture ---------------------------------------------------
@pytest.fixture(scope="module")
def quant_profile(fixture_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("precision") / "profile"
    profile(fixture_model, str(DATA / "calib.jsonl"), ProfileConfig(samples=3, seq_len=64, probe_tokens=64,
            sensitivity_tokens=128, quant_tokens=128), progress=False).save(d)
    return d


@pytest.fixture(scope="module")
def precision_plan(quant_profile, tmp_path_factory):
    d = tmp_path_factory.mktemp("precision-plan") / "plan"
    plan = compile_plan(quant_profile, CompileConfig(budget="12.5%", search_tokens=64, predict_tokens=192),
                        log=lambda *a: None)
    plan.save(d)
    return d


def test_a_tight_budget_compiles_a_precision_plan_within_its_bytes(precision_plan, quant_profile):
    plan = Plan.load(precision_plan)
    assert plan.precision is not None and plan.header["format_version"] == 2
    assert plan.held_bytes <= plan.cache_budget_bytes
    pred = plan.predicted
    assert "plan_native" in pred and pred["plan"]["hit_rate"] > pred["plan_native"]["hit_rate"]
    assert pred["plan"]["bytes_per_token"] < pred["plan_native"]["bytes_per_token"]
    mix = pred["plan"]["precision_mix"]
    assert abs(sum(mix.values()) - 1) < 1e-9 and sum(v for k, v in mix.items() if k != "bfloat16") > 0
    # every expert of a layer's class is held at that class's precision
    classes = plan.choices.precision.split("/")
    prof = json.loads((quant_profile / "profile.json").read_text())
    assert len(classes) == len(prof["quant_sensitivity"]["classes"])
    off = compile_plan(quant_profile, CompileConfig(budget="12.5%", search_tokens=64, predict_tokens=192,
                                                    precision="off"), log=lambda *a: None)
    assert off.precision is None and off.choices.precision == "bfloat16"


def test_precision_needs_a_profile_that_measured_it(small_profile):
    with pytest.raises(UserError, match="--quant-tokens"):
        compile_plan(small_profile, CompileConfig(budget="25%", precision="int4"), log=lambda *a: None)
    plan = compile_plan(small_profile, CompileConfig(budget="25%", search_tokens=32, predict_tokens=64),
                        log=lambda *a: None)
    assert plan.precision is None                 # auto: nothing measured, the checkpoint's format only


def test_a_plan_whose_precision_slots_overrun_the_budget_is_refused(precision_plan, tmp_path):
    d = tmp_path / "plan"
    shutil.copytree(precision_plan, d)
    cache = json.loads((d / "cache_plan.json").read_text())
    layer, spec = next(iter(cache["precision"]["layers"].items()))
    name = next(n for n in spec["slots"] if n != "bfloat16")
    spec["slots"][name] += 1
    cache["slots"][layer] += 1
    (d / "cache_plan.json").write_text(json.dumps(cache))
    with pytest.raises(UserError, match="budget|slots"):
        Plan.load(d)
    spec["slots"][name] -= 1                      # slots that do not add up
    (d / "cache_plan.json").write_text(json.dumps(cache))
    with pytest.raises(UserError, match="add up"):
        Plan.load(d)


def test_the_runtime_holds_and_moves_quantized_copies(fixture_model, precision_plan):
    plan = Plan.load(precision_plan)
    ids = torch.tensor([[5, 17, 42, 9, 77, 3, 120, 64, 11, 90, 33, 7]])
    with Runtime.load(fixture_model, plan=precision_plan, policy="plan", alpha=0.0) as rt:
        store = rt.store
        # the copies hold the quantizer's codes and scales on the checkpoint's experts, at the plan's bytes: on the
        # CPU the kernels compute from them, and each matrix times the identity (float32) is exactly W'^T
        fmt = rt.lm.arch.experts
        for l, spec in plan.precision["layers"].items():
            for e, name in enumerate(spec["experts"]):
                if name != "bfloat16":
                    scheme = store.schemes[name]
                    want = quantize_expert(store.base.read(l, e), fmt, scheme)
                    got = store._copies[(l, e)]
                    assert store.kernels[name] and {k: (v.shape, v.dtype) for k, v in got.items()} == {
                        k: (v.shape, v.dtype) for k, v in want.items()}
                    for m, km in kernel_expert(got, fmt, scheme).items():
                        w = dequantize(QuantizedWeight(want[f"{m}_q"], want[f"{m}_scale"]), scheme, torch.float32)
                        assert torch.equal(km.linear(torch.eye(w.shape[1])), w.t())
        assert rt.cache.capacity_bytes == plan.held_bytes <= plan.cache_budget_bytes
        logits = rt.teacher_force(ids)
        d = rt.stats.to_dict(per_layer=True)
        assert d["peak_cache_bytes"] <= plan.cache_budget_bytes
        assert d["bytes_loaded"] == sum(c["load_bytes"] for c in d["layers"].values())
        assert sum(d["precision_mix"].values()) == pytest.approx(1.0)
        quantized = {(l, e) for l, s in plan.precision["layers"].items() for e, n in enumerate(s["experts"])
                     if n != "bfloat16"}
    # the same logits as the resident model whose quantized experts compute from the same codes with the same kernels
    with Runtime.load(fixture_model, policy="resident") as ref:
        for (l, e) in quantized:
            ref.executor.experts[(l, e)] = store.materialize(l, e, store._copies[(l, e)], torch.bfloat16)
        want = ref.teacher_force(ids)
    assert torch.equal(logits, want)


def test_a_precision_plan_groups_its_native_slots(fixture_model, precision_plan, tmp_path):
    """A call of several tokens computes the experts held at the checkpoint's format in one grouped call over that
    pool's slots and each quantized one alone: the same logits, tokens and statistics as the per-expert loop."""
    # the compiler holds every expert at int4 here: give each layer one bfloat16 slot for experts 0-3 in place of
    # four int4 slots (393216 B <= 4 x 110592 B), so that both kinds of slot compute
    plan_dir = tmp_path / "plan"
    shutil.copytree(precision_plan, plan_dir)
    cache = json.loads((plan_dir / "cache_plan.json").read_text())
    for layer, spec in cache["precision"]["layers"].items():
        assert set(spec["slots"]) == {"int4"} and spec["slots"]["int4"] >= 5
        spec["slots"] = {"bfloat16": 1, "int4": spec["slots"]["int4"] - 4}
        spec["experts"] = ["bfloat16"] * 4 + spec["experts"][4:]
        cache["slots"][layer] -= 3
        rest = [e for e in cache["initial"][layer] if e >= 4][:spec["slots"]["int4"]]
        cache["initial"][layer] = [0] + rest                            # what the slots start with, per pool
    (plan_dir / "cache_plan.json").write_text(json.dumps(cache))
    plan = Plan.load(plan_dir)
    assert plan.held_bytes <= plan.cache_budget_bytes
    ids = torch.randint(1, 4096, (3, 10), generator=torch.Generator().manual_seed(5))
    out = []
    for grouped in (False, True):
        with Runtime.load(fixture_model, plan=plan_dir, policy="plan") as rt:
            ex, calls = rt.executor, []
            assert rt.cache.pools is not None and ex.grouped_fn is not None
            fn = ex.grouped_fn

            def counted(*a):
                calls.append(a[0].shape[0])
                return fn(*a)
            ex.grouped_fn = counted if grouped else None
            logits = rt.forward(ids)
            tokens = rt.generate_ids(ids, torch.ones_like(ids), max_new_tokens=8)
            d = rt.stats.to_dict()
            out.append((logits, tokens, {k: d[k] for k in ("loads", "hit_rate", "bytes_loaded", "precision_mix")},
                        calls))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1]) and out[0][2] == out[1][2]
    assert out[0][2]["loads"] > 0 and len(out[1][3]) > 0 and out[0][3] == []
    assert 0 < out[0][2]["precision_mix"].get("bfloat16", 0) < 1        # both kinds of slot computed


def test_lossless_runs_a_precision_plan_bit_exact_within_its_budget(fixture_model, precision_plan):
    ids = torch.tensor([[5, 17, 42, 9, 77, 3, 120, 64]])
    with Runtime.load(fixture_model, policy="resident") as ref:
        want = ref.teacher_force(ids)
    with Runtime.load(fixture_model, plan=precision_plan, policy="plan", lossless=True) as rt:
        got = rt.teacher_force(ids)
        plan = Plan.load(precision_plan)
        assert rt.cache.capacity_bytes <= plan.cache_budget_bytes and rt.stats.to_dict()["precision_mix"] == {
            "bfloat16": 1.0}
    assert torch.equal(got, want)


def test_the_simulator_predicts_what_the_runtime_moves(fixture_model, quant_profile, precision_plan):
    """Same tokens, same pools: the compiler's replay and the runtime agree on hits, loads and bytes moved (the
    quantized copies shift hidden states a little, so the runtime's routing drifts from the trace's: within 0.01
    per routed pair, as for every lossy plan)."""
    from artifacts import Profile
    from compiler.simulator import Costs, simulate
    from runtime.policy.plan_params import plan_policy, plan_pools

    prof, plan = Profile.load(quant_profile), Plan.load(precision_plan)
    layers = prof.moe_layers
    pools = plan_pools(plan.precision, layers, plan.expert_bytes)
    pol, params = plan_policy(plan.choices, layers, plan.substitution_map(), lossless=True, host_compute=False)
    pred = simulate(prof.trace, layers, prof.num_experts, prof.top_k, plan.slots, pol, params,
                    Costs.of(None, prof.header["model"]), initial=plan.initial, pools=pools).to_dict()
    tokens = prof.trace["token"].reshape(-1, 64).astype(np.int64)
    with Runtime.load(fixture_model, plan=precision_plan, policy="plan", alpha=0.0, host_compute=False) as rt:
        for row in tokens:
            rt.teacher_force(torch.from_numpy(row)[None])
        got = rt.stats.to_dict()
    assert got["decode_positions"] == pred["tokens"] == tokens.size
    pairs = len(layers) * prof.top_k
    assert abs(got["hit_rate"] - pred["hit_rate"]) <= 0.01
    assert abs(got["loads_per_token"] - pred["loads_per_token"]) / pairs <= 0.01
    assert got["loads"] > 0 and pred["loads"] > 0                        # bytes per load: the pools' mix of sizes
    assert got["bytes_loaded"] / got["loads"] == pytest.approx(pred["bytes_per_token"] / pred["loads_per_token"],
                                                               rel=0.05)
    for k, v in pred["precision_mix"].items():
        assert got["precision_mix"][k] == pytest.approx(v, abs=0.02)


def test_a_plan_counting_other_bytes_per_expert_is_a_one_line_error(fixture_model, precision_plan, tmp_path):
    d = tmp_path / "plan"
    shutil.copytree(precision_plan, d)
    cache = json.loads((d / "cache_plan.json").read_text())
    name = next(iter(cache["precision"]["schemes"]))
    cache["precision"]["schemes"][name]["expert_bytes"] -= 2      # still within the budget: Plan.load accepts it
    (d / "cache_plan.json").write_text(json.dumps(cache))
    Plan.load(d)
    with pytest.raises(UserError, match="profile and compile this checkpoint"):
        Runtime.load(fixture_model, plan=d, policy="plan")
