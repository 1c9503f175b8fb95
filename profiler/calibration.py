"""Calibration data: texts from a file, a saved `datasets` directory or a hub dataset, tokenised into samples.

The texts, each followed by EOS, are joined into one token stream and cut into consecutive windows of `seq_len`
tokens; `samples` windows are drawn from them with `seed` (all of them when there are fewer), in stream order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifacts.errors import UserError
from artifacts.texts import join_with_eos, read_texts


@dataclass
class Calibration:
    tokens: np.ndarray        # [N, L] int64 token ids
    source: dict              # provenance: source, kind, file hash, tokens hash, settings


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
    if not any(t.strip() for t in texts):
        raise UserError(f"calibration set {data} has no text (field '{text_field}'); give a file with text in it")
    stream, _ = join_with_eos(texts, tok)
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
