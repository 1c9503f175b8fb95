"""The one exception type for user mistakes. Its message says what to do; CLIs print it on one line, exit 2."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): the message carries the remedy."""


def run_cli(prog: str, body) -> int:
    """Run a command's body: a user mistake is one line on stderr and exit code 2, never a traceback."""
    import sys

    try:
        return body()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return 130
