"""Batched decoding with a KV cache: greedy or sampled (temperature, top-p, seeded), stopping on EOS.

Prompts are left-padded; positions follow the attention mask, as HF `generate` does, so greedy tokens match it.
`on_step(tokens [B])` is called after every decode step (for streaming and timing).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache

from runtime.config import SamplingConfig


def _select(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits [B, V]."""
    if cfg.temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, dim=-1)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p      # smallest set whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: SamplingConfig,
           eos_id: int | None, pad_id: int, on_step: Callable[[torch.Tensor], None] | None = None,
           on_phase: Callable[[str], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Generate up to cfg.max_new_tokens for left-padded input_ids [B, S]; returns new tokens [B, n] and timings
    (ttft_s: prompt to first token; step_s: each later decode step). `on_phase` hears "prefill" and "decode"."""
    device = input_ids.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    cache = DynamicCache(config=model.config)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    t0 = time.perf_counter()
    if on_phase is not None:
        on_phase("prefill")
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    out, step_s, ttft = [], [], 0.0
    for n in range(cfg.max_new_tokens):
        nxt = _select(logits, cfg, gen)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        now = time.perf_counter()
        if n == 0:
            ttft = now - t0
        else:
            step_s.append(now - t0)
        t0 = now
        if n == 0 and on_phase is not None:
            on_phase("decode")
        if on_step is not None:
            on_step(nxt)
        if eos_id is not None:
            finished |= nxt == eos_id
        if bool(finished.all()) or n == cfg.max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=nxt[:, None], attention_mask=attention_mask, position_ids=positions, cache=cache,
                       use_cache=True).logits[:, -1]
    return torch.stack(out, dim=1), {"ttft_s": ttft, "step_s": step_s}
