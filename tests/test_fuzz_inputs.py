"""Fuzzing what macrl reads from disk (hypothesis): image files, config JSON and weight files.

Each test runs a fixed number of derandomized examples (the same cases on every machine, so CI is stable), counts
them and prints the count by kind. The contracts:

* image files, through `open_image`, `ImageFolderSource` and `MACRLImageProcessor`: an 8-bit image of the asked
  mode (`L`/`RGB`) and the file's size, or `UnreadableImageError` (a `ValueError`) - nothing else, no hang;
  anything over `PIL.Image.MAX_IMAGE_PIXELS` is refused before it is decoded;
* config dicts and config.json, through `MACRLConfig.from_dict` / `from_pretrained` / `AutoConfig`: a valid config,
  or `ValueError` naming the field (bad values, NaN/inf, unknown `model_type` in AutoConfig),
  `StrictDataclassFieldValidationError` (wrong types) or `OSError` (config.json is not JSON);
* weight files, through `MACRLModel.from_pretrained`: the file's tensors, or `SafetensorError` (not safetensors,
  truncated), `RuntimeError` (a tensor of the wrong shape: `ignore_mismatched_sizes` is False by default); missing
  and unexpected keys load but are listed in the loading info (and transformers' load report), never silently.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import shutil
import signal
import struct
import zlib
from collections import Counter

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from macrl import MACRLConfig, MACRLImageProcessor, MACRLModel
from macrl.data import ImageFolderSource, UnreadableImageError, open_image
from tests.tiny_models import TINY

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
PIXEL_LIMIT = 48 * 48  # Image.MAX_IMAGE_PIXELS during the image tests, so real files can cross it


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path, monkeypatch):
    """Every fuzz case runs in a temporary working folder: a relative path that a case writes (a config.json, a
    weights file) lands there, never in the checkout."""
    monkeypatch.chdir(tmp_path)


@contextlib.contextmanager
def no_hang(seconds: float = 20.0):
    """Fail (TimeoutError) instead of hanging if the body runs longer than `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------------------------
# image files

# (mode, formats that can store it)
MODES = {
    "1": ["PNG", "BMP", "TIFF", "GIF"],
    "L": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "PPM"],
    "P": ["PNG", "BMP", "GIF", "TIFF"],
    "RGB": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "PPM"],
    "RGBA": ["PNG", "TIFF", "WEBP", "GIF"],
    "LA": ["PNG", "TIFF"],
    "CMYK": ["JPEG", "TIFF"],
    "YCbCr": ["JPEG"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "F": ["TIFF"],
    "LAB": ["TIFF"],
}
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif", "WEBP": ".webp", "PPM": ".ppm"}
BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4, "YCbCr": 3, "I;16": 2, "I": 4,
                   "F": 4, "LAB": 3}


def _make_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    count = size[0] * size[1] * BYTES_PER_PIXEL[mode]
    raw = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator).numpy().tobytes()
    if mode == "1":
        return Image.frombytes("L", size, raw).convert("1")
    if mode == "I":
        return Image.frombytes("I;16", size, raw[: 2 * size[0] * size[1]]).convert("I")
    if mode == "F":
        return Image.frombytes("L", size, raw[: size[0] * size[1]]).convert("F").point(lambda v: v / 255)
    image = Image.frombytes(mode, size, raw)
    if mode == "P" and seed % 2:
        image.info["transparency"] = seed % 256
    return image


def _encode(image: Image.Image, fmt: str, frames: int = 1) -> bytes:
    buffer = io.BytesIO()
    if frames > 1:
        extra = [Image.new(image.mode, image.size)] * (frames - 1)  # black frames after the first
        image.save(buffer, fmt, save_all=True, append_images=extra, duration=50)
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels, with (almost) no pixel data: a decompression bomb probe."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@st.composite
def image_files(draw):
    """(kind, file bytes, extension, expected size or None if the file is damaged)."""
    kind = draw(st.sampled_from(["valid", "valid", "animated", "truncated", "corrupted", "random", "header"]))
    if kind == "random":
        return kind, draw(st.binary(max_size=2048)), draw(st.sampled_from(list(EXTENSIONS.values()))), None
    if kind == "header":  # huge, zero or plausible sizes claimed by a tiny file
        width = draw(st.sampled_from([0, 1, 47, 48, 49, 100_000, 2**31 - 1]))
        height = draw(st.sampled_from([0, 1, 48, 49, 65_535, 2**31 - 1]))
        return kind, _png_with_header(width, height), ".png", None
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    image = _make_image(mode, size, draw(st.integers(0, 2**16)))
    frames = 1
    if kind == "animated":
        fmt = draw(st.sampled_from(["GIF", "PNG", "WEBP", "TIFF"]))
        if fmt not in MODES[mode]:
            image = image.convert("RGB")
        frames = draw(st.integers(2, 4))
    data = _encode(image, fmt, frames)
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif kind == "corrupted":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = bytes(data)
    expected = size if kind in ("valid", "animated") else None
    return kind, data, EXTENSIONS[fmt], expected


def _check_decoded(image: Image.Image, mode: str, expected_size) -> None:
    assert image.mode == mode  # 8-bit L or RGB, never 16-bit, palette, alpha or CMYK
    assert image.width >= 1 and image.height >= 1 and image.width * image.height <= PIXEL_LIMIT
    if expected_size is not None:
        assert image.size == expected_size
    image.tobytes()  # fully decoded: the pixels are there after the file was closed


def test_image_files_decode_or_raise_unreadable(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIXEL_LIMIT)
    good = tmp_path / "good.png"
    Image.new("L", (8, 8), 128).save(good)
    processors = {
        "L": MACRLImageProcessor(num_channels=1, size={"height": 28, "width": 28}),
        "RGB": MACRLImageProcessor(num_channels=3, size={"height": 16, "width": 16}),
    }
    tried, outcomes, numbers = Counter(), Counter(), itertools.count()

    @settings(FUZZ, max_examples=150)
    @given(case=image_files(), mode=st.sampled_from(["L", "RGB"]))
    def check(case, mode):
        kind, data, extension, expected_size = case
        folder = tmp_path / f"case{next(numbers)}"  # a fresh folder also when hypothesis replays an example
        folder.mkdir()
        path = folder / f"image{extension}"
        path.write_bytes(data)
        shutil.copy(good, folder / "good.png")
        with no_hang():
            failure = None
            try:
                image = open_image(path, mode)
            except UnreadableImageError as error:  # the one documented failure, naming the file and its cause
                assert str(path) in str(error) and error.__cause__ is not None
                image, failure = None, error
            too_big = expected_size is not None and expected_size[0] * expected_size[1] > PIXEL_LIMIT
            if too_big:  # refused before decoding, whatever the format
                assert image is None and isinstance(failure.__cause__, Image.DecompressionBombError)
            elif expected_size is not None:  # an intact file of any mode, format or frame count decodes
                assert image is not None, f"{kind} {extension} file did not decode"
            if image is not None:
                _check_decoded(image, mode, expected_size)

            # the folder source agrees with open_image, with and without --skip-unreadable
            source = ImageFolderSource(folder, mode=mode)
            index = source.paths.index(path)
            if image is None:
                with pytest.raises(UnreadableImageError):
                    source.load_image(index)
            else:
                assert source.load_image(index).tobytes() == image.tobytes()
            validated = ImageFolderSource(folder, mode=mode, skip_unreadable=True)
            assert (path in validated.paths) == (image is not None)
            assert [p for p, _ in validated.skipped] == ([] if image is not None else [str(path)])

            # the processor takes the decoded image, and the file's own PIL image in its native mode
            if image is not None:
                with Image.open(path) as native:
                    native.load()
                    for image_mode, processor in processors.items():
                        for picture in (image, native):
                            pixels = processor(picture, return_tensors="pt")["pixel_values"]
                            size = processor.size["height"]
                            assert pixels.shape == (1, 1 if image_mode == "L" else 3, size, size)
                            assert pixels.dtype == torch.float32 and bool(torch.isfinite(pixels).all())
        tried[kind] += 1
        outcomes["decoded" if image is not None else "unreadable"] += 1

    check()
    print(f"image files tried: {dict(tried)}; {dict(outcomes)}")
    assert sum(tried.values()) == 150
    assert set(tried) == {"valid", "animated", "truncated", "corrupted", "random", "header"}
    assert outcomes["decoded"] > 0 and outcomes["unreadable"] > 0


def test_decompression_bomb_over_the_default_limit_is_refused_before_decoding(tmp_path):
    """Between MAX_IMAGE_PIXELS and twice that PIL only warns and then decodes; macrl refuses at the limit."""
    assert Image.MAX_IMAGE_PIXELS is not None
    for width, height in [(10_000, 10_000), (100_000, 100_000)]:  # 1.1x and 112x the default limit
        path = tmp_path / f"bomb_{width}.png"
        path.write_bytes(_png_with_header(width, height))
        with pytest.raises(UnreadableImageError, match="decompression bomb") as info:
            open_image(path, "L")
        assert isinstance(info.value.__cause__, Image.DecompressionBombError)


PIL_MODES = sorted(set(MODES) | {"RGBX", "RGBa", "La", "PA", "HSV", "I;16B", "I;16L"})


def test_processor_takes_every_pil_mode_or_raises_value_error():
    """In-memory images of every PIL mode (random pixels: NaN and inf for "F"), including 0-pixel ones."""
    tried = Counter()
    processors = [MACRLImageProcessor(num_channels=c, size={"height": 8, "width": 8}) for c in (1, 3)]

    @settings(FUZZ, max_examples=6)
    @given(width=st.integers(0, 20), height=st.integers(0, 20), seed=st.integers(0, 2**16))
    def check(mode, width, height, seed):
        generator = torch.Generator().manual_seed(seed)
        count = len(Image.new(mode, (1, 1)).tobytes()) * width * height
        raw = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator).numpy().tobytes()
        image = Image.frombytes(mode, (width, height), raw) if count else Image.new(mode, (width, height))
        for processor in processors:
            with no_hang():
                if width == 0 or height == 0:
                    with pytest.raises(ValueError, match="pixels"):
                        processor(image, return_tensors="pt")
                    continue
                pixels = processor(image, return_tensors="pt")["pixel_values"]
            assert pixels.shape == (1, processor.num_channels, 8, 8) and bool(torch.isfinite(pixels).all())
        tried[mode] += 1

    for mode in PIL_MODES:
        check(mode)  # the size and pixel examples are drawn per mode
    print(f"in-memory PIL images tried: {sum(tried.values())} over {len(tried)} modes")
    assert set(tried) == set(PIL_MODES) and sum(tried.values()) == 6 * len(PIL_MODES)


# ----------------------------------------------------------------------------------------------------------------
# config JSON

OWN_FIELDS = sorted(MACRLConfig.macrl_fields())
FLOAT_FIELDS = [f for f in OWN_FIELDS if MACRLConfig.__dataclass_fields__[f].type in (float, float | int)]
INT_FIELDS = [f for f in OWN_FIELDS if MACRLConfig.__dataclass_fields__[f].type is int]
NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf"), 10**400, -(10**400)])
GARBAGE = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([True, False, None]),
    st.text(max_size=6),
    st.sampled_from(["cls", "mean", "l1", "l2", "gelu", "relu", "max"]),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


def _plausible(field: str):
    """A value of the field's own type, in or near its valid range."""
    if field in INT_FIELDS:
        return st.integers(-2, 64)
    if field in FLOAT_FIELDS:
        return st.one_of(st.floats(-0.5, 1.5), st.floats(0, 1e3), st.sampled_from([0, 1, 0.0, 1.0]))
    return st.sampled_from(["cls", "mean", "l1", "l2", "gelu", "relu", "max", "", True, False])


@st.composite
def config_dicts(draw):
    config = {"model_type": "macrl", **TINY}
    for _ in range(draw(st.integers(1, 2))):
        field = draw(st.sampled_from(FLOAT_FIELDS if draw(st.booleans()) else OWN_FIELDS))
        choice = draw(st.integers(0, 9))
        if choice == 0:
            config.pop(field, None)  # a missing field takes its default
        elif choice <= 5:
            config[field] = draw(_plausible(field))
        elif choice <= 7:
            config[field] = draw(NON_FINITE)
        else:
            config[field] = draw(GARBAGE)
    model_type = draw(st.sampled_from(["macrl", "macrl", "macrl", "no-such-model", None, 7, "<missing>"]))
    if model_type == "<missing>":
        del config["model_type"]
    else:
        config["model_type"] = model_type
    return config


def _non_finite(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return not math.isfinite(value)
    except OverflowError:
        return True


CONFIG_ERRORS = (ValueError, StrictDataclassFieldValidationError)


def _outcome(load):
    try:
        return load()
    except CONFIG_ERRORS as error:
        return error


def _check_valid(config: MACRLConfig) -> None:
    """The invariants the model relies on hold for every config that was accepted."""
    for field in OWN_FIELDS:
        value = getattr(config, field)
        if isinstance(value, float):
            assert math.isfinite(value), field
    assert config.image_size % config.patch_size == 0 and config.hidden_size % config.num_attention_heads == 0
    assert config.hidden_size % 4 == 0 and config.decoder_hidden_size % config.decoder_num_attention_heads == 0
    assert 0 <= config.mask_ratio < 1 and 0 <= config.momentum_mask_ratio < 1 and 0 <= config.momentum <= 1
    assert config.temperature > 0 and config.layer_norm_eps > 0 and config.initializer_range > 0
    assert config.reconstruction_weight >= 0 and config.contrastive_weight >= 0
    assert config.reconstruction_weight + config.contrastive_weight > 0
    assert config.pooling in ("cls", "mean") and config.reconstruction_loss in ("l1", "l2")
    again = MACRLConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_config_dicts_and_files_load_or_raise_documented_errors(tmp_path, caplog):
    caplog.set_level(logging.ERROR)  # transformers warns about every mismatched model_type
    tried, numbers = Counter(), itertools.count()

    @settings(FUZZ, max_examples=200)
    @given(config=config_dicts())
    def check(config):
        from_dict = _outcome(lambda: MACRLConfig.from_dict(dict(config)))
        folder = tmp_path / f"config{next(numbers)}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))  # NaN and Infinity as JSON's usual extensions
        from_file = _outcome(lambda: MACRLConfig.from_pretrained(folder))
        # the same verdict for a dict and for the same dict as config.json
        assert type(from_file) is type(from_dict), (from_dict, from_file)
        if isinstance(from_dict, MACRLConfig):
            _check_valid(from_dict)
            assert from_file.to_dict() == from_dict.to_dict()
        else:
            field_errors = [f"MACRLConfig.{f}=" for f in OWN_FIELDS] + [f"'{f}'" for f in OWN_FIELDS]
            assert any(name in str(from_dict) for name in field_errors), str(from_dict)  # names the field
        # AutoConfig: MACRLConfig's verdict for model_type "macrl", a ValueError for anything else
        auto = _outcome(lambda: AutoConfig.from_pretrained(folder))
        if config.get("model_type") == "macrl":
            assert type(auto) is type(from_dict)
        else:
            assert isinstance(auto, ValueError) and ("model_type" in str(auto) or "model type" in str(auto)), auto
        if any(_non_finite(config.get(field)) for field in OWN_FIELDS):  # NaN, inf or beyond float: never accepted
            assert not isinstance(from_dict, MACRLConfig), config
            tried["non-finite"] += 1
        tried["valid" if isinstance(from_dict, MACRLConfig) else type(from_dict).__name__] += 1

    check()
    print(f"configs tried: {dict(tried)}")
    assert tried["valid"] + tried["ValueError"] + tried["StrictDataclassFieldValidationError"] == 200
    assert tried["valid"] and tried["ValueError"] and tried["StrictDataclassFieldValidationError"] and tried["non-finite"]


def test_config_json_that_is_not_json_raises_os_error(tmp_path):
    valid = json.dumps({"model_type": "macrl", **TINY})
    tried, numbers = Counter(), itertools.count()

    @settings(FUZZ, max_examples=60)
    @given(cut=st.integers(0, len(valid) - 1), junk=st.binary(max_size=40))
    def check(cut, junk):
        folder = tmp_path / f"broken{next(numbers)}"
        folder.mkdir()
        (folder / "config.json").write_bytes(valid[:cut].encode() + (b"\xff" + junk if junk else b""))
        for load in (MACRLConfig.from_pretrained, AutoConfig.from_pretrained):
            with pytest.raises(OSError, match="not a valid JSON file"):
                load(folder)
        tried["broken"] += 1

    check()
    print(f"broken config.json files tried: {tried['broken']}")
    assert tried["broken"] == 60


@pytest.mark.parametrize("text", ["[1, 2]", '"macrl"', "3", "null"])
def test_config_json_that_is_not_an_object_is_refused(tmp_path, text):
    """transformers' own errors: TypeError from MACRLConfig.from_pretrained; ValueError or TypeError from AutoConfig."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(TypeError):
        MACRLConfig.from_pretrained(tmp_path)
    with pytest.raises((ValueError, TypeError)):
        AutoConfig.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# weight files


@st.composite
def weight_damage(draw, names: list[str]):
    kind = draw(st.sampled_from(["drop", "extra", "rename", "shape", "dtype", "truncate", "garbage", "header"]))
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    return kind, chosen, draw(st.integers(0, 2**32 - 1))


def test_weight_files_load_exactly_or_raise_documented_errors(tmp_path, tiny_encoder_folder, caplog):
    caplog.set_level(logging.ERROR)  # the load report of every missing key
    original = load_file(tiny_encoder_folder / "model.safetensors")
    raw = (tiny_encoder_folder / "model.safetensors").read_bytes()
    names = sorted(original)
    tried, outcomes, numbers = Counter(), Counter(), itertools.count()

    @settings(FUZZ, max_examples=80)
    @given(damage=weight_damage(names))
    def check(damage):
        kind, chosen, seed = damage
        generator = torch.Generator().manual_seed(seed)
        folder = tmp_path / f"weights{next(numbers)}"
        shutil.copytree(tiny_encoder_folder, folder)
        tensors = dict(original)
        if kind == "drop":
            for name in chosen:
                del tensors[name]
        elif kind == "extra":
            tensors.update({f"extra_{i}.weight": torch.randn(3, generator=generator) for i in range(len(chosen))})
        elif kind == "rename":
            for name in chosen:
                tensors[f"renamed.{name}"] = tensors.pop(name)
        elif kind == "shape":
            name = chosen[0]
            tensors[name] = torch.randn(*[s + 1 for s in tensors[name].shape], generator=generator)
        elif kind == "dtype":
            for name in chosen:
                tensors[name] = tensors[name].to(torch.float64 if seed % 2 else torch.bfloat16)
        if kind in ("drop", "extra", "rename", "shape", "dtype"):
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        elif kind == "truncate":
            (folder / "model.safetensors").write_bytes(raw[: seed % len(raw)])
        elif kind == "garbage":
            noise = torch.randint(0, 256, (seed % 4096,), dtype=torch.uint8, generator=generator)
            (folder / "model.safetensors").write_bytes(noise.numpy().tobytes())
        else:  # a header that lies about its own length
            header_length = int.from_bytes(raw[:8], "little")
            wrong = (header_length + 1 + seed % 1000) if seed % 2 else max(header_length - 1 - seed % 50, 0)
            (folder / "model.safetensors").write_bytes(wrong.to_bytes(8, "little") + raw[8:])

        with no_hang():
            try:
                model, info = MACRLModel.from_pretrained(folder, output_loading_info=True)
            except SafetensorError:
                assert kind in ("truncate", "garbage", "header")
                outcomes["SafetensorError"] += 1
            except RuntimeError as error:
                assert kind == "shape" and "ignore_mismatched_sizes" in str(error)
                outcomes["RuntimeError (shape)"] += 1
            else:
                assert kind in ("drop", "extra", "rename", "dtype"), f"{kind} loaded without an error"
                dropped = set(chosen) if kind in ("drop", "rename") else set()
                added = {n for n in tensors if n not in original}
                assert set(info["missing_keys"]) == dropped  # never silently re-initialised
                assert set(info["unexpected_keys"]) == added
                state = model.state_dict()
                for name in set(original) - dropped:
                    assert torch.equal(state[name], tensors[name].to(state[name].dtype)), name
                outcomes[f"loaded ({kind})"] += 1
        tried[kind] += 1

    check()
    print(f"weight files tried: {dict(tried)}; {dict(outcomes)}")
    assert sum(tried.values()) == 80 and len(tried) == 8


def test_missing_weight_file_raises_os_error(tmp_path, tiny_encoder_folder):
    folder = tmp_path / "no_weights"
    shutil.copytree(tiny_encoder_folder, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named model.safetensors"):
        MACRLModel.from_pretrained(folder)
