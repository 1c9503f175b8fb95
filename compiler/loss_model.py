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
expected cost (the profile format's notes). Expert e of layer l at scheme s costs quant[l][class(e), s].

A plan's loss is linear in what its replay used: loss = sum over cells x of n_x * cost_x, with n_x the pairs the
replay priced at cell x (a replaced pair's (option, bin), a quantized pair's (layer, class, scheme); a near-twin
counts err of a drop pair), so a replay tallies the n_x once (`LossTally`) and any set of costs prices it.
Interval (profiles of format version 4, which keep each measurement per calibration window): the costs are
recomputed on DRAWS resamples of the windows (the bootstrap; each draw takes N of the N windows with replacement,
the same draw for every option, cut, layer and class, so measurements of the same text stay paired) and the plan's
loss priced at each; its 2.5th and 97.5th percentiles bound the loss at LEVEL = 95%. It is the sampling error of the
profile's measurement, not of the held-out text a user evaluates on, nor of the replayed trace.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace

import numpy as np

MIN_COST = 1e-6   # nats per token per replaced pair
DRAWS = 1000      # bootstrap resamples of the calibration windows
LEVEL = 0.95      # the interval's coverage
SEED = 0          # the resamples are the same in every compile of the same profile


def replacement_costs(d: np.ndarray, p: np.ndarray) -> np.ndarray:
    """[..., O, C] cost per replaced pair per bin from d [..., O, C] (NLL increase per predicted token, nats) and
    p [..., O, C] (replaced pairs per token position), as the module docstring says."""
    dd = np.diff(d, axis=-1, prepend=0.0)
    dp = np.diff(p, axis=-1, prepend=0.0)
    cost = np.where(dp > 0, np.maximum(dd, 0.0) / np.maximum(dp, 1e-12), 0.0)
    return np.maximum(np.maximum.accumulate(cost, axis=-1), MIN_COST)  # higher ratios cost no less; never free


def quantization_costs(kl: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """[..., C, S] cost per quantized pair from kl [..., C, S] (KL per predicted token, nats) and pairs [..., C, S]
    (quantized pairs per token position); a class that served no pair takes its layer's largest cost per scheme."""
    c = np.where(pairs > 0, np.maximum(kl, 0.0) / np.maximum(pairs, 1e-12), np.nan)
    worst = np.nan_to_num(np.nanmax(np.where(np.isnan(c), -np.inf, c), axis=-2, keepdims=True), neginf=MIN_COST)
    return np.maximum(np.where(np.isnan(c), worst, c), MIN_COST)


def _resample_weights(n: int, rng: np.random.Generator) -> np.ndarray:
    """[DRAWS, n] how many times each of n windows is drawn in each resample (each row sums to n)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=DRAWS).astype(np.float64)


@dataclass
class LossTally:
    """What a replay used, per cost cell: the module docstring's n_x."""

    replaced: dict[tuple[int, int], float] = field(default_factory=dict)        # (option, bin) -> pairs
    quantized: dict[tuple[int, int, int], float] = field(default_factory=dict)  # (layer, class, scheme) -> pairs

    def add_replaced(self, cell: tuple[int, int], n: float = 1.0) -> None:
        self.replaced[cell] = self.replaced.get(cell, 0.0) + n

    def add_quantized(self, cell: tuple[int, int, int], n: float) -> None:
        self.quantized[cell] = self.quantized.get(cell, 0.0) + n


@dataclass(frozen=True)
class LossModel:
    options: tuple[str, ...]
    cuts: tuple[float, ...]
    cost: np.ndarray              # [O, C] nats per token per replaced pair
    schemes: tuple[str, ...] = ()                          # quantization schemes measured (S)
    quant: dict[int, np.ndarray] | None = None             # layer -> [C, S] nats per token per quantized pair
    expert_class: dict[int, np.ndarray] | None = None      # layer -> [E] importance class of every expert
    cost_draws: np.ndarray | None = None                   # [DRAWS, O, C] `cost` on each resample of the windows
    quant_draws: dict[int, np.ndarray] | None = None       # layer -> [DRAWS, C, S] `quant` on each resample

    @classmethod
    def from_profile(cls, profile) -> "LossModel | None":
        sens = profile.sensitivity
        if sens is None:
            return None
        head = profile.header["sensitivity"]
        predicted, positions = max(float(sens["predicted"][0]), 1.0), max(float(sens["positions"][0]), 1.0)
        cost = replacement_costs(sens["dnll_sum"] / predicted, sens["pair_count"] / positions)     # [O, C]
        rng = np.random.default_rng(SEED)
        windows = "dnll_window" in sens
        draws = None
        if windows:          # a resample keeps the window count, so the token counts are the measured ones
            w = _resample_weights(sens["dnll_window"].shape[0], rng)                              # [B, N]
            shape = (DRAWS, *cost.shape)
            draws = replacement_costs((w @ sens["dnll_window"].reshape(w.shape[1], -1)).reshape(shape) / predicted,
                                      (w @ sens["pair_window"].reshape(w.shape[1], -1)).reshape(shape) / positions)
        model = cls(tuple(head["options"]), tuple(float(c) for c in head["cuts"]), cost, cost_draws=draws)
        q = getattr(profile, "quant_sensitivity", None)
        if q is None:
            return model
        pred_q, pos_q = max(q.predicted, 1), max(q.positions, 1)
        quant = {l: quantization_costs(q.kl_sum[l] / pred_q, q.pairs[l] / pos_q) for l in profile.moe_layers}
        quant_draws = None
        if windows and q.kl_window is not None:
            w = _resample_weights(q.kl_window[profile.moe_layers[0]].shape[0], rng)            # [B, N_q]
            quant_draws = {l: quantization_costs(np.einsum("bn,ncs->bcs", w, q.kl_window[l]) / pred_q,
                                                 np.einsum("bn,ncs->bcs", w, q.pairs_window[l]) / pos_q)
                           for l in profile.moe_layers}
        return replace(model, schemes=tuple(q.schemes), quant=quant,
                       expert_class={l: np.asarray(v) for l, v in q.expert_class.items()},
                       cost_draws=draws if quant_draws is not None else None, quant_draws=quant_draws)

    @property
    def has_interval(self) -> bool:
        """Whether the profile kept its measurements per window (format version 4), so a loss has an interval."""
        return self.cost_draws is not None

    def quant_cell(self, layer: int, e: int, scheme: str) -> tuple[int, int, int]:
        """The cost cell (layer, class, scheme) of one pair that expert e of `layer` computes quantized by `scheme`."""
        if self.quant is None or scheme not in self.schemes:
            raise KeyError(f"no measured cost for {scheme!r} experts: the profile lacks quantization sensitivity")
        return layer, int(self.expert_class[layer][e]), self.schemes.index(scheme)

    def pair_cell(self, option: str, ratio: float) -> tuple[int, int]:
        """The cost cell (option, bin) of one replaced pair with score ratio s_i / S(k+1) = ratio."""
        return self.options.index(option), min(bisect.bisect_left(self.cuts, ratio), len(self.cuts) - 1)

    def understudy_option(self, inactive_rank: int | None) -> str:
        """The option of a band understudy that is the token's `inactive_rank`-th best inactive expert (1-based)."""
        deepest = max(int(o.removeprefix("next")) for o in self.options if o.startswith("next"))
        return f"next{min(max(inactive_rank or deepest, 1), deepest)}"

    def loss(self, tally: LossTally) -> float:
        """sum over cells of n_x * cost_x: the tallied replay's expected NLL increase, nats summed over its tokens."""
        total = sum(n * float(self.cost[cell]) for cell, n in tally.replaced.items())
        return total + sum(n * float(self.quant[l][c, s]) for (l, c, s), n in tally.quantized.items())

    def loss_interval(self, tally: LossTally) -> tuple[float, float] | None:
        """(low, high) of the tallied replay's loss (nats summed over its tokens) at LEVEL over the window
        resamples; None for a profile without per-window measurements."""
        if not self.has_interval:
            return None
        draws = np.zeros(DRAWS)
        for (o, c), n in tally.replaced.items():
            draws += n * self.cost_draws[:, o, c]
        for (l, c, s), n in tally.quantized.items():
            draws += n * self.quant_draws[l][:, c, s]
        tail = 100 * (1 - LEVEL) / 2
        lo, hi = np.percentile(draws, [tail, 100 - tail])
        return float(lo), float(hi)

    @staticmethod
    def ppl_increase(loss_per_token: float) -> float:
        return math.exp(loss_per_token) - 1.0
