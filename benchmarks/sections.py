"""Sections of docs/BENCHMARKS.md that a separate benchmark script owns, between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` markers after a `## ` heading: each script rewrites only its own section, and the main script,
which regenerates the document, keeps every such section as it was."""
from __future__ import annotations

import re
from pathlib import Path

_SECTION = re.compile(r"(^## [^\n]*\n\n<!-- (?P<name>[\w-]+):begin -->\n.*?<!-- (?P=name):end -->\n?)", re.S | re.M)


def write_section(out: str, name: str, heading: str, text: str) -> None:
    """Replace section `name` of the markdown file `out` (appended when absent); `out` "-" prints it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{heading}\n\n{begin}\n{text.rstrip()}\n{end}\n"
    if out == "-":
        print(block)
        return
    path = Path(out)
    doc = path.read_text() if path.exists() else ""
    if begin in doc and end in doc:
        start = doc.rindex("\n## ", 0, doc.index(begin)) + 1
        rest = doc[doc.index(end) + len(end):].lstrip("\n")
        doc = doc[:start] + block + ("\n" + rest if rest else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    path.write_text(doc)


def kept_sections(doc: str) -> list[str]:
    """Every script-owned section of `doc`, heading included, in order."""
    return [m.group(1).rstrip("\n") for m in _SECTION.finditer(doc)]
