"""Which searched candidate a plan takes: pure, over the candidates' predicted metrics.

Each candidate is a dict with at least `tpot_ms` (modeled), `hit_rate` and the error metric (`ppl_increase`, the
predicted perplexity increase, or `relative_error`, the output-error proxy). The limit applies to `bound`: the
metric itself, or the upper end of its interval (`ppl_high`) where the profile gives one, so that a plan keeps
the limit unless the profile's measurement was off by more than its own noise says.
  tpot target R:   the least error among candidates with tpot_ms <= R, then the most hits (none: the fastest);
  max error E:     the most hits among candidates with error <= E, then the least TPOT;
  neither:         error <= the default limit, then the least TPOT; candidates within TPOT_TIE of it are ties,
                   won by the most hits, then the least error.
With no candidate under the limit, the first (lossless) candidate is the fallback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

TPOT_TIE = 0.01   # relative


@dataclass(frozen=True)
class Objective:
    metric: str                          # "ppl_increase" | "relative_error"
    limit: float                         # the error limit (explicit --max-error, or the default)
    tpot_target_ms: float | None = None
    most_hits: bool = False              # --max-error given: the most hits within it
    bound: str | None = None             # the candidate figure the limit applies to (None: the metric)

    def choose(self, candidates: Sequence[dict]) -> tuple[dict, str]:
        """(the chosen candidate, a description of the objective that chose it)."""
        m = self.metric
        if self.tpot_target_ms is not None:
            ok = [c for c in candidates if c["tpot_ms"] <= self.tpot_target_ms]
            if ok:
                return (min(ok, key=lambda c: (c[m], -c["hit_rate"], c["tpot_ms"])),
                        f"least {m} with modeled TPOT <= {self.tpot_target_ms:g} ms")
            return (min(candidates, key=lambda c: (c["tpot_ms"], c[m])),
                    f"no candidate meets TPOT <= {self.tpot_target_ms:g} ms: the fastest")
        b = self.bound or m
        ok = [c for c in candidates if c[b] <= self.limit] or [candidates[0]]
        if self.most_hits:
            return (max(ok, key=lambda c: (c["hit_rate"], -c["tpot_ms"], -c[m])),
                    f"most hits with {b} <= {self.limit:g}")
        fastest = min(c["tpot_ms"] for c in ok)
        near = [c for c in ok if c["tpot_ms"] <= (1 + TPOT_TIE) * fastest]
        return (max(near, key=lambda c: (c["hit_rate"], -c[m], -c["tpot_ms"])),
                f"least modeled TPOT with {b} <= {self.limit:g} (default trade-off)")

    def best_n(self, candidates: Sequence[dict], n: int) -> list[dict]:
        """The n candidates this objective ranks first (chosen one at a time)."""
        pool, out = list(candidates), []
        while pool and len(out) < n:
            best, _ = self.choose(pool)
            out.append(best)
            pool = [c for c in pool if c is not best]
        return out
