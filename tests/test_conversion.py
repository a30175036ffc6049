"""The conversion scripts (conversion/): tiny random sources, numerical round trips, key mismatches, command lines."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from macrl.conversion import CONVERTERS, common
from macrl.conversion.common import KeyMismatchError, OutputMismatchError
from macrl.conversion.convert_macrl_checkpoint_to_hf import convert_macrl_checkpoint
from macrl.conversion.convert_macrl_to_timm import macrl_to_timm, timm_to_macrl
from macrl.conversion.convert_mae_original_to_macrl import convert_mae_original
from macrl.conversion.convert_mocov3_to_macrl import build_mlp, convert_mocov3, macrl_fields_from_mocov3
from macrl.conversion.convert_vit_mae_to_macrl import convert_vit_mae, macrl_fields_from_vit_mae

SMALL_HEADS = dict(projection_dim=16, projector_hidden_size=32, predictor_hidden_size=32)
SMALL_DECODER = dict(
    decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32
)
MAE_TO_MACRL_PREFIXES = {"macrl.": "", "decoder.": ""}
MOCO_NAMES = {
    "macrl.": "base_encoder.",
    "projector.": "base_encoder.head.",
    "momentum_encoder.": "momentum_encoder.",
    "momentum_projector.": "momentum_encoder.head.",
    "predictor.": "predictor.",
}


# ---------------------------------------------------------------------------------------------------------------------
# sources


def randomized(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every float tensor (fixed positions, tokens and BatchNorm statistics included), so copies are tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
                if name.endswith("running_var"):
                    tensor.abs_().add_(0.5)
    return model.eval()


def make_vit_mae(folder: Path, **overrides):
    """A tiny random transformers ViTMAEForPreTraining saved in `folder` (eps 1e-12, its default)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    fields = dict(
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
        norm_pix_loss=True,
    )
    torch.manual_seed(0)
    model = randomized(ViTMAEForPreTraining(ViTMAEConfig(**{**fields, **overrides})))
    model.save_pretrained(folder)
    return model


def make_macrl(config, seed: int = 0):
    from macrl import MACRLForPreTraining

    torch.manual_seed(seed)
    return randomized(MACRLForPreTraining(config), seed=seed)


def mae_checkpoint(macrl_model, path: Path, decoder: bool = True, **args) -> dict:
    """facebookresearch/mae's layout, built from a MACRL model: the same names without the `macrl.` / `decoder.`."""
    state_dict = {}
    for key, value in macrl_model.state_dict().items():
        if key.startswith("macrl.") or decoder and key.startswith("decoder."):
            state_dict["module." + key.split(".", 1)[1]] = value.clone()
    torch.save({"model": state_dict, "args": argparse.Namespace(**args), "epoch": 3}, path)
    return state_dict


def mocov3_checkpoint(model, path: Path) -> dict:
    """moco-v3's layout, built from a MACRL model (projector = `head`, no decoder), under DDP's `module.`."""
    state_dict = {}
    for key, value in model.state_dict().items():
        for prefix, moco_prefix in MOCO_NAMES.items():
            if key.startswith(prefix):
                state_dict[f"module.{moco_prefix}{key[len(prefix):]}"] = value.clone()
                break
    torch.save({"epoch": 3, "arch": "vit_small", "state_dict": state_dict}, path)
    return state_dict


def mae_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py `get_2d_sincos_pos_embed(..., cls_token=True)`, verbatim in numpy."""

    def one_dim(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float32)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_dim(embed_dim // 2, grid[0]), one_dim(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def pixels_for(config, batch_size: int = 3) -> torch.Tensor:
    return torch.randn(batch_size, config.num_channels, config.image_size, config.image_size)


# ---------------------------------------------------------------------------------------------------------------------
# shared helpers


def split_qkv_keys(state_dict: dict, names=("q_proj", "k_proj", "v_proj"), fused: str = "qkv") -> dict:
    """The inverse of `common.merge_qkv_keys` (test side): every `P.{fused}.{weight,bias}` becomes `P.{q}`, `P.{k}`,
    `P.{v}`."""
    out = {}
    for key, value in state_dict.items():
        match = re.fullmatch(rf"(.*)\.{re.escape(fused)}\.(weight|bias)", key)
        if not match:
            out[key] = value
            continue
        prefix, kind = match.groups()
        for name, part in zip(names, value.chunk(3, dim=0)):
            out[f"{prefix}.{name}.{kind}"] = part.clone()
    return out


def test_common_helpers(tmp_path):
    weight, bias = torch.randn(96, 32), torch.randn(96)
    assert torch.equal(common.merge_qkv(*weight.chunk(3, dim=0)), weight)
    fused = {"a.attn.qkv.weight": weight, "a.attn.qkv.bias": bias, "a.norm.weight": torch.ones(32)}
    split = split_qkv_keys(fused)
    assert sorted(split) == sorted(
        ["a.norm.weight"] + [f"a.attn.{n}.{k}" for n in ("q_proj", "k_proj", "v_proj") for k in ("weight", "bias")]
    )
    assert all(torch.equal(split[k], fused[k]) for k in fused if k in split)
    merged = common.merge_qkv_keys(split)
    assert merged.keys() == fused.keys() and all(torch.equal(merged[k], fused[k]) for k in fused)
    with pytest.raises(KeyMismatchError, match=r"a\.attn\.v_proj\.weight"):
        common.merge_qkv_keys({k: v for k, v in split.items() if k != "a.attn.v_proj.weight"})

    with pytest.raises(KeyMismatchError, match="unexpected keys \\(1\\): head.weight"):
        common.rename_keys({"norm.weight": 1, "head.weight": 2}, [(r"norm\.(.+)", r"macrl.norm.\1")])
    expected = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(KeyMismatchError) as error:
        common.check_keys({"a": torch.zeros(4), "c": torch.zeros(1)}, expected, source="src")
    message = str(error.value)
    assert "missing keys (1): b" in message and "unexpected keys (1): c" in message
    assert "a (4,) (expected (2,))" in message
    assert error.value.missing == ["b"] and error.value.unexpected == ["c"]

    assert common.compare_outputs(torch.ones(3), torch.ones(3) + 1e-7, atol=1e-5) < 1e-6
    with pytest.raises(OutputMismatchError, match="logits"):
        common.compare_outputs(torch.ones(3), torch.ones(3) + 1e-3, atol=1e-5, name="logits")
    with pytest.raises(OutputMismatchError, match="shapes differ"):
        common.compare_outputs(torch.ones(3), torch.ones(4))

    assert common.parse_overrides(["mask_ratio=0.5", "reconstruction_loss=l2", "symmetric_loss=true"]) == {
        "mask_ratio": 0.5,
        "reconstruction_loss": "l2",
        "symmetric_loss": True,
    }
    with pytest.raises(ValueError, match="not a MACRLConfig field"):
        common.parse_overrides(["no_such_field=1"])

    # torch checkpoints load with weights_only=True: MAE's argparse args pass, any other pickled class does not
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(mask_ratio=0.6)}, tmp_path / "ok.pth")
    assert common.checkpoint_args(common.load_checkpoint(tmp_path / "ok.pth")) == {"mask_ratio": 0.6}
    torch.save({"model": {"w": torch.ones(1)}, "evil": OutputMismatchError("x")}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        common.load_checkpoint(tmp_path / "evil.pth")


def test_sincos_layout_is_maes():
    """MACRL's fixed positions are MAE's (util/pos_embed.py) exactly: [w | h] halves, which ViTMAE reproduces too."""
    from macrl.modeling_macrl import sincos_position_embedding

    for dim, grid in ((32, 7), (16, 4), (64, 14)):
        reference = torch.from_numpy(mae_sincos(dim, grid)).float()
        assert torch.allclose(sincos_position_embedding(grid, dim)[0], reference, atol=1e-6)
        assert "MAE's fixed" in common.describe_position_embedding(reference[None], grid)
    half = torch.from_numpy(mae_sincos(32, 7)).float()[None]
    swapped = torch.cat([half[..., 16:], half[..., :16]], dim=-1)
    assert "[h | w]" in common.describe_position_embedding(swapped, 7)


# ---------------------------------------------------------------------------------------------------------------------
# ViTMAE


def test_vit_mae_to_macrl_matches_encoder_logits_and_loss(tmp_path):
    from macrl import MACRLForPreTraining

    source = make_vit_mae(tmp_path / "vit-mae")
    convert_vit_mae(
        str(tmp_path / "vit-mae"),
        tmp_path / "macrl",
        overrides=dict(contrastive_weight=0, reconstruction_loss="l2", **SMALL_HEADS),  # MACRL configured as MAE
    )
    model = MACRLForPreTraining.from_pretrained(tmp_path / "macrl").eval()
    config = model.config
    assert (config.layer_norm_eps, config.norm_pix_loss, config.mask_ratio) == (1e-12, True, 0.75)
    assert (config.hidden_size, config.num_attention_heads, config.decoder_hidden_size) == (32, 2, 16)
    assert (tmp_path / "macrl" / "preprocessor_config.json").is_file()

    pixels, noise = pixels_for(config), torch.rand(3, config.num_patches)
    with torch.no_grad():
        reference, ours = source(pixels, noise=noise), model(pixels, noise=noise)
        assert torch.equal(ours.mask, reference.mask)
        torch.testing.assert_close(ours.logits, reference.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.loss, reference.loss, atol=1e-5, rtol=0)
        source.config.mask_ratio = 0.0  # ViTMAEModel without masking; identity noise keeps the image order
        identity = torch.arange(config.num_patches, dtype=torch.float32).expand(3, -1)
        tokens = source.vit(pixels, noise=identity).last_hidden_state
        torch.testing.assert_close(model.macrl(pixels).last_hidden_state, tokens, atol=1e-5, rtol=0)

    attention = source.vit.layers[1].attention
    qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(model.macrl.blocks[1].attn.qkv.weight, qkv)
    assert torch.equal(model.macrl.pos_embed, source.vit.embeddings.position_embeddings)
    assert torch.equal(model.decoder.decoder_pos_embed, source.decoder.decoder_pos_embed)
    for main, momentum in ((model.macrl, model.momentum_encoder), (model.projector, model.momentum_projector)):
        assert all(torch.equal(a, b) for a, b in zip(main.state_dict().values(), momentum.state_dict().values()))


def test_vit_mae_encoder_only_and_activation_mapping(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEModel

    from macrl import MACRLModel

    source = make_vit_mae(tmp_path / "vit-mae", hidden_act="quick_gelu", qkv_bias=False, layer_norm_eps=1e-6)
    convert_vit_mae(str(tmp_path / "vit-mae"), tmp_path / "encoder", encoder_only=True)
    model = MACRLModel.from_pretrained(tmp_path / "encoder").eval()
    assert (model.config.hidden_act, model.config.qkv_bias) == ("quick_gelu", False)
    vit = ViTMAEModel.from_pretrained(tmp_path / "vit-mae", mask_ratio=0.0).eval()
    pixels = pixels_for(model.config)
    with torch.no_grad():
        identity = torch.arange(model.config.num_patches, dtype=torch.float32).expand(3, -1)
        torch.testing.assert_close(model(pixels).last_hidden_state, vit(pixels, noise=identity).last_hidden_state)
    assert source.config.hidden_act == "quick_gelu"
    for name, macrl_name in (("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("swish", "silu")):
        assert macrl_fields_from_vit_mae(ViTMAEConfig(hidden_act=name))["hidden_act"] == macrl_name
    with pytest.raises(ValueError, match="hidden_act='mish'"):
        macrl_fields_from_vit_mae(ViTMAEConfig(hidden_act="mish"))


def test_vit_mae_with_mismatched_keys_raises(tmp_path):
    from safetensors.torch import load_file, save_file

    make_vit_mae(tmp_path / "vit-mae")
    weights = load_file(tmp_path / "vit-mae" / "model.safetensors")
    weights["vit.final_norm.weight"] = weights.pop("vit.layernorm.weight")
    save_file(weights, tmp_path / "vit-mae" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyMismatchError) as error:
        convert_vit_mae(str(tmp_path / "vit-mae"), None)
    assert error.value.missing == ["vit.layernorm.weight"] and error.value.unexpected == ["vit.final_norm.weight"]
    assert "vit.layernorm.weight" in str(error.value) and "vit.final_norm.weight" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# facebookresearch/mae and moco-v3


def test_mae_original_round_trip(tmp_path, tiny_config):
    from macrl import MACRLForPreTraining, MACRLModel

    source = make_macrl(tiny_config(mask_ratio=0.5, norm_pix_loss=True))
    args = dict(model="mae_vit_base_patch16", mask_ratio=0.5, norm_pix_loss=True)  # MAE's training arguments
    original = mae_checkpoint(source, tmp_path / "mae.pth", **args)
    heads = dict(num_attention_heads=2, decoder_num_attention_heads=2)
    convert_mae_original(tmp_path / "mae.pth", tmp_path / "macrl", **heads, overrides=SMALL_HEADS)
    model = MACRLForPreTraining.from_pretrained(tmp_path / "macrl").eval()
    assert (model.config.mask_ratio, model.config.norm_pix_loss, model.config.layer_norm_eps) == (0.5, True, 1e-6)
    converted = model.state_dict()
    back = {k.split(".", 1)[1]: v for k, v in converted.items() if k.startswith(("macrl.", "decoder."))}
    assert back.keys() == {k.removeprefix("module.") for k in original}
    assert all(torch.equal(back[k.removeprefix("module.")], v) for k, v in original.items())  # bit-identical
    pixels, noise = pixels_for(model.config), torch.rand(3, model.config.num_patches)
    with torch.no_grad():
        assert torch.equal(model(pixels, noise=noise).logits, source(pixels, noise=noise).logits)

    # MAE's released mae_pretrain_*.pth hold the encoder only
    mae_checkpoint(source, tmp_path / "encoder.pth", decoder=False)
    with pytest.raises(KeyMismatchError, match="decoder_embed.weight"):
        convert_mae_original(tmp_path / "encoder.pth", None, num_attention_heads=2)
    convert_mae_original(tmp_path / "encoder.pth", tmp_path / "encoder", encoder_only=True, num_attention_heads=2)
    encoder = MACRLModel.from_pretrained(tmp_path / "encoder").eval()
    with torch.no_grad():
        assert torch.equal(encoder(pixels).last_hidden_state, source.macrl(pixels).last_hidden_state)


def test_converters_say_whether_the_positions_are_the_fixed_sincos(tmp_path, tiny_config):
    """MAE's checkpoints store its fixed sin-cos: the converted model computes it for every image size
    (`position_embedding_type="sincos"`); other stored positions are kept and resampled (`"learned"`), unless
    `--set` says otherwise."""
    from macrl import MACRLForPreTraining

    torch.manual_seed(0)
    source = MACRLForPreTraining(tiny_config())
    mae_checkpoint(source, tmp_path / "mae.pth", decoder=False)
    convert = dict(encoder_only=True, num_attention_heads=2)
    assert convert_mae_original(tmp_path / "mae.pth", None, **convert).config.position_embedding_type == "sincos"
    with torch.no_grad():
        source.macrl.pos_embed.add_(0.01)
    mae_checkpoint(source, tmp_path / "mae.pth", decoder=False)
    assert convert_mae_original(tmp_path / "mae.pth", None, **convert).config.position_embedding_type == "learned"
    forced = convert_mae_original(tmp_path / "mae.pth", None, **convert, overrides={"position_embedding_type": "sincos"})
    assert forced.config.position_embedding_type == "sincos"


def test_mae_original_with_mismatched_keys_raises(tmp_path, tiny_config):
    source = make_macrl(tiny_config())
    state_dict = mae_checkpoint(source, tmp_path / "mae.pth")
    state_dict["module.blocks.0.attn.qkv_fused.weight"] = state_dict.pop("module.blocks.0.attn.qkv.weight")
    torch.save({"model": state_dict}, tmp_path / "mae.pth")
    with pytest.raises(KeyMismatchError) as error:
        convert_mae_original(tmp_path / "mae.pth", None, num_attention_heads=2, decoder_num_attention_heads=2)
    assert error.value.missing == ["blocks.0.attn.qkv.weight"]
    assert error.value.unexpected == ["blocks.0.attn.qkv_fused.weight"]
    state_dict["module.head.weight"] = torch.zeros(10, 32)  # a fine-tuned classifier
    torch.save({"model": state_dict}, tmp_path / "mae.pth")
    with pytest.raises(KeyMismatchError, match=r"head\.weight.*; hint: .*fine-tuned"):
        convert_mae_original(tmp_path / "mae.pth", None, num_attention_heads=2)


def test_mocov3_conversion(tmp_path, tiny_config):
    import timm

    from macrl import MACRLForPreTraining

    source = make_macrl(tiny_config(projector_hidden_size=48, predictor_hidden_size=40))
    randomized(source.momentum_encoder, seed=1)  # an EMA that has drifted from the main branch
    randomized(source.momentum_projector, seed=2)
    original = mocov3_checkpoint(source, tmp_path / "moco.pth.tar")
    convert_mocov3(tmp_path / "moco.pth.tar", tmp_path / "macrl", num_attention_heads=2, overrides=SMALL_DECODER)
    model = MACRLForPreTraining.from_pretrained(tmp_path / "macrl").eval()
    config = model.config
    assert (config.projector_hidden_size, config.predictor_hidden_size, config.projection_dim) == (48, 40, 16)
    converted = model.state_dict()
    fresh = ("decoder.",)
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith(fresh)}
    assert {k for k in converted if not k.startswith(fresh)} == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in converted.items() if not k.startswith(fresh))
    assert not any(k.startswith("momentum_decoder.") for k in converted)  # no loss reads one: none is built

    # against MoCo v3's modules: timm ViT (head replaced by the projector MLP) and the predictor MLP
    vit = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2,
        num_heads=2, mlp_ratio=2.0, num_classes=0,
    ).eval()  # fmt: skip
    base_encoder = common.select_prefix(original, "module.base_encoder.")
    vit.load_state_dict({k: v for k, v in base_encoder.items() if not k.startswith("head.")})
    head, predictor = build_mlp(3, 32, 48, 16).eval(), build_mlp(2, 16, 40, 16, last_bn=False).eval()
    head.load_state_dict(common.select_prefix(base_encoder, "head."))
    predictor.load_state_dict(common.select_prefix(original, "module.predictor."))
    pixels = pixels_for(config)
    with torch.no_grad():
        query = model.predictor(model.projector(model.macrl(pixels).pooler_output))
        torch.testing.assert_close(query, predictor(head(vit(pixels))))

    assert macrl_fields_from_mocov3(common.strip_common_prefix(original), arch="vit_small")["num_attention_heads"] == 12
    broken = dict(original)
    broken["module.base_encoder.blocks.1.mlp.fc3.weight"] = broken.pop("module.base_encoder.blocks.1.mlp.fc2.weight")
    torch.save({"state_dict": broken}, tmp_path / "broken.pth.tar")
    with pytest.raises(KeyMismatchError) as error:
        convert_mocov3(tmp_path / "broken.pth.tar", None, num_attention_heads=2)
    assert error.value.missing == ["blocks.1.mlp.fc2.weight"] and error.value.unexpected == ["blocks.1.mlp.fc3.weight"]


# ---------------------------------------------------------------------------------------------------------------------
# training checkpoints and timm


def test_macrl_checkpoint_to_encoder_and_full(tmp_path, tiny_config):
    from macrl import MACRLForPreTraining, MACRLImageProcessor, MACRLModel

    source = make_macrl(tiny_config())
    randomized(source.momentum_encoder, seed=3)
    source.save_pretrained(tmp_path / "run" / "checkpoints" / "checkpoint-4")
    source.save_pretrained(tmp_path / "run" / "checkpoints" / "checkpoint-12")
    torch.save({"state": {}}, tmp_path / "run" / "checkpoints" / "checkpoint-12" / "optimizer.pt")
    processor = MACRLImageProcessor(size={"height": 28, "width": 28}, num_channels=1, image_mean=[0.3], image_std=[0.4])
    processor.save_pretrained(tmp_path / "run" / "encoder")

    convert_macrl_checkpoint(tmp_path / "run", tmp_path / "encoder")  # the run folder: its newest checkpoint
    encoder = MACRLModel.from_pretrained(tmp_path / "encoder")
    assert all(torch.equal(v, source.macrl.state_dict()[k]) for k, v in encoder.state_dict().items())
    assert list(MACRLImageProcessor.from_pretrained(tmp_path / "encoder").image_mean) == [0.3]
    assert (tmp_path / "encoder" / "README.md").is_file() and not (tmp_path / "encoder" / "optimizer.pt").exists()

    convert_macrl_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint-4", tmp_path / "ema", momentum_encoder=True)
    ema = MACRLModel.from_pretrained(tmp_path / "ema")
    assert all(torch.equal(v, source.momentum_encoder.state_dict()[k]) for k, v in ema.state_dict().items())

    convert_macrl_checkpoint(tmp_path / "run", tmp_path / "full", full=True)
    full = MACRLForPreTraining.from_pretrained(tmp_path / "full")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in full.state_dict().items())

    weights = common.load_state_dict(tmp_path / "run" / "checkpoints" / "checkpoint-4")
    weights["macrl.extra_token"] = weights.pop("macrl.cls_token")
    from safetensors.torch import save_file

    save_file(weights, tmp_path / "run" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    with pytest.raises(KeyMismatchError) as error:
        convert_macrl_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint-4", None)
    assert error.value.missing == ["macrl.cls_token"] and error.value.unexpected == ["macrl.extra_token"]


@pytest.mark.parametrize("registers", [0, 2], ids=["no-registers", "registers"])
def test_macrl_timm_round_trip(tmp_path, tiny_config, registers):
    """MACRL -> timm -> MACRL: the timm model's features equal MACRL's (mean pooling leaves the registers out in both)
    and the weights come back bit-identical; registers are timm's `reg_tokens` with a position row each."""
    import timm

    from macrl import MACRLImageProcessor, MACRLModel

    config = tiny_config(pooling="mean", hidden_act="gelu_tanh", qkv_bias=False, num_register_tokens=registers)
    torch.manual_seed(0)
    encoder = randomized(MACRLModel(config))
    encoder.save_pretrained(tmp_path / "encoder")
    MACRLImageProcessor.from_model_config(config).save_pretrained(tmp_path / "encoder")

    macrl_to_timm(tmp_path / "encoder", tmp_path / "timm")
    timm_config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert timm_config["num_classes"] == 0 and timm_config["architecture"].startswith("vit_")
    args = timm_config["model_args"]
    assert (args["global_pool"], args["fc_norm"], args["act_layer"]) == ("avg", False, "gelu_tanh")
    assert args["qkv_bias"] is False and args["in_chans"] == 1 and args["num_classes"] == 0
    assert args.get("reg_tokens", 0) == registers and "no_embed_class" not in args
    cfg = timm_config["pretrained_cfg"]
    assert (cfg["input_size"], cfg["mean"], cfg["std"], cfg["crop_pct"]) == ([1, 28, 28], [0.5], [0.5], 1.0)
    assert "hf_hub_id" not in cfg and cfg["tag"] == "macrl"

    pixels = pixels_for(config)
    loaded = [
        timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True),
        timm.create_model(
            timm_config["architecture"],
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors")),
            **args,
        ),
    ]
    with torch.no_grad():
        ours = encoder(pixels)
        for model in loaded:
            model.eval()
            # equal up to float rounding (MACRL may fuse fc1 + GELU without autograd); the weights are bit-identical
            torch.testing.assert_close(model.forward_features(pixels), ours.last_hidden_state, atol=1e-5, rtol=0)
            torch.testing.assert_close(model(pixels), ours.pooler_output, atol=1e-5, rtol=0)
            assert model.num_prefix_tokens == config.num_prefix_tokens == 1 + registers

    timm_to_macrl(tmp_path / "timm", tmp_path / "back")
    back = MACRLModel.from_pretrained(tmp_path / "back").eval()
    assert back.state_dict().keys() == encoder.state_dict().keys()
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in back.state_dict().items())  # bit-identical
    for field in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "hidden_act", "qkv_bias", "layer_norm_eps", "pooling",
                  "num_register_tokens"):  # fmt: skip
        assert getattr(back.config, field) == getattr(config, field), field
    with torch.no_grad():
        assert torch.equal(back(pixels).pooler_output, ours.pooler_output)


def test_timm_reverse_from_bare_weights_and_incompatible_models(tmp_path):
    import timm
    from safetensors.torch import save_file

    from macrl import MACRLModel

    vit = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
        num_classes=5,
    ).eval()  # fmt: skip
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    timm_to_macrl(tmp_path / "vit.safetensors", tmp_path / "macrl", num_attention_heads=4)
    model = MACRLModel.from_pretrained(tmp_path / "macrl").eval()
    assert (model.config.image_size, model.config.patch_size, model.config.num_attention_heads) == (32, 8, 4)
    assert model.config.position_embedding_type == "learned"  # a timm ViT's positions: resampled at other sizes
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).last_hidden_state, vit.forward_features(pixels))

    odd = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
        num_classes=0, init_values=1e-5, reg_tokens=1,
    )  # fmt: skip
    timm.models.save_for_hf(
        odd, tmp_path / "odd", model_args=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                               num_classes=0, init_values=1e-5, reg_tokens=1), safe_serialization=True
    )  # fmt: skip
    with pytest.raises(KeyMismatchError) as error:
        timm_to_macrl(tmp_path / "odd", None)
    # the layer scale has no MACRL equivalent; the register token has (num_register_tokens)
    assert {"blocks.0.ls1.gamma", "blocks.0.ls2.gamma"} <= set(error.value.unexpected)
    assert "reg_token" not in error.value.unexpected and "blocks.0.ls1.gamma" in str(error.value)
    patches_only_args = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                             no_embed_class=True)  # fmt: skip
    patches_only = timm.create_model("vit_base_patch16_224", pretrained=False, **patches_only_args)
    timm.models.save_for_hf(patches_only, tmp_path / "patches_only", model_args=patches_only_args)
    with pytest.raises(ValueError, match="no_embed_class=True .* has no MACRL layout"):
        timm_to_macrl(tmp_path / "patches_only", None)


# ---------------------------------------------------------------------------------------------------------------------
# command lines and the Hub


@pytest.mark.parametrize("kind", CONVERTERS)
def test_converter_help(kind, capsys):
    # in this process: a real process per kind cost 8 s of imports each; test_scripts_convert_from_the_command_line
    # runs the command as a process
    from macrl.convert import main

    assert main([kind, "--help"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: macrl-convert {kind}") and "--atol" in printed
    # every converter that writes a model folder pushes it; an ONNX export is no model folder
    assert ("--push-to-hub" in printed and "--private" in printed) == (kind != "onnx")


def test_convert_command_lists_the_kinds_and_refuses_others(capsys):
    from macrl.convert import main

    assert main([]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {kind} " in listing for kind in CONVERTERS), listing
    assert main(["tflite"]) == 2
    assert capsys.readouterr().err.startswith("macrl-convert: error: unknown KIND 'tflite'")


# runs `macrl-convert KIND ARGS` for each job in one interpreter, so torch, transformers and timm are imported once
DRIVER = """
import json, sys
from macrl.convert import main
print("EXIT CODES", json.dumps([main([kind, *argv]) for kind, argv in json.loads(sys.argv[1])]))
"""


def test_scripts_convert_from_the_command_line(tmp_path, tiny_config):
    from macrl import MACRLForPreTraining, MACRLModel

    make_vit_mae(tmp_path / "vit-mae")
    source = make_macrl(tiny_config())
    mae_checkpoint(source, tmp_path / "mae.pth", mask_ratio=0.75, norm_pix_loss=False)
    mocov3_checkpoint(source, tmp_path / "moco.pth.tar")
    source.save_pretrained(tmp_path / "run" / "checkpoints" / "checkpoint-2")
    weights = common.load_state_dict(tmp_path / "run" / "checkpoints" / "checkpoint-2")
    weights.pop("macrl.norm.bias")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "run/checkpoints/checkpoint-2/config.json").read_text())
    from safetensors.torch import save_file

    save_file(weights, tmp_path / "bad" / "model.safetensors")

    small = [f"--set={k}={v}" for k, v in SMALL_HEADS.items()]
    small_decoder = [f"--set={k}={v}" for k, v in SMALL_DECODER.items()]
    heads = ["--num-attention-heads", "2"]
    decoder_heads = ["--decoder-num-attention-heads", "2"]
    jobs = [
        ("vit-mae", [tmp_path / "vit-mae", tmp_path / "out-vit-mae", *small]),
        ("mae", [tmp_path / "mae.pth", tmp_path / "out-mae", *heads, *decoder_heads, *small]),
        ("mocov3", [tmp_path / "moco.pth.tar", tmp_path / "out-moco", *heads, *small_decoder]),
        ("checkpoint", [tmp_path / "run", tmp_path / "encoder"]),
        ("timm", [tmp_path / "encoder", tmp_path / "timm"]),
        ("timm", ["--reverse", tmp_path / "timm", tmp_path / "back"]),
        ("checkpoint", [tmp_path / "bad", tmp_path / "never"]),
        ("checkpoint", [tmp_path / "no-such-run", tmp_path / "never"]),
    ]  # fmt: skip
    payload = json.dumps([[kind, [str(a) for a in argv]] for kind, argv in jobs])
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, payload], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    codes_line = [line for line in result.stdout.splitlines() if line.startswith("EXIT CODES")]
    assert codes_line, result.stdout + result.stderr
    assert json.loads(codes_line[-1].removeprefix("EXIT CODES")) == [0, 0, 0, 0, 0, 0, 2, 2], result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("macrl-convert checkpoint: error: ")]
    assert len(errors) == 2 and "macrl.norm.bias" in errors[0] and "no-such-run" in errors[1], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()

    for name in ("out-vit-mae", "out-mae", "out-moco"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["model_type"] == "macrl" and config["architectures"] == ["MACRLForPreTraining"], name
        assert (tmp_path / name / "preprocessor_config.json").is_file()
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]["embed_dim"] == 32
    back = MACRLModel.from_pretrained(tmp_path / "back")  # checkpoint -> encoder -> timm -> MACRL, bit-identical
    assert all(torch.equal(v, source.macrl.state_dict()[k]) for k, v in back.state_dict().items())
    moco = MACRLForPreTraining.from_pretrained(tmp_path / "out-moco")
    assert torch.equal(moco.momentum_projector[0].weight, source.momentum_projector[0].weight)


def test_push_to_hub_then_load_with_timm_from_the_hub(hub_server, tmp_path, tiny_config):
    import timm
    from huggingface_hub import HfApi

    from macrl.conversion import convert_macrl_to_timm
    from macrl import MACRLModel

    torch.manual_seed(0)
    encoder = randomized(MACRLModel(tiny_config()))
    encoder.save_pretrained(tmp_path / "encoder")
    argv = [str(tmp_path / "encoder"), str(tmp_path / "timm"), "--push-to-hub", "tester/macrl-timm"]
    assert convert_macrl_to_timm.main(argv) == 0
    pushed = HfApi(endpoint=hub_server.url).list_repo_files("tester/macrl-timm")
    assert {"config.json", "model.safetensors"} <= set(pushed) and not any(f.endswith((".bin", ".pth")) for f in pushed)

    model = timm.create_model("hf-hub:tester/macrl-timm", pretrained=True).eval()
    pixels = pixels_for(encoder.config)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), encoder.eval()(pixels).pooler_output, atol=1e-5, rtol=0)
    back = timm_to_macrl("hf-hub:tester/macrl-timm", tmp_path / "back")
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in back.state_dict().items())


# each converter file run as Python runs a file: its folder first on sys.path, no package (one interpreter for all)
AS_FILES = """
import runpy, sys
codes = []
for path in sys.argv[1:]:
    sys.argv, sys.path[0] = [path, "--help"], str(__import__("pathlib").Path(path).parent)
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exit:
        codes.append(exit.code)
print("EXIT CODES", codes)
"""


def test_every_converter_runs_as_a_file_from_a_checkout(tmp_path, tiny_config):
    """`python conversion/convert_X.py ...`, as transformers' converters are run, works for every converter (the
    relative imports find their package through conversion/as_file.py); one converts for real."""
    from macrl import MACRLModel

    root = Path(__file__).resolve().parents[1]
    files = sorted(str(path) for path in (root / "conversion").glob("convert_*.py"))
    assert len(files) == len(CONVERTERS)
    env = {**os.environ, "PYTHONPATH": ""}
    helps = subprocess.run([sys.executable, "-c", AS_FILES, *files], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path, env=env)
    assert f"EXIT CODES {[0] * len(files)}" in helps.stdout, helps.stdout + helps.stderr
    assert all(f"usage: macrl-convert {kind}" in helps.stdout for kind in CONVERTERS), helps.stdout

    torch.manual_seed(0)
    encoder = randomized(MACRLModel(tiny_config()))
    encoder.save_pretrained(tmp_path / "encoder")
    converter = root / "conversion" / "convert_macrl_to_timm.py"
    run = subprocess.run([sys.executable, str(converter), str(tmp_path / "encoder"), str(tmp_path / "timm")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["architecture"].startswith("vit")
