"""Intervals on perplexity differences between policies of one moe-eval result, paired by window."""
from __future__ import annotations

import numpy as np

from artifacts.errors import UserError


def paired_bootstrap(result: dict, a: str, b: str, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(delta, lo, hi) in percent: the relative perplexity of policy b vs policy a, with a 95% percentile interval.

    Every policy of a result is measured on the same windows w = 1..W (`window_nll`: [s_w, n_w], the sum of NLL in
    nats and the count of predicted tokens of window w). Over a multiset S of windows
        ppl_p(S)  = exp(sum_{w in S} s_{p,w} / sum_{w in S} n_w)
        delta(S)  = 100 * (ppl_b(S) / ppl_a(S) - 1) = 100 * (exp(sum_S (s_{b,w} - s_{a,w}) / sum_S n_w) - 1)
    delta is delta(all windows); lo, hi are the 2.5th and 97.5th percentiles of delta(S*) over `n` resamples S* of
    W windows drawn with replacement (seeded), the same draw for a and b: paired, so how hard the text of a window
    is cancels out and only how the policies differ on it is left.
    """
    pols = result["policies"]
    for p in (a, b):
        if p not in pols:
            raise UserError(f"policy {p!r} is not in the result (it has {', '.join(pols)})")
    wa = np.asarray(pols[a]["window_nll"], dtype=np.float64)      # [W, 2]: nll sum (nats), predicted tokens
    wb = np.asarray(pols[b]["window_nll"], dtype=np.float64)      # [W, 2]
    assert wa.shape == wb.shape and wa.shape[0] > 0 and np.array_equal(wa[:, 1], wb[:, 1]), \
        f"{a} and {b} were not measured on the same windows"
    diff, count = wb[:, 0] - wa[:, 0], wa[:, 1]                   # [W] nats, [W] tokens
    delta = 100.0 * np.expm1(diff.sum() / count.sum())
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(n, len(diff)))   # [n, W] window draws
    boot = 100.0 * np.expm1(diff[idx].sum(axis=1) / count[idx].sum(axis=1))         # [n] percent
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(delta), float(lo), float(hi)
