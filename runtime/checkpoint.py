"""A safetensors checkpoint on disk (one file or a sharded index), read lazily and without copies.

Each file is mmap'd once; a tensor (or one row of a stacked tensor) is a zero-copy view into the mapping
(`view`), so the only copy is the one into its destination (a cache slot, a host buffer): bytes counted are bytes
moved. The safetensors layout is: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}}, then the data (offsets relative to the end of the header).
"""
from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from artifacts.errors import UserError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int        # bytes from the start of the file
    nbytes: int


class Checkpoint:
    """Lazy, zero-copy access to the tensors of an HF checkpoint directory."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(f"{self.dir} has no model.safetensors or model.safetensors.index.json; "
                            "save the model with save_pretrained(..., safe_serialization=True)")
        self._maps: dict[str, mmap.mmap] = {}
        self._info: dict[str, TensorInfo] = {}
        for f in files:
            self._open(f)

    def _open(self, name: str) -> None:
        path = self.dir / name
        try:
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path} ({exc}); is the checkpoint complete?") from None
        try:
            (n,) = struct.unpack("<Q", mm[:8])
            header = json.loads(mm[8:8 + n])
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} is not a valid safetensors file; re-save the checkpoint") from None
        self._maps[name] = mm
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            if meta["dtype"] not in DTYPES:
                raise UserError(f"{path}: tensor {key} has dtype {meta['dtype']}, which Understudy does not read")
            begin, end = meta["data_offsets"]
            self._info[key] = TensorInfo(name, DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + begin, end - begin)

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name].shape

    def view(self, name: str, row: int | None = None) -> torch.Tensor:
        """A read-only zero-copy view of a tensor (or of row `row` of a stacked tensor) in the mapping.
        Copy it (`dst.copy_(view)` or `.to(..., copy=True)`) before writing."""
        t = self._info[name]
        shape, offset, nbytes = t.shape, t.offset, t.nbytes
        if row is not None:
            nbytes //= shape[0]
            offset += row * nbytes
            shape = shape[1:]
        count = nbytes // torch.empty((), dtype=t.dtype).element_size()
        if count == 0:
            return torch.empty(shape, dtype=t.dtype)
        import warnings

        with warnings.catch_warnings():  # the mapping is read-only; callers only ever copy out of it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._maps[t.file], dtype=t.dtype, count=count, offset=offset)
        return flat.view(shape)

    def tensor(self, name: str) -> torch.Tensor:
        """A private copy of a whole tensor."""
        return self.view(name).clone()
