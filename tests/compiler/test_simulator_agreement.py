"""The compiler's simulator and the runtime agree: same tokens, same cache decisions, same hits and loads."""
import numpy as np
import pytest
import torch

from compiler.compile_plan import CompileConfig, compile_plan
from compiler.simulator import Costs, simulate
from helpers import DATA
from profiler.profile_model import ProfileConfig, profile
from runtime import Runtime
from runtime.policy.config import preset
from runtime.policy.plan_params import substitution_params
from runtime.policy.slots import resolve_slots
from runtime.policy.static import static_pins


@pytest.fixture(scope="module")
def fixture_profile(fixture_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("agree")
    p = profile(fixture_model, str(DATA / "calib.jsonl"), ProfileConfig(quant_tokens=0,
                                                                        samples=3, seq_len=96, probe_tokens=256),
                progress=False)
    p.save(d / "profile")
    return d / "profile", p


def _runtime_stats(model, prof, **kw):
    tokens = prof.trace["token"].reshape(-1, 96).astype(np.int64)
    with Runtime.load(model, **kw) as rt:
        for row in tokens:
            rt.teacher_force(torch.from_numpy(row)[None])
        return rt.stats.to_dict()


@pytest.mark.parametrize("policy", ["lru", "smoe", "plan"])
def test_simulator_matches_runtime(policy, fixture_model, fixture_profile, tmp_path):
    path, prof = fixture_profile
    layers, e, k = prof.moe_layers, prof.num_experts, prof.top_k
    if policy == "plan":
        plan = compile_plan(path, CompileConfig(budget="25%", search_tokens=96), log=lambda *a: None)
        plan.save(tmp_path / "plan")
        measured = _runtime_stats(fixture_model, prof, policy="plan", plan=tmp_path / "plan")
        predicted = plan.predicted["plan"]
    else:
        slots = resolve_slots("25%", layers, e)
        pol = preset(policy, host_compute=False)
        predicted = simulate(prof.trace, layers, e, k, slots, pol, substitution_params(pol, layers),
                             Costs.of(None, {})).to_dict()
        measured = _runtime_stats(fixture_model, prof, policy=policy, cache="25%")
    assert measured["decode_positions"] == predicted["tokens"] == 288
    assert abs(measured["hit_rate"] - predicted["hit_rate"]) <= 0.01, (measured["hit_rate"], predicted["hit_rate"])
    # loads as a rate per routed (token, expert) pair, like the hit rate: within 0.01 absolute. Lossy policies change
    # the hidden states and so the routing the runtime sees, while the trace holds the exact model's routing; the
    # plan substitutes or drops ~13% of pairs here, so its loads drift most (~1.5% relative)
    pairs_per_token = len(layers) * k
    assert abs(measured["loads_per_token"] - predicted["loads_per_token"]) / pairs_per_token <= 0.01, (
        measured["loads_per_token"], predicted["loads_per_token"])


@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru", "static"])
def test_lossless_baselines_agree_decision_for_decision(policy, fixture_model, fixture_profile):
    """In float32, the profile's precision, the runtime routes exactly as the trace does, so a lossless policy's
    cache makes the very same decisions in both: equal hits, misses and loads. At 50% (8 slots per layer, top-4)
    the rules have choices to make."""
    path, prof = fixture_profile
    layers, e, k = prof.moe_layers, prof.num_experts, prof.top_k
    slots = resolve_slots("50%", layers, e)
    pol = preset(policy, host_compute=False)
    pinned = static_pins(prof.frequency, slots) if pol.pins else None
    predicted = simulate(prof.trace, layers, e, k, slots, pol, substitution_params(pol, layers), Costs.of(None, {}),
                         pinned=pinned)
    measured = _runtime_stats(fixture_model, prof, policy=policy, cache="50%", dtype="float32",
                              profile=path if pol.pins else None)
    assert measured["policy"] == policy and measured["decode_positions"] == predicted.tokens == 288
    assert (measured["hits"], measured["misses"], measured["loads"]) == (predicted.hits, predicted.misses,
                                                                        predicted.loads)
    assert measured["host"] == measured["drops"] == 0 and measured["pairs"] == predicted.pairs
