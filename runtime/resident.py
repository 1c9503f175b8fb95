"""Executor with every routed expert on the device: the exact reference (`resident` policy). Experts are made
compute-ready once, at start (a packed store's are dequantized then)."""
from __future__ import annotations

import torch

from runtime.expert_compute import group_pairs, make_expert_fn
from runtime.expert_store import ExpertStore
from runtime.formats import materialize
from runtime.router import Routing


class ResidentExecutor:
    def __init__(self, store: ExpertStore, device: torch.device, dtype: torch.dtype, stats=None):
        arch = store.arch
        self.num_experts, self.stats = arch.num_experts, stats
        self.expert_fn = make_expert_fn(arch.experts)
        self.experts = {(l, e): {k: v.to(device) for k, v in materialize(store.read(l, e), store.held, dtype).items()}
                        for l in arch.moe_layers for e in range(arch.num_experts)}

    def __call__(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.stats is not None:   # every routed expert is resident: every pair is a hit
            c = self.stats.layer(layer)
            c.pairs += routing.idx.numel()
            c.hits += routing.idx.numel()
        g = group_pairs(x, routing.idx.cpu().numpy(), routing.weights)      # as the offloading lean path groups
        return g.mix(x, {e: self.expert_fn(g.rows(e), self.experts[(layer, e)]) for e in g.span})
