"""The ``ImageSource`` protocol: the one interface every dataset wrapper offers.

Training and evaluation code only ever talks to an ``ImageSource``; whether the
pixels come from Fashion-MNIST IDX files, a folder of JPEGs or a Hugging Face
``datasets`` table is decided once, when the source is built.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from PIL import Image


@runtime_checkable
class ImageSource(Protocol):
    """A random-access collection of images, optionally labelled.

    Attributes:
        name: short human-readable identifier (used in logs and model cards).
        labels: one integer class index per image, or ``None`` when unlabelled.
        class_names: names for the class indices in ``labels``, or ``None``.
        image_size: ``(height, width)`` shared by every image, or ``None`` when sizes vary or are unknown before
            decoding (a known size lets pre-training augment whole batches at once).
    """

    name: str
    labels: list[int] | None
    class_names: list[str] | None
    image_size: tuple[int, int] | None

    def __len__(self) -> int:
        """Number of images."""
        ...

    def load_image(self, index: int) -> Image.Image:
        """Decode image ``index`` as a fully loaded PIL image in the source's mode."""
        ...

    def describe(self, index: int) -> str:
        """Where image ``index`` comes from (a path or id), for error messages."""
        ...
