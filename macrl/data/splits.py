"""Subsets of an ``ImageSource``: the seeded held-out split and the seeded random limit.

There is one held-out split: ``macrl-pretrain`` holds out the images it evaluates its kNN on with it, and
``macrl-eval`` takes its test images from it when the data has no test split, so with the same seed and size both
hold out the same images and an encoder is never evaluated on images it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from macrl.data.sources import ImageSource

__all__ = ["HOLDOUT_FRACTION", "SubsetSource", "holdout_count", "holdout_split", "limit_source"]

# the fraction of a data set without a test split that is held out for evaluation
HOLDOUT_FRACTION = 0.1


class SubsetSource:
    """The images of ``source`` at ``indices``, in that order, as an ``ImageSource``."""

    def __init__(self, source: ImageSource, indices: Iterable[int], name: str):
        self.source = source
        self.indices = list(indices)
        self.name = name
        self.class_names = source.class_names
        self.image_size = source.image_size
        self.labels = None if source.labels is None else [source.labels[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load_image(self, index: int) -> Image.Image:
        return self.source.load_image(self.indices[index])

    def describe(self, index: int) -> str:
        return self.source.describe(self.indices[index])


def holdout_count(num_images: int, fraction: float = HOLDOUT_FRACTION, max_count: int | None = None) -> int:
    """How many of ``num_images`` images ``holdout_split`` holds out: ``round(fraction * num_images)``, at most
    ``max_count``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction!r}")
    count = round(fraction * num_images)
    return count if max_count is None else min(count, max_count)


def holdout_split(
    source: ImageSource, fraction: float = HOLDOUT_FRACTION, seed: int = 0, max_count: int | None = None
) -> tuple[SubsetSource, SubsetSource]:
    """``(rest, held_out)``: ``holdout_count`` images of ``source``, drawn by ``numpy.random.default_rng(seed)``,
    each part in source order.

    Raises:
        ValueError: the fraction is outside (0, 1), or leaves no image on one side.
    """
    count = holdout_count(len(source), fraction, max_count)
    if count < 1 or count >= len(source):
        raise ValueError(
            f"{source.name} has {len(source)} images: holding out {fraction:g} of them leaves {count} held-out and "
            f"{len(source) - count} training images; both must be >= 1"
        )
    order = np.random.default_rng(seed).permutation(len(source))
    held_out, rest = sorted(order[:count].tolist()), sorted(order[count:].tolist())
    return (
        SubsetSource(source, rest, f"{source.name}/train"),
        SubsetSource(source, held_out, f"{source.name}/held-out"),
    )


def limit_source(source: ImageSource, limit: int | None, seed: int) -> ImageSource:
    """A seeded random ``limit`` images of ``source`` (in source order), or ``source`` if it has no more.

    Random rather than the first ``limit``: an image folder is sorted by class, so its first images are one class.
    """
    if limit is None or limit >= len(source):
        return source
    keep = sorted(np.random.default_rng(seed).permutation(len(source))[:limit].tolist())
    return SubsetSource(source, keep, source.name)
