"""What `macrl-pretrain` trains and evaluates on, from its `--data` and `--eval-data` (`DataOptions`)."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..configuration_macrl import MACRLConfig
from ..data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    HOLDOUT_FRACTION,
    AugmentationConfig,
    BatchedTwoViewDataset,
    DataError,
    DataSplits,
    ImageSource,
    SubsetSource,
    TwoViewCollator,
    TwoViewDataset,
    UnreadableImageError,
    build_strong_transform,
    build_weak_transform,
    open_train_and_test,
)
from ..data.open_data import is_stream, open_stream
from ..data.streaming_two_view_dataset import StreamCollator, StreamingTwoViewDataset
from ..distributed import process_layout
from ..errors import first_line
from ..evaluation.labels import EvaluationDataError, check_labelled, open_labelled


# Fashion-MNIST's garments are centred, upright and 28 px: milder crops than ImageNet's keep most of the garment in
# both views, and no blur keeps its few pixels of texture; the tuning runs chose them
# (benchmarks/results/quality/tuning-4min.md).
FASHION_MNIST_AUGMENTATION: dict = dict(strong_crop_scale=(0.5, 1.0), weak_crop_scale=(0.8, 1.0), blur_prob=0.0)


@dataclass(frozen=True)
class DataOptions:
    """What a run reads and how: the values of the `macrl-pretrain` flags of the same names (`PretrainingArguments`
    documents each), and the data-loading workers of each process, which the run's plan decides."""

    data: str | None  # None: Fashion-MNIST
    eval_data: str | None
    eval_split: str | None
    eval_images: int
    hold_out: bool  # hold --data's own evaluation images out of training (`--knn`: the evaluation at the end)
    seed: int
    streaming: bool
    shuffle_buffer: int
    image_column: str | None
    label_column: str | None
    limit_images: int | None
    skip_unreadable: bool
    num_workers: int
    train_labels: bool = False  # the training batches carry their images' labels (`--online-probe`)


@dataclass
class PretrainingData:
    """The training dataset and the images a run is evaluated on.

    Without `--eval-data` the evaluation images come from `--data` (its test split or seeded held-out part, the
    training images as the kNN memory); with it, both sides come from `--eval-data` and all of `--data` is trained on.
    """

    train: TwoViewDataset | StreamingTwoViewDataset
    collator: TwoViewCollator | StreamCollator | None  # the DataLoader's collate_fn; None: the default one
    train_source: ImageSource | None  # the training images; None for a stream (no random access)
    eval_source: ImageSource | None  # the kNN queries / probe test set (and the reconstruction pictures)
    eval_split: str | None  # where eval_source comes from: "test", the named split or "held-out"
    augmentation: AugmentationConfig
    dataset_name: str  # of the training data
    skipped: list[tuple[str, str]]
    num_images: int | None = None  # images per epoch; None: a stream of unknown length
    knn_train_source: ImageSource | None = None  # the kNN memory / probe training set
    eval_dataset_name: str | None = None  # the dataset eval_source belongs to (the model card's), if not --data's
    eval_data: str | None = None  # --eval-data as results.json records it (a resolved path or a dataset name)

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, StreamingTwoViewDataset)

    def labelled_evaluation(self) -> tuple[ImageSource, ImageSource] | None:
        """(kNN memory / probe training images, kNN queries / probe test images), or None where there are no
        labelled images on both sides (a stream without `--eval-data`, an unlabelled folder): what every evaluation
        of the run (the kNN monitor, the final kNN / linear probe, the raw-pixel floor) reads."""
        memory, queries = self.knn_train_source, self.eval_source
        if memory is None or queries is None or memory.labels is None or queries.labels is None:
            return None
        return memory, queries

    def probe_collator(self):
        """The collate_fn of a timing probe (which trains no model of the run: no data positions)."""
        return StreamCollator(self.collator.inner, positions=False) if self.streamed else self.collator

    def picture_images(self, count: int) -> list:
        """Up to `count` fixed images to draw reconstructions of: the evaluation images (`--eval-data`'s test
        images, else `--data`'s held-out ones), else the training images, spread evenly over them from the first
        (a folder lists its images class by class, so its first few are often all of one class); a stream's are its
        first shard's first images."""
        if self.eval_source is not None or not self.streamed:
            shown = self.eval_source or self.train_source
            count = min(count, len(shown))
            images = []
            for index in (i * len(shown) // count for i in range(count)):
                try:
                    images.append(shown.load_image(index))
                except UnreadableImageError:  # a picture fewer; the evaluation names or skips the image
                    continue
            return images
        images = []
        for sample in self.train.stream.samples(0):
            try:
                images.append(sample.decode(self.train.mode))
            except ValueError:  # an unreadable image: the next one
                continue
            if len(images) == count:
                break
        return images


def build_augmentation(config: MACRLConfig, data: str | None, changes: dict) -> AugmentationConfig:
    """The augmentations for `config`'s image size and channels: defaults, then `changes` (`--augmentation`'s
    fields). The embedded Fashion-MNIST default (`data` None) gets its own statistics and `FASHION_MNIST_AUGMENTATION`.
    """
    fashion = data is None and config.num_channels == 1
    defaults = {**FASHION_MNIST_AUGMENTATION, "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD} if fashion else {}
    return AugmentationConfig(
        image_size=config.image_size,
        num_channels=config.num_channels,
        **{**defaults, **changes},
    )


def build_pretraining_data(
    options: DataOptions, config: MACRLConfig, augmentation: AugmentationConfig
) -> PretrainingData:
    """Sources and the seeded two-view dataset for `config`'s image size and channels.

    The kNN images are `options.eval_data`'s (`open_eval_data`), else the data's test split, else (with
    `options.hold_out`) the seeded held-out split of `macrl.data.splits`, at most `options.eval_images` of them,
    which `macrl-eval` holds out too. With `options.eval_data` nothing of `--data` is held out.

    Raises:
        DataError: `--data` or `--eval-data` cannot be opened (or `--eval-data` has no labels), or the images cannot
            be augmented in batches as asked.
    """
    mode = "L" if config.num_channels == 1 else "RGB"
    if is_stream(options.data, options.streaming):
        data = _build_streamed(options, config, augmentation, mode)
    else:
        data = _build_random_access(options, config, augmentation, mode)
    if options.eval_data is None:
        return data
    memory, queries, splits = open_eval_data(options, mode)
    return dataclasses.replace(
        data, knn_train_source=memory, eval_source=queries, eval_split=splits.test_split,
        eval_dataset_name=splits.dataset_type, eval_data=_recorded(options.eval_data),
    )


def open_eval_data(options: DataOptions, mode: str) -> tuple[ImageSource, ImageSource, DataSplits]:
    """`--eval-data` opened as `macrl-eval --data` opens its data: (its training split, the kNN memory; its test
    split or seeded held-out part, at most `options.eval_images`, the kNN queries; the `DataSplits`), in PIL `mode`.

    The held-out part is `macrl-eval --seed S`'s (the same fraction and seed), so a released encoder's figure can
    be reproduced there. The column flags and `options.eval_split` (`macrl-eval --test-split`) apply to it when it is a
    `datasets` dataset.

    Raises:
        DataError: it cannot be opened or has no labels; the message starts with `--eval-data`.
    """
    if is_stream(options.eval_data):
        raise DataError(
            f"--eval-data {options.eval_data}: shards are a stream, without the random access an evaluation needs; "
            "give a folder of class subfolders or a `datasets` dataset"
        )
    try:
        splits = open_labelled(
            options.eval_data, mode, test_split=options.eval_split,
            holdout_fraction=HOLDOUT_FRACTION, max_holdout=options.eval_images, seed=options.seed,
            image_column=options.image_column, label_column=options.label_column,
            skip_unreadable=options.skip_unreadable,
        )
        memory, queries = splits.train, _at_most(splits.test, options.eval_images)
        check_labelled(memory, queries)
    except DataError as error:  # its message starts with the data's name
        raise DataError(f"--eval-data {first_line(error)}") from error
    except EvaluationDataError as error:
        raise DataError(f"--eval-data {options.eval_data}: {first_line(error)}") from error
    if options.eval_split is not None and splits.test_split != options.eval_split:  # a folder: no splits to name
        raise DataError(
            f"--eval-split {options.eval_split}: --eval-data {options.eval_data} is a folder, which has no splits (its "
            "seeded held-out part is the test set); drop --eval-split"
        )
    return memory, queries, splits


def _recorded(data: str) -> str:
    """A local `--eval-data` as an absolute path (results.json is read from elsewhere); a dataset name as given."""
    path = Path(data).expanduser()
    return str(path.resolve()) if path.exists() else data


def _at_most(source: ImageSource | None, count: int) -> ImageSource | None:
    """The first `count` images of `source`: a test split capped as it always was (the held-out split is capped by
    `holdout_split` itself)."""
    if source is None or len(source) <= count:
        return source
    return SubsetSource(source, range(count), source.name)


def _build_random_access(
    options: DataOptions, config: MACRLConfig, augmentation: AugmentationConfig, mode: str
) -> PretrainingData:
    """`build_pretraining_data` for data read with random access: a folder, a dataset, Fashion-MNIST."""
    own_eval = options.eval_data is None  # with --eval-data, all of --data is trained on
    splits = open_train_and_test(
        options.data, mode, holdout_fraction=HOLDOUT_FRACTION, max_holdout=options.eval_images, seed=options.seed,
        hold_out=options.hold_out and own_eval, image_column=options.image_column, label_column=options.label_column,
        skip_unreadable=options.skip_unreadable,
    )
    train_source, eval_source = splits.train, splits.test if own_eval else None
    if options.limit_images is not None:
        kept = range(min(options.limit_images, len(train_source)))
        train_source = SubsetSource(train_source, kept, train_source.name)
    eval_source = _at_most(eval_source, options.eval_images)
    batched = augmentation.batched
    if batched is None:
        batched = train_source.image_size is not None
    elif batched and train_source.image_size is None:
        raise DataError(
            f"the images of {train_source.name} may differ in size, so they cannot be augmented in batches "
            '(--augmentation {"batched": true}); leave "batched" unset'
        )
    augmentation = dataclasses.replace(augmentation, batched=batched)  # results.json records what ran
    train, collator = _two_views(train_source, augmentation, config, options.seed, options.train_labels)
    return PretrainingData(
        train, collator, train_source, eval_source, splits.test_split if own_eval else None, augmentation,
        splits.dataset_type, splits.skipped, len(train), knn_train_source=train_source,
    )


def _two_views(
    source: ImageSource | None, augmentation: AugmentationConfig, config: MACRLConfig, seed: int, labels: bool = False
):
    """The seeded two-view dataset of `source` (None: a stream's, fed image by image) and its DataLoader collate_fn:
    whole batches augmented in the collate step when `augmentation.batched`, else per-image transforms; with
    `labels`, the batches carry the images' labels (where `source` has them)."""
    if augmentation.batched:
        dataset = BatchedTwoViewDataset(source, num_patches=config.num_patches, seed=seed, labels=labels)
        return dataset, TwoViewCollator(augmentation)
    strong, weak = build_strong_transform(augmentation), build_weak_transform(augmentation)
    return TwoViewDataset(source, strong, weak, num_patches=config.num_patches, seed=seed, labels=labels), None


def _build_streamed(
    options: DataOptions, config: MACRLConfig, augmentation: AugmentationConfig, mode: str
) -> PretrainingData:
    """`build_pretraining_data` for shards or a streaming dataset: no held-out images (no random access to hold
    them out by), per-image views unless `--augmentation {"batched": true}` says the images share one size."""
    stream = open_stream(options.data, mode, image_column=options.image_column, label_column=options.label_column)
    processes = process_layout().processes
    readers = processes * max(options.num_workers, 1)
    if len(stream.shards) < readers:
        raise DataError(
            f"{options.data}: {len(stream.shards)} shards cannot be split across {processes} processes x "
            f"{max(options.num_workers, 1)} workers (each reader needs a shard of its own): use more shards or fewer "
            "--num-workers"
        )
    batched = bool(augmentation.batched)
    augmentation = dataclasses.replace(augmentation, batched=batched)
    views, inner = _two_views(None, augmentation, config, options.seed)
    train = StreamingTwoViewDataset(
        stream, views, mode, buffer_size=options.shuffle_buffer, skip_unreadable=options.skip_unreadable
    )
    try:
        count = stream.count_images(tolerate=options.skip_unreadable)
    except ValueError as error:  # UnreadableShardError: a local shard that is not a tar
        raise DataError(f"{options.data}: {error}") from error
    train.images_per_epoch = count
    return PretrainingData(
        train, StreamCollator(inner), None, None, None, augmentation, stream.name, [], count
    )
