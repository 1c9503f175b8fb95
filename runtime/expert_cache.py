"""The device expert cache: preallocated slots per layer, and which expert sits in which slot.

Mechanism only: the executor decides what to load and what to evict. Every slot is allocated once, at start, as
its own tensors (64-byte aligned) with the shapes and dtypes of one expert as the store holds it (`ExpertStore.specs`:
float tensors, or a quantized checkpoint's packed ones), so bytes on the device never exceed `capacity_bytes` =
slots x expert bytes.
"""
from __future__ import annotations

from typing import Mapping

import torch

from runtime.formats import TensorSpec


class ExpertCache:
    def __init__(self, specs: Mapping[str, TensorSpec], slots: dict[int, int], device: torch.device):
        self.slots = dict(slots)
        self._buf = {l: [{k: torch.empty(s.shape, dtype=s.dtype, device=device) for k, s in specs.items()}
                         for _ in range(n)] for l, n in slots.items()}
        self.expert_bytes = sum(s.nbytes for s in specs.values())                 # bytes
        self.capacity_bytes = self.expert_bytes * sum(slots.values())              # bytes
        self.where: dict[int, dict[int, int]] = {l: {} for l in slots}        # layer -> expert -> slot
        self._free: dict[int, list[int]] = {l: list(range(n))[::-1] for l, n in slots.items()}
        self.peak_bytes = 0

    def weights(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self._buf[layer][self.where[layer][expert]]

    def assign(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Claim a free slot for `expert`; returns its tensors to load into."""
        slot = self._free[layer].pop()
        self.where[layer][expert] = slot
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        return self._buf[layer][slot]

    def evict(self, layer: int, expert: int) -> None:
        slot = self.where[layer].pop(expert)
        self._free[layer].append(slot)

    @property
    def used_bytes(self) -> int:
        return self.expert_bytes * sum(len(w) for w in self.where.values())
