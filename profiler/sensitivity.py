"""What a substitution costs in held-out loss, measured on the model itself.

Output-space similarity (profiler.similarity) says how alike two experts' outputs are; it does not say what replacing
one by the other costs the next-token loss. On a model trained from scratch every pair of experts is about as far
apart as two random vectors (relative error ~1.4), yet replacing a low-score expert by the token's next router choice
costs far less loss than leaving it out. So the profiler measures the loss directly.

Options o: "drop" (leave the expert out) or "next d" (d = 1, 2, 3: the token's d-th best inactive expert stands in
with its own gate, coef * gate_j, as the plan weights a band understudy; a token's further low pairs take the next
inactive experts in turn).
Cuts r: a chosen expert i is low when s_i <= r * S(k+1). For each (o, r), every low pair of every MoE layer is
replaced at once and the next-token NLL over the sensitivity tokens is measured. Stored as sums (so shards merge):
  dnll_sum[o, r]   = sum over predicted tokens of NLL(o, r) - NLL(exact)     nats
  pair_count[o, r] = replaced (token, expert) pairs, all MoE layers, all positions
  nll_sum, predicted, positions: the exact NLL sum, predicted tokens, token positions
and per calibration window n (format version 4; their sums over n are the two above), for the compiler's interval
of a plan's predicted loss (a bootstrap over windows, compiler.loss_model):
  dnll_window[n, o, r], pair_window[n, o, r]
Passes are independent, so processes may share them out (profiler.distributed: each runs the exact pass and its
passes over all the tokens; `join_passes` takes each entry from the process that ran it).
The compiler turns these into a cost per replaced pair and ratio bin (compiler.loss_model).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from runtime.expert_compute import make_expert_fn, routed_output
from runtime.expert_store import ExpertStore
from runtime.router import Routing

OPTIONS = ("drop", "next1", "next2", "next3")
CUTS = (1.25, 1.5, 2.0, 3.0, 5.0)


class WindowTally:
    """Pairs per token of the forward pass in flight, summed over its MoE layers' calls; `take(b)` returns them per
    window of a finished batch of b windows ([b], tokens laid out [b, L] as the MoE block flattens them) and resets."""

    def __init__(self):
        self.per_token: torch.Tensor | None = None              # [T] pairs

    def add(self, n: torch.Tensor) -> None:
        self.per_token = n if self.per_token is None else self.per_token + n

    def take(self, b: int) -> np.ndarray:
        t, self.per_token = self.per_token, None
        return np.zeros(b) if t is None else t.reshape(b, -1).sum(1).double().cpu().numpy()


def replace_low(routing: Routing, option: str, cut: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx [T, k], weights [T, k], replaced pairs per token [T]) after applying `option` to the low pairs
    (s_i <= cut * S(k+1))."""
    idx, weights, score = routing.idx, routing.weights, routing.score
    k = idx.shape[1]
    ranked = score.argsort(dim=-1, descending=True, stable=True)                  # [T, E]
    s_next = score.gather(1, ranked[:, k:k + 1])                                   # [T, 1] S(k+1)
    chosen_score = score.gather(1, idx)                                            # [T, k]
    low = chosen_score <= cut * s_next                                             # [T, k]
    if option == "drop":
        return idx, torch.where(low, torch.zeros_like(weights), weights), low.sum(1)
    d = int(option.removeprefix("next"))
    inactive = ranked[:, k:]                                                       # [T, E-k], best first
    # the low pairs of a token, best score first, take inactive ranks d, d+1, ...
    order = torch.where(low, chosen_score, torch.full_like(chosen_score, -1.0)).argsort(dim=-1, descending=True)
    nth = torch.empty_like(order)
    nth.scatter_(1, order, torch.arange(k, device=idx.device).expand_as(order))  # position among the token's low pairs
    pos = (d - 1 + nth).clamp(max=inactive.shape[1] - 1)
    new_idx = torch.where(low, inactive.gather(1, pos), idx)
    own = (routing.coef[:, None] * routing.gate.gather(1, new_idx)).to(weights.dtype)      # [T, k]
    return new_idx, torch.where(low, own, weights), low.sum(1)


class ReplacingExecutor:
    """Routed output with the low pairs replaced by one option; streams the experts it needs from the store."""

    def __init__(self, store: ExpertStore, device: torch.device):
        self.store, self.device = store, device
        self.expert_fn = make_expert_fn(store.arch.experts)
        self.option, self.cut = "drop", 0.0
        self.tally = WindowTally()                # replaced pairs

    @torch.no_grad()
    def __call__(self, layer: int, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        idx, weights = routing.idx, routing.weights
        if self.cut > 0:
            idx, weights, n = replace_low(routing, self.option, self.cut)
            self.tally.add(n)
        loaded: dict[int, dict] = {}

        def weights_of(e: int):
            if e not in loaded:
                loaded[e] = {k: v.to(self.device) for k, v in self.store.read(layer, e).items()}
            return loaded[e]

        return routed_output(x, idx, weights, self.store.arch.num_experts, weights_of, self.expert_fn)


@contextmanager
def executor_swapped(blocks, executor):
    """Every MoE block runs `executor` inside the block; their own executors are put back after it."""
    saved = {l: b.executor for l, b in blocks.items()}
    for b in blocks.values():
        b.executor = executor
    try:
        yield executor
    finally:
        for l, b in blocks.items():
            b.executor = saved[l]


@torch.no_grad()
def window_nll(model, tokens: np.ndarray, device: torch.device, batch_size: int,
               tally: WindowTally | None = None) -> tuple[np.ndarray, np.ndarray]:
    """([N] sum over positions t = 1..L-1 of -log p(tokens[n, t] | tokens[n, :t]), nats; [N] the pairs `tally`
    counted in each window's pass, 0 without one) for tokens [N, L]."""
    nll, pairs = [], []
    for start in range(0, tokens.shape[0], batch_size):
        ids = torch.from_numpy(tokens[start:start + batch_size]).to(device)                # [B, L]
        logits = model(input_ids=ids, use_cache=False).logits.float()                # [B, L, V]
        tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="none")                                   # [B * (L-1)]
        nll.append(tok.double().reshape(ids.shape[0], -1).sum(1).cpu().numpy())
        pairs.append(tally.take(ids.shape[0]) if tally is not None else np.zeros(ids.shape[0]))
    return np.concatenate(nll), np.concatenate(pairs)


@torch.no_grad()
def measure_sensitivity(model, blocks, store: ExpertStore, tokens: np.ndarray, device: torch.device,
                        batch_size: int = 4, progress: bool = True,
                        runs: Callable[[int], bool] = lambda unit: True) -> dict[str, np.ndarray]:
    """The sums and per-window figures of the module docstring, measured on tokens [N, L]: the exact pass, then the
    pass of every (option o, cut c) whose unit o * len(CUTS) + c `runs` (a rank's share; the others' entries stay 0,
    see `join_passes`)."""
    n = tokens.shape[0]
    dnll = np.zeros((n, len(OPTIONS), len(CUTS)), np.float64)                   # [N, O, C] nats
    pairs = np.zeros_like(dnll)                                                  # [N, O, C] replaced pairs
    mine = [(o, c) for o in range(len(OPTIONS)) for c in range(len(CUTS)) if runs(o * len(CUTS) + c)]
    with executor_swapped(blocks, ReplacingExecutor(store, device)) as executor:
        executor.cut = 0.0
        base, _ = window_nll(model, tokens, device, batch_size)
        bar = tqdm(total=len(mine), desc="sensitivity", unit="pass", disable=not progress)
        for o, c in mine:
            executor.option, executor.cut = OPTIONS[o], CUTS[c]
            nll, pairs[:, o, c] = window_nll(model, tokens, device, batch_size, executor.tally)
            dnll[:, o, c] = nll - base
            bar.update(1)
        bar.close()
    return {"sensitivity.dnll_sum": dnll.sum(0), "sensitivity.pair_count": pairs.sum(0),
            "sensitivity.dnll_window": dnll, "sensitivity.pair_window": pairs,
            "sensitivity.nll_sum": np.array([base.sum()]),
            "sensitivity.predicted": np.array([tokens.shape[0] * (tokens.shape[1] - 1)], np.int64),
            "sensitivity.positions": np.array([tokens.size], np.int64)}


def join_passes(parts: list[dict[str, np.ndarray] | None], owner: Callable[[int], int]) -> dict[str, np.ndarray]:
    """One measurement from ranks' shares of the passes (all over the same tokens; None: a rank without a pass):
    the entry of (o, c) from parts[owner(o * len(CUTS) + c)], the exact NLL and the counts from parts[0] (every
    part measured them)."""
    out = {k: v.copy() for k, v in parts[0].items()}
    for o in range(len(OPTIONS)):
        for c in range(len(CUTS)):
            src = parts[owner(o * len(CUTS) + c)]
            for key in ("sensitivity.dnll_sum", "sensitivity.pair_count"):
                out[key][o, c] = src[key][o, c]
            for key in ("sensitivity.dnll_window", "sensitivity.pair_window"):
                out[key][:, o, c] = src[key][:, o, c]
    return out
