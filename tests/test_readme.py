"""The README's examples run as written: the quickstart's commands (in-process, outputs redirected to a temporary
directory) and the Python API block; the budget line the README quotes is the one the run prints."""
import contextlib
import io
import re
import shlex
from pathlib import Path

from helpers import ROOT

README = (ROOT / "README.md").read_text()


def _block(begin: str, end: str) -> str:
    return README[README.index(begin) + len(begin): README.index(end)]


def _mains():
    from compiler.cli import main as compile_main
    from profiler.cli import main as profile_main
    from runtime.cli import main as run_main

    return {"moe-profile": profile_main, "moe-compile": compile_main, "moe-run": run_main}


def test_readme_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = str(tmp_path / "demo")
    commands = [l for l in _block("<!-- readme-example:begin -->", "<!-- readme-example:end -->").splitlines()
                if l.startswith("moe-")]
    assert len(commands) >= 4
    mains, budget_line = _mains(), None
    for line in commands:
        argv = [a.replace("out/demo", out) for a in shlex.split(line)]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = mains[argv[0]](argv[1:])
        assert code == 0, (line, err.getvalue())
        if "--plan out/demo/plan " in line:
            budget_line = next(l for l in err.getvalue().splitlines() if l.startswith("expert cache:"))
    quoted = re.search(r"`(expert cache: [^`]+)`", README.replace("\n", " ")).group(1)
    assert budget_line == quoted

    blocks = [b.split("```")[0].replace("out/demo", out) for b in README.split("```python\n")[1:]]
    assert len(blocks) == 2
    for block in blocks:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(block, "README.md", "exec"), {})
    assert printed.getvalue().startswith(quoted)
