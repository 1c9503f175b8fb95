"""Tiny quantized checkpoints in the layouts real MoEs ship, built by quantizing a tiny model's saved weights.

  gpt-oss MXFP4:    experts.{gate_up,down}_proj_blocks u8 [E, R, C/32, 16] + _scales u8 [E, R, C/32], where [E, C, R] is
                    transformers' in-memory tensor; biases, router, attention, embeddings in bf16 (as gpt-oss-20b)
  DeepSeek-V3 FP8:  every `*proj.weight` (attention, dense MLP, shared and routed experts) float8_e4m3fn with a float32
                    `weight_scale_inv` per block; router, norms, embeddings in bf16 (as DeepSeek-V3)
The quantizers are the formats' inverses (nearest FP4 value under a power-of-two group scale; fp8 with
scale = 448 / amax per block, transformers' `Fp8Quantize`); only tests need them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from runtime.formats import FP4_VALUES, MXFP4_GROUP
from tiny_models import build_tiny, tiny_config

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)       # 448
FP8_BLOCK = (8, 8)            # every tiny DeepSeek-V3 weight dimension is a multiple of 8


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] (C % 32 == 0) -> blocks u8 [..., R, C/32, 16], scales u8 [..., R, C/32].
    Per group of 32: e = ceil(log2(amax / 6)) (the largest FP4 magnitude is 6), each value the nearest FP4 value of
    w / 2^e; low nibble = even column, high nibble = odd column; scale byte = e + 127."""
    *lead, r, c = w.shape
    g = w.to(torch.float32).reshape(*lead, r, c // MXFP4_GROUP, MXFP4_GROUP)
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-127, 127)
    x = g / torch.exp2(e)[..., None]
    mags = torch.tensor(FP4_VALUES[:8])
    code = (x.abs()[..., None] - mags).abs().argmin(-1) + 8 * (x < 0)                 # [..., G, 32] in 0..15
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), (e + 127).to(torch.uint8).contiguous()


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] -> (float8_e4m3fn [R, C], float32 scale_inv [ceil(R/br), ceil(C/bc)]); a partial edge block is
    quantized with its own scale. scale = 448 / amax per block (1 for an all-zero block), scale_inv = 1 / scale."""
    rows, cols = w.shape
    br, bc = block
    sr, sc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(sr * br, sc * bc)
    padded[:rows, :cols] = w.to(torch.float32)
    tiles = padded.reshape(sr, br, sc, bc)
    amax = tiles.abs().amax(dim=(1, 3))                                                # [sr, sc]
    scale = torch.where(amax > 0, FP8_MAX / amax, torch.ones_like(amax))
    q = (tiles * scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(sr * br, sc * bc)[:rows, :cols].contiguous(), (1.0 / scale).to(torch.float32)


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> Path:
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text()) | {"dtype": "bfloat16"}
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def build_tiny_mxfp4(out: Path, seed: int = 0, quantized: bool = True) -> Path:
    """A tiny gpt-oss (H = I = 32, so both expert matrices have whole groups of 32) with MXFP4 experts
    (`quantized` False: the same model's bf16 release)."""
    config = tiny_config("gpt_oss")
    config.intermediate_size = 32
    path = build_tiny("gpt_oss", out, seed=seed, config=config)
    tensors = {}
    for k, v in load_file(str(path / "model.safetensors")).items():
        if quantized and k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            # in memory [E, C, R] -> on disk [E, R, C/32, 16] and [E, R, C/32]
            tensors[k + "_blocks"], tensors[k + "_scales"] = quantize_mxfp4(v.transpose(1, 2))
        else:
            tensors[k] = v.to(torch.bfloat16)
    keep = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    return _rewrite(path, tensors, {"quant_method": "mxfp4", "modules_to_not_convert": keep} if quantized else None)


def build_tiny_fp8(out: Path, seed: int = 0, block: tuple[int, int] = FP8_BLOCK, quantized: bool = True) -> Path:
    """A tiny DeepSeek-V3 with every projection weight in block-scaled fp8 (DeepSeek-V3's own FP8 release layout;
    `quantized` False: the same model's bf16 release)."""
    path = build_tiny("deepseek_v3", out, seed=seed)
    tensors = {}
    for k, v in load_file(str(path / "model.safetensors")).items():
        if quantized and v.dim() == 2 and k.endswith(("proj.weight", "proj_with_mqa.weight")):
            tensors[k], tensors[k.removesuffix(".weight") + ".weight_scale_inv"] = quantize_fp8_blocks(v, block)
        else:
            tensors[k] = v.to(torch.bfloat16)
    return _rewrite(path, tensors, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": list(block)} if quantized else None)

