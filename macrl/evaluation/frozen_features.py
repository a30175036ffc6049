"""Frozen-feature evaluation of a MACRL encoder: DINO's weighted kNN and a linear probe, per pooling.

:func:`evaluate_encoder` encodes the training and test images once (one forward pass per image, every requested
pooling computed from the same tokens), keeps the pooled features in memory and fits both classifiers on them; it
returns a flat dict of metrics in percent, e.g. ``{"knn_accuracy_cls": 84.1, "linear_probe_accuracy_cls": 86.0,
...}``, plus image counts and timings. :func:`evaluate_features` does the same on features extracted elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import ImageSource
from ..devices import resolve_device
from ..feature_extraction import extract_features, prepare_for_inference
from ..modeling_macrl import MACRLModel, pool_tokens
from .knn import knn_accuracy
from .labels import EvaluationDataError, check_labelled, num_classes_of
from .linear_probe import linear_probe as fit_linear_probe

__all__ = ["POOLS", "RAW_PIXELS_MAX_VALUES", "evaluate_encoder", "evaluate_features", "evaluate_raw_pixels",
           "extract_pooled_features"]

POOLS: tuple[str, ...] = ("cls", "mean")

# the raw-pixel floor is for small images (Fashion-MNIST's 784 values); at 224 px it would be 150,528 values an image
RAW_PIXELS_MAX_VALUES = 64 * 64 * 3


class _PooledTokens(nn.Module):
    """Wraps an encoder so that its ``last_hidden_state`` is ``[B, P, D]``: one row per requested pooling.

    ``extract_features(..., pool="none")`` then returns every pooling from a single forward pass, while keeping
    only ``P`` vectors per image in memory instead of all ``num_prefix_tokens + L`` tokens.
    """

    def __init__(self, encoder: nn.Module, pools: Sequence[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.pools = tuple(pools)
        self.config = getattr(encoder, "config", None)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        tokens = self.encoder(pixel_values=pixel_values).last_hidden_state.float()  # [B, prefix + L, D]
        pooled = [pool_tokens(tokens, pool, getattr(self.config, "num_prefix_tokens", 1)) for pool in self.pools]
        return SimpleNamespace(last_hidden_state=torch.stack(pooled, dim=1))  # [B, P, D]


def _encoder_of(model: nn.Module) -> nn.Module:
    """The ``MACRLModel`` of a ``MACRLModel``, ``MACRLForPreTraining`` or ``MACRLForImageClassification``."""
    if isinstance(model, MACRLModel):
        return model
    inner = getattr(model, "macrl", None)
    return inner if isinstance(inner, MACRLModel) else model


def _check_pools(pools: Sequence[str] | str | None, model: nn.Module) -> tuple[str, ...]:
    """Requested poolings, deduplicated; ``None``: both, the model's own ``config.pooling`` first."""
    if pools is None:
        own = getattr(getattr(model, "config", None), "pooling", "cls")
        return (own, *(pool for pool in POOLS if pool != own))
    if isinstance(pools, str):
        pools = (pools,)
    pools = tuple(dict.fromkeys(pools))
    if not pools or any(pool not in POOLS for pool in pools):
        raise ValueError(f"pools must be a non-empty subset of {POOLS}, got {pools!r}")
    return pools


def extract_pooled_features(
    model: nn.Module,
    processor: Any,
    source: ImageSource,
    pools: Sequence[str] = POOLS,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    num_workers: int = 0,
    skip_unreadable: bool = False,
    progress: bool | None = None,
    compile: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, int]:
    """Encode ``source`` once and pool the tokens every requested way.

    The encoder is readied (and, with ``compile``, compiled) in place by ``prepare_for_inference``, so a second call
    in the same process reuses the compiled encoder.

    Returns:
        ``({pool: float32 [N, D]}, int64 [N] labels or None, number of skipped unreadable images)``, on the CPU.
    """
    pools = _check_pools(pools, model)
    # the encoder is compiled, not the wrapper: a new wrapper per call must not mean a new compile
    encoder = prepare_for_inference(_encoder_of(model), device, dtype, compile=compile, batch_size=batch_size)
    result = extract_features(
        _PooledTokens(encoder, pools), processor, source,
        pool="none", batch_size=batch_size, device=device, dtype=dtype,
        num_workers=num_workers, skip_unreadable=skip_unreadable, progress=progress, compile=compile,
    )
    features = {pool: result.features[:, i].contiguous() for i, pool in enumerate(pools)}  # each [N, D]
    return features, result.labels, len(result.skipped)


def evaluate_features(
    train_features: Mapping[str, torch.Tensor],
    train_labels: torch.Tensor,
    test_features: Mapping[str, torch.Tensor],
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    knn: bool = True,
    linear_probe: bool = True,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    seed: int = 0,
    linear_probe_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """kNN and linear-probe accuracy (percent) of cached features, per pooling.

    Args:
        train_features, test_features: ``{pool: [N, D]}`` / ``{pool: [M, D]}`` with the same keys.
        train_labels, test_labels: ``[N]`` / ``[M]`` integer labels in ``[0, num_classes)``.
        linear_probe_kwargs: extra arguments of :func:`macrl.evaluation.linear_probe` (``epochs``, ``lrs``, ...).

    Returns:
        ``knn_accuracy_<pool>``, ``linear_probe_accuracy_<pool>`` (and the probe's selected
        ``linear_probe_lr_<pool>`` / ``linear_probe_weight_decay_<pool>``) for every pool, and ``knn_seconds`` /
        ``linear_probe_seconds``.
    """
    if set(train_features) != set(test_features) or not train_features:
        raise ValueError(
            f"train_features and test_features must have the same non-empty pools, "
            f"got {sorted(train_features)} and {sorted(test_features)}"
        )
    results: dict[str, Any] = {}
    knn_seconds = probe_seconds = 0.0
    for pool, train in train_features.items():
        test = test_features[pool]
        if knn:
            started = time.perf_counter()
            accuracy = knn_accuracy(
                train, train_labels, test, test_labels, num_classes, k=knn_k, temperature=knn_temperature
            )
            knn_seconds += time.perf_counter() - started
            results[f"knn_accuracy_{pool}"] = round(accuracy, 4)
        if linear_probe:
            started = time.perf_counter()
            probe = fit_linear_probe(
                train, train_labels, test, test_labels, num_classes, seed=seed, **dict(linear_probe_kwargs or {})
            )
            probe_seconds += time.perf_counter() - started
            results[f"linear_probe_accuracy_{pool}"] = round(probe.accuracy, 4)
            results[f"linear_probe_lr_{pool}"] = probe.best_lr
            results[f"linear_probe_weight_decay_{pool}"] = probe.best_weight_decay
    if knn:
        results["knn_seconds"] = round(knn_seconds, 3)
    if linear_probe:
        results["linear_probe_seconds"] = round(probe_seconds, 3)
    return results


def evaluate_encoder(
    model: nn.Module,
    processor: Any,
    train_source: ImageSource,
    test_source: ImageSource,
    *,
    knn: bool = True,
    linear_probe: bool = True,
    pools: Sequence[str] | str | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    seed: int = 0,
    num_workers: int = 0,
    skip_unreadable: bool = False,
    progress: bool | None = None,
    linear_probe_kwargs: Mapping[str, Any] | None = None,
    compile: bool = False,
) -> dict[str, Any]:
    """Frozen-feature evaluation of a MACRL encoder: weighted kNN and linear probe, per pooling.

    Every image is encoded once; all ``pools`` come from the same tokens and stay in memory for both classifiers.

    Args:
        model: a ``MACRLModel`` (or a model holding one as ``.macrl``).
        processor: its image processor.
        train_source, test_source: labelled images; the training images are the kNN memory and the probe's
            training set, the test images are classified.
        knn, linear_probe: which evaluations to run.
        pools: ``"cls"`` / ``"mean"`` or both; ``None``: both, the model's ``config.pooling`` first.
        batch_size, device, dtype (``fp32`` / ``bf16`` / ``fp16``), num_workers, skip_unreadable, progress, compile: as in
            :func:`macrl.feature_extraction.extract_features` (the encoder is readied in place; compiled once for
            both sources).
        knn_k, knn_temperature: DINO's kNN parameters.
        seed: the linear probe's validation split and batch order.

    Returns:
        A flat dict: ``knn_accuracy_<pool>``, ``linear_probe_accuracy_<pool>`` (percent, 0-100),
        ``linear_probe_lr_<pool>``, ``linear_probe_weight_decay_<pool>``, ``pools``, ``train_images``,
        ``test_images``, ``skipped_images``, ``num_classes``, ``feature_dim``, ``knn_k``, ``knn_temperature``,
        ``extract_seconds``, ``knn_seconds``, ``linear_probe_seconds``, ``total_seconds``.

    Raises:
        EvaluationDataError: a source without labels, or an empty one.
        ValueError: nothing to evaluate, bad pools, too few images for the probe.
    """
    started = time.perf_counter()
    if not (knn or linear_probe):
        raise ValueError("nothing to evaluate: knn and linear_probe are both off")
    check_labelled(train_source, test_source)
    pools = _check_pools(pools, model)
    num_classes = num_classes_of(train_source, test_source)
    common = dict(
        batch_size=batch_size, device=device, dtype=dtype, num_workers=num_workers,
        skip_unreadable=skip_unreadable, progress=progress, compile=compile,
    )
    train_features, train_labels, train_skipped = extract_pooled_features(model, processor, train_source, pools, **common)
    test_features, test_labels, test_skipped = extract_pooled_features(model, processor, test_source, pools, **common)
    extract_seconds = time.perf_counter() - started

    # the classifiers run where the encoder ran: a GPU makes the [M, N] similarity and the probe's grid fast too
    target = resolve_device(device)
    move = lambda features: {pool: value.to(target) for pool, value in features.items()}  # noqa: E731
    results: dict[str, Any] = evaluate_features(
        move(train_features), train_labels.to(target), move(test_features), test_labels.to(target), num_classes,
        knn=knn, linear_probe=linear_probe, knn_k=knn_k, knn_temperature=knn_temperature, seed=seed,
        linear_probe_kwargs=linear_probe_kwargs,
    )
    results.update(
        pools=list(pools),
        train_images=int(train_labels.shape[0]),
        test_images=int(test_labels.shape[0]),
        skipped_images=train_skipped + test_skipped,
        num_classes=num_classes,
        feature_dim=int(next(iter(train_features.values())).shape[1]),
        extract_seconds=round(extract_seconds, 3),
        total_seconds=round(time.perf_counter() - started, 3),
    )
    if knn:
        results.update(knn_k=knn_k, knn_temperature=knn_temperature)
    return results


def evaluate_raw_pixels(
    train_source: ImageSource,
    test_source: ImageSource,
    *,
    linear_probe: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """The floor an encoder has to beat: the same kNN and linear probe as :func:`evaluate_features` on the images'
    own pixels (scaled to [0, 1], flattened), reported as ``knn_accuracy_pixels`` / ``linear_probe_accuracy_pixels``.

    Raises:
        EvaluationDataError: a source without labels, or images of varying size or of more than
            ``RAW_PIXELS_MAX_VALUES`` values.
    """
    check_labelled(train_source, test_source)
    features, labels = {}, {}
    for split, source in (("train", train_source), ("test", test_source)):
        pixels = [np.asarray(source.load_image(i)) for i in range(len(source))]
        if len({image.shape for image in pixels}) != 1 or pixels[0].size > RAW_PIXELS_MAX_VALUES:
            raise EvaluationDataError(
                f"raw-pixel floor: the {split} images of {source.name} must share one size of at most "
                f"{RAW_PIXELS_MAX_VALUES} values"
            )
        features[split] = {"pixels": torch.from_numpy(np.stack(pixels)).flatten(1).float() / 255}  # [N, H*W*C]
        labels[split] = torch.as_tensor(source.labels, dtype=torch.long)
    return evaluate_features(
        features["train"], labels["train"], features["test"], labels["test"],
        num_classes_of(train_source, test_source), linear_probe=linear_probe, seed=seed,
    )
