"""Image processor for MACRL encoders: transformers' ViT processor that also serves 1-channel models."""

import json
import os
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF
from transformers import ViTImageProcessor
from transformers.image_utils import ImageInput
from transformers.processing_utils import ImagesKwargs, Unpack


class MACRLImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    num_channels (`int`, *optional*, defaults to 3):
        Channels the model expects: 3 converts every input to RGB, 1 converts every input to grayscale (luma).
    """

    num_channels: int


# Transparent pixels are composited onto white: images with an alpha channel are
# mostly logos / product shots / sketches drawn on "paper", and dropping alpha
# instead would expose whatever colour the encoder left under it (often black).
ALPHA_BACKGROUND = "white"

_SIXTEEN_BIT_SCALE = 1 / 257  # 65535 / 257 == 255 exactly


def convert_image_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image to 8-bit ``mode`` (``"RGB"`` or ``"L"``) without losing range.

    PIL's own ``convert`` clips 16/32-bit grey values at 255 (a 16-bit scan turns
    almost white) and ignores palette transparency, so those modes are handled first:

    * ``I;16*``: full 16-bit range, scaled by 1/257.
    * ``I`` / ``F``: the range is guessed from the extrema: ``F`` with max <= 1 is
      treated as [0, 1]; anything with max > 255 as 16-bit; otherwise as 8-bit.
    * ``P`` with transparency, ``PA``, ``LA``, ``RGBA``, ``RGBa``: composited onto
      ``ALPHA_BACKGROUND``.
    * ``CMYK``, ``YCbCr``, ``1``, ...: PIL's conversion.
    """
    # PIL converts premultiplied "La" only to "LA", and CIELab "LAB" (TIFF) to RGB but not to "L"
    if image.mode == "La":
        image = image.convert("LA")
    elif image.mode == "LAB":
        image = image.convert("RGB")
    if image.mode.startswith("I;16"):
        image = image.convert("I").point(lambda v: v * _SIXTEEN_BIT_SCALE + 0.5)
    elif image.mode in ("I", "F"):
        low, high = image.getextrema()
        if image.mode == "F" and high <= 1.0:
            image = image.point(lambda v: v * 255 + 0.5)
        elif high > 255:
            image = image.point(lambda v: v * _SIXTEEN_BIT_SCALE + 0.5)
        # Pillow clips out-of-range values to [0, 255] when going to "L".
        image = image.convert("L")

    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "PA", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND)
        image = Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "I":
        image = image.convert("L")
    return image if image.mode == mode else image.convert(mode)



class MACRLImageProcessor(ViTImageProcessor):
    r"""
    Resizes to the encoder's `size`, rescales to [0, 1] and normalises with `image_mean` / `image_std`, like
    `ViTImageProcessor`, and converts every input (RGB, L, LA, RGBA, P, CMYK, 16-bit) to `num_channels` channels so a
    grayscale model accepts colour images and the other way round.
    """

    num_channels = 3
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    valid_kwargs = MACRLImageProcessorKwargs

    def __init__(self, **kwargs: Unpack[MACRLImageProcessorKwargs]):
        channels = kwargs.get("num_channels", self.num_channels)
        if channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {channels}")
        # the default normalisation maps [0, 1] to [-1, 1] for any channel count
        kwargs.setdefault("image_mean", [0.5] * channels)
        kwargs.setdefault("image_std", [0.5] * channels)
        for name in ("image_mean", "image_std"):
            if len(kwargs[name]) != channels:
                raise ValueError(f"{name} has {len(kwargs[name])} values but num_channels is {channels}")
        super().__init__(**kwargs)

    def process_image(self, image: ImageInput, *args, **kwargs) -> torch.Tensor:
        if isinstance(image, Image.Image):
            if 0 in image.size:  # would fail deep in the resize with a RuntimeError about a tensor shape
                raise ValueError(f"cannot process an image of {image.width}x{image.height} pixels")
            image = convert_image_mode(image, "L" if self.num_channels == 1 else "RGB")
            kwargs["do_convert_rgb"] = False
        elif self.num_channels == 3:
            kwargs["do_convert_rgb"] = True
        tensor = super().process_image(image, *args, **kwargs)  # [C, H, W]
        if self.num_channels == 1 and tensor.shape[0] != 1:
            if tensor.shape[0] == 4:
                tensor = tensor[:3]
            if tensor.shape[0] != 3:
                raise ValueError(f"cannot convert an image with {tensor.shape[0]} channels to grayscale")
            tensor = tvF.rgb_to_grayscale(tensor)
        return tensor

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Write `preprocessor_config.json`, naming the class (`image_processor_type`) unless the folder's config.json
        maps `AutoImageProcessor` in its `auto_map` (a model folder saved with its code).

        A processor saved on its own needs the name: it is all `AutoImageProcessor` has to go by. Next to a model's
        code it must leave the class to that `auto_map`: with an `image_processor_type`, AutoImageProcessor never reads
        the map and fails where macrl is not installed. (An `auto_map` in this file would not do: the pipeline's video
        processor lookup derives a non-existent remote `MACRLVideoProcessor` from it and asks to trust remote code.)
        """
        super().to_json_file(json_file_path)
        path = Path(json_file_path)
        if _maps_image_processor(path.with_name("config.json")):
            leave_class_to_auto_map(path)

    @classmethod
    def from_model_config(cls, config) -> "MACRLImageProcessor":
        """The processor that matches a `MACRLConfig` (size and channels), with the default normalisation."""
        return cls(size={"height": config.image_size, "width": config.image_size}, num_channels=config.num_channels)


def _maps_image_processor(config_path: Path) -> bool:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "AutoImageProcessor" in (config.get("auto_map") or {})


def leave_class_to_auto_map(path: Path) -> None:
    """Drop `image_processor_type` from a MACRL `preprocessor_config.json`, if there is one (see `to_json_file`)."""
    if not path.is_file():
        return
    processor = json.loads(path.read_text(encoding="utf-8"))
    if processor.get("image_processor_type") == MACRLImageProcessor.__name__:
        del processor["image_processor_type"]
        path.write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["MACRLImageProcessor"]
