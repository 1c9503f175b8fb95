"""Sizes, rates and durations written by people: "12GiB", "900MiB", "1.5GB", "25GB/s", "20us" (shared by the\ncompiler's budgets and targets and the runtime's emulated link)."""
from __future__ import annotations

import math
import re

from artifacts.errors import UserError

_BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _number(text: str, what: str, example: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise UserError(f"cannot read {what} {text!r}; write e.g. {example}")
    return v


def parse_bytes(text: str | int | float, what: str = "size", unit_required: bool = False) -> int:
    """Bytes from "12GiB", "900MiB", "1.5GB" (a bare number is bytes unless `unit_required`)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text < 0:
            raise UserError(f"{what} must be a non-negative size (got {text!r})")
        return int(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read {what} {text!r}; write e.g. 12GiB, 900MiB or 1.5GB")
    if unit_required and m.group(2) is None:
        guess = f"did you mean {m.group(1)}%? (or a size such as {m.group(1)}GiB)" if float(
            _number(m.group(1), what, "25% or 12GiB")) <= 100 else f"write a unit, e.g. {m.group(1)}B"
        raise UserError(f"{what} {text!r} has no unit: {guess}")
    return int(_number(m.group(1), what, "12GiB, 900MiB or 1.5GB") * _BYTES[(m.group(2) or "b").lower()])


def parse_percent(text: str, what: str) -> float | None:
    """P from "P%" (0 < P <= 100); None when `text` is not a percentage."""
    t = str(text).strip()
    if not t.endswith("%"):
        return None
    pct = _number(t[:-1].strip(), what, "25%")
    if not 0 < pct <= 100:
        raise UserError(f"{what} percentage must be in (0, 100] (got {text})")
    return pct


def parse_rate(text: str | int | float, what: str = "bandwidth") -> float:
    """bytes per second from "25GB/s"."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text <= 0:
            raise UserError(f"{what} must be positive (got {text!r}); write e.g. 25GB/s")
        return float(text)
    t = str(text).strip()
    if not t.lower().endswith("/s"):
        raise UserError(f"cannot read {what} {text!r}; write e.g. 25GB/s")
    rate = float(parse_bytes(t[:-2], what))
    if rate <= 0:
        raise UserError(f"{what} must be positive (got {text!r}); write e.g. 25GB/s")
    return rate


def parse_seconds(text: str | int | float, what: str = "latency") -> float:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text < 0:
            raise UserError(f"{what} must be a non-negative duration (got {text!r})")
        return float(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*(s|ms|us|ns)\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read {what} {text!r}; write e.g. 20us or 1ms")
    return _number(m.group(1), what, "20us or 1ms") * _SECONDS[m.group(2).lower()]


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
