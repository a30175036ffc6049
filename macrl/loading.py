"""Loading a released MACRL encoder and its image processor from a local folder or the Hub, with clear errors.

`load_image_processor` is the one place that decides what a folder without `preprocessor_config.json` gets:
`MACRLImageProcessor.from_model_config` (the config's size and channels, mean/std 0.5), with a logged warning
(a `macrl-pretrain` OUTPUT_DIR: the processor of its `encoder/`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoImageProcessor

from .configuration_macrl import MACRLConfig
from .data.open_data import looks_like_hub_id
from .errors import InputError, first_line
from .image_processing_macrl import MACRLImageProcessor
from .modeling_macrl import MACRLForPreTraining, MACRLModel

__all__ = [
    "ModelLoadError",
    "check_model_reference",
    "load_encoder",
    "load_encoder_and_processor",
    "load_image_processor",
    "load_pretraining_or_encoder",
]

logger = logging.getLogger(__name__)

PROCESSOR_FILE = "preprocessor_config.json"


class ModelLoadError(InputError):
    """A model folder or Hub id cannot be loaded as a MACRL encoder; the message names it and why."""


def check_model_reference(name_or_path: str) -> str:
    """`name_or_path` as `from_pretrained` should get it: an existing model folder, or something shaped like a Hub
    id. Raises `ModelLoadError` for a missing folder, a file, or a folder without config.json."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{name_or_path}: not a folder")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name_or_path}: not a model folder (no config.json)")
        return str(path)
    if not looks_like_hub_id(name_or_path):
        raise ModelLoadError(f"{name_or_path}: model folder not found")
    return name_or_path


def _macrl_config_dict(name_or_path: str, revision: str | None) -> dict:
    """The raw config.json of a MACRL folder or Hub id; `ModelLoadError` for anything else."""
    try:
        # Read the raw config first: model_type tells a MACRL folder from any other model's before from_pretrained
        # would load mismatched weights with only a warning.
        config_dict, _ = MACRLConfig.get_config_dict(name_or_path, revision=revision)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{name_or_path}: cannot load its config: {first_line(error)}") from error
    model_type = config_dict.get("model_type")
    if model_type != MACRLConfig.model_type:
        raise ModelLoadError(
            f"{name_or_path}: not a MACRL model (config.json has model_type={model_type!r}, "
            f"expected {MACRLConfig.model_type!r})"
        )
    return config_dict


def _from_pretrained(cls, name_or_path: str, revision: str | None):
    try:
        return cls.from_pretrained(name_or_path, revision=revision, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"{name_or_path}: cannot load the weights: {first_line(error)}") from error


def load_encoder(name_or_path: str, revision: str | None = None) -> MACRLModel:
    """The float32 `MACRLModel` of a MACRL folder or Hub id (an encoder, pre-training or classification folder).

    Raises:
        ModelLoadError: missing folder, not a model folder, not a MACRL model, or weights that do not load.
    """
    name_or_path = check_model_reference(name_or_path)
    _macrl_config_dict(name_or_path, revision)
    return _from_pretrained(MACRLModel, name_or_path, revision)


def load_pretraining_or_encoder(name_or_path: str, revision: str | None = None) -> MACRLForPreTraining | MACRLModel:
    """The float32 `MACRLForPreTraining` (decoder included) of a pre-training folder, one whose config.json names
    that class in `architectures` (`macrl-pretrain`'s OUTPUT_DIR, `macrl-convert mae` without `--encoder-only`);
    `load_encoder`'s `MACRLModel` of any other MACRL folder or Hub id. Raises `load_encoder`'s errors."""
    name_or_path = check_model_reference(name_or_path)
    architectures = _macrl_config_dict(name_or_path, revision).get("architectures") or ()
    cls = MACRLForPreTraining if MACRLForPreTraining.__name__ in architectures else MACRLModel
    return _from_pretrained(cls, name_or_path, revision)


def load_image_processor(
    name_or_path: str | Path | None, config: MACRLConfig, revision: str | None = None
) -> MACRLImageProcessor:
    """The image processor saved with a model (`AutoImageProcessor`), or, where there is none (or no folder),
    `MACRLImageProcessor.from_model_config(config)` with a warning. A `macrl-pretrain` OUTPUT_DIR, which holds the
    pre-training model without a processor, gets the one of its `encoder/`."""
    if name_or_path is not None:
        folder = Path(name_or_path).expanduser()
        if not (folder / PROCESSOR_FILE).is_file() and (folder / "encoder" / PROCESSOR_FILE).is_file():
            name_or_path = folder / "encoder"
        try:
            return AutoImageProcessor.from_pretrained(str(name_or_path), revision=revision)
        except (OSError, ValueError):
            logger.warning(
                "no image processor (preprocessor_config.json) in %s; using MACRLImageProcessor.from_model_config: "
                "the model's size and channels, mean/std 0.5",
                name_or_path,
            )
    return MACRLImageProcessor.from_model_config(config)


def load_encoder_and_processor(name_or_path: str, revision: str | None = None):
    """`load_encoder` and `load_image_processor` of one folder or Hub id."""
    model = load_encoder(name_or_path, revision)
    return model, load_image_processor(check_model_reference(name_or_path), model.config, revision)
