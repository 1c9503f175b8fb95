"""Benchmark: one quantized expert matrix times a few tokens, computed from its codes by torch's CPU weight-only
kernels (runtime.quantize.KernelMatrix) against dequantizing it into a workspace and F.linear (what the runtime does
where the kernels do not apply), and against the bf16 matrix itself.

    python benchmarks/kernels.py                 # the Qwen2-MoE fixtures' and Qwen3-30B-A3B's expert matrices
    python benchmarks/kernels.py --write         # and the section "kernels" of docs/BENCHMARKS.md

One compute thread; per (shape, scheme, rows) the median of 7 timings of `reps` calls each, the three ways taking
turns; microseconds per call, and the kernel's speed-up over dequantize + F.linear. Also the largest difference
between the kernel's product and the dequantized matrix's, relative to the product's largest magnitude (both bf16).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.quantize import INT4, INT8, KernelMatrix, dequantize, quantize, to_tiles  # noqa: E402

SHAPES = {"fixture gate_up [512, 256]": (512, 256), "fixture down [256, 256]": (256, 256),
          "Qwen3-30B-A3B gate_up [1536, 2048]": (1536, 2048), "Qwen3-30B-A3B down [2048, 768]": (2048, 768)}
ROWS = (1, 4)


def timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


HEADING = "## Quantized expert kernels (CPU, one thread)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the section into docs/BENCHMARKS.md")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_benchmarks import git_commit, machine
    from sections import write_section

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    lines = []
    lines.append("| matrix | scheme | rows | bf16 F.linear us | dequantize + F.linear us | kernel us | kernel speed-up | "
          "max rel. difference |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for label, (out, inp) in SHAPES.items():
        w = (torch.randn(out, inp, generator=g) * inp ** -0.5).to(torch.bfloat16)
        reps = max(5, int(2e6 // (out * inp)))
        for scheme in (INT8, INT4):
            m = quantize(w, scheme)
            km = KernelMatrix(to_tiles(m.q, inp) if scheme.bits == 4 else m.q, m.scale, scheme)
            for rows in ROWS:
                x = torch.randn(rows, inp, generator=g).to(torch.bfloat16)
                ways = {"bf16": lambda: F.linear(x, w),
                        "deq": lambda: F.linear(x, dequantize(m, scheme, torch.bfloat16)),
                        "kernel": lambda: km.linear(x)}
                for f in ways.values():
                    f()
                times = {k: [] for k in ways}
                for _ in range(7):
                    for k, f in ways.items():
                        times[k].append(timed(f, reps))
                med = {k: statistics.median(v) for k, v in times.items()}
                ref = ways["deq"]().float()
                diff = ((km.linear(x).float() - ref).abs().max() / ref.abs().max()).item()
                lines.append(f"| {label} | {scheme.name} | {rows} | {med['bf16']:.0f} | {med['deq']:.0f} | "
                      f"{med['kernel']:.0f} | {med['deq'] / med['kernel']:.1f}x | {diff:.1e} |")
    ups = [float(l.split("|")[7].strip().rstrip("x")) for l in lines[2:]]
    text = "\n".join([f"Made by `python benchmarks/kernels.py` at commit {git_commit() or 'unknown'} on "
                      f"{machine()['summary']}, torch {torch.__version__}, one thread; median of 7 timings per cell "
                      "(see the script's docstring).", "", *lines, "",
                      f"- The kernels computed from the codes {min(ups):.1f}x to {max(ups):.1f}x faster than "
                      "dequantizing into a workspace and F.linear, over these shapes, schemes and row counts."])
    sys.stdout.write(f"{HEADING}\n\n{text}\n")
    if args.write:
        write_section(str(Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"), "kernels", HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
