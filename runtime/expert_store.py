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


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class ExpertStore:
    """Routed experts of a checkpoint. mode "mmap": read from the file on each access (page cache or SSD);
    mode "host": every expert copied once into host memory (pinned when `pin`), then served from there."""

    def __init__(self, ckpt: Checkpoint, arch: MoEArch, dtype: torch.dtype, mode: str = "mmap", pin: bool = False):
        if mode not in ("mmap", "host"):
            raise ValueError(f"unknown expert store mode {mode!r}")
        self.ckpt, self.arch, self.dtype, self.mode = ckpt, arch, dtype, mode
        self._layout = {l: self._detect_layout(l) for l in arch.moe_layers}
        self._host: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        if mode == "host":
            for l in arch.moe_layers:
                for e in range(arch.num_experts):
                    w = self._read_disk(l, e)
                    self._host[(l, e)] = {k: (v.pin_memory() if pin else v) for k, v in w.items()}

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert in the run's dtype."""
        return self.arch.experts.numel() * torch.empty((), dtype=self.dtype).element_size()

    @property
    def disk_dtype(self) -> torch.dtype:
        """dtype of the routed experts in the checkpoint file."""
        fmt, layer = self.arch.experts, self.arch.moe_layers[0]
        prefix = self.arch.expert_key_prefix(layer)
        name = (prefix + fmt.per_expert[0].format(e=0) if self._layout[layer] == "per_expert"
                else prefix + fmt.fused["gate_up"])
        return _SAFETENSORS_DTYPES[self.ckpt.dtype_name(name)]

    def is_expert_key(self, name: str) -> bool:
        return any(name.startswith(self.arch.expert_key_prefix(l) + "experts.") for l in self.arch.moe_layers)

    def read(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        """Expert e of MoE layer `layer` as a dict of tensors (a new copy in mmap mode)."""
        if self.mode == "host":
            return self._host[(layer, e)]
        return self._read_disk(layer, e)

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

    def _read_disk(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        fmt, prefix, layout = self.arch.experts, self.arch.expert_key_prefix(layer), self._layout[layer]
        if layout == "per_expert":
            gate, up, down = (self.ckpt.tensor(prefix + n.format(e=e)) for n in fmt.per_expert)
            # [I, H] + [I, H] -> [2I, H]; down [H, I]
            w = {"gate_up": torch.cat([gate, up], dim=0), "down": down}
        else:
            w = {k: self.ckpt.row(prefix + name, e) for k, name in fmt.fused.items()}
            if layout == "fused_transposed":
                w = {k: (v.t() if v.dim() == 2 else v) for k, v in w.items()}
        # A fresh allocation (64-byte aligned by torch's allocator), never a view into the mmap: BLAS kernels
        # round differently on misaligned operands, and exact mode must match HF bit for bit.
        return {k: v.to(dtype=self.dtype, memory_format=torch.contiguous_format, copy=True) for k, v in w.items()}
