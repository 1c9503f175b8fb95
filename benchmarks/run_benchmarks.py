"""Regenerate docs/BENCHMARKS.md, its plots and the README's results block from one run: accuracy and speed per
policy and budget, with peers.

    python benchmarks/run_benchmarks.py                       # the full grid; the document states its run time
    python benchmarks/run_benchmarks.py --from-json out/benchmarks/results.json   # rewrite the text, no runs

For each model: profile on calibration text (32 windows of 256 tokens), calibrate the emulated link
(benchmarks/emulated_link.py), time the peers (benchmarks/peers.py), compile two plans per budget (`plan`: the
default objective, the least modeled TPOT within a predicted perplexity increase of +0.5%; `plan-hits`:
`--max-error 0.015`, the most hits within +1.5%), then run `evaluation.run_eval.evaluate` (moe-eval) over held-out
text for resident, lru, smoe, plan and plan-hits in one run per (budget, batch). results.json in the work directory
is rewritten after every evaluation. Every sentence of the document that states an outcome is built from these
figures (benchmarks/findings.py, benchmarks/goals.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from emulated_link import calibrate_link  # noqa: E402
from figures import HITS_MAX_ERROR, POLICIES, Run, cell_key  # noqa: E402
from peers import hf_generate_tpot, understudy_tpot  # noqa: E402
from report import write_doc, write_readme  # noqa: E402

SHARED = ROOT.parent / "shared" / "fixtures"
DEMO = ROOT / "demo"
MODELS = {"demo": (DEMO / "model", DEMO / "data" / "calib.jsonl", DEMO / "data" / "dev.jsonl"),
          "tiny-qwen2moe": (SHARED / "tiny-qwen2moe", SHARED / "data" / "calib.jsonl", SHARED / "data" / "dev.jsonl"),
          "tiny-qwen2moe-upcycled": (SHARED / "tiny-qwen2moe-upcycled", SHARED / "data" / "calib.jsonl",
                                     SHARED / "data" / "dev.jsonl")}
PEER_BUDGET = 50.0                                 # % of routed-expert bytes for the offloading peers


def parse_batches(spec: str, budgets: list[float]) -> list[tuple[int, list[float]]]:
    """"1,3@50" -> [(1, every budget), (3, [50.0])]; "3@25/50" restricts batch 3 to 25% and 50%."""
    out = []
    for item in spec.split(","):
        b, _, only = item.partition("@")
        out.append((int(b), [float(x) for x in only.split("/")] if only else budgets))
    return out


def parse_tokens(spec: str) -> dict[str, int]:
    """"tiny-qwen2moe-upcycled=2048" -> {name: tokens}."""
    return {k: int(v) for k, v in (item.split("=") for item in spec.split(",") if item)}


def git_commit() -> str | None:
    """The commit the benchmarked code is at (with "+changes" when the tree differs from it), if ROOT is a git tree."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def machine() -> dict:
    m = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
         "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    m["summary"] = f"{m['platform']} ({m['processor']}, {m['cpus']} CPUs{', CUDA available' if m['cuda'] else ''})"
    return m


def profile_model(name: str, model: Path, calib: Path, work: Path) -> tuple[object, dict]:
    """Profile once per model; (profile, its document entry: sensitivity table and median understudy error)."""
    from profiler.profile_model import ProfileConfig, profile
    from profiler.summary import sensitivity_table

    prof = profile(model, str(calib), ProfileConfig(samples=32, seq_len=256), progress=False)
    prof.save(work / name / "profile")
    off = ~np.eye(prof.num_experts, dtype=bool)
    err = float(np.mean([np.median(prof.substitution_error[l][off]) for l in prof.moe_layers]))
    return prof, {"median_error": err, "sensitivity": sensitivity_table(prof)}


def compile_plans(name: str, budget: float, work: Path) -> dict[str, Path]:
    from compiler.compile_plan import CompileConfig, compile_plan

    pct = f"{budget:g}%"
    dirs = {"plan": work / name / f"plan-{budget:g}", "plan-hits": work / name / f"plan-hits-{budget:g}"}
    configs = {"plan": CompileConfig(budget=pct), "plan-hits": CompileConfig(budget=pct, max_error=HITS_MAX_ERROR)}
    for v, d in dirs.items():
        compile_plan(work / name / "profile", configs[v], log=lambda *a: None).save(d)
    return dirs


def peers_of(model: Path, prof, plan_dir: Path | None) -> dict:
    routed = prof.header["model"]["routed_expert_bytes"] * 2    # bytes, float32 run of a bf16 checkpoint
    dense = prof.header["model"]["dense_bytes"] * 2              # bytes
    return {"hf_generate_resident": hf_generate_tpot(model, None),
            "understudy_resident": understudy_tpot(model, policy="resident"),
            "hf_accelerate_offload_50": hf_generate_tpot(model, dense + PEER_BUDGET / 100 * routed),
            "understudy_plan_50": None if plan_dir is None else understudy_tpot(model, policy="plan", plan=plan_dir)}


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.0f} s] {msg}", flush=True)


def run_grid(args, run: Run, work: Path, t0: float) -> None:
    from evaluation.run_eval import EvalConfig, evaluate

    budgets = [float(x) for x in args.budgets.split(",")]
    batches = parse_batches(args.batches, budgets)
    tokens = parse_tokens(args.tokens_for)
    results_json = work / "results.json"
    for name in args.models.split(","):
        model, calib, dev = MODELS[name]
        log(t0, f"{name}: profiling")
        prof, run.profiles[name] = profile_model(name, model, calib, work)
        link, t_layer = calibrate_link(model, len(prof.moe_layers))
        run.links[name] = {"link": link, "t_layer_ms": 1e3 * t_layer}
        log(t0, f"{name}: emulated link {link}; compiling plans")
        plans = {b: compile_plans(name, b, work) for b in budgets}
        log(t0, f"{name}: peers")
        run.peers[name] = peers_of(model, prof, plans[PEER_BUDGET]["plan"] if PEER_BUDGET in plans else None)
        for batch, only in batches:
            for b in only:
                pct, n = f"{b:g}%", tokens.get(name, args.max_tokens)
                log(t0, f"{name}: evaluating {pct} cache, batch {batch}, {n} tokens")
                cfg = EvalConfig(policies=POLICIES, cache=pct, batch=batch, link=link, max_tokens=n,
                                 window=args.window, max_tasks=args.max_tasks, prompts=args.prompts, threads=1)
                r = evaluate(model, str(dev), {v: str(d) for v, d in plans[b].items()}, cfg, progress=False)
                r["predicted"] = {v: json.loads((d / "plan.json").read_text())["predicted"]
                                  for v, d in plans[b].items()}
                run.results[cell_key(name, pct, batch)] = r
                pol = r["policies"]
                log(t0, f"{name} {pct} b{batch}: " + "; ".join(
                    f"{p} ppl {d['perplexity']:.3f} hit {d['hit_rate']:.3f} loads {d['loads_per_token']:.2f} "
                    f"tpot {d['tpot_ms']:.1f}" for p, d in pol.items()))
                run.meta["wall_s"] = time.perf_counter() - t0
                results_json.write_text(json.dumps(run.to_dict()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-qwen2moe,tiny-qwen2moe-upcycled", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--budgets", default="12.5,25,50", help="cache budgets, %% of routed-expert bytes")
    ap.add_argument("--batches", default="1", help="batch sizes; B@P1/P2 runs batch B at those budgets only")
    ap.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens per policy and cell")
    ap.add_argument("--tokens-for", default="", help="per-model override, e.g. tiny-qwen2moe-upcycled=2048")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--max-tasks", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=8, help="prompts continued greedily for greedy agreement")
    ap.add_argument("--work", default=str(ROOT / "out" / "benchmarks"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help="README whose results block is rewritten; "
                    "- leaves it alone")
    ap.add_argument("--from-json", default=None, help="rewrite the document from a saved results.json, no runs")
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    out = Path(args.out)
    if args.from_json:
        run = Run.from_dict(json.loads(Path(args.from_json).read_text()))
        run.meta["regenerated"] = command
    else:
        torch.set_num_threads(1)  # one core computes, the other runs the loader thread
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        run = Run({}, {}, {}, {}, {"command": command, "started": dt.datetime.now().isoformat(timespec="seconds"),
                                   "commit": git_commit(),
                                   "machine": machine(), "config": {
                                       "max_tokens": args.max_tokens, "tokens_for": args.tokens_for,
                                       "window": args.window, "max_tasks": args.max_tasks, "prompts": args.prompts,
                                       "threads": 1, "device": "cpu"}})
        run_grid(args, run, work, t0)
        run.meta["wall_s"] = time.perf_counter() - t0
        (work / "results.json").write_text(json.dumps(run.to_dict()))
        log(t0, f"done; results in {work / 'results.json'}")
    checks = write_doc(run, out, ROOT / "docs" / "BENCHMARKS.md")
    if args.readme != "-":
        doc = os.path.relpath(out, Path(args.readme).resolve().parent)
        write_readme(run, checks, Path(args.readme), doc)
    print(f"wrote {out}" + ("" if args.readme == "-" else f" and the results block of {args.readme}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
