"""Evaluation text: the texts of a file or datasets directory, each followed by EOS (no BOS), joined into one stream;
the texts the stream does not reach are held out (the default tasks are built from them)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from artifacts.errors import UserError
from artifacts.texts import join_with_eos, read_texts


@dataclass(frozen=True)
class EvalText:
    stream: np.ndarray                # [N] token ids: the first N = max_tokens tokens of the texts joined with EOS
    held_out: tuple[str, ...]         # the texts after the last one the stream reads (none of their tokens in it)


def read_eval_text(data: str, tokenizer, max_tokens: int, text_field: str = "text",
                   texts: list[str] | None = None) -> EvalText:
    """The stream of `data` (or of `texts`, already read from it) and the texts it leaves out."""
    if texts is None:
        texts, _ = read_texts(data, text_field)
    stream, used = join_with_eos(texts, tokenizer, max_tokens)
    if len(stream) < 2:
        raise UserError(f"{data} gives {len(stream)} tokens; evaluation needs text (field '{text_field}')")
    return EvalText(np.asarray(stream, dtype=np.int64), tuple(texts[used:]))


def token_stream(data: str, tokenizer, max_tokens: int, text_field: str = "text",
                 texts: list[str] | None = None) -> np.ndarray:
    """The first `max_tokens` tokens of the texts of `data` (or of `texts`, already read from it)."""
    return read_eval_text(data, tokenizer, max_tokens, text_field, texts).stream


def windows(stream: np.ndarray, window: int) -> list[np.ndarray]:
    """Consecutive non-overlapping windows of `window` tokens; the last may be shorter (dropped below 2 tokens)."""
    out = [stream[i:i + window] for i in range(0, len(stream), window)]
    return [w for w in out if len(w) >= 2]


def prompts(texts_stream: np.ndarray, n: int, length: int) -> np.ndarray:
    """[n', length]: n' <= n prompts of `length` tokens taken at even spacing from the stream."""
    step = max((len(texts_stream) - length) // max(n, 1), 1)
    rows = [texts_stream[i * step:i * step + length] for i in range(n) if i * step + length <= len(texts_stream)]
    return np.stack(rows) if rows else np.zeros((0, length), dtype=np.int64)
