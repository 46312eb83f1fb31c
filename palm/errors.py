"""The one exception type for problems the user can fix (bad input, missing files, wrong sizes)."""


class PalmError(Exception):
    """A user-facing error; the CLI prints its message as one line and exits non-zero."""
