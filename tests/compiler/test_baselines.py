"""The baselines in the simulator: on a routing trace the oracle (Belady's MIN) bounds every lossless policy where a
layer call's experts fit in its slots; moe-compile predicts and prints every baseline at the plan's budget."""
import numpy as np
import pytest

from compiler.predict import BASELINES
from compiler.simulator import Costs, oracle_future, simulate
from runtime.policy.config import preset
from runtime.policy.plan_params import substitution_params
from runtime.policy.static import static_pins

E, K, W, LAYERS = 16, 4, 8, [0, 1]


def synthetic_trace(tokens: int = 400, seed: int = 0) -> dict:
    """Skewed routing with topic drift: each token draws from a popularity that shifts every 50 tokens."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((tokens, len(LAYERS), W), dtype=np.int64)
    scores = np.zeros((tokens, len(LAYERS), W), dtype=np.float32)
    for m in range(len(LAYERS)):
        base = rng.dirichlet(np.full(E, 0.3))
        for t in range(tokens):
            if t % 50 == 0:
                topic = rng.dirichlet(np.full(E, 0.3))
            p = 0.5 * base + 0.5 * topic
            pick = rng.choice(E, size=W, replace=False, p=p)
            s = np.sort(rng.random(W))[::-1] + 1e-3
            ids[t, m], scores[t, m] = pick, s / s.sum()
    return {"ids": ids, "scores": scores, "coef": np.ones((tokens, len(LAYERS)), dtype=np.float32)}


def run(trace: dict, name: str, per_layer: int):
    slots = {l: per_layer for l in LAYERS}
    pol = preset(name, host_compute=False, lossless=True)
    freq = {l: np.bincount(trace["ids"][:, m, :K].ravel(), minlength=E) for m, l in enumerate(LAYERS)}
    future = oracle_future(trace, LAYERS, K) if name == "oracle" else None
    return simulate(trace, LAYERS, E, K, slots, pol, substitution_params(pol, LAYERS), Costs.of(None, {}),
                    pinned=static_pins(freq, slots) if name == "static" else None, future=future,
                    initial=future.first_requested(slots) if future else None)


@pytest.mark.parametrize("per_layer", [K, 6, 8, 12])
def test_oracle_bounds_every_lossless_policy(per_layer):
    trace = synthetic_trace()
    oracle = run(trace, "oracle", per_layer)
    assert oracle.pairs == 400 * len(LAYERS) * K and oracle.understudies == {"band": 0, "similarity": 0, "batch": 0}
    for name in ("lru", "lfu", "lfru", "static"):                     # demand loading: more loads, fewer hits
        r = run(trace, name, per_layer)
        assert r.loads >= oracle.loads and r.hit_rate <= oracle.hit_rate, (name, r.loads, oracle.loads)
    smoe = run(trace, "smoe", per_layer)                               # lossless smoe prefetches: more loads still
    assert smoe.loads >= oracle.loads and smoe.drops == 0
    if per_layer > K:                                                  # real choices: the rules differ
        assert len({run(trace, n, per_layer).loads for n in ("lru", "lfu", "lfru", "oracle")}) > 1


def test_lfru_and_lfu_are_not_lru():
    trace = synthetic_trace(seed=1)
    loads = {n: run(trace, n, 8).loads for n in ("lru", "lfu", "lfru")}
    assert loads["lfu"] != loads["lru"] and loads["lfru"] != loads["lru"]




def test_compile_predicts_and_prints_every_baseline(tiny_profile, tmp_path, capsys):
    from artifacts import Plan
    from compiler.cli import main

    capsys.readouterr()
    assert main([str(tiny_profile), "--budget", "50%", "-o", str(tmp_path / "plan"), "--search-tokens", "64"]) == 0
    out = capsys.readouterr().out
    p = Plan.load(tmp_path / "plan").predicted
    assert set(p) >= {"plan", *BASELINES}
    for name in BASELINES:
        d = p[name]
        assert {"hit_rate", "loads_per_token", "tpot_ms"} <= set(d)
        assert any(line.split()[:1] == [name] and f"{d['loads_per_token']:.2f}" in line for line in out.splitlines())
    for name in ("lru", "lfu", "lfru", "static", "oracle"):          # lossless by construction
        assert p[name]["substitution_rate"] == p[name]["drop_rate"] == 0.0
    # 8 experts, top-2, 50%: 4 slots per layer >= k, so the oracle is the bound of the demand-loading ones
    for name in ("lru", "lfu", "lfru", "static"):
        assert p["oracle"]["loads_per_token"] <= p[name]["loads_per_token"]
        assert p["oracle"]["hit_rate"] >= p[name]["hit_rate"]
