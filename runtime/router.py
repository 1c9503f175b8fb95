"""The router of one MoE layer, computed with the family's rule and HF's op order (so weights match bit for bit),
returning the full score table the policies and the profiler need, not only the top-k."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from runtime.families.arch import RouterRule


class Routing:
    """Routing of T tokens over E experts.

    idx     [T, k]  chosen experts (HF order)
    weights [T, k]  their mixture weights (HF dtype); None for a prediction (route's `mixture` False)
    score   [T, E]  float32 ranking score: the gate (softmax or sigmoid), + correction bias where the family
                    ranks by it; experts in masked-out groups score 0. S(k+1) is the (k+1)-th largest per row.
    gate    [T, E]  float32 gate of every expert (before renormalisation and scaling).
    coef    [T]     float32 weight per unit of gate: weight_i = coef * gate_i for every chosen i, so an
                    understudy j gets coef * gate_j:
                        coef = float32(sum_i weights_i / max(sum_i gate_i, 1e-30))   over the chosen i, the gate in
                    its own dtype, both sums and the quotient in float64. A sum of k float32 values in float64 is exact,
                    hence the same in any order, while they span less than 2^26 (a token's chosen gates always do in
                    practice), so the executor's grouping kernel, which sums on the host in routing order
                    (runtime.expert_compute), gets these bits. Computed on first read (the profiler reads it), unless
                    given.
    """

    __slots__ = ("idx", "weights", "score", "gate", "_coef", "_gate_raw")

    def __init__(self, idx: torch.Tensor, weights: torch.Tensor, score: torch.Tensor, gate: torch.Tensor,
                 coef: torch.Tensor | None = None, gate_raw: torch.Tensor | None = None):
        self.idx, self.weights, self.score, self.gate = idx, weights, score, gate
        self._coef, self._gate_raw = coef, gate_raw          # gate_raw: the gate in the router's dtype (for coef)

    @property
    def coef(self) -> torch.Tensor:
        if self._coef is None:
            gate = self._gate_raw if self._gate_raw is not None else self.gate
            chosen_gate = gate.gather(1, self.idx).double().sum(dim=-1)            # [T] float64
            self._coef = (self.weights.double().sum(dim=-1) / chosen_gate.clamp(min=1e-30)).float()
        return self._coef

    @property
    def weights_dtype(self) -> torch.dtype:
        """The mixture weights' dtype."""
        return self.weights.dtype


def _group_mask(choice: torch.Tensor, rule: RouterRule) -> torch.Tensor:
    """[T, E] bool: experts in the top `topk_group` groups (DeepSeek group-limited routing)."""
    t, e = choice.shape
    grouped = choice.view(t, rule.n_group, e // rule.n_group)
    if rule.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:  # top2sum
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=rule.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return group_mask.unsqueeze(-1).expand(t, rule.n_group, e // rule.n_group).reshape(t, e).bool()


def router_logits(x: torch.Tensor, weight: torch.Tensor, rule: RouterRule,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """The router's logits [T, E] of x [T, H] for a weight [E, H] (and bias [E]), in HF's op order: float32 where the
    family computes them so (DeepSeek), else in x's dtype. A weight of several routers' rows (`MoEBlock.paired`)
    gives each router's logits as its columns."""
    if rule.float32_logits:
        return F.linear(x.type(torch.float32), weight.type(torch.float32))
    return F.linear(x, weight, bias if rule.logit_bias else None)


def route(x: torch.Tensor, weight: torch.Tensor, rule: RouterRule, top_k: int,
          bias: torch.Tensor | None = None, correction_bias: torch.Tensor | None = None,
          mixture: bool = True) -> Routing:
    """Route x [T, H] with router weight [E, H] (and bias [E]) by `rule`. `mixture` False: the choice and the scores
    only (a prediction), without renormalising, scaling or casting the mixture weights (`weights` is then None)."""
    return route_logits(router_logits(x, weight, rule, bias), rule, top_k, correction_bias, mixture)


def route_logits(logits: torch.Tensor, rule: RouterRule, top_k: int, correction_bias: torch.Tensor | None = None,
                 mixture: bool = True) -> Routing:
    """`route` from the router's logits [T, E] (`router_logits`)."""
    if rule.topk_on_logits:  # GPT-OSS
        top_v, idx = torch.topk(logits, top_k, dim=-1)
        weights = F.softmax(top_v, dim=1, dtype=top_v.dtype) if mixture else None
        gate = F.softmax(logits, dim=-1, dtype=torch.float32)
        score = gate
    elif rule.scoring == "sigmoid":  # DeepSeek-V3
        gate = logits.sigmoid()
        choice = gate + correction_bias if rule.correction_bias else gate
        if rule.n_group > 1:
            keep = _group_mask(choice, rule)
            choice = choice.masked_fill(~keep, float("-inf"))
        idx = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
        weights = gate.gather(1, idx) if mixture else None
        if mixture and rule.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + rule.renorm_eps)
        if mixture:
            weights = weights * rule.scaling
        score = choice.clamp(min=0.0)
    elif rule.float32_logits:  # DeepSeek-V2: softmax, optional group-limited greedy, scaled
        gate = logits.softmax(dim=-1, dtype=torch.float32)
        score = gate
        if rule.n_group > 1:
            keep = _group_mask(gate, rule)
            score = gate.masked_fill(~keep, 0.0)
        weights, idx = torch.topk(score, k=top_k, dim=-1, sorted=False)
        weights = weights * rule.scaling if mixture else None
    else:  # Qwen2/3-MoE, OLMoE, Mixtral
        gate = F.softmax(logits, dim=-1, dtype=torch.float32)
        score = gate
        weights, idx = torch.topk(gate, top_k, dim=-1)
        if not mixture:
            weights = None
        elif rule.norm_topk:
            weights /= weights.sum(dim=-1, keepdim=True)
        if mixture and rule.weights_in_logits_dtype:
            weights = weights.to(logits.dtype)

    return Routing(idx=idx, weights=weights, score=score.float(), gate=gate.float(), gate_raw=gate)


def route_pair_logits(logits: torch.Tensor, rule: RouterRule, top_k: int, correction_bias: torch.Tensor | None = None,
                      next_correction: torch.Tensor | None = None) -> tuple[Routing, Routing]:
    """(routing, the next router's prediction `route_logits(..., mixture=False)`) from two routers' logits [T, 2E],
    this router's the first E columns (`runtime.moe_block.MoEBlock.route_paired`).

    The plain softmax rule (Qwen2/3-MoE, OLMoE, Mixtral) takes one softmax and one topk over the [T, 2, E] view, then
    renormalises the top-k weights of both halves, as `route_logits` does: each op computes each row of E (or k)
    alone, with the kernel a lone [T, E] call uses, so each half's bits are `route_logits`' (tests); the two routings
    are the halves of those tensors (`PairedRouting`), the weights cast to the family's dtype only when read (the
    compiled path reads them as float32 and rounds them itself). Other rules route each half with `route_logits`."""
    e = logits.shape[1] // 2
    if rule.topk_on_logits or rule.scoring != "softmax" or rule.float32_logits:
        return (route_logits(logits[:, :e], rule, top_k, correction_bias),
                route_logits(logits[:, e:], rule, top_k, next_correction, mixture=False))
    gate = F.softmax(logits.view(-1, 2, e), dim=-1, dtype=torch.float32)               # [T, 2, E]
    weights, idx = torch.topk(gate, top_k, dim=-1)                                      # [T, 2, k]
    if rule.norm_topk:
        weights /= weights.sum(dim=-1, keepdim=True)
    pair = (idx, weights, gate, logits.dtype if rule.weights_in_logits_dtype else weights.dtype)
    return PairedRouting(pair, 0), PairedRouting(pair, 1)


class PairedRouting(Routing):
    """Half h of paired routers' routing (`route_pair_logits`): h = 0 the layer's routing, h = 1 the next MoE
    layer's prediction (its weights None), over the tensors one softmax and one topk computed for both halves:
    pair = (idx [T, 2, k], weights [T, 2, k] float32, gate [T, 2, E] float32, the score table too, the mixture
    weights' dtype). A field is the half, made on first read (a view for one token, else a contiguous copy, as
    `route_logits`' fields are contiguous; the weights cast to their dtype as `route_logits` casts them);
    `pair_arrays` reads both halves as numpy views of the shared tensors and makes none (each field made is a torch
    op: microseconds in a decode's layer call)."""

    __slots__ = ("pair", "half", "_idx", "_weights", "_gate")

    def __init__(self, pair: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], half: int):
        self.pair, self.half = pair, half
        self._idx = self._weights = self._gate = self._coef = self._gate_raw = None

    @property
    def idx(self) -> torch.Tensor:
        if self._idx is None:
            self._idx = self.pair[0][:, self.half].contiguous()
        return self._idx

    @property
    def weights(self) -> torch.Tensor | None:
        if self.half:
            return None
        if self._weights is None:
            self._weights = self.pair[1][:, 0].to(self.pair[3]).contiguous()
        return self._weights

    @property
    def gate(self) -> torch.Tensor:
        if self._gate is None:
            self._gate = self.pair[2][:, self.half].contiguous()
        return self._gate

    score = gate                                   # the softmax rule ranks by the gate

    @property
    def weights_dtype(self) -> torch.dtype:
        return self.pair[3]


def top_ids(score: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, ids) [T, width]: each token's `width` best experts by (-score, id), a stable descending sort's first
    `width`. Not torch.topk, which orders tied scores as its kernel happens to (by device and shape): the compiled
    cache model selects the same experts on the host (runtime.policy.compiled.rows_from_table), and a trace recorded
    on one device replays as it ran on another."""
    vals, ids = torch.sort(score, dim=1, descending=True, stable=True)
    return vals[:, :width], ids[:, :width]


def top_view(routing: Routing, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, scores [T, width]: the chosen experts by descending score (ties: routing order), then the first
    `width - k` unchosen experts of `top_ids(score, width)` (the best of the rest by (-score, id)). This is what the
    routing trace stores and what cache decisions see (other experts count as score 0); `score_rows` is the same view
    as Python rows."""
    score, idx = routing.score, routing.idx
    k = idx.shape[1]
    order = torch.argsort(score.gather(1, idx), dim=1, descending=True, stable=True)
    chosen = idx.gather(1, order)
    if width > k:
        top = top_ids(score, width)[1]                                                 # [T, width]
        is_chosen = (top.unsqueeze(2) == idx.unsqueeze(1)).any(dim=2)                   # [T, width]
        rest = torch.argsort(is_chosen.to(torch.uint8), dim=1, stable=True)[:, :width - k]
        ids = torch.cat([chosen, top.gather(1, rest)], dim=1)
    else:
        ids = chosen
    return ids, score.gather(1, ids)


def score_rows(routing: Routing, width: int) -> tuple[list[dict[int, float]], list[list[int]]]:
    """`top_view` as per token a dict {expert: score} (chosen first, by descending score) and the chosen experts in
    routing order: one sort (`top_ids`) and a few host copies, then a few Python operations per token (a decode call
    has 1-3). The scores are the sort's values (the score table's own); the whole row is read only for a token whose
    chosen experts are not all in its top `width` (a biased router's choice)."""
    idx = routing.idx.tolist()
    k = len(idx[0]) if idx else 0
    if width <= k:
        score = routing.score.tolist()                                                  # [T][E]
        return [{e: s[e] for e in sorted(ch, key=lambda e: -s[e])} for s, ch in zip(score, idx)], idx
    vals, top = top_ids(routing.score, width)
    rows = []
    for t, (v, tp, ch) in enumerate(zip(vals.tolist(), top.tolist(), idx)):
        if len(set(v[:k])) == k and set(tp[:k]) == set(ch):
            # the chosen are the first k, their scores distinct (descending): the row is the sort's order as it is
            rows.append(dict(zip(tp, v)))
            continue
        s = dict(zip(tp, v))                                                            # the top `width` scores
        if len(s.keys() & ch) < k:                                                      # a chosen one outside them
            s = dict(enumerate(routing.score[t].tolist()))
        row = {e: s[e] for e in sorted(ch, key=s.__getitem__, reverse=True)}   # stable: ties keep routing order
        n = width - k
        for e in tp:
            if e not in row:
                row[e] = s[e]
                n -= 1
                if n == 0:
                    break
        rows.append(row)
    return rows, idx


def call_arrays(routing: Routing, prediction: Routing | None = None, one_copy: bool | None = None
                ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None, np.ndarray, np.ndarray]:
    """A layer call's routing on the host as the compiled path reads it (runtime.policy.compiled, which makes
    `score_rows`' rows from them; runtime.expert_compute, which groups the pairs): ((chosen [T, k] int64, score
    table [T, E] float32), the prediction's same two or None, the mixture weights [T, k] float32 (bfloat16 weights
    of a `PairedRouting` as the float32 values the router casts to them: the compiled path rounds them), the gate
    [T, E] float32). Views on the CPU (the weights converted where they are not float32), else (or with `one_copy`)
    all in one copy (`host_arrays`): one wait for the device per layer call. The gate is the score table's array
    where the routing's gate is its score tensor (most families)."""
    pair = pair_arrays(routing, prediction, one_copy)
    if pair is not None:                         # each half C-contiguous (a view for one token)
        i, w, g = pair
        h = [np.ascontiguousarray(a) for a in (i[:, 0], g[:, 0], i[:, 1], g[:, 1], w[:, 0])]
        return (h[0], h[1]), (h[2], h[3]), h[4], h[1]
    if routing.idx.is_cpu if one_copy is None else not one_copy:                      # views
        r = (routing.idx.numpy(), routing.score.numpy())
        p = None if prediction is None else (prediction.idx.numpy(), prediction.score.numpy())
        return r, p, routing.weights.float().numpy(), r[1] if routing.gate is routing.score else routing.gate.numpy()
    pairs = [routing] if prediction is None else [routing, prediction]
    ts = [t for r in pairs for t in (r.idx, r.score)] + [routing.weights]
    same = routing.gate is routing.score
    if not same:
        ts.append(routing.gate)
    h = host_arrays(*ts)
    n = 2 * len(pairs)
    return ((h[0], h[1]), (h[2], h[3]) if prediction is not None else None, h[n], h[1] if same else h[n + 1])


def pair_arrays(routing: Routing, prediction: Routing | None, one_copy: bool | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A paired routing and its prediction (two `PairedRouting` halves of one pair) on the host as the compiled
    path's pair kernel reads them (runtime.expert_compute.schedule_and_group_pair, which takes the halves): (idx
    [T, 2, k] int64, weights [T, 2, k] float32, gate [T, 2, E] float32), numpy views of the shared tensors on the CPU,
    else (or with `one_copy`) one copy (`host_arrays`); None for any other routing. The weights are the float32
    values before their cast: to bfloat16 the compiled path rounds them itself (`runtime.policy.compiled.bf16_values`);
    other casts (float16) are made here."""
    if not (isinstance(routing, PairedRouting) and prediction is not None and prediction.pair is routing.pair):
        return None
    idx, weights, gate, dtype = routing.pair
    if dtype is not torch.float32 and dtype is not torch.bfloat16:
        weights = weights.to(dtype).float()
    if idx.is_cpu if one_copy is None else not one_copy:
        return idx.numpy(), weights.numpy(), gate.numpy()
    t_n = idx.shape[0]
    return tuple(a.reshape(t.shape) for a, t in zip(
        host_arrays(idx.view(t_n, -1), weights.view(t_n, -1), gate.view(t_n, -1)), (idx, weights, gate)))


def host_arrays(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Tensors [T, n_i] of one device, integer (ids below 2^24) or float32, on the host in one copy (one wait for
    the device instead of one per tensor): concatenated as float32 columns, copied, split; ids back to int64."""
    host = torch.cat([t.float() for t in tensors], dim=1).cpu().numpy()                         # [T, sum n_i]
    out, a = [], 0
    for t in tensors:
        part = host[:, a:a + t.shape[1]]
        out.append(part.astype(np.int64) if not t.is_floating_point() else np.ascontiguousarray(part))
        a += t.shape[1]
    return out
