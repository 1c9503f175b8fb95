"""The loss cost of substitution options, measured on the model (profiler.sensitivity)."""
import numpy as np
import pytest
import torch

from helpers import sample_texts, write_jsonl
from profiler.profile_model import ProfileConfig, profile
from profiler.sensitivity import CUTS, OPTIONS, replace_low
from runtime.router import Routing
from tiny_models import build_tiny

SEQ = 32


def _routing():
    # token 0: chosen 0 (0.40) and 1 (0.22); S(k+1) = 0.20 (expert 2), then 3 (0.10): 1 is low at cut 1.25
    # token 1: chosen 4 (0.30) and 5 (0.28); S(k+1) = 0.25 (expert 6), then 7: both low at cut 1.25
    score = torch.tensor([[0.40, 0.22, 0.20, 0.10, 0.05, 0.02, 0.01, 0.0],
                          [0.0, 0.01, 0.02, 0.05, 0.30, 0.28, 0.25, 0.09]])
    idx = torch.tensor([[0, 1], [4, 5]])
    w = score.gather(1, idx)
    return Routing(idx=idx, weights=w, score=score, coef=torch.ones(2), gate=score)


def test_replace_low_options():
    r = _routing()
    idx, w, n = replace_low(r, "drop", 1.25)
    assert n.tolist() == [1, 2] and idx.tolist() == [[0, 1], [4, 5]]
    assert w.flatten().tolist() == pytest.approx([0.40, 0.0, 0.0, 0.0])
    idx, w, n = replace_low(r, "next1", 1.25)
    assert n.tolist() == [1, 2] and idx.tolist() == [[0, 2], [6, 7]]               # low pairs take inactive ranks 1, 2 in turn
    assert w.flatten().tolist() == pytest.approx([0.40, 0.20, 0.25, 0.09])   # with their own gate (coef 1)
    idx, _, _ = replace_low(r, "next2", 1.25)
    assert idx.tolist() == [[0, 3], [7, 3]]
    idx, w, n = replace_low(r, "next1", 1.13)                         # 0.30 > 1.13 * 0.25: 4 stays
    assert n.tolist() == [1, 1] and idx.tolist() == [[0, 2], [4, 6]]


def _zero_experts(model):
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.down_proj.zero_()


@pytest.mark.parametrize("tweak,moves", [(_zero_experts, False), (None, True)])
def test_measured_cost_is_zero_only_when_experts_do_nothing(tmp_path, tweak, moves):
    path = build_tiny("qwen2_moe", tmp_path / "m", tweak=tweak)
    calib = write_jsonl(tmp_path / "c.jsonl", sample_texts(8, SEQ - 1))
    p = profile(path, str(calib), ProfileConfig(quant_tokens=0,
                                                samples=8, seq_len=SEQ, probe_tokens=16), progress=False)
    s = p.sensitivity
    assert p.header["sensitivity"]["options"] == list(OPTIONS) and p.header["sensitivity"]["cuts"] == list(CUTS)
    assert s["dnll_sum"].shape == (len(OPTIONS), len(CUTS)) and s["positions"][0] == 8 * SEQ
    assert (np.diff(s["pair_count"], axis=1) >= 0).all() and s["pair_count"][:, -1].min() > 0
    assert s["dnll_window"].shape == s["pair_window"].shape == (8, len(OPTIONS), len(CUTS))     # per window
    assert np.allclose(s["dnll_window"].sum(0), s["dnll_sum"]) and (s["pair_window"].sum(0) == s["pair_count"]).all()
    assert len({tuple(w) for w in s["pair_window"][:, 0]}) > 1       # windows differ: counted each on its own
    if moves:
        assert np.abs(s["dnll_sum"]).max() > 1e-3
    else:
        assert np.abs(s["dnll_sum"]).max() == 0.0                    # replacing a zero output changes nothing


def test_sensitivity_can_be_skipped(tmp_path):
    path = build_tiny("qwen2_moe", tmp_path / "m")
    calib = write_jsonl(tmp_path / "c.jsonl", sample_texts(4, SEQ - 1))
    p = profile(path, str(calib), ProfileConfig(quant_tokens=0,
                                                samples=4, seq_len=SEQ, probe_tokens=16, sensitivity_tokens=0),
                progress=False)
    assert p.sensitivity is None and not any(k.startswith("sensitivity.") for k in p.stats)
