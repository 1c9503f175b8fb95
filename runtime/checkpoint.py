"""A safetensors checkpoint on disk (one file or a sharded index), read lazily and without copies.

Each file is mmap'd once; a tensor (or one row of a stacked tensor) is a zero-copy view into the mapping
(`view`), so the only copy is the one into its destination (a cache slot, a host buffer): bytes counted are bytes
moved. The safetensors layout is: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}}, then the data (offsets relative to the end of the header).
A quantized checkpoint says how its tensors are encoded in config.json's `quantization_config` (`quantization`).
"""
from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
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
            try:
                files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise UserError(f"{index} is corrupt (no weight_map); re-download or re-save the checkpoint") from None
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise UserError(f"checkpoint {self.dir} lacks shard {missing[0]} (listed in {index.name}"
                                + (f", {len(missing) - 1} more missing" if len(missing) > 1 else "")
                                + "); download the whole checkpoint")
        elif (self.dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UserError(f"{self.dir} has no model.safetensors or model.safetensors.index.json; "
                            "save the model with save_pretrained(..., safe_serialization=True)")
        self._maps: dict[str, mmap.mmap] = {}
        self._bytes: dict[str, torch.Tensor] = {}    # file -> its mapping as a flat uint8 tensor (zero-copy, read-only)
        self._info: dict[str, TensorInfo] = {}
        for f in files:
            self._open(f)
        self.quantization = _quantization_config(self.dir)

    def _open(self, name: str) -> None:
        path = self.dir / name
        try:
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path} ({exc}); is the checkpoint complete?") from None
        size = len(mm)
        try:
            (n,) = struct.unpack("<Q", mm[:8])
            if 8 + n > size:
                raise ValueError("header runs past the end of the file")
            header = json.loads(mm[8:8 + n])
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise UserError(f"{path} is not a valid safetensors file (truncated or garbled); re-download or "
                            "re-save the checkpoint") from None
        self._maps[name] = mm
        with warnings.catch_warnings():  # the mapping is read-only; callers only ever copy out of it
            warnings.simplefilter("ignore", UserWarning)
            self._bytes[name] = torch.frombuffer(mm, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype_name, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{path}: tensor {key} has a malformed entry; re-save the checkpoint") from None
            if dtype_name not in DTYPES:
                raise UserError(f"{path}: tensor {key} has dtype {dtype_name}, which Understudy does not read")
            dtype = DTYPES[dtype_name]
            want = torch.empty((), dtype=dtype).element_size() * math.prod(shape)
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or end - begin != want:
                raise UserError(f"{path}: tensor {key} has data offsets {[begin, end]} that do not match its shape "
                                f"{list(shape)} and dtype {dtype_name}; re-save the checkpoint")
            if 8 + n + end > size:
                raise UserError(f"{path} is truncated: tensor {key} ends at byte {8 + n + end} of a {size}-byte "
                                "file; re-download the checkpoint")
            self._info[key] = TensorInfo(name, dtype, shape, 8 + n + begin, end - begin)

    def float_dtype(self) -> torch.dtype:
        """The floating dtype holding most of the checkpoint's bytes (its weights' dtype). fp8 weights and their
        `weight_scale_inv` are an encoding, not a dtype to compute in: a DeepSeek-FP8 checkpoint's is its bf16."""
        by: dict[torch.dtype, int] = {}
        for key, t in self._info.items():
            if t.dtype.is_floating_point and t.dtype.itemsize > 1 and not key.endswith("_scale_inv"):
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        return max(by, key=by.get) if by else torch.float32

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
        if nbytes == 0:
            return torch.empty(shape, dtype=t.dtype)
        flat = self._bytes[t.file][offset:offset + nbytes]
        if offset % t.dtype.itemsize:                 # a misaligned tensor: a copy (safetensors aligns them)
            flat = flat.clone()
        return flat.view(t.dtype).view(shape)

    def byte_range(self, file: str, start: int, end: int) -> torch.Tensor:
        """A read-only zero-copy uint8 view of bytes [start, end) of a mapped file (`TensorInfo.file`, `.offset`)."""
        return self._bytes[file][start:end]

    def tensor(self, name: str) -> torch.Tensor:
        """A private copy of a whole tensor."""
        return self.view(name).clone()


def _quantization_config(model_dir: Path) -> dict:
    """config.json's `quantization_config` (read as data), {} when the checkpoint is not quantized."""
    path = model_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        q = json.loads(path.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{path} is not valid JSON; re-download or re-save the checkpoint") from None
    if not isinstance(q, dict):
        raise UserError(f"{path}: quantization_config is not an object; re-download the checkpoint")
    return q
