"""Functional similarity of experts: every expert run on the same probe hidden states.

For probe tokens x_p (real hidden states reaching the layer) and experts i, j:
  cos_ij = mean_p  <f_i(x_p), f_j(x_p)> / (||f_i(x_p)|| ||f_j(x_p)||)
  err_ij = mean_p  ||f_i(x_p) - f_j(x_p)|| / ||f_i(x_p)||      (the relative error of j standing in for i;
                                                                 not symmetric; 1 = as bad as a zero output)
Accumulated as float64 sums over probe tokens. err is capped at ERR_CAP (an expert with zero output).
"""
from __future__ import annotations

import numpy as np
import torch

ERR_CAP = 1e3
_CHUNK = 64  # probe tokens per Gram block: [chunk, E, E] float64


class SimilarityStats:
    def __init__(self, num_experts: int):
        self.probe_count = np.zeros(1, np.int64)
        self.cos_sum = np.zeros((num_experts, num_experts), np.float64)
        self.err_sum = np.zeros((num_experts, num_experts), np.float64)

    @torch.no_grad()
    def update(self, outputs: torch.Tensor) -> None:
        """outputs [E, P, H]: every expert's output on the same P probe tokens."""
        for start in range(0, outputs.shape[1], _CHUNK):
            f = outputs[:, start:start + _CHUNK].double()                  # [E, p, H]
            gram = torch.einsum("iph,jph->pij", f, f)                      # [p, E, E]
            sq = torch.diagonal(gram, dim1=1, dim2=2)                      # [p, E] squared norms
            norm = sq.clamp(min=0).sqrt()
            denom = norm[:, :, None] * norm[:, None, :]
            cos = torch.where(denom > 0, gram / denom.clamp(min=1e-300), torch.zeros_like(gram))
            dist = (sq[:, :, None] + sq[:, None, :] - 2 * gram).clamp(min=0).sqrt()   # ||f_i - f_j||
            err = (dist / norm[:, :, None].clamp(min=1e-300)).clamp(max=ERR_CAP)
            err = torch.where(dist == 0, torch.zeros_like(err), err)
            self.cos_sum += cos.sum(0).cpu().numpy()
            self.err_sum += err.sum(0).cpu().numpy()
            self.probe_count += f.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"probe_count": self.probe_count, "cos_sum": self.cos_sum, "err_sum": self.err_sum}
