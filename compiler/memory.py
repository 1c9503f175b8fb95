"""Memory accounting: what a budget leaves for the expert cache.

  absolute budget B:  cache = B - dense - kv - workspace,   kv = kv_bytes_per_token * context * batch
  percentage P%:      cache = P% of all routed-expert bytes (the dense part is not counted)
  auto:               an absolute budget from the device's free memory (compiler.auto_budget)
slots_total = floor(cache / expert_bytes); at least one slot per MoE layer is required.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from artifacts.errors import UserError
from artifacts.units import human_bytes, parse_bytes, parse_percent
from compiler.targets import Target


@dataclass(frozen=True)
class MemorySplit:
    kind: str                 # "percent" | "bytes"
    budget: float             # percent, or bytes
    dense_bytes: int
    kv_bytes: int
    workspace_bytes: int
    cache_bytes: int          # bytes the expert cache may hold
    expert_bytes: int
    total_slots: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def describe(self) -> str:
        if self.kind == "percent":
            return (f"budget {self.budget:g}% of routed-expert bytes: cache {human_bytes(self.cache_bytes)} = "
                    f"{self.total_slots} experts of {human_bytes(self.expert_bytes)}")
        return (f"budget {human_bytes(self.budget)} = dense {human_bytes(self.dense_bytes)} + KV "
                f"{human_bytes(self.kv_bytes)} + workspace {human_bytes(self.workspace_bytes)} + cache "
                f"{human_bytes(self.total_slots * self.expert_bytes)} ({self.total_slots} experts of "
                f"{human_bytes(self.expert_bytes)})")


def outside_cache(model: dict, target: Target, batch: int, context: int) -> tuple[int, int, int]:
    """What an absolute budget holds besides the expert cache: (dense weights, KV cache, workspace) bytes."""
    dense = int(model["dense_bytes"])
    kv = int(model.get("kv_bytes_per_token", 0)) * context * batch
    return dense, kv, int(target.workspace)


def split_budget(budget: str, model: dict, target: Target, batch: int, context: int) -> MemorySplit:
    layers = len(model["moe_layers"])
    expert = int(model["expert_bytes"])
    routed = int(model["routed_expert_bytes"])
    text = str(budget).strip()
    pct = parse_percent(text, "budget")
    if pct is not None:
        cache = int(routed * pct / 100)
        slots = math.floor(pct / 100 * (routed // expert) + 1e-9)     # as the runtime's --cache P% counts
        if slots < layers:
            need = math.ceil(10000 * layers / (routed // expert)) / 100
            raise UserError(f"budget {budget} holds {slots} experts, fewer than one per MoE layer ({layers}); "
                            f"use --budget {need:g}% or more")
        return MemorySplit("percent", pct, 0, 0, 0, cache, expert, slots)
    total = parse_bytes(text, "budget", unit_required=True)
    dense, kv, workspace = outside_cache(model, target, batch, context)
    fixed = dense + kv + workspace
    minimum = fixed + layers * expert
    if total < minimum:
        raise UserError(f"budget {human_bytes(total)} is below the {human_bytes(minimum)} needed for dense weights "
                        f"({human_bytes(dense)}) + KV cache for {context} tokens x {batch} ({human_bytes(kv)}) + "
                        f"workspace ({human_bytes(target.workspace)}) + one expert per MoE layer; "
                        f"try --budget {math.ceil(minimum / 2**20)}MiB")
    if total > target.device_memory:
        raise UserError(f"budget {human_bytes(total)} exceeds the target {target.name}'s "
                        f"{human_bytes(target.device_memory)}; lower --budget or pick another --target")
    cache = total - fixed
    slots = min(cache // expert, routed // expert)
    return MemorySplit("bytes", total, dense, kv, target.workspace, cache, expert, slots)
