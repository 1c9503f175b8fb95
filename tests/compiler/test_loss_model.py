"""The compiler's loss model: measured sensitivity sums -> cost per replaced pair -> a plan's predicted loss."""
from types import SimpleNamespace

import numpy as np
import pytest

from compiler.loss_model import MIN_COST, LossModel
from compiler.simulator import _replaced_loss
from runtime.policy.substitution import TokenDecision


def _profile():
    # 2 options x 3 cuts; 100 predicted tokens, 100 positions
    head = {"options": ["drop", "next1"], "cuts": [1.5, 2.0, 3.0]}
    sens = {"dnll_sum": np.array([[1.0, 3.0, 2.5], [0.5, 0.5, 4.5]]),     # nats summed over predicted tokens
            "pair_count": np.array([[100.0, 200.0, 300.0], [100.0, 200.0, 300.0]]),
            "predicted": np.array([100]), "positions": np.array([100])}
    return SimpleNamespace(sensitivity=sens, header={"sensitivity": head})


def test_costs_are_marginal_monotone_and_never_free():
    m = LossModel.from_profile(_profile())
    # drop: bin costs 0.01, 0.02, then a measured decrease (noise) held at 0.02; next1: 0.005, 0 -> held, 0.04
    assert m.cost[0].tolist() == pytest.approx([0.01, 0.02, 0.02])
    assert m.cost[1].tolist() == pytest.approx([0.005, 0.005, 0.04])
    assert m.pair_cost("drop", 1.2) == pytest.approx(0.01) and m.pair_cost("drop", 1.5) == pytest.approx(0.01)
    assert m.pair_cost("drop", 1.7) == pytest.approx(0.02) and m.pair_cost("next1", 9.0) == pytest.approx(0.04)
    assert m.understudy_option(1) == "next1" and m.understudy_option(3) == "next1" and m.understudy_option(None) == "next1"
    zero = _profile()
    zero.sensitivity["dnll_sum"] = np.zeros((2, 3))
    assert (LossModel.from_profile(zero).cost == MIN_COST).all()
    assert LossModel.from_profile(SimpleNamespace(sensitivity=None, header={})) is None


def test_token_loss_adds_each_replaced_pair():
    m = LossModel.from_profile(_profile())
    row = {0: 0.5, 1: 0.25, 2: 0.2, 3: 0.1}                          # chosen 0, 1; S(k+1) = 0.2
    d = TokenDecision(exact=[0], understudy={1: (2, "band")})         # ratio 1.25, understudy = 1st inactive
    assert _replaced_loss(m, row, [0, 1], d, None) == pytest.approx(0.005)
    d = TokenDecision(exact=[0], dropped=[1])
    assert _replaced_loss(m, row, [0, 1], d, None) == pytest.approx(0.01)
    err = np.full((4, 4), 0.5)
    d = TokenDecision(exact=[0], understudy={1: (3, "similarity")})   # a near-twin: err x the drop cost
    assert _replaced_loss(m, row, [0, 1], d, err) == pytest.approx(0.005)
    assert LossModel.ppl_increase(0.01) == pytest.approx(np.exp(0.01) - 1)
