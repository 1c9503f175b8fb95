"""Static placement (the `static` policy): what llama.cpp users do with `-ot` / `--n-cpu-moe`, from a profile.

Each MoE layer's S slots are split once, before the first token:
  pinned  the layer's S - STREAM_SLOTS most frequently routed experts (profile frequency f_e = tokens routed to e /
          tokens; ties to the lower id), loaded at start and never evicted;
  stream  STREAM_SLOTS slot(s) into which a cold (unpinned) expert a token needs is loaded on demand, evicting the
          previous cold one (several cold experts in one call go through it one after another: load, compute, next
          load); with the host/transfer split on (policy.host_compute: a CUDA device, where the host is another
          processor) a cold expert is instead computed on the host, from the store, where the measured costs say
          that is cheaper (runtime.policy.host_split), as llama.cpp computes its CPU-resident experts.
Bytes held: S x expert bytes per layer, the same budget as every other policy (a host computation reads the expert
into host memory, never into the device cache). With S = 1 nothing is pinned and static is a one-slot LRU cache.
"""
from __future__ import annotations

from typing import Mapping, Sequence

STREAM_SLOTS = 1           # slots per layer left for cold experts loaded on demand


def most_frequent(frequency: Sequence[float], n: int) -> list[int]:
    """The n experts of highest routing frequency (ties to the lower id), most frequent first."""
    return sorted(range(len(frequency)), key=lambda e: (-float(frequency[e]), e))[:max(n, 0)]


def static_pins(frequency: Mapping[int, Sequence[float]], slots: Mapping[int, int]) -> dict[int, list[int]]:
    """Per layer the pinned experts of a static cache of slots[l] slots: its slots[l] - STREAM_SLOTS most frequent."""
    return {l: most_frequent(frequency[l], n - STREAM_SLOTS) for l, n in slots.items()}
