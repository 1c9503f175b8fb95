"""Weight-only quantization of routed experts: the one implementation the profiler measures and the runtime holds.

A scheme quantizes each weight matrix W [out, in] (out: output channels; in: the dimension a matmul sums over)
symmetrically, in groups of `group` consecutive input columns (group None: the whole row, per output channel):
  scale[o, g] = max_{i in g} |W[o, i]| / qmax        qmax = 2^(bits-1) - 1 (int8: 127, int4: 7); float32, then
                                                     rounded to `scale_dtype` (0, an all-zero group, is stored as 1)
  q[o, i]     = clamp(round(W[o, i] / scale[o, g]), -qmax, qmax)      (round half to even)
  W'[o, i]    = q[o, i] * scale[o, g]                computed in float32, rounded once to the compute dtype
so |W - W'| <= scale / 2 elementwise (the stored scale is what q is computed against). A last group may be partial.
Held as plain tensors, so a preallocated cache slot can hold them:
  int8: q int8 [out, in];  int4: q + 8 in 1..15, two codes a byte, column 2j in the low nibble and 2j+1 in the high
  one (as MXFP4 packs), uint8 [out, in/2];  scale [out, ceil(in / group)] in scale_dtype.
  bytes(out, in) = out * in * bits / 8 + out * ceil(in / group) * scale_dtype bytes
An expert's weight matrices are quantized along their input dimension in the layout `ExpertFormat.shapes()` holds
them: GLU gate_up [2I, H] (fused gate and up rows) and down [H, I] are [out, in]; GPT-OSS's gate_up [H, 2I] and
down [I, H] are [in, out] (computed as x @ W), so their transpose is quantized. Biases stay in float.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from runtime.families.arch import ExpertFormat
from runtime.formats import TensorSpec


@dataclass(frozen=True)
class Scheme:
    """A weight-only symmetric quantization scheme (see the module docstring)."""

    name: str
    bits: int                          # 8 or 4
    group: int | None                  # input columns per scale; None: one scale per output channel
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self):
        assert self.bits in (4, 8), f"{self.name}: {self.bits}-bit codes are not implemented (4 or 8)"
        assert self.group is None or self.group >= 1, f"{self.name}: group {self.group}"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, cols: int) -> int:
        """Scales per output channel of a matrix with `cols` input columns."""
        return 1 if self.group is None else -(-cols // self.group)

    def describe(self) -> dict:
        """As profiles record it."""
        return {"name": self.name, "bits": self.bits, "group": self.group,
                "scale_dtype": str(self.scale_dtype).removeprefix("torch.")}


INT8 = Scheme("int8", 8, None)        # per output channel
INT4 = Scheme("int4", 4, 32)          # group-wise: 32 inputs per scale, as MXFP4 and llama.cpp's Q4_0
SCHEMES = (INT8, INT4)


@dataclass(frozen=True)
class QuantizedWeight:
    q: torch.Tensor                    # int8 [out, in] | uint8 [out, in/2] (int4, two codes a byte)
    scale: torch.Tensor                # [out, groups] scale_dtype


def packed_bytes(shape: tuple[int, int], scheme: Scheme) -> int:
    """Bytes of one quantized [out, in] matrix: codes plus scales."""
    rows, cols = shape
    return rows * math.ceil(cols * scheme.bits / 8) + rows * scheme.groups(cols) * scheme.scale_dtype.itemsize


@torch.no_grad()
def quantize(w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """w [out, in] float -> codes and scales (module docstring)."""
    rows, cols = w.shape
    if scheme.bits == 4 and cols % 2:
        raise ValueError(f"int4 packs two input columns a byte; {cols} columns is odd")
    size = cols if scheme.group is None else scheme.group
    n = scheme.groups(cols)
    wg = F.pad(w.float(), (0, n * size - cols)).view(rows, n, size)                    # [out, G, group]
    amax = wg.abs().amax(dim=-1)                                                       # [out, G]
    fmax = torch.finfo(scheme.scale_dtype).max
    scale = (amax / scheme.qmax).clamp(max=fmax).to(scheme.scale_dtype)                # [out, G]
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(wg / scale.float()[..., None]).clamp_(-scheme.qmax, scheme.qmax)   # [out, G, group]
    q = q.view(rows, n * size)[:, :cols].to(torch.int8)                                # [out, in]
    if scheme.bits == 4:
        u = (q + 8).to(torch.uint8)
        q = u[:, 0::2] | (u[:, 1::2] << 4)                                             # [out, in/2]
    return QuantizedWeight(q.contiguous(), scale)


@torch.no_grad()
def dequantize(w: QuantizedWeight, scheme: Scheme, dtype: torch.dtype) -> torch.Tensor:
    """codes and scales -> W' [out, in] in `dtype`."""
    if scheme.bits == 4 and scheme.group is not None and (2 * w.q.shape[1]) % scheme.group == 0:
        # whole groups: the same float32 products, without materializing per-column scales (2.5x faster on CPU)
        rows, n = w.q.shape[0], w.scale.shape[1]
        codes = torch.stack((w.q & 0x0F, w.q >> 4), dim=-1).view(rows, n, scheme.group)     # [out, G, group] u8
        return ((codes.float() - 8) * w.scale.float()[..., None]).view(rows, -1).to(dtype)
    if scheme.bits == 4:
        packed = w.q
        q = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.int8, device=packed.device)
        q[:, 0::2] = (packed & 0x0F).to(torch.int8) - 8
        q[:, 1::2] = (packed >> 4).to(torch.int8) - 8
    else:
        q = w.q
    rows, cols = q.shape
    scale = w.scale.float()                                                            # [out, G]
    if scheme.group is None:
        out = q.float() * scale
    else:
        per_col = scale.repeat_interleave(scheme.group, dim=1)[:, :cols]               # [out, in]
        out = q.float() * per_col
    return out.to(dtype)


def expert_matrices(fmt: ExpertFormat) -> dict[str, bool]:
    """The expert's weight matrices and whether they are held [in, out] (x @ W) rather than [out, in]."""
    return {"gate_up": fmt.kind == "gptoss", "down": fmt.kind == "gptoss"}


def quantize_expert(w: Mapping[str, torch.Tensor], fmt: ExpertFormat, scheme: Scheme) -> dict[str, torch.Tensor]:
    """One expert (`ExpertFormat.shapes()` layout) -> `{name}_q` and `{name}_scale` per weight matrix; biases as
    they are."""
    out = {k: v for k, v in w.items() if k not in expert_matrices(fmt)}
    for name, transposed in expert_matrices(fmt).items():
        m = quantize(w[name].t() if transposed else w[name], scheme)
        out[f"{name}_q"], out[f"{name}_scale"] = m.q, m.scale
    return out


def dequantize_expert(packed: Mapping[str, torch.Tensor], fmt: ExpertFormat, scheme: Scheme,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The inverse of `quantize_expert`: the expert in `ExpertFormat.shapes()` layout, in `dtype`, ready to compute."""
    matrices = expert_matrices(fmt)
    out = {k: v.to(dtype) for k, v in packed.items() if not k.endswith(("_q", "_scale"))}
    for name, transposed in matrices.items():
        m = dequantize(QuantizedWeight(packed[f"{name}_q"], packed[f"{name}_scale"]), scheme, dtype)
        out[name] = m.t().contiguous() if transposed else m
    return out


def expert_packed_bytes(fmt: ExpertFormat, scheme: Scheme, bias_dtype: torch.dtype) -> int:
    """Bytes of one quantized expert: its matrices' codes and scales, plus its biases in `bias_dtype`."""
    total = 0
    for name, shape in fmt.shapes().items():
        if name in expert_matrices(fmt):
            total += packed_bytes(shape[::-1] if expert_matrices(fmt)[name] else shape, scheme)
        else:
            total += math.prod(shape) * bias_dtype.itemsize
    return total


def expert_specs(fmt: ExpertFormat, scheme: Scheme, bias_dtype: torch.dtype) -> dict[str, TensorSpec]:
    """Tensors of one `quantize_expert` output (a cache slot of that precision is allocated with them); their bytes
    add up to `expert_packed_bytes`."""
    out = {}
    for name, shape in fmt.shapes().items():
        if name not in expert_matrices(fmt):
            out[name] = TensorSpec(tuple(shape), bias_dtype)
            continue
        rows, cols = shape[::-1] if expert_matrices(fmt)[name] else shape
        out[f"{name}_q"] = (TensorSpec((rows, cols), torch.int8) if scheme.bits == 8
                            else TensorSpec((rows, cols // 2), torch.uint8))
        out[f"{name}_scale"] = TensorSpec((rows, scheme.groups(cols)), scheme.scale_dtype)
    return out


def scheme_from(d: Mapping) -> Scheme:
    """A scheme as profiles and plans describe it (`Scheme.describe`)."""
    return Scheme(str(d["name"]), int(d["bits"]), None if d.get("group") is None else int(d["group"]),
                  getattr(torch, str(d.get("scale_dtype", "float16"))))


# ---- computing with the codes: torch's CPU weight-only kernels -------------------------------------------------
TILE_GROUPS = (32, 64, 128, 256)   # int4 group sizes the tile kernel takes
# compute dtypes the kernels pay off in: in float32 they are 2-20x slower than dequantizing and F.linear on this CPU
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def kernel_fits(shape: tuple[int, int], scheme: Scheme) -> bool:
    """Whether torch's CPU weight-only kernel computes a [out, in] matrix of `scheme` (int8: per-channel scales, any
    shape; int4: groups of 32/64/128/256 that tile the input, output channels a multiple of 16)."""
    rows, cols = shape
    if scheme.bits == 8:
        return scheme.group is None
    return scheme.group in TILE_GROUPS and cols % scheme.group == 0 and rows % 16 == 0


def to_tiles(q: torch.Tensor, cols: int) -> torch.Tensor:
    """int4 codes two a byte (the module's layout, uint8 [out, in/2]) -> the same codes in the tile layout of
    torch._weight_int4pack_mm_for_cpu (uint8 [out, in/2]: the same bytes, rearranged)."""
    codes = torch.stack((q & 0x0F, q >> 4), dim=-1).view(q.shape[0], cols).to(torch.int32)    # [out, in] in 0..15
    return torch._convert_weight_to_int4pack_for_cpu(codes, 1)


@dataclass(frozen=True)
class KernelMatrix:
    """A quantized [out, in] matrix that computes y = x @ W'^T from its codes, with no dequantized copy:
      int8: y[n, o] = scale[o] * sum_i x[n, i] q[o, i]                    torch._weight_int8pack_mm
      int4: y[n, o] = sum_g sum_{i in g} x[n, i] (c[o, i] - 8) scale[o, g]    torch._weight_int4pack_mm_for_cpu
    in x's dtype, summed in float32; the scales are rounded to x's dtype first (bf16 keeps 8 of fp16's 11
    significant bits). benchmarks/kernels.py times it against dequantizing and F.linear."""

    q: torch.Tensor          # int8 [out, in] | uint8 [out, in/2] in the tile layout (`to_tiles`)
    scale: torch.Tensor      # [out, groups] scale_dtype
    scheme: Scheme

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] -> [n, out]."""
        if self.scheme.bits == 8:
            return torch._weight_int8pack_mm(x, self.q, self.scale.view(-1).to(x.dtype))
        s = self.scale.t().to(x.dtype)                                                  # [G, out]
        sz = torch.stack((s, torch.zeros_like(s)), dim=-1)                               # [G, out, 2]: scale, zero
        return torch._weight_int4pack_mm_for_cpu(x, self.q, self.scheme.group, sz)


def kernel_expert(packed: Mapping[str, torch.Tensor], fmt: ExpertFormat, scheme: Scheme) -> dict[str, KernelMatrix]:
    """A GLU expert as `kernel_copy` holds it -> its matrices as `KernelMatrix`es (what `make_expert_fn` computes
    with)."""
    return {name: KernelMatrix(packed[f"{name}_q"], packed[f"{name}_scale"], scheme) for name in expert_matrices(fmt)}


def kernels_apply(fmt: ExpertFormat, scheme: Scheme, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an expert of `scheme` computes from its codes (`KernelMatrix`) on `device` in `dtype`: on the CPU, in
    KERNEL_DTYPES, a GLU expert every matrix of which the kernels take (GPT-OSS's biased x @ W experts: no)."""
    return (device.type == "cpu" and dtype in KERNEL_DTYPES and fmt.kind != "gptoss"
            and all(kernel_fits(fmt.shapes()[n], scheme) for n in expert_matrices(fmt)))


def kernel_copy(packed: Mapping[str, torch.Tensor], fmt: ExpertFormat, scheme: Scheme) -> dict[str, torch.Tensor]:
    """`quantize_expert`'s output as the kernels read it: int8 as it is, int4 codes in the tile layout; the same
    tensors' shapes, dtypes and bytes (a cache slot holds either)."""
    if scheme.bits == 8:
        return dict(packed)
    return {k: (to_tiles(v, 2 * v.shape[1]) if k.endswith("_q") else v) for k, v in packed.items()}
