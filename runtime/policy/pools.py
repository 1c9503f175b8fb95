"""Cache pools: the slots of a layer split by the precision the experts in them are held at (a plan's precision map).

A precision plan holds each routed expert at one precision p (the checkpoint's own format, pool 0, or a weight-only
quantization scheme such as int8 or int4, runtime.quantize): expert e of layer l always lives in pool p(l, e), whose
slots are sized for p, and is evicted only by (and only to make room for) an expert of the same pool. Within a pool
the policy's eviction rule applies unchanged. Bytes held per layer:
  held_l = sum over pools p of slots(l, p) x bytes(p)           bytes(p): one expert at precision p
A run without a precision map is one pool per layer (all experts at the checkpoint's format), which is exactly the
cache every policy had before pools existed.
Pure: names, bytes and ids; the cache model (runtime.policy.schedule), the runtime's expert cache and the compiler's
simulator all read the same object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from artifacts.errors import UserError


@dataclass(frozen=True)
class Pools:
    names: tuple[str, ...]                   # pool index -> precision name; 0: the checkpoint's own format
    bytes: tuple[int, ...]                   # pool index -> bytes of one expert held at that precision
    of: Mapping[int, tuple[int, ...]]        # MoE layer -> [E] the pool of every expert
    slots: Mapping[int, tuple[int, ...]]     # MoE layer -> [P] slots of every pool (0 where no expert is in it)

    def pool(self, layer: int, e: int) -> int:
        return self.of[layer][e]

    def expert_bytes(self, layer: int, e: int) -> int:
        return self.bytes[self.of[layer][e]]

    def layer_bytes(self, layer: int) -> int:
        """held_l: bytes of layer `layer`'s slots."""
        return sum(n * b for n, b in zip(self.slots[layer], self.bytes))

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes(l) for l in self.slots)

    def total_slots(self, layer: int) -> int:
        return sum(self.slots[layer])

    def quantized(self, layer: int, e: int) -> str | None:
        """The scheme expert e is held at, or None at the checkpoint's own format."""
        p = self.of[layer][e]
        return self.names[p] if p else None

    @classmethod
    def build(cls, names: Sequence[str], nbytes: Sequence[int], experts: Mapping[int, Sequence[str]],
              slots: Mapping[int, Mapping[str, int]]) -> "Pools":
        """From a plan's precision map: per layer every expert's precision name and the slots per precision name.
        Every precision an expert of the layer is held at has at least one slot (else it could never be loaded)."""
        index = {n: i for i, n in enumerate(names)}
        of, sl = {}, {}
        for l, per_expert in experts.items():
            of[l] = tuple(index[n] for n in per_expert)
            sl[l] = tuple(int(slots[l].get(n, 0)) for n in names)
            for p in set(of[l]):
                if sl[l][p] < 1:
                    raise UserError(f"MoE layer {l} holds experts at {names[p]} but gives that precision no slot; "
                                    "re-run moe-compile")
        return cls(tuple(names), tuple(int(b) for b in nbytes), of, sl)


def native_slots(pools: Pools, cache_bytes: int) -> dict[int, int]:
    """Slots per layer for a lossless run of a precision plan: every expert at the checkpoint's format, each layer
    given what its pools' bytes hold at that format, floor(held_l / bytes(native)) (at least 1), within `cache_bytes`
    (a layer over it gives back a slot, the largest first)."""
    native = pools.bytes[0]
    out = {l: max(1, min(len(pools.of[l]), pools.layer_bytes(l) // native)) for l in pools.slots}
    while sum(out.values()) * native > cache_bytes:
        l = max(out, key=lambda k: (out[k], -k))
        if out[l] <= 1:
            raise UserError(f"a cache of {cache_bytes} B cannot hold one {pools.names[0]} expert per MoE layer; "
                            "re-run moe-compile with --precision off for a lossless plan")
        out[l] -= 1
    return out
