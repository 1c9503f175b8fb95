"""Replay a profile's routing trace through the runtime's own cache model (runtime.policy.fast.make_cache_model: the
lean model of the lossless slot caches, else runtime.policy.schedule.CacheModel, as the runtime chooses) and time
it on a target. Because the decisions are the runtime's functions, not a re-implementation, predicted hits and loads match
what the runtime measures on the same tokens.

Timing model (per decode token, batch 1, event-driven):
  every layer first spends t_dense_layer = dense_bytes / num_layers / device_mem_bandwidth on the device;
  a load occupies the link for t_load = expert_bytes / link_bandwidth + link_latency, in issue order (with a
  precision plan's pools, expert_bytes of the expert's pool: a quantized copy moves fewer bytes);
  a compute occupies the device for t_expert_device once its load (if any) has landed;
  a host compute occupies the host for t_expert_host, and the layer waits for it.
TPOT = the device's clock advance per token.
Expected error = sum over understudies of g_i * err(i, j) + sum over drops of g_i * 1, where g_i is the replaced
expert's mixture weight and err the profiled relative substitution error (a zero output has error 1); reported per
token and relative to the routed gate mass (relative_error = error / sum of all routed g).
With the profile's measured loss sensitivity (compiler.loss_model), each understudy and drop also adds its measured
cost in nats; loss_per_token and ppl_increase = exp(loss_per_token) - 1 are the predicted accuracy cost.
Every pair a quantized copy computes (exact or understudy) adds the profile's measured cost per pair of that
precision for the expert's importance class (LossModel.quant: KL per pair, profiler.quant_sensitivity).
The replay tallies those pairs by cost cell (LossTally) and prices the tally once at the end; with per-window
measurements (profile format 4) also on every resample of the windows: ppl_low, ppl_high = the predicted increase's
95% interval (LossModel.loss_interval).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.loss_model import LossModel, LossTally
from compiler.targets import Target
from runtime.policy.config import PolicyConfig
from runtime.policy.counts import Counts
from runtime.policy.eviction import NextUse
from runtime.policy.pools import Pools
from runtime.policy.fast import make_cache_model
from runtime.policy.substitution import SubstitutionParams, kth_next


@dataclass
class SimResult(Counts):
    tokens: int = 0
    error: float = 0.0            # expected error mass, summed over tokens
    mass: float = 0.0             # routed gate mass (sum of the chosen experts' weights), summed over tokens
    time_s: float = 0.0           # modeled decode time, summed over tokens
    loss: float | None = None     # expected NLL increase (nats), summed over tokens; None without a loss model
    loss_range: tuple[float, float] | None = None   # its 95% interval (nats, summed); None without per-window data
    load_bytes: int = 0           # bytes the loads moved (each at its pool's precision)
    native: str = "bfloat16"      # the checkpoint's expert format (precision_mix's name for exact copies)

    @property
    def hit_rate(self) -> float:
        return self.served / max(self.pairs, 1)

    @property
    def loads_per_token(self) -> float:
        return self.loads / max(self.tokens, 1)

    @property
    def tpot_ms(self) -> float:
        return 1e3 * self.time_s / max(self.tokens, 1)

    @property
    def error_per_token(self) -> float:
        return self.error / max(self.tokens, 1)

    @property
    def relative_error(self) -> float:
        """Share of the routed output mass replaced by error: sum g_i err(i, j) / sum of all routed g."""
        return self.error / self.mass if self.mass > 0 else 0.0

    @property
    def loss_per_token(self) -> float | None:
        return None if self.loss is None else self.loss / max(self.tokens, 1)

    @property
    def ppl_increase(self) -> float | None:
        return None if self.loss is None else LossModel.ppl_increase(self.loss_per_token)

    @property
    def ppl_interval(self) -> tuple[float, float] | None:
        """(low, high) of the predicted perplexity increase at 95%, or None."""
        if self.loss_range is None:
            return None
        n = max(self.tokens, 1)
        return LossModel.ppl_increase(self.loss_range[0] / n), LossModel.ppl_increase(self.loss_range[1] / n)

    def to_dict(self) -> dict:
        lo, hi = self.ppl_interval or (None, None)
        return {"tokens": self.tokens, "loss_per_token": self.loss_per_token, "ppl_increase": self.ppl_increase,
                "ppl_low": lo, "ppl_high": hi,
                "hit_rate": self.hit_rate, **self.rates(), "loads_per_token": self.loads_per_token,
                "tpot_ms": self.tpot_ms, "error_per_token": self.error_per_token,
                "relative_error": self.relative_error,
                "understudies": dict(self.understudies), "drops": self.drops, "loads": self.loads,
                "bytes_per_token": self.load_bytes / max(self.tokens, 1),
                "precision_mix": self.precision_mix(self.native)}


@dataclass(frozen=True)
class Costs:
    """Seconds per operation on a target for this model."""

    load: float                   # one expert at the checkpoint's format over the link
    device_expert: float
    host_expert: float
    dense_layer: float
    expert_bytes: int = 0         # one expert at the checkpoint's format, bytes
    native: str = "bfloat16"      # the checkpoint's expert format
    link: tuple[float, float] | None = None   # (bandwidth B/s, latency s); None: unit costs, a load costs `load`

    @classmethod
    def of(cls, target: Target | None, model: dict) -> "Costs":
        eb, native = int(model.get("expert_bytes", 0)), str(model.get("checkpoint_dtype", "bfloat16"))
        if target is None:
            return cls(1.0, 0.0, 0.0, 0.0, eb, native)
        return cls(target.t_load(eb), target.t_device(eb), target.t_host(eb),
                   target.t_device(float(model["dense_bytes"]) / max(int(model["num_layers"]), 1)), eb, native,
                   (target.link_bandwidth, target.link_latency))

    def load_of(self, nbytes: int) -> float:
        """Seconds to move `nbytes` (one expert at some precision) over the link."""
        return self.load if self.link is None or nbytes == self.expert_bytes else nbytes / self.link[0] + self.link[1]


def replayed_tokens(trace: dict, tokens: int | None) -> int:
    """How many of the trace's tokens a replay of `tokens` covers."""
    n = trace["ids"].shape[0]
    return n if tokens is None else min(tokens, n)


def oracle_future(trace: dict, moe_layers: list[int], top_k: int, tokens: int | None = None) -> NextUse:
    """The requests of a replay of `tokens` trace tokens, per layer (call t + 1 requests token t's k experts):
    what Belady's rule looks ahead into. Lossless, so every routed expert is requested."""
    ids = trace["ids"][: replayed_tokens(trace, tokens), :, :top_k]          # [T, M, k]
    return NextUse({layer: ids[:, m].tolist() for m, layer in enumerate(moe_layers)})


def simulate(trace: dict, moe_layers: list[int], num_experts: int, top_k: int, slots: dict[int, int], policy: PolicyConfig,
             params: dict[int, SubstitutionParams], costs: Costs, initial: dict[int, list[int]] | None = None,
             error: dict[int, np.ndarray] | None = None, tokens: int | None = None,
             loss_model: LossModel | None = None, pinned: dict[int, list[int]] | None = None,
             future: NextUse | None = None, pools: Pools | None = None) -> SimResult:
    """Replay trace (profile.trace) token by token, batch 1, in sample order. pinned: static's pinned experts;
    future: oracle_future of the same tokens, for Belady's rule; pools: a precision plan's pools."""
    ids, scores, coef = trace["ids"], trace["scores"], trace["coef"]
    pred_ids, pred_scores = trace.get("pred_ids"), trace.get("pred_scores")
    t_total = replayed_tokens(trace, tokens)
    model = make_cache_model(slots, num_experts, top_k, policy, params, initial=initial, pinned=pinned,
                             future=future, pools=pools)          # the runtime's choice of cache model, too
    res = SimResult(native=costs.native)
    tally = LossTally()
    load_s = {p: costs.load_of(b) for p, b in enumerate(pools.bytes)} if pools is not None else {0: costs.load}
    clock, link_free = 0.0, 0.0
    ready: dict[tuple[int, int], float] = {}            # (layer, expert) -> when its last load lands
    prefetch = policy.prefetch and pred_ids is not None
    for t in range(t_total):
        t_start = clock
        ids_t, scores_t, coef_t = ids[t].tolist(), scores[t].tolist(), coef[t].tolist()     # [M][W], [M][W], [M]
        if prefetch:
            pred_ids_t, pred_scores_t = pred_ids[t].tolist(), pred_scores[t].tolist()
        for m, layer in enumerate(moe_layers):
            row = dict(zip(ids_t[m], scores_t[m]))
            chosen = ids_t[m][:top_k]
            pred = None
            if prefetch and m + 1 < len(moe_layers):
                pred = [dict(zip(pred_ids_t[m], pred_scores_t[m]))]
            s = model.schedule(layer, [row], [chosen], pred, costs.load, costs.host_expert)
            c = s.counts
            res.add(c)
            g = {e: coef_t[m] * row.get(e, 0.0) for e in chosen}
            res.mass += sum(g.values())
            d = s.decisions[0]
            if error is not None:
                for i, (j, _) in d.understudy.items():
                    res.error += g[i] * float(error[layer][i, j])
                for i in d.dropped:
                    res.error += g[i]
            if loss_model is not None and (d.understudy or d.dropped):
                tally_replaced(tally, loss_model, row, chosen, d, error[layer] if error is not None else None)
            if loss_model is not None and pools is not None and c.quantized:
                tally_quantized(tally, loss_model, pools, layer, s.ops, d)
            # event-driven timing of this layer's ops
            clock += costs.dense_layer
            host_done = clock
            for kind, l, e, _ in s.ops:
                if kind in ("load", "prefetch"):
                    p = pools.of[l][e] if pools is not None else 0
                    start = max(link_free, clock)
                    link_free = start + load_s[p]
                    ready[(l, e)] = link_free
                    res.load_bytes += pools.bytes[p] if pools is not None else costs.expert_bytes
                elif kind == "compute":
                    clock = max(clock, ready.get((l, e), 0.0)) + costs.device_expert
                else:
                    host_done = max(host_done, clock) + costs.host_expert
            clock = max(clock, host_done)
        res.time_s += clock - t_start
        res.tokens += 1
    if loss_model is not None:
        res.loss, res.loss_range = loss_model.loss(tally), loss_model.loss_interval(tally)
    return res


def tally_quantized(tally: LossTally, model: LossModel, pools: Pools, layer: int, ops, decision) -> None:
    """Tally one token's pairs that quantized copies computed at one layer (batch 1), by cost cell."""
    served = [j for j, _ in decision.understudy.values()]           # an understudy may stand in for several
    for kind, l, e, _ in ops:
        scheme = pools.quantized(l, e) if kind == "compute" and l == layer else None
        if scheme is not None:
            pairs = (e in decision.exact) + served.count(e)
            if pairs:
                tally.add_quantized(model.quant_cell(layer, e, scheme), pairs)


def tally_replaced(tally: LossTally, model: LossModel, row: dict[int, float], chosen: list[int], decision,
                   error: np.ndarray | None) -> None:
    """Tally one token's understudies and drops at one layer, by cost cell (a near-twin weighs err of a drop)."""
    s_next = kth_next(row, len(chosen))
    ratio = {i: row.get(i, 0.0) / s_next if s_next > 0 else float("inf") for i in chosen}
    inactive = sorted((e for e in row if e not in chosen), key=lambda e: (-row[e], e))
    for i, (j, reason) in decision.understudy.items():
        if reason == "similarity":
            err = min(float(error[i, j]), 1.0) if error is not None else 1.0
            tally.add_replaced(model.pair_cell("drop", ratio[i]), err)
        else:
            rank = inactive.index(j) + 1 if j in inactive else None
            tally.add_replaced(model.pair_cell(model.understudy_option(rank), ratio[i]))
    for i in decision.dropped:
        tally.add_replaced(model.pair_cell("drop", ratio[i]))
