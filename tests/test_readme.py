"""The README's examples run as written: the quickstart's commands (in-process, outputs redirected to a temporary
directory) and the Python API block; the budget line the README quotes is the one the run prints."""
import contextlib
import io
import os
import re
import shlex

import pytest

from helpers import ROOT

README = (ROOT / "README.md").read_text()


def _block(begin: str, end: str) -> str:
    return README[README.index(begin) + len(begin): README.index(end)]


def _mains():
    from compiler.cli import main as compile_main
    from profiler.cli import main as profile_main
    from runtime.cli import main as run_main

    return {"moe-profile": profile_main, "moe-compile": compile_main, "moe-run": run_main}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart's commands run as written (outputs under a temporary out/demo); (out, the budget line)."""
    out = str(tmp_path_factory.mktemp("readme") / "demo")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return out, _run_quickstart(out)
    finally:
        os.chdir(cwd)


def _run_quickstart(out: str) -> str:
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
    return budget_line


def test_readme_examples_run_as_written(quickstart, monkeypatch):
    monkeypatch.chdir(ROOT)
    out, budget_line = quickstart
    quoted = re.search(r"`(expert cache: [^`]+)`", README.replace("\n", " ")).group(1)
    assert budget_line == quoted

    outside = README.replace(_block("<!-- serve-example:begin -->", "<!-- serve-example:end -->"), "")
    blocks = [b.split("```")[0].replace("out/demo", out) for b in outside.split("```python\n")[1:]]
    assert len(blocks) == 2
    for block in blocks:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(block, "README.md", "exec"), {})
    assert printed.getvalue().startswith(quoted)


def test_readme_serving_example_runs_as_written(quickstart):
    """The serving block: moe-serve as written (its own port), then curl's request and the openai client's."""
    import json
    import socket
    import subprocess
    import sys
    import time

    import httpx

    pytest.importorskip("openai")
    out = quickstart[0]
    block = _block("<!-- serve-example:begin -->", "<!-- serve-example:end -->")
    bash = block.split("```bash\n")[1].split("```")[0]
    serve_line, curl = bash.split("\n", 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = shlex.split(serve_line.replace("out/demo", out).replace("8000", str(port)))
    assert argv[0] == "moe-serve"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.server.cli", *argv[1:]], cwd=ROOT,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None and time.time() < deadline
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = json.loads(shlex.split(curl.replace("\\\n", " "))[-1])         # curl's -d body, sent as written
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        code = block.split("```python\n")[1].split("```")[0].replace("8000", str(port))
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(code, "README.md", "exec"), {})
        assert printed.getvalue().strip()
    finally:
        proc.terminate()
        proc.wait(20)
