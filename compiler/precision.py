"""Precision plans: the precision the cache holds (and the link moves) each routed expert at, and the slots per
precision, under the byte budget.

Options. The profile measured, per MoE layer, importance class c (high, mid, low by I_e rank) and weight-only scheme
s (int8 per channel, int4 groups of 32; runtime.quantize), the loss of quantizing those experts
(profiler.quant_sensitivity). An option gives each class a precision: the checkpoint's own format ("native") or a
scheme, never fewer bits for a more important class:
  bits(high) >= bits(mid) >= bits(low)          10 options with {native, int8, int4} (one is all-native)
the same in every layer; expert e of layer l is held at the precision of its class.
Slots per (layer, pool): pools (runtime.policy.pools) are the precisions a layer's experts are held at. Each
nonempty pool starts with one slot; the next slot goes to the pool of the largest simulated gain per byte,
  gain(l, p, s) / bytes(p),   gain(l, p, s) = served_l(p: s + 1) - served_l(p: s)
(served = hits + understudies of layer l replayed alone, the layer's other pools holding all their experts), while
the bytes fit the cache: sum over (l, p) of slots x bytes(p) <= cache bytes. An option whose one slot per pool does
not fit is infeasible.
Each option is then replayed like any plan (compiler.predict.simulate_plan with the pools), its loss the profile's
measured cost of every pair a quantized copy computes (compiler.loss_model: `quant`), and chosen by the same
objective as the substitution rule (compiler.objective).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from artifacts.profile import Profile
from compiler.allocate import layer_trace
from compiler.simulator import Costs, simulate
from runtime.policy.config import PolicyConfig
from runtime.policy.pools import Pools
from runtime.policy.substitution import SubstitutionParams

NATIVE = "native"             # an option's name for the checkpoint's own format
CHOICES = ("off", "auto", "int8", "int4")   # moe-compile --precision: off (native only), auto (every scheme), or
                                            # the lowest precision allowed


@dataclass(frozen=True)
class PrecisionOption:
    classes: tuple[str, ...]           # precision of each importance class (high, mid, low): NATIVE or a scheme

    @property
    def name(self) -> str:
        return "/".join(self.classes)

    @property
    def native_only(self) -> bool:
        return all(c == NATIVE for c in self.classes)


def options(schemes: tuple[str, ...], bits: dict[str, int], n_classes: int, lowest: str) -> list[PrecisionOption]:
    """Every option whose precision never rises down the classes, from the schemes of at least `lowest`'s bits
    ("auto": all); the all-native option first."""
    floor = 0 if lowest == "auto" else bits[lowest]
    levels = [NATIVE] + sorted((s for s in schemes if bits[s] >= floor), key=lambda s: -bits[s])
    out: list[tuple[int, ...]] = [()]
    for _ in range(n_classes):
        out = [o + (i,) for o in out for i in range(len(levels)) if not o or i >= o[-1]]
    return [PrecisionOption(tuple(levels[i] for i in o)) for o in out]


def names_and_bytes(profile: Profile) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Pool names and bytes per expert: the checkpoint's own format first, then the profile's schemes."""
    model, q = profile.header["model"], profile.quant_sensitivity
    return ((str(model["checkpoint_dtype"]),) + q.schemes, (int(model["expert_bytes"]),) + tuple(q.expert_bytes))


def expert_precision(profile: Profile, option: PrecisionOption) -> dict[int, tuple[str, ...]]:
    """Per MoE layer, the precision name of every expert (its class's), as plans store it."""
    names, _ = names_and_bytes(profile)
    q = profile.quant_sensitivity
    name = {NATIVE: names[0], **{s: s for s in q.schemes}}
    return {l: tuple(name[option.classes[int(c)]] for c in q.expert_class[l]) for l in profile.moe_layers}


def allocate_pools(profile: Profile, option: PrecisionOption, cache_bytes: int, policy: PolicyConfig,
                   params: dict[int, SubstitutionParams], tokens: int,
                   curves_seen: dict | None = None) -> Pools | None:
    """Slots per (layer, pool) by simulated gain per byte (module docstring); None when one slot per pool does not
    fit in `cache_bytes`. A pool's curve depends only on its members (the layer's other experts are all resident),
    so `curves_seen` ({(layer, members): curve}, shared across options) replays each member set once."""
    curves_seen = {} if curves_seen is None else curves_seen
    names, nbytes = names_and_bytes(profile)
    per_expert = expert_precision(profile, option)
    index = {n: i for i, n in enumerate(names)}
    of = {l: tuple(index[n] for n in v) for l, v in per_expert.items()}
    members = {l: np.bincount(of[l], minlength=len(names)) for l in of}           # [P] experts per pool
    slots = {l: [1 if members[l][p] else 0 for p in range(len(names))] for l in of}
    left = cache_bytes - sum(s * b for l in of for s, b in zip(slots[l], nbytes))
    if left < 0:
        return None
    alone = replace(policy, prefetch=False, host_compute=False)
    curves: dict[tuple[int, int], list[int]] = {}

    def served(m: int, l: int, p: int, s: int) -> int:
        full = [int(n) for n in members[l]]
        full[p] = s
        pools = Pools(names, nbytes, {l: of[l]}, {l: tuple(full)})
        r = simulate(layer_trace(profile.trace, m), [l], profile.num_experts, profile.top_k, {l: sum(full)}, alone,
                     {l: params[l]}, Costs.of(None, {}), tokens=tokens, pools=pools)
        return r.hits + sum(r.understudies.values())

    for m, l in enumerate(profile.moe_layers):
        for p in range(len(names)):
            if members[l][p]:
                key = (l, tuple(e for e, q in enumerate(of[l]) if q == p))
                if key not in curves_seen:
                    curves_seen[key] = [0] + [served(m, l, p, s) for s in range(1, int(members[l][p]) + 1)]
                curves[(l, p)] = curves_seen[key]
    while True:
        best, best_gain = None, -1.0
        for (l, p), c in curves.items():
            s = slots[l][p]
            if s >= members[l][p] or nbytes[p] > left:
                continue
            g = (c[s + 1] - c[s]) / nbytes[p]
            if g > best_gain:
                best, best_gain = (l, p), g
        if best is None:
            break
        l, p = best
        slots[l][p] += 1
        left -= nbytes[p]
    return Pools(names, nbytes, of, {l: tuple(v) for l, v in slots.items()})


def pool_initial(profile: Profile, pools: Pools) -> dict[int, list[int]]:
    """Initial residents: per (layer, pool) its most frequently routed experts, as many as the pool has slots."""
    out = {}
    for l in profile.moe_layers:
        freq = profile.frequency[l]
        order = sorted(range(profile.num_experts), key=lambda e: (-float(freq[e]), e))
        taken = [0] * len(pools.names)
        out[l] = []
        for e in order:
            p = pools.of[l][e]
            if taken[p] < pools.slots[l][p]:
                taken[p] += 1
                out[l].append(e)
    return out
