"""Batched decoding with a KV cache (a static batch: every row starts together), greedy or sampled
(runtime.sampling), stopping on EOS. The server batches continuously instead (runtime.engine).

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
from runtime.sampling import RowSampler, select


@torch.no_grad()
def decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: SamplingConfig,
           eos_ids: set[int], pad_id: int, on_step: Callable[[torch.Tensor], None] | None = None,
           on_phase: Callable[[str], None] | None = None) -> tuple[torch.Tensor, dict]:
    """Generate up to cfg.max_new_tokens for left-padded input_ids [B, S]; returns new tokens [B, n] and timings
    (ttft_s: prompt to first token; step_s: each later decode step). `on_phase` hears "prefill" and "decode"."""
    device = input_ids.device
    vocab = model.config.get_text_config().vocab_size
    samplers = [RowSampler(cfg, row[m.bool()].tolist(), vocab, device) for row, m in zip(input_ids, attention_mask)]
    eos = torch.tensor([] if cfg.ignore_eos else sorted(eos_ids), dtype=torch.long, device=device)
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
        nxt = select(logits, samplers)
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
        finished |= torch.isin(nxt, eos)
        if bool(finished.all()) or n == cfg.max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(input_ids=nxt[:, None], attention_mask=attention_mask, position_ids=positions, cache=cache,
                       use_cache=True).logits[:, -1]
    return torch.stack(out, dim=1), {"ttft_s": ttft, "step_s": step_s}
