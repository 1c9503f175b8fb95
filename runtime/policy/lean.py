"""The lean cache model of every policy that neither the lossless fast model (runtime.policy.fast) nor the compiled
model of the score-evicting policies (runtime.policy.compiled) runs and that does not read the future: plan with a
precision plan's pools, static (pinned experts), and lru/lfu/lfru with prefetch or host compute. It runs smoe and
plan as well (substitution, score eviction, prefetch, the host/transfer split), as the tests do.

It is `CacheModel` (the reference, runtime.policy.schedule), with the same state, and decides exactly as it does
(the tests replay random and recorded traces through both, op for op, with the plan's near-twins, protected experts,
drops, pool depth, pools and prefetch guard). Most calls are direct, every decode call of a real cache: the slots
free for the call's loads (free slots plus candidates, the resident experts the call does not need and that are not
pinned, per pool) hold all of its misses. Then:

  victims  = the rule's first m candidates in its key order, one sort: the keys do not change during a call (the
             clock and the score window move at its start, last use and uses at its end; a loaded expert is busy
             with use count 0)
               lru   (last(e), e)          lfu  (u(e), last(e), e)
               lfru  (u(e) / (c - last(e) + 1), last(e), e)              score (mean_n(e), e)
  prefetch = the next layer's predicted experts in (-score, e) order, each evicting that layer's next candidate in
             key order (with the guard: only one of lower mean score than the prediction)
  decide   = the substitution rule per token (runtime.policy.substitution) over the token's own top-W scores: with
             0 < alpha <= 1 the band's lower edge (1 - alpha) S(k+1) is >= 0, so an expert the token does not score
             (0) is never in it, and only the W scored experts are looked at, not every cached one; the band pool is
             built only for a token with a low-score miss
A call that is not direct (misses outnumber the free slots: a batch, or the compiler's search at a few slots per
layer) streams: loads as slots allow, then each compute frees its expert's slot for the next load, in the
reference's order; its victims are the candidates sorted once, merged with the experts freed during the call (a
heap by the same key, per pool).

Why Python sets and dicts, not arrays: as for the fast model, a call touches k of E experts, and each numpy call
costs microseconds of dispatch whatever its size.
"""
from __future__ import annotations

import heapq
from collections import Counter
from typing import Iterable, Mapping, Sequence

from runtime.policy.config import PolicyConfig
from runtime.policy.counts import Counts
from runtime.policy.eviction import lfru_key, lfu_key, lru_key
from runtime.policy.host_split import split_misses
from runtime.policy.schedule import CacheModel, LayerSchedule, Scores, step_scores
from runtime.policy.substitution import SubstitutionParams, TokenDecision, best_first, settle_miss


def is_lean(policy: PolicyConfig, params: Mapping[int, SubstitutionParams]) -> bool:
    """Whether the lean model runs `policy`: any rule but Belady's (the oracle reads the future), alpha <= 1 (in the
    policy and in every layer's parameters)."""
    return policy.eviction != "belady" and policy.alpha <= 1.0 and all(p.alpha <= 1.0 for p in params.values())


def decide_lean(rows: Sequence[Scores], chosen: Sequence[Sequence[int]], cached: set[int],
                params: SubstitutionParams) -> list[TokenDecision]:
    """`substitution.decide_layer`'s decisions (alpha <= 1), looking only at each token's scored experts."""
    if params.alpha <= 0.0:
        return [TokenDecision(exact=list(c)) for c in chosen]
    alpha = params.alpha
    edges = []                                                   # per token: S(k+1), its top-score experts
    for r, ch in zip(rows, chosen):
        vals = sorted(r.values(), reverse=True)
        s_next = vals[len(ch)] if len(vals) > len(ch) else 0.0
        hi = (1.0 + alpha) * s_next
        edges.append((s_next, {e for e in ch if r.get(e, 0.0) > hi}))
    if len(rows) > 1:                                            # experts in some token's top; in two or more
        count = Counter(e for _, top in edges for e in top)
        in_tops, in_two = set(count), {e for e, n in count.items() if n > 1}
    protected, use_batch = params.protected, params.use_batch
    out = []
    for r, ch, (s_next, top) in zip(rows, chosen, edges):
        # batch_top: the experts in another token's top, {e : count(e) - [e in top] > 0}, made when first read
        batch_top: set[int] | None = None
        hi = (1.0 + alpha) * s_next
        d = TokenDecision()
        out.append(d)
        pool = None
        used: set[int] = set()
        chosen_set = set(ch)
        for i in best_first(ch, lambda e: r.get(e, 0.0)):
            if r.get(i, 0.0) > hi or i in protected or i in cached:
                d.exact.append(i)
                continue
            if use_batch and batch_top is None:
                batch_top = in_tops - (top - in_two) if len(rows) > 1 else set()
            if use_batch and i in batch_top:
                d.exact.append(i)
                continue
            if pool is None:
                pool = _band(r, chosen_set, s_next, alpha, cached, batch_top if use_batch else (), params.pool_depth)
            settle_miss(d, i, pool, cached, used, chosen_set, params)
    return out


def _band(r: Scores, chosen_set: set[int], s_next: float, alpha: float, cached: set[int], batch_top,
          depth: int | None) -> list[int]:
    """E_s: the token's scored, unchosen experts with (1 - alpha) S < s <= S that are cached or batch-top, best
    score first (ties: lower id); with a pool depth, only among its `depth` best unchosen experts."""
    lo = (1.0 - alpha) * s_next
    pool = best_first((e for e, s in r.items() if e not in chosen_set and lo < s <= s_next
                       and (e in cached or e in batch_top)), r.__getitem__)
    if depth is not None and pool:
        allowed = set(best_first((e for e in r if e not in chosen_set), r.__getitem__)[:depth])
        pool = [e for e in pool if e in allowed]
    return pool


class _Victims:
    """A layer's victims for one call, per pool: its candidates (resident, not busy, not pinned) in the rule's key
    order, sorted once, merged with the experts a compute frees during the call (a heap by the same key)."""

    def __init__(self, order: list[int], key, pool_of: Sequence[int] | None, pinned: frozenset[int]):
        self.key, self.pool_of, self.pinned = key, pool_of, pinned
        if pool_of is None:
            self.by_pool = {0: order}
        else:
            self.by_pool: dict[int, list[int]] = {}
            for e in order:
                self.by_pool.setdefault(pool_of[e], []).append(e)
        self.next = dict.fromkeys(self.by_pool, 0)
        self.freed: dict[int, list[tuple[tuple, int]]] = {}

    def free(self, e: int) -> None:
        """e, computed, is no longer busy: a candidate from now on."""
        if e not in self.pinned:
            heapq.heappush(self.freed.setdefault(self.pool_of[e] if self.pool_of is not None else 0, []),
                           (self.key(e), e))

    def peek(self, pool: int) -> int | None:
        lst, i, h = self.by_pool.get(pool, ()), self.next.get(pool, 0), self.freed.get(pool)
        if h and (i >= len(lst) or h[0][0] < self.key(lst[i])):
            return h[0][1]
        return lst[i] if i < len(lst) else None

    def take(self, pool: int) -> None:
        """Remove what `peek(pool)` returned."""
        lst, i, h = self.by_pool.get(pool, ()), self.next.get(pool, 0), self.freed.get(pool)
        if h and (i >= len(lst) or h[0][0] < self.key(lst[i])):
            heapq.heappop(h)
        else:
            self.next[pool] = i + 1


class LeanCacheModel(CacheModel):
    """`CacheModel`'s decisions and state, made with less work (see the module doc)."""

    def __init__(self, slots: Mapping[int, int], num_experts: int, top_k: int, policy: PolicyConfig,
                 params: Mapping[int, SubstitutionParams], **kw):
        assert is_lean(policy, params) and kw.get("future") is None, f"policy {policy.name}: not a lean policy"
        super().__init__(slots, num_experts, top_k, policy, params, **kw)

    def _key(self, layer: int):
        """The eviction rule's key on this layer's state (the least is evicted first; runtime.policy.eviction)."""
        rule, last, uses = self.policy.eviction, self.last_used[layer], self.uses[layer]
        if rule == "score":
            mean = self.windows[layer].mean()
            return lambda e: (mean[e], e)
        if rule == "lru":
            return lru_key(last)
        if rule == "lfu":
            return lfu_key(uses, last)
        assert rule == "lfru", f"unknown eviction rule {rule!r}"
        return lfru_key(uses, last, self.calls[layer])

    def _sorted(self, layer: int, candidates: Iterable[int]) -> list[int]:
        """The candidates in `_key` order; score's key (mean_n(e), e) as two C sorts, by id, then stably by mean
        (no key tuple per candidate)."""
        if self.policy.eviction == "score":
            out = sorted(candidates)
            out.sort(key=self.windows[layer].mean().__getitem__)
            return out
        return sorted(candidates, key=self._key(layer))

    def _order(self, layer: int, busy) -> _Victims:
        pinned = self.pinned[layer]
        cands = self.resident[layer].difference(busy, pinned)           # resident, not busy, not pinned
        return _Victims(self._sorted(layer, cands), self._key(layer),
                        self.pools.of[layer] if self.pools is not None else None, pinned)

    def _direct(self, layer: int, to_load: list[int], busy: set[int]) -> bool:
        """Whether the slots free for this call's loads (free ones and candidates, per pool) hold all of them."""
        pools, resident, pinned = self.pools, self.resident[layer], self.pinned[layer]
        if pools is None:
            free = self.slots[layer] - len(resident)
            if len(to_load) <= free:
                return True
            kept = sum(e in resident for e in busy) + sum(e not in busy for e in pinned)   # not candidates
            return len(resident) - kept >= len(to_load) - free
        of = pools.of[layer]
        room = [n - h for n, h in zip(pools.slots[layer], self.held[layer])]    # [P] free slots
        for e in resident:
            if e not in busy and e not in pinned:
                room[of[e]] += 1
        for e in to_load:
            room[of[e]] -= 1
        return min(room) >= 0

    def _victims(self, layer: int, to_load: list[int], busy: set[int]) -> list[int | None]:
        """Per load of a direct call, in order, its victim (None: a free slot of its pool); no state changes."""
        pools, resident = self.pools, self.resident[layer]
        if pools is None:
            free = self.slots[layer] - len(resident)
            if len(to_load) <= free:
                return [None] * len(to_load)
            cands = resident.difference(busy, self.pinned[layer])
            return [None] * free + self._sorted(layer, cands)[:len(to_load) - free]
        of, slots, held = pools.of[layer], pools.slots[layer], list(self.held[layer])
        order, out = None, []
        for e in to_load:
            p = of[e]
            if held[p] < slots[p]:
                held[p] += 1
                out.append(None)
                continue
            if order is None:
                order = self._order(layer, busy)
            out.append(order.peek(p))
            order.take(p)
        return out

    def schedule(self, layer: int, rows: Sequence[Scores], chosen: Sequence[Sequence[int]],
                 prediction: Sequence[Scores] | None = None, c_load: float = 1.0, c_host: float = 1.0
                 ) -> LayerSchedule:
        """`CacheModel.schedule`'s decisions and state changes, op for op."""
        cfg, resident = self.policy, self.resident[layer]
        decisions = decide_lean(rows, chosen, resident, self.params[layer])
        c = Counts(pairs=len(chosen) * self.k)
        exact: dict[int, int] = {}                       # expert -> exact pairs
        subs: dict[int, int] = {}                        # understudy -> pairs it stands in for
        und = c.understudies
        for d in decisions:
            for e in d.exact:
                exact[e] = exact.get(e, 0) + 1
            if d.understudy:
                for j, reason in d.understudy.values():
                    subs[j] = subs.get(j, 0) + 1
                    und[reason] += 1
            c.drops += len(d.dropped)
        needed = exact.keys() | subs.keys()
        missing = [e for e in needed if e not in resident]
        if len(missing) > 1:                             # by (-best(e), e): best over the tokens that chose e
            best: dict[int, float] = {}
            miss = set(missing)
            for r, ch in zip(rows, chosen):
                for e in ch:
                    if e in miss:
                        v = r.get(e, 0.0)
                        if e not in best or v > best[e]:
                            best[e] = v
            missing = best_first(missing, lambda e: best.get(e, 0.0))
        to_load, to_host = missing, []
        if cfg.host_compute and missing and len(chosen) <= self.host_batch_max:
            to_load, to_host = split_misses(missing, c_load, c_host)
        host_set = set(to_host)
        pending = needed - host_set if host_set else needed
        direct = not to_load or self._direct(layer, to_load, pending)
        self.calls[layer] += 1                           # the clock and the window move first: the victims' keys
        if cfg.eviction == "score":
            self.windows[layer].push(step_scores(rows))
        cached = sorted(e for e in needed if e in resident)
        self._tally(layer, c, exact, subs, resident, host_set, pending)
        pf = self.prefetched[layer]
        if pf:
            for e in cached:
                if e in pf:
                    c.prefetch_used += 1
                    pf.discard(e)
        ops: list[tuple[str, int, int, int | None]] = []
        sched = LayerSchedule(decisions=decisions, ops=ops, counts=c)
        if direct:
            for e, v in zip(to_load, self._victims(layer, to_load, pending) if to_load else ()):
                self._load(layer, e, v, ops)
            c.loads += len(to_load)
            self._prefetch(layer, prediction, ops, sched)
            ops.extend(("compute", layer, e, None) for e in cached)
            ops.extend(("host", layer, e, None) for e in to_host)
            ops.extend(("compute", layer, e, None) for e in to_load)
        else:
            self._stream(layer, to_load, to_host, cached, set(pending), sched, prediction)
        now, last, uses = self.calls[layer], self.last_used[layer], self.uses[layer]
        for e in needed:                                 # the needed experts resident at the end
            if e in resident:
                last[e] = now
                uses[e] = uses.get(e, 0) + 1
        return sched

    def _load(self, layer: int, e: int, victim: int | None, ops: list) -> None:
        """Admit e into the layer (evicting `victim`, unless None) and record the load."""
        if victim is not None:
            self._leave(layer, victim)
            self.prefetched[layer].discard(victim)
            self.uses[layer].pop(victim, None)
        self._enter(layer, e)
        self.uses[layer][e] = 0
        ops.append(("load", layer, e, victim))

    def _stream(self, layer: int, to_load: list[int], to_host: list[int], cached: list[int], pending: set[int],
                sched: LayerSchedule, prediction) -> None:
        """The ops of a call whose loads the free slots cannot all take at once, in the reference's order: loads as
        slots allow, the prefetches, the cached experts' computes, each freeing its slot for more loads, the host
        computes, then each loaded expert's compute (its load issued first if still queued), freeing its slot."""
        ops, c = sched.ops, sched.counts
        q, victims = 0, None                             # the next load; the candidates, made when first needed

        def issue(q: int, victims: _Victims | None) -> tuple[int, _Victims | None]:
            while q < len(to_load):
                e, v = to_load[q], None
                if self._full(layer, e):
                    if victims is None:
                        victims = self._order(layer, pending)
                    v = victims.peek(self._pool_of(layer, e))
                    if v is None:
                        break
                    victims.take(self._pool_of(layer, e))
                self._load(layer, e, v, ops)
                c.loads += 1
                q += 1
            return q, victims

        def computed(e: int, q: int, victims: _Victims | None) -> tuple[int, _Victims | None]:
            ops.append(("compute", layer, e, None))
            pending.discard(e)
            if victims is not None:
                victims.free(e)
            return issue(q, victims)

        q, victims = issue(q, victims)
        self._prefetch(layer, prediction, ops, sched)
        for e in cached:
            q, victims = computed(e, q, victims)
        ops.extend(("host", layer, e, None) for e in to_host)
        resident = self.resident[layer]
        for e in to_load:
            if e not in resident:
                q, victims = issue(q, victims)
            if e not in resident:
                raise RuntimeError(f"layer {layer}: no slot can be freed for expert {e}")
            q, victims = computed(e, q, victims)

    def _prefetch(self, layer: int, prediction, ops, sched: LayerSchedule) -> None:
        """`CacheModel._prefetch`: the victims of the next layer from one sort of its candidates."""
        nxt = self.next_layer.get(layer)
        if not self.policy.prefetch or prediction is None or nxt is None:
            return
        predicted, order = self._predicted(nxt, prediction)
        res = self.resident[nxt]
        want = [e for e in order if e not in res]
        if not want:
            return
        guard = self.policy.prefetch_guard and self.policy.eviction == "score"
        order: _Victims | None = None
        pf, uses, c = self.prefetched[nxt], self.uses[nxt], sched.counts
        for e in want:
            victim = None
            if self._full(nxt, e):
                if order is None:
                    order = self._order(nxt, predicted)
                p = self._pool_of(nxt, e)
                victim = order.peek(p)
                if guard and (victim is None or self.windows[nxt].mean()[victim] >= predicted[e]):
                    if self.pools is None:   # the same victim then faces every later, lower prediction
                        break
                    continue
                if victim is None:
                    break
                order.take(p)
                self._leave(nxt, victim)
                pf.discard(victim)
                uses.pop(victim, None)
            self._enter(nxt, e)
            uses[e] = 0
            pf.add(e)
            ops.append(("prefetch", nxt, e, victim))
            c.loads += 1
            c.prefetch_issued += 1
