"""The expert store reads one expert lazily, from either on-disk layout, single file or sharded."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from artifacts.errors import UserError
from runtime.checkpoint import Checkpoint
from runtime.expert_store import ExpertStore
from runtime.families import resolve_arch
from runtime.model_loader import load_config, load_model
from tiny_models import build_tiny


def _fuse_qwen_checkpoint(src, dst):
    """Rewrite a per-expert qwen2_moe checkpoint with experts fused as transformers keeps them in memory."""
    import shutil

    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    cfg = load_config(src)
    arch = resolve_arch(cfg)
    out = {k: v for k, v in sd.items() if ".experts." not in k}
    for l in arch.moe_layers:
        p = f"model.layers.{l}.mlp.experts."
        gate_up = [torch.cat([sd[f"{p}{e}.gate_proj.weight"], sd[f"{p}{e}.up_proj.weight"]]) for e in range(arch.num_experts)]
        out[p + "gate_up_proj"] = torch.stack(gate_up).contiguous()          # [E, 2I, H]
        out[p + "down_proj"] = torch.stack([sd[f"{p}{e}.down_proj.weight"] for e in range(arch.num_experts)])
    (dst / "model.safetensors").unlink()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_fused_layout_reads_same_experts(tiny_model, tmp_path):
    src = tiny_model("qwen2_moe")
    fused = _fuse_qwen_checkpoint(src, tmp_path / "fused")
    a, b = load_model(src, dtype=torch.float32), load_model(fused, dtype=torch.float32)
    sa, sb = ExpertStore(a.ckpt, a.arch, a.dtype), ExpertStore(b.ckpt, b.arch, b.dtype)
    assert sb._layout[0] == "fused"
    for e in range(a.arch.num_experts):
        wa, wb = sa.read(0, e), sb.read(0, e)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sharded_checkpoint(tmp_path):
    path = build_tiny("olmoe", tmp_path / "sharded", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    lm = load_model(path, dtype=torch.float32)
    store = ExpertStore(lm.ckpt, lm.arch, lm.dtype)
    w = store.read(lm.arch.moe_layers[-1], lm.arch.num_experts - 1)
    assert w["gate_up"].shape == (2 * lm.arch.experts.intermediate, lm.arch.experts.hidden)


def test_gpt_oss_fused_transposed_with_biases(tiny_model):
    lm = load_model(tiny_model("gpt_oss"), dtype=torch.float32)
    store = ExpertStore(lm.ckpt, lm.arch, lm.dtype)
    w = store.read(0, 3)
    raw = lm.ckpt.tensor("model.layers.0.mlp.experts.gate_up_proj")[3]
    assert torch.equal(w["gate_up"], raw) and set(w) == {"gate_up", "gate_up_bias", "down", "down_bias"}


def test_read_is_one_expert_and_a_fresh_copy(tiny_model):
    lm = load_model(tiny_model("qwen3_moe"), dtype=torch.float32)
    store = ExpertStore(lm.ckpt, lm.arch, lm.dtype)
    w1, w2 = store.read(0, 1), store.read(0, 1)
    assert w1["gate_up"].data_ptr() != w2["gate_up"].data_ptr()
    assert store.expert_bytes == sum(t.numel() * 4 for t in w1.values())


def test_missing_weights_file_is_user_error(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(UserError, match="no model.safetensors"):
        Checkpoint(tmp_path / "m")


def test_an_expert_back_to_back_on_disk_lands_in_one_copy(fixture_model, tiny_model, tmp_path):
    """Where a checkpoint keeps an expert's tensors back to back (save_pretrained's per-expert order: down, gate,
    up), a cache slot is one buffer and a load is one copy of the expert's bytes; the slot then holds exactly what
    the store reads. Elsewhere (Mixtral's w1, w2, w3 put down between gate and up; a fused layout; a dtype
    conversion) the slot keeps a tensor per key and the copies go per tensor, with the same result. A host store
    keeps each such expert as one buffer too."""
    from runtime.expert_cache import ExpertCache

    def check(path, dtype=None, flat=True, mode="mmap"):
        lm = load_model(path, dtype=torch.float32 if dtype == torch.float32 else None)
        store = ExpertStore(lm.ckpt, lm.arch, dtype, mode=mode)
        assert (store.flat_layout is not None) == flat, store.flat_layout
        layer = lm.arch.moe_layers[-1]
        cache = ExpertCache(store.specs, {layer: 2}, torch.device("cpu"), flat=store.flat_layout)
        for e in (0, lm.arch.num_experts - 1):
            dst = cache.assign(layer, e)
            assert (dst.flat is not None) == flat
            assert store.copy_into(layer, e, dst) == store.expert_bytes
            ref = store.read(layer, e)
            assert all(torch.equal(dst[k], ref[k]) for k in ref)
            for t in dst.values():                    # every key starts 64-byte aligned, as fresh tensors do
                assert t.data_ptr() % 64 == 0

    check(fixture_model)                               # bf16, per expert, back to back
    check(fixture_model, mode="host")                  # host copies: one buffer per expert, one copy a load
    check(fixture_model, torch.float32, flat=False)    # held as float32: each tensor converted on its copy
    check(tiny_model("mixtral"), flat=False)           # w1 (gate), w2 (down), w3 (up): gate_up not contiguous
    check(_fuse_qwen_checkpoint(tiny_model("qwen2_moe"), tmp_path / "fused"), flat=False)
