"""The three passes moe-eval makes over one policy's runtime, each with its progress bar:

perplexity_pass  windows teacher-forced one step at a time with the KV cache (Runtime.teacher_force), `batch` windows
                 as the rows of one batch; keeps each window's NLL sum and the argmax at every predicted position.
greedy_pass      every prompt continued greedily, all prompts as the rows of one batch.
task_pass        per task: the context stepped once (batch 1), its KV cache repeated to one row per choice, then the
                 choices' tokens stepped as one batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from evaluation.agreement import continuation
from evaluation.tasks import EncodedTask


@dataclass(frozen=True)
class PerplexityPass:
    window_nll: tuple[tuple[float, int], ...]  # per window: (sum of -log p(token) in nats, predicted tokens)
    argmax: torch.Tensor                       # [predicted tokens] argmax of the logits at each predicted position
    seconds: float                             # wall time of the decode steps
    steps: int                                 # decode steps (batched rows step together)

    @property
    def nll(self) -> float:
        return sum(s for s, _ in self.window_nll)

    @property
    def count(self) -> int:
        return sum(c for _, c in self.window_nll)


@torch.no_grad()
def perplexity_pass(rt, wins: list[np.ndarray], batch: int, bar: tqdm) -> PerplexityPass:
    """NLL and argmax of every predicted token: window w predicts its tokens 2..len from the ones before. Rows of one
    batch step together, so a batch is cut to its shortest window (the same cut for every policy)."""
    window_nll: list[tuple[float, int]] = []
    argmax: list[torch.Tensor] = []
    seconds, steps = 0.0, 0
    for start in range(0, len(wins), batch):
        group = wins[start:start + batch]
        n = min(len(w) for w in group)           # rows of one batch step together: cut to the shortest
        ids = torch.from_numpy(np.stack([w[:n] for w in group])).to(rt.lm.device)     # [B, n]
        t0 = time.perf_counter()
        logits = rt.teacher_force(ids)[:, :-1].float()                               # [B, n-1, V]
        seconds += time.perf_counter() - t0
        steps += n
        nll = -torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # [B, n-1] nats
        window_nll += [(float(row.sum()), n - 1) for row in nll.double()]
        argmax += list(logits.argmax(dim=-1).cpu())                                   # B x [n-1]
        bar.update(len(group))
    return PerplexityPass(tuple(window_nll), torch.cat(argmax), seconds, steps)


@torch.no_grad()
def greedy_pass(rt, prompt_ids: np.ndarray, n: int, bar: tqdm) -> list[list[int]]:
    """Greedy continuations of prompt_ids [P, L] (one batch, no padding: the prompts have one length), each up to
    and including EOS, at most n tokens."""
    ids = torch.from_numpy(prompt_ids).to(rt.lm.device)                               # [P, L]
    tokens = rt.generate_ids(ids, max_new_tokens=n, on_step=lambda _: bar.update(1))  # [P, <= n]
    eos = rt.tokenizer.eos_token_id if rt.tokenizer is not None else None
    return [continuation(row, eos) for row in tokens.tolist()]


@torch.no_grad()
def choice_logliks(rt, task: EncodedTask) -> list[float]:
    """log p(continuation j | context) for every choice j. The context is stepped once and its KV cache repeated to
    one row per choice; rows shorter than the longest continuation are right-padded with their last token, which,
    coming after every scored position, cannot change a row's scores (causal attention)."""
    device = rt.lm.device
    cache = DynamicCache(config=rt.lm.config)
    last = rt.teacher_force(torch.tensor([task.context], device=device), cache=cache)[0, -1]   # [V]
    first = torch.log_softmax(last.float(), dim=-1)                                             # [V]
    ll = [float(first[c[0]]) for c in task.continuations]
    width = max(len(c) for c in task.continuations) - 1        # tokens to feed after each continuation's first
    if width > 0:
        rows = [list(c[:-1]) + [c[-1]] * (width - len(c) + 1) for c in task.continuations]
        cache.batch_repeat_interleave(len(rows))
        logp = torch.log_softmax(rt.teacher_force(torch.tensor(rows, device=device), cache=cache).float(), -1)
        for j, c in enumerate(task.continuations):              # logp: [choices, width, V]
            target = torch.tensor(c[1:], dtype=torch.long, device=device)
            ll[j] += float(logp[j, torch.arange(len(c) - 1, device=device), target].sum())
    return ll


def task_pass(rt, tasks: list[EncodedTask], bar: tqdm) -> list[list[float]]:
    """logliks[i][j] of task i's choice j."""
    out = []
    for t in tasks:
        out.append(choice_logliks(rt, t))
        bar.update(1)
    return out
