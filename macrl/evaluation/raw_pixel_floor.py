"""The raw-pixel floor: the probes of an encoder's evaluation run on the images' own pixels, the figure an encoder
has to beat to be worth more than the data it saw; kept on disk, since it is a deterministic figure of the images."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..atomic_files import atomic_path
from ..data import ImageSource
from .frozen_features import RAW_PIXELS_MAX_VALUES, evaluate_raw_pixels

__all__ = ["floor_applies", "raw_pixel_floor", "raw_pixel_floor_cache"]

logger = logging.getLogger(__name__)


def floor_applies(memory: ImageSource, queries: ImageSource, channels: int) -> bool:
    """Whether both sides of the floor look like images of one size of at most `RAW_PIXELS_MAX_VALUES` values, by
    their `image_size`, else (a folder or dataset, decoded image by image) their first image's: the floor compares
    pixel vectors, so the kNN memory and the queries must share it (`evaluate_raw_pixels` checks every image)."""
    sizes = {source.image_size or source.load_image(0).size[::-1] for source in (memory, queries)}
    if len(sizes) != 1:
        return False
    height, width = sizes.pop()
    return height * width * channels <= RAW_PIXELS_MAX_VALUES


def raw_pixel_floor_cache() -> Path:
    """Where floors are kept: `$XDG_CACHE_HOME/macrl/raw-pixel-floor`, else `~/.cache/macrl/raw-pixel-floor`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "macrl" / "raw-pixel-floor"


def _fingerprint(
    train: ImageSource, test: ImageSource, linear_probe: bool, seed: int, label_fractions: tuple[float, ...]
) -> str:
    """The same images in the same order with the same labels, seed and probes give the same floor."""
    digest = hashlib.sha256()
    for source in (train, test):
        digest.update(json.dumps([source.name, len(source), source.labels]).encode())
        for index in {0, len(source) // 2, len(source) - 1}:
            digest.update(source.load_image(index).tobytes())
    digest.update(json.dumps([linear_probe, seed, list(label_fractions)]).encode())
    return digest.hexdigest()[:32]


def raw_pixel_floor(
    train: ImageSource, test: ImageSource, *, linear_probe: bool, seed: int, label_fractions: tuple[float, ...] = ()
) -> dict:
    """`evaluate_raw_pixels` of the two sources, kept in `~/.cache/macrl/raw-pixel-floor/` (`XDG_CACHE_HOME`): a
    deterministic figure that takes about a minute for Fashion-MNIST, so every later run on the same images reuses
    it."""
    path = raw_pixel_floor_cache() / f"{_fingerprint(train, test, linear_probe, seed, tuple(label_fractions))}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    logger.info("the raw-pixel floor of these images: kNN%s on their pixels (once; cached in %s)",
                " and linear probe" if linear_probe else "", path.parent)
    floor = evaluate_raw_pixels(train, test, linear_probe=linear_probe, seed=seed, label_fractions=label_fractions)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps(floor))
    except OSError as error:  # a read-only home keeps the figure for this run only
        logger.warning("could not keep the raw-pixel floor in %s: %s", path.parent, error)
    return floor
