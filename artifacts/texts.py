"""User text data, read one way for every command: calibration (moe-profile) and evaluation (moe-eval).

`read_texts` reads .jsonl/.json (one object a line, `text_field`), .txt (paragraphs), .parquet, a saved `datasets`
directory or (online) a hub dataset name, with a provenance record; `join_with_eos` tokenises texts into one stream,
each text followed by EOS (no BOS), as both the profile's calibration windows and the evaluation's perplexity
stream are built. No torch: a tokenizer is any callable with HF's interface.
"""
from __future__ import annotations

import json
from pathlib import Path

from artifacts.errors import UserError
from artifacts.header import sha256_dir, sha256_file


def join_with_eos(texts: list[str], tokenizer, max_tokens: int | None = None) -> tuple[list[int], int]:
    """(token ids of the non-blank texts, each followed by EOS, cut to `max_tokens`; how many texts were read)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i, t in enumerate(texts):
        if not t.strip():
            continue
        stream += tokenizer(t, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
        if max_tokens is not None and len(stream) >= max_tokens:
            return stream[:max_tokens], i + 1
    return stream, len(texts)


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


