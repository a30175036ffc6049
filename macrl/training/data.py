"""What `macrl-pretrain` trains and evaluates on, from its `--data` argument."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..configuration_macrl import MACRLConfig
from ..data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    AugmentationConfig,
    FashionMNISTSource,
    HFDatasetSource,
    ImageFolderSource,
    BatchedTwoViewDataset,
    ImageSource,
    TwoViewCollator,
    TwoViewDataset,
    build_strong_transform,
    build_weak_transform,
)


# Fashion-MNIST's garments are centred, upright and 28 px: milder crops than ImageNet's keep most of the garment in
# both views, and no blur keeps its few pixels of texture. Together +1.7 kNN points in the tuning runs
# (benchmarks/results/quality/tuning-4min.md).
FASHION_MNIST_AUGMENTATION: dict = dict(strong_crop_scale=(0.5, 1.0), weak_crop_scale=(0.8, 1.0), blur_prob=0.0)


class SubsetSource:
    """The images of `source` at `indices`, in that order, as an `ImageSource`."""

    def __init__(self, source: ImageSource, indices: list[int], name: str):
        self.source = source
        self.indices = list(indices)
        self.name = name
        self.class_names = source.class_names
        self.image_size = source.image_size
        self.labels = None if source.labels is None else [source.labels[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load_image(self, index: int) -> Image.Image:
        return self.source.load_image(self.indices[index])

    def describe(self, index: int) -> str:
        return self.source.describe(self.indices[index])


@dataclass
class PretrainingData:
    """The training dataset and the held-out images of a run."""

    train: TwoViewDataset
    collator: TwoViewCollator | None  # the DataLoader's collate_fn; None: the default one
    train_source: ImageSource
    eval_source: ImageSource | None  # labelled held-out images (kNN test set, reconstruction pictures)
    augmentation: AugmentationConfig
    dataset_name: str
    skipped: list[tuple[str, str]]


def _split_off_holdout(source: ImageSource, count: int, seed: int) -> tuple[ImageSource, ImageSource]:
    """A seeded random `count` images held out of `source` (at most 10%), and the rest."""
    count = min(count, len(source) // 10)
    order = np.random.default_rng(seed).permutation(len(source))
    held_out, rest = sorted(order[:count].tolist()), sorted(order[count:].tolist())
    return SubsetSource(source, rest, f"{source.name}/train"), SubsetSource(source, held_out, f"{source.name}/held-out")


def _load_sources(data: str | None, mode: str, args) -> tuple[ImageSource, ImageSource | None, str, list]:
    """(training images, labelled held-out images or None, dataset name for the model card, skipped files)."""
    if data is None:
        return FashionMNISTSource("train", mode=mode), FashionMNISTSource("test", mode=mode), "fashion_mnist", []
    path = Path(data)
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        folder = ImageFolderSource(path, mode=mode, skip_unreadable=args.skip_unreadable)
        source, holdout = folder, None
        if folder.labels is not None and args.knn_eval:
            source, holdout = _split_off_holdout(folder, args.eval_images, args.seed)
        return source, holdout, path.name, folder.skipped
    source = HFDatasetSource(data, "train", image_column=args.image_column, label_column=args.label_column, mode=mode)
    try:
        holdout = HFDatasetSource(
            data, "test", image_column=args.image_column, label_column=args.label_column, mode=mode
        )
    except (ValueError, KeyError):
        holdout = None
        if source.labels is not None and args.knn_eval:
            source, holdout = _split_off_holdout(source, args.eval_images, args.seed)
    return source, holdout, data, []


def build_augmentation(args, config: MACRLConfig) -> AugmentationConfig:
    """The augmentations for `config`'s image size and channels: defaults, then `--augmentation`'s fields.

    The embedded Fashion-MNIST default gets its own statistics and `FASHION_MNIST_AUGMENTATION`.
    """
    fashion = args.data is None and config.num_channels == 1
    defaults = {**FASHION_MNIST_AUGMENTATION, "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD} if fashion else {}
    return AugmentationConfig(
        image_size=config.image_size,
        num_channels=config.num_channels,
        **{**defaults, **args.augmentation_changes()},
    )


def build_pretraining_data(args, config: MACRLConfig, augmentation: AugmentationConfig) -> PretrainingData:
    """Sources and the seeded two-view dataset for `config`'s image size and channels."""
    mode = "L" if config.num_channels == 1 else "RGB"
    train_source, eval_source, dataset_name, skipped = _load_sources(args.data, mode, args)
    if args.limit_images is not None:
        train_source = SubsetSource(train_source, range(min(args.limit_images, len(train_source))), train_source.name)
    if eval_source is not None and len(eval_source) > args.eval_images:
        eval_source = SubsetSource(eval_source, range(args.eval_images), eval_source.name)
    batched = augmentation.batched
    if batched is None:
        batched = train_source.image_size is not None
    elif batched and train_source.image_size is None:
        raise ValueError(
            f"the images of {train_source.name} may differ in size, so they cannot be augmented in batches "
            '(--augmentation {"batched": true}); leave "batched" unset'
        )
    augmentation = dataclasses.replace(augmentation, batched=batched)  # results.json records what ran
    if batched:
        train = BatchedTwoViewDataset(train_source, num_patches=config.num_patches, seed=args.seed)
        collator = TwoViewCollator(augmentation)
    else:
        strong, weak = build_strong_transform(augmentation), build_weak_transform(augmentation)
        train = TwoViewDataset(train_source, strong, weak, num_patches=config.num_patches, seed=args.seed)
        collator = None
    return PretrainingData(train, collator, train_source, eval_source, augmentation, dataset_name, skipped)
