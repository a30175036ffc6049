"""A Hugging Face ``datasets`` dataset as an ``ImageSource``.

``datasets`` is an optional dependency (``pip install 'macrl[datasets]'``); it is
imported only when an ``HFDatasetSource`` is built, so ``import macrl.data`` never
needs it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from macrl.data.image_folder import DECODE_ERRORS, UnreadableImageError, decode_image
from macrl.image_processing_macrl import convert_image_mode

_IMAGE_COLUMN_NAMES = ("image", "img")
_LABEL_COLUMN_NAMES = ("label", "labels")

# Files that `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write; a folder
# without them (e.g. a folder of images) goes through `load_dataset` instead.
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def import_datasets() -> Any:
    """Import ``datasets`` or explain how to install it."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "Hugging Face `datasets` is needed to read a dataset by name or from "
            "save_to_disk; install it with: pip install 'macrl[datasets]'"
        ) from e
    return datasets


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder that `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote."""
    return path.is_dir() and any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS)


def find_image_column(features: Any, datasets: Any) -> str | None:
    """The column of `features` that holds the images: the first `datasets.Image` feature, else a usual name."""
    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            return column
    for column in _IMAGE_COLUMN_NAMES:
        if column in features:
            return column
    return None


def find_label_column(features: Any, datasets: Any) -> str | None:
    """The column of `features` that holds the labels: the first `datasets.ClassLabel` feature, else a usual name."""
    for column, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return column
    for column in _LABEL_COLUMN_NAMES:
        if column in features:
            return column
    return None


class HFDatasetSource:
    """One split of a Hugging Face dataset as an ``ImageSource``.

    Args:
        name_or_path: a folder written by ``save_to_disk`` (read with
            ``load_from_disk``), or anything ``load_dataset`` accepts (a Hub name,
            a local folder of images or data files).
        split: which split to use.
        image_column: the image column; auto-detected if ``None`` (the first
            ``datasets.Image`` feature, else a column named ``image`` / ``img``).
        label_column: the label column; auto-detected if ``None`` (the first
            ``ClassLabel`` feature, else ``label`` / ``labels``); no label column
            means ``labels is None``. Labels must be integers.
        mode: ``"RGB"`` or ``"L"``.
        load_kwargs: extra keyword arguments for ``load_dataset`` (``cache_dir``,
            ``data_dir``, ``revision``, ...).

    Raises:
        ImportError: ``datasets`` is not installed.
        ValueError: unknown split, or no usable image / label column.
    """

    def __init__(
        self,
        name_or_path: str | Path,
        split: str = "train",
        image_column: str | None = None,
        label_column: str | None = None,
        mode: str = "RGB",
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
        datasets = import_datasets()
        self.mode = mode
        self.split = split
        self.name = f"{name_or_path}[{split}]"

        if is_saved_dataset(Path(name_or_path)):
            loaded = datasets.load_from_disk(str(name_or_path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(
                        f"Split {split!r} not in {name_or_path}; available: {sorted(loaded)}"
                    )
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(str(name_or_path), split=split, **(load_kwargs or {}))
        if not isinstance(loaded, datasets.Dataset):
            raise ValueError(
                f"{name_or_path} gave a {type(loaded).__name__}; a map-style "
                "datasets.Dataset is needed (streaming datasets are not supported)"
            )

        features = loaded.features
        columns = list(features)
        image_column = image_column or find_image_column(features, datasets)
        if image_column is None or image_column not in features:
            raise ValueError(
                f"No image column in {self.name} (columns: {columns}); "
                "pass image_column=..."
            )
        if label_column is not None and label_column not in features:
            raise ValueError(
                f"Label column {label_column!r} not in {self.name} (columns: {columns})"
            )
        label_column = label_column or find_label_column(features, datasets)
        self.image_column = image_column
        self.label_column = label_column

        self.labels: list[int] | None = None
        self.class_names: list[str] | None = None
        self.image_size: tuple[int, int] | None = None  # rows may differ; known only after decoding each
        if label_column is not None:
            label_feature = features[label_column]
            if isinstance(label_feature, datasets.ClassLabel):
                self.class_names = list(label_feature.names)
            labels = list(loaded[label_column])
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
                raise ValueError(
                    f"Label column {label_column!r} of {self.name} is not integer class "
                    f"indices (feature {label_feature}); cast it with "
                    "dataset.class_encode_column(...) first"
                )
            # -1 is how `datasets` writes a missing ClassLabel: a split labelled -1 throughout (ImageNet's test
            # split) has no labels, as one without the column
            self.labels = None if labels and all(label == -1 for label in labels) else labels

        # Keep only the image column so that indexing decodes nothing else.
        self._images = loaded.select_columns([image_column])

    def __len__(self) -> int:
        return len(self._images)

    def load_image(self, index: int) -> Image.Image:
        try:
            value = self._images[index][self.image_column]
            if isinstance(value, dict):  # an Image feature with decode=False: the same checks as image files
                raw = value.get("bytes")
                return decode_image(io.BytesIO(raw) if raw else value["path"], self.mode)
            if not isinstance(value, Image.Image):
                raise TypeError(
                    f"column {self.image_column!r} holds {type(value).__name__}, not an image"
                )
            value.load()
            return convert_image_mode(value, self.mode)
        except (*DECODE_ERRORS, TypeError) as e:
            raise UnreadableImageError(
                f"Cannot read image {self.describe(index)}: {type(e).__name__}: {e}"
            ) from e

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"
