"""Any image size, exactly: MACRL's positions are MAE's fixed 2D sin-cos, a function of each patch's row and column,
so with `interpolate_pos_encoding=True` every class computes them for the actual grid (square or not) and a model run
at twice its `image_size` equals one built at that size; learned positions from converted checkpoints are resampled
instead, and a folder that stores other positions than its config says loads as learned. (`torch.export` with dynamic
height and width is in test_export.py.)"""

import logging

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from macrl import MACRLBackbone, MACRLForImageClassification, MACRLForPreTraining, MACRLModel
from macrl.modeling_macrl import sincos_position_embedding

CLASSES = [MACRLModel, MACRLForImageClassification, MACRLBackbone, MACRLForPreTraining]
ids = [cls.__name__ for cls in CLASSES]


def _pair(cls, tiny_config, size: int, **overrides):
    """A model built at the tiny size (28 px) and one built at `size`, with the same weights (the stored position
    tables, whose shapes differ, excepted)."""
    torch.manual_seed(0)
    small = cls(tiny_config(num_labels=10, out_indices=[1, 2], **overrides)).eval()
    big = cls(tiny_config(num_labels=10, out_indices=[1, 2], image_size=size, **overrides)).eval()
    weights = {name: tensor for name, tensor in small.state_dict().items() if not name.endswith("pos_embed")}
    assert big.load_state_dict(weights, strict=False).missing_keys == [
        name for name in big.state_dict() if name.endswith("pos_embed")
    ]
    return small, big


def _outputs(model, pixels, **kwargs):
    if isinstance(model, MACRLForPreTraining):
        grid = pixels.shape[-1] // model.config.patch_size
        kwargs["noise"] = torch.rand(pixels.shape[0], grid * grid, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(pixels, **kwargs)


@pytest.mark.parametrize("registers", [0, 2], ids=["no-registers", "registers"])
@pytest.mark.parametrize("cls", CLASSES, ids=ids)
def test_a_model_at_twice_its_size_equals_one_built_at_that_size(cls, registers, tiny_config, fashion_images):
    pixels = F.interpolate(fashion_images[0][:3], size=(56, 56), mode="bilinear")
    small, big = _pair(cls, tiny_config, 56, num_register_tokens=registers)
    expected = _outputs(big, pixels)
    actual = _outputs(small, pixels, interpolate_pos_encoding=True)
    assert expected.keys() == actual.keys()
    for key in expected.keys():
        pairs = zip(actual[key], expected[key]) if isinstance(expected[key], tuple) else [(actual[key], expected[key])]
        assert all(torch.equal(a, b) for a, b in pairs), key
    if cls is MACRLForPreTraining:  # the decoder's positions too: every patch of the big grid is predicted
        assert actual.logits.shape == (3, 14 * 14, 16)


def test_non_square_grids_take_the_rows_and_columns_of_the_square_ones(tiny_config, fashion_images):
    """The position of patch (r, c) does not depend on the grid: a 4 x 6 grid's are the top rows of a 6 x 6 grid's."""
    dim, prefix = 32, 3
    wide = sincos_position_embedding((4, 6), dim, prefix)[0]  # [3 + 24, D]
    square = sincos_position_embedding(6, dim, prefix)[0]
    assert torch.equal(wide[:prefix], torch.zeros(prefix, dim))
    assert torch.equal(wide[prefix:].reshape(4, 6, dim), square[prefix:].reshape(6, 6, dim)[:4])
    tall = sincos_position_embedding((6, 4), dim, prefix)[0]
    assert torch.equal(tall[prefix:].reshape(6, 4, dim), square[prefix:].reshape(6, 6, dim)[:, :4])

    model = MACRLForPreTraining(tiny_config(num_register_tokens=2)).eval()
    pixels = F.interpolate(fashion_images[0][:2], size=(16, 24), mode="bilinear")
    noise = torch.rand(2, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(pixels, noise=noise, interpolate_pos_encoding=True)
        tokens = model.macrl(pixels, interpolate_pos_encoding=True).last_hidden_state
    assert output.logits.shape == (2, 24, 16) and torch.isfinite(output.loss)
    assert tokens.shape == (2, 3 + 24, 32)
    reconstruction = model.unpatchify(output.logits, image_size=(16, 24))
    assert reconstruction.shape == pixels.shape


def test_learned_positions_are_used_as_stored_and_resampled_elsewhere(tiny_config, fashion_images):
    """`position_embedding_type="learned"` (what converters set for positions that are not the sin-cos): the table
    itself at the config's size, timm's bicubic resampling of it at another."""
    small, big = _pair(MACRLModel, tiny_config, 36, position_embedding_type="learned")
    with torch.no_grad():
        small.pos_embed.add_(torch.randn(small.pos_embed.shape, generator=torch.Generator().manual_seed(1)))
        big.pos_embed.copy_(resample_abs_pos_embed(small.pos_embed, [9, 9], num_prefix_tokens=1))
    big_pixels = F.interpolate(fashion_images[0][:2], size=(36, 36), mode="bilinear")
    expected = _outputs(big, big_pixels).last_hidden_state
    actual = _outputs(small, big_pixels, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(actual, expected)
    # the same weights read as "sincos" compute the positions instead, whatever the table holds
    sincos = MACRLModel(tiny_config()).eval()
    sincos.load_state_dict(small.state_dict())
    assert not torch.allclose(_outputs(sincos, big_pixels, interpolate_pos_encoding=True).last_hidden_state, actual)


def test_a_folder_storing_other_positions_loads_as_learned(tiny_config, tmp_path, fashion_images, caplog):
    """A folder converted before `position_embedding_type` existed says "sincos" (the default) but stores learned
    positions: it loads as "learned", with a warning, and keeps its outputs."""
    torch.manual_seed(0)
    model = MACRLModel(tiny_config()).eval()
    with torch.no_grad():
        model.pos_embed.add_(0.1)
    model.save_pretrained(tmp_path / "converted")
    with caplog.at_level(logging.WARNING, logger="macrl"):
        loaded = MACRLModel.from_pretrained(tmp_path / "converted").eval()
    assert loaded.config.position_embedding_type == "learned"
    assert "not MAE's fixed 2D sin-cos" in caplog.text and "converted" in caplog.text
    pixels = fashion_images[0][:2]
    assert torch.equal(_outputs(loaded, pixels).pooler_output, _outputs(model, pixels).pooler_output)

    caplog.clear()
    MACRLModel(tiny_config()).save_pretrained(tmp_path / "fixed")
    with caplog.at_level(logging.WARNING, logger="macrl"):
        assert MACRLModel.from_pretrained(tmp_path / "fixed").config.position_embedding_type == "sincos"
    assert "sin-cos" not in caplog.text
    with pytest.raises(ValueError, match="position_embedding_type='rope'"):
        tiny_config(position_embedding_type="rope")
