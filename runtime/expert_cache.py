"""The device expert cache: preallocated slots per layer, and which expert sits in which slot.

Mechanism only: the executor decides what to load and what to evict. Every slot is allocated once, at start (its
tensors 64-byte aligned; its own allocation, or a row of its layer's, below), with the shapes and dtypes of one expert
as the store holds it (`ExpertStore.specs`:
float tensors, or a quantized checkpoint's packed ones), so bytes on the device never exceed `capacity_bytes` =
slots x expert bytes. Where the checkpoint keeps each expert's tensors back to back (`ExpertStore.flat_layout`), a
slot is one buffer and its tensors are views of it in the file's order, so a load is one copy, not one per tensor.

A layer's slots of the checkpoint's format (all of them, or with pools pool 0's) are rows of one allocation when a
row keeps the 64-byte alignment (every real model's): slot s is row s, and `stacks[layer]` views the same bytes as
one tensor per key, [slots, *shape] (e.g. gate_up [S, 2I, H], down [S, H, I]), so a call with several tokens
computes the cached experts it needs in one grouped matmul over the slots (runtime.offload_executor) instead of one
small matmul pair per expert.

With a precision plan's pools (runtime.policy.pools) a layer's slots are split by precision:
pool p's slots are allocated with that precision's tensors (`pool_specs[p]`) and hold only experts of pool p, so
  capacity_bytes = sum over layers and pools of slots(l, p) x bytes(p).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from runtime.formats import TensorSpec, carve
from runtime.policy.pools import Pools


class Slot(dict):
    """One slot's tensors by key. `flat`: the one uint8 buffer they are views of, in the store's `flat_layout` (so an
    expert lands in one copy), or None (a tensor each)."""

    __slots__ = ("flat",)

    def __init__(self, tensors: Mapping[str, torch.Tensor], flat: torch.Tensor | None = None):
        super().__init__(tensors)
        self.flat = flat


def _rows(specs: Mapping[str, TensorSpec], n: int, device: torch.device,
          flat: Sequence[tuple[str, int]] | None = None) -> tuple[list[Slot], dict[str, torch.Tensor]] | None:
    """n slots as the rows of one allocation and, per key, the [n, *shape] view of every slot's tensor; None where a
    row would lose the 64-byte alignment `_slot` gives (BLAS rounds differently on misaligned operands): a slot's
    bytes (flat: its keys start at 64-byte multiples) or, a stack per key, a key's bytes not a 64-byte multiple."""
    nbytes = sum(s.nbytes for s in specs.values())
    if n == 0 or nbytes % 64 or (flat is None and any(s.nbytes % 64 for s in specs.values())):
        return None
    if flat is None:                     # a tensor per key, stacked: slot s's tensors are row s of each
        stacks = {k: torch.empty((n, *s.shape), dtype=s.dtype, device=device) for k, s in specs.items()}
        return [Slot({k: v[i] for k, v in stacks.items()}) for i in range(n)], stacks
    buf = torch.empty((n, nbytes), dtype=torch.uint8, device=device)         # [n, bytes], one row per slot
    stacks, at = {}, 0
    for k, m in flat:
        stacks[k] = buf[:, at:at + m].view(specs[k].dtype).unflatten(1, specs[k].shape)   # [n, *shape]
        at += m
    return [Slot(carve(buf[i], flat, specs), buf[i]) for i in range(n)], {k: stacks[k] for k in specs}


def _slot(specs: Mapping[str, TensorSpec], device: torch.device,
          flat: Sequence[tuple[str, int]] | None = None) -> Slot:
    """A slot's tensors: each its own (64-byte aligned) tensor, or views of one buffer laid out as `flat` (keys and
    bytes in order; the store checked that every key starts at a 64-byte multiple)."""
    if flat is None:
        return Slot({k: torch.empty(s.shape, dtype=s.dtype, device=device) for k, s in specs.items()})
    buf = torch.empty(sum(n for _, n in flat), dtype=torch.uint8, device=device)
    return Slot(carve(buf, flat, specs), buf)


class ExpertCache:
    def __init__(self, specs: Mapping[str, TensorSpec], slots: dict[int, int], device: torch.device,
                 pools: Pools | None = None, pool_specs: Sequence[Mapping[str, TensorSpec]] | None = None,
                 flat: Sequence[tuple[str, int]] | None = None):
        """`flat`: the store's `flat_layout` (slots as one buffer each; not with pools), or None."""
        self.slots = dict(slots)
        self.pools = pools
        specs_of = list(pool_specs) if pools is not None else [specs]
        per_pool = ({l: pools.slots[l] for l in slots} if pools is not None else {l: (n,) for l, n in slots.items()})
        self._bytes = [sum(s.nbytes for s in sp.values()) for sp in specs_of]          # bytes per expert, per pool
        flat = flat if pools is None else None
        self.stacks: dict[int, dict[str, torch.Tensor]] = {}   # layer -> key -> every pool-0 slot's [slots, *shape]
        self._buf: dict[tuple[int, int], list[Slot]] = {}
        for l, ns in per_pool.items():
            for p, n in enumerate(ns):
                rows = _rows(specs_of[p], n, device, flat) if p == 0 else None      # the native format's
                if rows is not None:
                    self._buf[(l, p)], self.stacks[l] = rows
                else:
                    self._buf[(l, p)] = [_slot(specs_of[p], device, flat) for _ in range(n)]
        self.expert_bytes = self._bytes[0]                                        # bytes (the native format)
        self.capacity_bytes = sum(n * self._bytes[p] for ns in per_pool.values() for p, n in enumerate(ns))
        self.where: dict[int, dict[int, int]] = {l: {} for l in slots}        # layer -> expert -> slot in its pool
        self.held: dict[int, dict[int, dict[str, torch.Tensor]]] = {l: {} for l in slots}   # layer -> expert -> its slot
        self._free = {key: list(range(len(b)))[::-1] for key, b in self._buf.items()}
        self.used_bytes = 0
        self.peak_bytes = 0

    def allocated_bytes(self) -> int:
        """Bytes of the storage behind every slot (each allocation once): what the cache holds on the device."""
        seen: dict[tuple[torch.device, int], int] = {}
        for slots in self._buf.values():
            for slot in slots:
                for t in slot.values():
                    st = t.untyped_storage()
                    seen[(t.device, st.data_ptr())] = st.nbytes()
        return sum(seen.values())

    def _pool(self, layer: int, expert: int) -> int:
        return 0 if self.pools is None else self.pools.of[layer][expert]

    def bytes_of(self, layer: int, expert: int) -> int:
        """Bytes a slot of this expert's pool holds."""
        return self._bytes[self._pool(layer, expert)]

    def weights(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return self._buf[(layer, self._pool(layer, expert))][self.where[layer][expert]]

    def assign(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Claim a free slot of the expert's pool; returns its tensors to load into."""
        key = (layer, self._pool(layer, expert))
        slot = self._free[key].pop()
        self.where[layer][expert] = slot
        self.used_bytes += self._bytes[key[1]]
        if self.used_bytes > self.peak_bytes:
            self.peak_bytes = self.used_bytes
        w = self.held[layer][expert] = self._buf[key][slot]
        return w

    def replace(self, layer: int, victim: int, expert: int) -> dict[str, torch.Tensor]:
        """`evict(victim)` then `assign(expert)` in one step: the expert takes the victim's slot (bytes held
        unchanged) when both belong to one pool (always without pools); returns its tensors to load into."""
        if self.pools is not None and self._pool(layer, victim) != self._pool(layer, expert):
            self.evict(layer, victim)
            return self.assign(layer, expert)
        where, held = self.where[layer], self.held[layer]
        where[expert] = where.pop(victim)
        w = held[expert] = held.pop(victim)
        return w

    def evict(self, layer: int, expert: int) -> None:
        slot = self.where[layer].pop(expert)
        del self.held[layer][expert]
        p = self._pool(layer, expert)
        self._free[(layer, p)].append(slot)
        self.used_bytes -= self._bytes[p]
