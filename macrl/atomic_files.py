"""Files replaced whole: a reader (or a run killed half-way through the write) sees the old file or the complete new
one, never a partial write."""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path next to `target`; on success `os.replace` it onto `target`.

    Same folder, so the replace is a rename on one filesystem. The temp file is removed on any failure.
    """
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    temp_path = Path(temp_name)
    try:
        yield temp_path
        os.replace(temp_path, target)
    finally:
        temp_path.unlink(missing_ok=True)
