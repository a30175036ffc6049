"""`MACRLBackbone`: feature maps per stage, loading from encoder folders and the Hub through `AutoBackbone`, and the
backbone under a transformers dense-prediction head (UperNet) on real images, forward and backward."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoBackbone, AutoConfig, UperNetConfig, UperNetForSemanticSegmentation

from macrl import MACRLBackbone, MACRLForPreTraining, MACRLModel


@pytest.fixture
def encoder_folder(tiny_encoder_folder):
    return MACRLModel.from_pretrained(tiny_encoder_folder).eval(), tiny_encoder_folder


def test_feature_maps_are_the_stages_out_indices_names(tiny_config, fashion_images):
    pixels = fashion_images[0][:3]
    backbone = MACRLBackbone(tiny_config(out_indices=[0, 2])).eval()
    assert backbone.config.out_features == ["stem", "stage2"] and backbone.channels == [32, 32]
    with torch.no_grad():
        output = backbone(pixels)
        tokens = backbone(pixels, output_hidden_states=True).hidden_states  # stem + one per block
    assert output.hidden_states is None and output.attentions is None
    assert [tuple(f.shape) for f in output.feature_maps] == [(3, 32, 7, 7)] * 2
    for feature_map, hidden_state in zip(output.feature_maps, (tokens[0], tokens[2])):
        expected = backbone.norm(hidden_state)[:, 1:].reshape(3, 7, 7, 32).permute(0, 3, 1, 2)
        torch.testing.assert_close(feature_map, expected)
    # the last stage through the final LayerNorm is MACRLModel's output
    with torch.no_grad():
        last = MACRLModel.forward(backbone, pixels).last_hidden_state
    torch.testing.assert_close(output.feature_maps[-1], last[:, 1:].reshape(3, 7, 7, 32).permute(0, 3, 1, 2))


def test_layernorm_reshape_and_other_image_sizes(tiny_config, fashion_images):
    pixels = fashion_images[0][:2]
    raw = MACRLBackbone(tiny_config(out_features=["stage1"], apply_layernorm=False, reshape_hidden_states=False))
    with torch.no_grad():
        tokens = raw.eval()(pixels, output_hidden_states=True)
    assert tokens.feature_maps[0].shape == (2, 50, 32)  # CLS first, no norm
    torch.testing.assert_close(tokens.feature_maps[0], tokens.hidden_states[1])
    # dense heads feed other sizes: the positions are resampled unless interpolate_pos_encoding=False
    backbone = MACRLBackbone(tiny_config()).eval()
    wide = F.interpolate(pixels, size=(32, 44), mode="bilinear")
    with torch.no_grad():
        assert backbone(wide).feature_maps[0].shape == (2, 32, 8, 11)
    with pytest.raises(ValueError, match="32x44 does not match the model's 28x28"):
        backbone(wide, interpolate_pos_encoding=False)


def test_loads_from_encoder_and_pretraining_folders(encoder_folder, tmp_path, tiny_config, fashion_images):
    encoder, folder = encoder_folder
    backbone, info = MACRLBackbone.from_pretrained(folder, out_indices=[1, 2], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert backbone.out_features == ["stage1", "stage2"]
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], tensor), name
    pixels = fashion_images[0][:2]
    with torch.no_grad():
        stage1 = encoder.norm(encoder(pixels, output_hidden_states=True).hidden_states[1])  # [2, 50, 32]
        feature_map = backbone(pixels).feature_maps[0]  # [2, 32, 7, 7]
    torch.testing.assert_close(feature_map, stage1[:, 1:].reshape(2, 7, 7, 32).permute(0, 3, 1, 2))
    # a pre-training folder's main encoder (`macrl.` prefix), without complaint about the heads
    MACRLForPreTraining(tiny_config()).save_pretrained(tmp_path / "pretrain")
    _, info = MACRLBackbone.from_pretrained(tmp_path / "pretrain", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # the Auto classes resolve it from the folder's config
    config = AutoConfig.from_pretrained(folder, out_indices=[2])
    assert type(AutoBackbone.from_config(config)) is MACRLBackbone


def test_auto_backbone_from_the_hub(hub_server, encoder_folder):
    from macrl.hub import push_encoder_to_hub

    encoder, folder = encoder_folder
    push_encoder_to_hub(folder, "tester/macrl-backbone")
    backbone = AutoBackbone.from_pretrained("tester/macrl-backbone", out_indices=[1, 2])
    assert type(backbone) is MACRLBackbone and backbone.out_features == ["stage1", "stage2"]
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], tensor), name


def test_upernet_on_a_macrl_backbone_trains(encoder_folder, tiny_config, fashion_images):
    """UperNet segments foreground from background on real Fashion-MNIST images: forward, loss, backward."""
    _, folder = encoder_folder
    # UperNet takes four feature maps of a ViT as a pyramid; the tiny encoder has three stages, its auxiliary head
    # reads the third
    backbone_config = AutoConfig.from_pretrained(folder, out_indices=[0, 1, 2])
    config = UperNetConfig(
        backbone_config=backbone_config.to_dict(),
        hidden_size=16,
        auxiliary_channels=8,
        num_labels=2,
        auxiliary_in_channels=32,
    )
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(config).train()
    assert type(model.backbone) is MACRLBackbone and model.backbone.channels == [32, 32, 32]
    model.backbone.load_state_dict(MACRLBackbone.from_pretrained(folder).state_dict())  # the pre-trained encoder
    pixels = fashion_images[0][:8]
    labels = (pixels[:, 0] > -0.9).long()  # [N, 28, 28]: 1 on the garment
    output = model(pixels, labels=labels)
    assert output.logits.shape == (8, 2, 28, 28) and torch.isfinite(output.loss)
    output.loss.backward()
    for name in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "norm.weight"):
        gradient = model.backbone.get_parameter(name).grad
        assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0, name
