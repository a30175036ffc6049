"""The two families of errors that macrl's library raises for problems a caller can fix.

Library code raises these (or their subclasses, defined beside the code that raises them) with a message that names
the problem in its first line; it never prints and never exits. The commands (`macrl.command_line.run_command`) turn
them into one `macrl-NAME: error: ...` line and an exit code: 2 for an `InputError`, 1 for any other `MACRLError`.
An exception of another type is a bug and keeps its traceback.
"""

__all__ = ["InputError", "MACRLError", "first_line"]


class MACRLError(Exception):
    """A known failure while working on valid input: an image that cannot be decoded, a Hub that refuses a push, a
    conversion whose outputs disagree. Exit code 1."""


class InputError(MACRLError, ValueError):
    """What the caller asked for cannot be used: a bad flag, a missing model or data folder, a config that does not
    validate, a checkpoint of another run, an unavailable device. Exit code 2."""


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
