"""The one exception type for user mistakes. Its message says what to do; CLIs print it on one line, exit 2."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): the message carries the remedy."""
