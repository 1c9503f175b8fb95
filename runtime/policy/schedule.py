"""The cache model: which experts are resident per layer, and the ordered plan of one layer call.

Pure (ids and scores only), and the single source of truth for cache decisions: the runtime executes the
`LayerSchedule` it returns (copies, waits, compute), and the compiler's simulator replays a routing trace through the
very same object, so predicted and measured hits and loads agree.

A layer call's ops, in order:
  ("load", layer, e, victim)      evict `victim` (None: a free slot; for the simulator's oracle also a bypass into a
                                  one-expert workspace, when e is not kept) and start loading e
  ("prefetch", layer', e, victim) the same, into the next MoE layer, for a predicted top-score expert
  ("compute", layer, e, None)     compute e from its slot (waiting for its load if needed)
  ("host", layer, e, None)        compute e on the host, from the store
Loads are issued first, as far as slots allow without evicting an expert this call still needs (busy); then cached
experts are computed while the loads are in flight; every computed expert frees its slot, so more loads can go.

A prefetch (SMoE section 4) loads the next layer's predicted top-score experts; with `prefetch_guard` (the plan
policy's addition) it only displaces an expert whose mean score over the window is below the predicted score.

Scores are sparse: per token a dict of its top-W experts' scores (W = k + m, the width of the profile's trace);
every other expert counts as 0, in the runtime exactly as in the simulator.

Only the victim rule and the pinning differ between the lossless baselines (runtime.policy.eviction): lru, lfu and
lfru by their rule; static by `pinned` experts, resident from the start and never candidates (runtime.policy.static);
the simulator's oracle by Belady's rule over `future` (a NextUse of the trace being replayed).

With a precision plan the layer's slots are split into pools by precision (runtime.policy.pools): an expert is
admitted into its own pool and only evicts an expert of that pool; the rule is the same within each pool. Every pair
computed from a quantized copy (exact or understudy) is counted in `Counts.quantized` under its scheme.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from runtime.policy.config import PolicyConfig
from runtime.policy.counts import Counts
from runtime.policy.eviction import (NextUse, ScoreWindow, belady_victim, lfru_victim, lfu_victim, lru_victim,
                                     score_victim)
from runtime.policy.host_split import split_misses
from runtime.policy.pools import Pools
from runtime.policy.substitution import SubstitutionParams, TokenDecision, best_first, decide_layer

Scores = Mapping[int, float]   # expert -> score, the token's top-W experts


def predicted_top(scores: Scores, k: int, alpha: float) -> dict[int, float]:
    """Top-score experts of a predicted routing: the top k whose score exceeds (1 + alpha) * S(k+1)."""
    ranked = best_first(scores, scores.__getitem__)
    s_next = scores[ranked[k]] if len(ranked) > k else 0.0
    return {e: scores[e] for e in ranked[:k] if scores[e] > (1.0 + alpha) * s_next}



def step_scores(rows: Sequence[Scores]) -> dict[int, float]:
    """A call's step of the score window: per expert the mean over its tokens, sum_t s_t(e) / T, added in token
    order (experts no token scores are absent: 0)."""
    n, step = len(rows), {}
    if n == 1:                                   # s / 1 is s: the token's scores as they are
        return dict(rows[0])
    for r in rows:
        for e, s in r.items():
            step[e] = step.get(e, 0.0) + s / n
    return step


@dataclass
class LayerSchedule:
    decisions: list[TokenDecision]
    ops: list[tuple[str, int, int, int | None]]
    counts: Counts                                  # this layer's pair counts and loads (demand + prefetch)


class CacheModel:
    def __init__(self, slots: Mapping[int, int], num_experts: int, top_k: int, policy: PolicyConfig,
                 params: Mapping[int, SubstitutionParams], initial: Mapping[int, Sequence[int]] | None = None,
                 host_batch_max: int = 8, pinned: Mapping[int, Sequence[int]] | None = None,
                 future: NextUse | None = None, pools: Pools | None = None):
        """initial: experts resident at start; pinned: experts resident at start and never evicted (static);
        future: the requests to come (eviction "belady", the simulator's oracle); pools: a precision plan's pools
        (slots per layer are then their sum)."""
        assert (pinned is not None) == policy.pins, f"policy {policy.name}: pinned experts are static's alone"
        assert (future is not None) == (policy.eviction == "belady"), "Belady's rule needs the future, and only it"
        assert pools is None or (future is None and pinned is None), "pools are a plan's, not oracle's or static's"
        self.pools = pools
        self.slots = dict(slots) if pools is None else {l: pools.total_slots(l) for l in slots}
        self.layers = list(self.slots)
        self.next_layer = dict(zip(self.layers, self.layers[1:]))
        self.e, self.k, self.policy, self.params = num_experts, top_k, policy, params
        self.future = future
        self.resident: dict[int, set[int]] = {l: set() for l in self.layers}
        self.pinned: dict[int, frozenset[int]] = {l: frozenset((pinned or {}).get(l, ())) for l in self.layers}
        self.calls: dict[int, int] = {l: 0 for l in self.layers}             # layer calls so far (the clock c)
        self.last_used: dict[int, dict[int, int]] = {l: {} for l in self.layers}   # e -> call that last used it
        self.uses: dict[int, dict[int, int]] = {l: {} for l in self.layers}        # e -> calls using it since its load
        self.prefetched: dict[int, set[int]] = {l: set() for l in self.layers}
        self.windows = {l: ScoreWindow(num_experts, policy.window) for l in self.layers}
        self.host_batch_max = host_batch_max
        # resident experts per pool, kept as experts come and go (not recounted on every admission)
        self.held: dict[int, list[int]] = {l: [0] * len(pools.names) for l in self.layers} if pools else {}
        for l in self.layers:
            assert not self.pinned[l] or len(self.pinned[l]) < self.slots[l], (
                f"layer {l}: {len(self.pinned[l])} pinned experts leave no slot of {self.slots[l]} for the others")
            self.resident[l].update(self.pinned[l])
            for e in list((initial or {}).get(l, ())):
                if e not in self.resident[l] and not self._full(l, e):
                    self._enter(l, e)

    def _pool_of(self, layer: int, e: int) -> int:
        return 0 if self.pools is None else self.pools.of[layer][e]

    def _full(self, layer: int, e: int) -> bool:
        """Whether admitting e needs an eviction: its pool's slots are all taken."""
        if self.pools is None:
            return len(self.resident[layer]) >= self.slots[layer]
        p = self.pools.of[layer][e]
        return self.held[layer][p] >= self.pools.slots[layer][p]

    def _enter(self, layer: int, e: int) -> None:
        self.resident[layer].add(e)
        if self.pools is not None:
            self.held[layer][self.pools.of[layer][e]] += 1

    def _leave(self, layer: int, e: int) -> None:
        self.resident[layer].discard(e)
        if self.pools is not None:
            self.held[layer][self.pools.of[layer][e]] -= 1

    # ---- slot bookkeeping ------------------------------------------------------------------------------------
    def _victim(self, layer: int, busy: set[int], pool: int = 0) -> int | None:
        """The rule's victim among the layer's resident experts of `pool` that are neither busy (this call still
        needs them) nor pinned (static); None when there is none."""
        candidates = [e for e in self.resident[layer] if e not in busy and e not in self.pinned[layer]]
        if self.pools is not None:
            candidates = [e for e in candidates if self.pools.of[layer][e] == pool]
        if not candidates:
            return None
        rule, last = self.policy.eviction, self.last_used[layer]
        if rule == "belady":      # among those it does not keep (the caller counts them busy)
            now = self.calls[layer]
            return belady_victim(candidates, {e: self.future.next_use(layer, e, now) for e in candidates}, last)
        if rule == "score":
            return score_victim(candidates, self.windows[layer].mean())
        if rule == "lfu":
            return lfu_victim(candidates, self.uses[layer], last)
        if rule == "lfru":
            return lfru_victim(candidates, self.uses[layer], last, self.calls[layer])
        assert rule == "lru", f"unknown eviction rule {rule!r}"
        return lru_victim(candidates, last)

    def _admit(self, layer: int, e: int, busy: set[int]) -> tuple[bool, int | None]:
        """Make room for e (evicting a victim that is not busy when full); (admitted, victim)."""
        victim = None
        if self._full(layer, e):
            victim = self._victim(layer, busy, self._pool_of(layer, e))
            if victim is None:
                return False, None
            self._leave(layer, victim)
            self.prefetched[layer].discard(victim)
            self.uses[layer].pop(victim, None)
        self._enter(layer, e)
        self.uses[layer][e] = 0
        return True, victim

    # ---- one layer call --------------------------------------------------------------------------------------
    def schedule(self, layer: int, rows: Sequence[Scores], chosen: Sequence[Sequence[int]],
                 prediction: Sequence[Scores] | None = None, c_load: float = 1.0, c_host: float = 1.0
                 ) -> LayerSchedule:
        """rows: per token its top-W scores; chosen: per token the router's k experts; prediction: per token the
        approximate next-layer gate's top-W scores (for prefetch)."""
        self.calls[layer] += 1
        cfg, params = self.policy, self.params[layer]
        resident_at_start = set(self.resident[layer])
        decisions = decide_layer(rows, chosen, resident_at_start, params)
        if cfg.eviction == "score":
            self.windows[layer].push(step_scores(rows))

        c = Counts(pairs=len(chosen) * self.k)
        exact: dict[int, int] = {}                       # expert -> exact pairs
        subs: dict[int, int] = {}                        # understudy -> pairs it stands in for
        for d in decisions:
            for e in d.exact:
                exact[e] = exact.get(e, 0) + 1
            for _, (j, reason) in d.understudy.items():
                subs[j] = subs.get(j, 0) + 1
                c.understudies[reason] += 1
            c.drops += len(d.dropped)
        needed = set(exact) | set(subs)
        best = {e: max((r.get(e, 0.0) for r, ch in zip(rows, chosen) if e in ch), default=0.0) for e in needed}
        misses = sorted((e for e in needed if e not in resident_at_start), key=lambda e: (-best[e], e))
        to_load, to_host = misses, []
        if cfg.host_compute and misses and len(chosen) <= self.host_batch_max:
            to_load, to_host = split_misses(misses, c_load, c_host)
        host_set = set(to_host)
        keep: set[int] = set()                           # Belady: what stays after the call; the other misses bypass
        bypass: list[int] = []
        if self.future is not None:
            keep = set(self.future.keep(layer, resident_at_start | needed, self.calls[layer], self.slots[layer]))
            bypass = [e for e in to_load if e not in keep]
            to_load = [e for e in to_load if e in keep]
        self._tally(layer, c, exact, subs, resident_at_start, host_set, needed - host_set)
        for e in needed & resident_at_start:
            if e in self.prefetched[layer]:
                c.prefetch_used += 1
                self.prefetched[layer].discard(e)

        ops: list[tuple[str, int, int, int | None]] = []
        pending = needed - host_set
        queue = list(to_load)

        def issue() -> None:
            while queue:
                e = queue[0]
                ok, victim = self._admit(layer, e, pending | keep)
                if not ok:
                    return
                queue.pop(0)
                ops.append(("load", layer, e, victim))
                c.loads += 1

        issue()
        for e in bypass:                                 # into a one-expert workspace, never cached (oracle only)
            ops.append(("load", layer, e, None))
            c.loads += 1
        sched = LayerSchedule(decisions=decisions, ops=ops, counts=c)
        self._prefetch(layer, prediction, ops, sched)
        for e in sorted(needed & resident_at_start):
            ops.append(("compute", layer, e, None))
            pending.discard(e)
            issue()
        for e in bypass:
            ops.append(("compute", layer, e, None))
            pending.discard(e)
        for e in to_host:
            ops.append(("host", layer, e, None))
        for e in to_load:
            if e not in self.resident[layer]:
                issue()
            if e not in self.resident[layer]:
                raise RuntimeError(f"layer {layer}: no slot can be freed for expert {e}")
            ops.append(("compute", layer, e, None))
            pending.discard(e)
            issue()
        for e in needed:
            if e in self.resident[layer]:
                self.last_used[layer][e] = self.calls[layer]
                self.uses[layer][e] = self.uses[layer].get(e, 0) + 1
        return sched

    def _predicted(self, nxt: int, prediction: Sequence[Scores]) -> tuple[dict[int, float], list[int]]:
        """(expert -> its best predicted score over the call's tokens, for the top-score experts of layer nxt's
        predicted routing; the prefetch budget's best of them by (-score, e), the order prefetches are tried in)."""
        alpha = self.params[nxt].alpha
        predicted: dict[int, float] = {}
        for r in prediction:
            for e, s in predicted_top(r, self.k, alpha).items():
                predicted[e] = max(predicted.get(e, 0.0), s)
        budget = self.policy.prefetch_max or self.k
        return predicted, best_first(predicted, predicted.__getitem__)[:budget]

    def _tally(self, layer: int, c: Counts, exact: Mapping[int, int], subs: Mapping[int, int], cached: set[int],
               host_set: set[int], computed) -> None:
        """A call's pair counts: each expert's exact pairs as hits (cached at the start), host computes or misses;
        with pools, the pairs (exact and understudy) of the `computed` experts held at a quantized scheme."""
        for e, n in exact.items():
            if e in cached:
                c.hits += n
            elif e in host_set:
                c.host += n
            else:
                c.misses += n
        if self.pools is not None:
            for e in computed:                           # computed from its cache slot, at its pool's precision
                scheme = self.pools.quantized(layer, e)
                if scheme is not None:
                    c.quantized[scheme] = c.quantized.get(scheme, 0) + exact.get(e, 0) + subs.get(e, 0)

    def _prefetch(self, layer: int, prediction, ops, sched: LayerSchedule) -> None:
        nxt = self.next_layer.get(layer)
        if not self.policy.prefetch or prediction is None or nxt is None:
            return
        predicted, order = self._predicted(nxt, prediction)
        for e in order:
            if e in self.resident[nxt]:
                continue
            if self.policy.prefetch_guard and self.policy.eviction == "score" and self._full(nxt, e):
                # a prefetch may only displace an expert whose recent mean score is below the predicted score:
                # otherwise a guess would evict a likely hit
                victim = self._victim(nxt, set(predicted), self._pool_of(nxt, e))
                if victim is None or self.windows[nxt].mean()[victim] >= predicted[e]:
                    continue
            ok, victim = self._admit(nxt, e, set(predicted))
            if not ok:
                break
            self.prefetched[nxt].add(e)
            ops.append(("prefetch", nxt, e, victim))
            sched.counts.loads += 1
            sched.counts.prefetch_issued += 1
