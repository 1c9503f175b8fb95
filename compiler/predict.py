"""Predictions of a plan and of the baselines on a profile's trace: the compiler's search, its final prediction and
the report all replay through these functions (and so through `runtime.policy.plan_policy`), never their own copy.
"""
from __future__ import annotations

from artifacts.plan import PlanChoices
from artifacts.profile import Profile
from compiler.loss_model import LossModel
from compiler.simulator import Costs, SimResult, simulate
from runtime.policy.config import preset
from runtime.policy.plan_params import plan_policy, substitution_params
from runtime.policy.slots import uniform_slots


def initial_residents(profile: Profile, slots: dict[int, int]) -> dict[int, list[int]]:
    """The most frequently routed experts of each layer start resident (ties to the lower id)."""
    out = {}
    for l, n in slots.items():
        f = profile.frequency[l]
        out[l] = sorted(range(profile.num_experts), key=lambda e: (-f[e], e))[:n]
    return out


def simulate_plan(profile: Profile, slots: dict[int, int], choices: PlanChoices, subs_map: dict[int, dict],
                  costs: Costs, tokens: int, loss_model: LossModel | None,
                  initial: dict[int, list[int]] | None = None) -> SimResult:
    """Replay the trace under a plan: its slots, initial residents (default: the most frequent), and choices."""
    policy, params = plan_policy(choices, profile.moe_layers, subs_map)
    return simulate(profile.trace, profile.moe_layers, profile.num_experts, profile.top_k, slots, policy, params,
                    costs, initial=initial if initial is not None else initial_residents(profile, slots),
                    error=profile.substitution_error, tokens=tokens, loss_model=loss_model)


def simulate_baseline(profile: Profile, name: str, total_slots: int, window: int, host_compute: bool, costs: Costs,
                      tokens: int, loss_model: LossModel | None) -> SimResult:
    """Replay the trace under a named policy (lru, smoe) with `total_slots` spread evenly and an empty start."""
    layers = profile.moe_layers
    policy = preset(name, window=window, host_compute=host_compute if name == "smoe" else False)
    return simulate(profile.trace, layers, profile.num_experts, profile.top_k,
                    uniform_slots(total_slots, layers, profile.num_experts), policy,
                    substitution_params(policy, layers), costs, error=profile.substitution_error, tokens=tokens,
                    loss_model=loss_model)
