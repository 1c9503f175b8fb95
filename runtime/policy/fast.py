"""The lean cache model of the lossless slot caches (lru, lfu, lfru at alpha = 0): state in arrays, decisions over
arrays.

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

`make_cache_model` is the one place that chooses between this model and `CacheModel`.
"""
from __future__ import annotations

import heapq
from typing import Mapping, Sequence

import numpy as np

from runtime.policy.config import PolicyConfig
from runtime.policy.counts import Counts
from runtime.policy.schedule import CacheModel, LayerSchedule, Scores
from runtime.policy.substitution import SubstitutionParams, TokenDecision

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
    `pools` and no future (Belady), else `CacheModel` with the same arguments (`pools` only when given)."""
    if is_fast(policy, params) and pinned is None and pools is None and kw.get("future") is None \
            and set(kw) <= {"future", "host_batch_max"}:
        return FastCacheModel(slots, num_experts, top_k, policy, params, initial=initial)
    if pools is not None:
        kw["pools"] = pools
    return CacheModel(slots, num_experts, top_k, policy, params, initial=initial, pinned=pinned, **kw)


class _LayerState:
    """One layer's cache state, over experts 0..E-1."""

    def __init__(self, num_experts: int, slots: int):
        self.slots = slots
        self.resident = np.zeros(num_experts, dtype=bool)          # [E]
        self.last_used = np.full(num_experts, -1, dtype=np.int64)  # [E] the call that last used e (-1: never)
        self.uses = np.zeros(num_experts, dtype=np.int64)          # [E] calls using e since its load
        self.count = 0                                             # resident experts
        self.calls = 0                                             # the clock c


class FastSchedule(LayerSchedule):
    """A `LayerSchedule` whose per-token decisions (all exact) are built only when read.

    experts [n] ascending ids of the needed experts; pairs [n] the (token, expert) pairs routed to each."""

    def __init__(self, chosen: np.ndarray, ops: list[Op], counts: Counts, experts: np.ndarray, pairs: np.ndarray):
        self.ops, self.counts, self.experts, self.pairs = ops, counts, experts, pairs
        self._chosen = chosen           # [T, k]

    @property
    def decisions(self) -> list[TokenDecision]:
        return [TokenDecision(exact=c) for c in self._chosen.tolist()]


class _Victims:
    """The victims of one layer call in key order: the initial candidates sorted once, merged with the experts freed
    during the call (a heap keyed the same way)."""

    def __init__(self, st: _LayerState, rule: str, busy: np.ndarray):
        self.st, self.rule = st, rule
        cand = np.flatnonzero(st.resident & ~busy)                 # [m] resident, not needed this call
        last = st.last_used[cand]
        if rule == "lru":
            order = np.lexsort((cand, last))
        elif rule == "lfu":
            order = np.lexsort((cand, last, st.uses[cand]))
        else:
            order = np.lexsort((cand, last, st.uses[cand] / (st.calls - last + 1)))
        self.order: list[int] = cand[order].tolist()
        self.i = 0
        self.freed: list[tuple[tuple, int]] = []

    def key(self, e: int) -> tuple:
        st = self.st
        last = int(st.last_used[e])
        if self.rule == "lru":
            return (last, e)
        uses = int(st.uses[e])
        if self.rule == "lfu":
            return (uses, last, e)
        return (uses / (st.calls - last + 1), last, e)

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
    """`CacheModel`'s contract for lossless lru/lfu/lfru, with per-layer state in arrays (see the module doc)."""

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
                if st.count < st.slots and not st.resident[e]:
                    st.resident[e] = True
                    st.count += 1

    @property
    def resident(self) -> dict[int, set[int]]:
        """Per layer the resident experts (a fresh copy)."""
        return {l: set(np.flatnonzero(st.resident).tolist()) for l, st in self.state.items()}

    def schedule(self, layer: int, rows: Sequence[Scores], chosen: Sequence[Sequence[int]],
                 prediction: Sequence[Scores] | None = None, c_load: float = 1.0, c_host: float = 1.0
                 ) -> FastSchedule:
        """`CacheModel.schedule`'s contract (rows: per token its top-W scores; prediction, c_load, c_host unused:
        no prefetch, no host compute)."""
        ids = np.asarray(chosen, dtype=np.int64).reshape(len(chosen), -1)   # [T, k]
        scores = np.array([[r.get(e, 0.0) for e in c] for r, c in zip(rows, ids.tolist())],
                          dtype=np.float64).reshape(ids.shape)                # [T, k]
        return self.schedule_arrays(layer, ids, scores)

    def schedule_arrays(self, layer: int, chosen: np.ndarray, scores: np.ndarray) -> FastSchedule:
        """One layer call from chosen [T, k] (expert ids) and scores [T, k] (each chosen expert's score)."""
        st = self.state[layer]
        st.calls += 1
        flat = chosen.reshape(-1)                                          # [T*k]
        if chosen.shape[0] == 1:                                           # one token: k distinct experts
            order = np.argsort(flat, kind="stable")
            experts, pairs = flat[order], np.ones(len(flat), dtype=np.int64)
            best = scores.reshape(-1)[order].astype(np.float64)
        else:
            experts, inverse, pairs = np.unique(flat, return_inverse=True, return_counts=True)   # [n] ascending
            best = np.zeros(len(experts), dtype=np.float64)               # scores are >= 0
            np.maximum.at(best, inverse.reshape(-1), scores.reshape(-1))
        hit = st.resident[experts]                                         # [n]
        hits = int(pairs[hit].sum())
        counts = Counts(pairs=chosen.shape[0] * self.k, hits=hits, misses=int(flat.size) - hits)
        missing = experts[~hit]
        misses = missing[np.lexsort((missing, -best[~hit]))].tolist()    # by (-best, e)
        ops: list[Op] = []
        if misses:
            self._run(layer, st, experts, experts[hit].tolist(), misses, ops)
        else:
            ops = [("compute", layer, e, None) for e in experts.tolist()]
        counts.loads = len(misses)
        kept = experts[st.resident[experts]]
        st.last_used[kept] = st.calls
        st.uses[kept] += 1
        return FastSchedule(chosen, ops, counts, experts, pairs)

    def _run(self, layer: int, st: _LayerState, experts: np.ndarray, cached: list[int], misses: list[int],
             ops: list[Op]) -> None:
        """The ops of a call with misses: loads as slots allow, cached computes, then the loaded experts' computes."""
        busy = np.zeros(self.e, dtype=bool)
        busy[experts] = True
        victims: _Victims | None = None
        q = 0                                                              # next miss to load

        def issue(q: int, victims: _Victims | None) -> tuple[int, _Victims | None]:
            while q < len(misses):
                e, v = misses[q], None
                if st.count >= st.slots:
                    if victims is None:
                        victims = _Victims(st, self.rule, busy)
                    v = victims.pop()
                    if v is None:
                        break
                    st.resident[v] = False
                    st.uses[v] = 0
                    st.count -= 1
                st.resident[e] = True
                st.uses[e] = 0
                st.count += 1
                ops.append(("load", layer, e, v))
                q += 1
            return q, victims

        q, victims = issue(q, victims)
        for e in cached + misses:
            if not st.resident[e]:
                raise RuntimeError(f"layer {layer}: no slot can be freed for expert {e}")
            ops.append(("compute", layer, e, None))
            if q < len(misses):                                            # e is a candidate from now on
                if victims is None:
                    victims = _Victims(st, self.rule, busy)
                busy[e] = False
                victims.free(e)
                q, victims = issue(q, victims)
