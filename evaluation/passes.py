"""The three passes moe-eval makes over one policy's runtime, each with its progress bar:

perplexity_pass  windows teacher-forced one step at a time with the KV cache (Runtime.teacher_force), `batch` windows
                 as the rows of one batch; keeps each window's NLL sum and the argmax at every predicted position.
greedy_pass      every prompt continued greedily, all prompts as the rows of one batch.
task_pass        per task: the context stepped once (batch 1), its KV cache repeated to one row per choice, then the
                 choices' tokens stepped as one batch (choice_scores; also the lm-evaluation-harness adapter's
                 loglikelihood, with pair_scores for its rolling windows).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

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
def choice_scores(rt, task: EncodedTask) -> list[tuple[float, bool]]:
    """(log p(continuation j | context), is_greedy j) for every choice j; is_greedy: the argmax at every position of
    the continuation is its token (greedy decoding would write it). The context is stepped once and its KV cache
    repeated to one row per choice; rows shorter than the longest continuation are right-padded with their last token,
    which, coming after every scored position, cannot change a row's scores (causal attention)."""
    device = rt.lm.device
    cache = DynamicCache(config=rt.lm.config)
    last = rt.teacher_force(torch.tensor([task.context], device=device), cache=cache)[0, -1].float()    # [V]
    first = torch.log_softmax(last, dim=-1)                                                             # [V]
    top = int(last.argmax())
    ll = [float(first[c[0]]) for c in task.continuations]
    greedy = [top == c[0] for c in task.continuations]
    width = max(len(c) for c in task.continuations) - 1        # tokens to feed after each continuation's first
    if width > 0:
        rows = [list(c[:-1]) + [c[-1]] * (width - len(c) + 1) for c in task.continuations]
        cache.batch_repeat_interleave(len(rows))
        logits = rt.teacher_force(torch.tensor(rows, device=device), cache=cache).float()   # [choices, width, V]
        logp = torch.log_softmax(logits, -1)
        for j, c in enumerate(task.continuations):
            pos = torch.arange(len(c) - 1, device=device)
            target = torch.tensor(c[1:], dtype=torch.long, device=device)
            ll[j] += float(logp[j, pos, target].sum())
            greedy[j] = greedy[j] and bool((logits[j, pos].argmax(-1) == target).all())
    return list(zip(ll, greedy))


@torch.no_grad()
def choice_logliks(rt, task: EncodedTask) -> list[float]:
    """log p(continuation j | context) for every choice j (choice_scores without is_greedy)."""
    return [ll for ll, _ in choice_scores(rt, task)]


@torch.no_grad()
def pair_scores(rt, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) of (context, continuation) token pairs, stepped side by side as the
    rows of one batch (one decode step per position, Runtime.teacher_force). Row i is context_i + continuation_i[:-1]
    (continuation_i[-1] is only predicted), right-padded with its last token to the longest row: padding comes after
    every scored position, so causal attention keeps it out of the row's scores."""
    device = rt.lm.device
    seqs = [list(ctx) + list(cont[:-1]) for ctx, cont in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs], device=device)              # [B, width]
    logits = rt.teacher_force(ids)                                                                  # [B, width, V]
    out = []
    for i, (ctx, cont) in enumerate(pairs):
        # the logits at position p predict token p + 1: continuation token k is predicted at len(ctx) - 1 + k
        start = len(ctx) - 1
        out.append(_target_scores(logits[i, start:start + len(cont)],
                                  torch.tensor(list(cont), dtype=torch.long, device=device)))
    return out


def _target_scores(logits: torch.Tensor, target: torch.Tensor, chunk: int = 512) -> tuple[float, bool]:
    """(sum_k log softmax(logits[k])[target[k]], all_k argmax logits[k] == target[k]) of logits [n, V] (any dtype)
    and target [n]; in float32, `chunk` positions at a time (a long window's [n, V] float32 copy would be GBs)."""
    ll, greedy = 0.0, True
    for s in range(0, logits.shape[0], chunk):
        part, t = logits[s:s + chunk].float(), target[s:s + chunk]                     # [c, V], [c]
        ll += float((part.gather(-1, t[:, None])[:, 0] - torch.logsumexp(part, dim=-1)).sum())
        greedy = greedy and bool((part.argmax(-1) == t).all())
    return ll, greedy


def task_pass(rt, tasks: list[EncodedTask], bar: tqdm) -> list[list[float]]:
    """logliks[i][j] of task i's choice j."""
    out = []
    for t in tasks:
        out.append(choice_logliks(rt, t))
        bar.update(1)
    return out
