"""The one exception type for problems a user caused (bad model, bad path, bad flag)."""


class DiffshipError(Exception):
    """A user-facing error: the message says what was wrong and what to do. The CLI maps it to exit 2."""
