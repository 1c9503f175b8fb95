"""Executor with every routed expert on the device: the exact reference (`resident` policy). Experts are made
compute-ready once, at start (a packed store's are dequantized then).

Plain GLU experts are held stacked per layer (gate_up [E, 2I, H], down [E, H, I], as HF holds them) and each expert's
weights are views of the stack: a call of one token runs the per-expert loop (k small matmuls beat one grouped call
over E groups there), a call of several tokens runs two grouped matmuls over all E experts
(`expert_compute.make_grouped_fn`, bit-equal per row on the CPU), then the same weighting and mixing. Only on the
CPU: CUDA's grouped_mm takes bf16 only, wants recent GPUs, and its bits against F.linear's are untested here."""
from __future__ import annotations

import torch

from runtime.expert_compute import group_pairs, make_expert_fn, make_grouped_fn
from runtime.expert_store import ExpertStore
from runtime.formats import materialize
from runtime.router import Routing


class ResidentExecutor:
    def __init__(self, store: ExpertStore, device: torch.device, dtype: torch.dtype, stats=None):
        arch = store.arch
        self.num_experts, self.stats = arch.num_experts, stats
        self.expert_fn = make_expert_fn(arch.experts)
        experts = {(l, e): {k: v.to(device) for k, v in materialize(store.read(l, e), store.held, dtype).items()}
                   for l in arch.moe_layers for e in range(arch.num_experts)}
        # grouped: plain float GLU weights stacked per layer (a quantized store's KernelMatrix values stay per expert)
        self.grouped_fn = make_grouped_fn(arch.experts)
        first = experts[(arch.moe_layers[0], 0)] if arch.moe_layers else {}
        if self.grouped_fn is not None and not all(isinstance(v, torch.Tensor) for v in first.values()):
            self.grouped_fn = None
        self.stacks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # layer -> (gate_up [E, 2I, H], down [E, H, I])
        if self.grouped_fn is not None:
            for l in arch.moe_layers:
                ws = [experts[(l, e)] for e in range(arch.num_experts)]
                gu, dn = torch.stack([w["gate_up"] for w in ws]), torch.stack([w["down"] for w in ws])
                self.stacks[l] = (gu, dn)
                for e in range(arch.num_experts):   # the loop's weights: views of the stacks (one copy in memory)
                    experts[(l, e)] = {"gate_up": gu[e], "down": dn[e]}
        self.experts = experts

    def __call__(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.stats is not None:   # every routed expert is resident: every pair is a hit
            c = self.stats.layer(layer)
            c.pairs += routing.idx.numel()
            c.hits += routing.idx.numel()
        g = group_pairs(x, routing.idx.cpu().numpy(), routing.weights)      # as the offloading lean path groups
        if x.shape[0] > 1 and self.grouped_fn is not None and x.device.type == "cpu":
            gu, dn = self.stacks[layer]
            return g.mix_rows(x, self.grouped_fn(g.xs, gu, dn, g.offsets(self.num_experts, x.device)))
        return g.mix(x, {e: self.expert_fn(g.rows(e), self.experts[(layer, e)]) for e in g.span})
