"""An emulated host-to-device link, so that load stalls and overlap are real in wall-clock time on a dev machine.

A load of b bytes takes  t = b / bandwidth + latency  on the loader thread: the real copy is made, then the thread
sleeps for what remains of t. Parse "50MB/s,20us", "1.5GB/s", "12GiB/s,5ms".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from artifacts.errors import UserError

_SIZE = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@dataclass(frozen=True)
class Link:
    bandwidth: float          # bytes / s
    latency: float = 0.0      # s per transfer

    def seconds(self, nbytes: int) -> float:
        return nbytes / self.bandwidth + self.latency

    def __str__(self) -> str:
        return f"{self.bandwidth / 1e6:g}MB/s,{self.latency * 1e6:g}us"


def parse_link(text: str) -> Link:
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]i?b|b)/s\s*(?:,\s*([\d.]+)\s*(s|ms|us|µs|ns))?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read link {text!r}; write BANDWIDTH[,LATENCY], e.g. 50MB/s,20us or 12GiB/s")
    bw = float(m.group(1)) * _SIZE[m.group(2).lower()]
    lat = float(m.group(3)) * _TIME[m.group(4).lower()] if m.group(3) else 0.0
    if bw <= 0:
        raise UserError(f"link bandwidth must be positive (got {text!r})")
    return Link(bw, lat)
