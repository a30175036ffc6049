"""Image augmentations: a strong view (for the masked encoder), a weak view (for the
momentum encoder) and a deterministic evaluation transform.

Defaults follow MAE for the crop of the strong view (scale (0.2, 1.0), bicubic) and
MoCo v3 / BYOL for the photometric part (colour jitter (0.4, 0.4, 0.2, 0.1) with
p=0.8, grayscale p=0.2, Gaussian blur sigma (0.1, 2.0), solarize p=0.2). MoCo v3 and
BYOL blur one view always and the other with p=0.1, and solarize only the second
view; a single strong view here uses blur p=0.5 (SimCLR's value, the average of
the two) and solarize p=0.2. The weak view only crops (scale (0.6, 1.0)) and flips,
so the momentum encoder's target summarises most of the image.

All transforms run on uint8 ``tv_tensors.Image`` (after ``ToImage``) and end with
``ToDtype(float32, scale=True)`` + ``Normalize``: output is float32 ``[C, H, W]``.
Randomness comes only from the global torch RNG (torchvision v2 semantics), which
``TwoViewDataset`` seeds per sample. ``batch_augmentations.py`` computes the same two
views for a whole batch of equal-size images at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# For 1-channel data without known statistics: maps [0, 1] to [-1, 1].
# (Fashion-MNIST's own values are FASHION_MNIST_MEAN / FASHION_MNIST_STD.)
GRAYSCALE_MEAN: tuple[float] = (0.5,)
GRAYSCALE_STD: tuple[float] = (0.5,)

# MoCo v3's ColorJitter(brightness, contrast, saturation, hue) at strength 1.0.
MOCO_V3_JITTER = (0.4, 0.4, 0.2, 0.1)
# Below this size the eval transform resizes the whole image instead of resizing
# larger and centre-cropping: at 28-32 px the border holds object parts (a
# Fashion-MNIST garment fills its frame), and 12.5% of it is too much to drop.
_MIN_SIZE_FOR_CENTER_CROP = 64


@dataclass
class AugmentationConfig:
    """Parameters of the strong, weak and evaluation transforms.

    Attributes:
        image_size: output height and width in pixels.
        num_channels: 1 (sources in PIL mode ``"L"``) or 3 (``"RGB"``).
        mean, std: per-channel normalisation; ``None`` picks ImageNet's for 3
            channels and (0.5,)/(0.5,) for 1 channel.
        strong_crop_scale: RandomResizedCrop area range of the strong view; MAE's
            (0.2, 1.0): MAE found smaller minimum crops (MoCo's 0.08) hurt when the
            view is also masked, since little of the object would remain visible.
        weak_crop_scale: area range of the weak (momentum) view; milder, (0.6, 1.0).
        crop_ratio: aspect-ratio range of both random crops (the usual 3/4..4/3).
        horizontal_flip_prob: flip probability of both views.
        color_jitter_strength: multiplies MoCo v3's jitter (0.4, 0.4, 0.2, 0.1);
            0 disables jitter. With 1 channel only brightness and contrast apply.
        color_jitter_prob: probability of applying the jitter (0.8, MoCo v3/BYOL).
        grayscale_prob: RandomGrayscale probability (3 channels only; 0.2).
        blur_prob: probability of a Gaussian blur (0.5, see module docstring).
        blur_sigma: blur sigma range, MoCo v3's (0.1, 2.0).
        solarize_prob: solarisation probability (0.2, MoCo v3/BYOL's second view).
        eval_center_crop: evaluation resizes the short side to
            ``image_size / eval_crop_ratio`` then centre-crops; ``False`` resizes the
            whole image to ``image_size`` square; ``None`` = centre-crop only when
            ``image_size >= 64``.
        eval_crop_ratio: fraction kept by the eval centre crop (0.875, as MAE).
        batched: compute the two pre-training views per batch (``batch_augmentations.py``) instead of per image;
            ``None`` = batched when every image of the source has one known size (Fashion-MNIST), which is
            several times cheaper for small images.
    """

    image_size: int = 224
    num_channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    strong_crop_scale: tuple[float, float] = (0.2, 1.0)
    weak_crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip_prob: float = 0.5
    color_jitter_strength: float = 1.0
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.2
    eval_center_crop: bool | None = None
    eval_crop_ratio: float = 0.875
    batched: bool | None = None

    def __post_init__(self) -> None:
        if self.num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {self.num_channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.mean is None:
            self.mean = IMAGENET_MEAN if self.num_channels == 3 else GRAYSCALE_MEAN
        if self.std is None:
            self.std = IMAGENET_STD if self.num_channels == 3 else GRAYSCALE_STD
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        for field_name in ("mean", "std"):
            values = getattr(self, field_name)
            if len(values) != self.num_channels:
                raise ValueError(
                    f"{field_name} has {len(values)} values but num_channels={self.num_channels}"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        for field_name in ("strong_crop_scale", "weak_crop_scale"):
            low, high = getattr(self, field_name)
            if not 0 < low <= high <= 1:
                raise ValueError(
                    f"{field_name} must satisfy 0 < low <= high <= 1, got {(low, high)}"
                )
        for field_name in (
            "horizontal_flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob",
            "solarize_prob",
        ):
            probability = getattr(self, field_name)
            if not 0 <= probability <= 1:
                raise ValueError(f"{field_name} must be in [0, 1], got {probability}")
        if self.color_jitter_strength < 0:
            raise ValueError(
                f"color_jitter_strength must be >= 0, got {self.color_jitter_strength}"
            )
        if not 0 < self.eval_crop_ratio <= 1:
            raise ValueError(f"eval_crop_ratio must be in (0, 1], got {self.eval_crop_ratio}")

    @property
    def pil_mode(self) -> str:
        """The PIL mode sources must produce for these transforms: ``"L"`` or ``"RGB"``."""
        return "L" if self.num_channels == 1 else "RGB"

    @property
    def blur_kernel_size(self) -> int:
        """About 10% of the image size (SimCLR), odd, at least 3, at most the image size."""
        kernel = max(3, int(0.1 * self.image_size))
        if kernel % 2 == 0:
            kernel += 1
        if kernel > self.image_size:  # only for images under 3 px; blur is skipped there
            kernel = self.image_size if self.image_size % 2 == 1 else self.image_size - 1
        return kernel


class RequireChannels:
    """Fail loudly if an image has the wrong number of channels.

    Without it a 1-channel image meets a 3-value ``Normalize`` and silently
    broadcasts to 3 channels (and a 3-channel image crashes deep inside the model).
    """

    def __init__(self, num_channels: int) -> None:
        self.num_channels = num_channels

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-3] != self.num_channels:
            mode = "L" if self.num_channels == 1 else "RGB"
            raise ValueError(
                f"Expected a {self.num_channels}-channel image but got {image.shape[-3]} "
                f"channels; build the image source with mode={mode!r}"
            )
        return image


def _random_crop_and_flip(cfg: AugmentationConfig, scale: tuple[float, float]) -> list[Callable]:
    transforms: list[Callable] = [
        v2.RandomResizedCrop(
            cfg.image_size, scale=scale, ratio=cfg.crop_ratio,
            interpolation=v2.InterpolationMode.BICUBIC, antialias=True,
        )
    ]
    if cfg.horizontal_flip_prob > 0:
        transforms.append(v2.RandomHorizontalFlip(p=cfg.horizontal_flip_prob))
    return transforms


def _to_normalized_float(cfg: AugmentationConfig) -> list[Callable]:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
        v2.ToPureTensor(),  # plain torch.Tensor, not a tv_tensors.Image subclass
    ]


def build_strong_transform(cfg: AugmentationConfig) -> v2.Compose:
    """Strong view: random crop, flip, colour jitter, grayscale, blur, solarize."""
    transforms: list[Callable] = [v2.ToImage(), RequireChannels(cfg.num_channels)]
    transforms += _random_crop_and_flip(cfg, cfg.strong_crop_scale)
    if cfg.color_jitter_strength > 0 and cfg.color_jitter_prob > 0:
        brightness, contrast, saturation, hue = (
            value * cfg.color_jitter_strength for value in MOCO_V3_JITTER
        )
        if cfg.num_channels == 1:  # saturation and hue mean nothing for grey pixels
            jitter = v2.ColorJitter(brightness=brightness, contrast=contrast)
        else:
            jitter = v2.ColorJitter(brightness, contrast, saturation, min(hue, 0.5))
        transforms.append(v2.RandomApply([jitter], p=cfg.color_jitter_prob))
    if cfg.num_channels == 3 and cfg.grayscale_prob > 0:
        transforms.append(v2.RandomGrayscale(p=cfg.grayscale_prob))
    if cfg.blur_prob > 0 and cfg.image_size >= 3:
        blur = v2.GaussianBlur(kernel_size=cfg.blur_kernel_size, sigma=cfg.blur_sigma)
        transforms.append(v2.RandomApply([blur], p=cfg.blur_prob))
    if cfg.solarize_prob > 0:
        # Threshold 128 of 255: the images are still uint8 at this point.
        transforms.append(v2.RandomSolarize(threshold=128, p=cfg.solarize_prob))
    transforms += _to_normalized_float(cfg)
    return v2.Compose(transforms)


def build_weak_transform(cfg: AugmentationConfig) -> v2.Compose:
    """Weak view: a milder random crop and a flip, nothing photometric."""
    transforms: list[Callable] = [v2.ToImage(), RequireChannels(cfg.num_channels)]
    transforms += _random_crop_and_flip(cfg, cfg.weak_crop_scale)
    transforms += _to_normalized_float(cfg)
    return v2.Compose(transforms)


def build_eval_transform(cfg: AugmentationConfig) -> v2.Compose:
    """Deterministic evaluation transform (see ``AugmentationConfig.eval_center_crop``)."""
    center_crop = cfg.eval_center_crop
    if center_crop is None:
        center_crop = cfg.image_size >= _MIN_SIZE_FOR_CENTER_CROP
    transforms: list[Callable] = [v2.ToImage(), RequireChannels(cfg.num_channels)]
    if center_crop:
        resize_to = round(cfg.image_size / cfg.eval_crop_ratio)
        transforms += [
            v2.Resize(resize_to, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(cfg.image_size),
        ]
    else:
        transforms.append(
            v2.Resize(
                (cfg.image_size, cfg.image_size),
                interpolation=v2.InterpolationMode.BICUBIC, antialias=True,
            )
        )
    transforms += _to_normalized_float(cfg)
    return v2.Compose(transforms)
