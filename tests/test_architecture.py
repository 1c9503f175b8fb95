"""The rooms' import rules, read from the source: artifacts is a leaf; runtime never imports the profiler, the
compiler or evaluation; the compiler never imports the profiler or evaluation (and runs without torch: see
tests/compiler/test_compile.py); evaluation reads data through artifacts, not the profiler."""
import ast

import pytest

from helpers import ROOT

FORBIDDEN = {
    "artifacts": {"profiler", "compiler", "runtime", "evaluation"},
    "runtime": {"profiler", "compiler", "evaluation"},
    "compiler": {"profiler", "evaluation"},
    "evaluation": {"profiler", "compiler"},
}


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_import_rules(room):
    bad = [(str(p.relative_to(ROOT)), m) for p in (ROOT / room).rglob("*.py") for m in _imports(p)
           if m in FORBIDDEN[room]]
    assert bad == []
