"""The one exception type for user mistakes. Its message says what to do; CLIs print it on one line, exit 2."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): the message carries the remedy."""


def check_range(value, flag: str, lo=None, hi=None, lo_open: bool = False):
    """A flag's value is finite and in range, else a one-line UserError naming the flag."""
    import math

    bad = value is None or (isinstance(value, float) and not math.isfinite(value))
    bad = bad or (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        lo_txt = "" if lo is None else (f"> {lo:g}" if lo_open else f">= {lo:g}")
        hi_txt = "" if hi is None else f"<= {hi:g}"
        want = " and ".join(t for t in (lo_txt, hi_txt) if t) or "finite"
        raise UserError(f"{flag} must be {want} (got {value})")
    return value


def cli_parser(prog: str, description: str):
    """An argparse parser whose usage errors are one line ("PROG: error: ...; see PROG --help") with exit code 2,
    and which answers --version."""
    import argparse

    from artifacts.header import TOOL_VERSION

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):
            self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")

    ap = _Parser(prog=prog, description=description)
    ap.add_argument("--version", action="version", version=f"%(prog)s (understudy) {TOOL_VERSION}")
    return ap


def run_cli(prog: str, body) -> int:
    """Run a command's body: a user mistake is one line on stderr and exit code 2, never a traceback."""
    import sys

    try:
        return body()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # the environment, not a bug: an unreadable input, a full disk
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}; check the path and free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return 130
