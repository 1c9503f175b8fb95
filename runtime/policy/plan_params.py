"""Per-layer substitution parameters of a policy, from a plan's substitution map when the policy is `plan`."""
from __future__ import annotations

from typing import Mapping, Sequence

from runtime.policy.config import PolicyConfig
from runtime.policy.substitution import SubstitutionParams


def substitution_params(policy: PolicyConfig, moe_layers: Sequence[int], subs_map: Mapping[int, Mapping] | None = None,
                        tau: float = 1.0) -> dict[int, SubstitutionParams]:
    """subs_map: per layer {"substitutes": {i: [(j, similarity, error), ...]}, "protected": [...], "drop_ok": [...]}.
    Similarity understudies are those of error <= tau; drops are allowed only with a score band (alpha > 0)."""
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
            drop_ok=frozenset(layer.get("drop_ok", [])) if policy.alpha > 0 else frozenset())
    return out
