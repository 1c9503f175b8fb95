"""The compiler's loss model: measured sensitivity sums -> cost per replaced pair -> a plan's predicted loss."""
from types import SimpleNamespace

import numpy as np
import pytest

from compiler.loss_model import MIN_COST, LossModel, LossTally
from compiler.objective import Objective
from compiler.simulator import SimResult, tally_replaced
from runtime.policy.substitution import TokenDecision


def _profile(windows=None):
    # 2 options x 3 cuts; 100 predicted tokens, 100 positions; windows: [N, 2, 3] per-window NLL increases
    head = {"options": ["drop", "next1"], "cuts": [1.5, 2.0, 3.0]}
    sens = {"dnll_sum": np.array([[1.0, 3.0, 2.5], [0.5, 0.5, 4.5]]),     # nats summed over predicted tokens
            "pair_count": np.array([[100.0, 200.0, 300.0], [100.0, 200.0, 300.0]]),
            "predicted": np.array([100]), "positions": np.array([100])}
    if windows is not None:
        n = windows.shape[0]
        sens |= {"dnll_window": windows, "dnll_sum": windows.sum(0),
                 "pair_window": np.broadcast_to(sens["pair_count"] / n, windows.shape).copy()}
    return SimpleNamespace(sensitivity=sens, header={"sensitivity": head})


def _loss(m, row, chosen, d, err):
    t = LossTally()
    tally_replaced(t, m, row, chosen, d, err)
    return m.loss(t)


def test_costs_are_marginal_monotone_and_never_free():
    m = LossModel.from_profile(_profile())
    # drop: bin costs 0.01, 0.02, then a measured decrease (noise) held at 0.02; next1: 0.005, 0 -> held, 0.04
    assert m.cost[0].tolist() == pytest.approx([0.01, 0.02, 0.02])
    assert m.cost[1].tolist() == pytest.approx([0.005, 0.005, 0.04])
    cost = lambda option, ratio: m.cost[m.pair_cell(option, ratio)]      # noqa: E731
    assert cost("drop", 1.2) == pytest.approx(0.01) and cost("drop", 1.5) == pytest.approx(0.01)
    assert cost("drop", 1.7) == pytest.approx(0.02) and cost("next1", 9.0) == pytest.approx(0.04)
    assert m.understudy_option(1) == "next1" and m.understudy_option(3) == "next1" and m.understudy_option(None) == "next1"
    zero = _profile()
    zero.sensitivity["dnll_sum"] = np.zeros((2, 3))
    assert (LossModel.from_profile(zero).cost == MIN_COST).all()
    assert LossModel.from_profile(SimpleNamespace(sensitivity=None, header={})) is None


def test_token_loss_adds_each_replaced_pair():
    m = LossModel.from_profile(_profile())
    row = {0: 0.5, 1: 0.25, 2: 0.2, 3: 0.1}                          # chosen 0, 1; S(k+1) = 0.2
    d = TokenDecision(exact=[0], understudy={1: (2, "band")})         # ratio 1.25, understudy = 1st inactive
    assert _loss(m, row, [0, 1], d, None) == pytest.approx(0.005)
    d = TokenDecision(exact=[0], dropped=[1])
    assert _loss(m, row, [0, 1], d, None) == pytest.approx(0.01)
    err = np.full((4, 4), 0.5)
    d = TokenDecision(exact=[0], understudy={1: (3, "similarity")})   # a near-twin: err x the drop cost
    assert _loss(m, row, [0, 1], d, err) == pytest.approx(0.005)
    assert LossModel.ppl_increase(0.01) == pytest.approx(np.exp(0.01) - 1)


def _windows(n, spread, seed=0):
    """[n, 2, 3] per-window NLL increases around the sums of _profile(), each window's share noisy by `spread`."""
    mean = _profile().sensitivity["dnll_sum"] / n
    return mean * (1 + spread * np.random.default_rng(seed).standard_normal((n, 1, 1)))


def test_interval_comes_from_the_windows_and_narrows_with_more_of_them():
    assert not LossModel.from_profile(_profile()).has_interval               # a version-3 profile: no interval
    tally = LossTally({(0, 0): 300.0, (1, 2): 40.0})
    same = LossModel.from_profile(_profile(_windows(8, 0.0)))                # identical windows: no spread at all
    lo, hi = same.loss_interval(tally)
    assert lo == pytest.approx(same.loss(tally)) and hi == pytest.approx(same.loss(tally))
    widths = []
    for n in (8, 128):
        m = LossModel.from_profile(_profile(_windows(n, 0.5)))
        lo, hi = m.loss_interval(tally)
        assert lo < m.loss(tally) < hi
        widths.append(hi - lo)
    assert 2.0 < widths[0] / widths[1] < 8.0                                 # about sqrt(128 / 8) = 4
    lo2, hi2 = m.loss_interval(LossTally({(0, 0): 600.0, (1, 2): 80.0}))     # the loss is linear in the tally
    assert (lo2, hi2) == pytest.approx((2 * lo, 2 * hi))


def test_interval_in_predictions_and_the_limit_on_its_upper_end():
    m = LossModel.from_profile(_profile(_windows(16, 0.5)))
    tally = LossTally({(0, 1): 50.0})
    r = SimResult(tokens=100, loss=m.loss(tally), loss_range=m.loss_interval(tally))
    d = r.to_dict()
    assert d["ppl_low"] < d["ppl_increase"] < d["ppl_high"]
    assert d["ppl_high"] == pytest.approx(np.exp(r.loss_range[1] / 100) - 1)
    safe = {"tpot_ms": 2.0, "hit_rate": 0.5, "ppl_increase": 0.003, "ppl_high": 0.004}
    edge = {"tpot_ms": 1.0, "hit_rate": 0.6, "ppl_increase": 0.004, "ppl_high": 0.006}  # middle in, upper end out
    assert Objective("ppl_increase", 0.005).choose([safe, edge])[0] is edge
    assert Objective("ppl_increase", 0.005, bound="ppl_high").choose([safe, edge])[0] is safe
    assert Objective("ppl_increase", 0.005, most_hits=True, bound="ppl_high").choose([safe, edge])[0] is safe
