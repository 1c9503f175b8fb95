"""The expert-cache budget a run honours, and the one line that states it.

The cache holds experts as the plan counted them (as the checkpoint stores them: its dtype, or packed for a quantized
checkpoint), whatever the compute dtype:
  capacity = sum over MoE layers of slots_l x expert_bytes(checkpoint's format)  <=  the plan's cache bytes,
or, with a precision plan's pools (runtime.policy.pools), sum over layers and precisions p of slots(l, p) x bytes(p).
A float32 run of a bf16 plan keeps its slots in bf16 and widens each expert into a workspace when it computes
(exact); an MXFP4 or fp8 checkpoint's slots hold packed bytes, dequantized into a workspace the same way. The bytes
held and the bytes moved are the plan's; nothing is re-sized behind the plan's back.
"""
from __future__ import annotations

from dataclasses import dataclass

from artifacts.units import human_bytes


@dataclass(frozen=True)
class CacheBudget:
    slots: int                  # cache slots, all MoE layers
    expert_bytes: int           # bytes of one expert as the cache holds it
    expert_dtype: str           # what the cache holds and the link moves: a dtype, or a packed format
    compute_dtype: str          # dtype experts compute in
    limit_bytes: int | None     # the most the cache may hold: the plan's cache budget (None: --cache given)
    source: str                 # where the size came from
    pools: tuple[tuple[str, int, int], ...] = ()   # precision plan: (precision, slots, bytes per expert) per pool

    @property
    def capacity_bytes(self) -> int:
        if self.pools:
            return sum(n * b for _, n, b in self.pools)
        return self.slots * self.expert_bytes

    def describe(self) -> str:
        limit = (f", within {self.source}'s {human_bytes(self.limit_bytes)}" if self.limit_bytes is not None
                 else f" ({self.source})")
        conv = "" if self.compute_dtype == self.expert_dtype else f"; computed in {self.compute_dtype}"
        held = (f"{self.slots} slots: " + " + ".join(f"{n} x {human_bytes(b)} ({p})" for p, n, b in self.pools)
                if self.pools else f"{self.slots} slots x {human_bytes(self.expert_bytes)} ({self.expert_dtype})")
        return f"expert cache: {held} = {human_bytes(self.capacity_bytes)}{limit}{conv}"
