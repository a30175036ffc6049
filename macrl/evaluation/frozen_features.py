"""Frozen-feature evaluation of a MACRL encoder: DINO's weighted kNN and a linear probe, per pooling.

:func:`evaluate_encoder` encodes the training and test images once (one forward pass per image, every requested
feature computed from the same tokens), keeps the features in memory and fits both classifiers on them; it returns a
flat dict of metrics in percent, e.g. ``{"knn_accuracy_cls": 84.1, "linear_probe_accuracy_cls": 86.0, ...}``, plus
image counts and timings. :func:`evaluate_features` does the same on features extracted elsewhere.

The probes self-supervised papers report beside the full-label ones:

* **label efficiency** (SimCLR, BYOL, MSN): the same kNN and linear probe with only a seeded, class-balanced fraction
  of the training labels (``label_fractions``, :mod:`macrl.evaluation.label_subsets`), e.g.
  ``knn_accuracy_cls_1pct``;
* **DINOv2's linear protocol**: the linear probe on the CLS tokens of the last 4 blocks, each through the final norm,
  concatenated with the mean patch token (``linear_probe_accuracy_dinov2``; dinov2's ``eval/linear.py`` with
  ``n_last_blocks=4, avgpool=True``).

:func:`evaluate_raw_pixels` runs the same probes on the images' own pixels: the floor an encoder has to beat.
"""

from __future__ import annotations

import logging
import math
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
from .label_subsets import check_fractions, fraction_name, labelled_subset
from .linear_probe import linear_probe as fit_linear_probe
from .linear_probe import VAL_FRACTION, validation_rows

logger = logging.getLogger(__name__)

__all__ = ["DINOV2", "DINOV2_LAST_BLOCKS", "POOLS", "RAW_PIXELS_MAX_VALUES", "dinov2_linear_features",
           "evaluate_encoder", "evaluate_features", "evaluate_raw_pixels", "extract_pooled_features"]

POOLS: tuple[str, ...] = ("cls", "mean")
# the feature of DINOv2's linear protocol, and how many blocks' CLS tokens it takes
DINOV2 = "dinov2"
DINOV2_LAST_BLOCKS = 4

# the raw-pixel floor is for small images (Fashion-MNIST's 784 values); at 224 px it would be 150,528 values an image
RAW_PIXELS_MAX_VALUES = 64 * 64 * 3


def dinov2_linear_features(encoder: nn.Module, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """DINOv2's linear-probe input: the CLS token of each of the last ``DINOV2_LAST_BLOCKS`` blocks, each through the
    encoder's final norm, and the mean patch token of the last block, concatenated: ``[B, (blocks + 1) * D]``.

    ``hidden_states`` are the encoder's (``output_hidden_states=True``: the embeddings, then every block's output
    before the final norm); an encoder of fewer blocks gives all of its blocks' CLS tokens. Register tokens are left
    out of the mean, as in the pooling."""
    blocks = hidden_states[1:][-DINOV2_LAST_BLOCKS:]
    norm = encoder.norm
    prefix = getattr(encoder.config, "num_prefix_tokens", 1)
    normed = [norm(block.to(norm.weight.dtype)).float() for block in blocks]  # each [B, prefix + L, D]
    return torch.cat([tokens[:, 0] for tokens in normed] + [pool_tokens(normed[-1], "mean", prefix)], dim=1)


class _FeatureTokens(nn.Module):
    """Wraps an encoder so that its ``last_hidden_state`` is ``[B, 1, F]``: every requested feature of an image
    (``cls``, ``mean``, ``dinov2``) side by side, from one forward pass.

    ``extract_features(..., pool="none")`` then returns them all, while keeping a few vectors per image in memory
    instead of all ``num_prefix_tokens + L`` tokens; ``dims`` says where each feature lies.
    """

    def __init__(self, encoder: nn.Module, kinds: Sequence[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.kinds = tuple(kinds)
        self.config = getattr(encoder, "config", None)
        hidden = self.config.hidden_size
        blocks = min(DINOV2_LAST_BLOCKS, self.config.num_hidden_layers)
        self.dims = [(blocks + 1) * hidden if kind == DINOV2 else hidden for kind in self.kinds]

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        output = self.encoder(pixel_values=pixel_values, output_hidden_states=DINOV2 in self.kinds)
        tokens = output.last_hidden_state.float()  # [B, prefix + L, D]
        prefix = getattr(self.config, "num_prefix_tokens", 1)
        features = [
            dinov2_linear_features(self.encoder, output.hidden_states) if kind == DINOV2
            else pool_tokens(tokens, kind, prefix)
            for kind in self.kinds
        ]
        return SimpleNamespace(last_hidden_state=torch.cat(features, dim=1).unsqueeze(1))  # [B, 1, F]


def _encoder_of(model: nn.Module) -> nn.Module:
    """The ``MACRLModel`` of a ``MACRLModel``, ``MACRLForPreTraining`` or ``MACRLForImageClassification``."""
    if isinstance(model, MACRLModel):
        return model
    inner = getattr(model, "macrl", None)
    return inner if isinstance(inner, MACRLModel) else model


def _check_pools(pools: Sequence[str] | str | None, model: nn.Module, *, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Requested poolings, deduplicated; ``None``: both, the model's own ``config.pooling`` first. ``extra`` names
    what may be asked for besides (``dinov2``)."""
    if pools is None:
        own = getattr(getattr(model, "config", None), "pooling", "cls")
        return (own, *(pool for pool in POOLS if pool != own))
    if isinstance(pools, str):
        pools = (pools,)
    pools = tuple(dict.fromkeys(pools))
    allowed = (*POOLS, *extra)
    if not pools or any(pool not in allowed for pool in pools):
        raise ValueError(f"pools must be a non-empty subset of {allowed}, got {pools!r}")
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
    """Encode ``source`` once and pool the tokens every requested way (``cls``, ``mean``, and ``dinov2``: DINOv2's
    linear-protocol feature, :func:`dinov2_linear_features`).

    The encoder is readied (and, with ``compile``, compiled) in place by ``prepare_for_inference``, so a second call
    in the same process reuses the compiled encoder.

    Returns:
        ``({pool: float32 [N, D]}, int64 [N] labels or None, number of skipped unreadable images)``, on the CPU
        (``dinov2``'s ``D`` is five times the hidden size).
    """
    pools = _check_pools(pools, model, extra=(DINOV2,))
    # the encoder is compiled, not the wrapper: a new wrapper per call must not mean a new compile
    encoder = prepare_for_inference(_encoder_of(model), device, dtype, compile=compile, batch_size=batch_size)
    wrapper = _FeatureTokens(encoder, pools)
    result = extract_features(
        wrapper, processor, source,
        pool="none", batch_size=batch_size, device=device, dtype=dtype,
        num_workers=num_workers, skip_unreadable=skip_unreadable, progress=progress, compile=compile,
    )
    columns = result.features[:, 0].split(wrapper.dims, dim=1)  # [N, F] -> each [N, D_pool]
    features = {pool: column.contiguous() for pool, column in zip(pools, columns)}
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
    label_fractions: Sequence[float] = (),
) -> dict[str, Any]:
    """kNN and linear-probe accuracy (percent) of cached features, per pooling, with all the training labels and with
    each of ``label_fractions`` of them.

    Args:
        train_features, test_features: ``{pool: [N, D]}`` / ``{pool: [M, D]}`` with the same keys. A ``dinov2``
            feature (DINOv2's linear protocol) gets the full-label linear probe only.
        train_labels, test_labels: ``[N]`` / ``[M]`` integer labels in ``[0, num_classes)``.
        linear_probe_kwargs: extra arguments of :func:`macrl.evaluation.linear_probe` (``epochs``, ``lrs``, ...).
        label_fractions: fractions of the training labels (e.g. ``(0.01, 0.1)``) to probe with as well: the kNN
            memory and the probe's training set become a seeded class-balanced subset
            (:func:`macrl.evaluation.label_subsets.labelled_subset` with ``seed``); the test set stays whole.

    Returns:
        ``knn_accuracy_<pool>``, ``linear_probe_accuracy_<pool>`` (and the probe's selected
        ``linear_probe_lr_<pool>`` / ``linear_probe_weight_decay_<pool>``) for every pool; with label fractions also
        ``knn_accuracy_<pool>_<f>`` / ``linear_probe_accuracy_<pool>_<f>`` for ``<f>`` = ``1pct``, ``10pct``, ...;
        and ``knn_seconds`` / ``linear_probe_seconds``.
    """
    if set(train_features) != set(test_features) or not train_features:
        raise ValueError(
            f"train_features and test_features must have the same non-empty pools, "
            f"got {sorted(train_features)} and {sorted(test_features)}"
        )
    subsets = {"": None}  # "" is every label; then each fraction's indices into the training rows
    for fraction in check_fractions(label_fractions):
        subsets[f"_{fraction_name(fraction)}"] = labelled_subset(train_labels, fraction, seed).to(train_labels.device)
    probe_kwargs = dict(linear_probe_kwargs or {})
    # the probe holds out some of its rows to choose its lr and weight decay: a labelled subset too small to leave it
    # a validation row gets the kNN only
    val_fraction = probe_kwargs.get("val_fraction", VAL_FRACTION)
    results: dict[str, Any] = {}
    seconds = {"knn": 0.0, "linear_probe": 0.0}
    for pool, train in train_features.items():
        test = test_features[pool]
        for suffix, rows in subsets.items():
            if pool == DINOV2 and suffix:  # DINOv2's protocol is a full-label linear probe
                continue
            memory, memory_labels = (train, train_labels) if rows is None else (train[rows], train_labels[rows])
            if knn and pool != DINOV2:
                started = time.perf_counter()
                accuracy = knn_accuracy(
                    memory, memory_labels, test, test_labels, num_classes, k=knn_k, temperature=knn_temperature
                )
                seconds["knn"] += time.perf_counter() - started
                results[f"knn_accuracy_{pool}{suffix}"] = round(accuracy, 4)
            if linear_probe and rows is not None and validation_rows(len(rows), val_fraction) is None:
                logger.warning(
                    "no %s linear probe: %s of the labels is %d images, too few to hold out a validation split",
                    suffix[1:], suffix[1:].replace("pct", "%"), len(rows),
                )
            elif linear_probe:
                started = time.perf_counter()
                probe = fit_linear_probe(
                    memory, memory_labels, test, test_labels, num_classes, seed=seed,
                    **{**_few_label_schedule(len(memory_labels)), **probe_kwargs},
                )
                seconds["linear_probe"] += time.perf_counter() - started
                results[f"linear_probe_accuracy_{pool}{suffix}"] = round(probe.accuracy, 4)
                results[f"linear_probe_lr_{pool}{suffix}"] = probe.best_lr
                results[f"linear_probe_weight_decay_{pool}{suffix}"] = probe.best_weight_decay
    if knn:
        results["knn_seconds"] = round(seconds["knn"], 3)
    if linear_probe:
        results["linear_probe_seconds"] = round(seconds["linear_probe"], 3)
    return results


# the probe's default schedule is 20 epochs of 1024-row batches; on a few hundred labelled rows that is 20 steps, so a
# small training set gets as many epochs as make this many steps (benchmarks/results/quality/probes.md)
_FEW_LABEL_MIN_STEPS = 400


def _few_label_schedule(rows: int, batch_size: int = 1024, epochs: int = 20) -> dict[str, int]:
    """The linear probe's epochs for `rows` training rows: its default 20, or enough for `_FEW_LABEL_MIN_STEPS`."""
    steps_per_epoch = math.ceil(rows / batch_size)
    return {"epochs": max(epochs, math.ceil(_FEW_LABEL_MIN_STEPS / steps_per_epoch))}


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
    label_fractions: Sequence[float] = (),
    dinov2_linear: bool = False,
) -> dict[str, Any]:
    """Frozen-feature evaluation of a MACRL encoder: weighted kNN and linear probe, per pooling.

    Every image is encoded once; all ``pools`` (and DINOv2's feature) come from the same forward pass and stay in
    memory for every classifier.

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
        seed: the linear probe's validation split and batch order, and the label-fraction subsets.
        label_fractions: also probe with these fractions of the training labels (``(0.01, 0.1)``: 1% and 10%),
            as :func:`evaluate_features` does.
        dinov2_linear: also the linear probe of DINOv2's protocol (``linear_probe_accuracy_dinov2``: the CLS tokens
            of the last 4 blocks and the mean patch token), with ``linear_probe`` on.

    Returns:
        A flat dict: ``knn_accuracy_<pool>``, ``linear_probe_accuracy_<pool>`` (percent, 0-100),
        ``linear_probe_lr_<pool>``, ``linear_probe_weight_decay_<pool>``, the label-fraction and DINOv2 keys of
        :func:`evaluate_features` where asked for, ``pools``, ``train_images``,
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
    features_wanted = (*pools, DINOV2) if dinov2_linear and linear_probe else pools
    num_classes = num_classes_of(train_source, test_source)
    common = dict(
        batch_size=batch_size, device=device, dtype=dtype, num_workers=num_workers,
        skip_unreadable=skip_unreadable, progress=progress, compile=compile,
    )
    train_features, train_labels, train_skipped = extract_pooled_features(
        model, processor, train_source, features_wanted, **common
    )
    test_features, test_labels, test_skipped = extract_pooled_features(
        model, processor, test_source, features_wanted, **common
    )
    extract_seconds = time.perf_counter() - started

    # the classifiers run where the encoder ran: a GPU makes the [M, N] similarity and the probe's grid fast too
    target = resolve_device(device)
    move = lambda features: {pool: value.to(target) for pool, value in features.items()}  # noqa: E731
    results: dict[str, Any] = evaluate_features(
        move(train_features), train_labels.to(target), move(test_features), test_labels.to(target), num_classes,
        knn=knn, linear_probe=linear_probe, knn_k=knn_k, knn_temperature=knn_temperature, seed=seed,
        linear_probe_kwargs=linear_probe_kwargs, label_fractions=label_fractions,
    )
    results.update(
        pools=list(pools),
        train_images=int(train_labels.shape[0]),
        test_images=int(test_labels.shape[0]),
        skipped_images=train_skipped + test_skipped,
        num_classes=num_classes,
        feature_dim=int(train_features[pools[0]].shape[1]),
        extract_seconds=round(extract_seconds, 3),
        total_seconds=round(time.perf_counter() - started, 3),
    )
    if knn:
        results.update(knn_k=knn_k, knn_temperature=knn_temperature)
    if label_fractions:
        results["label_fractions"] = list(check_fractions(label_fractions))
    return results


def evaluate_raw_pixels(
    train_source: ImageSource,
    test_source: ImageSource,
    *,
    linear_probe: bool = True,
    seed: int = 0,
    label_fractions: Sequence[float] = (),
) -> dict[str, Any]:
    """The floor an encoder has to beat: the same kNN and linear probe as :func:`evaluate_features` on the images'
    own pixels (scaled to [0, 1], flattened), reported as ``knn_accuracy_pixels`` / ``linear_probe_accuracy_pixels``
    (and ``knn_accuracy_pixels_1pct`` etc. with ``label_fractions``: the same seeded subsets as an encoder's).

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
        label_fractions=label_fractions,
    )
