"""A plan's choices become the runtime's policy here, and only here (`plan_policy`): the runtime, the compiler's
search and simulator, and the report all call it, so a plan means the same thing everywhere; its precision map
becomes the cache's pools in `plan_pools`, for all of them alike.

Per-layer substitution parameters (`substitution_params`) come from the plan's substitution map for policy `plan`:
near-twins j of i with profiled error err(i, j) <= tau, the protected experts, and the experts whose low-score
misses may be dropped (only when the plan chose drops and has a score band, alpha > 0).
"""
from __future__ import annotations

from typing import Mapping, Sequence

from artifacts.plan import PlanChoices
from runtime.policy.config import PolicyConfig, preset
from runtime.policy.pools import Pools
from runtime.policy.substitution import SubstitutionParams


def plan_policy(choices: PlanChoices, moe_layers: Sequence[int], subs_map: Mapping[int, Mapping] | None,
                lossless: bool = False, **overrides) -> tuple[PolicyConfig, dict[int, SubstitutionParams]]:
    """(policy, per-layer substitution parameters) of a plan; `overrides` (e.g. alpha, host_compute from a CLI flag)
    replace the plan's values; `lossless` forces alpha = 0."""
    fields = {"alpha": choices.alpha, "pool_depth": choices.pool_depth, "window": choices.window,
              "prefetch": choices.prefetch, "prefetch_max": choices.prefetch_max,
              "host_compute": choices.host_compute, "eviction": choices.eviction,
              "understudy_weight": choices.understudy_weight}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    cfg = preset("plan", lossless=lossless, **fields)
    return cfg, substitution_params(cfg, moe_layers, subs_map, choices.tau, drops=choices.drop_misses)


def substitution_params(policy: PolicyConfig, moe_layers: Sequence[int], subs_map: Mapping[int, Mapping] | None = None,
                        tau: float = 1.0, drops: bool = True) -> dict[int, SubstitutionParams]:
    """subs_map: per layer {"substitutes": {i: [(j, similarity, error), ...]}, "protected": [...], "drop_ok": [...]}.
    Similarity understudies are those of error <= tau; drops are allowed only when `drops` and a score band
    (alpha > 0)."""
    out = {}
    for l in moe_layers:
        if subs_map is None or policy.name != "plan":
            out[l] = SubstitutionParams(alpha=policy.alpha, use_batch=policy.use_batch, pool_depth=policy.pool_depth)
            continue
        layer = subs_map.get(l, {})
        subs = layer.get("substitutes", {})
        out[l] = SubstitutionParams(
            alpha=policy.alpha, use_batch=policy.use_batch, by_error=True, pool_depth=policy.pool_depth,
            similar={i: [(j, err) for j, _, err in v if err <= tau] for i, v in subs.items()},
            error={i: {j: err for j, _, err in v} for i, v in subs.items()},
            protected=frozenset(layer.get("protected", [])),
            drop_ok=frozenset(layer.get("drop_ok", [])) if drops and policy.alpha > 0 else frozenset())
    return out


def plan_pools(precision: Mapping | None, moe_layers: Sequence[int], expert_bytes: int) -> Pools | None:
    """A plan's precision map (Plan.precision) as the cache's pools (runtime.policy.pools); None without one."""
    if precision is None:
        return None
    names = (precision["native"], *precision["schemes"])
    nbytes = (expert_bytes, *(int(d["expert_bytes"]) for d in precision["schemes"].values()))
    layers = {int(l): d for l, d in precision["layers"].items()}
    return Pools.build(names, nbytes, {l: layers[l]["experts"] for l in moe_layers},
                       {l: layers[l]["slots"] for l in moe_layers})
