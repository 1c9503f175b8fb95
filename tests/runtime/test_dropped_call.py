"""A layer call whose every pair the plan dropped: the routed output is zero (found by benchmarks/precision.py, where
a 12.5% plan dropped all four experts of a token and the mix of no outputs raised StopIteration)."""
import numpy as np
import torch

from runtime.expert_compute import PairGroups, group_served
from runtime.policy.compiled import decision_arrays
from runtime.policy.substitution import TokenDecision
from runtime.router import Routing


def test_a_token_with_every_pair_dropped_adds_nothing():
    x = torch.randn(1, 8, dtype=torch.bfloat16)
    score = torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1]])
    routing = Routing(idx=torch.tensor([[0, 1]]), weights=score[:, :2].to(torch.bfloat16), score=score,
                      coef=torch.ones(1), gate=score)
    chosen = routing.idx.numpy()
    g = group_served(x, chosen, *decision_arrays([TokenDecision(dropped=[0, 1])], chosen), routing.weights,
                     routing.gate, "auto")
    assert g.span == {}
    out = g.mix(x, {})
    assert out.shape == x.shape and out.dtype == x.dtype and not out.any()


def test_a_batch_with_every_pair_dropped_adds_nothing():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    g = PairGroups(np.zeros(0, dtype=np.int64), {}, torch.zeros(0, dtype=torch.bfloat16), x, False)
    out = g.mix(x, {})
    assert out.shape == x.shape and not out.any()
