"""SIGKILL at random points of moe-profile and moe-compile: no readable partial artifact ever exists (the output is
the previous whole artifact or the new whole one), and a rerun succeeds and clears every leftover."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts import Plan, Profile
from helpers import ROOT, sample_texts, write_jsonl
from tiny_models import build_tiny

KILLS = 4          # per command: 8 random points in all


def _cmd(module: str, *args) -> list[str]:
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())", *map(str, args)]


def _run(cmd) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return time.perf_counter() - t0


def _kill_at(cmd, seconds: float) -> None:
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()


def _check(out: Path, load, files: set[str]) -> None:
    """The output is absent or a whole artifact: every file a finished run writes, and it loads (validated)."""
    if out.exists():
        assert {p.name for p in out.iterdir()} == files
        load(out)


@pytest.mark.parametrize("command", ["profile", "compile"])
def test_sigkill_leaves_old_or_new_never_partial(command, tmp_path):
    rng = random.Random(1234 if command == "profile" else 4321)
    model = build_tiny("olmoe", tmp_path / "m")
    calib = write_jsonl(tmp_path / "c.jsonl", sample_texts(8, 31))
    # every pass runs, on few tokens: what is tested is how the artifact is written, not what it measures
    prof_cmd = _cmd("profiler.cli", model, "--calib", calib, "-o", tmp_path / "p", "--samples", 8, "--seq-len", 32,
                    "--probe-tokens", 64, "--sensitivity-tokens", 64, "--quant-tokens", 64, "--quiet")
    if command == "profile":
        cmd, out, load = prof_cmd, tmp_path / "p", Profile.load
    else:
        _run(prof_cmd)
        cmd = _cmd("compiler.cli", tmp_path / "p", "--budget", "50%", "-o", tmp_path / "plan", "--quiet",
                   "--search-tokens", 128)
        out, load = tmp_path / "plan", Plan.load
    full = _run(cmd)                                 # a whole artifact, and how long a run takes
    files = {p.name for p in out.iterdir()}
    for n in range(KILLS):
        # half the points anywhere in the run, half in its last third (where the artifact is written)
        t = rng.uniform(0, full) if n % 2 == 0 else rng.uniform(0.66 * full, 1.1 * full)
        _kill_at(cmd, t)
        _check(out, load, files)
    _run(cmd)                                       # a rerun succeeds ...
    load(out)
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(f".{out.name}.")]
    assert leftovers == []                          # ... and removes what killed runs left
