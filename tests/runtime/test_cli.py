"""moe-run's command line."""
import json

import pytest

from runtime.cli import main


def _run(capsys, *argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def test_run_streams_and_writes_stats(fixture_model, tmp_path, capsys):
    code, out, err = _run(capsys, fixture_model, "--policy", "smoe", "--cache", "25%", "--link", "1GB/s,5us",
                          "--prompt", "The function returns", "--max-new-tokens", 8, "--stats-json",
                          tmp_path / "s.json", "--per-layer")
    assert code == 0 and out.startswith("The function returns") and len(out) > len("The function returns")
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["policy"] == "smoe" and stats["tokens"] >= 1 and set(stats["layers"]) == {"0", "1", "2", "3"}
    assert "hit rate" in err[-1]


def test_batch_of_prompts_sampled(fixture_model, capsys):
    code, out, _ = _run(capsys, fixture_model, "--policy", "lru", "--cache", 4, "--prompt", "In the beginning",
                        "--prompt", "import os", "--max-new-tokens", 5, "--temperature", 0.8, "--top-p", 0.9,
                        "--seed", 1, "--quiet")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].startswith("In the beginning")


@pytest.mark.parametrize("args,message", [
    (["--policy", "lru"], "needs a cache size"),
    (["--policy", "lru", "--cache", "many"], "cannot read cache"),
    (["--policy", "lru", "--cache", "4", "--link", "fast"], "cannot read link"),
    (["--plan", "/nonexistent/plan"], "does not exist"),
])
def test_bad_input(fixture_model, capsys, args, message):
    code, _, err = _run(capsys, fixture_model, "--prompt", "x", *args)
    assert code == 2 and len(err) == 1 and message in err[0]
