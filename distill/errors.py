"""User-facing errors.

A :class:`DistillError` is a user's mistake (bad file, bad key, bad value). The CLI prints its
message on one line and exits with code 2, without a traceback. Anything else is a bug and keeps
its traceback.
"""


class DistillError(Exception):
    """A clear, one-line error about user input: name the file / key and what was expected."""

    exit_code = 2
