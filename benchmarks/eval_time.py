"""Benchmark: how long `moe-eval` takes for the evaluation a user runs first, against the 10-minute goal.

    python benchmarks/eval_time.py [--out docs/BENCHMARKS.md | -]

Profiles and compiles tiny-qwen2moe (25% cache, the default objective) in a work directory, then times one
`moe-eval` command as a user types it: resident, lru, smoe and plan over 2048 held-out tokens, every metric
(perplexity with intervals, top-1 and greedy agreement, tasks), wall clock of the whole process. Writes the section
"eval-time" of docs/BENCHMARKS.md (benchmarks/sections.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"
GOAL_S = 600.0                    # the goal: a 4-policy run on 2048 tokens in <= 10 minutes
HEADING = "## Evaluation time: a 4-policy moe-eval run"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "tiny-qwen2moe"))
    ap.add_argument("--data", default=str(SHARED / "data"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="evaltime-") as work:
        w = Path(work)
        subprocess.run([_bin("moe-profile"), args.model, "--calib", f"{args.data}/calib.jsonl", "-o", str(w / "prof"),
                        "--samples", "32", "--seq-len", "256", "--quiet"], check=True)
        subprocess.run([_bin("moe-compile"), str(w / "prof"), "--budget", "25%", "-o", str(w / "plan"), "--quiet"],
                       check=True)
        cmd = [_bin("moe-eval"), args.model, "--data", f"{args.data}/dev.jsonl", "--plan", str(w / "plan"),
               "--policies", "resident,lru,smoe,plan", "--cache", "25%", "--max-tokens", "2048", "--quiet",
               "--json", str(w / "eval.json")]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        result = json.loads((w / "eval.json").read_text())
    shown = " ".join(shlex.quote(a) for a in ["moe-eval", Path(args.model).name, "--data", "dev.jsonl", "--plan",
                                              "PLAN", *cmd[6:-2], "--json", "eval.json"])
    verdict = "within" if seconds <= GOAL_S else "over"
    text = (f"Made by `python benchmarks/eval_time.py` on {platform.platform()}, {os.cpu_count()} CPUs. The command "
            f"`{shown}` ({result['tokens']} tokens in {result['windows']} windows, "
            f"{result['prompts']} greedy prompts, {(result.get('tasks') or {}).get('count', 0)} tasks, "
            f"{len(result['policies'])} policies) took {seconds:.0f} s of wall time, {verdict} the goal of "
            f"{GOAL_S:.0f} s.")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sections import write_section

    write_section(args.out, "eval-time", HEADING, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
