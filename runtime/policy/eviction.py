"""Which cached expert to evict: one pure rule per policy, over the candidates (the layer's cached experts that this
call no longer needs and that are not pinned by the static policy: the cache model filters them) and per-layer
bookkeeping the cache model keeps.

Notation, per MoE layer: c = the layer's call counter (one tick per layer call, i.e. per decode step at batch 1);
last(e) = the call in which e was last used (-1: never); u(e) = the calls that used e since it was last loaded
(reset to 0 by every load, prefetch included; an initial resident starts at 0).

lru:    the candidate used least recently:            victim = argmin_e (last(e), e)
score:  SMoE's rule: the lowest mean gate score over the last n decode steps, counting the scores of inactive
        experts too, so that good substitutes stay resident:
            victim = argmin_e ((1/n) * sum_{t in last n steps} s_t(e), e)
lfu:    in-cache LFU, the classic "least frequently used" of a slot cache: the fewest uses since it was loaded
        (perfect LFU would keep counts across evictions; in-cache LFU forgets an evicted expert, as a slot cache
        does); ties to the least recently used, then the lower id:
            victim = argmin_e (u(e), last(e), e)
lfru:   frequency over age, the LFRU of the vLLM expert-cache PR (#37190, from its author's tinyserve,
        `LFRUPolicy`: freq / (clock - last_access + 1), freq counted from the load):
            victim = argmin_e (u(e) / (c - last(e) + 1), last(e), e)
        A recently loaded expert used once (1 / 2) outlives one used 10 times but 30 calls ago (10 / 31); a hot
        expert's count keeps it across short gaps, where LRU would drop it.
belady: Belady's MIN with bypass, for the simulator's oracle only (it reads the future). After a layer call the
        cache holds the slots_l experts, of those cached and those the call requests, whose next request comes
        soonest (ties: lower id); the others are evicted (once computed, if the call needs them), and a missing
        expert that is not kept streams through a one-expert workspace instead of a slot (a bypass):
            keep = the slots_l smallest (next(e), e) over e in cached | requested,
            next(e) = min {c' > c : e requested at call c'} (inf: never again)
        Every miss costs one load whatever is kept, so keeping the soonest-needed is optimal (Belady 1966; with
        bypass, the same exchange argument), and since the oracle may do anything a slot cache can (stream a call's
        experts through a slot one after another, as static does, or hold them together) and bypass besides, no
        lossless policy that computes every expert on the device loads less or, loading only on demand, hits more.
"""
from __future__ import annotations

import bisect
from collections import deque
from typing import Callable, Iterable, Mapping, Sequence

INF = float("inf")


Key = Callable[[int], tuple]     # an expert's eviction key: the least is evicted first


def lru_key(last_used: Mapping[int, int]) -> Key:
    return lambda e: (last_used.get(e, -1), e)


def lfu_key(uses: Mapping[int, int], last_used: Mapping[int, int]) -> Key:
    return lambda e: (uses.get(e, 0), last_used.get(e, -1), e)


def lfru_score(uses: int, last: int, now: int) -> float:
    """u / (c - last + 1): uses since the load over the age in layer calls."""
    return uses / (now - last + 1)


def lfru_key(uses: Mapping[int, int], last_used: Mapping[int, int], now: int) -> Key:
    return lambda e: (lfru_score(uses.get(e, 0), last_used.get(e, -1), now), last_used.get(e, -1), e)


def lru_victim(candidates: Iterable[int], last_used: Mapping[int, int]) -> int:
    return min(candidates, key=lru_key(last_used))


def score_victim(candidates: Iterable[int], mean_score: Sequence[float]) -> int:
    """argmin (mean_score[e], e); two passes without a key tuple per candidate (it runs per eviction)."""
    cands = list(candidates)
    vals = [mean_score[e] for e in cands]
    low = min(vals)
    return min(e for e, v in zip(cands, vals) if v == low)


def lfu_victim(candidates: Iterable[int], uses: Mapping[int, int], last_used: Mapping[int, int]) -> int:
    return min(candidates, key=lfu_key(uses, last_used))


def lfru_victim(candidates: Iterable[int], uses: Mapping[int, int], last_used: Mapping[int, int], now: int) -> int:
    return min(candidates, key=lfru_key(uses, last_used, now))


def belady_victim(candidates: Iterable[int], next_use: Mapping[int, float], last_used: Mapping[int, int]) -> int:
    """Of the experts Belady's rule does not keep, the one needed last leaves first."""
    return min(candidates, key=lambda e: (-next_use.get(e, INF), last_used.get(e, -1), e))


class NextUse:
    """The future of a request sequence, per layer: when each expert is next requested (Belady's oracle).

    requests[layer][c - 1] = the experts requested at the layer's call c (calls count from 1, as the cache model's
    counter does)."""

    def __init__(self, requests: Mapping[int, Sequence[Iterable[int]]]):
        self._calls: dict[int, dict[int, list[int]]] = {}          # layer -> expert -> the calls requesting it
        for l, seq in requests.items():
            calls: dict[int, list[int]] = {}
            for c, experts in enumerate(seq, start=1):
                for e in sorted(set(experts)):
                    calls.setdefault(e, []).append(c)
            self._calls[l] = calls

    def next_use(self, layer: int, expert: int, now: int) -> float:
        """The first call after `now` that requests `expert` (inf: never again)."""
        calls = self._calls[layer].get(expert, [])
        i = bisect.bisect_right(calls, now)
        return calls[i] if i < len(calls) else INF

    def keep(self, layer: int, experts: Iterable[int], now: int, n: int) -> list[int]:
        """Belady's choice: the n of `experts` whose next request after call `now` comes soonest (ties: lower id)."""
        return sorted(experts, key=lambda e: (self.next_use(layer, e, now), e))[:n]

    def first_requested(self, slots: Mapping[int, int]) -> dict[int, list[int]]:
        """Per layer the slots[l] experts requested first (ties: lower id): Belady's choice before the first call,
        with every expert free to take, so no start of that size does better."""
        return {l: self.keep(l, self._calls[l], 0, n) for l, n in slots.items()}


class ScoreWindow:
    """Mean gate score of every expert over the last n steps: a ring of sparse per-step scores and their running sum.

    A step is {e: s_t(e)} for the experts with a score (the others score 0). push: sum[e] -= the oldest step's s(e)
    for its experts (when n are held), then sum[e] += this step's s(e) for its experts, in that order; mean[e] =
    sum[e] / (steps held). Sparse, a push costs the steps' sizes, not E: once n steps are held the divisor stays n,
    and only the experts of the two steps get a new mean (the same quotient `mean` would compute for every one)."""

    def __init__(self, num_experts: int, n: int):
        self.n, self.e = n, num_experts
        self._steps: deque[Mapping[int, float]] = deque(maxlen=n)
        self._sum = [0.0] * num_experts                # [E] sum of the held steps' scores
        self._mean: list[float] | None = None          # [E] made on first read after a push (read per victim)
        self._touched: list[Mapping[int, float]] = []  # the steps pushed and dropped since `_mean` was made

    def push(self, step: Mapping[int, float]) -> None:
        total = self._sum
        full = len(self._steps) == self.n
        if full:
            old = self._steps[0]
            for e, s in old.items():
                total[e] -= s
        self._steps.append(step)
        for e, s in step.items():
            total[e] += s
        if not full or self._mean is None or len(self._touched) >= 2 * self.n:   # the divisor moves, no means yet,
            self._mean, self._touched = None, []       # or unread for a window: all of them, on read
        else:
            self._touched += (old, step)

    def mean(self) -> list[float]:
        """[E] the mean score of every expert over the held steps."""
        m = max(len(self._steps), 1)
        if self._mean is None:
            self._mean = [s / m for s in self._sum]
        elif self._touched:
            mean, total = self._mean, self._sum
            for step in self._touched:
                for e in step:
                    mean[e] = total[e] / m
            self._touched = []
        return self._mean
