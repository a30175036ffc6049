"""Export a MACRL encoder as a timm `VisionTransformer` folder, or (`--reverse`) turn a timm ViT into a MACRLModel.

    macrl-convert timm ./encoder ./encoder-timm
    macrl-convert timm OUTPUT_DIR ./timm --momentum-encoder      # from a MACRLForPreTraining
    macrl-convert timm ./encoder ./encoder-timm --push-to-hub me/macrl-vit-s-timm
    macrl-convert timm --reverse ./encoder-timm ./encoder         # a timm folder
    macrl-convert timm --reverse vit.safetensors ./encoder --num-attention-heads 6

The timm folder is what `timm.models.save_for_hf` writes: `model.safetensors` and a `config.json` with `architecture`,
`num_classes` (0: the model returns the pooled feature), `num_features`, `global_pool`, `model_args` (every size, so
the stock architecture name only supplies defaults) and `pretrained_cfg` (input size, mean/std and interpolation of
the MACRL image processor, `crop_pct=1.0` with `crop_mode="squash"`, i.e. a plain resize like the processor's). Load it
with `timm.create_model("hf-hub:REPO_ID", pretrained=True)`, `timm.create_model("local-dir:FOLDER", pretrained=True)`
or `timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"),
**model_args)`.

MACRLModel keeps timm's parameter names, so the weights are copied unchanged (bit-identical both ways). MACRL's
`pooling="mean"` (final LayerNorm on every token, then the mean of the patch tokens) is timm's `global_pool="avg"` with
`fc_norm=False`; `"cls"` is `global_pool="token"`. Register tokens (`num_register_tokens`) are timm's `reg_tokens` with
`no_embed_class=False`: the same token order (CLS, registers, patches) and a `pos_embed` row for every token (zero
for the CLS token and the registers). timm builds its LayerNorms with eps 1e-6 and a config.json cannot
change that, so an encoder with another `layer_norm_eps` (e.g. converted from ViTMAE, 1e-12) exports with a warning
and its features are compared within the tolerance.

`--reverse` reads a timm folder (config.json + model.safetensors, or pytorch_model.bin loaded with weights_only), a
Hub id (`hf-hub:` optional), or a bare weights file (sizes from the shapes, heads from `--num-attention-heads` or the
width); a classifier `head.*` is dropped. Layer scale, q/k norms, `fc_norm`, pre-norm, attention pooling, positions
for the patches only (`no_embed_class=True`) and the like have no MACRL equivalent and fail with the differing keys
listed or a line that names them. Checks (both directions):
timm's `forward_features` equals MACRL's `last_hidden_state` and timm's pooled output MACRL's `pooler_output`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if not __package__:  # run as a file from a checkout, `python conversion/convert_macrl_to_timm.py` (as_file.py)
    import as_file

    __package__ = as_file.PACKAGE

from ..timm_layout import TIMM_LAYER_NORM_EPS, default_num_heads, timm_vit_kwargs
from .common import (
    ConversionParser,
    common_options,
    push_if_asked,
    read_macrl_config,
    KeyMismatchError,
    OutputMismatchError,
    add_common_arguments,
    build_config,
    check_keys,
    compare_outputs,
    default_processor,
    find_weights,
    load_processor,
    load_state_dict,
    log,
    mark_position_embedding_type,
    random_pixels,
    rename_keys,
    run_cli,
    save_pretrained,
    select_prefix,
)

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from macrl import MACRLConfig

DEFAULT_ARCHITECTURE = "vit_base_patch16_224"
SIZE_NAMES = {(192, 12): "tiny", (384, 12): "small", (768, 12): "base", (1024, 24): "large", (1280, 32): "huge"}
RESAMPLE_BY_INTERPOLATION = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}
INTERPOLATION_BY_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
# pretrained_cfg entries of the stock architecture that would describe someone else's weights
_FOREIGN_CFG_KEYS = (
    "url", "hf_hub_id", "hf_hub_filename", "file", "source", "state_dict", "license", "paper_ids", "paper_name",
    "notes", "origin_url", "description", "label_names", "label_descriptions", "test_input_size", "test_crop_pct",
)  # fmt: skip
HINT = (
    "MACRLModel is a plain pre-norm ViT with a class token, optional register tokens, absolute positions for them "
    "and the patches, and a final LayerNorm before pooling: no layer scale, q/k norm, fc_norm, pre-norm or attention "
    "pooling"
)


# ---------------------------------------------------------------------------------------------------------------------
# MACRL -> timm


def timm_architecture(config: MACRLConfig) -> str:
    """The stock timm ViT of the same size (`vit_small_patch16_224`, ...) if there is one, else vit_base."""
    import timm

    size = SIZE_NAMES.get((config.hidden_size, config.num_hidden_layers))
    if size:
        name = f"vit_{size}_patch{config.patch_size}_{config.image_size}"
        if timm.list_models(name):
            return name
    return DEFAULT_ARCHITECTURE


def create_timm_model(architecture: str, model_args: dict[str, Any]) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    model = timm.create_model(architecture, pretrained=False, **model_args)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"timm architecture {architecture!r} is a {type(model).__name__}, not a VisionTransformer")
    return model.eval()


def load_macrl_encoder(source: str | Path, momentum_encoder: bool = False, overrides: dict | None = None):
    """A MACRLModel from a MACRLModel folder or from the (momentum) encoder of a MACRLForPreTraining folder."""
    from macrl import MACRLModel

    source = Path(source)
    config = read_macrl_config(source, overrides)
    state_dict = load_state_dict(source)
    if any(key.startswith("macrl.") for key in state_dict):  # a pre-training folder
        state_dict = select_prefix(state_dict, "momentum_encoder." if momentum_encoder else "macrl.")
    elif momentum_encoder:
        raise ValueError(f"{source} holds an encoder only: --momentum-encoder needs a MACRLForPreTraining folder")
    model = MACRLModel(config)
    check_keys(state_dict, model.state_dict(), source=f"MACRL encoder of {source}")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def compare_features(macrl_model, timm_model, *, atol: float, rtol: float, seed: int = 0, label: str = "timm") -> None:
    import torch

    pixels = random_pixels(macrl_model.config, seed=seed)
    with torch.no_grad():
        ours = macrl_model(pixels)
        tokens = timm_model.forward_features(pixels)
        pooled = timm_model.forward_head(tokens, pre_logits=True)
    compare_outputs(ours.last_hidden_state, tokens, atol, rtol, f"{label} forward_features vs last_hidden_state")
    compare_outputs(ours.pooler_output, pooled, atol, rtol, f"{label} pooled feature vs pooler_output")


def macrl_to_timm(
    source: str | Path,
    output_dir: str | Path | None = None,
    *,
    architecture: str | None = None,
    momentum_encoder: bool = False,
    overrides: dict[str, Any] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 0,
):
    """Export the encoder of a MACRL folder to a timm folder; returns the timm model."""
    import timm

    log(f"loading {source}")
    encoder = load_macrl_encoder(source, momentum_encoder, overrides)
    config = encoder.config
    if config.layer_norm_eps != TIMM_LAYER_NORM_EPS:
        log(
            f"warning: layer_norm_eps={config.layer_norm_eps:g}, but timm builds "
            f"LayerNorm(eps={TIMM_LAYER_NORM_EPS:g}) from a config.json; the features are compared within the tolerance"
        )
    architecture = architecture or timm_architecture(config)
    model_args = timm_vit_kwargs(config)
    timm_model = create_timm_model(architecture, model_args)
    mlp_width = timm_model.blocks[0].mlp.fc1.out_features if len(timm_model.blocks) else config.intermediate_size
    if mlp_width != config.intermediate_size:
        raise ValueError(f"timm gives an MLP width of {mlp_width} for mlp_ratio={model_args['mlp_ratio']!r}")

    state_dict = rename_keys(encoder.state_dict(), [(r"(.+)", r"\1")])  # the names are timm's already
    check_keys(state_dict, timm_model.state_dict(), source="MACRL encoder as timm VisionTransformer", hint=HINT)
    timm_model.load_state_dict(state_dict, strict=True)
    log(f"comparing with timm {architecture}")
    try:
        compare_features(encoder, timm_model, atol=atol, rtol=rtol, seed=seed)
    except OutputMismatchError as error:
        if config.layer_norm_eps == TIMM_LAYER_NORM_EPS:
            raise
        raise OutputMismatchError(
            f"{error}; timm's LayerNorm eps ({TIMM_LAYER_NORM_EPS:g}) differs from the model's "
            f"({config.layer_norm_eps:g}): pass a larger --atol to accept the difference"
        ) from error
    if output_dir is None:
        return timm_model

    processor = load_processor(source, config)
    output_dir = Path(output_dir)
    timm_model.pretrained_cfg = {
        **{k: v for k, v in timm_model.pretrained_cfg.items() if k not in _FOREIGN_CFG_KEYS},
        "architecture": architecture,
        "tag": "macrl",
    }
    data_config = dict(
        input_size=(config.num_channels, config.image_size, config.image_size),
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        interpolation=INTERPOLATION_BY_RESAMPLE.get(int(processor.resample), "bicubic"),
        crop_pct=1.0,
        crop_mode="squash",  # MACRLImageProcessor resizes to the exact size, without a crop
    )
    timm.models.save_for_hf(
        timm_model, output_dir, model_args=model_args, safe_serialization=True, data_config=data_config
    )
    reloaded = timm.create_model(f"local-dir:{output_dir.resolve()}", pretrained=True).eval()
    compare_features(encoder, reloaded, atol=atol, rtol=rtol, seed=seed, label="reloaded timm")
    log(f"saved timm {architecture} to {output_dir}")
    return timm_model


# ---------------------------------------------------------------------------------------------------------------------
# timm -> MACRL


def resolve_timm_source(source: str, revision: str | None = None) -> tuple[dict | None, Path]:
    """(timm config.json or None, weights file) of a folder, a weights file or a Hub id (`hf-hub:` optional)."""
    path = Path(source)
    if path.is_dir():
        config_file = path / "config.json"
        return (json.loads(config_file.read_text()) if config_file.is_file() else None), find_weights(path)
    if path.is_file():
        config_file = path.with_name("config.json")
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
        return (config if config and "architecture" in config else None), path
    looks_like_repo_id = source.startswith("hf-hub:") or (source.count("/") == 1 and not source.startswith((".", "~")))
    if not looks_like_repo_id:
        raise FileNotFoundError(f"{source} is neither a file, a folder nor a Hub model id")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    repo_id = source.removeprefix("hf-hub:")
    try:
        config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        for name in ("model.safetensors", "pytorch_model.bin"):
            try:
                return config, Path(hf_hub_download(repo_id, name, revision=revision))
            except EntryNotFoundError:
                continue
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        message = f"{source} is no local file or folder, and the Hub has no such model: {error}"
        raise FileNotFoundError(message) from error
    raise FileNotFoundError(f"{repo_id} has neither model.safetensors nor pytorch_model.bin")


def infer_timm_args(state_dict: dict, num_attention_heads: int | None = None) -> dict[str, Any]:
    """`timm.create_model` arguments read from the shapes of a bare ViT state dict (class token, optional register
    tokens, a position for each token, square grid)."""
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.mlp.fc1.weight"):
        if key not in state_dict:
            raise KeyMismatchError("timm ViT weights", missing=[key], hint=HINT)
    width, channels, patch = state_dict["patch_embed.proj.weight"].shape[:3]
    registers = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    num_positions = state_dict["pos_embed"].shape[1] - 1 - registers
    grid = int(round(num_positions**0.5))
    if grid * grid != num_positions:
        raise ValueError(
            f"pos_embed holds {num_positions} patch positions: not a square grid with a class token"
            + (f" and {registers} registers" if registers else "")
        )
    depth = len({m.group(1) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key))})
    return dict(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=channels,
        embed_dim=width,
        depth=depth,
        num_heads=num_attention_heads or default_num_heads(width),
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / width,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        class_token=True,
        global_pool="token",
        **({"reg_tokens": registers} if registers else {}),
    )


def _activation_name(module: nn.Module) -> str:
    from timm.layers import activations
    from torch import nn

    approximate = getattr(module, "approximate", "none")
    if isinstance(module, activations.GELUTanh) or isinstance(module, nn.GELU) and approximate == "tanh":
        return "gelu_tanh"
    if isinstance(module, (activations.GELU, nn.GELU)):
        return "gelu"
    if isinstance(module, activations.QuickGELU):
        return "quick_gelu"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, (nn.SiLU, activations.Swish)):
        return "silu"
    raise ValueError(f"the timm model's MLP activation {type(module).__name__} has no MACRL equivalent")


def macrl_fields_from_timm(model) -> dict[str, Any]:
    """`MACRLConfig` fields of a timm VisionTransformer (checked further by the keys and the outputs)."""
    patch_embed = model.patch_embed
    image_size, patch_size = tuple(patch_embed.img_size), tuple(patch_embed.patch_size)
    if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
        raise ValueError(f"MACRL needs square images and patches, got img_size={image_size}, patch_size={patch_size}")
    # register tokens, a missing class token, attention pooling, layer scale, q/k norms... show in the keys (checked
    # next); pooling without parameters has to be named here
    if model.global_pool in ("avgmax", "max"):
        raise ValueError(f"timm global_pool={model.global_pool!r} has no MACRL pooling ('token' or 'avg')")
    if model.no_embed_class and model.num_prefix_tokens:
        raise ValueError(
            "timm no_embed_class=True (positions for the patches only) has no MACRL layout: MACRL's pos_embed has a "
            "row for the class token and each register"
        )
    block = model.blocks[0]
    eps = getattr(model.norm, "eps", None) or getattr(model.fc_norm, "eps", None) or TIMM_LAYER_NORM_EPS
    return dict(
        image_size=image_size[0],
        patch_size=patch_size[0],
        num_channels=patch_embed.proj.in_channels,
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features,
        hidden_act=_activation_name(block.mlp.act),
        qkv_bias=block.attn.qkv.bias is not None,
        layer_norm_eps=float(eps),
        pooling="mean" if model.global_pool == "avg" else "cls",
        num_register_tokens=model.num_reg_tokens,
    )


def processor_from_timm_config(timm_config: dict | None, config: MACRLConfig):
    """MACRLImageProcessor with the timm pretrained_cfg's mean, std and interpolation (resize only)."""
    from macrl import MACRLImageProcessor

    cfg = (timm_config or {}).get("pretrained_cfg", timm_config or {})
    mean, std = cfg.get("mean"), cfg.get("std")
    if not mean or not std or len(mean) != config.num_channels or len(std) != config.num_channels:
        return default_processor(config)
    if cfg.get("crop_pct", 1.0) < 1.0 and cfg.get("crop_mode", "center") != "squash":
        log(f"  note: timm crops {cfg.get('crop_pct')} of the resized image; MACRLImageProcessor only resizes")
    return MACRLImageProcessor(
        size={"height": config.image_size, "width": config.image_size},
        num_channels=config.num_channels,
        image_mean=list(mean),
        image_std=list(std),
        resample=RESAMPLE_BY_INTERPOLATION.get(cfg.get("interpolation", "bicubic"), 3),
    )


def timm_to_macrl(
    source: str | Path,
    output_dir: str | Path | None = None,
    *,
    architecture: str | None = None,
    num_attention_heads: int | None = None,
    revision: str | None = None,
    overrides: dict[str, Any] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 0,
):
    """Convert a timm ViT (folder, weights file or Hub id) to a MACRLModel; returns it."""
    import torch

    from macrl import MACRLModel

    log(f"loading {source}")
    timm_config, weights_file = resolve_timm_source(str(source), revision)
    state_dict = load_state_dict(weights_file)
    head = [key for key in state_dict if key.startswith("head.")]
    if head:
        log(f"  dropping the classifier: {', '.join(head)}")
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    if timm_config is not None:
        model_args = {k: v for k, v in timm_config.get("model_args", {}).items() if k != "num_classes"}
        if num_attention_heads:
            model_args["num_heads"] = num_attention_heads
        architecture = architecture or timm_config["architecture"]
    else:
        model_args = infer_timm_args(state_dict, num_attention_heads)
        architecture = architecture or DEFAULT_ARCHITECTURE
    timm_model = create_timm_model(architecture, {**model_args, "num_classes": 0})
    check_keys(state_dict, timm_model.state_dict(), source=f"timm weights {weights_file}", hint=HINT)
    timm_model.load_state_dict(state_dict, strict=True)

    config = build_config(macrl_fields_from_timm(timm_model), overrides)
    torch.manual_seed(seed)
    model = MACRLModel(config)
    renamed = rename_keys(state_dict, [(r"(.+)", r"\1")])  # timm's names are MACRLModel's
    check_keys(renamed, model.state_dict(), source=f"timm {architecture} as MACRLModel", hint=HINT)
    model.load_state_dict(renamed, strict=True)
    model.eval()
    mark_position_embedding_type(model, overrides)
    log(f"comparing with timm {architecture}")
    compare_features(model, timm_model, atol=atol, rtol=rtol, seed=seed)
    if output_dir is not None:
        save_pretrained(model, output_dir, processor_from_timm_config(timm_config, config))
    return model


# ---------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    parser = ConversionParser(
        prog="macrl-convert timm",
        description="Export a MACRL encoder (MACRLModel folder, or the encoder of a MACRLForPreTraining folder) as a "
        "timm VisionTransformer folder (model.safetensors + timm config.json), or with --reverse convert a timm ViT "
        "(folder, weights file or Hub id) to a MACRLModel folder; features are compared both ways.",
    )
    parser.add_argument("source", help="MACRL folder (or, with --reverse, timm folder / weights file / Hub id)")
    parser.add_argument("output_dir", help="folder to write the timm (or, with --reverse, MACRL) model to")
    parser.add_argument("--reverse", action="store_true", help="convert a timm ViT to a MACRLModel")
    parser.add_argument(
        "--architecture",
        help=f"timm architecture name (default: the stock ViT of the same size, else {DEFAULT_ARCHITECTURE}; "
        "with --reverse: the config.json's)",
    )
    parser.add_argument(
        "--momentum-encoder", action="store_true", help="export the momentum encoder of a MACRLForPreTraining folder"
    )
    parser.add_argument(
        "--num-attention-heads", type=int, help="--reverse from bare weights: heads (default: from the width)"
    )
    parser.add_argument("--revision", help="--reverse from the Hub: revision")
    add_common_arguments(parser)
    return parser


def _run(args: argparse.Namespace) -> None:
    options = dict(common_options(args), architecture=args.architecture)
    if args.reverse:
        if args.momentum_encoder:
            raise ValueError("--momentum-encoder applies to the MACRL -> timm direction only")
        timm_to_macrl(
            args.source, args.output_dir, num_attention_heads=args.num_attention_heads, revision=args.revision,
            **options,
        )
    else:
        macrl_to_timm(args.source, args.output_dir, momentum_encoder=args.momentum_encoder, **options)
    push_if_asked(args, "Convert timm ViT to MACRL" if args.reverse else "Export MACRL encoder to timm")

def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
