"""Whole artifacts or none: every output is built beside its target and swapped into place in one step.

  atomic_dir(target):  yields a fresh temporary directory `.{name}.tmp-{pid}-{id}` next to `target`; everything the
                       command writes (plan + report + plots, or a profile) goes in it; on success it replaces
                       `target` in one rename (Linux: renameat2 RENAME_EXCHANGE, so a reader sees the old artifact
                       or the new one, never a missing or mixed one), on any error it is removed.
  atomic_file(target): the same for one file (`--json`, `--stats-json`): written to a temporary name, renamed.

Concurrent writers to one target each build their own temporary directory; the swap itself is serialised by an
flock on the parent directory, so the target ends as one writer's whole artifact. A run killed with SIGKILL leaves its
temporary directory behind; the next write to the same target removes every leftover whose process is gone.
OSErrors (disk full, read-only, permission) become one-line `UserError`s and leave the previous artifact intact.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from artifacts.errors import UserError

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_RENAME_EXCHANGE = 2


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(target: Path) -> list[Path]:
    """Remove temporary siblings of `target` left by writers that no longer run; returns what was removed."""
    removed = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and m.group("name") == target.name and not _alive(int(m.group("pid"))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _tmp_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def describe_os_error(exc: OSError, target: Path) -> str:
    """One line for a failed write, with the remedy."""
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {target}: {why} (disk full); free space or choose another output path"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {target}: {why}; choose an output path you can write to"
    return f"cannot write {target}: {why}; choose another output path"


@contextmanager
def _lock(target: Path):
    fd = os.open(target.parent, os.O_RDONLY)   # the parent directory itself: no lock file to leave behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _install(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` at `target` in one step; the old artifact (if any) is removed afterwards."""
    with _lock(target):
        if target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)          # tmp now holds the old artifact
            return
        if target.exists():
            old = _tmp_name(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yields a fresh temporary directory; on success it replaces `target` whole, on error it is removed."""
    target = Path(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(target)
        tmp = _tmp_name(target, "tmp")
        tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        _install(tmp, target)
        tmp = None
    except OSError as exc:
        raise UserError(describe_os_error(exc, target)) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(target: str | Path, text: str) -> Path:
    """Write one file whole: a temporary sibling, fsync, rename. Errors are one-line UserErrors."""
    target = Path(target)
    remove_leftovers(target)
    tmp = _tmp_name(target, "tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise UserError(describe_os_error(exc, target)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def check_output_dir(path: str | Path, artifact_file: str, what: str) -> Path:
    """Fail fast, before the long work: `path` must be absent, empty, or an artifact of this kind (`artifact_file`
    in it), and its parent must be creatable and writable."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"output {path} is a file; choose a directory path for the {what}")
        if any(path.iterdir()) and not (path / artifact_file).is_file():
            raise UserError(f"output {path} exists and is not a {what} directory; choose another -o path")
    _check_writable_parent(path)
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Fail fast for a file output: not a directory, its directory exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: directory {path.parent} does not exist; create it or give another path")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path} is not writable; choose a path you can write to")
    return path


def _check_writable_parent(path: Path) -> None:
    probe = path.parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create {path}: {probe} is a file; choose another output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot create {path}: {probe} is not writable; choose an output path you can write to")
