"""The offloading executor for `MoEBlock`: it executes the cache model's schedule of each layer call.

Per MoE layer call (x [T, H], routing):
 1. the cache model (pure, runtime.policy.schedule) decides: per token the experts run exactly, the understudies and
    the drops, the host/transfer split, and the ordered ops: loads (with their victims), next-layer prefetches,
    computes of cached experts while loads are in flight, host computes, computes of what arrives;
 2. this class carries the ops out on tensors: slot copies through the loader, waits, expert compute (slots hold
    experts as the store does, packed for a quantized checkpoint; `materialize` turns one into compute-dtype
    weights in a workspace right before its compute; a call of several tokens on the CPU computes its cached
    experts as one grouped call over the layer's stacked slots, `_compute_grouped`);
 3. contributions are mixed in ascending expert id, as HF does, so the lossless path is bit-exact.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from runtime.expert_cache import ExpertCache
from runtime.expert_compute import (PairGroups, group_pairs, group_served, make_expert_fn, make_grouped_fn,
                                    schedule_and_group, schedule_and_group_pair, slot_rows, warm_served)
from runtime.expert_store import ExpertStore
from runtime.loader import Loader, Ticket
from runtime.policy.compiled import PREFETCH, CompiledCacheModel, decision_arrays, warm_kernels
from runtime.policy.config import PolicyConfig
from runtime.policy.fast import FastCacheModel
from runtime.policy.host_split import CostMeter
from runtime.policy.schedule import CacheModel, LayerSchedule
from runtime.router import Routing, call_arrays, pair_arrays, score_rows
from runtime.stats import RunStats

LOADS = ("load", "prefetch")


class OffloadExecutor:
    def __init__(self, store: ExpertStore, cache: ExpertCache, loader: Loader, model: CacheModel,
                 policy: PolicyConfig, stats: RunStats, width: int,
                 next_router: Callable[[int, torch.Tensor], tuple[int, Routing] | None] | None = None,
                 record_events: bool = False):
        arch = store.arch
        self.store, self.cache, self.loader, self.model, self.policy, self.stats = (
            store, cache, loader, model, policy, stats)
        self.num_experts, self.width = arch.num_experts, width
        self.expert_fn = make_expert_fn(arch.experts)
        # several cached experts of a call with several tokens: one grouped call over the layer's slots (CPU only,
        # as resident: slots stacked by the cache, plain GLU weights held in the compute dtype; `_groupable`)
        stacked = next(iter(cache.stacks.values()), {})
        self.grouped_fn = make_grouped_fn(arch.experts) if set(stacked) == {"gate_up", "down"} else None
        self.next_router = next_router
        self.c_load, self.c_host = CostMeter(), CostMeter()
        self.tickets: dict[tuple[int, int], Ticket] = {}    # (layer, expert) -> the load that filled its slot
        self.events: list[tuple] | None = [] if record_events else None
        if isinstance(model, CompiledCacheModel):  # compiled (or read from numba's disk cache) now, not in a decode
            warm_kernels()
            warm_served()

    # ---- the layer ---------------------------------------------------------------------------------------------
    def __call__(self, layer: int, x: torch.Tensor, routing: Routing, prediction: Routing | None = None
                 ) -> torch.Tensor:
        """The layer's routed experts' output [T, H] for x [T, H]; `prediction`, the next MoE layer's predicted
        routing where the block computed it with its own (`MoEBlock.pair`), else made here when the policy reads
        it (`_prediction`)."""
        if torch.is_grad_enabled():              # the runtime's entry points run without grad; entering no_grad
            with torch.no_grad():                # again costs microseconds a call, so only here
                return self(layer, x, routing, prediction)
        if isinstance(self.model, FastCacheModel):
            return self._call_lossless(layer, x, routing)
        if isinstance(self.model, CompiledCacheModel):
            return self._call_compiled(layer, x, routing, self._prediction(layer, x, prediction))
        rows, chosen = score_rows(routing, self.width)                  # per token: top-W scores, k experts
        nxt = self._prediction(layer, x, prediction)
        pred = score_rows(nxt, self.width)[0] if nxt is not None else None
        sched = self.model.schedule(layer, rows, chosen, pred, self.c_load.value, self.c_host.value)
        self._count(layer, sched)
        decisions = sched.decisions
        ids = np.array(chosen, dtype=np.int64)                          # [T, k]
        if any(d.understudy or d.dropped for d in decisions):
            g = group_served(x, ids, *decision_arrays(decisions, ids), routing.weights, routing.gate,
                             self.policy.understudy_weight)
        else:                                    # every pair exact: the lossless grouping
            g = group_pairs(x, ids, routing.weights)
        return self._execute(layer, sched.ops, x, g)

    def _prediction(self, layer: int, x: torch.Tensor, prediction: Routing | None) -> Routing | None:
        """The next MoE layer's predicted routing where the policy prefetches: the block's (paired routers), else
        the next router's on x (`next_router`); None for the last MoE layer."""
        if not self.policy.prefetch or prediction is not None:
            return prediction if self.policy.prefetch else None   # (a block pairs only for a prefetching policy)
        nxt = self.next_router(layer, x) if self.next_router is not None else None
        return None if nxt is None else nxt[1]

    def _call_compiled(self, layer: int, x: torch.Tensor, routing: Routing, nxt: Routing | None) -> torch.Tensor:
        """The path of the score-evicting policies (`CompiledCacheModel`): the routing and the next layer's
        predicted routing nxt (None: none read) handed to the compiled model as the router's arrays, chosen [T, k]
        and the score table [T, E], with the weights and gate (`call_arrays`: one copy to the host off the CPU; paired
        routers' as the pair's shared arrays, `pair_arrays`), from which it makes `score_rows`' rows, and the call's
        pairs grouped by serving expert in the same compiled call (`schedule_and_group`, `schedule_and_group_pair`);
        the pair counts added from its count vector; a direct call's copies made, then its experts computed; any other
        call's ops carried out in order (`_execute`)."""
        pair = pair_arrays(routing, nxt)
        if pair is not None:                     # paired routers: the kernel takes the shared arrays' halves
            sched, g = schedule_and_group_pair(self.model, layer, x, pair, routing.weights_dtype, self.width,
                                               self.policy.understudy_weight, self.c_load.value, self.c_host.value)
        else:
            sched, g = schedule_and_group(self.model, layer, x, *call_arrays(routing, nxt), routing.weights_dtype,
                                          self.width, self.policy.understudy_weight, self.c_load.value,
                                          self.c_host.value)
        a = sched.count_array
        c = self.stats.layer(layer)
        c.pairs += a[0]
        c.hits += a[1]
        c.misses += a[2]
        c.host += a[3]
        c.prefetch_used += a[10]
        if sched.substituted:
            c.drops += a[4]
            und = c.understudies
            und["band"] += a[5]
            und["batch"] += a[6]
            und["similarity"] += a[7]
        n = sched.leading_loads
        if n < 0:                                # loads wait for computes (or host computes): the ops in order
            return self._execute(layer, sched.ops, x, g)
        flat = sched.flat_ops                    # [kind code, layer, expert, victim or -1] per op
        if n:                                    # a direct call: its loads and prefetches, then the computes
            if self.loader.inline and not self.tickets and self.events is None:
                self._copy_run(flat, n)
            else:
                self._load_run(sched.ops, 0)
        order = flat[4 * n + 2::4]               # the cached experts (ascending), then the loaded ones
        if self._groupable(layer, x, g):         # several tokens: grouped over the slots
            y = x.new_empty((len(g.tok), x.shape[1]))                   # [N, H] unweighted outputs, pair order
            self._compute_grouped(layer, g, order, y)
            return g.mix_rows(x, y)
        if g.whole and not self.tickets and self.events is None and self.store.computes_as_held(x.dtype):
            held, fn = self.cache.held[layer], self.expert_fn           # one token, every slot landed: f_e(x)
            return g.mix(x, {e: fn(x, held[e]) for e in order})
        return self._execute(layer, sched.ops[n:], x, g)

    def _load_run(self, ops: list[tuple[str, int, int, int | None]], i: int) -> int:
        """Issue the run of consecutive load/prefetch ops starting at ops[i], handed to the loader at once; returns
        the index after the run. No op of a run waits on another's copy: a victim is never an expert loaded in the
        same run (a loaded expert is busy until computed, a prefetched one is among the predicted)."""
        if self.loader.inline and self.events is None:
            return self._load_run_inline(ops, i)
        jobs = []
        while i < len(ops) and ops[i][0] in LOADS:
            kind, l, e, victim = ops[i]
            if victim is not None:
                self._wait(l, victim)            # never overwrite a slot whose copy is still landing
                self.cache.evict(l, victim)
                self.tickets.pop((l, victim), None)
            jobs.append((l, e, self.cache.assign(l, e), kind == "prefetch"))
            i += 1
        inline = self.loader.inline
        for t in self.loader.submit_many(jobs):
            self.tickets[(t.layer, t.expert)] = t
            c = self.stats.layer(t.layer)
            if inline:                           # copied on this thread, already
                c.copy_s += t.t_end - t.t_start
            c.loads += 1
            c.load_bytes += self.cache.bytes_of(t.layer, t.expert)
            c.prefetch_issued += int(t.prefetch)
        # a run only adds bytes (a load with a victim swaps one slot of a pool for another): its end is its peak
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self.cache.used_bytes)
        return i

    def _load_run_inline(self, ops: list[tuple[str, int, int, int | None]], i: int) -> int:
        """`_load_run` where the loader copies on this thread: each victim's slot taken over (`ExpertCache.replace`)
        and each copy made at once, in order, with no ticket; its time goes where a landed ticket's would (the
        layer's `copy_s` and the load-cost meter)."""
        cache, copy, stats, tickets = self.cache, self.loader.copy_inline, self.stats, self.tickets
        while i < len(ops) and ops[i][0] in LOADS:
            kind, l, e, victim = ops[i]
            if victim is None:
                dst = cache.assign(l, e)
            else:
                if tickets:                      # a copy of an earlier run (landed: inline) not yet metered
                    self._wait(l, victim)
                dst = cache.replace(l, victim, e)
            dt = copy(l, e, dst)
            self.c_load.add(dt)
            c = stats.layer(l)
            c.copy_s += dt
            c.loads += 1
            c.load_bytes += cache.bytes_of(l, e)
            c.prefetch_issued += kind == "prefetch"
            i += 1
        if cache.used_bytes > stats.peak_cache_bytes:   # a run only adds bytes: its end is its peak
            stats.peak_cache_bytes = cache.used_bytes
        return i

    def _copy_run(self, flat: list[int], n: int) -> None:
        """`_load_run_inline` of the first n ops, all loads and prefetches, given flat as a compiled schedule's
        `flat_ops` (a direct call of the compiled model: no pools, every expert's copy a slot's bytes), each layer's
        copies made back to back as one timed span (`Loader.copy_inline_many`); the span goes to the layer's `copy_s`
        and, spread evenly over its copies, to the load-cost meter."""
        cache, stats, i = self.cache, self.stats, 0
        while i < 4 * n:
            layer, dsts = flat[i + 1], []
            c = stats.layer(layer)
            while i < 4 * n and flat[i + 1] == layer:
                kind, _, e, victim = flat[i:i + 4]
                dsts.append((e, cache.assign(layer, e) if victim < 0 else cache.replace(layer, victim, e)))
                c.prefetch_issued += kind == PREFETCH
                i += 4
            dt = self.loader.copy_inline_many(layer, dsts)
            c.copy_s += dt
            c.loads += len(dsts)
            c.load_bytes += len(dsts) * cache.expert_bytes
            self.c_load.add(dt / len(dsts), len(dsts))
        if cache.used_bytes > stats.peak_cache_bytes:   # loads only add bytes: the run's end is its peak
            stats.peak_cache_bytes = cache.used_bytes

    def _call_lossless(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The lean path of lossless lru/lfu/lfru (`FastCacheModel`): routing as arrays, no per-token dicts, every
        pair exact; each expert's output is computed unweighted, and the weighting and mixing are done once.

        out[t] = sum over t's experts e in ascending id of (w[t, e] * f_e(x_t)), added in that order (`mix_pairs`).
        A direct call (every needed expert fits the slots: `FastSchedule.direct`) makes its loads, then computes the
        cached experts and the loaded ones, with no op list; otherwise the schedule's ops are carried out in order."""
        chosen = routing.idx.cpu().numpy()                              # [T, k]
        sched = self.model.schedule_arrays(layer, chosen, table=lambda: routing.score.cpu().numpy())   # [T, E]
        c = self.stats.layer(layer)
        c.pairs += sched.hits + sched.misses
        c.hits += sched.hits
        c.misses += sched.misses
        g = group_pairs(x, chosen, routing.weights, sched.experts, sched.pairs)
        if not sched.direct:
            return self._execute(layer, sched.ops, x, g)
        if sched.loads:
            self._load_direct(layer, sched.loads, c)
        loaded = [e for e, _ in sched.loads]
        if self._groupable(layer, x, g):         # several tokens: grouped over the slots
            y = x.new_empty((len(g.tok), x.shape[1]))                   # [N, H] unweighted outputs, pair order
            self._compute_grouped(layer, g, sched.cached + loaded, y)
            return g.mix_rows(x, y)
        as_held = self.store.computes_as_held(x.dtype)                 # no materialize: the slot is the weights
        held, tickets = self.cache.held[layer], self.tickets
        order = sched.cached + loaded if loaded else sched.cached
        if g.whole and as_held and not tickets and self.events is None:   # one token, every slot landed: f_e(x)
            fn = self.expert_fn
            return g.mix(x, {e: fn(x, held[e]) for e in order})
        ys: dict[int, torch.Tensor] = {}                                # e -> unweighted f_e(x rows) [n_e, H]
        for e in order:
            if tickets:                          # a copy on the loader thread: wait for it to land
                self._wait(layer, e)
            w = held[e] if as_held else self.store.materialize(layer, e, held[e], x.dtype)
            ys[e] = self._compute(layer, e, g.rows(e), w)
        return g.mix(x, ys)                      # slots live on x's device: no .to()

    def _execute(self, layer: int, ops: list[tuple[str, int, int, int | None]], x: torch.Tensor,
                 g: PairGroups) -> torch.Tensor:
        """Carry out a schedule's ops in order and mix: a run of loads is one handoff to the loader; a slot compute
        runs from its slot once its copy landed; a host compute runs on the host from the store (its time feeds the
        host-cost meter). Where the call is `_groupable`, consecutive slot computes are one grouped call, made before
        the next load run (whose victims may be among them) or host compute."""
        as_held = self.store.computes_as_held(x.dtype)                 # no materialize: the slot is the weights
        held = self.cache.held
        fn = self.expert_fn if self.events is None else None            # else `_compute`, which records events
        y = x.new_empty((len(g.tok), x.shape[1])) if self._groupable(layer, x, g) else None   # [N, H] grouped
        ys: dict[int, torch.Tensor] = {}                                # e -> unweighted f_e(its rows) [n_e, H]
        run: list[int] = []                                             # slot computes waiting for a grouped call
        i = 0
        while i < len(ops) or run:
            kind = ops[i][0] if i < len(ops) else None
            if y is not None and kind == "compute":
                run.append(ops[i][2])
                i += 1
                continue
            if run:
                self._compute_grouped(layer, g, run, y)
                run = []
            if kind is None:
                break
            kind, l, e, victim = ops[i]
            if kind in LOADS:                    # a run of loads: one handoff to the loader thread
                i = self._load_run(ops, i)
                continue
            i += 1
            if kind != "host":                   # from its slot, on x's device
                w = self._slot(l, e) if self.tickets else held[l][e]        # no ticket: landed (or inline)
                if not as_held:
                    w = self.store.materialize(l, e, w, x.dtype)
                ys[e] = fn(g.rows(e), w) if fn is not None else self._compute(l, e, g.rows(e), w)
                continue
            w = self.store.read(l, e)
            t0 = time.perf_counter()
            xin = g.rows(e)
            if x.device.type != "cpu":
                xin = xin.cpu()
            ys[e] = self._compute(l, e, xin, self.store.materialize(l, e, w, xin.dtype, slot=False)).to(x.device)
            self.c_host.add(time.perf_counter() - t0)
        if y is None:
            return g.mix(x, ys)
        for e, ye in ys.items():                 # experts computed on the host
            a, b = g.span[e]
            y[a:b] = ye
        return g.mix_rows(x, y)

    def _groupable(self, layer: int, x: torch.Tensor, g: PairGroups) -> bool:
        """A call whose slot computes can be grouped: several tokens (one token's k small matmuls beat one grouped
        call), on the CPU (as resident's), the layer's slots stacked as plain GLU weights in the compute dtype (what
        `materialize` returns as is)."""
        return (self.grouped_fn is not None and not g.whole and x.device.type == "cpu" and layer in self.cache.stacks
                and self.cache.stacks[layer]["down"].dtype == x.dtype)

    def _compute_grouped(self, layer: int, g: PairGroups, experts: list[int], y: torch.Tensor) -> None:
        """The unweighted outputs of the experts' pairs, every one in a slot, into y [N, H] at their pair rows, by one
        grouped GLU over the layer's slots: rows ordered by slot, offs the cumulative rows per slot (empty slots
        included); each slot's rows equal the expert function's on them bit for bit (tests/runtime/test_exactness).
        An expert a precision plan holds quantized computes alone, from its pool's slot, as the loop computes it."""
        if self.tickets:                         # copies on the loader thread: compute what has landed while the
            tickets = self.tickets               # rest lands, as the loop computes each expert as it lands
            landing = [e for e in experts if (layer, e) in tickets and not tickets[(layer, e)].landed]
            if landing:
                self._compute_grouped(layer, g, [e for e in experts if e not in landing], y)
                while landing:                   # wait for the first still landing (load order), then group
                    self._wait(layer, landing[0])            # everything landed by then
                    ready = [e for e in landing if (layer, e) not in tickets or tickets[(layer, e)].landed]
                    landing = [e for e in landing if e not in ready]
                    self._compute_grouped(layer, g, ready, y)
                return
            for e in experts:                    # landed: forget their tickets (and meter their copies)
                self._wait(layer, e)
        pools = self.cache.pools
        if pools is not None and any(pools.of[layer][e] for e in experts):   # held quantized: each its own call
            of, held = pools.of[layer], self.cache.held[layer]
            for e in experts:
                if of[e]:
                    a, b = g.span[e]                 # its rows only (g.xs would gather every pair's)
                    w = self.store.materialize(layer, e, held[e], y.dtype)
                    y[a:b] = self._compute(layer, e, g.gather(g.tok[a:b]), w)
            experts = [e for e in experts if not of[e]]
        if not experts:
            return
        where, stacks, span = self.cache.where[layer], self.cache.stacks[layer], g.span
        host, offs = slot_rows(np.array([where[e] for e in experts], dtype=np.int64),
                               np.array([span[e] for e in experts], dtype=np.int64).reshape(-1, 2), g.tok,
                               stacks["down"].shape[0])
        n = len(host) // 2
        dev = torch.from_numpy(host)                                    # on the CPU, as `_groupable` requires
        idx = dev[:n]
        offs = torch.from_numpy(offs)                                   # [slots]
        xs = g.x.index_select(0, dev[n:])                               # [n, H] the pairs' rows, in slot order
        ev = self.events
        if ev is not None:
            t0 = time.perf_counter()
        y.index_copy_(0, idx, self.grouped_fn(xs, stacks["gate_up"], stacks["down"], offs))
        if ev is not None:
            t1 = time.perf_counter()
            for e in experts:
                ev += [("compute_start", t0, layer, e), ("compute_end", t1, layer, e)]

    def _compute(self, layer: int, e: int, xin: torch.Tensor, w) -> torch.Tensor:
        """f_e(xin) [n, H] with weights w, between compute_start/compute_end events when they are recorded."""
        ev = self.events
        if ev is None:
            return self.expert_fn(xin, w)
        ev.append(("compute_start", time.perf_counter(), layer, e))
        y = self.expert_fn(xin, w)
        ev.append(("compute_end", time.perf_counter(), layer, e))
        return y

    def _load_direct(self, layer: int, loads: list[tuple[int, int | None]], c) -> None:
        """A direct call's loads (expert, victim or None), each its victim evicted and its slot claimed (the victim's
        slot taken over: `ExpertCache.replace`), then the copies made inline, in order (their time into the layer's
        `copy_s`); or, with the loader thread, all copies handed over in one run."""
        cache, loader = self.cache, self.loader
        if loader.inline and not self.tickets:   # copied now, on this thread: no ticket, nothing lands later
            dsts = [(e, cache.assign(layer, e) if v is None else cache.replace(layer, v, e)) for e, v in loads]
            c.copy_s += loader.copy_inline_many(layer, dsts)
        else:
            jobs = []
            for e, v in loads:
                if v is not None:
                    self._wait(layer, v)         # never overwrite a slot whose copy is still landing (and forget
                    cache.evict(layer, v)        # the ticket of one that landed)
                jobs.append((layer, e, cache.assign(layer, e), False))
            for t in loader.submit_many(jobs):
                self.tickets[(layer, t.expert)] = t
                if loader.inline:                # copied already (tickets of an earlier call were pending)
                    c.copy_s += t.t_end - t.t_start
        c.loads += len(loads)
        c.load_bytes += len(loads) * cache.expert_bytes      # a slot's bytes: what each copy moves (no pools here)
        if cache.used_bytes > self.stats.peak_cache_bytes:
            self.stats.peak_cache_bytes = cache.used_bytes

    def _count(self, layer: int, sched: LayerSchedule) -> None:
        """The schedule's pair counts; loads are counted as they are issued (with their bytes)."""
        self.stats.layer(layer).add_pairs(sched.counts)

    # ---- mechanism ---------------------------------------------------------------------------------------------
    def _wait(self, layer: int, e: int) -> None:
        """Wait for the copy that filled e's slot, once: its duration feeds the load-cost meter, then it is forgotten."""
        ticket = self.tickets.pop((layer, e), None)
        if ticket is None:
            return
        if ticket.landed:
            ticket.wait()                        # raises a failed copy's error; on CUDA, orders the compute stream
        else:
            t0 = time.perf_counter()
            try:
                ticket.wait()
            finally:
                self.stats.layer(layer).stall_s += time.perf_counter() - t0
        self.c_load.add(ticket.t_end - ticket.t_start)
        if self.events is not None:
            self.events.append(("load", ticket.t_start, ticket.t_end, layer, e))

    def _slot(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        self._wait(layer, e)
        return self.cache.weights(layer, e)
