"""Prometheus metrics of a server: requests and tokens as they happen, the runtime's cache figures at scrape time.

One registry per server (no process-wide state). Request-level series are observed by the app; what the expert
cache served is read from the runtime's own statistics when /metrics is scraped, under the engine's lock, so the
figures are those of `RunStats` (decode phase; rates add up to 1):
  understudy_pair_share{kind}        exact | understudy | drop | host | miss, of (token, routed expert) pairs
  understudy_precision_share{precision}  computed pairs by the precision that computed them (a precision plan's
                                     quantized copies; else all at the checkpoint's format); they add up to 1
  understudy_loads_per_token         expert loads per decode position;  understudy_bytes_per_token likewise
  understudy_cache_slots_used{layer} experts held per MoE layer (of understudy_cache_slots{layer})
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _RuntimeCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        rt = self.engine.rt
        with self.engine.lock:
            d = rt.stats.to_dict()
            slots = dict(rt.cache.slots) if rt.cache is not None else {}
            used = {l: len(w) for l, w in rt.cache.where.items()} if rt.cache is not None else {}
            used_bytes = rt.cache.used_bytes if rt.cache is not None else d["cache_capacity_bytes"]
        share = GaugeMetricFamily("understudy_pair_share", "Share of decode (token, routed expert) pairs served "
                                  "each way; the kinds add up to 1", labels=["kind"])
        for kind, key in (("exact", "exact_hit_rate"), ("understudy", "substitution_rate"), ("drop", "drop_rate"),
                          ("host", "host_rate"), ("miss", "miss_rate")):
            share.add_metric([kind], d[key])
        yield share
        mix = GaugeMetricFamily("understudy_precision_share", "Share of computed decode pairs by the precision that "
                                "computed them; they add up to 1", labels=["precision"])
        for name, v in d["precision_mix"].items():
            mix.add_metric([name], v)
        yield mix
        pairs = CounterMetricFamily("understudy_pairs", "Decode (token, routed expert) pairs by how they were "
                                    "served", labels=["kind"])
        u = d["understudies"]
        for kind, n in (("exact", d["hits"]), ("understudy", sum(u.values())), ("drop", d["drops"]),
                        ("host", d["host"]), ("miss", d["misses"])):
            pairs.add_metric([kind], n)
        yield pairs
        G, C = GaugeMetricFamily, CounterMetricFamily
        for kind, name, text, value in (
                (G, "understudy_hit_rate", "Pairs served from the cache (exact + understudy)", d["hit_rate"]),
                (G, "understudy_loads_per_token", "Expert loads per decode position", d["loads_per_token"]),
                (G, "understudy_bytes_per_token", "Expert bytes loaded per decode position", d["bytes_per_token"]),
                (C, "understudy_expert_loads", "Expert copies into the cache (decode)", d["loads"]),
                (C, "understudy_expert_bytes_loaded", "Expert bytes moved into the cache (decode)",
                 d["bytes_loaded"]),
                (C, "understudy_decode_positions", "Decode positions run (rows x steps)", d["decode_positions"]),
                (G, "understudy_cache_capacity_bytes", "Bytes of the expert cache's slots",
                 d["cache_capacity_bytes"]),
                (G, "understudy_cache_used_bytes", "Bytes of the experts the cache holds now", used_bytes),
                (G, "understudy_cache_peak_bytes", "Most bytes the cache has held", d["peak_cache_bytes"])):
            yield kind(name, text, value=value)
        budget = self.engine.rt.budget
        if budget is not None:   # the plan's budget; with --cache, the cache's own capacity is the bound
            yield GaugeMetricFamily("understudy_cache_budget_bytes", "The most bytes the expert cache may hold",
                                    value=budget.limit_bytes if budget.limit_bytes is not None
                                    else budget.capacity_bytes)
        per_used = GaugeMetricFamily("understudy_cache_slots_used", "Experts held per MoE layer", labels=["layer"])
        per_slots = GaugeMetricFamily("understudy_cache_slots", "Cache slots per MoE layer", labels=["layer"])
        for l in sorted(slots):
            per_used.add_metric([str(l)], used.get(l, 0))
            per_slots.add_metric([str(l)], slots[l])
        yield per_used
        yield per_slots


class ServerMetrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("understudy_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("understudy_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("understudy_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("understudy_time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("understudy_time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("understudy_request_latency_seconds", "Request arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        running = Gauge("understudy_requests_running", "Rows in the running batch", registry=r)
        running.set_function(lambda: engine.running)
        waiting = Gauge("understudy_requests_waiting", "Requests queued for a row", registry=r)
        waiting.set_function(lambda: engine.waiting)
        r.register(_RuntimeCollector(engine))

    def finished(self, d) -> None:
        """Observe a request the engine finished (its final Delta)."""
        self.prompt_tokens.inc(d.prompt_tokens)
        self.generation_tokens.inc(d.completion_tokens)
        for hist, value in ((self.ttft, d.ttft_s), (self.tpot, d.tpot_s), (self.e2e, d.latency_s)):
            if value is not None:
                hist.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
