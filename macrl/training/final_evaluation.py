"""What a pre-training run reports of its encoder at the end: kNN and linear probe on the evaluation images, with all
the training labels and with 1% and 10% of them, and DINOv2's linear protocol, each beside the same probe on the raw
pixels of the same images (the floor the encoder has to beat to be worth more than the data it saw)."""

from __future__ import annotations

import logging

import torch

from ..data import limit_source
from ..evaluation.frozen_features import DINOV2, evaluate_encoder
from ..evaluation.label_subsets import fraction_name
from ..evaluation.labels import EvaluationDataError
from ..evaluation.raw_pixel_floor import floor_applies, raw_pixel_floor
from ..image_processing_macrl import MACRLImageProcessor
from .data import PretrainingData

__all__ = ["final_evaluation"]

logger = logging.getLogger(__name__)


def final_evaluation(
    encoder, processor: MACRLImageProcessor, data: PretrainingData, device: torch.device, *,
    linear_probe: bool, floor: bool, seed: int, num_workers: int = 0, skip_unreadable: bool = False,
    label_fractions: tuple[float, ...] = (), dinov2_linear: bool = False, memory_images: int | None = None,
) -> dict | None:
    """Weighted kNN (k=20, T=0.07) and, with `linear_probe`, the linear probe of `macrl-eval` on the config's pooled
    features (`data.labelled_evaluation()`: the kNN memory / probe training set, and the queries / test set), also
    with `label_fractions` of the training labels (`knn_accuracy_1pct`, ...) and, with `dinov2_linear`, DINOv2's
    linear protocol (`linear_probe_accuracy_dinov2`), and with `floor` the same on raw pixels (`raw_pixel_floor`,
    `raw_pixels_` keys; DINOv2's protocol on pixels is the plain linear probe) where the images are small enough; None
    without labelled images on both sides. Accuracies in percent, the keys `macrl-eval` reports for the pooling
    without its `_<pool>` part. The kNN memory / probe training set is at most `memory_images` of the training
    images (a seeded subset, `macrl-eval --limit-train`'s; None: all of them): `knn_train_images` says how many, and
    `knn_train_images_available` of how many where it took fewer. The images are read by `num_workers` DataLoader
    workers (the run's); with `skip_unreadable` an undecodable one is skipped and counted
    (`eval_skipped_unreadable`), as in training, and there is no floor.

    Raises:
        UnreadableImageError: an image cannot be decoded, without `skip_unreadable`."""
    sources = data.labelled_evaluation()
    if sources is None:
        return None
    memory, queries = sources
    available = len(memory)
    memory = limit_source(memory, memory_images, seed)
    pooling = encoder.config.pooling
    results = evaluate_encoder(
        encoder, processor, memory, queries,
        linear_probe=linear_probe, pools=(pooling,), batch_size=256, device=device, seed=seed,
        num_workers=num_workers, skip_unreadable=skip_unreadable, label_fractions=label_fractions,
        dinov2_linear=dinov2_linear,
    )
    evaluation = {
        **_probe_accuracies(results, pooling, label_fractions),
        "knn_train_images": results["train_images"],
        "knn_test_images": results["test_images"],
    }
    if len(memory) < available:
        evaluation["knn_train_images_available"] = available
    if dinov2_linear and linear_probe:
        evaluation["linear_probe_accuracy_dinov2"] = round(results[f"linear_probe_accuracy_{DINOV2}"], 2)
    if results["skipped_images"]:
        evaluation["eval_skipped_unreadable"] = results["skipped_images"]
        floor = False  # the pixels of the two sides would not be the images the encoder was evaluated on
    channels = 1 if data.augmentation.num_channels == 1 else 3
    if floor and floor_applies(memory, queries, channels):
        try:
            pixels = raw_pixel_floor(
                memory, queries, linear_probe=linear_probe, seed=seed, label_fractions=label_fractions
            )
        except EvaluationDataError as error:  # images of several sizes: no pixel vectors to compare
            logger.info("no raw-pixel floor: %s", error)
        else:
            for key, value in _probe_accuracies(pixels, "pixels", label_fractions).items():
                evaluation[f"raw_pixels_{key}"] = value
    return evaluation


def _probe_accuracies(results: dict, pool: str, label_fractions: tuple[float, ...]) -> dict[str, float]:
    """`results`' accuracies of one pooling under the run's names: `knn_accuracy`, `linear_probe_accuracy`, then
    `knn_accuracy_1pct`, `linear_probe_accuracy_1pct`, ... (rounded to 2 decimals)."""
    accuracies = {}
    for suffix in ("", *(f"_{fraction_name(fraction)}" for fraction in label_fractions)):
        for probe in ("knn_accuracy", "linear_probe_accuracy"):
            if (key := f"{probe}_{pool}{suffix}") in results:
                accuracies[f"{probe}{suffix}"] = round(results[key], 2)
    return accuracies
