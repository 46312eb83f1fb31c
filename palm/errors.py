"""The exception types for problems the user can fix (bad input, missing files, wrong sizes)."""


class PalmError(Exception):
    """A user-facing error; the CLI prints its message as one line and exits non-zero."""


class Stopped(PalmError):
    """A run stopped on request (a signal) after saving its state; the CLI exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
