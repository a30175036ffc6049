"""What `macrl-pretrain` trains and evaluates on, from its `--data` argument."""

import dataclasses
from dataclasses import dataclass

from ..configuration_macrl import MACRLConfig
from ..data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    HOLDOUT_FRACTION,
    AugmentationConfig,
    BatchedTwoViewDataset,
    DataError,
    ImageSource,
    SubsetSource,
    TwoViewCollator,
    TwoViewDataset,
    build_strong_transform,
    build_weak_transform,
    open_train_and_test,
)


# Fashion-MNIST's garments are centred, upright and 28 px: milder crops than ImageNet's keep most of the garment in
# both views, and no blur keeps its few pixels of texture; the tuning runs chose them
# (benchmarks/results/quality/tuning-4min.md).
FASHION_MNIST_AUGMENTATION: dict = dict(strong_crop_scale=(0.5, 1.0), weak_crop_scale=(0.8, 1.0), blur_prob=0.0)


@dataclass
class PretrainingData:
    """The training dataset and the held-out images of a run."""

    train: TwoViewDataset
    collator: TwoViewCollator | None  # the DataLoader's collate_fn; None: the default one
    train_source: ImageSource
    eval_source: ImageSource | None  # labelled held-out images (kNN test set, reconstruction pictures)
    eval_split: str | None  # where eval_source comes from: "test" or "held-out"
    augmentation: AugmentationConfig
    dataset_name: str
    skipped: list[tuple[str, str]]


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
    """Sources and the seeded two-view dataset for `config`'s image size and channels.

    The kNN images are the data's test split, else (with `args.knn`) the seeded held-out split of
    `macrl.data.splits`, at most `args.eval_images` of them, which `macrl-eval` holds out too.

    Raises:
        DataError: `--data` cannot be opened, or its images cannot be augmented in batches as asked.
    """
    mode = "L" if config.num_channels == 1 else "RGB"
    splits = open_train_and_test(
        args.data, mode, holdout_fraction=HOLDOUT_FRACTION, max_holdout=args.eval_images, seed=args.seed,
        hold_out=args.knn, image_column=args.image_column, label_column=args.label_column,
        skip_unreadable=args.skip_unreadable,
    )
    train_source, eval_source = splits.train, splits.test
    if args.limit_images is not None:
        train_source = SubsetSource(train_source, range(min(args.limit_images, len(train_source))), train_source.name)
    if eval_source is not None and len(eval_source) > args.eval_images:
        eval_source = SubsetSource(eval_source, range(args.eval_images), eval_source.name)
    batched = augmentation.batched
    if batched is None:
        batched = train_source.image_size is not None
    elif batched and train_source.image_size is None:
        raise DataError(
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
    return PretrainingData(
        train, collator, train_source, eval_source, splits.test_split, augmentation, splits.dataset_type, splits.skipped
    )
