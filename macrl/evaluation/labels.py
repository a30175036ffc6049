"""What every evaluation needs of its images: labels, and at least one image on each side."""

from __future__ import annotations

from ..data import ImageSource
from ..errors import InputError

__all__ = ["EvaluationDataError", "check_labelled", "num_classes_of"]


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


def num_classes_of(*sources: ImageSource) -> int:
    """The number of classes of labelled sources: the first `class_names` found, else the largest label + 1."""
    for source in sources:
        if source.class_names:
            return len(source.class_names)
    labels = [label for source in sources for label in (source.labels or [])]
    return max(labels) + 1
