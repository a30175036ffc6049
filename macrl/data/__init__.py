"""Data layer of macrl: image sources, augmentations and the datasets fed to the model.

Sources (all implement ``ImageSource``):
    ``FashionMNISTSource``  Debian's Fashion-MNIST IDX files (default, offline).
    ``ImageFolderSource``   any folder of image files (``--data DIR``).
    ``HFDatasetSource``     a Hugging Face ``datasets`` dataset (optional dependency,
                            imported only when used).

Opening ``--data``: ``open_source`` / ``open_train_and_test`` (``macrl.data.open_data``), the one resolver every
command uses; subsets and the one held-out split: ``macrl.data.splits``.

Datasets: ``TwoViewDataset`` (pre-training, per-image views), ``BatchedTwoViewDataset`` + ``TwoViewCollator``
(pre-training, views per batch, for images of one size) and ``EvalDataset``.
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
from macrl.data.open_data import DataError, DataSplits, looks_like_hub_id, open_source, open_train_and_test
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
    "SubsetSource",
    "TwoViewCollator",
    "TwoViewDataset",
    "UnreadableImageError",
    "build_eval_transform",
    "build_strong_transform",
    "build_weak_transform",
    "derive_sample_seeds",
    "holdout_count",
    "holdout_split",
    "limit_source",
    "load_fashion_mnist",
    "looks_like_hub_id",
    "open_image",
    "open_source",
    "open_train_and_test",
]
