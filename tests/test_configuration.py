"""MACRLConfig: defaults, serialisation and the validation of every field."""

import pytest
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import PreTrainedConfig

from macrl import MACRLConfig


def test_defaults_are_documented_values():
    config = MACRLConfig()
    assert config.model_type == "macrl"
    assert (config.image_size, config.patch_size, config.hidden_size, config.num_hidden_layers) == (224, 16, 768, 12)
    assert config.mask_ratio == 0.75 and config.reconstruction_loss == "l1" and config.pooling == "cls"
    assert config.temperature == 0.2 and config.momentum == 0.99 and config.momentum_mask_ratio == 0.0
    assert config.reconstruction_weight == 1.0 and config.contrastive_weight == 1.0
    assert config.num_patches == 196
    # every field is documented in the class docstring (the backbone's `_out_features` under its property's name)
    for field in MACRLConfig.__dataclass_fields__:
        if field in PreTrainedConfig.__dataclass_fields__:
            continue
        assert f"{field.lstrip('_')} (`" in MACRLConfig.__doc__, field


def test_roundtrip_through_json(tmp_path):
    config = MACRLConfig(image_size=32, patch_size=4, hidden_size=64, num_attention_heads=4, pooling="mean")
    config.save_pretrained(tmp_path)
    loaded = MACRLConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=100, num_attention_heads=12), "hidden_size"),
        (dict(image_size=30), "image_size"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=-0.1), "mask_ratio"),
        (dict(momentum_mask_ratio=1.5), "momentum_mask_ratio"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(momentum=1.5), "momentum"),
        (dict(reconstruction_loss="huber"), "reconstruction_loss"),
        (dict(pooling="max"), "pooling"),
        (dict(hidden_act="tanh"), "hidden_act"),
        (dict(decoder_hidden_size=100, decoder_num_attention_heads=16), "decoder_hidden_size"),
        (dict(hidden_size=6, num_attention_heads=3), "hidden_size"),
        (dict(queue_size=-1), "queue_size"),
        (dict(patch_size=0), "patch_size"),
        (dict(reconstruction_weight=0.0, contrastive_weight=0.0), "contrastive_weight"),
        (dict(contrastive_weight=-1.0), "contrastive_weight"),
        (dict(projector_num_layers=0), "projector_num_layers"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(image_size=8, patch_size=8, mask_ratio=0.75), "mask_ratio"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"MACRLConfig\.{field}="):
        MACRLConfig(**overrides)


def test_wrong_types_are_rejected():
    with pytest.raises(StrictDataclassFieldValidationError, match="hidden_size"):
        MACRLConfig(hidden_size="768")
