"""Whole artifacts or none: swaps, errors, disk full, leftovers of killed writers, concurrent writers."""
import errno
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time

import pytest

from artifacts import UserError
from artifacts.atomic import atomic_dir, atomic_write_text, remove_leftovers


def _write(target, tag, files=3, pause=0.0):
    with atomic_dir(target) as tmp:
        for n in range(files):
            (tmp / f"f{n}").write_text(tag)
            time.sleep(pause)


def _contents(d):
    return {p.name: p.read_text() for p in sorted(d.iterdir())}


def test_swap_replaces_whole_and_errors_keep_the_old(tmp_path):
    out = tmp_path / "out"
    _write(out, "a")
    _write(out, "b", files=2)
    assert _contents(out) == {"f0": "b", "f1": "b"}
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "f0").write_text("c")
            raise RuntimeError("boom")
    assert _contents(out) == {"f0": "b", "f1": "b"} and sorted(os.listdir(tmp_path)) == ["out"]


def test_disk_full_is_one_line_and_keeps_the_old(tmp_path):
    out = tmp_path / "out"
    _write(out, "a")
    with pytest.raises(UserError, match="disk full") as info:
        with atomic_dir(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert "\n" not in str(info.value)
    assert _contents(out)["f0"] == "a" and sorted(os.listdir(tmp_path)) == ["out"]


def test_write_text_is_atomic(tmp_path, monkeypatch):
    f = tmp_path / "s.json"
    atomic_write_text(f, "one")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="disk full"):
        atomic_write_text(f, "two")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert f.read_text() == "one" and os.listdir(tmp_path) == ["s.json"]


def test_leftovers_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".out.tmp-{pid}-0123abcd").mkdir()
    (tmp_path / f".out.old-{pid}-0123abcd").mkdir()
    (tmp_path / f".out.tmp-{os.getpid()}-4567abcd").mkdir()       # a live writer's: kept
    (tmp_path / f".other.tmp-{pid}-0123abcd").mkdir()              # another target's: kept
    _write(tmp_path / "out", "a")
    assert sorted(os.listdir(tmp_path)) == sorted([".other.tmp-%d-0123abcd" % pid, ".out.tmp-%d-4567abcd" % os.getpid(),
                                                   "out"])
    assert remove_leftovers(tmp_path / "out") == []


def _writer(target, tag, seed):
    random.seed(seed)
    for _ in range(3):
        _write(target, tag, files=4, pause=random.random() * 0.01)


def test_concurrent_writers_never_mix(tmp_path):
    out = tmp_path / "out"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(out, f"w{n}", n)) for n in range(4)]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        try:
            fd = os.open(out, os.O_RDONLY)  # one directory, read through its fd: what a reader that opened it sees
        except FileNotFoundError:
            continue
        try:
            tags = set()
            for name in os.listdir(fd):
                with open(name, opener=lambda path, flags: os.open(path, flags, dir_fd=fd)) as f:
                    tags.add(f.read())
        except FileNotFoundError:           # the directory was swapped out and is being removed: retry
            continue
        finally:
            os.close(fd)
        assert len(tags) <= 1, tags         # one writer's files, never a mix
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert len(set(_contents(out).values())) == 1 and len(_contents(out)) == 4
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_compile_disk_full_during_report_keeps_previous_plan(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing the report: one line, exit 2, the previous plan untouched (report included)."""
    import compiler.report
    from compiler.cli import main
    from helpers import sample_texts, write_jsonl
    from profiler.profile_model import ProfileConfig, profile
    from tiny_models import build_tiny

    model = build_tiny("olmoe", tmp_path / "m")
    calib = write_jsonl(tmp_path / "c.jsonl", sample_texts(4, 31))
    profile(model, str(calib), ProfileConfig(samples=4, seq_len=32, probe_tokens=32, sensitivity_tokens=0),
            progress=False).save(tmp_path / "p")
    assert main([str(tmp_path / "p"), "--budget", "50%", "-o", str(tmp_path / "plan"), "--search-tokens", "32",
                 "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "plan").iterdir()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "report.md")
    monkeypatch.setattr(compiler.report, "write_report", full)
    capsys.readouterr()
    code = main([str(tmp_path / "p"), "--budget", "25%", "-o", str(tmp_path / "plan"), "--search-tokens", "32",
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "disk full" in err[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "plan").iterdir()} == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".plan.")]


def test_write_text_removes_a_dead_writers_leftover(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".s.json.tmp-{int(dead.stdout)}-0123abcd").write_text("half")
    atomic_write_text(tmp_path / "s.json", "whole")
    assert os.listdir(tmp_path) == ["s.json"]
