"""The command line of `macrl-extract` and `macrl-eval`: one error contract, one line on stderr and an exit code,
never a traceback, and the flag types they share.

0 done; 1 an unreadable image (with the hint to skip such files); 2 a usage problem (bad flag, missing model or
data); 130 interrupted. A message is cut to its first line, so a library's long explanation stays one line.
"""

import argparse
import math
import sys
from collections.abc import Callable, Sequence

from .data import UnreadableImageError


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message, or its class name when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors raise `error_type` (one line, exit 2 through `run_command`) instead of printing
    the usage and exiting."""

    def __init__(self, *args, error_type: type[Exception], **kwargs):
        super().__init__(*args, **kwargs)
        self.error_type = error_type

    def error(self, message: str) -> None:  # type: ignore[override]
        raise self.error_type(f"{message} (see --help)")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A flag type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """A flag type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def run_command(
    prog: str,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], object],
    argv: Sequence[str] | None,
    usage_errors: tuple[type[Exception], ...],
    interrupted: str = "interrupted",
) -> int:
    """Parse `argv` with `parser`, call `run` on the flags, and turn the errors into an exit code (module docstring)."""

    def fail(message: str, code: int) -> int:
        print(f"{prog}: {message}", file=sys.stderr)
        return code

    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or argparse's own usage error (already printed)
        return int(exit_.code or 0)
    except usage_errors as error:  # a flag type's own check
        return fail(f"error: {first_line(error)}", 2)
    try:
        run(args)
    except usage_errors as error:
        return fail(f"error: {first_line(error)}", 2)
    except UnreadableImageError as error:
        return fail(f"error: {first_line(error)} (pass --skip-unreadable to skip such files)", 1)
    except KeyboardInterrupt:
        return fail(interrupted, 130)
    return 0
