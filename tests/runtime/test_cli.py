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


def test_chat_streams_replies_with_the_template_and_stats(fixture_model, tmp_path, monkeypatch, capsys):
    import io

    from runtime import Runtime
    from runtime.chat import CHATML, render

    monkeypatch.setattr("sys.stdin", io.StringIO("Name a river.\n/stats\nAnd another?\n/exit\n"))
    code, out, err = _run(capsys, fixture_model, "--policy", "lru", "--cache", "50%", "--chat", "--chat-template",
                          "chatml", "--max-new-tokens", 10, "--lossless")
    assert code == 0
    lines = out.splitlines()
    with Runtime.load(fixture_model, policy="lru", cache="50%", lossless=True) as rt:   # the first turn, by hand
        ids = rt.tokenizer(render(rt.tokenizer, [{"role": "user", "content": "Name a river."}], CHATML),
                           add_special_tokens=False)["input_ids"]
        first = "".join(rt.stream(ids, max_new_tokens=10))
    assert lines[0] == first
    assert lines[1].startswith("[lru (lossless)]") and "hit rate" in lines[1]        # /stats
    assert len(lines) == 3 and "hit rate" in err[-1]


def test_chat_without_a_template_is_one_line(fixture_model, capsys):
    code, _, err = _run(capsys, fixture_model, "--policy", "lru", "--cache", 4, "--chat")
    assert code == 2 and len(err) == 1 and "chat template" in err[0] and "--chat-template" in err[0]


def test_prompts_file_and_escapes(fixture_model, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("In the beginning\n\nimport os\n")
    code, out, _ = _run(capsys, fixture_model, "--policy", "lru", "--cache", 4, "--prompts-file", f,
                        "--max-new-tokens", 4, "--quiet")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].startswith("In the beginning") and lines[1].startswith("import")
    code, out, _ = _run(capsys, fixture_model, "--policy", "lru", "--cache", 4, "--prompt", r"def f():\n    return",
                        "--max-new-tokens", 2, "--quiet")
    assert code == 0 and out.startswith("def f():\n    return")
