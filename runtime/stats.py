"""Run statistics: what the cache served, what moved, and how long it took.

Counted per (token, routed expert) pair at each MoE layer call:
  hit          served by the expert itself from the device cache (resident, or arrived by prefetch)
  understudy   served by a cached stand-in, by reason: band (SMoE score band), similarity (profile), batch
               (another token's top-score expert)
  miss         the expert itself, loaded on demand
  host         the expert itself, computed on the host
  drop         left out (the plan allows it when its measured loss cost beats loading)
hit_rate = (hit + understudy) / pairs. loads = expert copies into the cache (demand + prefetch), bytes = their bytes.
precision_mix: shares of the computed pairs by the precision that computed them (a precision plan's quantized copies;
else all at the checkpoint's format).
Per-token figures are per decode position (one row, one step); prompt prefill is counted apart.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from runtime.policy.counts import Counts


@dataclass
class LayerCounters(Counts):
    """The cache model's counts plus what only execution measures."""

    load_bytes: int = 0
    stall_s: float = 0.0
    copy_s: float = 0.0         # copying experts on the compute thread (inline loads: CPU, no link; runtime.loader)


@dataclass
class RunStats:
    """Counters of the decode phase (`layers`) and of prompt prefill (`prefill_layers`), kept apart: a prefill batch
    touches most experts at once and would hide the decode-time behaviour of the cache."""

    layers: dict[int, LayerCounters] = field(default_factory=dict)
    prefill_layers: dict[int, LayerCounters] = field(default_factory=dict)
    phase: str = "decode"
    decode_positions: int = 0      # (row, step) positions run by decode forward passes
    prompt_tokens: int = 0
    tokens: int = 0                 # generated tokens (all rows)
    ttft_s: float = 0.0
    step_s: list[float] = field(default_factory=list)   # decode step times after the first token
    cache_capacity_bytes: int = 0
    peak_cache_bytes: int = 0
    policy: str = ""
    native: str = "native"          # the checkpoint's expert format (the precision mix's name for exact copies)

    def layer(self, l: int) -> LayerCounters:
        layers = self.prefill_layers if self.phase == "prefill" else self.layers
        c = layers.get(l)
        if c is None:
            c = layers[l] = LayerCounters()
        return c

    def total(self, prefill: bool = False) -> LayerCounters:
        t = LayerCounters()
        for c in (self.prefill_layers if prefill else self.layers).values():
            t.add(c)
        return t

    def reset(self) -> None:
        keep = (self.cache_capacity_bytes, self.policy, self.native)
        self.__init__()
        self.cache_capacity_bytes, self.policy, self.native = keep
        self.phase = "decode"

    @property
    def tpot_s(self) -> float:
        return sum(self.step_s) / len(self.step_s) if self.step_s else 0.0

    def to_dict(self, per_layer: bool = False) -> dict:
        t = self.total()
        served = t.served
        pairs = max(t.pairs, 1)
        steps = max(self.decode_positions, 1)
        p = self.total(prefill=True)
        d = {"policy": self.policy, "prompt_tokens": self.prompt_tokens, "tokens": self.tokens,
             "pairs": t.pairs, "hits": t.hits, "misses": t.misses, "host": t.host, "drops": t.drops,
             "understudies": dict(t.understudies), "loads": t.loads, "bytes_loaded": t.load_bytes,
             "prefetch_issued": t.prefetch_issued, "prefetch_used": t.prefetch_used,
             "stall_s": round(t.stall_s, 6), "inline_copy_s": round(t.copy_s, 6), "hit_rate": served / pairs, **t.rates(),
             "precision_mix": t.precision_mix(self.native),
             "loads_per_token": t.loads / steps,
             "bytes_per_token": t.load_bytes / steps, "ttft_ms": self.ttft_s * 1e3, "tpot_ms": self.tpot_s * 1e3,
             "cache_capacity_bytes": self.cache_capacity_bytes, "peak_cache_bytes": self.peak_cache_bytes,
             "decode_positions": self.decode_positions,
             "prefill": {"pairs": p.pairs, "hits": p.hits, "misses": p.misses, "loads": p.loads,
                         "bytes_loaded": p.load_bytes, "stall_s": round(p.stall_s, 6)}}
        if per_layer:
            d["layers"] = {str(l): asdict(c) for l, c in sorted(self.layers.items())}
        return d

    def summary(self) -> str:
        d = self.to_dict()
        u = d["understudies"]
        quantized = {k: v for k, v in d["precision_mix"].items() if k != self.native and v > 0}
        mix = (", quantized copies computed " + ", ".join(f"{v:.0%} of pairs ({k})" for k, v in quantized.items())
               if quantized else "")
        return (f"[{d['policy']}] {d['tokens']} tokens | hit rate {d['hit_rate']:.1%} "
                f"(understudies {sum(u.values())}: band {u['band']}, similarity {u['similarity']}, batch {u['batch']}; "
                f"drops {d['drops']}; host {d['host']}) | loads {d['loads']} ({d['loads_per_token']:.2f}/token, "
                f"{d['bytes_loaded'] / 2**20:.1f} MiB){mix}, prefetch {d['prefetch_used']}/{d['prefetch_issued']} used | "
                f"stalled {d['stall_s'] * 1e3:.0f} ms | TTFT {d['ttft_ms']:.0f} ms, TPOT {d['tpot_ms']:.1f} ms | "
                f"cache peak {d['peak_cache_bytes'] / 2**20:.1f} of {d['cache_capacity_bytes'] / 2**20:.1f} MiB")
