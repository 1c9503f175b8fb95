"""The emulated link of the benchmarks: one expert load costs, relative to one layer's compute, what it costs on a
named target (Qwen2-57B-A14B on an RTX A6000 over PCIe 4.0, the paper's main setting).

    ratio          = t_load_target / t_layer_target
    t_load_target  = expert_bytes_target / link_bandwidth_target + link_latency_target
    t_layer_target = active_bytes_per_layer_target / device_mem_bandwidth_target    (batch-1 decode is memory-bound)
    bandwidth_here = expert_bytes_here / (ratio * t_layer_here),  t_layer_here measured (resident forward / layers)
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

# Qwen2-57B-A14B (config.json on the hub): hidden 3584, moe_intermediate 2560, 64 experts top-8, shared expert 20480,
# 28 layers, 14B active parameters; bf16. RTX A6000: 768 GB/s; PCIe 4.0 x16: ~24 GB/s pinned H2D, ~10 us latency.
TARGET = {"name": "Qwen2-57B-A14B on RTX A6000, PCIe 4.0 x16",
          "expert_bytes": 3 * 3584 * 2560 * 2,                 # bytes
          "active_bytes_per_layer": 14e9 * 2 / 28,             # bytes
          "device_mem_bandwidth": 768e9, "link_bandwidth": 24e9,   # bytes/s
          "link_latency": 10e-6}                               # s
LATENCY_HERE = "20us"                                          # per-load latency of the emulated link


def target_ratio() -> float:
    """t_load_target / t_layer_target (see the module docstring)."""
    t_load = TARGET["expert_bytes"] / TARGET["link_bandwidth"] + TARGET["link_latency"]
    t_layer = TARGET["active_bytes_per_layer"] / TARGET["device_mem_bandwidth"]
    return t_load / t_layer


def calibrate_link(model: Path, layers: int, tokens: int = 64, repeats: int = 5) -> tuple[str, float]:
    """(link spec for `--link`, t_layer_here in s): one layer's compute, the least of `repeats` timings of `tokens`
    teacher-forced random tokens with every expert resident (after an 8-token warm-up): the least, because another
    process on the machine can only slow a timing down."""
    from runtime import Runtime

    with Runtime.load(model, policy="resident") as rt:
        ids = torch.randint(1, rt.lm.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        rt.teacher_force(ids[:, :8])
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rt.teacher_force(ids)
            seconds.append(time.perf_counter() - t0)
        t_layer = min(seconds) / tokens / layers                            # s
        bandwidth = rt.store.expert_bytes / (target_ratio() * t_layer)      # bytes/s
    return f"{bandwidth / 1e6:.1f}MB/s,{LATENCY_HERE}", t_layer
