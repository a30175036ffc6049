"""A failed write, said plainly: what the error number of a full disk (or a quota, a read-only folder...) means, read
from whichever writer failed, and `writing(...)`, which turns such a failure into one `OutputWriteError`.

The writers an output goes through do not all raise `OSError`: safetensors raises `SafetensorError` ("I/O error: No
space left on device (os error 28)") and `torch.save` a `RuntimeError` of its zip writer ("unexpected pos 576 vs
534", without the error number). `write_failure` reads the number where the writer gives it and, for torch's writer,
infers a full disk from the free space left where it wrote.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import OutputWriteError

__all__ = ["FULL_DISK_BYTES", "error_meaning", "write_failure", "writing"]

# torch's zip writer gives no error number: a write that failed with less than this free where it wrote is taken for a
# full disk (a failing write is at most a tensor or a buffer of one, so what it left free is below that)
FULL_DISK_BYTES = 64 * 2**20
_OS_ERROR = re.compile(r"os error (\d+)")
_TORCH_WRITER = ("PytorchStreamWriter", "unexpected pos", "file write failed")


def error_meaning(number: int) -> str:
    """`os.strerror` with the symbolic name: "No space left on device (ENOSPC)"."""
    name = errno.errorcode.get(number)
    return f"{os.strerror(number)} ({name})" if name else os.strerror(number)


def write_failure(error: BaseException, where: str | os.PathLike) -> str | None:
    """What went wrong when `error` was raised writing to `where` ("No space left on device (ENOSPC)"), or None when
    `error` is not a failed write (a bug, a failure to read: let it through)."""
    if isinstance(error, OSError):
        return error_meaning(error.errno) if error.errno else (str(error) or type(error).__name__)
    text = str(error)
    if isinstance(error, SafetensorError) and ("serializ" in text or "I/O error" in text):
        found = _OS_ERROR.search(text)
        return error_meaning(int(found.group(1))) if found else f"safetensors: {text.splitlines()[0]}"
    if isinstance(error, RuntimeError) and any(marker in text for marker in _TORCH_WRITER):
        free = _free_bytes(Path(where))
        if free is not None and free < FULL_DISK_BYTES:
            return f"{error_meaning(errno.ENOSPC)}, {free} bytes free"
        return f"torch could not write it ({text.splitlines()[0]})"
    return None


def _free_bytes(path: Path) -> int | None:
    """The bytes an unprivileged writer may still use on `path`'s filesystem (its nearest existing folder's)."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


@contextmanager
def writing(what: str, where: str | os.PathLike, safe: str = "",
            resume_from: str | os.PathLike | None = None) -> Iterator[None]:
    """Raise a failed write inside the block as `OutputWriteError`: "could not write {what} to {where}: No space
    left on device (ENOSPC); {safe}", with `resume_from` (the checkpoint a run continues from) for the command to
    name; any other error goes through unchanged.

    Args:
        what: what was being written ("the encoder", "checkpoint-40").
        where: the file or folder it was written to.
        safe: what the failure left safe, for the message ("checkpoint-30 ... is complete and untouched").
        resume_from: the checkpoint to continue from, if any.
    """
    try:
        yield
    except OutputWriteError:
        raise
    except Exception as error:
        failure = write_failure(error, where)
        if failure is None:
            raise
        raise OutputWriteError(
            f"could not write {what} to {where}: {failure}" + (f"; {safe}" if safe else ""), resume_from=resume_from
        ) from error
