"""One routed expert's forward pass, and the weighted mixture of routed experts in HF's accumulation order.

Experts are plain dicts of tensors in the layout `ExpertFormat.shapes()` gives, so a cache slot, a host copy and a
freshly read expert are interchangeable.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from runtime.families.arch import ExpertFormat

ExpertWeights = Mapping[str, torch.Tensor]   # or, for a quantized GLU expert, KernelMatrix values


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w^T for a weight [out, in]: a float tensor (F.linear), or a quantized matrix that computes from its codes
    (runtime.quantize.KernelMatrix)."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w.linear(x)


def make_expert_fn(fmt: ExpertFormat) -> Callable[[torch.Tensor, ExpertWeights], torch.Tensor]:
    """f_e(x): [n, H] -> [n, H] for one expert's weights, exactly as HF computes it."""
    if fmt.kind == "gptoss":
        alpha, limit = fmt.swiglu_alpha, fmt.swiglu_limit

        def gptoss(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
            gate_up = x @ w["gate_up"] + w["gate_up_bias"]  # [n, 2I], gate/up interleaved
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(min=None, max=limit)
            up = up.clamp(min=-limit, max=limit)
            glu = gate * torch.sigmoid(gate * alpha)
            return ((up + 1) * glu) @ w["down"] + w["down_bias"]

        return gptoss

    act = ACT2FN[fmt.activation]

    def glu(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        gate, up = linear(x, w["gate_up"]).chunk(2, dim=-1)  # [n, I] each
        return linear(act(gate) * up, w["down"])

    return glu


def expert_rows(idx: torch.Tensor, num_experts: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each expert chosen in idx [T, k]: (token rows, top-k positions), ascending by expert id.

    Rows are ordered by (position, token), as HF's `torch.where(expert_mask[e])` orders them.
    """
    by_pos = idx.t()  # [k, T]
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for e in torch.unique(idx).tolist():
        if 0 <= e < num_experts:
            pos, rows = torch.where(by_pos == e)
            out[e] = (rows, pos)
    return out


def mix(x: torch.Tensor, contributions: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum over (expert e, rows r, weighted output y [len(r), H]) of y scattered into rows r, in the order given.

    HF adds experts in ascending id into zeros; callers pass contributions in that order to match it bit for bit.
    """
    out = torch.zeros_like(x)
    for _, rows, y in contributions:
        out.index_add_(0, rows, y.to(out.dtype))
    return out


def routed_output(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, num_experts: int,
                  weights_of: Callable[[int], ExpertWeights],
                  expert_fn: Callable[[torch.Tensor, ExpertWeights], torch.Tensor],
                  on_output: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                  ) -> torch.Tensor:
    """sum_i weights[t, i] * f_{idx[t, i]}(x_t) for x [T, H], idx/weights [T, k]; experts run in ascending id.

    `on_output(e, rows, pos, y)` sees each expert's unweighted output y [len(rows), H] (the profiler's tap).
    """
    contributions = []
    for e, (rows, pos) in expert_rows(idx, num_experts).items():
        y = expert_fn(x[rows], weights_of(e))
        if on_output is not None:
            on_output(e, rows, pos, y)
        contributions.append((e, rows, y * weights[rows, pos, None]))
    return mix(x, contributions)
