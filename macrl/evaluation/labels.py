"""What every evaluation needs of its images: labels, and at least one image on each side."""

from __future__ import annotations

from ..data import DataSplits, ImageSource, open_train_and_test
from ..errors import InputError

__all__ = ["EvaluationDataError", "check_labelled", "num_classes_of", "open_labelled"]


class EvaluationDataError(InputError):
    """Images to evaluate on cannot be used: no labels, none at all, labels out of range, too few to split."""


def check_labelled(*sources: ImageSource, num_classes: int | None = None) -> None:
    """Raise `EvaluationDataError` unless every source (training images first, then test images) has images and
    labels, in `[0, num_classes)` when `num_classes` is given."""
    for role, source in zip(("training", "test"), sources):
        if source.labels is None:
            raise EvaluationDataError(
                f"the {role} images ({source.name}) have no labels; evaluation needs labels: put the images in one "
                "subfolder per class (DATA/<class>/<image>), name the label column, or name a labelled split"
            )
        if len(source) == 0:
            raise EvaluationDataError(f"the {role} images ({source.name}) are empty")
        if (lowest := min(source.labels)) < 0:  # -1: a row `datasets` marks as unlabelled
            raise EvaluationDataError(
                f"the {role} images ({source.name}) have label {lowest} (an unlabelled row); evaluation needs every "
                "image labelled"
            )
        if num_classes is not None:
            bad = [label for label in source.labels if not 0 <= label < num_classes]
            if bad:
                raise EvaluationDataError(
                    f"the {role} images ({source.name}) have label {bad[0]} outside [0, {num_classes})"
                )


def open_labelled(data: str | None, mode: str, **splitting) -> DataSplits:
    """`open_train_and_test(data, mode, **splitting)` for an evaluation, the one way `macrl-eval --data` and
    `macrl-pretrain --eval-data` open theirs: where nothing could be held out because the training images have no
    labels, that is said at once (`EvaluationDataError`) rather than as a missing test set. The callers cap the
    splits, then `check_labelled` both.

    Raises:
        DataError: the data cannot be opened.
        EvaluationDataError: the training images have no labels and there is no test split.
    """
    splits = open_train_and_test(data, mode, **splitting)
    if splits.test is None:  # nothing held out: the training images have no labels to hold out by
        check_labelled(splits.train)
    return splits


def num_classes_of(*sources: ImageSource) -> int:
    """The number of classes of labelled sources: the first `class_names` found, else the largest label + 1."""
    for source in sources:
        if source.class_names:
            return len(source.class_names)
    labels = [label for source in sources for label in (source.labels or [])]
    return max(labels) + 1
