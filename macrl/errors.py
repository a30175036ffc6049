"""The two families of errors that macrl's library raises for problems a caller can fix.

Library code raises these (or their subclasses, defined beside the code that raises them) with a message that names
the problem in its first line; it never prints and never exits. The commands (`macrl.command_line.run_command`) turn
them into one `macrl-NAME: error: ...` line and an exit code: 2 for an `InputError`, 1 for any other `MACRLError`,
75 for `RunStopped` (a run that stopped on request, with the state to continue from). An exception of another type
is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

__all__ = ["InputError", "MACRLError", "OutputWriteError", "RunStopped", "first_line"]


class MACRLError(Exception):
    """A known failure while working on valid input: an image that cannot be decoded, a Hub that refuses a push, a
    conversion whose outputs disagree. Exit code 1."""


class InputError(MACRLError, ValueError):
    """What the caller asked for cannot be used: a bad flag, a missing model or data folder, a config that does not
    validate, a checkpoint of another run, an unavailable device. Exit code 2."""


class OutputWriteError(MACRLError):
    """Writing an output failed (a full disk, a quota, a read-only or vanished folder): the message names what was
    being written and where, what the error number means, and what is safe. Exit code 1.

    Attributes:
        resume_from: the complete checkpoint a run can continue from with `--resume`, untouched by the failed write
            (None: there is none yet, or the command has no checkpoints).
    """

    def __init__(self, message: str, resume_from: str | os.PathLike | None = None):
        super().__init__(message)
        self.resume_from = resume_from


class RunStopped(MACRLError):
    """A run stopped early because it was asked to (a stop signal: SIGTERM, SIGINT, SIGUSR1), after writing the
    checkpoint of the step it was in; the message names the signal, the step and the checkpoint. Exit code 75
    (`EX_TEMPFAIL`: try again later, which `--resume` does).

    Attributes:
        resume_from: the checkpoint written at the stop.
    """

    def __init__(self, message: str, resume_from: str | os.PathLike | None = None):
        super().__init__(message)
        self.resume_from = resume_from


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (the line that names the problem), or its class name when it has none.

    An error raised in a DataLoader worker reaches the main process re-raised with the worker's whole traceback as
    its message ("Caught X in DataLoader worker process 0.\nOriginal Traceback ..."); its first line is then the
    original message's, read from the traceback's last `module.X: message` line.
    """
    text = str(error).strip()
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        cls = type(error)
        prefixes = (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: ")
        for line in reversed(text.splitlines()):
            if line.startswith(prefixes):
                return line.split(": ", 1)[1]
    lines = text.splitlines()
    return lines[0] if lines else type(error).__name__
