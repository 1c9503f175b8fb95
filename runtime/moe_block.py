"""Our replacement for an HF MoE block.

It keeps HF's router and shared-expert submodules under their HF names (dense, resident weights, loaded by name),
routes with the family's rule (`runtime.router.route`) and hands the routed experts to an executor:
`executor(layer, x [T, H], routing) -> [T, H]` (weighted sum of routed experts). The executor is what differs
between resident execution, the offloading runtime and the profiler; the block is the same everywhere.

A block paired with the next MoE layer's (`pair`: the offloading runtime, for a policy that prefetches from the
next layer's predicted routing and substitutes) computes both routers' logits in one matmul, its router's rows and
the next one's being adjacent rows of one buffer (`runtime.model_loader`), and hands the executor the prediction
too: `executor(layer, x, routing, prediction)`: one matmul's fixed cost instead of two per layer (on a CPU that
cost dominates a router-sized bf16 matmul; docs/BENCHMARKS.md, the prediction's line of the overhead section). The
shared matmul's columns are not promised to equal the lone matmul's bit for bit (BLAS kernels are chosen by shape;
tests/runtime/test_fast_path.py checks that a paired bf16 smoe decode decides as an unpaired one here), which is
why only a substituting policy, whose output departs from HF's anyway, pairs; lossless ones route as HF does.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from runtime.families.arch import MoEArch
from runtime.router import Routing, route, route_pair_logits, router_logits

Executor = Callable[..., torch.Tensor]   # (layer, x [T, H], routing[, prediction]) -> [T, H]


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
        # (weight [2E, H]: this router's rows, then the next MoE layer's; this router's and the next one's correction
        # biases) or None; a tuple, so that nn.Module does not register the next block's tensors as this one's
        self.paired: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None

    def pair(self, weight: torch.Tensor | None, nxt: "MoEBlock | None" = None) -> None:
        """Route with the next MoE block nxt's prediction from one matmul over `weight` [2E, H] (this router's weight
        rows, then nxt's: views of one buffer); `pair(None)`: route as HF does."""
        self.paired = None if weight is None else (weight, self._router_args()[2], nxt._router_args()[2])

    def _router_args(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        router = getattr(self, self.arch.router_attr)
        return router.weight, getattr(router, "bias", None), getattr(router, "e_score_correction_bias", None)

    def route(self, x: torch.Tensor, mixture: bool = True) -> Routing:
        """Routing of x [T, H] (`mixture` False: the choice and scores only, runtime.router.route)."""
        weight, bias, correction = self._router_args()
        return route(x, weight, self.arch.router, self.arch.top_k, bias=bias, correction_bias=correction,
                     mixture=mixture)

    def route_paired(self, x: torch.Tensor) -> tuple[Routing, Routing]:
        """(routing of x, the next MoE block's prediction `route(x, mixture=False)`) from one matmul over the paired
        routers' rows: logits [T, 2E], this router's the first E columns."""
        weight, correction, next_correction = self.paired
        rule = self.arch.router
        return route_pair_logits(router_logits(x, weight, rule), rule, self.arch.top_k,         # logits [T, 2E]
                                 correction, next_correction)

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
        if self.paired is not None:
            routing, prediction = self.route_paired(x)
            out = self.executor(self.layer, x, routing, prediction)
        else:
            routing = self.route(x)
            out = self.executor(self.layer, x, routing)
        shared = self.shared(x)
        if shared is not None:
            out = out + shared
        out = out.reshape(b, s, h)
        return (out, routing.weights) if self.arch.returns_router_scores else out
