"""Linear probe on frozen, cached features.

A linear probe measures how linearly separable a frozen representation is:
a multinomial logistic regression ``softmax(x W + b)`` is trained on the
features and its top-1 test accuracy is reported.

Recipe (the cached-feature version of MAE's linear probe):

1. Standardise every feature dimension with the training split's mean and
   std. MAE puts a ``BatchNorm1d(affine=False)`` before its linear head for
   exactly this reason: MAE features have very different scales per
   dimension, and an un-normalised probe needs a per-model learning rate.
2. Hold out ``val_fraction`` of the training split (a seeded permutation)
   and train one probe per ``(lr, weight_decay)`` pair of a small grid on
   the rest; keep the pair with the best validation accuracy. The test
   split is never used for this choice.
3. Re-standardise on the full training split, retrain with the chosen pair
   and report the test accuracy.

Optimiser: mini-batch SGD with momentum 0.9, a cosine learning-rate decay to
zero, an L2 penalty ``weight_decay / 2 * ||W||^2`` (not on the bias) and a
zero initialisation. The problem is convex, so zero init removes all
randomness but the shuffling, which is seeded. Full-batch L-BFGS (strong Wolfe)
was measured as well on synthetic N=60k features: 5x (D=192) to 20x (D=768)
slower per grid point on CPU, because correlated features make it take
hundreds of full passes, while 20 epochs of SGD reach the same test accuracy.

The grid points are independent convex problems that see the same mini-batches,
so they are trained side by side as one ``[D, G, C]`` weight tensor: one
pass over the data trains the whole grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .knn import check_features, check_labels, check_num_classes, check_same_dim
from .labels import EvaluationDataError

__all__ = ["LinearProbeResult", "VAL_FRACTION", "linear_probe", "validation_rows"]

# the share of the training rows held out to choose the lr and weight decay
VAL_FRACTION = 0.1

# eps inside the sqrt, as in BatchNorm: constant feature dimensions become 0
# instead of NaN.
_STD_EPS = 1e-6
_MOMENTUM = 0.9


@dataclass(frozen=True)
class LinearProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        accuracy: top-1 test accuracy (percent) of the probe retrained on the
            full training split with the selected hyper-parameters.
        best_lr: selected peak learning rate.
        best_weight_decay: selected L2 coefficient.
        val_accuracy: validation accuracy (percent) of the selected pair.
        epochs: epochs of every training run (search and final).
        val_accuracies: validation accuracy of every ``(lr, weight_decay)``
            grid point; ``nan`` marks a run that diverged.
    """

    accuracy: float
    best_lr: float
    best_weight_decay: float
    val_accuracy: float
    epochs: int
    val_accuracies: dict[tuple[float, float], float] = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #
def _standardise(
    fit: torch.Tensor, *others: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Standardise ``fit`` and ``others`` with the per-dimension statistics of ``fit``."""
    mean = fit.mean(dim=0)  # [D]
    std = (fit.var(dim=0, unbiased=False) + _STD_EPS).sqrt()  # [D]
    return tuple((x - mean) / std for x in (fit, *others))


def _train_softmax_regression_grid(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lrs: torch.Tensor,
    weight_decays: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train G L2-regularised softmax regressions at once, one per ``(lrs[g], weight_decays[g])``.

    The G weight matrices are laid out side by side as one ``[D, G, C]``
    tensor, so the forward and backward pass of all runs are each one
    ``[B, D] x [D, G*C]`` matrix product: the data is read once per step,
    however many grid points there are.

    Args:
        features: ``[N, D]`` standardised float features.
        labels: ``[N]`` int64 labels.
        lrs, weight_decays: ``[G]`` peak learning rate and L2 coefficient per run.
        generator: CPU generator that orders the mini-batches (shared by all runs).

    Returns:
        ``W [D, G, C]`` and ``b [G, C]``.
    """
    num_rows, dim = features.shape
    num_runs = lrs.shape[0]
    device, dtype = features.device, features.dtype
    lrs = lrs.view(1, num_runs, 1)  # [1, G, 1], broadcasts against W [D, G, C] and b [G, C]
    weight_decays = weight_decays.view(1, num_runs, 1)  # [1, G, 1]

    weight = torch.zeros(dim, num_runs, num_classes, device=device, dtype=dtype)  # [D, G, C]
    bias = torch.zeros(num_runs, num_classes, device=device, dtype=dtype)  # [G, C]
    weight_buf = torch.zeros_like(weight)  # momentum buffers
    bias_buf = torch.zeros_like(bias)

    total_steps = epochs * math.ceil(num_rows / batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(num_rows, generator=generator).to(device)  # [N]
        for start in range(0, num_rows, batch_size):
            idx = order[start : start + batch_size]
            x, y = features[idx], labels[idx]  # [B, D], [B]
            batch = x.shape[0]

            logits = (x @ weight.view(dim, -1)).view(batch, num_runs, num_classes) + bias  # [B, G, C]
            # Gradient of the mean cross-entropy, by hand (no autograd needed):
            # d loss / d logits = (softmax(logits) - onehot(y)) / B.
            grad_logits = logits.softmax(dim=-1)  # [B, G, C]
            grad_logits[torch.arange(batch, device=device), :, y] -= 1.0
            grad_logits /= batch
            grad_weight = (x.T @ grad_logits.view(batch, -1)).view_as(weight)  # [D, G, C] = x^T dlogits
            grad_weight += weight_decays * weight  # d/dW of wd/2 * ||W||^2 (no decay on the bias)
            grad_bias = grad_logits.sum(dim=0)  # [G, C]

            # Cosine decay from the peak lr to 0 over the whole run.
            lr_now = lrs * (0.5 * (1.0 + math.cos(math.pi * step / total_steps)))  # [1, G, 1]
            # SGD with momentum, PyTorch convention: buf = mu * buf + grad; param -= lr * buf.
            weight_buf.mul_(_MOMENTUM).add_(grad_weight)
            bias_buf.mul_(_MOMENTUM).add_(grad_bias)
            weight -= lr_now * weight_buf
            bias -= lr_now[0] * bias_buf
            step += 1
    return weight, bias


def _accuracy_per_run(
    weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Top-1 accuracy (percent) of each of the G probes; ``nan`` for a diverged probe.

    Args:
        weight: ``[D, G, C]``; bias: ``[G, C]``; features: ``[M, D]``; labels: ``[M]``.

    Returns:
        ``[G]`` accuracies.
    """
    dim, num_runs, num_classes = weight.shape
    logits = (features @ weight.view(dim, -1)).view(-1, num_runs, num_classes) + bias  # [M, G, C]
    correct = logits.argmax(dim=-1) == labels[:, None]  # [M, G]
    accuracy = 100.0 * correct.float().mean(dim=0)  # [G]
    finite = torch.isfinite(weight).all(dim=(0, 2)) & torch.isfinite(bias).all(dim=1)  # [G]
    return torch.where(finite, accuracy, torch.full_like(accuracy, float("nan")))


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def validation_rows(num_train: int, val_fraction: float = VAL_FRACTION) -> int | None:
    """The training rows the probe holds out to choose its lr and weight decay (`round(val_fraction * num_train)`),
    or None where that leaves no validation row or no row to fit (too few labelled rows to probe)."""
    num_val = round(val_fraction * num_train)
    return num_val if 1 <= num_val < num_train else None


@torch.no_grad()
def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    lrs: tuple[float, ...] = (0.01, 0.1, 1.0),
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2),
    val_fraction: float = VAL_FRACTION,
    epochs: int = 20,
    batch_size: int = 1024,
    seed: int = 0,
) -> LinearProbeResult:
    """Fit a linear probe on frozen features, selecting lr / weight decay on a held-out split.

    Args:
        train_features: ``[N, D]`` float features of the training split.
        train_labels: ``[N]`` integer labels in ``[0, num_classes)``.
        test_features: ``[M, D]`` float features of the test split.
        test_labels: ``[M]`` integer labels.
        num_classes: number of classes ``C``.
        lrs: peak SGD learning rates to search (features are standardised, so
            one grid fits every backbone; the 3 decades cover slow-but-safe to
            fast).
        weight_decays: L2 coefficients to search, from none to strong.
        val_fraction: fraction of the training split held out for the search,
            in ``(0, 1)``.
        epochs: epochs of every run (the search runs and the final one).
        batch_size: mini-batch size.
        seed: seeds the validation split and the mini-batch order; the same
            seed and inputs give the same result.

    Returns:
        A :class:`LinearProbeResult`. Ties in validation accuracy go to the
        first pair in ``lrs``-major grid order.

    Raises:
        ValueError / TypeError: invalid inputs (see :mod:`macrl.evaluation.knn`
            for the feature and label checks), an empty or non-positive grid,
            ``val_fraction`` outside ``(0, 1)`` or leaving an empty split,
            non-positive ``epochs`` / ``batch_size``.
        RuntimeError: every grid point diverged.
    """
    check_num_classes(num_classes)
    check_features("train_features", train_features)
    check_features("test_features", test_features)
    check_same_dim(train_features, test_features)
    check_labels("train_labels", train_labels, train_features.shape[0], num_classes)
    check_labels("test_labels", test_labels, test_features.shape[0], num_classes)
    if len(lrs) == 0 or any(not (math.isfinite(lr) and lr > 0) for lr in lrs):
        raise ValueError(f"lrs must be a non-empty sequence of positive numbers, got {lrs!r}")
    if len(weight_decays) == 0 or any(not (math.isfinite(wd) and wd >= 0) for wd in weight_decays):
        raise ValueError(f"weight_decays must be a non-empty sequence of numbers >= 0, got {weight_decays!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    num_train = train_features.shape[0]
    num_val = round(val_fraction * num_train)
    if validation_rows(num_train, val_fraction) is None:
        raise EvaluationDataError(
            f"val_fraction={val_fraction} of {num_train} training rows leaves "
            f"{num_val} validation and {num_train - num_val} fitting rows; both must be >= 1"
        )

    device = train_features.device
    # float32 at least, for the same reason as in knn: fp16 sums of 60k rows lose precision.
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    train_x = train_features.to(dtype)  # [N, D]
    test_x = test_features.to(device=device, dtype=dtype)  # [M, D]
    train_y = train_labels.to(device=device, dtype=torch.long)  # [N]
    test_y = test_labels.to(device=device, dtype=torch.long)  # [M]
    # The split and the batch order come from one seeded CPU generator, so the
    # result does not depend on the global RNG state or on the device.
    generator = torch.Generator().manual_seed(seed)

    # ---- 1. search: fit on (1 - val_fraction), score on val_fraction -------
    perm = torch.randperm(num_train, generator=generator).to(device)  # [N]
    val_idx, fit_idx = perm[:num_val], perm[num_val:]
    fit_x, val_x = _standardise(train_x[fit_idx], train_x[val_idx])  # [N - V, D], [V, D]

    grid = [(lr, wd) for lr in lrs for wd in weight_decays]  # G pairs, lrs-major
    grid_lrs = torch.tensor([lr for lr, _ in grid], device=device, dtype=dtype)  # [G]
    grid_wds = torch.tensor([wd for _, wd in grid], device=device, dtype=dtype)  # [G]
    weight, bias = _train_softmax_regression_grid(
        fit_x, train_y[fit_idx], num_classes, grid_lrs, grid_wds, epochs, batch_size, generator
    )
    val_acc = _accuracy_per_run(weight, bias, val_x, train_y[val_idx])  # [G]
    if bool(torch.isnan(val_acc).all()):
        raise RuntimeError("every (lr, weight_decay) grid point diverged; try smaller lrs")
    # nan (diverged) must never win: treat it as -1%. argmax returns the first
    # maximum, hence the documented tie-break by grid order.
    best = int(torch.nan_to_num(val_acc, nan=-1.0).argmax())
    best_lr, best_wd = grid[best]

    # ---- 2. final: refit on the whole training split, score on test ---------
    full_x, test_x = _standardise(train_x, test_x)  # [N, D], [M, D]
    weight, bias = _train_softmax_regression_grid(
        full_x,
        train_y,
        num_classes,
        grid_lrs[best : best + 1],
        grid_wds[best : best + 1],
        epochs,
        batch_size,
        generator,
    )
    test_acc = _accuracy_per_run(weight, bias, test_x, test_y)  # [1]
    if bool(torch.isnan(test_acc).all()):
        raise RuntimeError(f"the final probe (lr={best_lr}, weight_decay={best_wd}) diverged")

    return LinearProbeResult(
        accuracy=float(test_acc[0]),
        best_lr=float(best_lr),
        best_weight_decay=float(best_wd),
        val_accuracy=float(val_acc[best]),
        epochs=epochs,
        val_accuracies={pair: float(acc) for pair, acc in zip(grid, val_acc.tolist())},
    )
