"""Image processor for MACRL encoders: transformers' ViT processor that also serves 1-channel models."""

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF
from transformers import ViTImageProcessor
from transformers.image_utils import ChannelDimension, ImageInput
from transformers.processing_utils import ImagesKwargs, Unpack


class MACRLImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    num_channels (`int`, *optional*, defaults to 3):
        Channels the model expects: 3 converts every input to RGB, 1 converts every input to grayscale (luma).
    """

    num_channels: int


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer PIL images ("I;16", "I") scaled to 8 bits, since PIL's convert clips them."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    return image


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
            image = _to_8bit(image)
            if image.mode == "P":  # palette transparency is only honoured through RGBA
                image = image.convert("RGBA")
            image = image.convert("L" if self.num_channels == 1 else "RGB")
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

    def to_dict(self) -> dict:
        # Leave the class to `auto_map` in config.json: with an `image_processor_type` here, AutoImageProcessor never
        # reads that map and fails where macrl is not installed; with an `auto_map` here, the pipeline's video
        # processor lookup derives a non-existent remote `MACRLVideoProcessor` from it and asks to trust remote code.
        output = super().to_dict()
        output.pop("image_processor_type", None)
        return output

    @classmethod
    def from_model_config(cls, config) -> "MACRLImageProcessor":
        """The processor that matches a `MACRLConfig` (size and channels), with the default normalisation."""
        return cls(size={"height": config.image_size, "width": config.image_size}, num_channels=config.num_channels)


__all__ = ["MACRLImageProcessor"]
