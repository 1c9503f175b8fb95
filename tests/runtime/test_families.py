"""The family layer: MoE layers, router rules and clear errors for what is not supported."""
import numpy as np
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
def test_route_pair_logits_is_each_half_routed_alone(family):
    """Given two routers' logits [T, 2E], `route_pair_logits` gives what `route_logits` gives on each half, bit for
    bit: ids, weights, scores, gate and coef, one token and several, float32 and bf16; and `call_arrays` reads the
    pair (views of shared tensors where the rule is the plain softmax: `PairedRouting`) as it reads the two routings
    made apart, C-contiguous, on the host and in one copy."""
    from runtime.policy.compiled import bf16_values
    from runtime.router import PairedRouting, call_arrays, route_logits, route_pair_logits

    rule, k, e = resolve_arch(tiny_config(family)).router, 2, 8
    g = torch.Generator().manual_seed(11)
    bias = torch.rand(e, generator=g) if rule.correction_bias else None
    for t in (1, 5):
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(t, 2 * e, generator=g) * 3).to(dtype)
            logits[0, 3] = logits[0, 4]                                  # a tie within the row
            r, p = route_pair_logits(logits, rule, k, bias, bias)
            r0 = route_logits(logits[:, :e], rule, k, bias)
            p0 = route_logits(logits[:, e:], rule, k, bias, mixture=False)
            assert isinstance(r, PairedRouting) == (family in ("qwen2_moe", "qwen3_moe", "olmoe", "mixtral"))
            assert p.weights is None and torch.equal(r.weights, r0.weights), (t, dtype)
            assert r.weights_dtype == r0.weights_dtype and torch.equal(r.coef, r0.coef) and r.weights.is_contiguous()
            for a, b in ((r, r0), (p, p0)):
                for f in ("idx", "score", "gate"):
                    assert torch.equal(getattr(a, f), getattr(b, f)), (t, dtype, f)
                    assert getattr(a, f).is_contiguous()
            want = call_arrays(r0, p0)
            for one_copy in (None, True):
                got = call_arrays(r, p, one_copy)
                if r.weights_dtype == torch.bfloat16:            # the values before the cast: the kernel rounds
                    got = (*got[:2], bf16_values(got[2]), got[3])
                flat = [*got[0], *got[1], *got[2:]]
                for a, b in zip(flat, [*want[0], *want[1], *want[2:]]):
                    assert a.dtype == b.dtype and a.flags.c_contiguous and np.array_equal(a, b), (t, dtype, one_copy)


def test_bf16_values_is_torchs_cast():
    """The compiled path's rounding of float32 weights to bfloat16 precision is torch's cast, bit for bit: random
    values over many binades, and values exactly halfway between two bfloat16 values (ties to even, both ways)."""
    from runtime.policy.compiled import bf16_values

    g = torch.Generator().manual_seed(3)
    w = torch.rand(64, 8, generator=g) * torch.exp2(torch.randint(-30, 10, (64, 8), generator=g).float())
    bits = (torch.arange(0, 2 * 64 * 8, 2, dtype=torch.int32).reshape(64, 8) << 16) + 0x3F80_0000   # even bf16 ulps
    halfway = (bits | 0x8000).view(torch.float32)                       # half an ulp above an even one: stays
    odd_halfway = ((bits + 0x1_0000) | 0x8000).view(torch.float32)      # half an ulp above an odd one: rounds up
    assert torch.equal(halfway.to(torch.bfloat16).float().view(torch.int32), bits)             # (ties, both ways)
    assert torch.equal(odd_halfway.to(torch.bfloat16).float().view(torch.int32), bits + 0x2_0000)
    for v in (w, halfway, odd_halfway, torch.rand(3, 2, generator=g)):
        assert torch.equal(torch.from_numpy(bf16_values(v.numpy())), v.to(torch.bfloat16).float())


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
