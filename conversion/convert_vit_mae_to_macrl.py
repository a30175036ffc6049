"""Convert a transformers `ViTMAEForPreTraining` (a folder or a Hub id) to a `MACRLForPreTraining` folder.

    macrl-convert vit-mae facebook/vit-mae-base ./macrl-vit-mae-base
    macrl-convert vit-mae VIT_MAE ./mae --set reconstruction_loss=l2 --set contrastive_weight=0
    macrl-convert vit-mae ./vit-mae ./encoder --encoder-only     # a MACRLModel only

Encoder and decoder are copied; projector and predictor are freshly initialised (`--seed`) and the momentum branch is
a copy of the main one (`init_momentum_branch`). The config maps hidden/intermediate sizes, layers, heads, patch,
image, channels, `qkv_bias`, `layer_norm_eps` (ViTMAE's 1e-12 is kept, not MACRL's 1e-6), `hidden_act`, dropouts,
the decoder sizes, `mask_ratio` and `norm_pix_loss`; `--set KEY=VALUE` changes any MACRL field on top.

Key mapping (transformers v5 module names; transformers renames the v4 names of checkpoints on disk while loading:
`vit.encoder.layer.N.attention.attention.{query,key,value}`, `...attention.output.dense`, `...intermediate.dense`,
`...output.dense`, and `decoder.decoder_layers.N...` likewise):

    vit.embeddings.cls_token                             -> macrl.cls_token
    vit.embeddings.position_embeddings                   -> macrl.pos_embed
    vit.embeddings.patch_embeddings.projection.*         -> macrl.patch_embed.proj.*
    vit.layers.N.layernorm_before.*                      -> macrl.blocks.N.norm1.*
    vit.layers.N.attention.{q,k,v}_proj.*  (concatenated) -> macrl.blocks.N.attn.qkv.*
    vit.layers.N.attention.o_proj.*                      -> macrl.blocks.N.attn.proj.*
    vit.layers.N.layernorm_after.*                       -> macrl.blocks.N.norm2.*
    vit.layers.N.mlp.fc{1,2}.*                           -> macrl.blocks.N.mlp.fc{1,2}.*
    vit.layernorm.*                                      -> macrl.norm.*
    decoder.{decoder_embed,decoder_norm,decoder_pred}.*  -> decoder.{same}.*
    decoder.{mask_token,decoder_pos_embed}               -> decoder.{same}
    decoder.decoder_layers.N.<as the encoder layers>     -> decoder.decoder_blocks.N.<as the encoder blocks>

Checks (fp32): the encoder's last_hidden_state against `ViTMAEModel` run with mask_ratio 0 (and identity noise, since
ViTMAE shuffles the tokens even then), the reconstruction logits and mask for the same `noise`, and MAE's loss
(MACRL's `forward_loss` with `reconstruction_loss="l2"`) against ViTMAE's. Position embeddings are copied as they are
(the released checkpoints use MAE's [w | h] sin-cos layout, which MACRL also initialises); only the native resolution
is compared, because with `interpolate_pos_encoding=True` ViTMAE resizes bicubically without antialiasing and its
decoder interpolates along the flattened sequence, while MACRL uses timm's `resample_abs_pos_embed` (2D, antialiased).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if not __package__:  # run as a file from a checkout, `python conversion/convert_vit_mae_to_macrl.py` (as_file.py)
    import as_file

    __package__ = as_file.PACKAGE

from .common import (
    ConversionParser,
    common_options,
    push_if_asked,
    KeyMismatchError,
    add_common_arguments,
    build_config,
    check_keys,
    compare_outputs,
    describe_position_embedding,
    mark_position_embedding_type,
    log,
    merge_qkv_keys,
    random_noise,
    random_pixels,
    rename_keys,
    run_cli,
    save_pretrained,
    temporarily,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import ViTMAEConfig

    from macrl import MACRLConfig

# transformers' ACT2FN names -> MACRL's (timm's) activations
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _block_rules(source: str, target: str) -> list[tuple[str, str]]:
    return [
        (rf"{source}\.(\d+)\.layernorm_before\.(weight|bias)", rf"{target}.\1.norm1.\2"),
        (rf"{source}\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", rf"{target}.\1.attn.\2_proj.\3"),
        (rf"{source}\.(\d+)\.attention\.o_proj\.(weight|bias)", rf"{target}.\1.attn.proj.\2"),
        (rf"{source}\.(\d+)\.layernorm_after\.(weight|bias)", rf"{target}.\1.norm2.\2"),
        (rf"{source}\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", rf"{target}.\1.mlp.\2.\3"),
    ]


ENCODER_RULES = [
    (r"vit\.embeddings\.cls_token", "macrl.cls_token"),
    (r"vit\.embeddings\.position_embeddings", "macrl.pos_embed"),
    (r"vit\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"macrl.patch_embed.proj.\1"),
    *_block_rules(r"vit\.layers", "macrl.blocks"),
    (r"vit\.layernorm\.(weight|bias)", r"macrl.norm.\1"),
]
DECODER_RULES = [
    (r"decoder\.(decoder_embed|decoder_norm|decoder_pred)\.(weight|bias)", r"decoder.\1.\2"),
    (r"decoder\.(mask_token|decoder_pos_embed)", r"decoder.\1"),
    *_block_rules(r"decoder\.decoder_layers", "decoder.decoder_blocks"),
]


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"ViTMAE {name}={value}: MACRL needs a square {name}")
        value = value[0]
    return int(value)


def macrl_fields_from_vit_mae(config: ViTMAEConfig) -> dict[str, Any]:
    """The `MACRLConfig` fields that describe the same encoder and decoder as a `ViTMAEConfig`."""
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(
            f"ViTMAE hidden_act={config.hidden_act!r} has no MACRL equivalent; supported: {', '.join(ACTIVATIONS)}"
        )
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"ViTMAE head_dim={head_dim} x {config.num_attention_heads} heads != hidden_size")
    return dict(
        image_size=_square(config.image_size, "image_size"),
        patch_size=_square(config.patch_size, "patch_size"),
        num_channels=config.num_channels,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=ACTIVATIONS[config.hidden_act],
        qkv_bias=bool(config.qkv_bias),
        layer_norm_eps=float(config.layer_norm_eps),  # ViTMAE's default is 1e-12: keep it, outputs depend on it
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        initializer_range=config.initializer_range,
        decoder_hidden_size=config.decoder_hidden_size,
        decoder_num_hidden_layers=config.decoder_num_hidden_layers,
        decoder_num_attention_heads=config.decoder_num_attention_heads,
        decoder_intermediate_size=config.decoder_intermediate_size,
        mask_ratio=float(config.mask_ratio),
        norm_pix_loss=bool(config.norm_pix_loss),
    )


def convert_state_dict(state_dict: dict[str, torch.Tensor], encoder_only: bool = False) -> dict[str, torch.Tensor]:
    """ViTMAE (v5 names, `vit.` prefix) -> MACRLForPreTraining names (`macrl.`, `decoder.`), q/k/v fused."""
    rules = ENCODER_RULES + (DECODER_RULES if not encoder_only else [(r"decoder\..*", None)])
    renamed = rename_keys(
        state_dict,
        rules,
        source="ViTMAE state dict",
        hint="expected the keys of transformers' ViTMAEForPreTraining (vit.*, decoder.*)",
    )
    return merge_qkv_keys(renamed, ("q_proj", "k_proj", "v_proj"), "qkv", source="ViTMAE state dict")


def load_vit_mae(source: str, revision: str | None = None, encoder_only: bool = False):
    """`ViTMAEForPreTraining` (or `ViTMAEModel`) in fp32; keys the checkpoint lacks or has in excess raise."""
    import torch
    from transformers import ViTMAEForPreTraining, ViTMAEModel

    cls = ViTMAEModel if encoder_only else ViTMAEForPreTraining
    try:
        model, info = cls.from_pretrained(source, revision=revision, dtype=torch.float32, output_loading_info=True)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"cannot load {source} as {cls.__name__}: {error}") from error
    missing, unexpected = info.get("missing_keys", []), info.get("unexpected_keys", [])
    if encoder_only:  # a ViTMAEForPreTraining folder: its decoder is left behind on purpose
        unexpected = [key for key in unexpected if not key.startswith("decoder.")]
    mismatched = [(key, tuple(got), tuple(want)) for key, got, want in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        raise KeyMismatchError(
            f"{source} (loaded as {cls.__name__})",
            missing,
            unexpected,
            mismatched,
            hint="a ViTMAEModel checkpoint has no decoder: pass --encoder-only" if not encoder_only else None,
        )
    return model.eval()


def verify(source, model, *, encoder_only: bool, atol: float, rtol: float, seed: int = 0) -> dict[str, float]:
    """Compare the converted model with the ViTMAE source (see the module docstring); returns the max differences.

    The MACRL side runs with the source's objective (its mask ratio and `norm_pix_loss`, an L2 loss), whatever
    `--set` chose for the saved config, so that the comparison is about the weights.
    """
    import torch

    config = model.config
    pixels = random_pixels(config, seed=seed)
    vit = source if encoder_only else source.vit
    encoder = model if encoder_only else model.macrl
    source.eval()
    model.eval()
    diffs = {}
    with torch.no_grad():
        # ViTMAE always shuffles the tokens: identity noise with mask ratio 0 keeps them all, in image order
        identity = torch.arange(config.num_patches, dtype=torch.float32).expand(pixels.shape[0], -1)
        with temporarily(vit.embeddings.config, mask_ratio=0.0):
            reference = vit(pixels, noise=identity).last_hidden_state
        ours = encoder(pixels).last_hidden_state
        diffs["last_hidden_state"] = compare_outputs(ours, reference, atol, rtol, "encoder last_hidden_state")
        if encoder_only:
            return diffs
        noise = random_noise(config, seed=seed + 1)
        reference = source(pixels, noise=noise)
        mae = dict(mask_ratio=source.config.mask_ratio, norm_pix_loss=source.config.norm_pix_loss)
        with temporarily(config, reconstruction_loss="l2", **mae):  # MAE's objective
            ours = model(pixels, noise=noise)
            diffs["logits"] = compare_outputs(ours.logits, reference.logits, atol, rtol, "reconstruction logits")
            if source.config.mask_ratio == 0:  # nothing hidden: MACRL returns no mask, and MAE's loss is 0 / 0
                return diffs
            diffs["mask"] = compare_outputs(ours.mask, reference.mask, 0.0, 0.0, "mask")
            loss = model.forward_loss(pixels, ours.logits, ours.mask)
        diffs["loss"] = compare_outputs(loss, reference.loss, atol, rtol, "MAE (l2) loss")
    return diffs


def convert_vit_mae(
    source: str,
    output_dir: str | Path | None = None,
    *,
    revision: str | None = None,
    encoder_only: bool = False,
    overrides: dict[str, Any] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 0,
):
    """Convert, check and (with `output_dir`) save; returns the MACRL model."""
    import torch

    from macrl import MACRLForPreTraining, MACRLModel

    log(f"loading {source}")
    vit_mae = load_vit_mae(source, revision, encoder_only)
    config: MACRLConfig = build_config(macrl_fields_from_vit_mae(vit_mae.config), overrides)

    state_dict = vit_mae.state_dict()
    if encoder_only:
        state_dict = {f"vit.{key}": value for key, value in state_dict.items()}
    converted = convert_state_dict(state_dict, encoder_only)

    torch.manual_seed(seed)
    if encoder_only:
        model = MACRLModel(config)
        converted = {key.removeprefix("macrl."): value for key, value in converted.items()}
        check_keys(converted, model.state_dict(), source="converted ViTMAE encoder")
        model.load_state_dict(converted, strict=True)
    else:
        model = MACRLForPreTraining(config)
        expected = {k: v for k, v in model.state_dict().items() if k.startswith(("macrl.", "decoder."))}
        check_keys(converted, expected, source="converted ViTMAE state dict")
        model.load_state_dict(converted, strict=False)
        model.init_momentum_branch()  # momentum encoder, decoder and projector start as copies of the main ones
    grid = config.image_size // config.patch_size
    encoder_pos_embed = converted["pos_embed" if encoder_only else "macrl.pos_embed"]
    log(f"  encoder position embedding: {describe_position_embedding(encoder_pos_embed, grid)}")
    if not encoder_only:
        decoder_pos_embed = converted["decoder.decoder_pos_embed"]
        log(f"  decoder position embedding: {describe_position_embedding(decoder_pos_embed, grid)}")
    mark_position_embedding_type(model, overrides)

    log("comparing with ViTMAE")
    verify(vit_mae, model, encoder_only=encoder_only, atol=atol, rtol=rtol, seed=seed)
    if output_dir is not None:
        save_pretrained(model, output_dir)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = ConversionParser(
        prog="macrl-convert vit-mae",
        description="Convert a transformers ViTMAEForPreTraining (folder or Hub id) to a MACRLForPreTraining folder "
        "(encoder + decoder copied, projector/predictor fresh, momentum branch = copy), checking that encoder "
        "outputs, reconstruction logits and the MAE loss match.",
    )
    parser.add_argument("source", help="ViTMAE folder or Hub model id (e.g. facebook/vit-mae-base)")
    parser.add_argument("output_dir", help="folder to write the MACRL model and image processor to")
    parser.add_argument("--revision", help="Hub revision of the source")
    parser.add_argument(
        "--encoder-only", action="store_true", help="convert only the encoder (a ViTMAEModel is enough): a MACRLModel"
    )
    add_common_arguments(parser)
    return parser


def _run(args: argparse.Namespace) -> None:
    convert_vit_mae(
        args.source, args.output_dir, revision=args.revision, encoder_only=args.encoder_only, **common_options(args)
    )
    push_if_asked(args, "Convert ViTMAE to MACRL")

def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
