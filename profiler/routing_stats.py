"""Routing statistics of one MoE layer: frequency, router-score moments, the score / S(k+1) band, co-activation and
layer-to-layer transitions. Sums and counts only (float64 / int64), so they add across calibration shards."""
from __future__ import annotations

import numpy as np
import torch

RATIO_EDGES = np.round(np.linspace(1.0, 3.0, 41), 4)  # bin b = [edge_b, edge_{b+1}); the last bin is [3, inf)


def active_mask(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E] float64 one-hot of the chosen experts idx [T, k]."""
    m = torch.zeros(idx.shape[0], num_experts, dtype=torch.float64, device=idx.device)
    return m.scatter_(1, idx, 1.0)


class RoutingStats:
    def __init__(self, num_experts: int, top_k: int):
        e, b = num_experts, len(RATIO_EDGES)
        self.e, self.k = e, top_k
        self.tokens = np.zeros(1, np.int64)
        self.act_count = np.zeros(e, np.int64)
        self.score_sum = np.zeros(e, np.float64)
        self.score_sqsum = np.zeros(e, np.float64)
        self.active_score_sum = np.zeros(e, np.float64)
        self.ratio_hist = np.zeros((e, b), np.int64)
        self.coact = np.zeros((e, e), np.int64)
        self.transition = np.zeros((e, e), np.int64)
        self._edges = torch.tensor(RATIO_EDGES, dtype=torch.float64)

    @torch.no_grad()
    def update(self, score: torch.Tensor, idx: torch.Tensor) -> None:
        """score [T, E] router scores, idx [T, k] chosen experts."""
        s = score.double().cpu()
        idx = idx.cpu()
        act = active_mask(idx, self.e)                                       # [T, E]
        self.tokens += s.shape[0]
        self.act_count += act.sum(0).round().long().numpy()
        self.score_sum += s.sum(0).numpy()
        self.score_sqsum += (s * s).sum(0).numpy()
        self.active_score_sum += (s * act).sum(0).numpy()
        self.coact += (act.t() @ act).round().long().numpy()
        # S(k+1): the (k+1)-th largest score per token; ratio of each chosen expert's score to it.
        s_next = torch.topk(s, min(self.k + 1, self.e), dim=-1).values[:, -1:]   # [T, 1]
        ratio = s.gather(1, idx) / s_next.clamp(min=1e-30)                       # [T, k]
        bins = (torch.bucketize(ratio, self._edges, right=True) - 1).clamp(0, len(RATIO_EDGES) - 1)
        flat = (idx * len(RATIO_EDGES) + bins).reshape(-1)
        self.ratio_hist += torch.bincount(flat, minlength=self.e * len(RATIO_EDGES)).reshape(
            self.e, len(RATIO_EDGES)).numpy()

    @torch.no_grad()
    def update_transition(self, idx_here: torch.Tensor, idx_next: torch.Tensor) -> None:
        """Count tokens going from expert i here to expert j in the next MoE layer; idx [T, k] each."""
        a, b = active_mask(idx_here.cpu(), self.e), active_mask(idx_next.cpu(), self.e)
        self.transition += (a.t() @ b).round().long().numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: getattr(self, n) for n in ("tokens", "act_count", "score_sum", "score_sqsum", "active_score_sum",
                                              "ratio_hist", "coact", "transition")}
