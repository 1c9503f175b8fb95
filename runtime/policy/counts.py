"""Counters of what a cache served, per (token, routed expert) pair; sums, so they add across layers and runs.

  hits         served by the expert itself from the cache
  understudies served by a cached stand-in, by reason: band, similarity, batch
  misses       the expert itself, loaded on demand;  host: computed on the host;  drops: left out
  (every pair is exactly one of these: pairs = hits + understudies + misses + host + drops)
  quantized    of the pairs computed from the cache (hits, misses, understudies), those a quantized copy computed,
               by scheme (a precision plan's pools; runtime.policy.pools)
  loads        expert copies into the cache, demand and prefetch (prefetch_issued of them), everywhere: in a
               layer's schedule, the runtime's statistics and the simulator's result;  prefetch_used: prefetched
               experts that were then used
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Counts:
    pairs: int = 0
    hits: int = 0
    misses: int = 0
    host: int = 0
    drops: int = 0
    understudies: dict[str, int] = field(default_factory=lambda: {"band": 0, "similarity": 0, "batch": 0})
    loads: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    quantized: dict[str, int] = field(default_factory=dict)

    def add(self, other: "Counts") -> None:
        """Add the counters `other` shares with this one (a subclass may carry more)."""
        if type(other) is Counts:                   # a schedule's counts (once per layer call in a replay)
            self.add_pairs(other)
            self.loads += other.loads
            self.prefetch_issued += other.prefetch_issued
            return
        mine = self.__dataclass_fields__            # (dataclasses.fields() per call is slow on the replay path)
        for name in other.__dataclass_fields__:
            if name not in mine:
                continue
            v = getattr(other, name)
            if isinstance(v, dict):
                mine_d = getattr(self, name)
                for r, n in v.items():
                    mine_d[r] = mine_d.get(r, 0) + n
            elif isinstance(v, (int, float)):
                setattr(self, name, getattr(self, name) + v)

    def add_pairs(self, other: "Counts") -> None:
        """Add `other`'s pair counters and prefetch_used, not its loads (the runtime counts loads as it issues them)."""
        self.pairs += other.pairs
        self.hits += other.hits
        self.misses += other.misses
        self.host += other.host
        self.drops += other.drops
        self.prefetch_used += other.prefetch_used
        for mine, theirs in ((self.understudies, other.understudies), (self.quantized, other.quantized)):
            for r, n in theirs.items():
                mine[r] = mine.get(r, 0) + n

    @property
    def served(self) -> int:
        return self.hits + sum(self.understudies.values())

    def rates(self) -> dict[str, float]:
        """Shares of pairs that add up to 1: exact hit, understudy, drop, host, miss (hit_rate = exact + understudy)."""
        n = max(self.pairs, 1)
        return {"exact_hit_rate": self.hits / n, "substitution_rate": sum(self.understudies.values()) / n,
                "drop_rate": self.drops / n, "host_rate": self.host / n, "miss_rate": self.misses / n}

    def precision_mix(self, native: str) -> dict[str, float]:
        """Shares of the pairs an expert computed (all but drops) by the precision that computed them: `native`
        (the checkpoint's format: exact copies and host computes) and each quantization scheme; they add to 1."""
        computed = self.pairs - self.drops
        q = sum(self.quantized.values())
        n = max(computed, 1)
        return {native: (computed - q) / n, **{s: v / n for s, v in sorted(self.quantized.items())}}
