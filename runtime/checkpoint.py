"""A safetensors checkpoint on disk (one file or a sharded index), read lazily: tensors are mmap'd by safetensors
and copied out only when asked for, one tensor or one slice at a time."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from artifacts.errors import UserError


class Checkpoint:
    """Lazy access to the tensors of an HF checkpoint directory."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            raise UserError(f"{self.dir} has no model.safetensors or model.safetensors.index.json; "
                            "save the model with save_pretrained(..., safe_serialization=True)")
        self._handles = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        if weight_map is None:
            weight_map = {k: files[0] for k in self._handles[files[0]].keys()}
        self._where: dict[str, str] = weight_map

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor (a copy out of the mmap)."""
        return self._handles[self._where[name]].get_tensor(name)

    def row(self, name: str, i: int) -> torch.Tensor:
        """tensor[i] of a stacked tensor, without reading the other rows."""
        return self._handles[self._where[name]].get_slice(name)[i]
