"""Real Fashion-MNIST images as a `datasets` DatasetDict saved with `save_to_disk`, like a user's own saved dataset."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from macrl.data.fashion_mnist import load_fashion_mnist


def write_dataset_dict(folder: Path, splits: dict[str, int | list[int]]) -> Path:
    """`splits` as a DatasetDict of Fashion-MNIST test images (an `image` column and a 10-class `label` ClassLabel)
    saved to `folder`: a split given a count holds that many images with their labels, one given a list as many
    images with those labels (-1: `datasets`' missing label, as in ImageNet's test split); the splits take
    consecutive images. Returns `folder`."""
    import datasets  # the [test] extra installs it

    images, labels = load_fashion_mnist("test")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    tables, start = {}, 0
    for name, rows in splits.items():
        count = rows if isinstance(rows, int) else len(rows)
        split_labels = labels[start:start + count].tolist() if isinstance(rows, int) else list(rows)
        tables[name] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(images[i].numpy()) for i in range(start, start + count)], "label": split_labels},
            features=features,
        )
        start += count
    datasets.DatasetDict(tables).save_to_disk(folder)
    return folder
