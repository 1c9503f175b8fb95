"""Our replacement for an HF MoE block.

It keeps HF's router and shared-expert submodules under their HF names (dense, resident weights, loaded by name),
routes with the family's rule (`runtime.router.route`) and hands the routed experts to an executor:
`executor(layer, x [T, H], routing) -> [T, H]` (weighted sum of routed experts). The executor is what differs
between resident execution, the offloading runtime and the profiler; the block is the same everywhere.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from runtime.families.arch import MoEArch
from runtime.router import Routing, route

Executor = Callable[[int, torch.Tensor, Routing], torch.Tensor]


class MoEBlock(nn.Module):
    def __init__(self, hf_block: nn.Module, arch: MoEArch, layer: int):
        super().__init__()
        self.arch, self.layer = arch, layer
        self.add_module(arch.router_attr, getattr(hf_block, arch.router_attr))
        for name in arch.shared_attrs:
            self.add_module(name, getattr(hf_block, name))
        if arch.shared_gate_attr:
            self.add_module(arch.shared_gate_attr, getattr(hf_block, arch.shared_gate_attr))
        self.executor: Executor | None = None

    def route(self, x: torch.Tensor, mixture: bool = True) -> Routing:
        """Routing of x [T, H] (`mixture` False: the choice and scores only, runtime.router.route)."""
        router = getattr(self, self.arch.router_attr)
        return route(x, router.weight, self.arch.router, self.arch.top_k,
                     bias=getattr(router, "bias", None),
                     correction_bias=getattr(router, "e_score_correction_bias", None), mixture=mixture)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """Output of the shared experts on x [T, H] (gated where the family gates it), or None."""
        out = None
        for name in self.arch.shared_attrs:
            y = getattr(self, name)(x)
            out = y if out is None else out + y
        if out is not None and self.arch.shared_gate_attr:
            out = torch.sigmoid(getattr(self, self.arch.shared_gate_attr)(x)) * out
        return out

    def forward(self, hidden_states: torch.Tensor):
        assert self.executor is not None, "MoEBlock has no executor; load the model through runtime"
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)  # [T, H]
        routing = self.route(x)
        out = self.executor(self.layer, x, routing)
        shared = self.shared(x)
        if shared is not None:
            out = out + shared
        out = out.reshape(b, s, h)
        return (out, routing.weights) if self.arch.returns_router_scores else out
