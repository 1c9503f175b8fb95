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
        return cls(tuple(head["options"]), tuple(float(c) for c in head["cuts"]), cost)

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
