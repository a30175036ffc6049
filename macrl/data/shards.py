"""WebDataset tar shards as a stream of images (``--data 'shards/train-{000000..000999}.tar'``).

A shard is a tar file whose members are grouped into samples by their name up to the first dot of the file name
(``n01440764_10026.jpg`` + ``n01440764_10026.cls``): the image under one of the usual extensions, the label under
``cls`` when present. The ``webdataset`` package opens the shards (``webdataset.gopen``: local paths, ``file:``,
``pipe:`` commands, ``http(s)://`` through curl, ...) and groups a tar's members into samples
(``webdataset.tariterators``); which shard is read by which process and worker, in what order, and from where after
a resume is `StreamingTwoViewDataset`'s.

``webdataset`` and ``braceexpand`` are imported only when shards are opened (``pip install 'macrl[shards]'``).
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PIL import Image

from ..errors import MACRLError
from .image_folder import DECODE_ERRORS, IMAGE_EXTENSIONS, UnreadableImageError, decode_image

__all__ = [
    "SHARD_IMAGE_EXTENSIONS",
    "StreamSample",
    "UnreadableShardError",
    "WebDatasetShards",
    "expand_shards",
    "looks_like_shards",
]

logger = logging.getLogger(__name__)

# the image's extension in a sample, in the order they are looked for
SHARD_IMAGE_EXTENSIONS: tuple[str, ...] = tuple(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


class UnreadableShardError(MACRLError, ValueError):
    """A shard cannot be read to its end (truncated, not a tar, a failed ``pipe:`` command); the message names the
    shard and the last sample read from it."""


def looks_like_shards(data: str) -> bool:
    """Whether ``--data`` names WebDataset shards: a brace pattern, a ``pipe:`` command, or a ``.tar`` path/URL."""
    if data.startswith("pipe:") or _BRACES.search(data):
        return True
    return urlparse(data).path.lower().endswith(_TAR_SUFFIXES) or data.lower().endswith(_TAR_SUFFIXES)


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme == "" or scheme == "file" or (len(scheme) == 1 and os.name == "nt")


def _local_path(url: str) -> Path:
    return Path(urlparse(url).path if url.startswith("file:") else url).expanduser()


def expand_shards(pattern: str) -> list[str]:
    """The shards ``pattern`` names, in its order: brace patterns expanded (``train-{000..009}.tar``, ``{a,b}``).

    Raises:
        FileNotFoundError: a local shard does not exist (the first missing one is named).
        ValueError: the pattern names no shard.
    """
    from braceexpand import braceexpand

    shards = list(braceexpand(pattern))
    if not shards:
        raise ValueError("the pattern names no shard")
    missing = [shard for shard in shards if _is_local(shard) and not _local_path(shard).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(shards)})" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")
    return shards


def shard_label(url: str) -> str:
    """A shard's name as image keys use it: its file name (``train-000123.tar``), the same wherever it is stored."""
    if url.startswith("pipe:"):
        words = [word for word in url[5:].split() if word.lower().rstrip("'\"").endswith(_TAR_SUFFIXES)]
        url = words[-1].strip("'\"") if words else url
    return Path(urlparse(url).path).name or url


@dataclass
class StreamSample:
    """One sample of a stream, not decoded yet: ``key`` is unique in the data (``"<shard file>/<__key__>"``)."""

    key: str
    shard: str
    data: Any  # the encoded image (bytes), or a decoded PIL image (streaming datasets)
    label: int | None

    def decode(self, mode: str) -> Image.Image:
        """The image in ``mode``. Raises `UnreadableImageError` naming the shard and key."""
        try:
            if isinstance(self.data, Image.Image):
                from ..image_processing_macrl import convert_image_mode

                self.data.load()
                return convert_image_mode(self.data, mode)
            if self.data is None:
                raise ValueError(f"no image (none of the extensions {', '.join(SHARD_IMAGE_EXTENSIONS)})")
            return decode_image(io.BytesIO(self.data), mode)
        except (*DECODE_ERRORS, TypeError) as error:
            raise UnreadableImageError(
                f"Cannot read image {self.key} of shard {self.shard}: {type(error).__name__}: {error}"
            ) from error


class WebDatasetShards:
    """A list of WebDataset tar shards, read one shard at a time.

    Args:
        pattern: the shards, as `expand_shards` takes them.
        mode: ``"RGB"`` or ``"L"``.

    Attributes:
        name: the pattern, for logs and model cards.
        shards: the shard URLs, in the pattern's order.
        image_size: None (the images may differ in size).
    """

    def __init__(self, pattern: str, mode: str = "RGB") -> None:
        try:
            import webdataset  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "the `webdataset` package reads tar shards; install it with: pip install 'macrl[shards]'"
            ) from error
        self.name = pattern
        self.mode = mode
        self.shards: list[str] = expand_shards(pattern)
        self.image_size: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"WebDatasetShards({self.name!r}, {len(self.shards)} shards)"

    def count_images(self, tolerate: bool = False) -> int | None:
        """The number of samples in all shards, from the tar headers of local shards (no image data is read);
        None when a shard is not a local file. A truncated shard raises `UnreadableShardError`, or with
        ``tolerate`` counts the samples before the damage."""
        if not all(_is_local(shard) and not shard.endswith((".gz", ".tgz")) for shard in self.shards):
            return None
        from webdataset.tariterators import base_plus_ext

        total = 0
        for shard in self.shards:
            keys = set()
            try:
                with tarfile.open(_local_path(shard), mode="r:") as tar:
                    for member in tar:  # seeks over the data of a local file
                        key, _ = base_plus_ext(member.name)
                        if member.isreg() and key is not None and not member.name.startswith("__"):
                            keys.add(key)
            except (tarfile.TarError, OSError, EOFError) as error:
                if not tolerate:
                    raise UnreadableShardError(f"shard {shard} is truncated or not a tar file ({error})") from error
            total += len(keys)
        return total

    def samples(self, shard_index: int, skip: int = 0) -> Iterator[StreamSample]:
        """The samples of shard ``shard_index`` after its first ``skip`` (which are read but not decoded).

        Raises:
            UnreadableShardError: the shard cannot be opened or ends before its end-of-archive (truncated); the
                message names it and the last sample read.
        """
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        url = self.shards[shard_index]
        label = shard_label(url)
        last = None
        try:
            stream = gopen(url)
        except (OSError, ValueError) as error:
            raise UnreadableShardError(f"cannot open shard {url}: {error}") from error
        try:
            files = ({**item, "__url__": url} for item in tar_file_iterator(stream))
            for index, sample in enumerate(group_by_keys(files)):
                last = sample["__key__"]
                if index < skip:
                    continue
                image = next((sample[ext] for ext in SHARD_IMAGE_EXTENSIONS if ext in sample), None)
                yield StreamSample(f"{label}/{last}", url, image, _label(sample.get("cls")))
            stream.close()  # a pipe: command's exit status is checked here
        except (tarfile.TarError, OSError, EOFError, ValueError) as error:
            where = f"after sample {last}" if last is not None else "before its first sample"
            raise UnreadableShardError(f"shard {url} {_problem(stream, error)}, {where}") from error
        finally:
            # a second close after an error is a no-op; a reader that stops early closes a pipe: command's output,
            # whose exit by SIGPIPE is no failure of the shard
            try:
                stream.close()
            except OSError:
                pass


def _problem(stream, error: BaseException) -> str:
    """What went wrong with a shard: its ``pipe:`` command's failure (webdataset's own message is the repr of the
    Popen arguments), else a damaged tar."""
    process = getattr(stream, "proc", None)  # webdataset.gopen.Pipe
    if process is not None:
        try:  # a failed read may come just before the command's exit
            status = process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            status = None
        if status:
            return f"could not be read: its command failed (exit status {status})"
    message = str(error.args[0]) if error.args else type(error).__name__
    return f"is truncated or not a tar file ({message.split(' @ ')[0]})"


def _label(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None
