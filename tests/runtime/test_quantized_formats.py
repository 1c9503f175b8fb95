"""Quantized checkpoints as real MoEs ship them: gpt-oss MXFP4 and DeepSeek-V3 block-scaled fp8.

Our dequantizers equal transformers' own bit for bit. Tiny models quantized by the test (tests/quantized_models.py)
run through the runtime (resident: experts dequantized once at load; lru: packed experts in the cache, dequantized
into a workspace before each compute) with logits equal to transformers' own CPU loading of the same checkpoint,
which dequantizes too (Mxfp4Config / FineGrainedFP8Config with dequantize=True: what transformers does on a CPU
anyway). The store, the cache, the link, the profile and the plan count packed bytes.
"""
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from artifacts import Plan, UserError
from artifacts.plan import EXPERT_FORMAT
from compiler.compile_plan import CompileConfig, compile_plan
from helpers import sample_texts, write_jsonl
from profiler.profile_model import ProfileConfig, profile
from quantized_models import FP8_BLOCK, build_tiny_fp8, build_tiny_mxfp4, quantize_fp8_blocks
from runtime import Runtime
from runtime.expert_store import ExpertStore
from runtime.families.arch import ExpertFormat
from runtime.fingerprint import model_fingerprint
from runtime.formats import dequant_fp8_blocks, dequant_mxfp4, materialize, mxfp4_format
from runtime.model_loader import load_model

KINDS = ("mxfp4", "fp8")
BUILD = {"mxfp4": build_tiny_mxfp4, "fp8": build_tiny_fp8}
NAME = {"mxfp4": "mxfp4", "fp8": f"fp8_e4m3_b{FP8_BLOCK[0]}x{FP8_BLOCK[1]}"}
IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """quantized(kind) -> a tiny checkpoint in that layout (built once per module)."""
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = BUILD[kind](tmp_path_factory.mktemp(kind))
        return built[kind]

    return get


def _hf(path, kind, dtype):
    qc = (transformers.Mxfp4Config(dequantize=True) if kind == "mxfp4"
          else transformers.FineGrainedFP8Config(weight_block_size=FP8_BLOCK, dequantize=True))
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager",
                                                             quantization_config=qc).eval()


def _packed_bytes(kind, h, i):
    """Bytes of one expert as the checkpoint stores it, counted by hand."""
    if kind == "mxfp4":   # two FP4 values per byte + one e8m0 byte per 32 values, for gate_up [2I x H] and down
        return (2 * i * h + h * i) // 2 + (2 * i * h + h * i) // 32 + (2 * i + h) * 2    # + bf16 biases
    br, bc = FP8_BLOCK    # one byte per weight + a float32 scale per block
    return 3 * i * h + 4 * (2 * -(-i // br) * -(-h // bc) + -(-h // br) * -(-i // bc))


# ---- the dequantizers against transformers' ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_dequant_is_transformers_bit_for_bit(dtype):
    """Random bytes and every e8m0 exponent but NaN (255): one expert at a time, as our store reads it, equals the
    expert's slice of transformers' dequantized stack (`convert_moe_packed_tensors`, transposed to [E, C, R])."""
    g = torch.Generator().manual_seed(0)
    h, i, e = 64, 32, 3
    gu_blocks = torch.randint(0, 256, (e, 2 * i, h // 32, 16), dtype=torch.uint8, generator=g)
    gu_scales = torch.randint(0, 255, (e, 2 * i, h // 32), dtype=torch.uint8, generator=g)
    dn_blocks = torch.randint(0, 256, (e, h, i // 32, 16), dtype=torch.uint8, generator=g)
    dn_scales = torch.randint(0, 255, (e, h, i // 32), dtype=torch.uint8, generator=g)
    ref_gu = convert_moe_packed_tensors(gu_blocks, gu_scales, dtype=dtype)     # [E, H, 2I]
    ref_dn = convert_moe_packed_tensors(dn_blocks, dn_scales, dtype=dtype)     # [E, I, H]
    assert torch.equal(dequant_mxfp4(gu_blocks, gu_scales, dtype).transpose(1, 2), ref_gu)
    packed = mxfp4_format(ExpertFormat(kind="gptoss", hidden=h, intermediate=i), torch.bfloat16)
    for x in range(e):
        w = {"gate_up_blocks": gu_blocks[x], "gate_up_scales": gu_scales[x], "gate_up_bias": torch.zeros(2 * i),
             "down_blocks": dn_blocks[x], "down_scales": dn_scales[x], "down_bias": torch.zeros(h)}
        assert {k: tuple(v.shape) for k, v in w.items()} == {k: s.shape for k, s in packed.specs().items()}
        m = materialize(w, packed, dtype)
        assert torch.equal(m["gate_up"], ref_gu[x]) and torch.equal(m["down"], ref_dn[x])
        assert m["gate_up"].is_contiguous() and m["gate_up"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_dequant_is_transformers_bit_for_bit(dtype):
    """Whole blocks: transformers' loader (`Fp8Dequantize`: float32 product, rounded once) with arbitrary scales."""
    g = torch.Generator().manual_seed(1)
    q, _ = quantize_fp8_blocks(torch.randn(48, 64, generator=g) * 3, (16, 32))
    s = torch.rand(3, 2, generator=g) * 0.1 + 1e-3                          # [48/16, 64/32] float32
    ref = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=dtype)
    assert torch.equal(dequant_fp8_blocks(q, s, (16, 32), dtype), ref)


def test_fp8_dequant_of_partial_edge_blocks():
    """A weight that is not whole blocks (DeepSeek-V3's kv_a_proj_with_mqa: 576 rows, 128-row blocks) takes its edge
    blocks' scales. transformers' loader infers the block from the scale grid and cannot take such a shape; its
    backward-pass dequantizer (`_dequantize_fp8_weight`, in float32) does, and agrees bit for bit."""
    w = torch.randn(40, 70, generator=torch.Generator().manual_seed(2))
    q, s = quantize_fp8_blocks(w, (16, 32))
    assert s.shape == (3, 3)
    ours = dequant_fp8_blocks(q, s, (16, 32), torch.float32)
    assert torch.equal(ours, _dequantize_fp8_weight(q, s, [16, 32], torch.float32))
    assert (ours - w).abs().max() <= w.abs().max() / 8                       # e4m3: 3 mantissa bits


# ---- whole models against transformers' loading of the same checkpoint ------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_store_experts_equal_transformers_dequantized_experts(quantized, kind):
    """Packed in the store then materialized, or dequantized on load (a store with a dtype): both are the tensors
    transformers holds after dequantizing the same checkpoint."""
    path = quantized(kind)
    lm = load_model(path, dtype=torch.float32)
    packed, unpacked = ExpertStore(lm.ckpt, lm.arch), ExpertStore(lm.ckpt, lm.arch, torch.float32, mode="host")
    assert packed.held is not None and packed.dtype is None and unpacked.held is None
    assert unpacked.expert_bytes == lm.arch.experts.numel() * 4 and unpacked.format_name == "float32"
    hf = _hf(path, kind, torch.float32)
    for layer in lm.arch.moe_layers:
        ref = hf.model.layers[layer].mlp.experts
        for e in range(lm.arch.num_experts):
            ours = materialize(packed.read(layer, e), packed.held, torch.float32)
            assert ours.keys() == unpacked.read(layer, e).keys()
            assert all(torch.equal(v, unpacked.read(layer, e)[k]) for k, v in ours.items())
            assert torch.equal(ours["gate_up"], ref.gate_up_proj[e]) and torch.equal(ours["down"], ref.down_proj[e])
            if kind == "mxfp4":
                assert torch.equal(ours["gate_up_bias"], ref.gate_up_proj_bias[e])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", ["resident", "lru"])
@pytest.mark.parametrize("dtype", [torch.float32, None])
def test_logits_equal_transformers_loading(quantized, kind, policy, dtype):
    """Bit-identical logits in float32 and in the checkpoint's own bf16 (the default: fp8 and packed bytes are an
    encoding, the unquantized tensors' dtype is the checkpoint's)."""
    path = quantized(kind)
    kw = {"cache": 2} if policy == "lru" else {}
    with Runtime.load(path, policy=policy, dtype=dtype, lossless=True, **kw) as rt:
        assert rt.lm.dtype == (dtype or torch.bfloat16)
        ours = rt.forward(IDS)
        if policy == "lru":
            assert rt.stats.to_dict()["loads"] > 0 and rt.store.held is not None
    with torch.no_grad():
        ref = _hf(path, kind, rt.lm.dtype)(IDS).logits
    assert torch.equal(ours, ref)


# ---- bytes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_packed_bytes_are_stored_cached_and_moved(quantized, kind):
    path = quantized(kind)
    with Runtime.load(path, policy="lru", cache=2, dtype="float32") as rt:
        arch = rt.lm.arch
        packed = _packed_bytes(kind, arch.experts.hidden, arch.experts.intermediate)
        assert rt.store.expert_bytes == rt.store.disk_expert_bytes == rt.cache.expert_bytes == packed
        assert rt.store.format_name == rt.store.disk_format == rt.budget.expert_dtype == NAME[kind]
        assert EXPERT_FORMAT.fullmatch(NAME[kind])                         # a name plans accept
        assert f"({NAME[kind]})" in rt.budget.describe() and "computed in float32" in rt.budget.describe()
        slots = 2 * len(arch.moe_layers)
        assert rt.cache.capacity_bytes == rt.budget.capacity_bytes == slots * packed
        tensors = [t for layer in rt.cache._buf.values() for w in layer for t in w.values()]
        assert rt.cache.allocated_bytes() == rt.cache.capacity_bytes    # storage behind the slots, each once
        assert {t.dtype for t in tensors} == ({torch.uint8, torch.bfloat16} if kind == "mxfp4"
                                              else {torch.float8_e4m3fn, torch.float32})
        rt.generate(["the expert cache", "router score"], max_new_tokens=6)
        d = rt.stats.to_dict()
        assert d["loads"] > 0 and d["bytes_loaded"] == d["loads"] * packed
        assert d["peak_cache_bytes"] <= rt.cache.capacity_bytes


@pytest.mark.parametrize("kind", KINDS)
def test_plan_budgets_packed_bytes(quantized, kind, tmp_path):
    """moe-profile and moe-compile at 25% count packed bytes; the runtime honours the plan's budget in them."""
    path = quantized(kind)
    calib = write_jsonl(tmp_path / "c.jsonl", sample_texts(6, 31))
    prof = profile(path, str(calib), ProfileConfig(quant_tokens=0,
                                                   samples=6, seq_len=32, probe_tokens=64, sensitivity_tokens=64),
                   progress=False)
    m = prof.header["model"]
    packed = _packed_bytes(kind, m["hidden_size"], m["expert_intermediate"])
    assert m["checkpoint_dtype"] == NAME[kind] and m["expert_bytes"] == packed
    assert m["routed_expert_bytes"] == packed * m["num_experts"] * len(m["moe_layers"])
    prof.save(tmp_path / "profile")
    compile_plan(tmp_path / "profile", CompileConfig(budget="25%", search_tokens=64), log=lambda *a: None
                 ).save(tmp_path / "plan")
    plan = Plan.load(tmp_path / "plan")
    assert plan.expert_dtype == NAME[kind] and plan.expert_bytes == packed
    assert plan.cache_budget_bytes <= 0.25 * m["routed_expert_bytes"]
    with Runtime.load(path, plan=tmp_path / "plan", lossless=True) as rt:    # lossless: every miss is a load
        assert rt.cache.expert_bytes == packed and rt.cache.capacity_bytes <= plan.cache_budget_bytes
        rt.generate(["the expert cache", "router score"], max_new_tokens=8)
        d = rt.stats.to_dict()
        assert d["loads"] > 0 and d["bytes_loaded"] == d["loads"] * packed
        assert d["peak_cache_bytes"] <= plan.cache_budget_bytes


# ---- identity and errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_names_the_quantized_format(quantized, kind, tmp_path):
    """The bf16 release of the same model (same architecture, same routers) is another model: its experts are not
    these, so a plan profiled on one is refused by the other."""
    ours, release = (load_model(p) for p in (quantized(kind), BUILD[kind](tmp_path / "bf16", quantized=False)))
    assert ours.arch == release.arch
    routers = [k for k in ours.ckpt.keys() if f".{ours.arch.router_attr}." in k]
    assert routers and all(torch.equal(ours.ckpt.view(k), release.ckpt.view(k)) for k in routers)
    assert model_fingerprint(ours.arch, ours.config, ours.ckpt) != model_fingerprint(release.arch, release.config,
                                                                                     release.ckpt)


def _no_block_size(path):
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]["weight_block_size"]
    (path / "config.json").write_text(json.dumps(cfg))


def _no_expert_scale(path):
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("breakage, words", [(_no_block_size, "weight_block_size"),
                                             (_no_expert_scale, "lacks routed-expert tensor model.layers.2.mlp."
                                                                "experts.5.up_proj.weight_scale_inv")])
def test_broken_fp8_checkpoint_is_one_line(quantized, tmp_path, breakage, words):
    path = shutil.copytree(quantized("fp8"), tmp_path / "broken")
    breakage(path)
    with pytest.raises(UserError, match=words) as err:
        Runtime.load(path, policy="lru", cache=2)
    assert "\n" not in str(err.value)
