"""The profiler's executor for our MoE block: streams one layer's experts in from the store, computes the exact
routed output (so later layers see true hidden states), and feeds the statistics on the way.

Peak memory is the dense weights plus one layer's routed experts: they are read when the layer runs and dropped
when it returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from profiler.importance import ImportanceStats
from profiler.routing_stats import RoutingStats
from profiler.similarity import SimilarityStats
from profiler.trace import TraceRecorder
from runtime.expert_compute import make_expert_fn, routed_output
from runtime.expert_store import ExpertStore
from runtime.router import Routing


@dataclass
class LayerRecorder:
    routing: RoutingStats
    importance: ImportanceStats
    similarity: SimilarityStats


class ProbeExecutor:
    def __init__(self, store: ExpertStore, device: torch.device, trace: TraceRecorder, next_router=None):
        arch = store.arch
        self.store, self.device, self.trace, self.next_router = store, device, trace, next_router
        self.num_experts = arch.num_experts
        self.expert_fn = make_expert_fn(arch.experts)
        self.layers = {l: LayerRecorder(RoutingStats(arch.num_experts), ImportanceStats(arch.num_experts),
                                        SimilarityStats(arch.num_experts)) for l in arch.moe_layers}
        self._probe_rows: torch.Tensor | None = None      # flat token rows of this batch to probe

    def begin_batch(self, probe_rows: torch.Tensor) -> None:
        """The flat token rows of the next batch on which every expert is run (for similarity)."""
        self._probe_rows = probe_rows

    @torch.no_grad()
    def __call__(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        rec = self.layers[layer]
        experts = {e: {k: v.to(self.device, non_blocking=True) for k, v in self.store.read(layer, e).items()}
                   for e in range(self.num_experts)}
        rec.routing.update(routing.idx)
        nxt = self.next_router(layer, x) if self.next_router is not None else None
        self.trace.add_layer(layer, routing, nxt[1] if nxt is not None else None)

        def tap(e: int, rows: torch.Tensor, pos: torch.Tensor, y: torch.Tensor) -> None:
            rec.importance.update(e, routing.weights[rows, pos], y)

        out = routed_output(x, routing.idx, routing.weights, self.num_experts, experts.__getitem__,
                            self.expert_fn, on_output=tap)
        if self._probe_rows is not None and self._probe_rows.numel():
            xp = x[self._probe_rows]                                                          # [P, H]
            rec.similarity.update(torch.stack([self.expert_fn(xp, experts[e]) for e in range(self.num_experts)]))
        del experts
        return out
