"""Sizes, rates and durations written by people: "12GiB", "900MiB", "1.5GB", "25GB/s", "20us" (shared by the\ncompiler's budgets and targets and the runtime's emulated link)."""
from __future__ import annotations

import re

from artifacts.errors import UserError

_BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read {what} {text!r}; write e.g. 12GiB, 900MiB or 1.5GB")
    return int(float(m.group(1)) * _BYTES[(m.group(2) or "b").lower()])


def parse_rate(text: str | int | float, what: str = "bandwidth") -> float:
    """bytes per second from "25GB/s"."""
    if isinstance(text, (int, float)):
        return float(text)
    t = str(text).strip()
    if not t.lower().endswith("/s"):
        raise UserError(f"cannot read {what} {text!r}; write e.g. 25GB/s")
    return float(parse_bytes(t[:-2], what))


def parse_seconds(text: str | int | float, what: str = "latency") -> float:
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*(s|ms|us|ns)\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read {what} {text!r}; write e.g. 20us or 1ms")
    return float(m.group(1)) * _SECONDS[m.group(2).lower()]


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
