"""Non-uniform slot allocation: give each next slot to the layer where the simulated marginal gain is largest.

  gain_l(s) = hits_l(s + 1) - hits_l(s)     (hits + understudies of layer l alone, replaying the trace)
Start from one slot per layer and add slots greedily until the budget's total is spent (optimal when the curves are
concave, which LRU-like caches' hit curves are in practice).
"""
from __future__ import annotations

from compiler.simulator import Costs, simulate
from runtime.policy.config import PolicyConfig
from runtime.policy.substitution import SubstitutionParams


def layer_trace(trace: dict, m: int) -> dict:
    keep = ("ids", "scores", "coef", "pred_ids", "pred_scores")
    return {k: (v[:, m:m + 1] if k in keep else v) for k, v in trace.items()}


def hit_curves(trace: dict, moe_layers: list[int], num_experts: int, top_k: int, policy: PolicyConfig,
               params: dict[int, SubstitutionParams], max_slots: int, tokens: int) -> dict[int, list[int]]:
    """hits_l(s) for s = 0..max_slots, each layer replayed alone (no cross-layer prefetch)."""
    from dataclasses import replace

    alone = replace(policy, prefetch=False, host_compute=False)
    curves = {}
    for m, l in enumerate(moe_layers):
        lt = layer_trace(trace, m)
        curve = [0]
        for s in range(1, max_slots + 1):
            r = simulate(lt, [l], num_experts, top_k, {l: s}, alone, {l: params[l]}, Costs.of(None, {}), tokens=tokens)
            curve.append(r.hits + sum(r.understudies.values()))
            if s >= num_experts:
                break
        curves[l] = curve
    return curves


def allocate_slots(curves: dict[int, list[int]], total: int, num_experts: int) -> dict[int, int]:
    layers = list(curves)
    slots = {l: 1 for l in layers}
    left = total - len(layers)
    while left > 0:
        best, gain = None, -1
        for l in layers:
            s = slots[l]
            if s >= num_experts:
                continue
            c = curves[l]
            g = (c[s + 1] - c[s]) if s + 1 < len(c) else 0
            if g > gain:
                best, gain = l, g
        if best is None:
            break
        slots[best] += 1
        left -= 1
    return slots
