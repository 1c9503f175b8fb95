"""Evaluation text: the texts of a file or datasets directory, each followed by EOS (no BOS), joined into one stream."""
from __future__ import annotations

import numpy as np

from artifacts.errors import UserError
from profiler.calibration import read_texts


def token_stream(data: str, tokenizer, max_tokens: int, text_field: str = "text",
                 texts: list[str] | None = None) -> np.ndarray:
    """The first `max_tokens` tokens of the texts of `data` (or of `texts`, already read from it)."""
    if texts is None:
        texts, _ = read_texts(data, text_field)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in texts:
        if not t.strip():
            continue
        stream += tokenizer(t, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
        if len(stream) >= max_tokens:
            break
    if len(stream) < 2:
        raise UserError(f"{data} gives {len(stream)} tokens; evaluation needs text (field '{text_field}')")
    return np.asarray(stream[:max_tokens], dtype=np.int64)


def windows(stream: np.ndarray, window: int) -> list[np.ndarray]:
    """Consecutive non-overlapping windows of `window` tokens; the last may be shorter (dropped below 2 tokens)."""
    out = [stream[i:i + window] for i in range(0, len(stream), window)]
    return [w for w in out if len(w) >= 2]


def prompts(texts_stream: np.ndarray, n: int, length: int) -> list[np.ndarray]:
    """n prompts of `length` tokens taken at even spacing from the stream."""
    step = max((len(texts_stream) - length) // max(n, 1), 1)
    return [texts_stream[i * step:i * step + length] for i in range(n) if i * step + length <= len(texts_stream)]
