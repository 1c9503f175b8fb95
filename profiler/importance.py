"""Expert importance from the tokens actually routed to each expert.

I_e = (1 / |R_e|) * sum_{x in R_e} g_e(x) * ||f_e(x)||_2
where R_e is the set of tokens routed to e, g_e(x) its mixture weight and f_e(x) its (unweighted) output.
e's share of the layer's routed output norm is sum_{x in R_e} g_e(x)||f_e(x)|| / sum_e' (same).
Stored as a sum (importance_sum) over act_count, so shards add.
"""
from __future__ import annotations

import numpy as np
import torch


class ImportanceStats:
    def __init__(self, num_experts: int):
        self.importance_sum = np.zeros(num_experts, np.float64)

    @torch.no_grad()
    def update(self, e: int, gate: torch.Tensor, y: torch.Tensor) -> None:
        """gate [n] mixture weights of expert e on its n routed tokens, y [n, H] its unweighted outputs."""
        norm = torch.linalg.vector_norm(y.double(), dim=-1)   # [n]
        self.importance_sum[e] += float((gate.double() * norm).sum())

    def arrays(self) -> dict[str, np.ndarray]:
        return {"importance_sum": self.importance_sum}
