"""Batched two-view augmentation: the maths of each op, and the dataset + collator on real Fashion-MNIST images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from macrl.data import (
    AugmentationConfig,
    BatchAugmentation,
    BatchedTwoViewDataset,
    FashionMNISTSource,
    TwoViewCollator,
    TwoViewDataset,
)
from macrl.data.batch_augmentations import NUM_UNIFORMS, rotate_hue, crop_boxes, resized_crop_and_flip
from macrl.presets import load_config
from macrl.training.arguments import PretrainingArguments
from macrl.training.data import build_pretraining_data
from macrl.training.plan import plan_run

_NO_PHOTOMETRIC = dict(color_jitter_strength=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


@pytest.fixture(scope="module")
def fashion_images() -> torch.Tensor:
    """64 real Fashion-MNIST test images as a uint8 batch [64, 1, 28, 28]."""
    source = FashionMNISTSource("test")
    return torch.stack([torch.from_numpy(np.array(source.load_image(i))) for i in range(64)])[:, None]


def _uniforms(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, NUM_UNIFORMS, generator=torch.Generator().manual_seed(seed))


def _normalised(images: torch.Tensor, cfg: AugmentationConfig) -> torch.Tensor:
    mean, std = torch.tensor(cfg.mean).view(1, -1, 1, 1), torch.tensor(cfg.std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def test_full_image_crop_without_flip_or_colour_is_the_identity(fashion_images):
    cfg = AugmentationConfig(
        image_size=28, num_channels=1, strong_crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
        horizontal_flip_prob=0.0, **_NO_PHOTOMETRIC,
    )
    out = BatchAugmentation(cfg, "strong")(fashion_images, _uniforms(64))
    torch.testing.assert_close(out, _normalised(fashion_images, cfg), atol=1e-5, rtol=0)


def test_flip_mirrors_exactly_the_chosen_images(fashion_images):
    cfg = AugmentationConfig(
        image_size=28, num_channels=1, weak_crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), horizontal_flip_prob=0.5
    )
    uniforms = _uniforms(64)
    out = BatchAugmentation(cfg, "weak")(fashion_images, uniforms)
    expected = _normalised(fashion_images, cfg)
    flipped = uniforms[:, 40] < 0.5
    assert 10 < int(flipped.sum()) < 54
    expected[flipped] = expected[flipped].flip(-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_crop_boxes_follow_random_resized_crop():
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    boxes = crop_boxes(_uniforms(4096), 28, 20, scale, ratio)
    left, top, width, height = boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + width <= 20 + 1e-4).all() and (top + height <= 28 + 1e-4).all()
    area = width * height / (28 * 20)
    assert area.min() >= scale[0] - 1e-4 and area.max() <= scale[1] + 1e-4
    assert (width / height).min() >= ratio[0] - 1e-4 and (width / height).max() <= ratio[1] + 1e-4
    assert area.std() > 0.1 and left.std() > 1  # random, not a constant box


def test_crop_boxes_fall_back_to_the_centred_clamped_box():
    # no area-1 box with aspect ratio in [2, 3] fits a square image: torchvision takes the full width, height w / 2
    boxes = crop_boxes(_uniforms(8), 28, 28, (1.0, 1.0), (2.0, 3.0))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 7.0, 28.0, 14.0]]).expand(8, 4))


def test_resized_crop_takes_the_box_content():
    image = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8) / 64
    box = torch.tensor([[4.0, 2.0, 4.0, 4.0]])  # left 4, top 2, 4x4
    out = resized_crop_and_flip(image, box, torch.tensor([False]), size=4)
    torch.testing.assert_close(out, image[:, :, 2:6, 4:8], atol=1e-6, rtol=0)
    mirrored = resized_crop_and_flip(image, box, torch.tensor([True]), size=4)
    torch.testing.assert_close(mirrored, image[:, :, 2:6, 4:8].flip(-1), atol=1e-6, rtol=0)


def test_solarize_inverts_bright_pixels_only(fashion_images):
    cfg = AugmentationConfig(
        image_size=28, num_channels=1, strong_crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), horizontal_flip_prob=0.0,
        **{**_NO_PHOTOMETRIC, "solarize_prob": 1.0}, mean=(0.0,), std=(1.0,),
    )
    out = BatchAugmentation(cfg, "strong")(fashion_images, _uniforms(64))
    pixels = fashion_images.float() / 255
    expected = torch.where(fashion_images >= 128, 1 - pixels, pixels)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_jitter_and_blur_change_images_but_keep_the_range(fashion_images):
    cfg = AugmentationConfig(
        image_size=28, num_channels=1, strong_crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), horizontal_flip_prob=0.0,
        color_jitter_prob=1.0, blur_prob=1.0, solarize_prob=0.0, mean=(0.0,), std=(1.0,),
    )
    out = BatchAugmentation(cfg, "strong")(fashion_images, _uniforms(64))
    assert out.min() >= 0 and out.max() <= 1
    changed = (out - fashion_images.float() / 255).abs().flatten(1).amax(1)
    assert (changed > 0.01).all()
    constant = torch.full((4, 1, 28, 28), 100, dtype=torch.uint8)  # blur keeps a flat image flat (reflect padding)
    blurred = BatchAugmentation(AugmentationConfig(**{**cfg.__dict__, "color_jitter_prob": 0.0}), "strong")
    torch.testing.assert_close(blurred(constant, _uniforms(4)), constant.float() / 255, atol=1e-6, rtol=0)


def test_rgb_views_and_hue_rotation_keeps_greys():
    cfg = AugmentationConfig(image_size=16, num_channels=3, color_jitter_prob=1.0, grayscale_prob=0.5)
    images = torch.randint(0, 256, (32, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    strong = BatchAugmentation(cfg, "strong")(images, _uniforms(32))
    assert strong.shape == (32, 3, 16, 16) and torch.isfinite(strong).all()
    grey = torch.rand(5, 1, 6, 6).expand(5, 3, 6, 6)
    torch.testing.assert_close(rotate_hue(grey, torch.linspace(-0.5, 0.5, 5)), grey, atol=1e-5, rtol=0)
    colour = torch.rand(2, 3, 4, 4) * 0.5 + 0.25
    assert not torch.allclose(rotate_hue(colour, torch.tensor([0.1, 0.1])), colour, atol=1e-3)
    torch.testing.assert_close(rotate_hue(colour, torch.zeros(2)), colour, atol=1e-5, rtol=0)


def test_wrong_channels_and_mixed_sizes_are_named():
    cfg = AugmentationConfig(image_size=28, num_channels=1)
    with pytest.raises(ValueError, match="Expected 1-channel images"):
        BatchAugmentation(cfg, "weak")(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), _uniforms(2))
    samples = [
        {"images": torch.zeros(1, size, size, dtype=torch.uint8), "augmentation_uniforms": torch.rand(2, NUM_UNIFORMS),
         "noise": torch.rand(16)}
        for size in (28, 32)
    ]
    with pytest.raises(ValueError, match=r"different sizes \[\(1, 28, 28\), \(1, 32, 32\)\]"):
        TwoViewCollator(cfg)(samples)


def test_batched_dataset_is_seeded_per_sample_whatever_the_workers():
    source = FashionMNISTSource("test")
    cfg = AugmentationConfig(image_size=28, num_channels=1)
    dataset = BatchedTwoViewDataset(source, num_patches=16, seed=3)
    collate = TwoViewCollator(cfg)
    in_process = list(DataLoader(dataset, sampler=list(range(12)), batch_size=4, collate_fn=collate))
    workers = list(DataLoader(dataset, sampler=list(range(12)), batch_size=4, collate_fn=collate, num_workers=2))
    regrouped = list(DataLoader(dataset, sampler=list(range(12)), batch_size=6, collate_fn=collate))
    for key in ("pixel_values", "momentum_pixel_values", "noise"):
        one = torch.cat([batch[key] for batch in in_process])
        assert one.shape[0] == 12
        torch.testing.assert_close(one, torch.cat([batch[key] for batch in workers]), atol=0, rtol=0)
        # a view depends on its sample alone, not on the batch around it (up to float rounding of batched kernels)
        torch.testing.assert_close(one, torch.cat([batch[key] for batch in regrouped]), atol=1e-5, rtol=0)
    dataset.set_epoch(1)
    assert not torch.equal(collate([dataset[0]])["pixel_values"], in_process[0]["pixel_values"][:1])


def _data(**changes):
    """`build_pretraining_data` as a run of the tiny preset with these flags plans it."""
    plan = plan_run(PretrainingArguments(output_dir="unused", config="tiny", **changes))
    return build_pretraining_data(plan.data, plan.config, plan.augmentation)


def test_pretraining_data_batches_fashion_mnist_and_not_folders(tmp_path: Path):
    config = load_config("tiny")
    fashion = _data()
    assert isinstance(fashion.train, BatchedTwoViewDataset) and isinstance(fashion.collator, TwoViewCollator)
    assert fashion.augmentation.batched is True  # resolved, for results.json
    batch = fashion.collator([fashion.train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 28, 28) and batch["noise"].shape == (4, config.num_patches)

    fashion = _data(augmentation='{"batched": false}')
    assert type(fashion.train) is TwoViewDataset and fashion.collator is None

    for index in range(12):
        Image.new("L", (28 + index, 28), index * 20).save(tmp_path / f"{index}.png")
    data = _data(data=str(tmp_path), knn=False)
    assert type(data.train) is TwoViewDataset and data.collator is None and data.augmentation.batched is False
    with pytest.raises(ValueError, match="may differ in size"):
        _data(data=str(tmp_path), knn=False, augmentation='{"batched": true}')
    assert len(data.train) == 12
