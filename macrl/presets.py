"""Named model configurations for `macrl-pretrain --config NAME`.

`fmnist` is the embedded default: a small ViT for 28x28 grayscale images that trains to a useful encoder on two CPU
cores. The ImageNet-sized presets are for machines with accelerators.
"""

import json
from pathlib import Path

from .configuration_macrl import MACRLConfig

_SMALL_HEADS = dict(projection_dim=256, projector_hidden_size=1024, predictor_hidden_size=1024)

# 28x28 grayscale, 4x4 patches of 7 px; width 192 as in ViT-Tiny, shallow enough for a CPU. A step on 16 tokens
# is much faster than on 49 (4-px patches), which buys epochs on a CPU budget
# (benchmarks/results/figures-behind-the-code.md). 4 encoder blocks and a 1-block decoder: a step 1.35x faster than
# 6 and 2, and at the main job's budget the faster model ends ahead (benchmarks/results/quality/tuning-session13.md)
FMNIST = dict(
    image_size=28,
    patch_size=7,
    num_channels=1,
    hidden_size=192,
    num_hidden_layers=4,
    num_attention_heads=3,
    intermediate_size=768,
    decoder_hidden_size=128,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=512,
    **_SMALL_HEADS,
)

PRESETS: dict[str, dict] = {
    "fmnist": FMNIST,
    # a few-second model for smoke tests
    "tiny": dict(
        image_size=28,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        projection_dim=16,
        projector_hidden_size=32,
        predictor_hidden_size=32,
    ),
    "vit-small-patch16-224": dict(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        decoder_hidden_size=512,
        decoder_num_hidden_layers=8,
        decoder_num_attention_heads=16,
        decoder_intermediate_size=2048,
    ),
    "vit-base-patch16-224": dict(),  # MACRLConfig's defaults
}


# `macrl-pretrain`'s base learning rate (per 256 images) when --lr is not given. CPU budgets are a few epochs, not
# MAE's hundreds, so the default is twice MAE's 1.5e-4; the embedded default's value comes from its tuning runs.
DEFAULT_BASE_LEARNING_RATE = 3e-4
BASE_LEARNING_RATES: dict[str, float] = {"fmnist": 1.5e-3}


def base_learning_rate(config: str) -> float:
    """The base learning rate `macrl-pretrain --config config` uses without --lr."""
    return BASE_LEARNING_RATES.get(config, DEFAULT_BASE_LEARNING_RATE)


def load_config(name_or_path: str, **overrides) -> MACRLConfig:
    """A `MACRLConfig` from a preset name, a JSON file, a folder with config.json, or a JSON object string.

    `overrides` replace single fields (e.g. `mask_ratio=0.5`). Unknown names raise a `ValueError` listing the presets.
    """
    if name_or_path in PRESETS:
        fields = dict(PRESETS[name_or_path])
    elif name_or_path.lstrip().startswith("{"):
        fields = json.loads(name_or_path)
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"unknown config {name_or_path!r}: not a preset ({', '.join(PRESETS)}), "
                "a JSON file, a folder with config.json, or a JSON object"
            )
        fields = json.loads(path.read_text())
    for saved_only in ("model_type", "auto_map", "architectures", "transformers_version"):
        fields.pop(saved_only, None)
    # PreTrainedConfig keeps unknown keys as attributes; a typo here would silently do nothing
    unknown = sorted(set(overrides) - set(MACRLConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    return MACRLConfig(**{**fields, **overrides})
