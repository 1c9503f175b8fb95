"""Split a layer's misses between bus transfers and host computation (SMoE section 5, Fiddler's idea).

Misses sorted by score (highest first); the first n_load are loaded, the rest computed on the host:
    n_load* = argmin_{n in 0..N} max(n * C_load, (N - n) * C_host)
with C_load and C_host the measured mean seconds per expert load and per host expert computation.
"""
from __future__ import annotations

from collections import deque
from typing import Sequence


def split_misses(misses_by_score: Sequence[int], c_load: float, c_host: float) -> tuple[list[int], list[int]]:
    """(to load, to compute on host). Ties prefer loading (exact device compute, and the expert stays cached)."""
    n = len(misses_by_score)
    best = min(range(n + 1), key=lambda k: (max(k * c_load, (n - k) * c_host), -k))
    return list(misses_by_score[:best]), list(misses_by_score[best:])


class CostMeter:
    """Mean of the last p measurements of a cost (seconds), with a prior until the first one."""

    def __init__(self, p: int = 32, prior: float = 1e-3):
        self.p, self.prior = p, prior
        self._v: deque[float] = deque(maxlen=p)           # the last p measurements; older ones fall off
        self._mean: float | None = prior                  # value, until the next add (read twice per layer call)

    def add(self, seconds: float, n: int = 1) -> None:
        """n measurements of `seconds` each (a run of n copies timed as one span: its mean per copy)."""
        if n == 1:
            self._v.append(seconds)
        else:
            self._v.extend([seconds] * n)
        self._mean = None

    @property
    def value(self) -> float:
        if self._mean is None:
            self._mean = sum(self._v) / len(self._v)
        return self._mean
