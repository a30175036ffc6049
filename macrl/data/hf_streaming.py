"""A streaming ``datasets`` dataset (``--data NAME --streaming``) as a stream of images, read one shard at a time.

``datasets.load_dataset(..., streaming=True)`` gives an ``IterableDataset`` of ``n_shards`` shards (its data files);
`StreamingTwoViewDataset` decides which process and worker reads which shard, in what order, and where a resumed run
starts (``IterableDataset.shard`` + ``skip``), as it does for WebDataset shards. The columns are detected as for
`HFDatasetSource`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .hf_datasets import find_image_column, find_label_column, import_datasets
from .shards import StreamSample

__all__ = ["HFStreamingShards"]


class HFStreamingShards:
    """One split of a dataset, streamed.

    Raises:
        ImportError: ``datasets`` is not installed.
        ValueError: unknown split, or no usable image / label column.
    """

    def __init__(
        self,
        name_or_path: str,
        split: str = "train",
        image_column: str | None = None,
        label_column: str | None = None,
        mode: str = "RGB",
        load_kwargs: dict[str, Any] | None = None,
    ) -> None:
        datasets = import_datasets()
        self.mode = mode
        self.name = f"{name_or_path}[{split}]"
        self.image_size: tuple[int, int] | None = None
        dataset = datasets.load_dataset(str(name_or_path), split=split, streaming=True, **(load_kwargs or {}))
        if not isinstance(dataset, datasets.IterableDataset):
            raise ValueError(f"{name_or_path} gave a {type(dataset).__name__}, not a streaming IterableDataset")
        features = dataset.features
        if features is None:  # formats that learn their columns from the first rows
            dataset = dataset._resolve_features()
            features = dataset.features
        columns = list(features)
        image_column = image_column or find_image_column(features, datasets)
        if image_column is None or image_column not in features:
            raise ValueError(f"No image column in {self.name} (columns: {columns}); pass image_column=...")
        if label_column is not None and label_column not in features:
            raise ValueError(f"Label column {label_column!r} not in {self.name} (columns: {columns})")
        self.image_column = image_column
        self.label_column = label_column or find_label_column(features, datasets)
        self._dataset = dataset.select_columns([c for c in (image_column, self.label_column) if c])
        self.shards = [f"{self.name} shard {index}" for index in range(dataset.n_shards)]
        info = getattr(dataset, "info", None)
        splits = getattr(info, "splits", None) or {}
        self._count = splits[split].num_examples if split in splits and splits[split].num_examples else None

    def count_images(self, tolerate: bool = False) -> int | None:
        """The split's number of rows where the dataset's metadata records it, else None."""
        return self._count

    def samples(self, shard_index: int, skip: int = 0) -> Iterator[StreamSample]:
        """The rows of shard ``shard_index`` after its first ``skip`` (``IterableDataset.skip``)."""
        shard = self._dataset.shard(num_shards=len(self.shards), index=shard_index, contiguous=True)
        if skip:
            shard = shard.skip(skip)
        row = skip
        # iter(), not iteration: in a DataLoader worker, iterating an IterableDataset reads only "its" share of the
        # shards (datasets splits them across workers itself), and this one shard is the share of worker 0
        for rows in shard.iter(batch_size=64):
            labels = rows[self.label_column] if self.label_column else [None] * len(rows[self.image_column])
            for value, label in zip(rows[self.image_column], labels):
                if isinstance(value, dict):  # an Image feature with decode=False
                    value = value.get("bytes") or open(value["path"], "rb").read()
                yield StreamSample(f"{shard_index}/{row}", self.shards[shard_index], value,
                                   label if isinstance(label, int) else None)
                row += 1
