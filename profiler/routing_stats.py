"""Routing statistics of one MoE layer: how many tokens reached it and how often each expert was chosen (the
expert's frequency, which the compiler's initial residents read). Counts only (int64), so they add across shards."""
from __future__ import annotations

import numpy as np
import torch


class RoutingStats:
    def __init__(self, num_experts: int):
        self.e = num_experts
        self.tokens = np.zeros(1, np.int64)
        self.act_count = np.zeros(num_experts, np.int64)

    @torch.no_grad()
    def update(self, idx: torch.Tensor) -> None:
        """idx [T, k] chosen experts."""
        self.tokens += idx.shape[0]
        self.act_count += torch.bincount(idx.reshape(-1).cpu(), minlength=self.e).numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens, "act_count": self.act_count}
