"""Data layer of macrl: image sources, augmentations and the datasets fed to the model.

Sources (all implement ``ImageSource``):
    ``FashionMNISTSource``  Debian's Fashion-MNIST IDX files (default, offline).
    ``ImageFolderSource``   any folder of image files (``--data DIR``).
    ``HFDatasetSource``     a Hugging Face ``datasets`` dataset (optional dependency,
                            imported only when used).

Opening ``--data``: ``open_source`` / ``open_train_and_test`` (``macrl.data.open_data``), the one resolver every
command uses; subsets and the one held-out split: ``macrl.data.splits``.

Streams (pre-training at scale, read shard by shard): ``WebDatasetShards`` (tar shards), ``HFStreamingShards``
(a streaming ``datasets`` dataset), opened by ``open_stream``.

Datasets: ``TwoViewDataset`` (pre-training, per-image views), ``BatchedTwoViewDataset`` + ``TwoViewCollator``
(pre-training, views per batch, for images of one size), ``StreamingTwoViewDataset`` + ``StreamCollator``
(pre-training from a stream: split across processes and workers, seeded by image key, resumable) and ``EvalDataset``.
"""

from macrl.data.augmentations import (
    AugmentationConfig,
    build_eval_transform,
    build_strong_transform,
    build_weak_transform,
)
from macrl.data.batch_augmentations import BatchAugmentation
from macrl.data.batched_two_view_dataset import BatchedTwoViewDataset, TwoViewCollator
from macrl.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNISTNotFoundError,
    FashionMNISTSource,
    load_fashion_mnist,
)
from macrl.data.hf_datasets import HFDatasetSource
from macrl.data.image_folder import (
    IMAGE_EXTENSIONS,
    ImageFolderSource,
    UnreadableImageError,
    open_image,
)
from macrl.data.open_data import (
    DataError,
    DataSplits,
    is_stream,
    looks_like_hub_id,
    open_source,
    open_stream,
    open_train_and_test,
)
from macrl.data.shards import UnreadableShardError, WebDatasetShards, looks_like_shards
from macrl.data.streaming_two_view_dataset import StreamCollator, StreamingTwoViewDataset, StreamPositions
from macrl.data.sources import ImageSource
from macrl.data.splits import HOLDOUT_FRACTION, SubsetSource, holdout_count, holdout_split, limit_source
from macrl.data.two_view_dataset import EvalDataset, TwoViewDataset, derive_sample_seeds

__all__ = [
    "HOLDOUT_FRACTION",
    "AugmentationConfig",
    "BatchAugmentation",
    "BatchedTwoViewDataset",
    "DataError",
    "DataSplits",
    "EvalDataset",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FashionMNISTNotFoundError",
    "FashionMNISTSource",
    "HFDatasetSource",
    "IMAGE_EXTENSIONS",
    "ImageFolderSource",
    "ImageSource",
    "StreamCollator",
    "StreamPositions",
    "StreamingTwoViewDataset",
    "SubsetSource",
    "TwoViewCollator",
    "TwoViewDataset",
    "UnreadableImageError",
    "UnreadableShardError",
    "WebDatasetShards",
    "build_eval_transform",
    "build_strong_transform",
    "build_weak_transform",
    "derive_sample_seeds",
    "holdout_count",
    "holdout_split",
    "limit_source",
    "load_fashion_mnist",
    "is_stream",
    "looks_like_hub_id",
    "looks_like_shards",
    "open_image",
    "open_source",
    "open_stream",
    "open_train_and_test",
]
