"""Predictions of a plan and of the baselines on a profile's trace: the compiler's search, its final prediction and
the report all replay through these functions (and so through `runtime.policy.plan_policy`), never their own copy.
"""
from __future__ import annotations

from artifacts.plan import PlanChoices
from artifacts.profile import Profile
from compiler.loss_model import LossModel
from compiler.simulator import Costs, SimResult, oracle_future, simulate
from runtime.policy.config import preset
from runtime.policy.plan_params import plan_policy, substitution_params
from runtime.policy.pools import Pools
from runtime.policy.slots import uniform_slots
from runtime.policy.static import most_frequent, static_pins

BASELINES = ("lru", "lfu", "lfru", "static", "smoe", "oracle")   # what a plan is compared with, in table order


def initial_residents(profile: Profile, slots: dict[int, int]) -> dict[int, list[int]]:
    """The most frequently routed experts of each layer start resident (ties to the lower id)."""
    return {l: most_frequent(profile.frequency[l], n) for l, n in slots.items()}


def simulate_plan(profile: Profile, slots: dict[int, int], choices: PlanChoices, subs_map: dict[int, dict],
                  costs: Costs, tokens: int, loss_model: LossModel | None,
                  initial: dict[int, list[int]] | None = None, pools: Pools | None = None) -> SimResult:
    """Replay the trace under a plan: its slots (or precision pools), initial residents (default: the most
    frequent), and choices."""
    policy, params = plan_policy(choices, profile.moe_layers, subs_map)
    return simulate(profile.trace, profile.moe_layers, profile.num_experts, profile.top_k, slots, policy, params,
                    costs, initial=initial if initial is not None else initial_residents(profile, slots),
                    error=profile.substitution_error, tokens=tokens, loss_model=loss_model, pools=pools)


def simulate_baseline(profile: Profile, name: str, total_slots: int, window: int, host_compute: bool, costs: Costs,
                      tokens: int, loss_model: LossModel | None) -> SimResult:
    """Replay the trace under a named policy (one of BASELINES) with `total_slots` spread evenly over the layers.

    lru, lfu, lfru and smoe start empty; static starts with the profile's most frequent experts pinned
    (runtime.policy.static; the frequencies come from the same calibration text as the trace, so its prediction is
    in-sample, as the plan's initial residents are); oracle is Belady's MIN over these very tokens, starting with each
    layer's first requested experts (the best start, uncounted like the others' initial residents), so no lossless
    policy that serves every pair from its cache makes fewer loads. `host_compute`: whether the target's host is
    another processor; the policies that split misses between loads and the host (smoe, static) then do."""
    layers = profile.moe_layers
    slots = uniform_slots(total_slots, layers, profile.num_experts)
    policy = preset(name, window=window, host_compute=host_compute and preset(name).host_compute)
    pinned = static_pins(profile.frequency, slots) if policy.pins else None
    future = oracle_future(profile.trace, layers, profile.top_k, tokens) if policy.eviction == "belady" else None
    return simulate(profile.trace, layers, profile.num_experts, profile.top_k, slots, policy,
                    substitution_params(policy, layers), costs, error=profile.substitution_error, tokens=tokens,
                    loss_model=loss_model, pinned=pinned, future=future,
                    initial=future.first_requested(slots) if future is not None else None)
