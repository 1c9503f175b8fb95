"""Where routed experts live when they are not on the device: the mmap'd checkpoint itself, or host memory.

`read(layer, e)` returns one expert in the in-memory layout of `ExpertFormat.shapes()`, converted to the run's dtype;
it never touches the other experts. A store knows both on-disk layouts: one tensor per expert
(`experts.{e}.gate_proj.weight`, Mixtral's `w1/w3/w2`) and fused stacks read one row at a time (`get_slice(name)[e]`).
"""
from __future__ import annotations

import torch

from artifacts.errors import UserError
from runtime.checkpoint import Checkpoint
from runtime.families.arch import MoEArch


STORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ExpertStore:
    """Routed experts of a checkpoint. mode "mmap": read from the file on each access (page cache or SSD);
    mode "host": every expert copied once into host memory (pinned when `pin`), then served from there."""

    def __init__(self, ckpt: Checkpoint, arch: MoEArch, dtype: torch.dtype | None = None, mode: str = "mmap",
                 pin: bool = False):
        """`dtype`: the dtype experts are held (and moved) in; None: the checkpoint's own (what plans count)."""
        if mode not in ("mmap", "host"):
            raise ValueError(f"unknown expert store mode {mode!r}")
        self.ckpt, self.arch, self.mode = ckpt, arch, mode
        self._layout = {l: self._detect_layout(l) for l in arch.moe_layers}
        for l in arch.moe_layers:
            self._check_tensors(l)
        self.dtype = self.disk_dtype if dtype is None else dtype
        self._host: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        if mode == "host":
            for l in arch.moe_layers:
                for e in range(arch.num_experts):
                    w = self._read_disk(l, e)
                    self._host[(l, e)] = {k: (v.pin_memory() if pin else v) for k, v in w.items()}

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert as the store holds and moves it (`dtype`)."""
        return self.arch.experts.numel() * torch.empty((), dtype=self.dtype).element_size()

    @property
    def disk_dtype(self) -> torch.dtype:
        """dtype of the routed experts in the checkpoint file."""
        fmt, layer = self.arch.experts, self.arch.moe_layers[0]
        prefix = self.arch.expert_key_prefix(layer)
        name = (prefix + fmt.per_expert[0].format(e=0) if self._layout[layer] == "per_expert"
                else prefix + fmt.fused["gate_up"])
        return self.ckpt.info(name).dtype

    def read(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """Expert e of MoE layer `layer` as a dict of tensors (the host copy in host mode, a fresh copy in mmap)."""
        if self.mode == "host":
            return self._host[(layer, e)]
        return self._read_disk(layer, e)

    def copy_into(self, layer: int, e: int, dst: dict[str, torch.Tensor], non_blocking: bool = False) -> int:
        """Copy expert e into preallocated tensors `dst` (a cache slot); returns the bytes moved."""
        if self.mode == "host":
            src = self._host[(layer, e)]
            for k, t in dst.items():
                t.copy_(src[k], non_blocking=non_blocking)
        else:
            self._copy_from_disk(layer, e, dst)
        return sum(t.numel() * t.element_size() for t in dst.values())

    def _detect_layout(self, layer: int) -> str:
        fmt, prefix = self.arch.experts, self.arch.expert_key_prefix(layer)
        if fmt.per_expert is not None and prefix + fmt.per_expert[0].format(e=0) in self.ckpt:
            return "per_expert"
        if prefix + fmt.fused["gate_up"] in self.ckpt:
            shape = self.ckpt.shape(prefix + fmt.fused["gate_up"])
            want = (self.arch.num_experts,) + fmt.shapes()["gate_up"]
            if shape == want:
                return "fused"
            if shape == (want[0], want[2], want[1]):
                return "fused_transposed"
            raise UserError(f"{prefix + fmt.fused['gate_up']} has shape {shape}, expected {want}; "
                            "the checkpoint does not match its config")
        raise UserError(f"no routed-expert tensors found under '{prefix}experts.' in {self.ckpt.dir}; "
                        "is this checkpoint complete?")

    def _check_tensors(self, layer: int) -> None:
        """Every expert's tensors exist with the shapes the config implies and a dtype the store reads, so a bad
        checkpoint fails when opened, not in the loader thread in the middle of decoding."""
        fmt, prefix, layout = self.arch.experts, self.arch.expert_key_prefix(layer), self._layout[layer]
        shapes = fmt.shapes()
        if layout == "per_expert":
            i, h = fmt.intermediate, fmt.hidden
            want = [(n, s) for n, s in zip(fmt.per_expert, ((i, h), (i, h), (h, i)))]
            names = [(prefix + n.format(e=e), s) for e in range(self.arch.num_experts) for n, s in want]
        else:
            names = []
            for k, n in fmt.fused.items():
                s = (self.arch.num_experts,) + shapes[k]
                got = self.ckpt.shape(prefix + n) if prefix + n in self.ckpt else None
                if layout == "fused_transposed" and len(s) == 3 and got == (s[0], s[2], s[1]):
                    s = got
                names.append((prefix + n, s))
        for name, shape in names:
            if name not in self.ckpt:
                raise UserError(f"checkpoint {self.ckpt.dir} lacks routed-expert tensor {name}; is it complete?")
            info = self.ckpt.info(name)
            if tuple(info.shape) != tuple(shape):
                raise UserError(f"checkpoint tensor {name} has shape {tuple(info.shape)}, the config implies "
                                f"{tuple(shape)}; the checkpoint does not match its config.json")
            if info.dtype not in STORED_DTYPES:
                raise UserError(f"checkpoint tensor {name} is {str(info.dtype).replace('torch.', '')}; Understudy "
                                "reads float32, bfloat16 and float16 experts (re-save the checkpoint in bf16)")

    def _read_disk(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """One expert copied out of the mapping into fresh buffers (fresh buffers are 64-byte aligned, which exact
        mode needs: BLAS kernels round differently on misaligned operands)."""
        out = {k: torch.empty(s, dtype=self.dtype) for k, s in self.arch.experts.shapes().items()}
        self._copy_from_disk(layer, e, out)
        return out

    def _copy_from_disk(self, layer: int, e: int, out: dict[str, torch.Tensor]) -> None:
        """One copy per tensor, straight from the mmap'd file into `out` (converting dtype on the way)."""
        fmt, prefix, layout = self.arch.experts, self.arch.expert_key_prefix(layer), self._layout[layer]
        if layout == "per_expert":
            gate, up, down = (self.ckpt.view(prefix + n.format(e=e)) for n in fmt.per_expert)
            i = fmt.intermediate
            out["gate_up"][:i].copy_(gate)   # [I, H]
            out["gate_up"][i:].copy_(up)     # [I, H]
            out["down"].copy_(down)          # [H, I]
        else:
            for k, name in fmt.fused.items():
                src = self.ckpt.view(prefix + name, row=e)
                out[k].copy_(src.t() if layout == "fused_transposed" and src.dim() == 2 else src)
