"""The one way every command opens its ``--data``: Fashion-MNIST, a folder of images, or a ``datasets`` dataset, all
read with random access; or, for pre-training at scale, a stream: WebDataset tar shards or a streaming ``datasets``
dataset (``open_stream``).

``open_source`` turns the argument into an ``ImageSource``; ``open_train_and_test`` also finds the images to
evaluate on: the data's own test split where it has one, else the seeded held-out split of ``macrl.data.splits``
(the same images for ``macrl-pretrain`` and ``macrl-eval``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from macrl.data.fashion_mnist import FashionMNISTSource
from macrl.data.hf_datasets import HFDatasetSource, is_saved_dataset
from macrl.data.image_folder import ImageFolderSource
from macrl.data.shards import looks_like_shards
from macrl.data.sources import ImageSource
from macrl.data.splits import HOLDOUT_FRACTION, holdout_split
from macrl.errors import InputError, first_line

__all__ = [
    "DataError", "DataSplits", "is_stream", "looks_like_hub_id", "open_source", "open_stream", "open_train_and_test",
]

# A Hub repo id is "name" or "owner/name" from [A-Za-z0-9_.-]; anything else that does not exist on disk can only be
# a mistyped local path.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class DataError(InputError):
    """``--data`` cannot be opened: a missing or empty folder, an unknown dataset, split or column, no labels where
    labels are needed, ``datasets`` not installed. The message starts with the data's name."""


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` could be a Hub repo id (``name`` or ``owner/name``) rather than a local path."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~"))


def open_source(
    data: str | None,
    mode: str,
    *,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    skip_unreadable: bool = False,
) -> ImageSource:
    """The images that ``--data`` names, in PIL ``mode`` (``"L"`` or ``"RGB"``).

    * ``None``: Fashion-MNIST's ``split`` from Debian's ``dataset-fashion-mnist``;
    * a folder that ``save_to_disk`` did not write: every image file under it (``ImageFolderSource``; ``split`` does
      not apply), with ``skip_unreadable`` checking every file first;
    * a ``save_to_disk`` folder or a dataset name: that dataset's ``split`` (``HFDatasetSource``).

    Raises:
        DataError: the data cannot be opened; the message names it and why.
    """
    where = "Fashion-MNIST" if data is None else data
    try:
        if data is None:
            return FashionMNISTSource(split, mode=mode)
        path = Path(data).expanduser()
        if path.is_dir() and not is_saved_dataset(path):
            return ImageFolderSource(path, mode=mode, skip_unreadable=skip_unreadable)
        if not path.exists() and not looks_like_hub_id(data):
            raise DataError(f"{where}: folder not found")
        name = str(path) if path.exists() else data
        return HFDatasetSource(name, split=split, image_column=image_column, label_column=label_column, mode=mode)
    except DataError:
        raise
    except (OSError, ValueError, ImportError, KeyError) as error:  # a missing Fashion-MNIST file is an OSError
        raise DataError(f"{where}: {first_line(error)}") from error


def is_stream(data: str | None, streaming: bool = False) -> bool:
    """Whether ``--data`` is read as a stream (``open_stream``): WebDataset shards, or anything with ``--streaming``."""
    return data is not None and (streaming or looks_like_shards(data))


def open_stream(
    data: str,
    mode: str,
    *,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
):
    """The images that ``--data`` names as a stream of shards (a ``ShardStream``), in PIL ``mode``:

    * WebDataset tar shards (``looks_like_shards``: ``shards/train-{000000..000999}.tar``, a ``pipe:`` command, a
      ``.tar`` path or URL): ``WebDatasetShards``;
    * anything else: ``datasets.load_dataset(data, split=split, streaming=True)`` (``HFStreamingShards``).

    Raises:
        DataError: the data cannot be opened; the message names it and why.
    """
    from macrl.data.hf_streaming import HFStreamingShards
    from macrl.data.shards import UnreadableShardError, WebDatasetShards

    try:
        if looks_like_shards(data):
            return WebDatasetShards(data, mode=mode)
        path = Path(data).expanduser()
        if not path.exists() and not looks_like_hub_id(data):
            raise DataError(f"{data}: folder not found")
        return HFStreamingShards(str(path) if path.exists() else data, split=split, image_column=image_column,
                                 label_column=label_column, mode=mode)
    except DataError:
        raise
    except (OSError, ValueError, ImportError, KeyError, UnreadableShardError) as error:
        raise DataError(f"{data}: {first_line(error)}") from error


@dataclass
class DataSplits:
    """Training images and the images to evaluate on, as ``open_train_and_test`` found them."""

    train: ImageSource
    test: ImageSource | None  # None: nothing to evaluate on (no test split and no labels to hold out by)
    dataset_type: str  # for model cards: "fashion_mnist", a folder's name, or the dataset's name
    dataset_name: str  # the same, as a reader would write it ("Fashion-MNIST")
    test_split: str | None  # "test", the named split, "held-out", or None
    skipped: list[tuple[str, str]]  # (path, reason) of the unreadable files a folder left out (skip_unreadable)


def open_train_and_test(
    data: str | None,
    mode: str,
    *,
    train_split: str = "train",
    test_split: str | None = None,
    holdout_fraction: float = HOLDOUT_FRACTION,
    max_holdout: int | None = None,
    seed: int = 0,
    hold_out: bool = True,
    image_column: str | None = None,
    label_column: str | None = None,
    skip_unreadable: bool = False,
) -> DataSplits:
    """``open_source`` for the training images, and the images to evaluate on.

    The test images are the data's own test split (Fashion-MNIST's, a dataset's ``test_split`` or ``"test"``);
    where there is none and the training images have labels, the seeded held-out split of the training images
    (``holdout_split(train, holdout_fraction, seed, max_holdout)``), which are then left out of ``train``. With
    ``hold_out=False`` nothing is held out (``test`` is None unless the data has a test split).

    Raises:
        DataError: the data or a named ``test_split`` cannot be opened.
    """
    common = dict(image_column=image_column, label_column=label_column, skip_unreadable=skip_unreadable)
    train = open_source(data, mode, split=train_split, **common)
    if data is None:
        names = ("fashion_mnist", "Fashion-MNIST")
    else:
        path = Path(data).expanduser()
        names = (path.resolve().name,) * 2 if path.exists() else (data, data)
    skipped = list(getattr(train, "skipped", []))
    if not isinstance(train, ImageFolderSource):  # folders have no splits
        try:
            test = open_source(data, mode, split=test_split or "test", **common)
            return DataSplits(train, test, *names, test_split or "test", skipped)
        except DataError:
            if test_split is not None:
                raise
    if not hold_out or train.labels is None:
        return DataSplits(train, None, *names, None, skipped)
    try:
        rest, held_out = holdout_split(train, holdout_fraction, seed, max_holdout)
    except ValueError as error:
        raise DataError(f"{data}: {error}") from error
    return DataSplits(rest, held_out, *names, "held-out", skipped)

