"""The expected loss of a plan's substitutions and drops, from the profile's measured loss sensitivity.

The profiler (profiler.sensitivity) replaced every low pair (s_i <= r * S(k+1)) with option o at cuts r_1 < ... < r_C
and measured the summed NLL increase D[o, c] and the replaced pairs P[o, c]. Per replaced pair whose ratio
s_i / S(k+1) falls in bin c = (r_{c-1}, r_c] (r_0 = 1):
  cost[o, c] = max(0, (D[o, c] - D[o, c-1]) / predicted) / ((P[o, c] - P[o, c-1]) / positions)   nats per token
(a marginal cost: what the pairs of that bin added to the loss, per pair per token; ratios above r_C take the last
bin), then made non-decreasing over bins (a higher-score expert costs no less) and at least MIN_COST (measurement
noise can make a bin look free; nothing is). A plan's expected loss is sum over its replaced pairs of cost[option, bin] / tokens, and its predicted
perplexity increase exp(loss) - 1.
Options: "drop"; "next d" for a band understudy (own gate) that is the token's d-th best inactive expert (d >= 3
takes next3);
an understudy chosen by output similarity (near-twin, error err <= tau) costs err * cost["drop"].

Quantized experts (profiler.quant_sensitivity, when measured): the experts of importance class c of layer l
quantized by scheme s added KL[l, c, s] (nats summed over predicted tokens) while serving Q[l, c, s] pairs, so
  quant[l][c, s] = max(KL[l, c, s] / predicted, 0) / (Q[l, c, s] / positions)     nats per token per pair
taken as measured per class, at least MIN_COST (a class that served no pair takes the largest cost of its layer and
scheme). The KL, not the NLL difference: on a calibration set of this
size the NLL difference of a small weight change is dominated by its first-order term of either sign, the KL is its
expected cost (the profile format's notes). quant_cost(l, e, s) = quant[l][class(e), s].
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

MIN_COST = 1e-6   # nats per token per replaced pair


@dataclass(frozen=True)
class LossModel:
    options: tuple[str, ...]
    cuts: tuple[float, ...]
    cost: np.ndarray              # [O, C] nats per token per replaced pair
    schemes: tuple[str, ...] = ()                          # quantization schemes measured (S)
    quant: dict[int, np.ndarray] | None = None             # layer -> [C, S] nats per token per quantized pair
    expert_class: dict[int, np.ndarray] | None = None      # layer -> [E] importance class of every expert

    @classmethod
    def from_profile(cls, profile) -> "LossModel | None":
        sens = profile.sensitivity
        if sens is None:
            return None
        head = profile.header["sensitivity"]
        d = sens["dnll_sum"] / max(float(sens["predicted"][0]), 1.0)            # [O, C] nats per predicted token
        p = sens["pair_count"] / max(float(sens["positions"][0]), 1.0)          # [O, C] pairs per token
        dd = np.diff(d, axis=1, prepend=0.0)
        dp = np.diff(p, axis=1, prepend=0.0)
        cost = np.where(dp > 0, np.maximum(dd, 0.0) / np.maximum(dp, 1e-12), 0.0)
        cost = np.maximum(np.maximum.accumulate(cost, axis=1), MIN_COST)  # higher ratios cost no less; never free
        q = getattr(profile, "quant_sensitivity", None)
        if q is None:
            return cls(tuple(head["options"]), tuple(float(c) for c in head["cuts"]), cost)
        quant = {}
        for l in profile.moe_layers:
            per_tok = np.maximum(q.kl_sum[l], 0.0) / max(q.predicted, 1)              # [C, S] nats per token
            pairs = q.pairs[l] / max(q.positions, 1)                                  # [C, S] pairs per token
            c = np.where(pairs > 0, per_tok / np.maximum(pairs, 1e-12), np.nan)
            worst = np.nan_to_num(np.nanmax(np.where(np.isnan(c), -np.inf, c), axis=0), neginf=MIN_COST)   # [S]
            quant[l] = np.maximum(np.where(np.isnan(c), worst[None, :], c), MIN_COST)
        return cls(tuple(head["options"]), tuple(float(c) for c in head["cuts"]), cost, tuple(q.schemes), quant,
                   {l: np.asarray(v) for l, v in q.expert_class.items()})

    def quant_cost(self, layer: int, e: int, scheme: str) -> float:
        """Cost (nats per token) of one pair that expert e of `layer` computes quantized by `scheme`."""
        if self.quant is None or scheme not in self.schemes:
            raise KeyError(f"no measured cost for {scheme!r} experts: the profile lacks quantization sensitivity")
        return float(self.quant[layer][int(self.expert_class[layer][e]), self.schemes.index(scheme)])

    def pair_cost(self, option: str, ratio: float) -> float:
        """Cost of one replaced pair with score ratio s_i / S(k+1) = ratio."""
        o = self.options.index(option)
        c = min(bisect.bisect_left(self.cuts, ratio), len(self.cuts) - 1)
        return float(self.cost[o, c])

    def understudy_option(self, inactive_rank: int | None) -> str:
        """The option of a band understudy that is the token's `inactive_rank`-th best inactive expert (1-based)."""
        deepest = max(int(o.removeprefix("next")) for o in self.options if o.startswith("next"))
        return f"next{min(max(inactive_rank or deepest, 1), deepest)}"

    @staticmethod
    def ppl_increase(loss_per_token: float) -> float:
        return math.exp(loss_per_token) - 1.0
