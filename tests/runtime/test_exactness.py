"""Our model (HF skeleton + our MoE blocks + expert store) computes what HF transformers computes."""
import pytest
import torch
import transformers

from runtime.expert_store import ExpertStore
from runtime.model_loader import load_model
from runtime.resident import ResidentExecutor
from tiny_models import FAMILIES


def _ours(path, mode="mmap"):
    lm = load_model(path, dtype=torch.float32)
    ex = ResidentExecutor(ExpertStore(lm.ckpt, lm.arch, lm.dtype, mode=mode), lm.device, lm.dtype)
    for b in lm.blocks.values():
        b.executor = ex
    return lm


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_bit_for_bit(family, tiny_model):
    path = tiny_model(family)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    lm = _ours(path)
    with torch.no_grad():
        ours = lm.model(ids).logits
        eager = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                  experts_implementation="eager").eval()(ids).logits
        default = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits
    assert torch.equal(ours, eager)                      # HF's reference loop: identical bits
    assert (ours - default).abs().max().item() <= 1e-5   # HF's default (grouped_mm) kernels: same to 1e-5


def test_moe_blocks_replaced_and_experts_not_materialised(tiny_model):
    lm = load_model(tiny_model("qwen2_moe"), dtype=torch.float32)
    assert sorted(lm.blocks) == [0, 2]  # layer 1 is dense (mlp_only_layers)
    names = [n for n, _ in lm.model.named_parameters()]
    assert not any(".experts." in n for n in names)
    assert any("shared_expert." in n for n in names)


def test_host_store_matches_mmap_store(tiny_model):
    path = tiny_model("mixtral")
    lm = load_model(path, dtype=torch.float32)
    mmap, host = (ExpertStore(lm.ckpt, lm.arch, lm.dtype, mode=m) for m in ("mmap", "host"))
    for l in lm.arch.moe_layers:
        for e in range(lm.arch.num_experts):
            a, b = mmap.read(l, e), host.read(l, e)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fixture_logits_match_hf(fixture_model):
    ids = torch.randint(1, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    lm = _ours(fixture_model)
    with torch.no_grad():
        ours = lm.model(ids).logits
        ref = transformers.AutoModelForCausalLM.from_pretrained(fixture_model, dtype=torch.float32,
                                                                experts_implementation="eager").eval()(ids).logits
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_per_expert_loop(dtype):
    """Resident's grouped call over all E experts (empty groups, one-row groups, uneven ones) gives each expert's rows
    exactly what the per-expert loop gives them, bit for bit."""
    from runtime.expert_compute import group_pairs, make_expert_fn, make_grouped_fn
    from runtime.families.arch import ExpertFormat

    fmt = ExpertFormat(kind="glu", hidden=48, intermediate=24, activation="silu")
    grouped, loop = make_grouped_fn(fmt), make_expert_fn(fmt)
    g = torch.Generator().manual_seed(0)
    for e_n, t_n, k in [(16, 3, 4), (64, 5, 6), (8, 40, 2)]:
        gu = (torch.randn(e_n, 48, 48, generator=g) * 0.2).to(dtype)              # [E, 2I, H]
        dn = (torch.randn(e_n, 48, 24, generator=g) * 0.2).to(dtype)              # [E, H, I]
        x = torch.randn(t_n, 48, generator=g).to(dtype)
        idx = torch.stack([torch.randperm(e_n, generator=g)[:k] for _ in range(t_n)])
        p = group_pairs(x, idx.numpy(), torch.rand(t_n, k, generator=g).to(dtype))
        y = grouped(p.xs, gu, dn, p.offsets(e_n, x.device))
        for e, (a, b) in p.span.items():
            assert torch.equal(y[a:b], loop(p.rows(e), {"gate_up": gu[e], "down": dn[e]})), (e_n, t_n, e)


def test_activations_are_hf_kernels():
    """Experts call SiLU as `F.silu` (the kernel HF's SiLUActivation and nn.SiLU call, without the module call),
    with the same bits as HF's module; an activation that is more than one kernel call stays HF's own module."""
    from transformers.activations import ACT2FN

    from runtime.expert_compute import activation

    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for name in ("silu", "swish"):
        assert activation(name) is torch.nn.functional.silu
        assert torch.equal(activation(name)(x), ACT2FN[name](x))
    assert type(activation("gelu")) is type(ACT2FN["gelu"])
