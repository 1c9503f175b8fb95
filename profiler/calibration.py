"""Calibration data: texts from a file, a saved `datasets` directory or a hub dataset, tokenised into samples.

The texts, each followed by EOS, are joined into one token stream and cut into consecutive windows of `seq_len`
tokens; `samples` windows are drawn from them with `seed` (all of them when there are fewer), in stream order.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts.errors import UserError
from artifacts.header import sha256_dir, sha256_file


@dataclass
class Calibration:
    tokens: np.ndarray        # [N, L] int64 token ids
    source: dict              # provenance: source, kind, file hash, tokens hash, settings


def read_texts(data: str, text_field: str = "text") -> tuple[list[str], dict]:
    """Texts of `data` and a provenance record. Supports .jsonl/.json, .txt, .parquet, a `datasets.save_to_disk`
    directory and (online) a hub dataset name."""
    path = Path(data)
    try:
        return _read_texts(path, data, text_field)
    except UnicodeDecodeError as exc:
        raise UserError(f"{data} is not UTF-8 text (invalid byte at offset {exc.start}); convert it to UTF-8") from None


def _read_texts(path: Path, data: str, text_field: str) -> tuple[list[str], dict]:
    if path.is_file():
        suffix = path.suffix.lower()
        info = {"source": str(path), "kind": suffix.lstrip("."), "sha256": sha256_file(path)}
        if suffix in (".jsonl", ".json"):
            texts = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{n} is not valid JSON; calibration .jsonl needs one object a line") from None
                    if not isinstance(row, dict) or text_field not in row:
                        raise UserError(f"{path}:{n} has no field '{text_field}'; pass --text-field NAME")
                    texts.append(str(row[text_field]))
            return texts, info
        if suffix == ".txt":
            return [t for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()], info
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise UserError("reading .parquet needs pyarrow: pip install pyarrow") from None
            try:
                table = pq.read_table(path)
            except Exception as exc:  # pyarrow raises its own error types for garbled files
                raise UserError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0][:120]})") from None
            if text_field not in table.column_names:
                raise UserError(f"{path} has no column '{text_field}' (columns: {table.column_names}); "
                                "pass --text-field NAME")
            return [str(t) for t in table.column(text_field).to_pylist()], info
        raise UserError(f"unsupported calibration file type '{suffix}'; use .jsonl, .txt, .parquet or a datasets directory")
    if not path.exists() and (path.suffix.lower() in (".jsonl", ".json", ".txt", ".parquet", ".csv")
                              or str(data).startswith(("/", ".", "~"))):
        raise UserError(f"calibration data {data} does not exist; check the path")   # a local path: never a hub query
    try:
        import datasets
    except ImportError:
        raise UserError(f"{data} is not a file; reading a datasets directory or hub name needs: pip install datasets") from None
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises FileNotFoundError or its own errors for non-dataset dirs
            raise UserError(f"{path} is not a saved datasets directory ({str(exc).splitlines()[0]})") from None
        info = {"source": str(path), "kind": "datasets-dir", "sha256": sha256_dir(path)}
    else:
        try:
            ds = datasets.load_dataset(data, split="train")
        except Exception as exc:  # offline, unknown name, ...
            raise UserError(f"calibration data {data!r} is neither a file, a directory nor a reachable hub dataset "
                            f"({str(exc).splitlines()[0][:200]})") from None
        info = {"source": data, "kind": "hub", "sha256": getattr(ds, "_fingerprint", None)}
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if text_field not in ds.column_names:
        raise UserError(f"dataset {data} has no column '{text_field}' (columns: {ds.column_names}); pass --text-field")
    return [str(t) for t in ds[text_field]], info


def load_tokenizer(model_dir: str, tokenizer: str | None = None):
    """The tokenizer of `tokenizer` or the model directory (local files only, never code from the directory)."""
    from runtime.model_loader import load_tokenizer as load_local

    where = tokenizer or model_dir
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise UserError(f"--tokenizer {tokenizer} is not a directory; pass a local tokenizer directory")
    tok = load_local(where)
    if tok is None:
        raise UserError(f"cannot load a tokenizer from {where}; pass --tokenizer DIR")
    return tok


def build_calibration(data: str, tok, samples: int, seq_len: int, seed: int, text_field: str = "text") -> Calibration:
    if samples < 1:
        raise UserError(f"--samples must be at least 1 (got {samples})")
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (got {seq_len})")
    texts, info = read_texts(data, text_field)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"calibration set {data} has no text (field '{text_field}'); give a file with text in it")
    eos = tok.eos_token_id
    stream: list[int] = []
    for t in texts:
        stream.extend(tok(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    windows = len(stream) // seq_len
    if windows == 0:
        raise UserError(f"calibration set {data} has {len(stream)} tokens, fewer than one window of --seq-len "
                        f"{seq_len}; lower --seq-len or add text")
    all_windows = np.asarray(stream[: windows * seq_len], dtype=np.int64).reshape(windows, seq_len)
    if windows > samples:
        pick = np.sort(np.random.default_rng(seed).choice(windows, size=samples, replace=False))
        tokens = all_windows[pick]
    else:
        tokens = all_windows
    info.update({"text_field": text_field, "samples": int(tokens.shape[0]), "seq_len": seq_len, "seed": seed,
                 "tokens": int(tokens.size), "tokens_sha256": hashlib.sha256(tokens.astype(np.int32).tobytes()).hexdigest()})
    return Calibration(tokens=tokens, source=info)
