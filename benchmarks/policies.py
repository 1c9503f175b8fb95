"""Benchmark: lru vs smoe vs plan on one model, measured by the runtime in one run, with an emulated link.

    python benchmarks/policies.py [--model DIR] [--calib F] [--data F] [--budgets 12.5,25,50] [--out docs/BENCHMARKS.md]

1. Profile the model on calibration text and compile a plan per budget (dev-emulated target).
2. Calibrate the emulated link so that one expert load costs, relative to one layer's compute, what it costs on the
   named target (Qwen2-57B-A14B on an RTX A6000 over PCIe 4.0, the paper's main setting):
       ratio  = t_load_target / t_layer_target
       t_load_target  = expert_bytes_target / link_bandwidth_target + link_latency
       t_layer_target = active_bytes_per_layer_target / device_mem_bandwidth_target    (batch-1 decode is memory-bound)
       bandwidth_here = expert_bytes_here / (ratio * t_layer_here),  t_layer_here measured (resident TPOT / layers)
3. Teacher-force held-out text one token at a time (KV cache on), batch 1, for each policy and budget, and print hit
   rate, loads/token, TPOT (measured, emulated link) and their ratios to lru from the same run, next to the plan's
   predictions.
Ratios, not absolute times, are the result: this machine is noisy and has no GPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"

# Qwen2-57B-A14B (config.json on the hub): hidden 3584, moe_intermediate 2560, 64 experts top-8, shared expert 20480,
# 28 layers, 14B active parameters; bf16. RTX A6000: 768 GB/s; PCIe 4.0 x16: ~24 GB/s pinned H2D, ~10 us latency.
TARGET = {"name": "Qwen2-57B-A14B on RTX A6000, PCIe 4.0 x16",
          "expert_bytes": 3 * 3584 * 2560 * 2, "active_bytes_per_layer": 14e9 * 2 / 28,
          "device_mem_bandwidth": 768e9, "link_bandwidth": 24e9, "link_latency": 10e-6}


def target_ratio() -> float:
    t_load = TARGET["expert_bytes"] / TARGET["link_bandwidth"] + TARGET["link_latency"]
    t_layer = TARGET["active_bytes_per_layer"] / TARGET["device_mem_bandwidth"]
    return t_load / t_layer


def windows(tokenizer, path: Path, seq: int, count: int) -> np.ndarray:
    stream: list[int] = []
    for line in path.read_text().splitlines():
        if line.strip():
            stream += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= seq * count:
            break
    return np.asarray(stream[: seq * count], dtype=np.int64).reshape(count, seq)


def run_policy(model: Path, tokens: np.ndarray, **kw) -> dict:
    from runtime import Runtime

    with Runtime.load(model, **kw) as rt:
        t0 = time.perf_counter()
        for row in tokens:
            rt.teacher_force(torch.from_numpy(row)[None])
        elapsed = time.perf_counter() - t0
        d = rt.stats.to_dict()
    d["tpot_ms"] = 1e3 * elapsed / tokens.size
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "tiny-qwen2moe"))
    ap.add_argument("--calib", default=str(SHARED / "data" / "calib.jsonl"))
    ap.add_argument("--data", default=str(SHARED / "data" / "dev.jsonl"))
    ap.add_argument("--budgets", default="12.5,25,50")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--work", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core computes, the other runs the loader thread

    from compiler.compile_plan import CompileConfig, compile_plan
    from profiler.profile_model import ProfileConfig, profile
    from runtime import Runtime

    model, work = Path(args.model), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prof_dir = work / f"profile-{model.name}"
    prof = profile(model, args.calib, ProfileConfig(samples=32, seq_len=256), progress=False)
    prof.save(prof_dir)
    layers = len(prof.moe_layers)

    with Runtime.load(model, policy="resident") as rt:
        tokens = windows(rt.tokenizer, Path(args.data), args.seq, args.windows)
        expert_bytes_here = rt.store.expert_bytes
    resident = run_policy(model, tokens, policy="resident")
    t_layer = resident["tpot_ms"] / 1e3 / layers
    ratio = target_ratio()
    bandwidth = expert_bytes_here / (ratio * t_layer)
    link = f"{bandwidth / 1e6:.1f}MB/s,20us"
    print(f"resident TPOT {resident['tpot_ms']:.2f} ms -> {t_layer * 1e3:.2f} ms/layer; target load/layer ratio "
          f"{ratio:.2f} -> emulated link {link}", flush=True)

    rows = []
    for b in [float(x) for x in args.budgets.split(",")]:
        pct = f"{b:g}%"
        plan = compile_plan(prof_dir, CompileConfig(budget=pct), log=lambda *a: None)
        plan.save(work / f"plan-{model.name}-{b:g}")
        res = {"lru": run_policy(model, tokens, policy="lru", cache=pct, link=link),
               "smoe": run_policy(model, tokens, policy="smoe", cache=pct, link=link),
               "plan": run_policy(model, tokens, policy="plan", plan=work / f"plan-{model.name}-{b:g}", link=link)}
        base = res["lru"]
        for name, d in res.items():
            rows.append({"budget": pct, "policy": name, "hit_rate": d["hit_rate"],
                         "loads_per_token": d["loads_per_token"], "tpot_ms": d["tpot_ms"],
                         "loads_vs_lru": d["loads_per_token"] / max(base["loads_per_token"], 1e-9),
                         "tpot_vs_lru": d["tpot_ms"] / base["tpot_ms"],
                         "substitution_rate": d["substitution_rate"], "drop_rate": d["drop_rate"],
                         "predicted_hit_rate": plan.predicted[name]["hit_rate"],
                         "predicted_loads_per_token": plan.predicted[name]["loads_per_token"]})
            print(json.dumps(rows[-1]), flush=True)

    lines = [f"Model `{model.name}`, {tokens.size} held-out tokens ({args.windows} windows of {args.seq}) teacher-forced "
             f"one at a time, batch 1, float32 on {platform.processor() or platform.machine()} "
             f"({torch.get_num_threads()} compute thread). Emulated link {link}: one expert load costs {ratio:.2f} "
             f"layers of compute, as on {TARGET['name']}. Resident (no offloading) TPOT {resident['tpot_ms']:.2f} ms.",
             "", "| budget | policy | hit rate | loads/token | TPOT ms | loads vs lru | TPOT vs lru | substituted | "
             "dropped | predicted hit rate | predicted loads/token |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['policy']} | {r['hit_rate']:.3f} | {r['loads_per_token']:.2f} | "
                     f"{r['tpot_ms']:.1f} | {r['loads_vs_lru']:.2f} | {r['tpot_vs_lru']:.2f} | "
                     f"{r['substitution_rate']:.3f} | {r['drop_rate']:.3f} | {r['predicted_hit_rate']:.3f} | "
                     f"{r['predicted_loads_per_token']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(f"# Policy benchmark\n\nMade by `python benchmarks/policies.py --out {args.out}`.\n\n"
                                  f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
