"""The strong and weak views of `augmentations.py`, computed for a whole batch of equal-size uint8 images at once.

On small images a per-image torchvision pipeline costs as much as the model's own step (the call overhead of a dozen
small ops, not the pixels), and on a few cores the data-loader worker and the model share them. Here every op runs
once per batch (one `grid_sample` for all crops and flips, one blend per colour op), many times cheaper per image
(benchmarks/results/figures-behind-the-code.md).

Randomness is explicit: each sample brings its own `[NUM_UNIFORMS]` vector of uniforms in [0, 1) (drawn from the
sample's seed by `BatchedTwoViewDataset`), and the augmentation is a pure function of the images and those numbers.
So a view depends on its sample alone, never on the batch it lands in, the number of workers or of processes.

What differs from the per-image pipeline (same parameters, same `AugmentationConfig`):
- crop boxes are continuous (no rounding to whole pixels) and resampled by a bicubic `grid_sample`, without
  antialiasing: meant for images about `image_size` already, where a crop is never shrunk much;
- colour jitter applies brightness, contrast, saturation, hue in that fixed order (torchvision shuffles it per image),
  and hue turns the chroma plane of YIQ space (as NVIDIA DALI does) instead of shifting the H of HSV.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augmentations import MOCO_V3_JITTER, AugmentationConfig

# RandomResizedCrop draws up to 10 (area, ratio) pairs and keeps the first box that fits in the image
CROP_TRIES = 10
# what one view reads from a sample's uniforms (column ranges of the [B, NUM_UNIFORMS] matrix)
_CROP = slice(0, 4 * CROP_TRIES)  # per try: area, log-ratio, left, top
_FLIP = 4 * CROP_TRIES
_JITTER = 4 * CROP_TRIES + 1  # apply?, then brightness, contrast, saturation, hue factors
_GRAYSCALE = _JITTER + 5
_BLUR = _GRAYSCALE + 1  # apply?, sigma
_SOLARIZE = _BLUR + 2
NUM_UNIFORMS = _SOLARIZE + 1
# ITU-R 601 luma, as torchvision's rgb_to_grayscale
_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)  # once at import, not per batch


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


def crop_boxes(
    uniforms: torch.Tensor, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> torch.Tensor:
    """RandomResizedCrop's boxes `[B, 4]` (left, top, box width, box height in pixels) from `uniforms [B, >= 40]`.

    As torchvision's `get_params`: up to 10 tries of an area in `scale` x image area and a log-uniform aspect ratio
    in `ratio`; the first box that fits wins, at a uniform position. If none fits, the largest centred box whose
    aspect ratio is clamped to `ratio`.
    """
    tries = uniforms[:, _CROP].reshape(-1, CROP_TRIES, 4)  # [B, T, 4]
    area = height * width * _uniform(tries[..., 0], *scale)  # [B, T]
    aspect = torch.exp(_uniform(tries[..., 1], math.log(ratio[0]), math.log(ratio[1])))  # [B, T]
    box_w, box_h = (area * aspect).sqrt(), (area / aspect).sqrt()  # [B, T]
    fits = (box_w <= width) & (box_h <= height)  # [B, T]
    first = torch.where(fits.any(dim=1), fits.float().argmax(dim=1), -1)  # [B], -1: no try fits
    pick = first.clamp(min=0).unsqueeze(1)  # [B, 1]
    box_w, box_h = box_w.gather(1, pick).squeeze(1), box_h.gather(1, pick).squeeze(1)  # [B]
    left = tries[..., 2].gather(1, pick).squeeze(1) * (width - box_w)  # [B]
    top = tries[..., 3].gather(1, pick).squeeze(1) * (height - box_h)  # [B]
    # fallback: the whole image, narrowed to the nearest allowed aspect ratio, centred
    image_ratio = width / height
    fallback_w = width if image_ratio <= ratio[1] else height * ratio[1]
    fallback_h = height if image_ratio >= ratio[0] else width / ratio[0]
    none_fits = first < 0
    box_w = torch.where(none_fits, torch.full_like(box_w, fallback_w), box_w)
    box_h = torch.where(none_fits, torch.full_like(box_h, fallback_h), box_h)
    left = torch.where(none_fits, (width - box_w) / 2, left)
    top = torch.where(none_fits, (height - box_h) / 2, top)
    return torch.stack([left, top, box_w, box_h], dim=1)


def resized_crop_and_flip(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop `images [B, C, H, W]` (float) to `boxes [B, 4]`, mirror where `flip [B]`, resample to `[B, C, size, size]`."""
    batch, _, height, width = images.shape
    left, top, box_w, box_h = boxes.unbind(dim=1)  # [B] each
    # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1] (pixel edges, align_corners=False)
    theta = torch.zeros(batch, 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = box_w / width * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = (2 * left + box_w) / width - 1
    theta[:, 1, 1] = box_h / height
    theta[:, 1, 2] = (2 * top + box_h) / height - 1
    grid = F.affine_grid(theta, [batch, images.shape[1], size, size], align_corners=False)  # [B, size, size, 2]
    resampled = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return resampled.clamp(0, 1)  # bicubic overshoots at edges


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's `_blend`: `factor * images + (1 - factor) * other`, clamped to [0, 1]; `factor [B]`."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma `[B, 1, H, W]` of `[B, C, H, W]` (the image itself for 1 channel)."""
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def rotate_hue(images: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Turn the chroma of RGB `images [B, 3, H, W]` by `hue [B]` of a full turn, in YIQ space."""
    angle = 2 * math.pi * hue  # [B]
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(len(hue), 3, 3, dtype=images.dtype)  # [B, 3, 3] on (Y, I, Q): Y stays, (I, Q) turns
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    transform = _YIQ_TO_RGB.to(images.dtype) @ rotation @ _RGB_TO_YIQ.to(images.dtype)  # [B, 3, 3] in RGB
    return torch.einsum("bij,bjhw->bihw", transform, images).clamp(0, 1)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one `sigma [B]` per image, reflect padding (as torchvision)."""
    batch, channels, height, width = images.shape
    offsets = torch.arange(kernel_size, dtype=images.dtype) - (kernel_size - 1) / 2  # [k]
    kernels = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)  # [B, k]
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [B*C, k]
    pad = kernel_size // 2
    x = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernels.view(-1, 1, 1, kernel_size), groups=batch * channels)  # along width
    x = F.conv2d(x, kernels.view(-1, 1, kernel_size, 1), groups=batch * channels)  # along height
    return x.view(batch, channels, height, width)


class BatchAugmentation:
    """One view (`"strong"` or `"weak"`, as `build_strong_transform` / `build_weak_transform`) of a uint8 batch.

    `__call__(images [B, C, H, W] uint8, uniforms [B, NUM_UNIFORMS]) -> [B, C, S, S] float32`, normalised, with
    `S = config.image_size`.
    """

    def __init__(self, config: AugmentationConfig, view: str) -> None:
        if view not in ("strong", "weak"):
            raise ValueError(f"view must be 'strong' or 'weak', got {view!r}")
        self.config = config
        self.view = view
        self.mean = torch.tensor(config.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(config.std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if images.dim() != 4 or images.shape[1] != cfg.num_channels:
            raise ValueError(
                f"Expected {cfg.num_channels}-channel images [B, {cfg.num_channels}, H, W], got {tuple(images.shape)}"
            )
        x = images.float() / 255  # [B, C, H, W] in [0, 1]
        scale = cfg.strong_crop_scale if self.view == "strong" else cfg.weak_crop_scale
        boxes = crop_boxes(uniforms, x.shape[2], x.shape[3], scale, cfg.crop_ratio)  # [B, 4]
        flip = uniforms[:, _FLIP] < cfg.horizontal_flip_prob  # [B]
        x = resized_crop_and_flip(x, boxes, flip, cfg.image_size)  # [B, C, S, S]
        if self.view == "strong":
            x = self._photometric(x, uniforms)
        return (x - self.mean) / self.std

    def _photometric(self, x: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Colour jitter, grayscale, blur and solarize of the strong view, each on its random subset of the batch."""
        cfg = self.config
        if cfg.color_jitter_strength > 0 and cfg.color_jitter_prob > 0:
            jitter = uniforms[:, _JITTER] < cfg.color_jitter_prob  # [B]
            strengths = [value * cfg.color_jitter_strength for value in MOCO_V3_JITTER]
            # a factor of 1 (hue shift 0) leaves an image unchanged: that is what the unjittered ones get
            brightness, contrast, saturation = (
                torch.where(jitter, _uniform(uniforms[:, _JITTER + 1 + k], max(0.0, 1 - s), 1 + s), 1.0)
                for k, s in enumerate(strengths[:3])
            )
            x = _blend(x, torch.zeros_like(x), brightness)
            x = _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), contrast)
            if cfg.num_channels == 3:  # saturation and hue mean nothing for grey pixels
                x = _blend(x, _grayscale(x), saturation)
                hue_strength = min(strengths[3], 0.5)
                hue = torch.where(jitter, _uniform(uniforms[:, _JITTER + 4], -hue_strength, hue_strength), 0.0)
                x = rotate_hue(x, hue)
        if cfg.num_channels == 3 and cfg.grayscale_prob > 0:
            gray = (uniforms[:, _GRAYSCALE] < cfg.grayscale_prob).view(-1, 1, 1, 1)
            x = torch.where(gray, _grayscale(x).expand_as(x), x)
        if cfg.blur_prob > 0 and cfg.image_size >= 3:
            blur = (uniforms[:, _BLUR] < cfg.blur_prob).view(-1, 1, 1, 1)
            sigma = _uniform(uniforms[:, _BLUR + 1], *cfg.blur_sigma)
            x = torch.where(blur, _gaussian_blur(x, sigma, cfg.blur_kernel_size), x)
        if cfg.solarize_prob > 0:
            solarize = (uniforms[:, _SOLARIZE] < cfg.solarize_prob).view(-1, 1, 1, 1)
            # 128 of 255 and above, as the per-image pipeline on uint8 (127.5: resampling leaves float rounding)
            x = torch.where(solarize & (x >= 127.5 / 255), 1 - x, x)
        return x
