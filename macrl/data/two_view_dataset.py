"""Datasets feeding the model: two augmented views + masking noise for pre-training,
one deterministic view (+ label) for evaluation.

Every random number of pre-training sample ``i`` comes from seeds derived from
``(seed, epoch, i)`` alone, never from the process's RNG. So a batch is the same
whatever ``num_workers``, however many processes share the data, and a resumed
run sees exactly the views and masks the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from macrl.data.sources import ImageSource

Transform = Callable[[Image.Image], torch.Tensor]


def derive_sample_seeds(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """Two independent 64-bit seeds for one sample: (augmentations, masking noise).

    ``SeedSequence`` hashes the triple, so neighbouring indices or epochs give
    unrelated streams; two separate seeds keep the crop and the mask uncorrelated
    (one seed for both would hand them the same first random numbers).
    """
    augmentation_seed, noise_seed = np.random.SeedSequence([seed, epoch, index]).generate_state(
        2, dtype=np.uint64
    )
    return int(augmentation_seed), int(noise_seed)


class TwoViewDataset(Dataset):
    """Pre-training samples: a strong view, a weak view and per-patch masking noise.

    ``__getitem__(i)`` returns::

        {"pixel_values":          strong(image)  float32 [C, H, W],
         "momentum_pixel_values": weak(image)    float32 [C, H, W],
         "noise":                 float32 [num_patches], uniform in [0, 1),
         "labels":                int, the image's class (only with ``labels`` and a labelled source)}

    ``noise`` is what MAE-style random masking argsorts to pick the visible patches.

    The transforms draw from the global torch RNG (as torchvision v2 does); it is
    forked, seeded per sample and restored around them, so the caller's RNG state is
    untouched. The epoch lives in shared memory: ``set_epoch`` reaches DataLoader
    workers that already exist (``persistent_workers=True``) as long as it is called
    before the epoch's ``iter(loader)``.

    Args:
        source: the images.
        strong: transform for the masked (online) encoder's view (``None`` in a subclass that makes views elsewhere).
        weak: transform for the momentum encoder's view (idem).
        num_patches: length of the noise vector (patches per image).
        seed: base seed of the run (>= 0).
        labels: also return each image's label, where the source has labels (for an online probe).
    """

    def __init__(
        self,
        source: ImageSource,
        strong: Transform | None,
        weak: Transform | None,
        num_patches: int,
        seed: int = 0,
        labels: bool = False,
    ) -> None:
        if num_patches < 1:
            raise ValueError(f"num_patches must be positive, got {num_patches}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.source = source
        self.strong = strong
        self.weak = weak
        self.num_patches = num_patches
        self.seed = seed
        self.labels = labels and source.labels is not None
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose views and noise ``__getitem__`` produces."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:  # ds[-1] must equal ds[len - 1], seeds included
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        augmentation_seed, noise_seed = derive_sample_seeds(self.seed, self.epoch, index)
        noise_generator = torch.Generator().manual_seed(noise_seed)
        noise = torch.rand(self.num_patches, generator=noise_generator, dtype=torch.float32)
        sample = {**self.views(self.source.load_image(index), augmentation_seed), "noise": noise}
        if self.labels:
            sample["labels"] = self.source.labels[index]
        return sample

    def views(self, image: Image.Image, augmentation_seed: int) -> dict[str, torch.Tensor]:
        """``pixel_values`` (strong view) and ``momentum_pixel_values`` (weak view) of one image."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed)
            strong_view = self.strong(image)
            weak_view = self.weak(image)
        return {"pixel_values": strong_view, "momentum_pixel_values": weak_view}


class EvalDataset(Dataset):
    """Evaluation samples: ``{"pixel_values", "labels" (if the source has them), "index"}``.

    ``labels`` and ``index`` are Python ints (the default collate makes int64 tensors).
    """

    def __init__(self, source: ImageSource, transform: Transform) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if index < 0:
            index += len(self)
        sample: dict[str, torch.Tensor | int] = {
            "pixel_values": self.transform(self.source.load_image(index)),
            "index": index,
        }
        if self.source.labels is not None:
            sample["labels"] = self.source.labels[index]
        return sample
