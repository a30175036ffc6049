"""Weighted k-nearest-neighbour classification of frozen features.

This is the evaluation of DINO (Caron et al., 2021, ``eval_knn.py``,
``knn_classifier``) that is also reported for MAE / MoCo v3 backbones:

1. L2-normalise every feature, so that a dot product is a cosine similarity.
2. For each test feature, take the ``k`` most similar training features.
3. Weight each neighbour by ``exp(similarity / T)`` and add the weight to the
   vote of the neighbour's class (a weighted sum of one-hot labels).
4. Predict the class with the largest vote.

The test rows are processed in chunks so that the ``[chunk, N]`` similarity
matrix, not the full ``[M, N]`` one, bounds memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "check_features", "check_labels", "check_num_classes", "check_same_dim", "knn_accuracy", "weighted_knn_predict",
]


# --------------------------------------------------------------------------- #
# Input validation (shared with linear_probe.py)
# --------------------------------------------------------------------------- #
def check_features(name: str, features: torch.Tensor) -> None:
    """Raise if ``features`` is not a non-empty, finite, floating ``[rows, D]`` tensor."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name} must have shape [rows, dim], got {tuple(features.shape)}")
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(features.shape)})")
    if not features.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_labels(name: str, labels: torch.Tensor, num_rows: int, num_classes: int) -> None:
    """Raise if ``labels`` is not a ``[num_rows]`` integer tensor with values in ``[0, num_classes)``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must have shape [rows], got {tuple(labels.shape)}")
    if labels.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if labels.shape[0] != num_rows:
        raise ValueError(f"{name} has {labels.shape[0]} entries but the features have {num_rows} rows")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{low}, {high}]")


def check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def check_same_dim(train_features: torch.Tensor, test_features: torch.Tensor) -> None:
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features and test_features must have the same feature dim, "
            f"got {train_features.shape[1]} and {test_features.shape[1]}"
        )


# --------------------------------------------------------------------------- #
# kNN
# --------------------------------------------------------------------------- #
@torch.no_grad()
def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
) -> torch.Tensor:
    """Predict a class for every test feature by a temperature-weighted kNN vote.

    Args:
        train_features: ``[N, D]`` float features of the labelled (memory) set.
        train_labels: ``[N]`` integer labels in ``[0, num_classes)``.
        test_features: ``[M, D]`` float features to classify.
        num_classes: number of classes ``C``.
        k: number of neighbours. DINO's default of 20 is used. If ``k > N``
            it is clamped to ``N``: asking for more neighbours than exist can
            only mean "let every training point vote", and raising would make
            the evaluation of tiny debug sets fail for no useful reason.
        temperature: ``T`` in the neighbour weight ``exp(cos_sim / T)``;
            DINO's default of 0.07. Small ``T`` lets the nearest neighbour
            dominate; large ``T`` tends to an unweighted majority vote.
        batch_size: number of test rows per chunk; memory is ``O(batch_size * N)``.

    Returns:
        ``[M]`` int64 predictions on ``train_features.device``. A tie between
        classes goes to the smallest class index (``argmax`` convention).

    Raises:
        ValueError: empty inputs (naming the argument), shape mismatches,
            non-finite features, labels out of range, ``k``, ``temperature``
            or ``batch_size`` not positive.
        TypeError: non-tensor, non-floating features or non-integer labels.
    """
    check_num_classes(num_classes)
    check_features("train_features", train_features)
    check_features("test_features", test_features)
    check_same_dim(train_features, test_features)
    check_labels("train_labels", train_labels, train_features.shape[0], num_classes)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    device = train_features.device
    num_train = train_features.shape[0]
    k = min(k, num_train)  # see docstring: more neighbours than points = all points vote

    # float32 at least: half precision would lose the small similarity gaps
    # that the temperature amplifies.
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    train = F.normalize(train_features.to(dtype), dim=1)  # [N, D], unit rows
    labels = train_labels.to(device=device, dtype=torch.long)  # [N]

    predictions = []
    for start in range(0, test_features.shape[0], batch_size):
        chunk = test_features[start : start + batch_size].to(device=device, dtype=dtype)
        query = F.normalize(chunk, dim=1)  # [B, D]

        similarity = query @ train.T  # [B, N], cosine similarities in [-1, 1]
        top_sim, top_idx = similarity.topk(k, dim=1, largest=True, sorted=True)  # [B, k]
        neighbour_labels = labels[top_idx]  # [B, k]

        # DINO's weight is exp(sim / T). Dividing every weight of a row by the
        # same positive number exp(max_sim / T) leaves the argmax unchanged but
        # keeps exp() from overflowing when T is small (exp(1/0.01) = inf in fp32).
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # [B, k], in (0, 1]

        # Sum of weighted one-hot labels, i.e. one vote total per class.
        votes = torch.zeros(query.shape[0], num_classes, device=device, dtype=dtype)  # [B, C]
        votes.scatter_add_(1, neighbour_labels, weights)
        predictions.append(votes.argmax(dim=1))  # [B]

    return torch.cat(predictions)  # [M]


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy, in percent, of :func:`weighted_knn_predict` on ``test_labels``.

    ``test_labels`` is ``[M]`` with integer values in ``[0, num_classes)``;
    the other arguments are those of :func:`weighted_knn_predict`.
    """
    check_num_classes(num_classes)
    check_features("test_features", test_features)
    check_labels("test_labels", test_labels, test_features.shape[0], num_classes)
    predictions = weighted_knn_predict(
        train_features, train_labels, test_features, num_classes, k, temperature, batch_size
    )  # [M]
    correct = predictions == test_labels.to(predictions.device)  # [M]
    return 100.0 * correct.float().mean().item()
