"""The lean cache model of the lossless slot caches (lru, lfu, lfru at alpha = 0): small state, few operations per
layer call.

It makes exactly the decisions `runtime.policy.schedule.CacheModel` makes for these policies (the reference; the
tests replay traces through both, op for op), without per-token dicts: with alpha = 0 every routed pair is exact,
nothing is substituted, dropped, prefetched, pinned or computed on the host, so one layer call is

  needed   = the distinct experts of chosen [T, k], ascending; n(e) = the pairs routed to e
  best(e)  = max over those pairs of the token's score of e     (the order of the misses)
  hits     = sum of n(e) over needed e resident at the start;  misses = the other pairs
  ops      = loads of the missing experts by (-best(e), e), each as soon as a slot can be freed without evicting an
             expert this call still needs (busy); the cached needed experts computed in ascending id, each freeing
             its slot (more loads may go); then every loaded expert computed in load order, freeing its slot
  victim   = the rule's least candidate (runtime.policy.eviction):
               lru  argmin (last(e), e)
               lfu  argmin (u(e), last(e), e)
               lfru argmin (u(e) / (c - last(e) + 1), last(e), e)
             over the resident experts that are not busy; a load resets u(e) to 0, last(e) survives an eviction
  after    : each needed expert still resident: last(e) = c, u(e) += 1

Keys do not change during a call (the clock c ticks once at its start; last and u move at its end, and a loaded
expert's u is 0 from its load), so the victims are the resident non-needed experts in key order (one sort), merged
with the experts freed by their compute (a small heap).

Direct calls: when the slots hold every needed expert (n <= slots, every call of a real cache at decode), every miss
is loaded at the start, its victim (if the cache is full) the next resident non-needed expert in key order; the ops
are then the loads, the cached experts' computes in ascending id and the loaded ones' in load order. Such a call is
returned as (cached, loads) without building ops, counts or decisions (built only when read). For lru the resident
experts are also kept in key order in an insertion-ordered dict (least recent first; the needed experts move to its
end in ascending id after each call, as (c, e) sorts them), so its victims are its first non-needed entries, no sort.
For lfu each resident expert's packed key is kept (it changes only when the expert is used, at a call's end), so its
victims are one C sort of the candidates by those keys; lfru's keys move with the clock and are made per call.

Why Python sets, lists and dicts, not numpy arrays: a decode call touches k (8) of E (128) experts, and a numpy call
costs microseconds of dispatch whatever its size; the array version made about 25 of them per call.

`make_cache_model` is the one place that chooses between this model, the lean model of the other policies
(runtime.policy.lean) and `CacheModel`.
"""
from __future__ import annotations

import heapq
from itertools import islice
from typing import Callable, Mapping, Sequence

import numpy as np

from runtime.policy.compiled import CompiledCacheModel, is_compiled
from runtime.policy.config import PolicyConfig
from runtime.policy.counts import Counts
from runtime.policy.lean import LeanCacheModel, is_lean
from runtime.policy.schedule import CacheModel, Scores
from runtime.policy.substitution import SubstitutionParams, TokenDecision, best_first

FAST_RULES = ("lru", "lfu", "lfru")
Op = tuple[str, int, int, "int | None"]


def is_fast(policy: PolicyConfig, params: Mapping[int, SubstitutionParams]) -> bool:
    """Whether `policy` is a lossless slot cache the lean model runs: lru, lfu or lfru by name and rule, alpha = 0
    (in the policy and in every layer's parameters), no prefetch, no host compute, no pinning."""
    return (policy.name in FAST_RULES and policy.eviction == policy.name and policy.alpha <= 0.0
            and all(p.alpha <= 0.0 for p in params.values())
            and not policy.prefetch and not policy.host_compute and not policy.pins)


def make_cache_model(slots: Mapping[int, int], num_experts: int, top_k: int, policy: PolicyConfig,
                     params: Mapping[int, SubstitutionParams], initial: Mapping[int, Sequence[int]] | None = None,
                     pinned: Mapping[int, Sequence[int]] | None = None, pools=None, **kw):
    """The cache model for `policy`: `FastCacheModel` for lossless lru/lfu/lfru with no pinned experts, no precision
    `pools` and no future (Belady); `CompiledCacheModel` (runtime.policy.compiled) for the score-evicting policies
    (smoe, plan) with no pools; else `LeanCacheModel` (runtime.policy.lean) for every policy but the oracle;
    else the reference `CacheModel`; with the same arguments (`pools` only when given)."""
    if is_fast(policy, params) and pinned is None and pools is None and kw.get("future") is None \
            and set(kw) <= {"future", "host_batch_max"}:
        return FastCacheModel(slots, num_experts, top_k, policy, params, initial=initial)
    if is_compiled(policy, params) and pinned is None and pools is None and kw.get("future") is None:
        kw.pop("future", None)
        return CompiledCacheModel(slots, num_experts, top_k, policy, params, initial=initial, **kw)
    if pools is not None:
        kw["pools"] = pools
    if kw.get("future") is None and is_lean(policy, params):
        kw.pop("future", None)
        return LeanCacheModel(slots, num_experts, top_k, policy, params, initial=initial, pinned=pinned, **kw)
    return CacheModel(slots, num_experts, top_k, policy, params, initial=initial, pinned=pinned, **kw)


class _LayerState:
    """One layer's cache state, over experts 0..E-1."""

    def __init__(self, num_experts: int, slots: int):
        self.slots = slots
        self.res: set[int] = set()                                 # resident experts
        self.last_used = [-1] * num_experts                        # [E] the call that last used e (-1: never)
        self.uses = [0] * num_experts                              # [E] calls using e since its load (lfu, lfru)
        self.calls = 0                                             # the clock c
        self.recency: dict[int, None] = {}                         # lru: the resident experts by (last, e)
        self.lfu_key = list(range(num_experts))                     # [E] lfu: `rule_key`'s packed key of e, kept
                                                                    # for the resident experts (set by `_after`)

    def sort_recency(self) -> None:
        last = self.last_used
        self.recency = dict.fromkeys(sorted(self.res, key=lambda e: (last[e], e)))


def rule_key(rule: str, st: _LayerState) -> Callable[[int], tuple | int]:
    """The eviction key of `rule` on this state (the least is evicted first). lru's and lfu's integer tuples are packed
    into one int that orders the same, (a, b, e) -> (a * 2^40 + b + 1) * 2^20 + e (b + 1 < 2^40 calls, e < 2^20)."""
    last, uses, c = st.last_used, st.uses, st.calls
    if rule == "lru":
        return lambda e: ((last[e] + 1) << 20) | e
    if rule == "lfu":
        return lambda e: (((uses[e] << 40) | (last[e] + 1)) << 20) | e
    return lambda e: (uses[e] / (c - last[e] + 1), last[e], e)


class FastSchedule:
    """`LayerSchedule`'s contract (decisions, ops, counts), with the per-token decisions (all exact), and for a direct
    call its ops and counts, built only when read.

    experts: ascending ids of the needed experts; pairs: the (token, expert) pairs routed to each; direct: the loads
    come first (`loads`: (expert, victim or None) in load order), then the computes of `cached` (ascending) and of the
    loaded experts (load order); hits, misses: pair counts."""

    __slots__ = ("experts", "pairs", "hits", "misses", "direct", "cached", "loads", "layer", "_chosen", "_ops")

    def __init__(self, chosen: np.ndarray, experts: list[int], pairs: list[int], hits: int,
                 ops: list[Op] | None = None, cached: list[int] | None = None,
                 loads: list[tuple[int, int | None]] | None = None, layer: int = 0):
        self.experts, self.pairs, self.hits, self.misses = experts, pairs, hits, chosen.size - hits
        self.direct = ops is None
        self.cached, self.loads, self.layer = cached, loads, layer
        self._chosen, self._ops = chosen, ops           # [T, k]

    @property
    def ops(self) -> list[Op]:
        if self._ops is None:
            l = self.layer
            self._ops = ([("load", l, e, v) for e, v in self.loads] + [("compute", l, e, None) for e in self.cached]
                         + [("compute", l, e, None) for e, _ in self.loads])
        return self._ops

    @property
    def counts(self) -> Counts:
        loads = len(self.loads) if self.direct else sum(op[0] == "load" for op in self._ops)
        return Counts(pairs=self._chosen.size, hits=self.hits, misses=self.misses, loads=loads)

    @property
    def decisions(self) -> list[TokenDecision]:
        return [TokenDecision(exact=c) for c in self._chosen.tolist()]


class _Victims:
    """The victims of one layer call in key order: the initial candidates sorted once, merged with the experts freed
    during the call (a heap keyed the same way)."""

    def __init__(self, st: _LayerState, rule: str, busy: set[int]):
        self.key = rule_key(rule, st)
        self.order = sorted((e for e in st.res if e not in busy), key=self.key)
        self.i = 0
        self.freed: list[tuple[tuple | int, int]] = []

    def free(self, e: int) -> None:
        heapq.heappush(self.freed, (self.key(e), e))

    def pop(self) -> int | None:
        if self.freed and (self.i >= len(self.order) or self.freed[0][0] < self.key(self.order[self.i])):
            return heapq.heappop(self.freed)[1]
        if self.i < len(self.order):
            self.i += 1
            return self.order[self.i - 1]
        return None


class FastCacheModel:
    """`CacheModel`'s contract for lossless lru/lfu/lfru, with small per-layer state (see the module doc)."""

    def __init__(self, slots: Mapping[int, int], num_experts: int, top_k: int, policy: PolicyConfig,
                 params: Mapping[int, SubstitutionParams], initial: Mapping[int, Sequence[int]] | None = None):
        assert is_fast(policy, params), f"policy {policy.name}: the fast cache model runs lossless lru/lfu/lfru only"
        self.e, self.k, self.policy, self.params = num_experts, top_k, policy, params
        self.rule = policy.eviction
        self.slots = dict(slots)
        self.layers = list(self.slots)
        self.state = {l: _LayerState(num_experts, n) for l, n in self.slots.items()}
        for l, st in self.state.items():
            for e in (initial or {}).get(l, ()):
                if len(st.res) < st.slots:
                    st.res.add(int(e))
            st.sort_recency()

    @property
    def resident(self) -> dict[int, set[int]]:
        """Per layer the resident experts (a fresh copy)."""
        return {l: set(st.res) for l, st in self.state.items()}

    def schedule(self, layer: int, rows: Sequence[Scores], chosen: Sequence[Sequence[int]],
                 prediction: Sequence[Scores] | None = None, c_load: float = 1.0, c_host: float = 1.0
                 ) -> FastSchedule:
        """`CacheModel.schedule`'s contract (rows: per token its top-W scores; prediction, c_load, c_host unused:
        no prefetch, no host compute)."""
        ids = np.asarray(chosen, dtype=np.int64).reshape(len(chosen), -1)   # [T, k]
        scores = np.array([[r.get(e, 0.0) for e in c] for r, c in zip(rows, ids.tolist())],
                          dtype=np.float64).reshape(ids.shape)                # [T, k]
        return self.schedule_arrays(layer, ids, scores=scores)

    def schedule_arrays(self, layer: int, chosen: np.ndarray, scores: np.ndarray | None = None,
                        table: Callable[[], np.ndarray] | None = None) -> FastSchedule:
        """One layer call from chosen [T, k] (expert ids) and either scores [T, k] (each chosen expert's score) or
        `table`, which returns every expert's score [T, E] (called only when two or more experts miss: the order of
        the misses)."""
        st = self.state[layer]
        st.calls += 1
        res = st.res
        rows = chosen.tolist()
        if len(rows) == 1:                                                 # one token: k distinct experts
            experts = sorted(rows[0])
            pairs = [1] * len(experts)
            cached = [e for e in experts if e in res]
            hits = len(cached)
        else:
            n_of: dict[int, int] = {}
            for row in rows:
                for e in row:
                    n_of[e] = n_of.get(e, 0) + 1
            experts = sorted(n_of)
            pairs = [n_of[e] for e in experts]
            cached = [e for e in experts if e in res]
            hits = sum(n_of[e] for e in cached)
        misses = [e for e in experts if e not in res] if len(cached) < len(experts) else []
        if len(misses) > 1:                                                # by (-best(e), e)
            if len(rows) == 1 and scores is None:                          # the token's score of each miss
                row = table()[0]                                           # [E]
                misses = best_first(misses, row.__getitem__)
            else:                        # best(e): the max over e's pairs (from 0 for a batch: scores are >= 0)
                miss = set(misses)
                best = dict.fromkeys(misses, 0.0 if len(rows) > 1 else float("-inf"))
                per_token = table() if scores is None else None            # [T, E]
                for t, row_ids in enumerate(rows):
                    sc = per_token[t] if per_token is not None else dict(zip(row_ids, scores[t].tolist()))
                    for e in row_ids:
                        if e in miss:
                            v = sc[e]
                            if v > best[e]:
                                best[e] = v
                misses = best_first(misses, best.__getitem__)
        if len(experts) > st.slots:                                        # a slot is freed by a compute: ops
            ops: list[Op] = []
            self._run(layer, st, experts, cached, misses, ops)
            self._after(st, [e for e in experts if e in res])
            if self.rule == "lru":
                st.sort_recency()
            return FastSchedule(chosen, experts, pairs, hits, ops=ops)
        loads: list[tuple[int, int | None]] = []
        lru = self.rule == "lru"
        if misses:
            free = st.slots - len(res)
            if len(misses) > free:
                victims = self._victims(st, experts, len(misses) - free)
                loads = [(e, None) for e in misses[:free]] + list(zip(misses[free:], victims))
                res.difference_update(victims)
                if lru:
                    for v in victims:
                        del st.recency[v]
            else:
                loads = [(e, None) for e in misses]
            res.update(misses)
            if not lru:
                uses = st.uses
                for e in misses:
                    uses[e] = 0
        if lru:                                  # key (c, e): the needed experts go last, in ascending id
            last, c, rec = st.last_used, st.calls, st.recency
            for e in experts:
                last[e] = c
                rec.pop(e, None)
                rec[e] = None
        else:
            self._after(st, experts)
        return FastSchedule(chosen, experts, pairs, hits, cached=cached, loads=loads, layer=layer)

    def _after(self, st: _LayerState, kept: list[int]) -> None:
        """The end of a call: each needed expert still resident was used at c (uses: read by lfu and lfru only); for
        lfu its packed key too. Every expert whose uses or last use changed and that stays resident is among `kept`
        (a load resets uses for an expert the call needs), so the resident experts' lfu keys are current."""
        last, uses, c = st.last_used, st.uses, st.calls
        if self.rule != "lfu":
            for e in kept:
                last[e] = c
                uses[e] += 1
            return
        key, base = st.lfu_key, (c + 1) << 20                 # ((u << 40) | (c + 1)) << 20 | e
        for e in kept:
            last[e] = c
            u = uses[e] = uses[e] + 1
            key[e] = (u << 60) | base | e

    def _victims(self, st: _LayerState, needed: list[int], m: int) -> list[int]:
        """The m resident experts not needed this call that the rule evicts first, in its key order."""
        busy = set(needed)
        if self.rule == "lru":
            return list(islice((v for v in st.recency if v not in busy), m))
        if self.rule == "lfu":                       # the kept keys, sorted in C
            return sorted(st.res - busy, key=st.lfu_key.__getitem__)[:m]
        last, uses, c = st.last_used, st.uses, st.calls   # lfru: `rule_key`'s keys in one comprehension, sorted in C
        keys = [(uses[e] / (c - last[e] + 1), last[e], e) for e in st.res - busy]
        keys.sort()
        return [key[2] for key in keys[:m]]

    def _run(self, layer: int, st: _LayerState, experts: list[int], cached: list[int], misses: list[int],
             ops: list[Op]) -> None:
        """The ops of a call with misses: loads as slots allow, cached computes, then the loaded experts' computes."""
        busy = set(experts)
        victims: _Victims | None = None
        q = 0                                                              # next miss to load
        res, uses = st.res, st.uses

        def issue(q: int, victims: _Victims | None) -> tuple[int, _Victims | None]:
            while q < len(misses):
                e, v = misses[q], None
                if len(res) >= st.slots:
                    if victims is None:
                        victims = _Victims(st, self.rule, busy)
                    v = victims.pop()
                    if v is None:
                        break
                    res.discard(v)
                    uses[v] = 0
                res.add(e)
                uses[e] = 0
                ops.append(("load", layer, e, v))
                q += 1
            return q, victims

        q, victims = issue(q, victims)
        for e in cached + misses:
            if e not in res:
                raise RuntimeError(f"layer {layer}: no slot can be freed for expert {e}")
            ops.append(("compute", layer, e, None))
            if q < len(misses):                                            # e is a candidate from now on
                if victims is None:
                    victims = _Victims(st, self.rule, busy)
                busy.discard(e)
                victims.free(e)
                q, victims = issue(q, victims)
