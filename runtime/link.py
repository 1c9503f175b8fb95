"""An emulated host-to-device link, so that load stalls and overlap are real in wall-clock time on a dev machine.

A load of b bytes takes  t = b / bandwidth + latency  on the loader thread: the real copy is made, then the thread
sleeps for what remains of t. Parse "50MB/s,20us", "1.5GB/s", "12GiB/s,5ms".
"""
from __future__ import annotations

from dataclasses import dataclass

from artifacts.errors import UserError
from artifacts.units import parse_rate, parse_seconds

@dataclass(frozen=True)
class Link:
    bandwidth: float          # bytes / s
    latency: float = 0.0      # s per transfer

    def seconds(self, nbytes: int) -> float:
        return nbytes / self.bandwidth + self.latency

    def __str__(self) -> str:
        return f"{self.bandwidth / 1e6:g}MB/s,{self.latency * 1e6:g}us"


def parse_link(text: str) -> Link:
    bw_text, _, lat_text = str(text).partition(",")
    try:
        bw = parse_rate(bw_text.strip(), "link bandwidth")
        lat = parse_seconds(lat_text.strip(), "link latency") if lat_text.strip() else 0.0
    except UserError:
        raise UserError(f"cannot read link {text!r}; write BANDWIDTH[,LATENCY], e.g. 50MB/s,20us or 12GiB/s") from None
    if bw <= 0:
        raise UserError(f"link bandwidth must be positive (got {text!r})")
    return Link(bw, lat)
