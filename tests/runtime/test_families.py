"""The family layer: MoE layers, router rules and clear errors for what is not supported."""
import pytest
import torch
import transformers

from artifacts.errors import UserError
from runtime.families import resolve_arch
from runtime.model_loader import load_model
from tiny_models import FAMILIES, tiny_config


def test_moe_layers_per_family():
    expect = {"mixtral": (0, 1, 2), "qwen2_moe": (0, 2), "qwen3_moe": (0, 1, 2), "olmoe": (0, 1, 2),
              "deepseek_v2": (1, 2), "deepseek_v3": (1, 2), "gpt_oss": (0, 1, 2)}
    for fam in FAMILIES:
        arch = resolve_arch(tiny_config(fam))
        assert arch.moe_layers == expect[fam], fam
        assert arch.num_experts == 8 and arch.top_k == 2


def test_rules():
    assert resolve_arch(tiny_config("deepseek_v3")).router.scoring == "sigmoid"
    assert resolve_arch(tiny_config("deepseek_v3")).router.correction_bias
    assert resolve_arch(tiny_config("deepseek_v2")).router.group_score == "max"
    assert not resolve_arch(tiny_config("qwen2_moe")).router.norm_topk
    assert resolve_arch(tiny_config("mixtral")).router.norm_topk
    assert resolve_arch(tiny_config("gpt_oss")).experts.kind == "gptoss"
    assert resolve_arch(tiny_config("qwen2_moe")).shared_gate_attr == "shared_expert_gate"


def test_dense_model_is_rejected_with_supported_list():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UserError, match="not a supported Mixture-of-Experts family.*mixtral"):
        resolve_arch(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_matches_hf_router(family, tiny_model):
    """Our routing rule gives HF's chosen experts and weights, bit for bit."""
    path = tiny_model(family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lm = load_model(path, dtype=torch.float32)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(3))
    for l in lm.arch.moe_layers:
        hf_router = getattr(hf.model.layers[l].mlp, lm.arch.router_attr)
        _, w, i = hf_router(x)
        r = lm.blocks[l].route(x)
        assert torch.equal(i, r.idx) and torch.equal(w, r.weights)
        # weights = coef * gate for every chosen expert
        torch.testing.assert_close(r.weights.float(), r.coef[:, None] * r.gate.gather(1, r.idx), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_paired_routers_route_and_predict(family, tiny_model):
    """Every router a view of one buffer in MoE layer order (none copied) where the family allows (not with a router
    bias); a paired block's one matmul gives its routing and the next MoE layer's prediction: the experts of routing
    each apart, weights and scores within float tolerance (the shared matmul's bits are not promised); unpaired,
    blocks route as HF does."""
    from runtime.model_loader import pair_routers

    lm = load_model(tiny_model(family), dtype=torch.float32)
    layers = list(lm.arch.moe_layers)
    if lm.arch.router.logit_bias:
        assert lm.routers is None and not pair_routers(lm)
        assert all(b.paired is None for b in lm.blocks.values())
        return
    e = lm.arch.num_experts
    for i, l in enumerate(layers):
        w = getattr(lm.blocks[l], lm.arch.router_attr).weight
        assert w.data_ptr() == lm.routers[i * e].data_ptr() and w.shape == lm.routers[:e].shape
    assert pair_routers(lm)
    assert lm.blocks[layers[-1]].paired is None
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(5))
    for l, n in zip(layers, layers[1:]):
        r, p = lm.blocks[l].route_paired(x)
        r0, p0 = lm.blocks[l].route(x), lm.blocks[n].route(x, mixture=False)
        assert torch.equal(r.idx, r0.idx) and torch.equal(p.idx, p0.idx) and p.weights is None
        torch.testing.assert_close(r.weights, r0.weights)
        torch.testing.assert_close(r.score, r0.score)
        torch.testing.assert_close(p.score, p0.score)
    assert not pair_routers(lm, on=False)
    assert all(b.paired is None for b in lm.blocks.values())
