"""Tests of macrl.data on real data: Debian's Fashion-MNIST files and image files
written with PIL into tmp_path (16-bit, palette + transparency, CMYK, animated,
truncated, ...)."""

from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from macrl.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGE_EXTENSIONS,
    AugmentationConfig,
    EvalDataset,
    FashionMNISTNotFoundError,
    FashionMNISTSource,
    HFDatasetSource,
    ImageFolderSource,
    ImageSource,
    TwoViewDataset,
    UnreadableImageError,
    build_eval_transform,
    build_strong_transform,
    build_weak_transform,
    load_fashion_mnist,
)

INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def fashion_test() -> FashionMNISTSource:
    return FashionMNISTSource("test")


def _rgb_image(size: tuple[int, int] = (16, 12), colour=(200, 30, 60)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _write(path: Path, image: Image.Image, **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_kwargs)
    return path


def _stored_mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def _tiny_config(num_channels: int = 1, image_size: int = 28) -> AugmentationConfig:
    return AugmentationConfig(image_size=image_size, num_channels=num_channels)


def _two_view(source: ImageSource, cfg: AugmentationConfig, seed: int = 0) -> TwoViewDataset:
    num_patches = (cfg.image_size // 4) ** 2
    return TwoViewDataset(
        source, build_strong_transform(cfg), build_weak_transform(cfg), num_patches, seed=seed
    )


def _assert_same_sample(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_train_split_is_complete_and_balanced():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [6000] * 10
    scaled = images.float() / 255
    assert scaled.mean().item() == pytest.approx(FASHION_MNIST_MEAN[0], abs=1e-4)
    assert scaled.std().item() == pytest.approx(FASHION_MNIST_STD[0], abs=1e-4)


def test_fashion_mnist_test_split_and_source(fashion_test: FashionMNISTSource):
    images, labels = load_fashion_mnist("test", root=FASHION_MNIST_DIR)
    assert images.shape == (10000, 28, 28)
    assert isinstance(fashion_test, ImageSource)
    assert len(fashion_test) == 10000 and fashion_test.name == "fashion-mnist/test"
    assert fashion_test.class_names == FASHION_MNIST_CLASSES and len(FASHION_MNIST_CLASSES) == 10
    assert fashion_test.labels == labels.tolist()
    image = fashion_test.load_image(3)
    assert image.mode == "L" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image), images[3].numpy())
    assert "3" in fashion_test.describe(3)
    rgb = FashionMNISTSource("test", mode="RGB").load_image(3)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 1], images[3].numpy())


def test_fashion_mnist_unknown_split_lists_valid_ones():
    with pytest.raises(ValueError, match="valid splits") as info:
        load_fashion_mnist("validation")
    assert "'train'" in str(info.value) and "'test'" in str(info.value)


def test_fashion_mnist_missing_files_give_install_hint(tmp_path: Path):
    with pytest.raises(FashionMNISTNotFoundError) as info:
        load_fashion_mnist("test", root=tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert INSTALL_HINT in message and "--data DIR" in message
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in message


def _fashion_copy_with_labels(tmp_path: Path, labels_gz: bytes) -> Path:
    """A Fashion-MNIST folder with the real test images and the given labels file."""
    (tmp_path / "t10k-images-idx3-ubyte.gz").symlink_to(
        FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    )
    labels_path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels_path.write_bytes(labels_gz)
    return labels_path


def _real_test_labels() -> bytes:
    return gzip.decompress((FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda raw: gzip.compress(raw[:-10]), "10008 bytes"),  # truncated payload
        (lambda raw: gzip.compress(b"\x00\x00\x08\x03" + raw[4:]), "magic number 2051"),
        (lambda raw: gzip.compress(raw[:6]), "shorter than"),  # truncated header
        (lambda raw: gzip.compress(raw)[:500], "cannot decompress"),  # cut gzip stream
        (lambda raw: raw, "cannot decompress"),  # not gzip at all
        (lambda raw: gzip.compress(raw[:-1] + b"\x0a"), "label 10"),
    ],
)
def test_fashion_mnist_corrupt_labels_file(tmp_path: Path, corrupt, expected: str):
    labels_path = _fashion_copy_with_labels(tmp_path, corrupt(_real_test_labels()))
    with pytest.raises(ValueError, match=expected) as info:
        load_fashion_mnist("test", root=tmp_path)
    assert str(labels_path) in str(info.value)


def test_fashion_mnist_count_mismatch_names_both_files(tmp_path: Path):
    raw = _real_test_labels()
    fewer = (9999).to_bytes(4, "big")
    _fashion_copy_with_labels(tmp_path, gzip.compress(raw[:4] + fewer + raw[8:-1]))
    with pytest.raises(ValueError, match="10000 images but .* 9999 labels"):
        load_fashion_mnist("test", root=tmp_path)


# --------------------------------------------------------------------------- image folder


def test_class_subfolders_give_sorted_labels(tmp_path: Path):
    _write(tmp_path / "dog" / "b.jpg", _rgb_image())
    _write(tmp_path / "dog" / "nested" / "c.webp", _rgb_image())
    _write(tmp_path / "cat" / "a.PNG", _rgb_image())  # extension match is case-insensitive
    _write(tmp_path / "cat" / ".hidden.png", _rgb_image())  # hidden: ignored
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    source = ImageFolderSource(tmp_path)
    assert isinstance(source, ImageSource)
    assert [Path(source.describe(i)).name for i in range(len(source))] == [
        "a.PNG", "b.jpg", "c.webp",
    ]
    assert source.class_names == ["cat", "dog"]
    assert source.labels == [0, 1, 1]
    assert source.describe(1) == str(tmp_path / "dog" / "b.jpg")


def test_flat_or_mixed_folder_is_unlabelled(tmp_path: Path):
    _write(tmp_path / "top.png", _rgb_image())
    _write(tmp_path / "cat" / "a.png", _rgb_image())
    source = ImageFolderSource(tmp_path, mode="L")
    assert len(source) == 2 and source.labels is None and source.class_names is None
    assert source.load_image(0).mode == "L"


def test_empty_and_missing_folders(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError) as info:
        ImageFolderSource(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert all(ext in str(info.value) for ext in IMAGE_EXTENSIONS)
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ImageFolderSource(missing)


def test_every_accepted_format_loads(tmp_path: Path):
    colour = (10, 200, 90)
    for extension in ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"):
        _write(tmp_path / f"x.{extension}", _rgb_image(colour=colour), **(
            {"quality": 100} if extension in ("jpg", "jpeg", "webp") else {}
        ))
    _write(tmp_path / "x.pgm", Image.new("L", (16, 12), 77))
    source = ImageFolderSource(tmp_path)
    assert len(source) == 10
    for index in range(len(source)):
        image = source.load_image(index)
        assert image.mode == "RGB" and image.size == (16, 12), source.describe(index)
        expected = (77, 77, 77) if source.describe(index).endswith(".pgm") else colour
        assert np.abs(np.asarray(image)[6, 8].astype(int) - expected).max() <= 8


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    png = _write(tmp_path / "a16.png", Image.fromarray(values))
    tif = _write(tmp_path / "b16.tif", Image.fromarray(values))
    int32 = _write(tmp_path / "c32.tif", Image.fromarray(values.astype(np.int32)))
    assert _stored_mode(png) == "I;16" and _stored_mode(int32) == "I"
    source = ImageFolderSource(tmp_path, mode="L")
    for index in range(3):
        assert np.asarray(source.load_image(index)).tolist() == [[0, 1, 128, 255]]
    rgb = ImageFolderSource(tmp_path, mode="RGB").load_image(0)
    assert np.asarray(rgb)[0, 2].tolist() == [128, 128, 128]


def test_transparency_is_composited_on_white(tmp_path: Path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0])  # index 0 red, index 1 green
    palette.putpixel((1, 0), 1)
    _write(tmp_path / "a_palette.png", palette, transparency=0)  # red is transparent
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    _write(tmp_path / "b_rgba.png", rgba)
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (40, 255)])
    _write(tmp_path / "c_la.png", la)
    assert _stored_mode(tmp_path / "a_palette.png") == "P"
    source = ImageFolderSource(tmp_path)
    assert np.asarray(source.load_image(0)).tolist() == [[[255, 255, 255], [0, 255, 0]]]
    pixels = np.asarray(source.load_image(1)).astype(int)
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 1].tolist() == [255, 0, 0]
    assert np.all(np.abs(pixels[0, 2] - 127) <= 1)
    grey = ImageFolderSource(tmp_path, mode="L").load_image(2)
    assert np.asarray(grey).tolist() == [[255, 40]]


def test_cmyk_bilevel_animated_and_exif_rotation(tmp_path: Path):
    _write(tmp_path / "a_cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100)
    _write(tmp_path / "b_bilevel.png", Image.new("1", (4, 4), 1))
    red, blue = Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))
    _write(tmp_path / "c_anim.gif", red, save_all=True, append_images=[blue], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    _write(tmp_path / "d_rotated.jpg", _rgb_image(size=(8, 4)), exif=exif)
    with Image.open(tmp_path / "c_anim.gif") as animated:
        assert animated.n_frames == 2
    assert _stored_mode(tmp_path / "a_cmyk.jpg") == "CMYK"

    source = ImageFolderSource(tmp_path)
    cmyk = np.asarray(source.load_image(0)).astype(int)[4, 4]
    assert cmyk[0] > 230 and cmyk[1] < 30 and cmyk[2] < 30  # C=0 M=Y=100% is red
    assert np.asarray(source.load_image(1)).min() == 255  # "1" white stays white
    assert np.asarray(source.load_image(2))[3, 3].tolist() == [255, 0, 0]  # first frame
    assert source.load_image(3).size == (4, 8)  # EXIF rotation applied


def _truncated_png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def test_unreadable_files_raise_with_path_and_cause(tmp_path: Path):
    truncated = _truncated_png(tmp_path / "a_truncated.png")
    text = tmp_path / "b_text.jpg"
    text.write_text("this is not a JPEG")
    empty = tmp_path / "c_empty.png"
    empty.write_bytes(b"")
    source = ImageFolderSource(tmp_path)  # skip_unreadable=False: scanning does not decode
    assert len(source) == 3
    for index, path in enumerate((truncated, text, empty)):
        with pytest.raises(UnreadableImageError) as info:
            source.load_image(index)
        assert isinstance(info.value, ValueError)
        assert str(path) in str(info.value) and info.value.__cause__ is not None
    with pytest.raises(UnreadableImageError, match="truncated"):
        source.load_image(0)
    with pytest.raises(UnreadableImageError, match="cannot identify"):
        source.load_image(1)


def test_decompression_bomb_limit_is_honoured(tmp_path: Path, monkeypatch):
    _write(tmp_path / "big.png", Image.new("L", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 * limit
    with pytest.raises(UnreadableImageError, match="big.png") as info:
        ImageFolderSource(tmp_path).load_image(0)
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


def test_skip_unreadable_drops_bad_files_and_keeps_class_indices(tmp_path: Path):
    _write(tmp_path / "ant" / "good.png", _rgb_image())
    _truncated_png(tmp_path / "bee" / "bad.png")  # the whole "bee" class is unreadable
    (tmp_path / "cow" / "fake.jpg").parent.mkdir()
    (tmp_path / "cow" / "fake.jpg").write_text("text")
    _write(tmp_path / "cow" / "good.bmp", _rgb_image())
    source = ImageFolderSource(tmp_path, skip_unreadable=True)
    assert len(source) == 2
    assert source.class_names == ["ant", "bee", "cow"]
    assert source.labels == [0, 2]
    assert [path for path, _ in source.skipped] == [
        str(tmp_path / "bee" / "bad.png"), str(tmp_path / "cow" / "fake.jpg"),
    ]
    assert all(reason for _, reason in source.skipped)
    assert [source.load_image(i).size for i in range(2)] == [(16, 12), (16, 12)]


def test_skip_unreadable_with_nothing_readable(tmp_path: Path):
    (tmp_path / "fake.png").write_text("text")
    with pytest.raises(ValueError, match="No readable images"):
        ImageFolderSource(tmp_path, skip_unreadable=True)


# --------------------------------------------------------------------------- Hugging Face


def test_hf_source_without_datasets_explains_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install 'macrl\[datasets\]'"):
        HFDatasetSource("anything")


@pytest.fixture
def hf_datasets():
    import datasets  # the [test] extra installs it

    return datasets


def test_hf_saved_dataset_detects_columns_by_feature_type(tmp_path: Path, hf_datasets):
    features = hf_datasets.Features(
        {"picture": hf_datasets.Image(), "kind": hf_datasets.ClassLabel(names=["a", "b", "c"])}
    )
    transparent = Image.new("RGBA", (5, 4), (0, 0, 0, 0))
    table = hf_datasets.Dataset.from_dict(
        {"picture": [_rgb_image(), transparent, _rgb_image()], "kind": [2, 0, 1]},
        features=features,
    )
    splits = hf_datasets.DatasetDict({"train": table, "test": table.select([0])})
    splits.save_to_disk(str(tmp_path / "saved"))

    source = HFDatasetSource(tmp_path / "saved", split="train")
    assert isinstance(source, ImageSource)
    assert (source.image_column, source.label_column) == ("picture", "kind")
    assert len(source) == 3 and source.labels == [2, 0, 1]
    assert source.class_names == ["a", "b", "c"]
    assert source.load_image(0).mode == "RGB" and source.load_image(0).size == (16, 12)
    assert np.asarray(source.load_image(1)).min() == 255  # transparency -> white
    assert source.load_image(2).convert("L").size == (16, 12)
    assert len(HFDatasetSource(tmp_path / "saved", split="test", mode="L")) == 1
    with pytest.raises(ValueError, match="available: \\['test', 'train'\\]"):
        HFDatasetSource(tmp_path / "saved", split="validation")


def test_hf_columns_by_name_and_undecoded_bytes(tmp_path: Path, hf_datasets):
    buffer = io.BytesIO()
    _rgb_image(colour=(0, 0, 255)).save(buffer, format="PNG")
    table = hf_datasets.Dataset.from_dict(
        {"img": [{"bytes": buffer.getvalue(), "path": None}], "labels": [7], "extra": ["x"]}
    )
    table.save_to_disk(str(tmp_path / "saved"))
    source = HFDatasetSource(tmp_path / "saved")
    assert (source.image_column, source.label_column) == ("img", "labels")
    assert source.labels == [7] and source.class_names is None
    assert np.asarray(source.load_image(0))[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(ValueError, match="No image column"):
        HFDatasetSource(tmp_path / "saved", image_column="nope")
    with pytest.raises(ValueError, match="Label column 'nope'"):
        HFDatasetSource(tmp_path / "saved", label_column="nope")


def test_hf_undecoded_bytes_get_the_image_file_checks(tmp_path: Path, hf_datasets, monkeypatch):
    """decode=False bytes go through the same decoder as image files: first frame, pixel limit, errors by index."""
    frames = [Image.new("L", (8, 8), value) for value in (10, 200)]
    animated, large = io.BytesIO(), io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    Image.new("L", (40, 40), 7).save(large, format="PNG")
    images = [animated.getvalue(), large.getvalue(), b"not an image at all"]
    table = hf_datasets.Dataset.from_dict({"img": [{"bytes": raw, "path": None} for raw in images]})
    table.save_to_disk(str(tmp_path / "saved"))
    source = HFDatasetSource(tmp_path / "saved", mode="L")
    assert np.asarray(source.load_image(0)).max() == 10  # the first frame, not the last
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 40 = 1600 pixels: refused before decoding
    with pytest.raises(UnreadableImageError, match=r"\[1\].*DecompressionBombError.*1600 pixels"):
        source.load_image(1)
    with pytest.raises(UnreadableImageError, match=r"\[2\]: UnidentifiedImageError"):
        source.load_image(2)


def test_hf_load_dataset_on_local_image_folder(tmp_path: Path, hf_datasets):
    for kind in ("cat", "dog"):
        _write(tmp_path / "images" / kind / "0.png", _rgb_image())
    source = HFDatasetSource(
        tmp_path / "images", split="train", load_kwargs={"cache_dir": str(tmp_path / "cache")}
    )
    assert source.class_names == ["cat", "dog"] and sorted(source.labels) == [0, 1]
    assert source.load_image(1).size == (16, 12)


# --------------------------------------------------------------------------- augmentations


@pytest.mark.parametrize("num_channels, image_size", [(1, 28), (3, 32), (3, 96)])
def test_transforms_output_normalized_float_tensors(num_channels: int, image_size: int):
    cfg = _tiny_config(num_channels, image_size)
    with Image.open(io.BytesIO(_png_bytes(40, 30))) as encoded:
        image = encoded.convert(cfg.pil_mode)
    low = min((0 - m) / s for m, s in zip(cfg.mean, cfg.std))
    high = max((1 - m) / s for m, s in zip(cfg.mean, cfg.std))
    for build in (build_strong_transform, build_weak_transform, build_eval_transform):
        output = build(cfg)(image)
        assert type(output) is torch.Tensor and output.dtype == torch.float32
        assert output.shape == (num_channels, image_size, image_size)
        assert low - 1e-5 <= output.min() and output.max() <= high + 1e-5


def _png_bytes(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_augmentation_defaults_and_small_image_blur():
    cfg = AugmentationConfig()
    assert (cfg.image_size, cfg.num_channels, cfg.pil_mode) == (224, 3, "RGB")
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.strong_crop_scale == (0.2, 1.0)
    assert cfg.weak_crop_scale == (0.6, 1.0) and cfg.blur_kernel_size == 23
    for size in range(3, 300):
        kernel = AugmentationConfig(image_size=size).blur_kernel_size
        assert kernel % 2 == 1 and 3 <= kernel <= size
    grey = _tiny_config(1)
    assert grey.pil_mode == "L" and grey.blur_kernel_size == 3
    random_applies = [
        t for t in build_strong_transform(grey).transforms if type(t).__name__ == "RandomApply"
    ]
    jitter = random_applies[0]
    assert jitter.transforms[0].saturation is None and jitter.transforms[0].hue is None


def test_augmentation_config_validation():
    with pytest.raises(ValueError, match="num_channels"):
        AugmentationConfig(num_channels=2)
    with pytest.raises(ValueError, match="mean has 3 values"):
        AugmentationConfig(num_channels=1, mean=(0.5, 0.5, 0.5), std=(0.5,))
    with pytest.raises(ValueError, match="strong_crop_scale"):
        AugmentationConfig(strong_crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="blur_prob"):
        AugmentationConfig(blur_prob=1.5)


def test_channel_mismatch_is_an_error_not_a_silent_broadcast(fashion_test):
    transform = build_eval_transform(_tiny_config(num_channels=3))
    with pytest.raises(ValueError, match="mode='RGB'"):
        transform(fashion_test.load_image(0))


def test_eval_is_deterministic_and_strong_is_random(fashion_test):
    cfg = _tiny_config()
    image = fashion_test.load_image(0)
    evaluate, strong = build_eval_transform(cfg), build_strong_transform(cfg)
    assert torch.equal(evaluate(image), evaluate(image))
    # Plain resize at 28 px: the eval view is the image itself, normalised.
    expected = (torch.from_numpy(np.array(image)).float() / 255 - 0.5) / 0.5
    assert torch.allclose(evaluate(image)[0], expected, atol=1e-6)
    torch.manual_seed(0)
    assert not torch.equal(strong(image), strong(image))


# --------------------------------------------------------------------------- datasets


def test_two_view_sample_is_a_function_of_seed_epoch_index(fashion_test):
    cfg = _tiny_config()
    first, second = _two_view(fashion_test, cfg), _two_view(fashion_test, cfg)
    torch.manual_seed(123)  # the caller's RNG must not matter...
    sample = first[5]
    torch.manual_seed(456)
    _assert_same_sample(sample, second[5])
    _assert_same_sample(sample, second[5 - len(second)])  # negative index
    assert sample["pixel_values"].shape == sample["momentum_pixel_values"].shape == (1, 28, 28)
    noise = sample["noise"]
    assert noise.shape == (49,) and noise.dtype == torch.float32
    assert 0 <= noise.min() and noise.max() < 1

    second.set_epoch(1)
    assert second.epoch == 1
    other_epoch = second[5]
    assert not torch.equal(sample["pixel_values"], other_epoch["pixel_values"])
    assert not torch.equal(sample["noise"], other_epoch["noise"])
    other_seed = _two_view(fashion_test, cfg, seed=1)[5]
    assert not torch.equal(sample["noise"], other_seed["noise"])
    assert not torch.equal(sample["noise"], first[6]["noise"])


def test_two_view_leaves_global_rng_untouched(fashion_test):
    dataset = _two_view(fashion_test, _tiny_config())
    torch.manual_seed(7)
    state = torch.get_rng_state()
    dataset[0]
    dataset[1]
    assert torch.equal(torch.get_rng_state(), state)


def _batches(loader: DataLoader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def test_two_view_batches_do_not_depend_on_workers(fashion_test):
    dataset = _two_view(fashion_test, _tiny_config())
    indices = list(range(12))
    sampler_kwargs = {"sampler": indices, "batch_size": 4}
    in_process = _batches(DataLoader(dataset, num_workers=0, **sampler_kwargs))
    dataset.set_epoch(1)
    in_process_epoch1 = _batches(DataLoader(dataset, num_workers=0, **sampler_kwargs))

    dataset.set_epoch(0)
    workers = DataLoader(dataset, num_workers=2, persistent_workers=True, **sampler_kwargs)
    with_workers = _batches(workers)
    dataset.set_epoch(1)  # must reach the already-running workers
    with_workers_epoch1 = _batches(workers)
    del workers

    assert len(with_workers) == 3
    for expected, actual in zip(in_process + in_process_epoch1, with_workers + with_workers_epoch1):
        _assert_same_sample(expected, actual)
    assert not torch.equal(in_process[0]["noise"], in_process_epoch1[0]["noise"])


def test_two_view_on_rgb_image_folder(tmp_path: Path):
    for index in range(2):
        (tmp_path / f"{index}.png").write_bytes(_png_bytes(50, 40))
    cfg = _tiny_config(num_channels=3, image_size=32)
    sample = _two_view(ImageFolderSource(tmp_path), cfg)[1]
    assert sample["pixel_values"].shape == (3, 32, 32)
    assert sample["momentum_pixel_values"].shape == (3, 32, 32)
    assert sample["noise"].shape == (64,)


def test_eval_dataset_with_and_without_labels(fashion_test, tmp_path: Path):
    evaluation = EvalDataset(fashion_test, build_eval_transform(_tiny_config()))
    sample = evaluation[4]
    assert sample["index"] == 4 and sample["labels"] == fashion_test.labels[4]
    assert sample["pixel_values"].shape == (1, 28, 28)
    batch = next(iter(DataLoader(evaluation, batch_size=3)))
    assert batch["labels"].dtype == torch.int64 and batch["index"].tolist() == [0, 1, 2]

    _write(tmp_path / "flat.png", _rgb_image())
    unlabelled = EvalDataset(ImageFolderSource(tmp_path), build_eval_transform(_tiny_config(3, 32)))
    assert set(unlabelled[0]) == {"pixel_values", "index"}
