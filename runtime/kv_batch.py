"""Rows of a running batch's KV cache joining and leaving (continuous batching over HF's DynamicCache).

The batch is left-padded: every row's keys/values end at the same column; a row that joined later has zero columns
in front, masked out by its attention mask. Joining pads the shorter side on the left; leaving selects the kept
rows and cuts the leading columns no remaining row attends to. Only full-attention layers (`DynamicLayer`) can be
re-padded; a sliding-window or linear-attention cache cannot, and `can_merge` says so (the engine then lets a batch
drain before admitting more rows).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def can_merge(cache: DynamicCache) -> bool:
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Prepend n zero columns to t [B, heads, S, D] (or a mask [B, S])."""
    if n == 0:
        return t
    dim = -2 if t.dim() == 4 else -1
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge(a: DynamicCache, mask_a: torch.Tensor, b: DynamicCache, mask_b: torch.Tensor
          ) -> tuple[DynamicCache, torch.Tensor]:
    """Rows of `a` then rows of `b` in one cache; masks [B, S] of 0/1 over the cached columns. Returns `a` extended
    in place and the joint mask [Ba + Bb, max(Sa, Sb)]."""
    sa, sb = mask_a.shape[1], mask_b.shape[1]
    s = max(sa, sb)
    for la, lb in zip(a.layers, b.layers):
        la.keys = torch.cat([_pad_left(la.keys, s - sa), _pad_left(lb.keys, s - sb)], dim=0)
        la.values = torch.cat([_pad_left(la.values, s - sa), _pad_left(lb.values, s - sb)], dim=0)
    return a, torch.cat([_pad_left(mask_a, s - sa), _pad_left(mask_b, s - sb)], dim=0)


def keep_rows(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep `rows` of the cache (in place) and of mask [B, S]; drop leading columns no kept row attends to.
    Returns the new mask."""
    idx = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask[idx]
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if len(used) else mask.shape[1]
    for layer in cache.layers:
        layer.keys = layer.keys[idx, :, first:]
        layer.values = layer.values[idx, :, first:]
    return mask[:, first:]
