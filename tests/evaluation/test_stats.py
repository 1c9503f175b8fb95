"""paired_bootstrap: relative perplexity change of b vs a with a window-paired percentile interval."""
import math

import pytest

from artifacts.errors import UserError
from evaluation.stats import paired_bootstrap


def _result(a, b):
    return {"policies": {"a": {"window_nll": a}, "b": {"window_nll": b}}}


def test_point_estimate_on_hand_numbers():
    a = [[10.0, 5], [40.0, 10], [3.0, 5]]
    b = [[10.5, 5], [41.0, 10], [3.5, 5]]           # +2 nats over 20 tokens: ppl ratio exp(0.1)
    d, lo, hi = paired_bootstrap(_result(a, b), "a", "b", n=500)
    assert d == pytest.approx(100 * (math.exp(0.1) - 1))
    assert lo <= d <= hi
    assert paired_bootstrap(_result(a, b), "a", "b", n=500) == (d, lo, hi)     # seeded
    assert paired_bootstrap(_result(a, a), "a", "a", n=500) == (0.0, 0.0, 0.0)


def test_pairing_cancels_how_hard_each_window_is():
    # windows of very different difficulty; b costs exactly 0.05 nats/token more than a on every window, so every
    # paired resample gives the same ratio exp(0.05): a zero-width interval. Resampling a and b apart would not.
    a = [[n * h, n] for n, h in [(10, 0.5), (10, 6.0), (20, 1.0), (5, 9.0), (40, 2.5), (10, 0.1)]]
    b = [[s + 0.05 * n, n] for s, n in a]
    d, lo, hi = paired_bootstrap(_result(a, b), "a", "b")
    assert d == pytest.approx(100 * (math.exp(0.05) - 1))
    assert lo == pytest.approx(d, abs=1e-9) and hi == pytest.approx(d, abs=1e-9)


def test_interval_widens_when_the_difference_varies():
    a = [[10.0, 10]] * 8
    b = [[10.0 + x, 10] for x in (-1.0, 2.0, 0.0, 3.0, -0.5, 1.0, 2.5, 0.5)]
    d, lo, hi = paired_bootstrap(_result(a, b), "a", "b")
    assert lo < d < hi and hi - lo > 1.0


def test_unknown_policy():
    with pytest.raises(UserError, match="not in the result"):
        paired_bootstrap(_result([[1.0, 1]], [[1.0, 1]]), "a", "lru")
