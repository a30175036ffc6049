"""Convert a facebookresearch/moco-v3 ViT checkpoint (`moco.builder.MoCo_ViT`) to a `MACRLForPreTraining` folder.

    macrl-convert mocov3 vit-b-300ep.pth.tar ./macrl-mocov3-vit-b
    macrl-convert mocov3 vit-s-300ep.pth.tar ./encoder --encoder-only

The checkpoint is `{"state_dict": ..., "arch": ..., ...}` with DDP's `module.` prefix (a bare state dict or a
`.safetensors` file work too), read with `torch.load(weights_only=True)`. MoCo v3's ViT is a timm VisionTransformer
whose `head` was replaced by the projector MLP (`_build_mlp(3, ...)`: Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN without
affine), and MACRL's projector and predictor use the same layout, so the mapping is a prefix change:

    base_encoder.{cls_token,pos_embed,patch_embed.proj.*,blocks.N.*,norm.*}   -> macrl.<same>
    base_encoder.head.N.*                                                      -> projector.N.*
    momentum_encoder.{...}                                                     -> momentum_encoder.<same>
    momentum_encoder.head.N.*                                                  -> momentum_projector.N.*
    predictor.N.*                                                              -> predictor.N.*

The decoder (MACRL's reconstruction branch) is freshly initialised (`--seed`), and the momentum decoder is its copy.
Sizes come from the shapes (projector/predictor widths and depths included); head counts are not stored, so they
come from `arch` (MoCo v3's vit_small has 12 heads, vit_base 12, vit_large and vit_huge 16), else from the width, and
`--num-attention-heads` overrides them. LayerNorm eps is MoCo v3's 1e-6. The convolutional-stem `vit_conv_*` models
do not fit MACRL's patch embedding and fail with the unexpected keys listed.

Checks (eval mode, fp32): the encoder tokens of both encoders against timm's VisionTransformer loaded with the source
weights, and the query `predictor(projector(cls))` and key `momentum_projector(momentum cls)` against MoCo v3's MLPs
re-declared from builder.py (`nn.Linear` / `nn.BatchNorm1d`, running statistics included).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if not __package__:  # run as a file from a checkout, `python conversion/convert_mocov3_to_macrl.py` (as_file.py)
    import as_file

    __package__ = as_file.PACKAGE

from ..timm_layout import default_num_heads, timm_vit_kwargs
from .common import (
    ConversionParser,
    common_options,
    push_if_asked,
    KeyMismatchError,
    add_common_arguments,
    build_config,
    check_keys,
    checkpoint_args,
    compare_outputs,
    describe_position_embedding,
    mark_position_embedding_type,
    load_checkpoint,
    log,
    random_pixels,
    rename_keys,
    run_cli,
    save_pretrained,
    select_prefix,
    unwrap_state_dict,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

ENCODER_KEYS = r"cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|blocks\.\d+\..+|norm\.(?:weight|bias)"
RULES = [
    (rf"base_encoder\.({ENCODER_KEYS})", r"macrl.\1"),
    (r"base_encoder\.head\.(\d+\..+)", r"projector.\1"),
    (rf"momentum_encoder\.({ENCODER_KEYS})", r"momentum_encoder.\1"),
    (r"momentum_encoder\.head\.(\d+\..+)", r"momentum_projector.\1"),
    (r"predictor\.(\d+\..+)", r"predictor.\1"),
]
HEADS_BY_ARCH = {"vit_small": 12, "vit_base": 12, "vit_large": 16, "vit_huge": 16}
# MoCo v3's own ViT-S has 12 heads, not the 6 of timm's and MAE's (moco-v3 vits.py)
MOCOV3_HEADS_BY_WIDTH = {384: 12}
HINT = (
    "expected MoCo v3's ViT layout: base_encoder.* (timm ViT names, head.* = projector MLP), momentum_encoder.*, "
    "predictor.*; vit_conv_* stems and ResNet checkpoints are not supported"
)


def _need(state_dict: dict, key: str) -> Any:
    if key not in state_dict:
        raise KeyMismatchError("MoCo v3 checkpoint", missing=[key], hint=HINT)
    return state_dict[key]


def mlp_shape(state_dict: dict, prefix: str) -> tuple[int, int, int]:
    """(linear layers, hidden width, output width) of a MoCo v3 `_build_mlp` stored under `prefix`."""
    linears = sorted(
        int(m.group(1))
        for key, value in state_dict.items()
        if (m := re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.weight", key)) and value.ndim == 2
    )
    if not linears:
        raise KeyMismatchError("MoCo v3 checkpoint", missing=[f"{prefix}.0.weight"], hint=HINT)
    hidden = state_dict[f"{prefix}.{linears[0]}.weight"].shape[0] if len(linears) > 1 else 0
    output = state_dict[f"{prefix}.{linears[-1]}.weight"].shape[0]
    return len(linears), hidden, output


def macrl_fields_from_mocov3(
    state_dict: dict, *, arch: str | None = None, num_attention_heads: int | None = None, encoder_only: bool = False
) -> dict[str, Any]:
    """`MACRLConfig` fields read from the shapes of a MoCo v3 state dict (no `module.` prefix)."""
    proj = _need(state_dict, "base_encoder.patch_embed.proj.weight")  # [D, C, p, p]
    width, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    num_positions = _need(state_dict, "base_encoder.pos_embed").shape[1] - 1
    grid = int(round(num_positions**0.5))
    if grid * grid != num_positions:
        raise ValueError(f"pos_embed holds {num_positions} patch positions: not a square grid")
    blocks = {int(m.group(1)) for key in state_dict if (m := re.match(r"base_encoder\.blocks\.(\d+)\.", key))}
    heads = (
        num_attention_heads or HEADS_BY_ARCH.get(arch or "") or MOCOV3_HEADS_BY_WIDTH.get(width)
        or default_num_heads(width)
    )
    fields = dict(
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
        hidden_size=width,
        num_hidden_layers=len(blocks),
        num_attention_heads=heads,
        intermediate_size=_need(state_dict, "base_encoder.blocks.0.mlp.fc1.weight").shape[0],
        qkv_bias="base_encoder.blocks.0.attn.qkv.bias" in state_dict,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        pooling="cls",
    )
    if not encoder_only:
        projector_layers, projector_hidden, projection_dim = mlp_shape(state_dict, "base_encoder.head")
        predictor_layers, predictor_hidden, _ = mlp_shape(state_dict, "predictor")
        fields.update(
            projection_dim=projection_dim,
            projector_num_layers=projector_layers,
            projector_hidden_size=projector_hidden or 1,
            predictor_num_layers=predictor_layers,
            predictor_hidden_size=predictor_hidden or 1,
        )
    return fields


def convert_state_dict(state_dict: dict[str, torch.Tensor], encoder_only: bool = False) -> dict[str, torch.Tensor]:
    """MoCo v3 names -> MACRLForPreTraining names (or, `encoder_only`, MACRLModel names of the base encoder)."""
    rules = RULES
    if encoder_only:
        rules = [RULES[0], (r"(?:base_encoder\.head|momentum_encoder|predictor)\..+", None)]
    renamed = rename_keys(state_dict, rules, source="MoCo v3 checkpoint", hint=HINT)
    return select_prefix(renamed, "macrl.") if encoder_only else renamed


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's `MoCo._build_mlp` (moco/builder.py), for the check."""
    from torch import nn

    mlp: list[nn.Module] = []
    for index in range(num_layers):
        dim1 = input_dim if index == 0 else mlp_dim
        dim2 = output_dim if index == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if index < num_layers - 1:
            mlp.append(nn.BatchNorm1d(dim2))
            mlp.append(nn.ReLU(inplace=True))
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


def build_reference_vit(config):
    """MoCo v3's encoder without its head: timm's VisionTransformer (class token, eps 1e-6, CLS pooling)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**timm_vit_kwargs(config))


def build_reference(state_dict: dict, config, encoder_only: bool = False) -> dict[str, nn.Module]:
    """The source as modules: `base_encoder` and `momentum_encoder` (timm ViTs), their `head`s and the predictor."""
    modules: dict[str, nn.Module] = {}
    prefixes = ["base_encoder"] + ([] if encoder_only else ["momentum_encoder"])
    for prefix in prefixes:
        vit = build_reference_vit(config)
        weights = {k: v for k, v in select_prefix(state_dict, prefix + ".").items() if not k.startswith("head.")}
        check_keys(weights, vit.state_dict(), source=f"MoCo v3 {prefix}", hint=HINT)
        vit.load_state_dict(weights, strict=True)
        modules[prefix] = vit.eval()
        if encoder_only:
            continue
        head = build_mlp(
            config.projector_num_layers, config.hidden_size, config.projector_hidden_size, config.projection_dim
        )
        weights = select_prefix(state_dict, prefix + ".head.")
        check_keys(weights, head.state_dict(), source=f"MoCo v3 {prefix}.head", hint=HINT)
        head.load_state_dict(weights, strict=True)
        modules[prefix + ".head"] = head.eval()
    if not encoder_only:
        predictor = build_mlp(
            config.predictor_num_layers,
            config.projection_dim,
            config.predictor_hidden_size,
            config.projection_dim,
            last_bn=False,
        )
        weights = select_prefix(state_dict, "predictor.")
        check_keys(weights, predictor.state_dict(), source="MoCo v3 predictor", hint=HINT)
        predictor.load_state_dict(weights, strict=True)
        modules["predictor"] = predictor.eval()
    return modules


def verify(reference: dict, model, *, encoder_only: bool, atol: float, rtol: float, seed: int = 0) -> None:
    import torch

    pixels = random_pixels(model.config, batch_size=4, seed=seed)
    model.eval()
    with torch.no_grad():
        if encoder_only:
            tokens = reference["base_encoder"].forward_features(pixels)
            compare_outputs(model(pixels).last_hidden_state, tokens, atol, rtol, "encoder tokens")
            return
        for prefix, encoder in (("base_encoder", model.macrl), ("momentum_encoder", model.momentum_encoder)):
            tokens = reference[prefix].forward_features(pixels)
            compare_outputs(encoder(pixels).last_hidden_state, tokens, atol, rtol, f"{prefix} tokens")
        query = reference["predictor"](reference["base_encoder.head"](reference["base_encoder"](pixels)))
        ours = model.predictor(model.projector(model.macrl(pixels).pooler_output))
        compare_outputs(ours, query, atol, rtol, "query (predictor . projector)")
        key = reference["momentum_encoder.head"](reference["momentum_encoder"](pixels))
        ours = model.momentum_projector(model.momentum_encoder(pixels).pooler_output)
        compare_outputs(ours, key, atol, rtol, "key (momentum projector)")


def convert_mocov3(
    checkpoint_path: str | Path,
    output_dir: str | Path | None = None,
    *,
    encoder_only: bool = False,
    num_attention_heads: int | None = None,
    overrides: dict[str, Any] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 0,
):
    """Convert, check against timm's ViT and MoCo v3's MLPs and (with `output_dir`) save; returns the model."""
    import torch

    from macrl import MACRLForPreTraining, MACRLModel

    log(f"loading {checkpoint_path}")
    checkpoint = load_checkpoint(checkpoint_path)
    state_dict = unwrap_state_dict(checkpoint, keys=("state_dict", "model"), source=str(checkpoint_path))
    arch = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
    arch = arch or checkpoint_args(checkpoint).get("arch")
    fields = macrl_fields_from_mocov3(
        state_dict, arch=arch, num_attention_heads=num_attention_heads, encoder_only=encoder_only
    )
    config = build_config(fields, overrides)
    log(
        f"  config: {config.hidden_size} wide, {config.num_hidden_layers} blocks, {config.num_attention_heads} heads, "
        f"{config.image_size} px / {config.patch_size}, projector {config.projector_num_layers} x "
        f"{config.projector_hidden_size} -> {config.projection_dim}, predictor {config.predictor_num_layers} x "
        f"{config.predictor_hidden_size}"
    )
    converted = convert_state_dict(state_dict, encoder_only)
    reference = build_reference(state_dict, build_config(fields), encoder_only)  # the source as stored (before --set)

    torch.manual_seed(seed)
    if encoder_only:
        model = MACRLModel(config)
        check_keys(converted, model.state_dict(), source="converted MoCo v3 encoder")
        model.load_state_dict(converted, strict=True)
        pos_embed = converted["pos_embed"]
    else:
        model = MACRLForPreTraining(config)
        fresh = ("decoder.", "queue")
        expected = {k: v for k, v in model.state_dict().items() if not k.startswith(fresh)}
        check_keys(converted, expected, source="converted MoCo v3 state dict", hint=HINT)
        model.load_state_dict(converted, strict=False)  # the momentum branch comes from the checkpoint
        pos_embed = converted["macrl.pos_embed"]
    log(f"  position embedding: {describe_position_embedding(pos_embed, config.image_size // config.patch_size)}")
    mark_position_embedding_type(model, overrides)

    log("comparing with MoCo v3 (timm ViT + MoCo v3 MLPs)")
    verify(reference, model, encoder_only=encoder_only, atol=atol, rtol=rtol, seed=seed)
    if output_dir is not None:
        save_pretrained(model, output_dir)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = ConversionParser(
        prog="macrl-convert mocov3",
        description="Convert a facebookresearch/moco-v3 ViT checkpoint to a MACRLForPreTraining folder (encoder, "
        "projector, predictor and momentum encoder/projector copied; decoder fresh), or --encoder-only a MACRLModel.",
    )
    parser.add_argument("checkpoint", help="MoCo v3 checkpoint (.pth.tar with 'state_dict', or .safetensors)")
    parser.add_argument("output_dir", help="folder to write the MACRL model and image processor to")
    parser.add_argument("--encoder-only", action="store_true", help="convert only base_encoder, to a MACRLModel")
    parser.add_argument("--num-attention-heads", type=int, help="encoder heads (default: from arch or the width)")
    add_common_arguments(parser)
    return parser


def _run(args: argparse.Namespace) -> None:
    convert_mocov3(
        args.checkpoint,
        args.output_dir,
        encoder_only=args.encoder_only,
        num_attention_heads=args.num_attention_heads,
        **common_options(args),
    )
    push_if_asked(args, "Convert MoCo v3 to MACRL")

def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
