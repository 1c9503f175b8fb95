"""Which cached expert to evict.

lru:    the candidate used least recently (ties: lowest id).
score:  SMoE's rule: the candidate with the lowest mean gate score over the last n decode steps, counting the
        scores of inactive experts too, so that good substitutes stay resident:
            victim = argmin_{e in candidates} (1/n) * sum_{t in last n steps} s_t(e)
Experts selected for the layer being computed are pinned by the caller (never candidates).
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Mapping


def lru_victim(candidates: Iterable[int], last_used: Mapping[int, int]) -> int:
    return min(candidates, key=lambda e: (last_used.get(e, -1), e))


def score_victim(candidates: Iterable[int], mean_score: Mapping[int, float]) -> int:
    return min(candidates, key=lambda e: (mean_score.get(e, 0.0), e))


class ScoreWindow:
    """Mean gate score of every expert over the last n steps (a ring of per-step score vectors)."""

    def __init__(self, num_experts: int, n: int):
        self.n, self.e = n, num_experts
        self._steps: deque[list[float]] = deque(maxlen=n)
        self._sum = [0.0] * num_experts

    def push(self, step_scores: list[float]) -> None:
        if len(self._steps) == self.n:
            old = self._steps[0]
            for e in range(self.e):
                self._sum[e] -= old[e]
        self._steps.append(step_scores)
        for e in range(self.e):
            self._sum[e] += step_scores[e]

    def mean(self) -> dict[int, float]:
        m = max(len(self._steps), 1)
        return {e: self._sum[e] / m for e in range(self.e)}
