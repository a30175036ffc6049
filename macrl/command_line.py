"""The contract every macrl command keeps (`macrl-pretrain`, `macrl-extract`, `macrl-eval`, `macrl-visualize`,
`macrl-convert`).

Exit codes: 0 done; 1 a known failure while working (`MACRLError`: an unreadable image, a refused Hub push, a
conversion whose outputs disagree, a failed write such as a full disk: `OutputWriteError`); 2 a usage problem
(`InputError`: a bad flag, a missing model or data folder, a config that does not validate, an unavailable device);
75 stopped on request (`RunStopped`: `macrl-pretrain` got a stop signal, finished its step and wrote its checkpoint;
sysexits' EX_TEMPFAIL, "try again later", which `--resume` does); 130 interrupted. Every known error is one line on
stderr, `macrl-NAME: error: <the first line of its message>`, never a traceback (an error raised in a DataLoader
worker included), and a stop is one line `macrl-NAME: stopped by SIGTERM after step N; ...`; where the error leaves a
checkpoint to continue from (`resume_from`), the line ends with the command that continues it. Warnings logged by
the library (the `macrl` logger) appear as `macrl-NAME: warning: ...`. Anything else is a bug and keeps its
traceback. Library code raises and logs; only this module prints errors and exits.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from .data import UnreadableImageError
from .errors import InputError, MACRLError, RunStopped, first_line

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_STATUS_HELP",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "OneLineErrorParser",
    "OneLineErrors",
    "UsageError",
    "about",
    "add_encoder_flags",
    "command_logging",
    "int_at_least",
    "positive_float",
    "progress_bars",
    "run_command",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 75, 130
EXIT_STATUS_HELP = (
    "Exit status: 0 done, 1 a failure while working (an image that cannot be decoded, see --skip-unreadable; a "
    "refused Hub push), 2 a usage error, 130 interrupted."
)


class UsageError(InputError):
    """A flag's value cannot be used; raised by the commands' parsers and checks."""


class OneLineErrors:
    """An argparse parser mixin: a usage error raises `UsageError` (one line, exit 2 through `run_command`) instead
    of printing the usage and exiting. Mix it in before `argparse.ArgumentParser` or `HfArgumentParser`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


class OneLineErrorParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` with `OneLineErrors`."""


def add_encoder_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that runs a released encoder: `--model`, `--revision`, `--device`,
    `--no-progress`."""
    from .devices import DEVICE_CHOICES

    add = parser.add_argument
    add("--model", required=True, help="local folder or Hub id of a MACRL encoder (required)")
    add("--revision", default=None, help="Hub branch, tag or commit of --model (default: the default branch)")
    add("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda, else mps, else cpu (default: auto)")
    add("--no-progress", action="store_true", help="hide the progress bars (default: shown on a terminal only)")


@contextmanager
def about(flag: str | None) -> Iterator[None]:
    """Name `flag` in front of an `InputError` raised inside the block (`--data folder: not found`); `None` leaves
    the message as it is."""
    try:
        yield
    except UsageError:
        raise
    except InputError as error:
        raise UsageError(first_line(error) if flag is None else f"{flag} {first_line(error)}") from error


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' own bars ("Loading weights") on or off, restoring the previous state.

    They write to stderr even when it is not a terminal, which would bury a one-line error in logs; the previous
    state is restored because a command's `main` may run inside another program.
    """
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (transformers_logging.enable_progress_bar if was_enabled else transformers_logging.disable_progress_bar)()


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


class _CommandFormatter(logging.Formatter):
    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{self.prog}: {record.levelname.lower()}: {message}"
        return message


@contextmanager
def command_logging(prog: str) -> Iterator[None]:
    """Show the `macrl` logger's records on stderr for the duration of a command: warnings as
    `prog: warning: ...`, info lines as they are (what the run is doing)."""
    logger = logging.getLogger("macrl")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CommandFormatter(prog))
    previous_level, previous_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one copy of each line, whatever the caller's root logger does
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        logger.propagate = previous_propagate


def _close_progress_bars() -> None:
    """A bar cut short by an error leaves the cursor mid-line: close the bars still open (tqdm's own registry of
    them), so the error starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_command(
    prog: str,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], object],
    argv: Sequence[str] | None,
    interrupted: str = "interrupted",
    parse: Callable[[argparse.ArgumentParser, Sequence[str] | None], object] | None = None,
    resume: str | None = None,
) -> int:
    """Parse `argv` with `parser` (or `parse(parser, argv)`), call `run` on the result, and turn the errors into an
    exit code and one line (module docstring); `resume` is the command line that continues the work from an error's
    `resume_from` checkpoint."""

    def fail(message: str, code: int, error: BaseException | None = None) -> int:
        _close_progress_bars()
        if resume is not None and getattr(error, "resume_from", None) is not None:
            message += f"; continue with: {resume}"
        # one write, newline included: stderr is unbuffered, and print() writes the line and its newline apart, so
        # the lines of processes stopping together (torchrun) could run into each other
        sys.stderr.write(f"{prog}: {message}\n")
        return code

    with command_logging(prog):
        try:
            args = parse(parser, argv) if parse is not None else parser.parse_args(argv)
        except SystemExit as exit_:  # --help, or a parser's own usage error (already printed)
            return int(exit_.code or 0)
        except InputError as error:  # a flag type's own check
            return fail(f"error: {first_line(error)}", EXIT_USAGE)
        try:
            run(args)
        except InputError as error:
            return fail(f"error: {first_line(error)}", EXIT_USAGE)
        except UnreadableImageError as error:
            return fail(f"error: {first_line(error)} (pass --skip-unreadable to skip such files)", EXIT_FAILED)
        except RunStopped as stopped:
            return fail(first_line(stopped), EXIT_STOPPED, stopped)
        except MACRLError as error:
            return fail(f"error: {first_line(error)}", EXIT_FAILED, error)
        except KeyboardInterrupt:
            return fail(interrupted, EXIT_INTERRUPTED)
    return EXIT_OK
