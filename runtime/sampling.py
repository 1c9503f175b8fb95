"""Choosing the next token of each row: the penalties and the sampler of `SamplingConfig`, one row at a time.

Rows of a batch may carry different configurations (the server batches requests with their own settings), so a
`RowSampler` holds one row's configuration, its generator and what it has produced. Greedy rows take the argmax of
the raw logits, exactly as HF `generate` does, so greedy output is the reference's.
"""
from __future__ import annotations

import torch

from runtime.config import SamplingConfig


class RowSampler:
    def __init__(self, cfg: SamplingConfig, prompt_ids: list[int], vocab: int, device: torch.device):
        self.cfg = cfg
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
        self.counts = torch.zeros(vocab, device=device) if cfg.penalised else None      # [V] times generated
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device) if cfg.penalised else None  # [V]
        if self.seen is not None and prompt_ids:
            self.seen[torch.tensor(prompt_ids, device=device).clamp(0, vocab - 1)] = True

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits [V]."""
        logits = self.penalised(logits)
        if self.cfg.temperature <= 0.0:
            return int(logits.argmax())
        probs = self.probs(logits)
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def penalised(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [V] after the repetition, frequency and presence penalties (unchanged when none is set)."""
        cfg = self.cfg
        if not cfg.penalised:
            return logits
        logits = logits.float()
        if cfg.repetition_penalty != 1.0:
            r = cfg.repetition_penalty
            logits = torch.where(self.seen, torch.where(logits > 0, logits / r, logits * r), logits)
        return logits - self.counts * cfg.frequency_penalty - (self.counts > 0).float() * cfg.presence_penalty

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution [V] of (penalised) logits: temperature, then top-k, then top-p."""
        cfg = self.cfg
        logits = logits.float() / cfg.temperature
        if 0 < cfg.top_k < logits.shape[-1]:
            kth = torch.topk(logits, cfg.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if cfg.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p      # smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        return probs / probs.sum()

    def record(self, token: int) -> None:
        """Remember a produced token (for the penalties)."""
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True


def select(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """Next tokens [B] from logits [B, V], one sampler per row; greedy batches take one batched argmax."""
    if all(r.cfg.temperature <= 0.0 and not r.cfg.penalised for r in rows):
        nxt = logits.argmax(dim=-1)
    else:
        nxt = torch.tensor([r(logits[i]) for i, r in enumerate(rows)], device=logits.device)
    for r, t in zip(rows, nxt.tolist()):
        r.record(t)
    return nxt
