"""Cache sizes: slots per layer from a user's `--cache` (a count or a share of routed-expert bytes)."""
from __future__ import annotations

import math
from typing import Sequence

from artifacts.errors import UserError
from artifacts.units import parse_percent


def uniform_slots(total: int, layers: Sequence[int], num_experts: int) -> dict[int, int]:
    """`total` slots spread evenly over `layers` (the first layers take the remainder), at most E per layer."""
    base, extra = divmod(total, len(layers))
    return {l: min(num_experts, base + (1 if n < extra else 0)) for n, l in enumerate(layers)}


def resolve_slots(cache: int | str | None, moe_layers: Sequence[int], num_experts: int) -> dict[int, int]:
    """Slots per layer for `cache`: an int (slots in every layer) or "P%" (P% of all routed experts, spread evenly)."""
    if cache is None:
        raise UserError("an offloading policy needs a cache size: --cache N (slots per layer) or --cache P% "
                        "(share of routed-expert bytes), or a plan (--plan)")
    layers = list(moe_layers)
    pct = parse_percent(cache, "cache") if isinstance(cache, str) else None
    if pct is not None:
        total = math.floor(pct / 100 * num_experts * len(layers) + 1e-9)
        if total < len(layers):
            need = math.ceil(10000 / num_experts) / 100
            raise UserError(f"cache {cache} holds {total} experts, fewer than one per MoE layer; use at least {need:g}%")
        return uniform_slots(total, layers, num_experts)
    try:
        n = int(cache)
    except (TypeError, ValueError):
        raise UserError(f"cannot read cache {cache!r}; write a slot count (8) or a percentage (25%)") from None
    if not 1 <= n <= num_experts:
        raise UserError(f"cache of {n} slots per layer is outside 1..{num_experts} (the layer's experts)")
    return {l: n for l in layers}
