"""A folder of image files as an ``ImageSource`` (``--data DIR``).

Also home of ``open_image``, which the Hugging Face source reuses; the mode conversion
itself (16-bit, palette + transparency, CMYK, ... to 8-bit ``"RGB"`` / ``"L"``) is the
image processor's ``convert_image_mode``, so training and inference see the same pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

from ..errors import MACRLError
from ..image_processing_macrl import convert_image_mode

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm",
)

# Everything PIL raises for an undecodable file: UnidentifiedImageError and
# "image file is truncated" are OSErrors, broken PNG chunks raise SyntaxError,
# some plugins raise ValueError / EOFError / struct.error (a ValueError-like).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombError,
)


class UnreadableImageError(MACRLError, ValueError):
    """An image cannot be decoded; the message names the file (or dataset row, or shard and key) and the cause."""


def open_image(path: str | Path, mode: str) -> Image.Image:
    """Fully decode the first frame of ``path`` in 8-bit ``mode``, EXIF rotation applied.

    PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) stays in force.

    Raises:
        UnreadableImageError: missing, corrupt, truncated, not an image, or over the
            decompression-bomb limit; the original exception is chained.
    """
    try:
        return decode_image(path, mode)
    except DECODE_ERRORS as e:
        raise UnreadableImageError(
            f"Cannot read image {path}: {type(e).__name__}: {e}"
        ) from e


def decode_image(file: str | Path | IO[bytes], mode: str) -> Image.Image:
    """`open_image` for a path or a binary file object, raising the decoder's own errors (`DECODE_ERRORS`)."""
    with Image.open(file) as image:
        # Image.open only warns between MAX_IMAGE_PIXELS and twice that, and load() then decodes the lot (a
        # small file can hold gigabytes of pixels): refuse from the limit on, before anything is decoded.
        _check_pixel_count(image)
        image.seek(0)  # animated GIF/WebP/TIFF: train on the first frame
        image.load()
        # Phone photos store rotation in EXIF; ignoring it trains on sideways images.
        # exif_transpose returns a copy, which stays valid after the file is closed.
        image = ImageOps.exif_transpose(image)
        return convert_image_mode(image, mode)


def _check_pixel_count(image: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    pixels = image.width * image.height
    if limit is not None and pixels > limit:
        raise Image.DecompressionBombError(
            f"Image size ({pixels} pixels) exceeds limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS), "
            "could be decompression bomb DOS attack."
        )
    if pixels == 0:  # some decoders accept a 0 x N header; the processor cannot resize such an image
        raise ValueError(f"image is {image.width}x{image.height} pixels")


def _scan_image_files(root: Path) -> list[Path]:
    """All image files under ``root`` (recursive), sorted by relative path.

    Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``...) are skipped.
    Sorting the relative POSIX paths makes the order, and so the indices and the
    seeded augmentations, the same on every machine.
    """
    found: list[Path] = []
    for directory, subdirectories, filenames in os.walk(root, followlinks=True):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
        for filename in filenames:
            if not filename.startswith(".") and filename.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(directory, filename))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class ImageFolderSource:
    """Every image file under ``root`` as an ``ImageSource``.

    Labels: if every image sits inside a first-level subfolder of ``root``
    (``root/cat/x.jpg``, ``root/dog/sub/y.png``), the subfolder names, sorted, are
    the classes; otherwise (any image directly in ``root``) ``labels`` is ``None``.

    Args:
        root: folder to scan recursively for ``IMAGE_EXTENSIONS`` (case-insensitive).
        mode: ``"RGB"`` or ``"L"``; every image is converted to it.
        skip_unreadable: if True, the constructor calls ``validate()``, which fully
            decodes every file once and drops the ones that fail (recorded in
            ``skipped``). If False, a bad file raises ``UnreadableImageError`` when
            it is loaded.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        ValueError: no image files under ``root`` (or none readable).
    """

    def __init__(
        self, root: str | Path, mode: str = "RGB", skip_unreadable: bool = False
    ) -> None:
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
        self.root = Path(root)
        self.mode = mode
        self.name = f"imagefolder:{self.root}"
        if not self.root.exists():
            raise FileNotFoundError(f"Image folder not found: {self.root}")
        if not self.root.is_dir():
            raise NotADirectoryError(f"Not a folder: {self.root}")

        self.paths: list[Path] = _scan_image_files(self.root)
        if not self.paths:
            raise ValueError(
                f"No image files found under {self.root} "
                f"(accepted extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )

        relative_parts = [p.relative_to(self.root).parts for p in self.paths]
        self.class_names: list[str] | None = None
        self.image_size: tuple[int, int] | None = None  # files may differ; known only after decoding each
        self.labels: list[int] | None = None
        if all(len(parts) >= 2 for parts in relative_parts):
            # Classes come from all scanned files, before validate() drops any, so
            # a corrupt file never shifts the class indices.
            self.class_names = sorted({parts[0] for parts in relative_parts})
            class_index = {name: i for i, name in enumerate(self.class_names)}
            self.labels = [class_index[parts[0]] for parts in relative_parts]

        self.skipped: list[tuple[str, str]] = []
        if skip_unreadable:
            self.validate()

    def validate(self) -> list[tuple[str, str]]:
        """Decode every file once; drop those that fail and record them in ``skipped``.

        A full decode (not ``Image.verify()``) is used because ``verify`` misses
        truncated JPEG data; it costs one pass over the folder.

        Returns:
            The ``(path, reason)`` pairs dropped by this call.

        Raises:
            ValueError: no readable image is left.
        """
        kept_paths: list[Path] = []
        kept_labels: list[int] = []
        newly_skipped: list[tuple[str, str]] = []
        for index, path in enumerate(self.paths):
            try:
                open_image(path, self.mode)
            except UnreadableImageError as e:
                newly_skipped.append((str(path), str(e.__cause__ or e)))
                continue
            kept_paths.append(path)
            if self.labels is not None:
                kept_labels.append(self.labels[index])
        if not kept_paths:
            raise ValueError(
                f"No readable images under {self.root}: all {len(self.paths)} files failed "
                f"to decode (first: {newly_skipped[0][0]}: {newly_skipped[0][1]})"
            )
        self.paths = kept_paths
        if self.labels is not None:
            self.labels = kept_labels
        self.skipped.extend(newly_skipped)
        return newly_skipped

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, index: int) -> Image.Image:
        return open_image(self.paths[index], self.mode)

    def describe(self, index: int) -> str:
        return str(self.paths[index])
