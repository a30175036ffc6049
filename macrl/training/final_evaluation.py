"""What a pre-training run reports of its encoder at the end: kNN and linear probe on the evaluation images, beside
the raw-pixel floor of the same images (what the encoder has to beat to be worth more than the data it saw)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..atomic_files import atomic_path
from ..data import ImageSource
from ..evaluation.frozen_features import RAW_PIXELS_MAX_VALUES, evaluate_encoder, evaluate_raw_pixels
from ..evaluation.labels import EvaluationDataError
from ..image_processing_macrl import MACRLImageProcessor
from .data import PretrainingData

__all__ = ["final_evaluation", "raw_pixel_floor", "raw_pixel_floor_cache_dir"]

logger = logging.getLogger(__name__)


def final_evaluation(
    encoder, processor: MACRLImageProcessor, data: PretrainingData, device: torch.device, *,
    linear_probe: bool, floor: bool, seed: int, num_workers: int = 0, skip_unreadable: bool = False,
) -> dict | None:
    """Weighted kNN (k=20, T=0.07) and, with `linear_probe`, the linear probe of `macrl-eval` on the config's pooled
    features (`data.labelled_evaluation()`: the kNN memory / probe training set, and the queries / test set), and with
    `floor` the same on raw pixels (`raw_pixel_floor`) where the images are small enough; None without labelled
    images on both sides. Accuracies in percent. The images are read by `num_workers` DataLoader workers (the run's:
    the kNN memory can be a whole training set to decode); with `skip_unreadable` an undecodable one is skipped and
    counted (`eval_skipped_unreadable`), as in training, and there is no floor.

    Raises:
        UnreadableImageError: an image cannot be decoded, without `skip_unreadable`."""
    sources = data.labelled_evaluation()
    if sources is None:
        return None
    memory, queries = sources
    pooling = encoder.config.pooling
    results = evaluate_encoder(
        encoder, processor, memory, queries,
        linear_probe=linear_probe, pools=(pooling,), batch_size=256, device=device, seed=seed,
        num_workers=num_workers, skip_unreadable=skip_unreadable,
    )
    evaluation = {
        "knn_accuracy": round(results[f"knn_accuracy_{pooling}"], 2),
        "knn_train_images": results["train_images"],
        "knn_test_images": results["test_images"],
    }
    if linear_probe:
        evaluation["linear_probe_accuracy"] = round(results[f"linear_probe_accuracy_{pooling}"], 2)
    if results["skipped_images"]:
        evaluation["eval_skipped_unreadable"] = results["skipped_images"]
        floor = False  # the pixels of the two sides would not be the images the encoder was evaluated on
    channels = 1 if data.augmentation.num_channels == 1 else 3
    if floor and _small_enough(memory, queries, channels):
        try:
            pixels = raw_pixel_floor(memory, queries, linear_probe=linear_probe, seed=seed)
        except EvaluationDataError as error:  # images of several sizes: no pixel vectors to compare
            logger.info("no raw-pixel floor: %s", error)
        else:
            evaluation["raw_pixels_knn_accuracy"] = round(pixels["knn_accuracy_pixels"], 2)
            if linear_probe:
                evaluation["raw_pixels_linear_probe_accuracy"] = round(pixels["linear_probe_accuracy_pixels"], 2)
    return evaluation


def _small_enough(memory: ImageSource, queries: ImageSource, channels: int) -> bool:
    """Whether both sides of the floor look like images of one size of at most `RAW_PIXELS_MAX_VALUES` values, by
    their `image_size`, else (a folder or dataset, decoded image by image) their first image's: the floor compares
    pixel vectors, so the kNN memory and the queries must share it (`evaluate_raw_pixels` checks every image)."""
    sizes = {source.image_size or source.load_image(0).size[::-1] for source in (memory, queries)}
    if len(sizes) != 1:
        return False
    height, width = sizes.pop()
    return height * width * channels <= RAW_PIXELS_MAX_VALUES


def raw_pixel_floor_cache_dir() -> Path:
    """Where `raw_pixel_floor` keeps its figures: `~/.cache/macrl/raw-pixel-floor` (`XDG_CACHE_HOME`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "macrl" / "raw-pixel-floor"


def _fingerprint(train: ImageSource, test: ImageSource, linear_probe: bool, seed: int) -> str:
    """The same images in the same order with the same labels and seed give the same floor."""
    digest = hashlib.sha256()
    for source in (train, test):
        digest.update(json.dumps([source.name, len(source), source.labels]).encode())
        for index in {0, len(source) // 2, len(source) - 1}:
            digest.update(source.load_image(index).tobytes())
    digest.update(json.dumps([linear_probe, seed]).encode())
    return digest.hexdigest()[:32]


def raw_pixel_floor(train: ImageSource, test: ImageSource, *, linear_probe: bool, seed: int) -> dict:
    """`evaluate_raw_pixels` of the two sources, kept in `~/.cache/macrl/raw-pixel-floor/` (`XDG_CACHE_HOME`): a
    deterministic figure that takes about a minute for Fashion-MNIST, so every later run on the same images reuses
    it."""
    path = raw_pixel_floor_cache_dir() / f"{_fingerprint(train, test, linear_probe, seed)}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    logger.info("the raw-pixel floor of these images: kNN%s on their pixels (once; cached in %s)",
                " and linear probe" if linear_probe else "", path.parent)
    floor = evaluate_raw_pixels(train, test, linear_probe=linear_probe, seed=seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps(floor))
    except OSError as error:  # a read-only home keeps the figure for this run only
        logger.warning("could not keep the raw-pixel floor in %s: %s", path.parent, error)
    return floor
