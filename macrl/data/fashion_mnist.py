"""Fashion-MNIST read straight from the IDX files Debian's ``dataset-fashion-mnist`` ships.

Nothing is downloaded and nothing is cached on disk: the four gzip'd IDX files are
parsed with ``gzip`` + ``numpy`` into memory (about 55 MB for the train split).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from macrl.errors import InputError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

# Per-pixel statistics of the train split after scaling to [0, 1]; use them as
# AugmentationConfig(mean=..., std=...) for 1-channel Fashion-MNIST training.
FASHION_MNIST_MEAN: tuple[float] = (0.2860,)
FASHION_MNIST_STD: tuple[float] = (0.3530,)

# split -> (images file stem, labels file stem), as named upstream.
_SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX magic numbers: 0x0000 0803 = unsigned bytes, 3 dims; 0x0000 0801 = unsigned bytes, 1 dim.
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049

_INSTALL_HINT = (
    "Install it with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), "
    "or pass `--data DIR` (a folder of images) to train on your own images."
)


class FashionMNISTNotFoundError(InputError, FileNotFoundError):
    """A Fashion-MNIST IDX file is missing; the message says how to get it."""


def _find_idx_file(root: Path, stem: str) -> Path:
    """Return ``root/stem.gz`` or, failing that, the uncompressed ``root/stem``.

    Accepting the uncompressed name too lets ``root`` point at torchvision's
    ``FashionMNIST/raw`` folder as well as at the Debian one.
    """
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FashionMNISTNotFoundError(
        f"Fashion-MNIST file not found: {root / (stem + '.gz')}. {_INSTALL_HINT}"
    )


def _read_idx(path: Path, expected_magic: int, expected_ndim: int) -> np.ndarray:
    """Parse one IDX file (optionally gzip'd) into a uint8 array, checking its header."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; truncated gzip is EOFError
        raise ValueError(f"Corrupt Fashion-MNIST file {path}: cannot decompress ({e})") from e

    header_size = 4 + 4 * expected_ndim
    if len(data) < header_size:
        raise ValueError(
            f"Corrupt Fashion-MNIST file {path}: {len(data)} bytes, "
            f"shorter than the {header_size}-byte IDX header"
        )
    magic = int.from_bytes(data[0:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"Corrupt Fashion-MNIST file {path}: IDX magic number {magic}, "
            f"expected {expected_magic}"
        )
    dims = tuple(
        int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(expected_ndim)
    )
    expected_size = header_size + int(np.prod(dims))
    if len(data) != expected_size:
        raise ValueError(
            f"Corrupt Fashion-MNIST file {path}: header says dims {dims} "
            f"({expected_size} bytes) but the file has {len(data)} bytes"
        )
    # .copy(): frombuffer over bytes is read-only, and torch wants writable memory.
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims).copy()


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000 images).
        root: folder holding the IDX files; defaults to ``FASHION_MNIST_DIR``.

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` and int64 ``[N]`` in ``[0, 10)``.

    Raises:
        ValueError: unknown split, or a corrupt / truncated / inconsistent file.
        FashionMNISTNotFoundError: a file is missing.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(
            f"Unknown Fashion-MNIST split {split!r}; valid splits: {sorted(_SPLIT_FILES)}"
        )
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    images_stem, labels_stem = _SPLIT_FILES[split]
    images_path = _find_idx_file(root, images_stem)
    labels_path = _find_idx_file(root, labels_stem)

    images = _read_idx(images_path, _IMAGES_MAGIC, expected_ndim=3)
    labels = _read_idx(labels_path, _LABELS_MAGIC, expected_ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(
            f"Corrupt Fashion-MNIST file {images_path}: images are "
            f"{images.shape[1]}x{images.shape[2]}, expected 28x28"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST files disagree: {images_path} has {len(images)} images "
            f"but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"Corrupt Fashion-MNIST file {labels_path}: label {int(labels.max())} "
            f"is outside [0, {len(FASHION_MNIST_CLASSES)})"
        )
    return torch.from_numpy(images), torch.from_numpy(labels).to(torch.int64)


class FashionMNISTSource:
    """Fashion-MNIST as an ``ImageSource`` (28x28 PIL images, mode ``"L"`` by default).

    Args:
        split: ``"train"`` or ``"test"``.
        root: folder holding the IDX files; defaults to ``FASHION_MNIST_DIR``.
        mode: PIL mode of the returned images; ``"RGB"`` replicates the grey
            channel for models built for 3-channel input.
    """

    def __init__(
        self, split: str = "train", root: str | Path | None = None, mode: str = "L"
    ) -> None:
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
        self._images, labels = load_fashion_mnist(split, root)
        self.split = split
        self.mode = mode
        self.name = f"fashion-mnist/{split}"
        self.labels: list[int] | None = labels.tolist()
        self.class_names: list[str] | None = list(FASHION_MNIST_CLASSES)
        self.image_size: tuple[int, int] | None = tuple(self._images.shape[1:])

    def __len__(self) -> int:
        return len(self._images)

    def load_image(self, index: int) -> Image.Image:
        image = Image.fromarray(self._images[index].numpy())  # 2-D uint8 -> mode "L"
        return image if self.mode == "L" else image.convert(self.mode)

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"
