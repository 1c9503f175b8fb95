"""The JSON header every artifact carries: format name, version, provenance; checked on load."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path

from artifacts.checks import load_json
from artifacts.errors import UserError

TOOL_NAME = "understudy"
TOOL_VERSION = "0.1.0"


def new_header(fmt: str, version: int, **sections) -> dict:
    return {"format": fmt, "format_version": version,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tool": {"name": TOOL_NAME, "version": TOOL_VERSION}, **sections}


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_header(path: Path, fmt: str, supported_version: int, what: str) -> dict:
    """Read and check a header: right format, a version this code can read (older ones are read as they were)."""
    if not path.parent.is_dir():
        raise UserError(f"{what} directory {path.parent} does not exist")
    if not path.is_file():
        raise UserError(f"{path.parent} is not a {what}: {path.name} is missing")
    header = load_json(path, what, f"re-create the {what}")
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise UserError(f"{path.parent} is not a {what} (format {header.get('format') if isinstance(header, dict) else None!r}, "
                        f"expected {fmt!r})")
    version = header.get("format_version")
    if not isinstance(version, int) or version > supported_version or version < 1:
        raise UserError(f"{what} {path.parent} has format version {version}; this Understudy reads versions "
                        f"1..{supported_version}: re-create it with this version or upgrade Understudy")
    return header


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """Hash of every file under a directory (names and contents, in sorted order)."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()
