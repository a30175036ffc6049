"""Data layer of macrl: image sources, augmentations and the datasets fed to the model.

Sources (all implement ``ImageSource``):
    ``FashionMNISTSource``  Debian's Fashion-MNIST IDX files (default, offline).
    ``ImageFolderSource``   any folder of image files (``--data DIR``).
    ``HFDatasetSource``     a Hugging Face ``datasets`` dataset (optional dependency,
                            imported only when used).

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
from macrl.data.sources import ImageSource
from macrl.data.two_view_dataset import EvalDataset, TwoViewDataset, derive_sample_seeds

__all__ = [
    "AugmentationConfig",
    "BatchAugmentation",
    "BatchedTwoViewDataset",
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
    "TwoViewCollator",
    "TwoViewDataset",
    "UnreadableImageError",
    "build_eval_transform",
    "build_strong_transform",
    "build_weak_transform",
    "derive_sample_seeds",
    "load_fashion_mnist",
    "open_image",
]
