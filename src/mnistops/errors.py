"""One error base for everything a user can meet, with the exit code it ends with.

The CLI catches `MnistopsError` once (its root command group) and prints its message:
no traceback. The code says whose move it is: 1, a service or a run failed (start it,
look at its log, run again); 2, the input or the configuration is wrong (fix the
file, option or key the message names).
"""

from __future__ import annotations

SERVICE_FAILURE = 1
BAD_INPUT = 2
INTERRUPTED = 130


class MnistopsError(Exception):
    """A failure whose message says what went wrong and what to do."""

    exit_code = SERVICE_FAILURE


class BadInput(MnistopsError):
    """Bad input or configuration: the message names the file, option or key."""

    exit_code = BAD_INPUT


class Interrupted(MnistopsError):
    """Ctrl-C or SIGTERM stopped the command; the message says what was kept."""

    exit_code = INTERRUPTED


class PredictError(MnistopsError):
    """There is no champion, or it cannot be loaded, or an image cannot be used; the
    message names which."""


class ImageUnusable(PredictError, BadInput):
    """An image cannot be read or holds no digit; the message names the file."""


def as_bad_input(exc: MnistopsError) -> BadInput:
    """The same message, as bad input: a check of what a command was given (the data
    version to train on, its hyperparameters) failed before any work started."""
    error = BadInput(str(exc))
    error.__cause__ = exc
    return error
