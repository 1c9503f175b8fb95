"""Where routed experts live when they are not on the device: the mmap'd checkpoint itself, or host memory.

`read(layer, e)` returns one expert as the store holds it (`specs`); it never touches the other experts. A store knows
the on-disk layouts: one tensor per expert (`experts.{e}.gate_proj.weight`, Mixtral's `w1/w3/w2`), fused stacks read
one row at a time (`get_slice(name)[e]`), and the quantized formats real checkpoints ship (runtime/formats.py): gpt-oss
MXFP4 (fused `*_blocks` / `*_scales`, one row per expert) and block-scaled fp8 per expert (`weight_scale_inv`).

What it holds: with `dtype` None, experts as the checkpoint stores them: float experts in their dtype, quantized ones
packed (`held` names the format; `formats.materialize` dequantizes right before compute), so bytes counted are bytes
moved; with a `dtype`, every expert in the in-memory layout of `ExpertFormat.shapes()` in that dtype (a quantized
expert is dequantized as it is read: "dequantize on load").
"""
from __future__ import annotations

import torch

from artifacts.errors import UserError
from runtime.checkpoint import Checkpoint
from runtime.families.arch import MoEArch
from runtime.formats import (FP8_DTYPES, carve, PackedFormat, TensorSpec, fp8_block, fp8_format, materialize,
                             mxfp4_format, scale_inv_name)

STORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PACKED_LAYOUTS = ("mxfp4", "fp8")


class ExpertStore:
    """Routed experts of a checkpoint. mode "mmap": read from the file on each access (page cache or SSD);
    mode "host": every expert copied once into host memory (pinned when `pin`), then served from there."""

    def __init__(self, ckpt: Checkpoint, arch: MoEArch, dtype: torch.dtype | None = None, mode: str = "mmap",
                 pin: bool = False):
        """`dtype`: the dtype experts are held (and moved) in; None: as the checkpoint stores them (its dtype, or
        packed for a quantized checkpoint: what plans count)."""
        if mode not in ("mmap", "host"):
            raise ValueError(f"unknown expert store mode {mode!r}")
        self.ckpt, self.arch, self.mode = ckpt, arch, mode
        self._layout = {l: expert_layout(ckpt, arch, l) for l in arch.moe_layers}
        self._sources_of: dict[tuple[int, int], list] = {}    # (layer, e) -> its copy sources (`_copy_sources`)
        self.packed: PackedFormat | None = packed_format(ckpt, arch, self._layout)   # the checkpoint's quantization
        for l in arch.moe_layers:
            self._check_tensors(l)
        self.held: PackedFormat | None = self.packed if dtype is None else None      # experts held packed
        self.dtype: torch.dtype | None = None if self.held else (self._disk_dtype() if dtype is None else dtype)
        self._unpack = self.packed is not None and self.held is None
        self.specs: dict[str, TensorSpec] = (self.held.specs() if self.held else
                                             {k: TensorSpec(s, self.dtype) for k, s in arch.experts.shapes().items()})
        self._spans: dict[tuple[int, int], torch.Tensor | None] = {}    # (layer, e) -> `_span`, made on first use
        # one copy per expert where the checkpoint keeps an expert's tensors back to back (`_layout_of`)
        self.flat_layout: tuple[tuple[str, int], ...] | None = (
            None if self._unpack else self._layout_of(arch.moe_layers[0], 0))
        self._host: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._host_flat: dict[tuple[int, int], torch.Tensor] = {}     # host mode: an expert's bytes as one buffer
        if mode == "host":
            for l in arch.moe_layers:
                for e in range(arch.num_experts):
                    span = self._span(l, e)
                    if span is not None:         # one (pinned) buffer per expert, its tensors views: one copy a load
                        buf = span.pin_memory() if pin else span.clone()
                        self._host_flat[(l, e)] = buf
                        self._host[(l, e)] = carve(buf, self.flat_layout, self.specs)
                    else:
                        w = self._read_disk(l, e)
                        self._host[(l, e)] = {k: (v.pin_memory() if pin else v) for k, v in w.items()}
            self._spans.clear()

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert as the store holds and moves it (packed bytes for a packed checkpoint)."""
        return sum(s.nbytes for s in self.specs.values())

    @property
    def format_name(self) -> str:
        """What one held expert is: a dtype name, or a packed format's name ("mxfp4", "fp8_e4m3_b128x128")."""
        return self.held.name if self.held else _name(self.dtype)

    @property
    def disk_format(self) -> str:
        """The routed experts' format in the checkpoint file (what profiles and plans record)."""
        return self.packed.name if self.packed else _name(self._disk_dtype())

    @property
    def disk_expert_bytes(self) -> int:
        """Bytes of one routed expert in the checkpoint file: what a plan budgets with."""
        return self.packed.nbytes if self.packed else self.arch.experts.numel() * self._disk_dtype().itemsize

    def read(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """Expert e of MoE layer `layer` as a dict of tensors (the host copy in host mode, a fresh copy in mmap)."""
        if self.mode == "host":
            return self._host[(layer, e)]
        return self._read_disk(layer, e)

    def materialize(self, layer: int, e: int, w: dict[str, torch.Tensor], dtype: torch.dtype,
                    slot: bool = True) -> dict[str, torch.Tensor]:
        """Expert e as held (a slot's copy, or `read`'s) turned into weights to compute with (`formats.materialize`);
        `slot` only matters to a precision plan's store (runtime.pooled_store)."""
        return materialize(w, self.held, dtype)

    def computes_as_held(self, dtype: torch.dtype) -> bool:
        """Whether an expert as held is already the weights to compute with in `dtype` (`materialize` would return it
        as it is): unpacked and held in `dtype`."""
        return self.held is None and self.dtype == dtype

    def copy_into(self, layer: int, e: int, dst: dict[str, torch.Tensor], non_blocking: bool = False) -> int:
        """Copy expert e into preallocated tensors `dst` (a cache slot); returns the bytes moved."""
        flat = getattr(dst, "flat", None)          # a slot laid out as `flat_layout` (runtime.expert_cache.Slot)
        if self.mode == "host" or self._unpack:
            src_flat = self._host_flat.get((layer, e)) if flat is not None else None
            if src_flat is not None:
                flat.copy_(src_flat, non_blocking=non_blocking)
                return src_flat.numel()
            src = self.read(layer, e)
            for k, t in dst.items():
                t.copy_(src[k], non_blocking=non_blocking)
            return sum(t.numel() * t.element_size() for t in dst.values())
        span = self._span(layer, e) if flat is not None else None
        if span is None:
            self._copy_from_disk(layer, e, dst)
            return sum(t.numel() * t.element_size() for t in dst.values())
        flat.copy_(span, non_blocking=non_blocking)   # the expert's bytes in one copy
        return span.numel()

    def _names(self, layer: int, e: int) -> list[tuple[str, slice | None, str, int | None]]:
        """(held key, its rows or None for all, checkpoint tensor, row of a stacked tensor or None) per source of
        expert e (a fused_transposed source is copied transposed)."""
        fmt, prefix, layout = self.arch.experts, self.arch.expert_key_prefix(layer), self._layout[layer]
        if layout in PACKED_LAYOUTS:
            return [(key, None, name, row) for key, name, row in self._sources(layer, e)]
        if layout == "per_expert":
            i = fmt.intermediate
            gate, up, down = (prefix + n.format(e=e) for n in fmt.per_expert)
            return [("gate_up", slice(0, i), gate, None), ("gate_up", slice(i, None), up, None),
                    ("down", None, down, None)]                            # [I, H] x2, [H, I]
        return [(k, None, prefix + name, e) for k, name in fmt.fused.items()]

    def _layout_of(self, layer: int, e: int) -> tuple[tuple[str, int], ...] | None:
        """The held keys and their bytes in file order when expert e's tensors lie back to back in one file, each held
        key's parts in row order, in the held dtype (no conversion) and at 64-byte multiples from the expert's first
        byte (the alignment fresh tensors have: BLAS kernels may round differently on misaligned operands); else
        None. A checkpoint saved by `save_pretrained` keeps a per-expert layout so (down, gate, up)."""
        if self._layout[layer] == "fused_transposed":
            return None
        parts = []
        for key, rows, name, row in self._names(layer, e):
            t = self.ckpt.info(name)
            n = t.nbytes // t.shape[0] if row is not None else t.nbytes
            if t.dtype != self.specs[key].dtype:
                return None
            parts.append((t.offset + (row * n if row is not None else 0), n, t.file, key, rows.start if rows else 0))
        parts.sort()
        if len({p[2] for p in parts}) != 1 or any(a[0] + a[1] != b[0] for a, b in zip(parts, parts[1:])):
            return None
        order: list[list] = []                    # [key, bytes, last row start]
        for off, n, _, key, start in parts:
            if order and order[-1][0] == key and start > order[-1][2]:
                order[-1][1] += n
                order[-1][2] = start
            elif any(o[0] == key for o in order):
                return None
            else:
                if (off - parts[0][0]) % 64:
                    return None
                order.append([key, n, start])
        layout = tuple((k, n) for k, n, _ in order)
        if {k: n for k, n in layout} != {k: s.nbytes for k, s in self.specs.items()}:
            return None
        return layout

    def _span(self, layer: int, e: int) -> torch.Tensor | None:
        """Expert e's bytes in the mapping (a uint8 view) when they are laid out as `flat_layout`, else None; made on
        first use and kept."""
        if (layer, e) in self._spans:
            return self._spans[(layer, e)]
        span = None
        if self.flat_layout is not None and self._layout_of(layer, e) == self.flat_layout:
            names = self._names(layer, e)
            infos = [(self.ckpt.info(name), row) for _, _, name, row in names]
            starts = [t.offset + (row * (t.nbytes // t.shape[0]) if row is not None else 0) for t, row in infos]
            start = min(starts)
            span = self.ckpt.byte_range(infos[0][0].file, start, start + self.expert_bytes)
        self._spans[(layer, e)] = span
        return span

    def _disk_dtype(self) -> torch.dtype:
        """dtype of the (unquantized) routed experts in the checkpoint file."""
        fmt, layer = self.arch.experts, self.arch.moe_layers[0]
        prefix = self.arch.expert_key_prefix(layer)
        name = (prefix + fmt.per_expert[0].format(e=0) if self._layout[layer] == "per_expert"
                else prefix + fmt.fused["gate_up"])
        return self.ckpt.info(name).dtype

    def _sources(self, layer: int, e: int) -> list[tuple[str, str, int | None]]:
        """A packed expert's (held key, checkpoint tensor, row of a stacked tensor or None) in `PackedFormat` order."""
        fmt, prefix = self.arch.experts, self.arch.expert_key_prefix(layer)
        if self._layout[layer] == "mxfp4":
            f = {k: prefix + n for k, n in fmt.fused.items()}
            return [("gate_up_blocks", f["gate_up"] + "_blocks", e), ("gate_up_scales", f["gate_up"] + "_scales", e),
                    ("gate_up_bias", f["gate_up_bias"], e), ("down_blocks", f["down"] + "_blocks", e),
                    ("down_scales", f["down"] + "_scales", e), ("down_bias", f["down_bias"], e)]
        out = []
        for key, n in zip(("gate", "up", "down"), fmt.per_expert):
            name = prefix + n.format(e=e)
            out += [(key, name, None), (key + "_scale_inv", scale_inv_name(name), None)]
        return out

    def _check_tensors(self, layer: int) -> None:
        """Every expert's tensors exist with the shapes the config implies and a dtype the store reads, so a bad
        checkpoint fails when opened, not in the loader thread in the middle of decoding."""
        fmt, prefix, layout = self.arch.experts, self.arch.expert_key_prefix(layer), self._layout[layer]
        shapes = fmt.shapes()
        if layout in PACKED_LAYOUTS:
            specs, want = self.packed.specs(), {}
            for e in range(self.arch.num_experts):
                for key, name, row in self._sources(layer, e):
                    s = specs[key]
                    want[name] = ((self.arch.num_experts,) + s.shape if row is not None else s.shape, (s.dtype,))
            names = list(want.items())
        elif layout == "per_expert":
            i, h = fmt.intermediate, fmt.hidden
            per = [(n, s) for n, s in zip(fmt.per_expert, ((i, h), (i, h), (h, i)))]
            names = [(prefix + n.format(e=e), (s, STORED_DTYPES)) for e in range(self.arch.num_experts) for n, s in per]
        else:
            names = []
            for k, n in fmt.fused.items():
                s = (self.arch.num_experts,) + shapes[k]
                got = self.ckpt.shape(prefix + n) if prefix + n in self.ckpt else None
                if layout == "fused_transposed" and len(s) == 3 and got == (s[0], s[2], s[1]):
                    s = got
                names.append((prefix + n, (s, STORED_DTYPES)))
        for name, (shape, dtypes) in names:
            if name not in self.ckpt:
                raise UserError(f"checkpoint {self.ckpt.dir} lacks routed-expert tensor {name}; is it complete?")
            info = self.ckpt.info(name)
            if tuple(info.shape) != tuple(shape):
                raise UserError(f"checkpoint tensor {name} has shape {tuple(info.shape)}, the config implies "
                                f"{tuple(shape)}; the checkpoint does not match its config.json")
            if info.dtype not in dtypes:
                raise UserError(f"checkpoint tensor {name} is {_name(info.dtype)}; Understudy reads float32, bfloat16 "
                                "and float16 experts, gpt-oss MXFP4 (*_blocks, *_scales) and block-scaled "
                                "float8_e4m3fn experts (weight_scale_inv)")

    def _read_disk(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """One expert copied out of the mapping into fresh buffers (fresh buffers are 64-byte aligned, which exact
        mode needs: BLAS kernels round differently on misaligned operands); dequantized when the store unpacks."""
        specs = self.packed.specs() if self._unpack else self.specs
        out = {k: torch.empty(s.shape, dtype=s.dtype) for k, s in specs.items()}
        self._copy_from_disk(layer, e, out)
        return materialize(out, self.packed, self.dtype) if self._unpack else out

    def _copy_from_disk(self, layer: int, e: int, out: dict[str, torch.Tensor]) -> None:
        """One copy per tensor, straight from the mmap'd file into `out` (converting dtype on the way)."""
        for key, rows, src in self._copy_sources(layer, e):
            (out[key] if rows is None else out[key][rows]).copy_(src)

    def _copy_sources(self, layer: int, e: int) -> list[tuple[str, slice | None, torch.Tensor]]:
        """(held key, its rows or None for all, the mmap'd source view) per copy of expert e, made on its first load
        and kept: views of the mapping (a few hundred bytes of metadata each, no data), whose making costs more than
        copying a small expert."""
        got = self._sources_of.get((layer, e))
        if got is not None:
            return got
        transposed = self._layout[layer] == "fused_transposed"
        got = []
        for key, rows, name, row in self._names(layer, e):
            src = self.ckpt.view(name, row=row)
            got.append((key, rows, src.t() if transposed and src.dim() == 2 else src))
        self._sources_of[(layer, e)] = got
        return got


def expert_layout(ckpt: Checkpoint, arch: MoEArch, layer: int) -> str:
    """How `layer`'s routed experts are stored: "per_expert" | "fused" | "fused_transposed" (float tensors),
    "mxfp4" (fused *_blocks / *_scales) | "fp8" (per expert, float8 with weight_scale_inv)."""
    fmt, prefix = arch.experts, arch.expert_key_prefix(layer)
    if fmt.per_expert is not None and prefix + fmt.per_expert[0].format(e=0) in ckpt:
        return "fp8" if ckpt.info(prefix + fmt.per_expert[0].format(e=0)).dtype in FP8_DTYPES else "per_expert"
    if prefix + fmt.fused["gate_up"] + "_blocks" in ckpt:
        return "mxfp4"
    if prefix + fmt.fused["gate_up"] in ckpt:
        shape = ckpt.shape(prefix + fmt.fused["gate_up"])
        want = (arch.num_experts,) + fmt.shapes()["gate_up"]
        if shape == want:
            return "fused"
        if shape == (want[0], want[2], want[1]):
            return "fused_transposed"
        raise UserError(f"{prefix + fmt.fused['gate_up']} has shape {shape}, expected {want}; "
                        "the checkpoint does not match its config")
    raise UserError(f"no routed-expert tensors found under '{prefix}experts.' in {ckpt.dir}; "
                    "is this checkpoint complete?")


def packed_format(ckpt: Checkpoint, arch: MoEArch, layouts: dict[int, str] | None = None) -> PackedFormat | None:
    """The quantized format of the checkpoint's routed experts (one for every MoE layer), or None (float experts)."""
    layouts = layouts or {l: expert_layout(ckpt, arch, l) for l in arch.moe_layers}
    kinds = {v for v in layouts.values() if v in PACKED_LAYOUTS}
    if not kinds:
        return None
    if len(kinds) > 1 or len(set(layouts.values())) > 1:
        raise UserError(f"checkpoint {ckpt.dir} stores routed experts as {', '.join(sorted(set(layouts.values())))} "
                        "in different MoE layers; Understudy reads one expert format per checkpoint")
    fmt, prefix = arch.experts, arch.expert_key_prefix(arch.moe_layers[0])
    if kinds == {"mxfp4"}:
        if fmt.kind != "gptoss":
            raise UserError(f"{ckpt.dir} has MXFP4 experts ({prefix}{fmt.fused['gate_up']}_blocks) in a "
                            f"{arch.model_type} model; Understudy reads MXFP4 experts in the gpt-oss layout")
        side, what = prefix + fmt.fused["gate_up_bias"], "bias"
    else:
        weight = prefix + fmt.per_expert[0].format(e=0)
        side, what = scale_inv_name(weight), "scale"
    if side not in ckpt:
        raise UserError(f"checkpoint {ckpt.dir} lacks routed-expert tensor {side}; is it complete?")
    if ckpt.info(side).dtype not in STORED_DTYPES:
        raise UserError(f"checkpoint tensor {side} is {_name(ckpt.info(side).dtype)}; Understudy reads float32, "
                        f"bfloat16 and float16 expert {what}s")
    if kinds == {"mxfp4"}:
        return mxfp4_format(fmt, ckpt.info(side).dtype)
    return fp8_format(fmt, fp8_block(ckpt.quantization, f"checkpoint tensor {weight}"), ckpt.info(side).dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
