"""moe-profile sharded under torchrun (profiler.distributed): 2 processes on this machine give the profile of one."""
import re
import os
import subprocess
import sys

import numpy as np
import pytest

from artifacts import Profile, UserError
from helpers import ROOT, sample_texts, write_jsonl
from profiler.distributed import Shards

SEQ = 32
# 10 windows in batches of 3 (3, 3, 3, 1): rank 0 observes batches 0-1, rank 1 batches 2-3; sensitivity on 5
# windows (two batches, the 20 passes split 10/10), quantization on 3 (one batch, one MoE layer each)
ARGS = ("--samples", 10, "--seq-len", SEQ, "--batch-size", 3, "--probe-tokens", 50, "--sensitivity-tokens", 5 * SEQ,
        "--quant-tokens", 3 * SEQ)


def _env() -> dict:
    # one thread in every process (torchrun's own default for several processes), so that a pass computes alike
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(*argv, procs: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)


def test_windows_are_whole_batches_of_the_single_run():
    for windows, batch, world in ((10, 3, 2), (10, 3, 4), (64, 4, 3), (5, 1, 5), (7, 7, 1)):
        parts = [Shards(r, world).windows(windows, batch) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == windows
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))               # contiguous, disjoint, in order
        assert all(lo % batch == 0 and hi > lo for lo, hi in parts)              # each starts a single-run batch
    with pytest.raises(UserError, match="2 batches of --batch-size 4, fewer than the 3 processes"):
        Shards(0, 3).windows(5, 4)
    assert [Shards(1, 3).owns(u) for u in range(7)] == [False, True, False, False, True, False, False]


def test_two_processes_profile_equals_one(tiny_model, tmp_path):
    model = tiny_model("deepseek_v3")           # a dense first layer, shared experts, grouped sigmoid routing
    calib = write_jsonl(tmp_path / "c.jsonl", sample_texts(10, SEQ - 1, seed=7))
    one = subprocess.run([sys.executable, "-m", "profiler.cli", model, "--calib", calib, "-o", tmp_path / "one",
                          "--quiet", *map(str, ARGS)], capture_output=True, text=True, env=_env(), cwd=ROOT,
                         timeout=300)
    assert one.returncode == 0, one.stderr
    two = _torchrun("-m", "profiler.cli", model, "--calib", calib, "-o", tmp_path / "two", *ARGS)
    assert two.returncode == 0, two.stderr
    # rank 0 alone reports and writes; rank 1 leaves nothing behind
    assert two.stdout.count("wrote ") == 1 and two.stdout.count("profile of deepseek_v3") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "one", "two"]
    a, b = Profile.load(tmp_path / "one"), Profile.load(tmp_path / "two")

    assert a.stats.keys() == b.stats.keys() and a.trace.keys() == b.trace.keys()
    # bit for bit: every forward pass of the two-process run is one the single run makes (same windows, same
    # batches, same probe tokens, one thread), so the trace, the counts and the labels derived from the sums
    # are equal, and so is every measurement pass (each run whole by one rank over all of its tokens)
    for k in a.trace:
        assert np.array_equal(a.trace[k], b.trace[k]), k
    float_sums = ("importance_sum", "cos_sum", "err_sum")
    for k in a.stats:
        if k.partition(".")[2] in float_sums:
            # float64 sums over batches, added in another order (rank 0's batches, then rank 1's): ~1e-16 relative
            np.testing.assert_allclose(b.stats[k], a.stats[k], rtol=1e-12, atol=1e-12, err_msg=k)
        else:
            assert np.array_equal(a.stats[k], b.stats[k]), k
    # the quantization classes come from the importance of all the tokens, in every rank
    assert all(np.array_equal(a.quant_sensitivity.expert_class[l], b.quant_sensitivity.expert_class[l])
               for l in a.moe_layers)
    for section in ("model", "calibration", "settings", "probe", "clustering", "trace", "sensitivity"):
        assert a.header[section] == b.header[section], section
    qa, qb = (dict(p.header["quant_sensitivity"], seconds=None) for p in (a, b))
    assert qa == qb and qa["passes"] == 1 + 2 * 3 * 2
    assert a.header["run"]["world_size"] == 1 and b.header["run"]["world_size"] == 2
    assert b.header["trace"]["tokens"] == 10 * SEQ and b.header["probe"]["tokens"] == 50


def test_a_mistake_fails_every_process_and_writes_nothing(tiny_model, tmp_path):
    calib = write_jsonl(tmp_path / "c.jsonl", sample_texts(3, SEQ - 1))
    # 3 windows in batches of 4: one batch for two processes
    r = _torchrun("-m", "profiler.cli", tiny_model("qwen3_moe"), "--calib", calib, "-o", tmp_path / "p",
                  "--seq-len", SEQ, "--batch-size", 4, "--quiet")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("moe-profile: error:")]
    assert errors == ["moe-profile: error: 3 calibration windows make 1 batches of --batch-size 4, fewer than the 2 "
                      "processes; give more --samples, a smaller --batch-size or fewer processes"]   # rank 0's line
    assert "exitcode  : 2" in r.stderr and not (tmp_path / "p").exists()


AGREE = """
import sys
from artifacts import UserError
from profiler.distributed import ShardFailed, torchrun_shards

def fail_on_rank_1(rank, what):
    if rank == 1:
        raise UserError("disk on fire") if what == "mistake" else ZeroDivisionError("a bug")
    return rank

with torchrun_shards("cpu") as shards:
    assert shards.agree(lambda: shards.rank * 10) == shards.rank * 10
    assert shards.all_gather(shards.rank) == [0, 1] and shards.gather(shards.rank) == ([0, 1] if shards.main else None)
    for what in ("mistake", "bug"):
        try:
            shards.agree(lambda: fail_on_rank_1(shards.rank, what))
        except ShardFailed as exc:
            print(f"rank {shards.rank} {what}: quiet={exc.quiet} {exc}", flush=True)
"""


def test_a_failure_on_one_rank_reaches_every_rank(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    r = _torchrun(script)
    assert r.returncode == 0, r.stderr
    # found anywhere in the output: two processes share the pipe, and a line may follow another's partial write
    lines = sorted(re.findall(r"rank \d \w+: quiet=\w+ rank 1 of 2: [^\n]*?\(nothing written\)", r.stdout))
    assert lines == ["rank 0 bug: quiet=False rank 1 of 2: ZeroDivisionError: a bug (nothing written)",
                     "rank 0 mistake: quiet=False rank 1 of 2: disk on fire (nothing written)",
                     "rank 1 bug: quiet=True rank 1 of 2: ZeroDivisionError: a bug (nothing written)",
                     "rank 1 mistake: quiet=True rank 1 of 2: disk on fire (nothing written)"]
    assert "ZeroDivisionError: a bug" in r.stderr and "Traceback" in r.stderr       # the bug's own rank shows where
