"""``macrl-eval``: kNN, linear-probe and fine-tuning accuracy of a MACRL encoder.

Python API:

* :func:`evaluate_encoder` encodes the training and test images once (one forward pass per image, every requested
  pooling computed from the same tokens), keeps the pooled features in memory, and fits DINO's weighted kNN
  (k=20, T=0.07) and a linear probe on them. It returns a flat dict of metrics in percent, e.g.
  ``{"knn_accuracy_cls": 84.1, "linear_probe_accuracy_cls": 86.0, "knn_accuracy_mean": ..., ...}``, plus image
  counts and timings.
* :func:`evaluate_features` does the same on features extracted elsewhere.
* :func:`macrl.evaluation.finetune.finetune` fine-tunes end to end with ``Trainer``.

The CLI evaluates on Debian's Fashion-MNIST train / test split by default, or on a folder of images in class
subfolders (a seeded held-out split, the same one ``macrl-pretrain --seed S`` holds out when the sizes agree), or on
a ``datasets`` dataset with train / test splits. It prints a table, writes the results as JSON (``--output``) and can
rewrite a local model folder's model card with them (``--update-card``).

Example::

    macrl-eval --model ./run/encoder --limit-train 10000 --output results.json --update-card
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .atomic_files import atomic_path
from .command_line import OneLineErrorParser, first_line, int_at_least, positive_float, run_command
from .data import (
    FashionMNISTNotFoundError,
    FashionMNISTSource,
    HFDatasetSource,
    ImageFolderSource,
    ImageSource,
    UnreadableImageError,
)
from .data.hf_datasets import _is_saved_dataset
from .evaluation.knn import knn_accuracy
from .evaluation.linear_probe import linear_probe as fit_linear_probe
from .extract import (
    DEVICE_CHOICES,
    ExtractError,
    _looks_like_hub_id,
    _transformers_progress_bars,
    extract_features,
    load_model_and_processor,
    resolve_device,
)
from .model_card import card_evaluation, update_model_card
from .modeling_macrl import MACRLModel, pool_tokens
from .precision import slow_bf16_warning
from .training.data import SubsetSource

__all__ = [
    "EvaluateError",
    "evaluate_encoder",
    "evaluate_features",
    "extract_pooled_features",
    "load_eval_sources",
    "holdout_split",
    "limit_source",
    "format_table",
    "update_model_card",
    "main",
]

POOLS: tuple[str, ...] = ("cls", "mean")
POOL_CHOICES: tuple[str, ...] = ("cls", "mean", "both")
EVAL_DTYPES: tuple[str, ...] = ("fp32", "bf16")
PROG = "macrl-eval"


class EvaluateError(Exception):
    """A usage problem (bad flag, missing model or data, unlabelled data): one line, exit code 2."""


# --------------------------------------------------------------------------- features


class _PooledTokens(nn.Module):
    """Wraps an encoder so that its ``last_hidden_state`` is ``[B, P, D]``: one row per requested pooling.

    ``extract_features(..., pool="none")`` then returns every pooling from a single forward pass, while keeping
    only ``P`` vectors per image in memory instead of all ``1 + L`` tokens.
    """

    def __init__(self, encoder: nn.Module, pools: Sequence[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.pools = tuple(pools)
        self.config = getattr(encoder, "config", None)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        tokens = self.encoder(pixel_values=pixel_values).last_hidden_state.float()  # [B, 1 + L, D]
        pooled = [pool_tokens(tokens, pool) for pool in self.pools]
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
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, int]:
    """Encode ``source`` once and pool the tokens every requested way.

    Returns:
        ``({pool: float32 [N, D]}, int64 [N] labels or None, number of skipped unreadable images)``, on the CPU.
    """
    pools = _check_pools(pools, model)
    result = extract_features(
        _PooledTokens(_encoder_of(model), pools), processor, source,
        pool="none", batch_size=batch_size, device=device, dtype=dtype,
        num_workers=num_workers, skip_unreadable=skip_unreadable, progress=progress,
    )
    features = {pool: result.features[:, i].contiguous() for i, pool in enumerate(pools)}  # each [N, D]
    return features, result.labels, len(result.skipped)


def _num_classes(*sources: ImageSource) -> int:
    for source in sources:
        if source.class_names:
            return len(source.class_names)
    labels = [label for source in sources for label in (source.labels or [])]
    return max(labels) + 1


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
        batch_size, device, dtype (``fp32`` / ``bf16`` autocast), num_workers, skip_unreadable, progress: as in
            :func:`macrl.extract.extract_features`.
        knn_k, knn_temperature: DINO's kNN parameters.
        seed: the linear probe's validation split and batch order.

    Returns:
        A flat dict: ``knn_accuracy_<pool>``, ``linear_probe_accuracy_<pool>`` (percent, 0-100),
        ``linear_probe_lr_<pool>``, ``linear_probe_weight_decay_<pool>``, ``pools``, ``train_images``,
        ``test_images``, ``skipped_images``, ``num_classes``, ``feature_dim``, ``knn_k``, ``knn_temperature``,
        ``extract_seconds``, ``knn_seconds``, ``linear_probe_seconds``, ``total_seconds``.

    Raises:
        ValueError: a source without labels, nothing to evaluate, bad pools, too few images for the probe.
    """
    started = time.perf_counter()
    if not (knn or linear_probe):
        raise ValueError("nothing to evaluate: knn and linear_probe are both off")
    for role, source in (("training", train_source), ("test", test_source)):
        if source.labels is None:
            raise ValueError(f"the {role} images ({source.name}) have no labels; kNN and linear probe need labels")
        if len(source) == 0:
            raise ValueError(f"the {role} images ({source.name}) are empty")
    pools = _check_pools(pools, model)
    num_classes = _num_classes(train_source, test_source)
    common = dict(
        batch_size=batch_size, device=device, dtype=dtype, num_workers=num_workers,
        skip_unreadable=skip_unreadable, progress=progress,
    )
    train_features, train_labels, train_skipped = extract_pooled_features(model, processor, train_source, pools, **common)
    test_features, test_labels, test_skipped = extract_pooled_features(model, processor, test_source, pools, **common)
    extract_seconds = time.perf_counter() - started

    # the classifiers run where the encoder ran: a GPU makes the [M, N] similarity and the probe's grid fast too
    target = device if isinstance(device, torch.device) else resolve_device(device)
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


# --------------------------------------------------------------------------- data


def holdout_split(source: ImageSource, fraction: float, seed: int) -> tuple[SubsetSource, SubsetSource]:
    """``(rest, held_out)``: a seeded random ``round(fraction * N)`` images held out of ``source``.

    The same permutation as ``macrl-pretrain``'s held-out images (``numpy.random.default_rng(seed)``), so with the
    same seed and count the same images are held out.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the test fraction must be in (0, 1), got {fraction!r}")
    count = round(fraction * len(source))
    if count < 1 or count >= len(source):
        raise ValueError(
            f"{source.name} has {len(source)} images: a test fraction of {fraction} leaves {count} test and "
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


def load_eval_sources(
    data: str | None,
    mode: str,
    *,
    train_split: str = "train",
    test_split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
    skip_unreadable: bool = False,
) -> tuple[ImageSource, ImageSource, dict[str, str]]:
    """``(train, test, card_dataset)`` for ``--data``; ``card_dataset`` names the data for a model card.

    * ``None``: Fashion-MNIST train / test from Debian's ``dataset-fashion-mnist``.
    * a folder of images in class subfolders: a seeded held-out split (``test_fraction``).
    * a ``datasets`` ``save_to_disk`` folder or dataset name: ``train_split`` / ``test_split``; if ``test_split``
      is None and there is no ``test`` split, a seeded held-out split of the training split.

    Raises:
        EvaluateError: missing data, no labels, unknown split or column.
    """
    try:
        if data is None:
            return (
                FashionMNISTSource("train", mode=mode),
                FashionMNISTSource("test", mode=mode),
                {"dataset_name": "Fashion-MNIST", "dataset_type": "fashion_mnist", "split": "test"},
            )
        path = Path(data).expanduser()
        if path.is_dir() and not _is_saved_dataset(path):
            folder = ImageFolderSource(path, mode=mode, skip_unreadable=skip_unreadable)
            if folder.labels is None:
                raise EvaluateError(
                    f"--data {data}: the images have no labels; put them in one subfolder per class "
                    "(DATA/<class>/<image>)"
                )
            train, test = holdout_split(folder, test_fraction, seed)
            return train, test, {"dataset_name": path.resolve().name, "dataset_type": path.resolve().name,
                                 "split": "held-out"}
        if not path.exists() and not _looks_like_hub_id(data):
            raise EvaluateError(f"--data {data}: folder not found")
        name = str(path) if path.exists() else data
        columns = dict(image_column=image_column, label_column=label_column, mode=mode)
        train = HFDatasetSource(name, split=train_split, **columns)
        if train.labels is None:
            raise EvaluateError(f"--data {data}: split {train_split!r} has no label column (see --label-column)")
        card = {"dataset_name": path.name if path.exists() else data, "dataset_type": path.name if path.exists() else data}
        try:
            test = HFDatasetSource(name, split=test_split or "test", **columns)
        except ValueError:
            if test_split is not None:
                raise
            train, test = holdout_split(train, test_fraction, seed)
            return train, test, {**card, "split": f"{train_split} (held-out)"}
        if test.labels is None:
            raise EvaluateError(f"--data {data}: split {test_split or 'test'!r} has no label column")
        return train, test, {**card, "split": test_split or "test"}
    except EvaluateError:
        raise
    except (OSError, ValueError, ImportError, KeyError) as e:  # FashionMNISTNotFoundError is an OSError
        where = "Fashion-MNIST" if data is None else f"--data {data}"
        raise EvaluateError(f"{where}: {first_line(e)}") from e


# --------------------------------------------------------------------------- output


def format_table(results: Mapping[str, Any]) -> str:
    """A small text table: one row per metric, one column per pooling, then counts and timings."""
    pools = list(results.get("pools") or [])
    rows = []
    if any(f"knn_accuracy_{pool}" in results for pool in pools):
        rows.append((f"kNN accuracy (k={results.get('knn_k', 20)}) %", "knn_accuracy"))
    if any(f"linear_probe_accuracy_{pool}" in results for pool in pools):
        rows.append(("linear probe accuracy %", "linear_probe_accuracy"))
    label_width = max([len(label) for label, _ in rows] + [len("fine-tuning accuracy %")])
    lines = []
    if rows:
        lines.append(f"{'metric':<{label_width}}" + "".join(f"{pool:>10}" for pool in pools))
        for label, key in rows:
            values = [results.get(f"{key}_{pool}") for pool in pools]
            lines.append(f"{label:<{label_width}}" + "".join(f"{'-' if v is None else f'{v:.2f}':>10}" for v in values))
    if "finetune_accuracy" in results:
        lines.append(
            f"{'fine-tuning accuracy %':<{label_width}}{results['finetune_accuracy']:>10.2f}"
            f"   ({results.get('finetune_steps')} steps, pooling {results.get('model_pooling', '?')})"
        )
    counts = [f"{results[key]} {text}" for key, text in (
        ("train_images", "train"), ("test_images", "test"), ("num_classes", "classes"),
    ) if key in results]
    if counts:
        lines.append("images: " + ", ".join(counts))
    timings = [f"{text} {results[key]:.1f} s" for key, text in (
        ("extract_seconds", "extract"), ("knn_seconds", "kNN"), ("linear_probe_seconds", "linear probe"),
        ("finetune_seconds", "fine-tuning"),
    ) if key in results]
    if timings:
        lines.append("time: " + ", ".join(timings))
    return "\n".join(lines)


def _write_json_atomically(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp_path:
        temp_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``macrl-eval`` flags; ``--help`` states every default."""
    parser = OneLineErrorParser(
        prog=PROG,
        error_type=EvaluateError,
        description="kNN, linear-probe and fine-tuning accuracy of a MACRL encoder.",
        epilog="Exit status: 0 done, 1 an image could not be decoded (see --skip-unreadable), 2 usage error.",
    )
    add = parser.add_argument
    add("--model", required=True, help="local model folder or Hub id of a MACRL encoder (required)")
    add("--revision", default=None, help="Hub branch, tag or commit of --model (default: the default branch)")
    add(
        "--data", default=None,
        help="default: Fashion-MNIST train/test (Debian's dataset-fashion-mnist); or a folder of images in class "
        "subfolders (a seeded held-out split is the test set); or a `datasets` save_to_disk folder / dataset name "
        "with train and test splits",
    )
    add("--train-split", default="train", help="training split, for datasets only (default: %(default)s)")
    add(
        "--test-split", default=None,
        help="test split, for datasets only (default: test, or a held-out part of the training split if there is none)",
    )
    add("--image-column", default=None, help="image column, for datasets only (default: auto-detected)")
    add("--label-column", default=None, help="label column, for datasets only (default: auto-detected)")
    add(
        "--test-fraction", type=float, default=0.1,
        help="fraction held out as the test set when the data has no test split (default: %(default)s)",
    )
    add("--limit-train", type=int_at_least(1), default=None, help="use a seeded random N training images (default: all)")
    add("--limit-test", type=int_at_least(1), default=None, help="use a seeded random N test images (default: all)")
    add("--knn", action=argparse.BooleanOptionalAction, default=True, help="weighted kNN (default: on)")
    add("--knn-k", type=int_at_least(1), default=20, help="kNN neighbours (default: %(default)s)")
    add("--knn-temperature", type=positive_float, default=0.07, help="kNN temperature (default: %(default)s)")
    add("--linear-probe", action=argparse.BooleanOptionalAction, default=True, help="linear probe (default: on)")
    add(
        "--pool", choices=POOL_CHOICES, default="both",
        help="feature(s) for kNN / linear probe: CLS token, mean of patch tokens, or both from one pass "
        "(default: %(default)s)",
    )
    add("--finetune-epochs", type=float, default=0, help="end-to-end fine-tuning epochs; 0 = off (default: 0)")
    add("--finetune-max-steps", type=int_at_least(1), default=None, help="stop fine-tuning after N steps")
    add("--finetune-lr", type=positive_float, default=5e-4, help="fine-tuning peak learning rate (default: %(default)s)")
    add("--finetune-batch-size", type=int_at_least(1), default=64, help="fine-tuning batch size (default: %(default)s)")
    add(
        "--layer-decay", type=float, default=None,
        help="layer-wise lr decay for fine-tuning, in (0, 1], e.g. 0.75 (default: off)",
    )
    add("--weight-decay", type=float, default=0.05, help="fine-tuning weight decay (default: %(default)s)")
    add(
        "--finetune-output", default=None,
        help="folder for the fine-tuned model (default: <output stem>-finetuned next to --output, "
        "else ./macrl-finetuned)",
    )
    add("--batch-size", type=int_at_least(1), default=256, help="images per forward pass (default: %(default)s)")
    add("--device", choices=DEVICE_CHOICES, default="auto", help="auto: cuda, else mps, else cpu (default: auto)")
    add("--dtype", choices=EVAL_DTYPES, default="fp32", help="bf16: autocast / mixed precision (default: fp32)")
    add("--num-workers", type=int_at_least(0), default=0, help="DataLoader worker processes (default: 0)")
    add("--seed", type=int, default=0, help="held-out split, --limit-* subsets, probe and fine-tuning (default: 0)")
    add("--skip-unreadable", action="store_true", help="skip images that cannot be decoded instead of stopping")
    add("--output", default=None, help="write the results as JSON to this file (atomically)")
    add(
        "--update-card", action="store_true",
        help="rewrite the model folder's README.md with the results in its model-index (local folders only)",
    )
    add("--no-progress", action="store_true", help="hide the progress bars (default: shown on a terminal only)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the slow part."""
    if not (args.knn or args.linear_probe or args.finetune_epochs > 0 or args.finetune_max_steps):
        raise EvaluateError("nothing to do: --no-knn, --no-linear-probe and no --finetune-epochs")
    if args.finetune_epochs < 0:
        raise EvaluateError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.layer_decay is not None and not 0.0 < args.layer_decay <= 1.0:
        raise EvaluateError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if not 0.0 < args.test_fraction < 1.0:
        raise EvaluateError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.update_card:
        if not Path(args.model).expanduser().is_dir():
            raise EvaluateError(
                f"--update-card: {args.model} is not a local model folder; --update-card rewrites a local "
                "folder's README.md (download the model, or push the card yourself)"
            )
        if args.revision is not None:
            raise EvaluateError("--update-card cannot be combined with --revision (it rewrites a local folder)")
    if args.output is not None and Path(args.output).expanduser().is_dir():
        raise EvaluateError(f"--output {args.output}: is a folder")


def _finetune_output(args: argparse.Namespace) -> Path:
    if args.finetune_output:
        return Path(args.finetune_output).expanduser()
    if args.output:
        output = Path(args.output).expanduser()
        return output.with_name(f"{output.stem}-finetuned")
    return Path("macrl-finetuned")


@contextlib.contextmanager
def _renamed_warnings() -> Any:
    """``load_model_and_processor`` warns as macrl-extract; say macrl-eval instead."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        text = buffer.getvalue().replace("macrl-extract:", f"{PROG}:")
        if text:
            sys.stderr.write(text)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI's work once the flags are parsed; raises ``EvaluateError`` / ``ExtractError`` /
    ``UnreadableImageError``."""
    total_started = time.perf_counter()
    _check_args(args)
    device = resolve_device(args.device)
    if args.dtype == "bf16" and (warning := slow_bf16_warning(device, "--dtype bf16")):
        print(f"macrl-eval: warning: {warning}", file=sys.stderr)
    show_progress = not args.no_progress and sys.stderr.isatty()
    with _transformers_progress_bars(show_progress), _renamed_warnings():
        model, processor = load_model_and_processor(args.model, args.revision)
    mode = "L" if model.config.num_channels == 1 else "RGB"
    train, test, dataset = load_eval_sources(
        args.data, mode, train_split=args.train_split, test_split=args.test_split,
        image_column=args.image_column, label_column=args.label_column,
        test_fraction=args.test_fraction, seed=args.seed, skip_unreadable=args.skip_unreadable,
    )
    train = limit_source(train, args.limit_train, args.seed)
    test = limit_source(test, args.limit_test, args.seed)
    for role, source in (("training", train), ("test", test)):
        if source.labels is None:
            raise EvaluateError(f"the {role} images ({source.name}) have no labels")

    model_path = Path(args.model).expanduser()
    results: dict[str, Any] = {
        "model": str(model_path.resolve()) if model_path.exists() else args.model,
        "revision": args.revision,
        "data": args.data if args.data is None or not Path(args.data).exists() else str(Path(args.data).resolve()),
        "dataset": dataset.get("dataset_name"),
        "split": dataset.get("split"),
        "model_pooling": model.config.pooling,
        "device": device.type,
        "dtype": args.dtype,
        "seed": args.seed,
        "macrl_version": __version__,
    }
    if args.knn or args.linear_probe:
        pools = None if args.pool == "both" else (args.pool,)
        try:
            results.update(
                evaluate_encoder(
                    model, processor, train, test,
                    knn=args.knn, linear_probe=args.linear_probe, pools=pools,
                    batch_size=args.batch_size, device=device, dtype=args.dtype,
                    knn_k=args.knn_k, knn_temperature=args.knn_temperature, seed=args.seed,
                    num_workers=args.num_workers, skip_unreadable=args.skip_unreadable, progress=show_progress,
                )
            )
        except UnreadableImageError:
            raise
        except ValueError as e:
            raise EvaluateError(first_line(e)) from e
    if args.finetune_epochs > 0 or args.finetune_max_steps:
        from .evaluation.finetune import finetune

        try:
            with _transformers_progress_bars(show_progress):
                tuned = finetune(
                    args.model, train, test,
                    output_dir=_finetune_output(args), epochs=args.finetune_epochs or 1.0,
                    batch_size=args.finetune_batch_size, lr=args.finetune_lr, layer_decay=args.layer_decay,
                    weight_decay=args.weight_decay, seed=args.seed, max_steps=args.finetune_max_steps or -1,
                    revision=args.revision, device=device.type, dtype=args.dtype,
                    num_workers=args.num_workers, progress=show_progress,
                )
        except UnreadableImageError:
            raise
        except ValueError as e:
            raise EvaluateError(f"fine-tuning: {first_line(e)}") from e
        results.update(tuned)
        results.setdefault("train_images", len(train))
        results.setdefault("test_images", len(test))
    results["total_seconds"] = round(time.perf_counter() - total_started, 3)

    print(f"{PROG}: {results['model']} on {dataset.get('dataset_name')} ({dataset.get('split')} split)")
    print(format_table(results))
    if args.output:
        output = Path(args.output).expanduser()
        _write_json_atomically(output, results)
        print(f"results: {output}")
    if args.update_card:
        evaluation = card_evaluation(results, dataset, model.config.pooling)
        if evaluation is None:
            raise EvaluateError("--update-card: no accuracy to write")
        readme = update_model_card(model_path, model.config, evaluation)
        print(f"model card: {readme}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``macrl-eval``. Returns 0 on success, 1 on an unreadable image, 2 on a usage error."""
    return run_command(PROG, build_parser(), run, argv, (EvaluateError, ExtractError, FashionMNISTNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
