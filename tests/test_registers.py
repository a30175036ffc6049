"""Register tokens (`num_register_tokens`, Darcet et al. 2023; timm's `reg_tokens`) in every MACRL class: the token
order (CLS, registers, patches), masking that never hides them, pooling and feature maps that leave them out, the
decoder that carries them, training that reaches them, and a config without them that stays as it was.
(The timm round trip with registers is in test_conversion.py.)"""

import pytest
import torch

from macrl import MACRLBackbone, MACRLConfig, MACRLForImageClassification, MACRLForPreTraining, MACRLModel
from macrl.model_card import encoder_parameter_count

REGISTERS = 3
PREFIX = 1 + REGISTERS


@pytest.fixture
def config(tiny_config):
    return tiny_config(num_register_tokens=REGISTERS, num_labels=10, out_indices=[1, 2])


def test_config_counts_prefix_tokens_and_validates(tiny_config, tmp_path):
    assert MACRLConfig().num_register_tokens == 0 and MACRLConfig().num_prefix_tokens == 1
    config = tiny_config(num_register_tokens=REGISTERS)
    assert config.num_prefix_tokens == PREFIX
    config.save_pretrained(tmp_path)
    assert MACRLConfig.from_pretrained(tmp_path).num_register_tokens == REGISTERS
    with pytest.raises(ValueError, match=r"MACRLConfig\.num_register_tokens=-1: must be zero or a positive integer"):
        tiny_config(num_register_tokens=-1)


def test_without_registers_the_weights_are_unchanged(tiny_config):
    """The default keeps earlier checkpoints' tensors: no `reg_token`, one position row for the CLS token."""
    shapes = {name: tuple(t.shape) for name, t in MACRLModel(tiny_config()).state_dict().items()}
    assert "reg_token" not in shapes and shapes["pos_embed"] == (1, 1 + 49, 32)
    registers = MACRLModel(tiny_config(num_register_tokens=2)).state_dict()
    assert registers["reg_token"].shape == (1, 2, 32) and registers["pos_embed"].shape == (1, 3 + 49, 32)


def test_encoder_token_order_and_pooling(config, fashion_images):
    pixels = fashion_images[0][:3]
    model = MACRLModel(config).eval()
    assert model.reg_token.std() > 0  # initialised like the CLS token, not left at zero
    assert torch.equal(model.pos_embed[0, :PREFIX], torch.zeros(PREFIX, 32))  # the prefix tokens have no position
    with torch.no_grad():
        output = model(pixels, output_hidden_states=True, output_attentions=True)
    assert output.last_hidden_state.shape == (3, PREFIX + 49, 32)
    embeddings = output.hidden_states[0]  # timm's order: CLS, registers, patches
    torch.testing.assert_close(embeddings[:, 0], model.cls_token[0].expand(3, -1))
    torch.testing.assert_close(embeddings[:, 1:PREFIX], model.reg_token.expand(3, -1, -1))
    with torch.no_grad():
        patches = model.patch_embed(pixels) + model.pos_embed[:, PREFIX:]
    torch.testing.assert_close(embeddings[:, PREFIX:], patches)
    assert output.attentions[-1].shape == (3, 2, PREFIX + 49, PREFIX + 49)
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state[:, 0])  # cls pooling

    config.pooling = "mean"
    mean_model = MACRLModel(config).eval()
    mean_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        pooled = mean_model(pixels).pooler_output
    torch.testing.assert_close(pooled, output.last_hidden_state[:, PREFIX:].mean(1))  # registers left out


def test_registers_change_what_the_patches_see(config, fashion_images):
    """The registers take part in attention: other register values give other patch tokens."""
    pixels = fashion_images[0][:2]
    model = MACRLModel(config).eval()
    with torch.no_grad():
        before = model(pixels).last_hidden_state[:, PREFIX:]
        model.reg_token.add_(1.0)
        after = model(pixels).last_hidden_state[:, PREFIX:]
    assert not torch.allclose(before, after)


def test_masking_never_hides_the_registers(config, fashion_images):
    pixels = fashion_images[0][:4]
    model = MACRLForPreTraining(config).eval()
    noise = torch.rand(4, 49, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(pixels, noise=noise, output_hidden_states=True)
    visible = int(49 * (1 - config.mask_ratio))
    assert output.mask.shape == (4, 49) and output.mask.sum(1).tolist() == [49 - visible] * 4
    assert output.hidden_states[0].shape == (4, PREFIX + visible, 32)
    torch.testing.assert_close(output.hidden_states[0][:, 1:PREFIX], model.macrl.reg_token.expand(4, -1, -1))
    # the decoder carries them and predicts every patch, the prefix tokens dropped
    assert output.logits.shape == (4, 49, config.patch_size**2 * config.num_channels)
    assert model.decoder.decoder_pos_embed.shape == (1, PREFIX + 49, config.decoder_hidden_size)


def test_reconstruction_without_masking_has_the_prefix_in_place(tiny_config, fashion_images):
    """`mask_ratio=0` sends every token to the decoder in image order; the prefix must not be read as patches."""
    config = tiny_config(num_register_tokens=REGISTERS, mask_ratio=0.0, contrastive_weight=0.0)
    model = MACRLForPreTraining(config).eval()
    with torch.no_grad():
        output = model(fashion_images[0][:2])
    assert output.mask is None and output.logits.shape == (2, 49, 16)


def test_backbone_feature_maps_leave_the_registers_out(config, fashion_images):
    pixels = fashion_images[0][:3]
    backbone = MACRLBackbone(config).eval()
    with torch.no_grad():
        output = backbone(pixels, output_hidden_states=True)
    assert [tuple(f.shape) for f in output.feature_maps] == [(3, 32, 7, 7)] * 2
    for feature_map, hidden_state in zip(output.feature_maps, output.hidden_states[1:]):
        expected = backbone.norm(hidden_state)[:, PREFIX:].reshape(3, 7, 7, 32).permute(0, 3, 1, 2)
        torch.testing.assert_close(feature_map, expected)


@pytest.mark.parametrize("cls", [MACRLForPreTraining, MACRLForImageClassification], ids=["pretraining", "classifier"])
def test_training_reaches_the_registers(cls, config, fashion_images):
    pixels, labels = fashion_images
    model = cls(config).train()
    loss = model(pixels[:8], labels=labels[:8]).loss if cls is MACRLForImageClassification else model(pixels[:8]).loss
    loss.backward()
    assert model.macrl.reg_token.grad is not None and model.macrl.reg_token.grad.abs().sum() > 0
    if cls is MACRLForPreTraining:  # the momentum twin has them too, and gets them by the EMA
        assert model.momentum_encoder.reg_token.shape == model.macrl.reg_token.shape
        assert not model.momentum_encoder.reg_token.requires_grad


def test_save_load_and_parameter_count(config, tmp_path, fashion_images):
    torch.manual_seed(0)
    model = MACRLModel(config).eval()
    model.save_pretrained(tmp_path)
    loaded = MACRLModel.from_pretrained(tmp_path).eval()
    pixels = fashion_images[0][:2]
    with torch.no_grad():
        assert torch.equal(loaded(pixels).last_hidden_state, model(pixels).last_hidden_state)
    counted = sum(t.numel() for t in [*model.parameters(), model.pos_embed])  # the model card's count
    assert encoder_parameter_count(config) == counted
