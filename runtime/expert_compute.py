"""One routed expert's forward pass, and the weighted mixture of routed experts in HF's accumulation order.

Experts are plain dicts of tensors in the layout `ExpertFormat.shapes()` gives, so a cache slot, a host copy and a
freshly read expert are interchangeable.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from transformers.activations import ACT2FN, SiLUActivation

from runtime.families.arch import ExpertFormat
from runtime.policy.compiled import (CompiledCacheModel, CompiledSchedule, decide_and_group, decide_and_group_pair,
                                     served_groups)
from runtime.policy.config import preset
from runtime.policy.plan_params import substitution_params
from runtime.router import host_arrays

ExpertWeights = Mapping[str, torch.Tensor]   # or, for a quantized GLU expert, KernelMatrix values


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w^T for a weight [out, in]: a float tensor (F.linear), or a quantized matrix that computes from its codes
    (runtime.quantize.KernelMatrix)."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w.linear(x)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF's activation `name` (ACT2FN), as the plain function it calls where it is one: SiLU is `F.silu` (what
    SiLUActivation.forward and a non-inplace nn.SiLU return), the same kernel without an nn.Module call's dispatch
    (about a microsecond a call; an expert's GLU on one token computes in a few). Other activations stay HF's modules."""
    act = ACT2FN[name]
    if type(act) is SiLUActivation or (type(act) is torch.nn.SiLU and not act.inplace):
        return F.silu
    return act


def make_expert_fn(fmt: ExpertFormat) -> Callable[[torch.Tensor, ExpertWeights], torch.Tensor]:
    """f_e(x): [n, H] -> [n, H] for one expert's weights, exactly as HF computes it."""
    if fmt.kind == "gptoss":
        alpha, limit = fmt.swiglu_alpha, fmt.swiglu_limit

        def gptoss(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
            gate_up = x @ w["gate_up"] + w["gate_up_bias"]  # [n, 2I], gate/up interleaved
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            gate = gate.clamp(min=None, max=limit)
            up = up.clamp(min=-limit, max=limit)
            glu = gate * torch.sigmoid(gate * alpha)
            return ((up + 1) * glu) @ w["down"] + w["down_bias"]

        return gptoss

    act = activation(fmt.activation)

    def glu(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        gate, up = linear(x, w["gate_up"]).chunk(2, dim=-1)  # [n, I] each
        return linear(act(gate) * up, w["down"])

    return glu


def make_grouped_fn(fmt: ExpertFormat) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                                                   torch.Tensor] | None:
    """f(xs [N, H], gate_up [E, 2I, H], down [E, H, I], offs [E] int32) -> [N, H]: every expert's GLU on its rows,
    with xs grouped by expert in ascending id and offs the cumulative row counts over all E experts (empty groups
    included), as two grouped matmuls (torch.nn.functional.grouped_mm, what HF's default "grouped_mm" experts
    implementation calls). On the CPU each group's rows equal F.linear's on them bit for bit
    (tests/runtime/test_exactness.py), so a layer call with several tokens computes in two kernel calls what the
    per-expert loop does in 2 x n; None where experts are not a plain GLU (GPT-OSS's clamped, biased one)."""
    if fmt.kind != "glu" or not hasattr(F, "grouped_mm"):
        return None
    act = activation(fmt.activation)

    def grouped_glu(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        gate, up = F.grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)    # [N, I] each
        return F.grouped_mm(act(gate) * up, down.transpose(-2, -1), offs=offs)                # [N, H]

    return grouped_glu


def expert_rows(idx: torch.Tensor, num_experts: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each expert chosen in idx [T, k]: (token rows, top-k positions), ascending by expert id.

    Rows are ordered by (position, token), as HF's `torch.where(expert_mask[e])` orders them.
    """
    by_pos = idx.t()  # [k, T]
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for e in torch.unique(idx).tolist():
        if 0 <= e < num_experts:
            pos, rows = torch.where(by_pos == e)
            out[e] = (rows, pos)
    return out


def mix(x: torch.Tensor, contributions: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum over (expert e, rows r, weighted output y [len(r), H]) of y scattered into rows r, in the order given.

    HF adds experts in ascending id into zeros; callers pass contributions in that order to match it bit for bit.
    """
    out = torch.zeros_like(x)
    for _, rows, y in contributions:
        out.index_add_(0, rows, y.to(out.dtype))
    return out


def routed_output(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, num_experts: int,
                  weights_of: Callable[[int], ExpertWeights],
                  expert_fn: Callable[[torch.Tensor, ExpertWeights], torch.Tensor],
                  on_output: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                  ) -> torch.Tensor:
    """sum_i weights[t, i] * f_{idx[t, i]}(x_t) for x [T, H], idx/weights [T, k]; experts run in ascending id.

    `on_output(e, rows, pos, y)` sees each expert's unweighted output y [len(rows), H] (the profiler's tap).
    """
    contributions = []
    for e, (rows, pos) in expert_rows(idx, num_experts).items():
        y = expert_fn(x[rows], weights_of(e))
        if on_output is not None:
            on_output(e, rows, pos, y)
        contributions.append((e, rows, y * weights[rows, pos, None]))
    return mix(x, contributions)


class PairGroups:
    """A layer call's (token, expert) pairs grouped by expert in ascending id, (position, token) order within: the
    row order of HF's per-expert loop. Read-only; made once per layer call, so a plain class with slots (a frozen
    dataclass's init costs a microsecond a call)."""

    __slots__ = ("tok", "weights", "x", "whole", "by_token", "_span", "_xs")

    def __init__(self, tok: np.ndarray, span: dict[int, tuple[int, int]] | np.ndarray, weights: torch.Tensor,
                 x: torch.Tensor, whole: bool, by_token: np.ndarray | None = None):
        self.tok = tok                       # [N] the token of each pair
        self._span = span                    # e -> the pairs (a, b) it serves; or, from a kernel, the experts [n]
                                             # then the bounds [n + 1] (int64), made the dict on first read
        self.weights = weights               # [N] each pair's routing weight
        self.x = x                           # [T, H] the call's input
        self.whole = whole                   # one contiguous token: every expert's rows are x
        self.by_token = by_token             # [N] the pairs in (token, group) order, when every token has the same
                                             # number of pairs (a lossless call: k each); mix_pairs' rank order
        self._xs = None

    @property
    def span(self) -> dict[int, tuple[int, int]]:
        """e -> the pairs (a, b) expert e serves, ascending e."""
        s = self._span
        if not isinstance(s, dict):
            eb = s.tolist()
            n = len(eb) // 2
            s = self._span = dict(zip(eb[:n], zip(eb[n:-1], eb[n + 1:])))
        return s

    @property
    def xs(self) -> torch.Tensor:
        """[N, H] each pair's input row, gathered on first read (a grouped call over cache slots gathers its own
        order instead, `gather`); x itself for one contiguous token."""
        if self._xs is None:
            self._xs = self.x if self.whole else self.gather(self.tok)
        return self._xs

    def gather(self, tok: np.ndarray) -> torch.Tensor:
        """x's rows of the tokens tok [n] (int64): [n, H]."""
        return self.x.index_select(0, torch.from_numpy(tok).to(self.x.device))

    def rows(self, e: int) -> torch.Tensor:
        """Expert e's input rows [n_e, H]."""
        if self.whole:
            return self.xs
        a, b = self.span[e]
        return self.xs[a:b]

    def mix(self, x: torch.Tensor, ys: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """out[t] = sum over t's experts e in ascending id of w[t, e] * ys[e][t's row], as `mix` adds them (0 for a
        call whose every pair was dropped)."""
        if not ys:
            return torch.zeros_like(x)
        y = torch.cat([ys[e] for e in sorted(ys)]) if len(ys) > 1 else ys[next(iter(ys))]   # [N, H]
        return self.mix_rows(x, y)

    def mix_rows(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`mix` of the unweighted outputs of every pair at once, y [N, H] in the groups' row order."""
        weighted = y * self.weights[:, None]
        out = _mix_ranked(x, self.tok, weighted, self.by_token)
        return out if out is not None else _mix_spans(x, self.tok, weighted, self.span)

    def offsets(self, num_experts: int, device: torch.device) -> torch.Tensor:
        """[E] int32: the cumulative pair count of experts 0..e (grouped_mm's offs; empty groups included)."""
        n = np.zeros(num_experts, dtype=np.int32)
        for e, (a, b) in self.span.items():
            n[e] = b - a
        return torch.from_numpy(np.cumsum(n, dtype=np.int32)).to(device)


SMALL_CALL = 64          # pairs up to which a call is grouped in Python (decode), above with numpy (prefill)


def group_pairs(x: torch.Tensor, chosen: np.ndarray, weights: torch.Tensor, experts: Sequence[int] | None = None,
                counts: Sequence[int] | None = None) -> PairGroups:
    """Group the pairs of chosen [T, k] (expert ids; weights [T, k] on x's device) by expert. `experts` (ascending)
    and `counts` (pairs per expert) when the caller has them (the cache model's schedule), else computed. Pair
    j * T + t is token t's j-th choice; the groups list them by (expert, j, t)."""
    t_n, k = chosen.shape
    if t_n == 1 and x.is_contiguous():                              # one token: its k distinct experts, x as is
        span = {e: (i, i + 1) for i, e in enumerate(sorted(chosen[0].tolist()) if experts is None else experts)}
        order = torch.from_numpy(np.argsort(chosen[0])).to(x.device)   # [k] positions by expert id
        return PairGroups(np.zeros(k, dtype=np.int64), span, weights.reshape(-1).index_select(0, order), x, True)
    if t_n * k <= SMALL_CALL:                                       # a few pairs: Python beats numpy's call costs
        flat = chosen.T.reshape(-1).tolist()                        # [k*T], pair j * T + t
        order_l = sorted(range(len(flat)), key=flat.__getitem__)    # stable: (expert, j, t)
        tok_l = [i % t_n for i in order_l]
        order, tok = np.array(order_l), np.array(tok_l, dtype=np.int64)
        by_token = np.array(sorted(range(len(tok_l)), key=tok_l.__getitem__))
        if experts is None:
            n_of: dict[int, int] = {}
            for i in order_l:
                n_of[flat[i]] = n_of.get(flat[i], 0) + 1
            experts, counts = list(n_of), list(n_of.values())
    else:
        by_pos = chosen.T.reshape(-1)                               # [k*T], pair j * T + t
        order = np.argsort(by_pos, kind="stable")                   # [N] pairs by (expert, position, token)
        tok = order % t_n                                           # [N]
        by_token = np.argsort(tok, kind="stable")
        if experts is None:
            u, n = np.unique(chosen, return_counts=True)
            experts, counts = u.tolist(), n.tolist()
    span, b = {}, 0
    for e, n in zip(experts, counts):
        span[e] = (b, b + n)
        b += n
    w = weights.reshape(-1).index_select(0, torch.from_numpy(tok * k + order // t_n).to(x.device))   # [N]
    return PairGroups(tok, span, w, x, False, by_token)


def mix_pairs(x: torch.Tensor, tok: np.ndarray, weighted: torch.Tensor, span: dict[int, tuple[int, int]],
              by_token: np.ndarray | None = None) -> torch.Tensor:
    """`mix` of the pairs weighted [N, H] (tokens tok [N]) grouped by expert in ascending id, expert e at rows
    span[e] = (a, b): out[t] = (((0 + c_1) + c_2) + ...) over t's pairs in that order, rounded to x's dtype at every
    step as `mix` adds them, bit for bit.

    On the CPU a float32/float64 output takes one index_add_ (repeated rows are added one after another in index
    order); a reduced-precision one (whose index_add_ would sum repeated rows at a wider precision) takes one add per
    rank when every token has the same number of pairs (`by_token` given, or counted): c_r = the token's r-th pair by
    expert id. Elsewhere (CUDA adds repeated rows atomically, in any order) `mix` runs per expert."""
    out = _mix_ranked(x, tok, weighted, by_token)
    return out if out is not None else _mix_spans(x, tok, weighted, span)


def _mix_ranked(x: torch.Tensor, tok: np.ndarray, weighted: torch.Tensor, by_token: np.ndarray | None
                ) -> torch.Tensor | None:
    """`mix_pairs` where it needs no spans (the CPU: one index_add_, or one add per rank), else None."""
    if x.device.type != "cpu":
        return None
    if x.dtype in (torch.float32, torch.float64):
        return torch.zeros_like(x).index_add_(0, torch.from_numpy(tok), weighted.to(x.dtype))
    t_n = x.shape[0]
    k, rem = divmod(len(tok), t_n)
    if rem or not (t_n == 1 or by_token is not None or (np.bincount(tok, minlength=t_n) == k).all()):
        return None
    if by_token is None and t_n > 1:
        by_token = np.argsort(tok, kind="stable")
    by_rank = weighted if t_n == 1 else weighted.index_select(0, torch.from_numpy(by_token))
    out = torch.zeros_like(x)
    for c in by_rank.view(t_n, k, -1).to(x.dtype).unbind(1):         # [T, H] per rank
        out.add_(c)
    return out


def _mix_spans(x: torch.Tensor, tok: np.ndarray, weighted: torch.Tensor, span: dict[int, tuple[int, int]]
               ) -> torch.Tensor:
    """`mix_pairs` per expert, in ascending id (`mix`)."""
    rows = torch.from_numpy(tok).to(x.device)                        # [N]
    return mix(x, [(e, rows[a:b], weighted[a:b]) for e, (a, b) in sorted(span.items())])


def group_served(x: torch.Tensor, chosen: np.ndarray, order: np.ndarray, action: np.ndarray, understudy: np.ndarray,
                 weights: torch.Tensor, gate: torch.Tensor, mode: str) -> PairGroups:
    """The pairs of a call some of which an understudy serves or that are dropped, grouped by serving expert
    (`served_groups`): chosen [T, k]; per token its chosen experts in some order with each one's action and
    understudy (order, action, understudy [T, k]: a compiled schedule's, or `decision_arrays` of decisions); weights
    [T, k] and gate [T, E] float32, the routing's; mode the policy's `understudy_weight`. The weights are gathered on
    the host in float32 (exact for float32 or bfloat16 routing weights; an understudy's own weight coef x gate_j a
    float32 product) and moved once, in the routing's dtype."""
    if gate.device.type == "cpu":
        w32, g32 = weights.float().numpy(), gate.numpy()
    else:                                                                               # one copy to the host
        w32, g32 = host_arrays(weights, gate)
    return _pair_groups(x, served_groups(chosen, order, action, understudy, w32, g32, _MODES[mode],
                                         weights.dtype == torch.bfloat16, np.zeros(2 * g32.shape[1], np.int64)),
                        0, weights.dtype)


def _pair_groups(x: torch.Tensor, buf: np.ndarray, a: int, dtype: torch.dtype) -> PairGroups:
    """`PairGroups` of `served_groups`'s groups at buf[a:]: its weights moved once, in the routing weights' dtype
    (bfloat16: their bits, viewed); the spans made when first read (a call of one token reads none)."""
    n_e, n, n_b = buf[a:a + 3].tolist()
    b = a + 4 + 2 * n_e                                                  # experts [n_e], bounds [n_e + 1] before b
    c = b + n + n_b
    if dtype == torch.bfloat16:
        w = torch.from_numpy(buf[c:c + (n + 3) // 4].view(np.uint16)[:n]).view(dtype)
    else:
        w = torch.from_numpy(buf[c:c + (n + 1) // 2].view(np.float32)[:n]).to(dtype)
    return PairGroups(buf[b:b + n], buf[a + 3:b], w if x.is_cpu else w.to(x.device), x,
                      x.shape[0] == 1 and x.is_contiguous(), buf[b + n:c] if n_b else None)


def schedule_and_group(model: CompiledCacheModel, layer: int, x: torch.Tensor, routing: tuple[np.ndarray, np.ndarray],
                       prediction: tuple[np.ndarray, np.ndarray] | None, weights: np.ndarray, gate: np.ndarray,
                       dtype: torch.dtype, width: int, mode: str, c_load: float = 1.0, c_host: float = 1.0
                       ) -> tuple[CompiledSchedule, PairGroups]:
    """`model.schedule_table` of the layer call's routing arrays (chosen [T, k], score table [T, E]) and prediction,
    and the call's pairs grouped by serving expert as `group_served` groups them (every pair exact: the grouping
    `group_pairs` makes), in one compiled call (`decide_and_group`); weights [T, k] and gate [T, E] float32 on the
    host (`runtime.router.call_arrays` gives all of them; bf16 weights may come as the float32 values the router
    rounds to them: the kernel rounds, `bf16_values`), dtype the routing weights' (the groups' weights are moved to
    x's device in it), mode the policy's `understudy_weight`."""
    out = decide_and_group(*model.kernel_prefix(layer, width), *routing,
                           *(prediction if prediction is not None else model.no_prediction), float(c_load),
                           float(c_host), weights, gate, _MODES[mode], dtype == torch.bfloat16)
    sched = model.result(layer, out, routing[0].shape[0])
    return sched, _pair_groups(x, out, sched.end, dtype)


def schedule_and_group_pair(model: CompiledCacheModel, layer: int, x: torch.Tensor,
                            pair: tuple[np.ndarray, np.ndarray, np.ndarray], dtype: torch.dtype, width: int, mode: str,
                            c_load: float = 1.0, c_host: float = 1.0) -> tuple[CompiledSchedule, PairGroups]:
    """`schedule_and_group` of a paired routing and its prediction, given as their shared arrays (`pair_arrays`:
    idx [T, 2, k], weights [T, 2, k], gate [T, 2, E]); the same schedule and groups as of their halves."""
    out = decide_and_group_pair(*model.kernel_prefix(layer, width), *pair, float(c_load), float(c_host),
                                _MODES[mode], dtype == torch.bfloat16)
    sched = model.result(layer, out, pair[0].shape[0])
    return sched, _pair_groups(x, out, sched.end, dtype)


@njit(cache=True)
def slot_rows(slots, spans, tok, n_slots):
    """A grouped call over a layer's cache slots (`OffloadExecutor._compute_grouped`): the pairs of the experts in
    slots `slots` [n], whose groups are the pair rows spans [n, 2] = (a, b), ordered by slot, with their tokens
    (tok [N] the token of each pair): (host int64 [2R] = the R rows, then their tokens; offs int32 [n_slots], the
    cumulative row count per slot, empty slots included: grouped_mm's offs)."""
    counts = np.zeros(n_slots, np.int64)
    for i in range(slots.shape[0]):
        counts[slots[i]] = spans[i, 1] - spans[i, 0]
    start = np.empty(n_slots, np.int64)                           # [slots] each slot's first row
    offs = np.empty(n_slots, np.int32)
    r = 0
    for s in range(n_slots):
        start[s] = r
        r += counts[s]
        offs[s] = r
    host = np.empty(2 * r, np.int64)
    for i in range(slots.shape[0]):
        a = start[slots[i]]
        for p in range(spans[i, 0], spans[i, 1]):
            host[a] = p
            host[r + a] = tok[p]
            a += 1
    return host, offs


_MODES = {"own": 0, "replaced": 1, "auto": 2}    # understudy_weight -> the kernel's mode


def warm_served() -> None:
    """Compile `served_groups`, `decide_and_group`, `decide_and_group_pair` and `slot_rows` for the runtime's
    argument types (or load them from numba's disk cache), so that a runtime's first layer call does not."""
    ids = np.zeros((1, 2), np.int64)
    served_groups(ids, ids, ids, ids, np.zeros((1, 2), np.float32), np.zeros((1, 4), np.float32), 0, True,
                  np.zeros(8, np.int64))
    slot_rows(np.zeros(1, np.int64), ids, np.zeros(2, np.int64), 2)
    pol = preset("smoe")
    model = CompiledCacheModel({0: 2, 1: 2}, 4, 2, pol, substitution_params(pol, [0, 1]))
    chosen, table = np.array([[0, 1]], np.int64), np.full((1, 4), 0.25, np.float32)
    schedule_and_group(model, 0, torch.zeros(1, 4), (chosen, table), (chosen, table), np.full((1, 2), 0.5, np.float32),
                       table, torch.float32, 4, "auto")
    pair = (np.stack([chosen, chosen], 1), np.full((1, 2, 2), 0.5, np.float32), np.stack([table, table], 1))
    schedule_and_group_pair(model, 0, torch.zeros(1, 4), pair, torch.float32, 4, "auto")
