"""The routing trace of the calibration tokens: per token and MoE layer, the k chosen experts (by descending score)
then the next m by score, with their scores and the weight-per-gate coefficient; and the same view of the
approximate next-layer gate (the next MoE layer's router on this layer's input), which the runtime prefetches with.
The compiler's simulator replays it."""
from __future__ import annotations

import numpy as np
import torch

from runtime.router import Routing, top_view


class TraceRecorder:
    def __init__(self, moe_layers: list[int], width: int):
        self.layers, self.width = list(moe_layers), width
        self._ids: dict[int, list[np.ndarray]] = {l: [] for l in self.layers}
        self._scores: dict[int, list[np.ndarray]] = {l: [] for l in self.layers}
        self._coef: dict[int, list[np.ndarray]] = {l: [] for l in self.layers}
        self._pred_ids: dict[int, list[np.ndarray]] = {l: [] for l in self.layers}
        self._pred_scores: dict[int, list[np.ndarray]] = {l: [] for l in self.layers}
        self._token: list[np.ndarray] = []
        self._sample: list[np.ndarray] = []

    def add_layer(self, layer: int, routing: Routing, predicted: Routing | None = None) -> None:
        """routing of this layer; `predicted`: the next MoE layer's router applied to this layer's input (the
        approximate next-layer gate the runtime prefetches with), None for the last MoE layer."""
        ids, scores = top_view(routing, self.width)
        self._ids[layer].append(ids.to(torch.int32).cpu().numpy())
        self._scores[layer].append(scores.float().cpu().numpy())
        self._coef[layer].append(routing.coef.float().cpu().numpy())
        if predicted is None:
            self._pred_ids[layer].append(np.full(ids.shape, -1, np.int32))
            self._pred_scores[layer].append(np.zeros(ids.shape, np.float32))
        else:
            p_ids, p_scores = top_view(predicted, self.width)
            self._pred_ids[layer].append(p_ids.to(torch.int32).cpu().numpy())
            self._pred_scores[layer].append(p_scores.float().cpu().numpy())

    def add_tokens(self, tokens: np.ndarray, sample_index: np.ndarray) -> None:
        """tokens [B, S] of the batch just run, sample_index [B] their sample numbers."""
        self._token.append(tokens.reshape(-1).astype(np.int32))
        self._sample.append(np.repeat(sample_index.astype(np.int32), tokens.shape[1]))

    def arrays(self) -> dict[str, np.ndarray]:
        ids = np.stack([np.concatenate(self._ids[l]) for l in self.layers], axis=1)        # [T, M, W]
        scores = np.stack([np.concatenate(self._scores[l]) for l in self.layers], axis=1)  # [T, M, W]
        coef = np.stack([np.concatenate(self._coef[l]) for l in self.layers], axis=1)      # [T, M]
        pred_ids = np.stack([np.concatenate(self._pred_ids[l]) for l in self.layers], axis=1)
        pred_scores = np.stack([np.concatenate(self._pred_scores[l]) for l in self.layers], axis=1)
        return {"ids": ids, "scores": scores, "coef": coef, "pred_ids": pred_ids, "pred_scores": pred_scores,
                "token": np.concatenate(self._token), "sample": np.concatenate(self._sample)}
