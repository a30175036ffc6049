"""Pre-training samples whose two views are computed per batch, in the DataLoader's collate step.

`TwoViewDataset` runs torchvision's per-image transforms in `__getitem__`; for small images of one size (Fashion-MNIST)
that per-image overhead is what a 2-core machine spends half its time on. Here `__getitem__` returns the raw uint8
image with the uniforms its views will use, and `TwoViewCollator` augments the whole batch at once
(`batch_augmentations.py`), as transformers' masked-LM collator masks a batch. Seeds still come from
`(seed, epoch, index)` alone, so everything `TwoViewDataset` promises about workers, processes and resuming holds.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .augmentations import AugmentationConfig
from .batch_augmentations import NUM_UNIFORMS, BatchAugmentation
from .sources import ImageSource
from .two_view_dataset import TwoViewDataset


class BatchedTwoViewDataset(TwoViewDataset):
    """`TwoViewDataset` whose samples are augmented later, by `TwoViewCollator`.

    ``__getitem__(i)`` returns::

        {"images":                uint8   [C, H, W], the image as the source gives it,
         "augmentation_uniforms": float32 [2, NUM_UNIFORMS], in [0, 1): strong view's row, then weak view's,
         "noise":                 float32 [num_patches], as TwoViewDataset
         "labels":                int, as TwoViewDataset (only with ``labels``)}

    Use it with ``DataLoader(dataset, collate_fn=TwoViewCollator(augmentation))``; every image of a batch must have
    the same size.
    """

    def __init__(self, source: ImageSource, num_patches: int, seed: int = 0, labels: bool = False):
        # no per-image transforms: the views are made from the raw images by TwoViewCollator
        super().__init__(source, strong=None, weak=None, num_patches=num_patches, seed=seed, labels=labels)

    def views(self, image: Image.Image, augmentation_seed: int) -> dict[str, torch.Tensor]:
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H, W] or [H, W, C]
        pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)  # [C, H, W]
        generator = torch.Generator().manual_seed(augmentation_seed)
        uniforms = torch.rand(2, NUM_UNIFORMS, generator=generator)  # [2, K]
        return {"images": pixels.contiguous(), "augmentation_uniforms": uniforms}


class TwoViewCollator:
    """DataLoader ``collate_fn`` turning `BatchedTwoViewDataset` samples into the model's inputs.

    Returns ``{"pixel_values": strong [B, C, S, S], "momentum_pixel_values": weak [B, C, S, S], "noise": [B, L]}``,
    and ``"labels": int64 [B]`` where the samples have labels.
    """

    def __init__(self, augmentation: AugmentationConfig) -> None:
        self.strong = BatchAugmentation(augmentation, "strong")
        self.weak = BatchAugmentation(augmentation, "weak")

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        sizes = sorted({tuple(sample["images"].shape) for sample in samples})
        if len(sizes) > 1:
            raise ValueError(
                f"A batch holds images of different sizes {sizes} ([C, H, W]); batched augmentation needs images of "
                'one size (set --augmentation \'{"batched": false}\' for the per-image pipeline)'
            )
        images = torch.stack([sample["images"] for sample in samples])  # [B, C, H, W] uint8
        uniforms = torch.stack([sample["augmentation_uniforms"] for sample in samples])  # [B, 2, K]
        batch = {
            "pixel_values": self.strong(images, uniforms[:, 0]),
            "momentum_pixel_values": self.weak(images, uniforms[:, 1]),
            "noise": torch.stack([sample["noise"] for sample in samples]),
        }
        if "labels" in samples[0]:
            batch["labels"] = torch.tensor([sample["labels"] for sample in samples])  # [B]
        return batch
