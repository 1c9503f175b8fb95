"""The offloading executor for `MoEBlock`: decisions -> loads, cached compute first, then what arrives.

Per MoE layer call (x [T, H], routing):
 1. decide (pure, runtime.policy.substitution): per token the experts run exactly, the understudies, the drops;
 2. split the misses between loads and host compute (runtime.policy.host_split), highest scores loaded;
 3. issue the loads (evicting by the policy's rule; experts this layer still needs are pinned), then the
    next layer's prefetches;
 4. compute cached experts while the loads are in flight, then host experts, then each load as it lands;
 5. mix every contribution in ascending expert id, as HF does, so the lossless path is bit-exact.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import torch

from runtime.expert_cache import ExpertCache
from runtime.expert_compute import expert_rows, make_expert_fn, mix
from runtime.expert_store import ExpertStore
from runtime.loader import Loader
from runtime.policy.config import PolicyConfig
from runtime.policy.eviction import ScoreWindow, lru_victim, score_victim
from runtime.policy.host_split import CostMeter, split_misses
from runtime.policy.substitution import SubstitutionParams, decide_layer, top_score_set
from runtime.router import Routing
from runtime.stats import RunStats


class OffloadExecutor:
    def __init__(self, store: ExpertStore, cache: ExpertCache, loader: Loader, policy: PolicyConfig,
                 params: dict[int, SubstitutionParams], stats: RunStats,
                 next_router: Callable[[int, torch.Tensor], tuple[int, Routing] | None] | None = None,
                 record_events: bool = False):
        arch = store.arch
        self.store, self.cache, self.loader, self.policy, self.params, self.stats = (
            store, cache, loader, policy, params, stats)
        self.num_experts, self.top_k = arch.num_experts, arch.top_k
        self.expert_fn = make_expert_fn(arch.experts)
        self.next_router = next_router
        self.windows = {l: ScoreWindow(arch.num_experts, policy.window) for l in arch.moe_layers}
        self.last_used: dict[int, dict[int, int]] = {l: {} for l in arch.moe_layers}
        self.prefetched: dict[int, set[int]] = {l: set() for l in arch.moe_layers}   # arrived by prefetch, unused
        self.c_load, self.c_host = CostMeter(), CostMeter()
        self.step = 0
        self.events: list[tuple] | None = [] if record_events else None

    # ---- cache management ----------------------------------------------------------------------------------------
    def _victim(self, layer: int, pinned: set[int]) -> int | None:
        where = self.cache.where[layer]
        candidates = [e for e in where if e not in pinned and not self.cache.in_flight(layer, e)]
        if not candidates:
            return None
        if self.policy.eviction == "score":
            return score_victim(candidates, self.windows[layer].mean())
        return lru_victim(candidates, self.last_used[layer])

    def _load(self, layer: int, expert: int, pinned: set[int], prefetch: bool) -> bool:
        """Start loading `expert`; False when no slot can be freed now (every cached expert pinned)."""
        if not self.cache.has_free(layer):
            victim = self._victim(layer, pinned)
            if victim is None:
                return False
            self.cache.evict(layer, victim)
            self.prefetched[layer].discard(victim)
        dst = self.cache.assign(layer, expert)
        self.cache.ticket[layer][expert] = self.loader.submit(layer, expert, dst, prefetch=prefetch)
        c = self.stats.layer(layer)
        c.loads += 1
        c.load_bytes += self.cache.expert_bytes
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self.cache.used_bytes)
        if prefetch:
            c.prefetch_issued += 1
            self.prefetched[layer].add(expert)
        return True

    def _wait(self, layer: int, expert: int) -> None:
        ticket = self.cache.ticket[layer].get(expert)
        if ticket is None:
            return
        if not ticket.done.is_set():
            t0 = time.perf_counter()
            ticket.wait()
            self.stats.layer(layer).stall_s += time.perf_counter() - t0
        else:
            ticket.wait()
        if not ticket.metered:
            ticket.metered = True
            self.c_load.add(ticket.t_end - ticket.t_start)
            if self.events is not None:
                self.events.append(("load", ticket.t_start, ticket.t_end, layer, expert))

    # ---- the layer ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        self.step += 1
        cfg, c = self.policy, self.stats.layer(layer)
        scores = routing.score.tolist()
        chosen = routing.idx.tolist()
        t_count = len(chosen)
        cached_now = set(self.cache.where[layer])
        params = self.params[layer]
        decisions = decide_layer(scores, chosen, cached_now, params)
        if cfg.eviction == "score":
            self.windows[layer].push(routing.score.mean(0).tolist())

        # who computes which rows: exact pairs keep HF's (position, token) order
        skip: set[tuple[int, int]] = set()
        subs: dict[int, list[tuple[int, int]]] = defaultdict(list)   # j -> [(token, replaced i)]
        for t, d in enumerate(decisions):
            for i, (j, reason) in d.understudy.items():
                skip.add((t, i))
                subs[j].append((t, i))
                c.understudies[reason] += 1
            for i in d.dropped:
                skip.add((t, i))
            c.drops += len(d.dropped)
        c.pairs += t_count * self.top_k
        rows = expert_rows(routing.idx, self.num_experts)
        if skip:
            rows = self._filter(rows, skip)
        needed = set(rows) | set(subs)
        best = {e: 0.0 for e in needed}
        for t, ch in enumerate(chosen):
            for e in ch:
                if e in best:
                    best[e] = max(best[e], scores[t][e])
        misses = sorted((e for e in needed if e not in cached_now), key=lambda e: (-best[e], e))
        to_load, to_host = misses, []
        if cfg.host_compute and misses and t_count <= 8:
            to_load, to_host = split_misses(misses, self.c_load.value, self.c_host.value)
        exact_pairs = {e: len(r[0]) for e, r in rows.items()}
        for e, n in exact_pairs.items():
            if e in cached_now:
                c.hits += n
                if e in self.prefetched[layer]:
                    c.prefetch_used += 1
                    self.prefetched[layer].discard(e)
            elif e in to_host:
                c.host += n
            else:
                c.misses += n

        pending = set(needed) - set(to_host)             # pinned until computed
        queue = [e for e in to_load]
        queue = self._issue(layer, queue, pending)
        self._prefetch_next(layer, x, routing)

        contributions: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for e in sorted(e for e in needed if e in cached_now):
            self._compute(layer, e, x, routing, rows, subs, contributions, self.cache)
            pending.discard(e)
            queue = self._issue(layer, queue, pending)
        for e in to_host:
            self._compute(layer, e, x, routing, rows, subs, contributions, None)
        for e in to_load:
            while e not in self.cache.where[layer]:      # its load could not be issued yet: free a slot first
                queue = self._issue(layer, queue, pending)
                if e in self.cache.where[layer]:
                    break
                busy = [f for f in self.cache.where[layer] if self.cache.in_flight(layer, f)]
                if not busy:
                    raise RuntimeError(f"layer {layer}: no slot can be freed for expert {e}")
                self._wait(layer, busy[0])               # a prefetch holds the slot: let it land
            self._compute(layer, e, x, routing, rows, subs, contributions, self.cache)
            pending.discard(e)
            queue = self._issue(layer, queue, pending)
        for e in needed:
            if e in self.cache.where[layer]:
                self.last_used[layer][e] = self.step
        ordered = [(e, *contributions[e]) for e in sorted(contributions)]
        return mix(x, ordered)

    def _issue(self, layer: int, queue: list[int], pending: set[int]) -> list[int]:
        """Issue as many queued loads as slots allow; returns the ones still waiting for a slot."""
        left = []
        for n, e in enumerate(queue):
            if e in self.cache.where[layer]:
                continue
            if not self._load(layer, e, pending, prefetch=False):
                left = queue[n:]
                break
        return left

    def _prefetch_next(self, layer: int, x: torch.Tensor, routing: Routing) -> None:
        if not self.policy.prefetch or self.next_router is None:
            return
        nxt = self.next_router(layer, x)
        if nxt is None:
            return
        next_layer, r = nxt
        alpha = self.params[next_layer].alpha
        predicted: dict[int, float] = {}
        for s, ch in zip(r.score.tolist(), r.idx.tolist()):
            for e in top_score_set(s, ch, alpha):
                predicted[e] = max(predicted.get(e, 0.0), s[e])
        budget = self.policy.prefetch_max or self.top_k
        for e in sorted(predicted, key=lambda e: (-predicted[e], e))[:budget]:
            if e not in self.cache.where[next_layer]:
                if not self._load(next_layer, e, set(predicted), prefetch=True):
                    break

    @staticmethod
    def _filter(rows, skip):
        out = {}
        for e, (r, p) in rows.items():
            keep = [n for n, (t, q) in enumerate(zip(r.tolist(), p.tolist())) if (t, e) not in skip]
            if keep:
                idx = torch.tensor(keep, dtype=torch.long, device=r.device)
                out[e] = (r[idx], p[idx])
        return out

    def _compute(self, layer, e, x, routing, rows, subs, contributions, cache) -> None:
        t0 = time.perf_counter()
        if cache is not None:
            self._wait(layer, e)
            w = cache.weights(layer, e)
        else:
            w = self.store.read(layer, e)
        if self.events is not None:
            self.events.append(("compute_start", time.perf_counter(), layer, e))
        r_list, w_list = [], []
        if e in rows:
            r, p = rows[e]
            r_list.append(r)
            w_list.append(routing.weights[r, p])
        if e in subs:
            toks = torch.tensor([t for t, _ in subs[e]], dtype=torch.long, device=x.device)
            if self.policy.understudy_weight == "replaced":
                pos = torch.tensor([routing.idx[t].tolist().index(i) for t, i in subs[e]], device=x.device)
                sw = routing.weights[toks, pos]
            else:
                sw = (routing.coef[toks] * routing.gate[toks, e]).to(routing.weights.dtype)
            r_list.append(toks)
            w_list.append(sw)
        r_all = r_list[0] if len(r_list) == 1 else torch.cat(r_list)
        w_all = w_list[0] if len(w_list) == 1 else torch.cat(w_list)
        xin = x[r_all]
        if cache is None and x.device.type != "cpu":
            y = self.expert_fn(xin.cpu(), w).to(x.device)
        else:
            y = self.expert_fn(xin, w)
        contributions[e] = (r_all, y * w_all[:, None])
        if self.events is not None:
            self.events.append(("compute_end", time.perf_counter(), layer, e))
        if cache is None:
            self.c_host.add(time.perf_counter() - t0)
