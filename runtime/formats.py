"""Quantized expert formats that real MoE checkpoints ship, and turning one expert into weights we compute with.

Two formats are read (names as plans and profiles record them):
  "mxfp4"              gpt-oss: `{proj}_blocks` uint8 [E, R, C/32, 16], two e2m1 (FP4) values per byte, and
                       `{proj}_scales` uint8 [E, R, C/32], one e8m0 power of two (bias 127) per group of 32;
                       dequantized [E, R, C] and transposed to transformers' in-memory [E, C, R]
  "fp8_e4m3_b{r}x{c}"  DeepSeek-V3/R1, Qwen3-FP8: float8_e4m3fn `...weight` [R, C] per expert and a float32
                       `...weight_scale_inv` [ceil(R/r), ceil(C/c)], one scale per r x c block
                       (quantization_config.weight_block_size)
A `PackedFormat` says what one expert holds in such a format (tensors, shapes, dtypes, bytes): the expert store reads
these bytes, the cache holds them, the link moves them, and `materialize` dequantizes them into the compute dtype
right before compute. The dequantizers reproduce transformers' own (integrations/mxfp4.py
`convert_moe_packed_tensors`, integrations/finegrained_fp8.py `Fp8Dequantize`) bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from artifacts.errors import UserError
from runtime.families.arch import ExpertFormat

MXFP4_GROUP = 32                    # values per e8m0 scale; 16 bytes of two FP4 values each
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)   # e2m1 code -> value (bit 3 is the sign)
E8M0_BIAS = 127
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor of one expert, as a store holds it and a cache slot is allocated."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def carve(buf: torch.Tensor, layout: Sequence[tuple[str, int]], specs: Mapping[str, TensorSpec]
          ) -> dict[str, torch.Tensor]:
    """One expert's tensors as views of one uint8 buffer laid out as `layout` (keys and their bytes, in order;
    `ExpertStore.flat_layout`), keyed in `specs`' order."""
    views, at = {}, 0
    for k, n in layout:
        views[k] = buf[at:at + n].view(specs[k].dtype).view(specs[k].shape)
        at += n
    return {k: views[k] for k in specs}


@dataclass(frozen=True)
class PackedFormat:
    """One routed expert as a quantized checkpoint stores it: `tensors` are (key, spec) in the order read.

    mxfp4 (GPT-OSS experts): gate_up_blocks [2I, H/32, 16] u8, gate_up_scales [2I, H/32] u8, gate_up_bias [2I],
      down_blocks [H, I/32, 16] u8, down_scales [H, I/32] u8, down_bias [H]   (biases in the checkpoint's dtype)
    fp8 (GLU experts, per expert on disk): gate [I, H], up [I, H], down [H, I] float8_e4m3fn, and
      {gate,up,down}_scale_inv [ceil(rows/br), ceil(cols/bc)] (float32 as shipped)
    bytes per expert = sum of the tensors' bytes: what the link moves and a cache slot holds.
    """

    kind: str                                       # "mxfp4" | "fp8"
    tensors: tuple[tuple[str, TensorSpec], ...]
    block: tuple[int, int] | None = None            # fp8: (rows, cols) of one weight_scale_inv block

    @property
    def name(self) -> str:
        """As plans and profiles record it (artifacts.plan.EXPERT_FORMAT)."""
        return "mxfp4" if self.kind == "mxfp4" else f"fp8_e4m3_b{self.block[0]}x{self.block[1]}"

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for _, s in self.tensors)


def mxfp4_format(fmt: ExpertFormat, bias_dtype: torch.dtype) -> PackedFormat:
    """GPT-OSS experts in MXFP4: the disk layout of one expert (row e of every fused tensor)."""
    h, i, g = fmt.hidden, fmt.intermediate, MXFP4_GROUP
    u8 = torch.uint8
    return PackedFormat("mxfp4", (
        ("gate_up_blocks", TensorSpec((2 * i, h // g, g // 2), u8)),    # [2I, H/32, 16]
        ("gate_up_scales", TensorSpec((2 * i, h // g), u8)),            # [2I, H/32]
        ("gate_up_bias", TensorSpec((2 * i,), bias_dtype)),
        ("down_blocks", TensorSpec((h, i // g, g // 2), u8)),           # [H, I/32, 16]
        ("down_scales", TensorSpec((h, i // g), u8)),                   # [H, I/32]
        ("down_bias", TensorSpec((h,), bias_dtype)),
    ))


def fp8_format(fmt: ExpertFormat, block: tuple[int, int], scale_dtype: torch.dtype) -> PackedFormat:
    """GLU experts in block-scaled fp8 (DeepSeek-V3 layout): weights and their per-block inverse scales."""
    h, i = fmt.hidden, fmt.intermediate
    f8 = torch.float8_e4m3fn

    def grid(rows: int, cols: int) -> tuple[int, int]:
        return -(-rows // block[0]), -(-cols // block[1])

    return PackedFormat("fp8", (
        ("gate", TensorSpec((i, h), f8)), ("gate_scale_inv", TensorSpec(grid(i, h), scale_dtype)),
        ("up", TensorSpec((i, h), f8)), ("up_scale_inv", TensorSpec(grid(i, h), scale_dtype)),
        ("down", TensorSpec((h, i), f8)), ("down_scale_inv", TensorSpec(grid(h, i), scale_dtype)),
    ), block=tuple(block))


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 -> `dtype`: blocks u8 [..., G, 16], scales u8 [..., G] -> [..., 32 G].

    w[..., 32 g + 2 j]     = FP4[blocks[..., g, j] & 0xF] * 2^(scales[..., g] - 127)
    w[..., 32 g + 2 j + 1] = FP4[blocks[..., g, j] >> 4]  * 2^(scales[..., g] - 127)
    Same ops as transformers' `convert_moe_packed_tensors` (FP4 values in `dtype`, then ldexp), so the bits agree.
    """
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    *lead, g, b = blocks.shape
    out = torch.empty(*lead, g, 2 * b, dtype=dtype, device=blocks.device)           # [..., G, 32]
    out[..., 0::2] = lut[(blocks & 0x0F).to(torch.int)]
    out[..., 1::2] = lut[(blocks >> 4).to(torch.int)]
    torch.ldexp(out, scales.to(torch.int32)[..., None] - E8M0_BIAS, out=out)
    return out.reshape(*lead, g * 2 * b)


def dequant_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                       dtype: torch.dtype) -> torch.Tensor:
    """Block-scaled fp8 -> `dtype`: w [R, C] float8, scale_inv [ceil(R/br), ceil(C/bc)] -> [R, C].

    w[r, c] = float32(q[r, c]) * float32(scale_inv[r // br, c // bc]), rounded once to `dtype`
    (transformers' `Fp8Dequantize`; a partial last block row or column takes its block's scale).
    """
    rows, cols = w.shape
    br, bc = block
    out = w.to(torch.float32)                                                        # [R, C]
    s = scale_inv.to(torch.float32).repeat_interleave(br, dim=0)[:rows]              # [R, ceil(C/bc)]
    full = cols // bc
    out[:, :full * bc].unflatten(-1, (full, bc)).mul_(s[:, :full, None])
    if cols % bc:
        out[:, full * bc:].mul_(s[:, full:])
    return out.to(dtype)


def materialize(w: Mapping[str, torch.Tensor], packed: PackedFormat | None,
                dtype: torch.dtype) -> Mapping[str, torch.Tensor]:
    """One expert as `ExpertFormat.shapes()` in `dtype`, ready to compute, from what a store or cache slot holds
    (read only: callers compute with it, never write into it).

    packed None: `w` itself when already `dtype` (no copy on the decode path), else converted into fresh (aligned) workspace tensors
      (widening bf16 -> float32 is exact, so lossless stays bit-exact);
    mxfp4: gate_up = dequant(gate_up_blocks, gate_up_scales)^T [H, 2I], down = dequant(down_*)^T [I, H];
    fp8:   gate_up = [dequant(gate); dequant(up)] [2I, H], down = dequant(down) [H, I].
    The workspace is fresh per call: the cache keeps only packed bytes.
    """
    if packed is None:
        if next(iter(w.values())).dtype == dtype:
            return w
        return {k: v.to(dtype) for k, v in w.items()}
    if packed.kind == "mxfp4":
        return {"gate_up": dequant_mxfp4(w["gate_up_blocks"], w["gate_up_scales"], dtype).t().contiguous(),
                "gate_up_bias": w["gate_up_bias"].to(dtype),
                "down": dequant_mxfp4(w["down_blocks"], w["down_scales"], dtype).t().contiguous(),
                "down_bias": w["down_bias"].to(dtype)}
    deq = {k: dequant_fp8_blocks(w[k], w[k + "_scale_inv"], packed.block, dtype) for k in ("gate", "up", "down")}
    return {"gate_up": torch.cat((deq["gate"], deq["up"])), "down": deq["down"]}


def fp8_block(quantization: Mapping, where: str) -> tuple[int, int]:
    """The fp8 scale block (rows, cols) from a checkpoint's quantization_config (`weight_block_size`)."""
    block = quantization.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise UserError(f"{where} is fp8 but config.json's quantization_config has no weight_block_size [rows, cols] "
                        f"(got {block!r}); Understudy reads block-scaled fp8 (weight_scale_inv per block), as "
                        "DeepSeek-V3 and Qwen3-FP8 ship it")
    return int(block[0]), int(block[1])


def scale_inv_name(weight: str) -> str:
    """`...proj.weight` -> `...proj.weight_scale_inv` (the DeepSeek-V3 / transformers FP8 naming)."""
    return weight.removesuffix(".weight") + ".weight_scale_inv"
