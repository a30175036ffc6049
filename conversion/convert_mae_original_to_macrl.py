"""Convert a facebookresearch/mae checkpoint (`models_mae.MaskedAutoencoderViT`) to a `MACRLForPreTraining` folder.

    macrl-convert mae mae_visualize_vit_base.pth ./macrl-mae-base
    macrl-convert mae mae_pretrain_vit_base.pth ./encoder --encoder-only

The checkpoint is `{"model": state_dict, ...}` (a bare state dict, a `module.` prefix and a `.safetensors` file work
too); it is read with `torch.load(weights_only=True)`, allowing only `argparse.Namespace` for the stored `args`, whose
`mask_ratio` and `norm_pix_loss` are used when present. MACRL keeps MAE's parameter names, so the mapping is a prefix:

    cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*      -> macrl.<same>
    mask_token, decoder_embed.*, decoder_pos_embed, decoder_blocks.N.*,
    decoder_norm.*, decoder_pred.*                                     -> decoder.<same>

Sizes come from the tensor shapes; head counts are not stored, so they come from the training `args.model`
(`mae_vit_{base,large,huge}...`), else from the width (768: 12, 1024: 16, 1280: 16, else width / 64) and
`--num-attention-heads` / `--decoder-num-attention-heads` (MAE: 16) override them. LayerNorm eps is MAE's 1e-6.
Projector and predictor are fresh (`--seed`), the momentum branch is a copy of the main one.

The check runs the original model, re-declared below from `models_mae.py` (timm `PatchEmbed` and `Block`, same
parameter names, same masking, decoder and loss) since the original code is not installed: the source loads into it
strictly, and its encoder tokens, reconstruction logits, mask and MAE loss must match MACRL's (the loss with
`reconstruction_loss="l2"`, MAE's objective) for the same noise.
"""

from __future__ import annotations

import argparse
import re
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if not __package__:  # run as a file from a checkout, `python conversion/convert_mae_original_to_macrl.py` (as_file.py)
    import as_file

    __package__ = as_file.PACKAGE

from ..timm_layout import default_num_heads
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
    random_noise,
    random_pixels,
    rename_keys,
    run_cli,
    save_pretrained,
    temporarily,
    unwrap_state_dict,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

ENCODER_KEYS = r"cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|blocks\.\d+\..+|norm\.(?:weight|bias)"
DECODER_KEYS = r"mask_token|decoder_pos_embed|decoder_(?:embed|norm|pred)\.(?:weight|bias)|decoder_blocks\.\d+\..+"
ENCODER_RULES = [(rf"({ENCODER_KEYS})", r"macrl.\1")]
DECODER_RULES = [(rf"({DECODER_KEYS})", r"decoder.\1")]
# heads per width of MAE's (and MoCo v3's) released ViTs; the decoder of every MAE model has 16
HEADS_BY_ARCH = {"base": 12, "large": 16, "huge": 16, "small": 6, "tiny": 3}
MAE_DECODER_HEADS = 16
FINE_TUNED_HINT = (
    "keys such as head.* or fc_norm.* belong to a fine-tuned MAE classifier, not to a pre-training checkpoint; "
    "a checkpoint without decoder keys (MAE's mae_pretrain_*.pth) converts with --encoder-only"
)


def count_blocks(state_dict: dict, prefix: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", key))}
    if indices != set(range(len(indices))):
        raise KeyMismatchError("MAE checkpoint", hint=f"{prefix} indices are not contiguous: {sorted(indices)}")
    return len(indices)


def heads_for(width: int, arch: str | None) -> int:
    if arch:
        for name, heads in HEADS_BY_ARCH.items():
            if f"_{name}" in arch:
                return heads
    return default_num_heads(width)


def _need(state_dict: dict, key: str) -> Any:
    if key not in state_dict:
        raise KeyMismatchError("MAE checkpoint", missing=[key], hint=FINE_TUNED_HINT)
    return state_dict[key]


def macrl_fields_from_mae(
    state_dict: dict,
    *,
    encoder_only: bool = False,
    arch: str | None = None,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
) -> dict[str, Any]:
    """`MACRLConfig` fields read from the shapes of an MAE state dict (original names, no prefix)."""
    proj = _need(state_dict, "patch_embed.proj.weight")  # [D, C, p, p]
    width, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    num_positions = _need(state_dict, "pos_embed").shape[1] - 1
    grid = int(round(num_positions**0.5))
    if grid * grid != num_positions:
        raise ValueError(f"pos_embed holds {num_positions} patch positions: not a square grid")
    fields = dict(
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
        hidden_size=width,
        num_hidden_layers=count_blocks(state_dict, "blocks"),
        num_attention_heads=num_attention_heads or heads_for(width, arch),
        intermediate_size=_need(state_dict, "blocks.0.mlp.fc1.weight").shape[0],
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    if not encoder_only:
        decoder_width = _need(state_dict, "decoder_embed.weight").shape[0]
        decoder_blocks = count_blocks(state_dict, "decoder_blocks")
        fields.update(
            decoder_hidden_size=decoder_width,
            decoder_num_hidden_layers=decoder_blocks,
            decoder_num_attention_heads=decoder_num_attention_heads or MAE_DECODER_HEADS,
            decoder_intermediate_size=(
                _need(state_dict, "decoder_blocks.0.mlp.fc1.weight").shape[0] if decoder_blocks else 4 * decoder_width
            ),
        )
    return fields


def convert_state_dict(state_dict: dict[str, torch.Tensor], encoder_only: bool = False) -> dict[str, torch.Tensor]:
    """MAE names -> MACRLForPreTraining names (`macrl.` encoder, `decoder.` decoder)."""
    rules = ENCODER_RULES + (DECODER_RULES if not encoder_only else [(DECODER_KEYS, None)])
    return rename_keys(state_dict, rules, source="MAE checkpoint", hint=FINE_TUNED_HINT)


def build_reference_mae(config, with_decoder: bool = True):
    """facebookresearch/mae's `MaskedAutoencoderViT` (models_mae.py), re-declared for the check: timm `PatchEmbed`
    and `Block` with MAE's names, `norm_layer=partial(nn.LayerNorm, eps=1e-6)`, qkv bias, and MAE's masking,
    decoder and loss; `forward` takes the masking `noise` (MAE draws it inside `random_masking`)."""
    import torch
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import Block
    from torch import nn

    norm_layer = partial(nn.LayerNorm, eps=config.layer_norm_eps)
    mlp_ratio = config.intermediate_size / config.hidden_size
    decoder_mlp_ratio = config.decoder_intermediate_size / config.decoder_hidden_size

    class MaskedAutoencoderViT(nn.Module):
        def __init__(self):
            super().__init__()
            size, p, c, d = config.image_size, config.patch_size, config.num_channels, config.hidden_size
            self.patch_embed = PatchEmbed(size, p, c, d)
            num_patches = self.patch_embed.num_patches
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, d), requires_grad=False)
            self.blocks = nn.ModuleList(
                [
                    Block(d, config.num_attention_heads, mlp_ratio, qkv_bias=config.qkv_bias, norm_layer=norm_layer)
                    for _ in range(config.num_hidden_layers)
                ]
            )
            self.norm = norm_layer(d)
            dd = config.decoder_hidden_size if with_decoder else 4
            self.decoder_embed = nn.Linear(d, dd, bias=True)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dd), requires_grad=False)
            self.decoder_blocks = nn.ModuleList(
                [
                    Block(
                        dd, config.decoder_num_attention_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=norm_layer
                    )
                    for _ in range(config.decoder_num_hidden_layers if with_decoder else 0)
                ]
            )
            self.decoder_norm = norm_layer(dd)
            self.decoder_pred = nn.Linear(dd, p**2 * c, bias=True)
            self.norm_pix_loss = config.norm_pix_loss
            self.mask_ratio = config.mask_ratio

        def patchify(self, imgs):
            p, c = config.patch_size, config.num_channels
            h = w = imgs.shape[2] // p
            x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
            x = torch.einsum("nchpwq->nhwpqc", x)
            return x.reshape(imgs.shape[0], h * w, p**2 * c)

        def random_masking(self, x, mask_ratio, noise):
            n, length, d = x.shape
            len_keep = int(length * (1 - mask_ratio))
            ids_shuffle = torch.argsort(noise, dim=1)
            ids_restore = torch.argsort(ids_shuffle, dim=1)
            ids_keep = ids_shuffle[:, :len_keep]
            x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
            mask = torch.ones([n, length], device=x.device)
            mask[:, :len_keep] = 0
            mask = torch.gather(mask, dim=1, index=ids_restore)
            return x_masked, mask, ids_restore

        def forward_encoder(self, x, mask_ratio, noise):
            x = self.patch_embed(x)
            x = x + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
            cls_token = self.cls_token + self.pos_embed[:, :1, :]
            x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x), mask, ids_restore

        def forward_decoder(self, x, ids_restore):
            x = self.decoder_embed(x)
            mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1)
            x = x + self.decoder_pos_embed
            for blk in self.decoder_blocks:
                x = blk(x)
            x = self.decoder_norm(x)
            return self.decoder_pred(x)[:, 1:, :]

        def forward_loss(self, imgs, pred, mask):
            target = self.patchify(imgs)
            if self.norm_pix_loss:
                mean = target.mean(dim=-1, keepdim=True)
                var = target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + 1.0e-6) ** 0.5
            loss = ((pred - target) ** 2).mean(dim=-1)
            return (loss * mask).sum() / mask.sum()

        def forward(self, imgs, noise, mask_ratio=None):
            mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
            latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
            pred = self.forward_decoder(latent, ids_restore)
            return self.forward_loss(imgs, pred, mask), pred, mask

    return MaskedAutoencoderViT()


def verify(reference, model, *, encoder_only: bool, atol: float, rtol: float, seed: int = 0) -> None:
    import torch

    config = model.config
    pixels = random_pixels(config, seed=seed)
    reference.eval()
    model.eval()
    encoder = model if encoder_only else model.macrl
    with torch.no_grad():
        identity = torch.arange(config.num_patches, dtype=torch.float32).expand(pixels.shape[0], -1)
        tokens, _, _ = reference.forward_encoder(pixels, 0.0, identity)
        compare_outputs(encoder(pixels).last_hidden_state, tokens, atol, rtol, "encoder tokens")
        if encoder_only:
            return
        noise = random_noise(config, seed=seed + 1)
        loss, pred, mask = reference(pixels, noise)
        mae = dict(mask_ratio=reference.mask_ratio, norm_pix_loss=reference.norm_pix_loss)
        with temporarily(config, reconstruction_loss="l2", **mae):  # MAE's objective, whatever --set chose
            ours = model(pixels, noise=noise)
            compare_outputs(ours.logits, pred, atol, rtol, "reconstruction logits")
            if reference.mask_ratio == 0:  # nothing hidden: MACRL returns no mask, and MAE's loss is 0 / 0
                return
            compare_outputs(ours.mask, mask, 0.0, 0.0, "mask")
            ours_loss = model.forward_loss(pixels, ours.logits, ours.mask)
        compare_outputs(ours_loss, loss, atol, rtol, "MAE (l2) loss")


def convert_mae_original(
    checkpoint_path: str | Path,
    output_dir: str | Path | None = None,
    *,
    encoder_only: bool = False,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    overrides: dict[str, Any] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 0,
):
    """Convert, check against the re-declared original model and (with `output_dir`) save; returns the model."""
    import torch

    from macrl import MACRLForPreTraining, MACRLModel

    log(f"loading {checkpoint_path}")
    checkpoint = load_checkpoint(checkpoint_path)
    state_dict = unwrap_state_dict(checkpoint, source=str(checkpoint_path))
    args = checkpoint_args(checkpoint)
    if encoder_only:
        state_dict = {k: v for k, v in state_dict.items() if not re.fullmatch(DECODER_KEYS, k)}
    fields = macrl_fields_from_mae(
        state_dict,
        encoder_only=encoder_only,
        arch=args.get("model"),
        num_attention_heads=num_attention_heads,
        decoder_num_attention_heads=decoder_num_attention_heads,
    )
    if "mask_ratio" in args:  # MAE's training arguments
        fields["mask_ratio"] = float(args["mask_ratio"])
    if "norm_pix_loss" in args:
        fields["norm_pix_loss"] = bool(args["norm_pix_loss"])
    config = build_config(fields, overrides)
    log(
        f"  config: {config.hidden_size} wide, {config.num_hidden_layers} blocks, {config.num_attention_heads} heads, "
        f"{config.image_size} px / {config.patch_size}, decoder {config.decoder_hidden_size} x "
        f"{config.decoder_num_hidden_layers} ({config.decoder_num_attention_heads} heads)"
    )
    converted = convert_state_dict(state_dict, encoder_only)

    # the original model, as the checkpoint describes it (before --set)
    reference = build_reference_mae(build_config(fields), with_decoder=not encoder_only)
    expected = reference.state_dict()
    if encoder_only:
        expected = {k: v for k, v in expected.items() if not re.fullmatch(DECODER_KEYS, k)}
    check_keys(state_dict, expected, source=f"MAE checkpoint {checkpoint_path}", hint=FINE_TUNED_HINT)
    reference.load_state_dict(state_dict, strict=not encoder_only)

    torch.manual_seed(seed)
    if encoder_only:
        model = MACRLModel(config)
        converted = {key.removeprefix("macrl."): value for key, value in converted.items()}
        check_keys(converted, model.state_dict(), source="converted MAE encoder")
        model.load_state_dict(converted, strict=True)
        pos_embed = converted["pos_embed"]
    else:
        model = MACRLForPreTraining(config)
        main = {k: v for k, v in model.state_dict().items() if k.startswith(("macrl.", "decoder."))}
        check_keys(converted, main, source="converted MAE state dict")
        model.load_state_dict(converted, strict=False)
        model.init_momentum_branch()
        pos_embed = converted["macrl.pos_embed"]
    log(f"  position embedding: {describe_position_embedding(pos_embed, config.image_size // config.patch_size)}")
    mark_position_embedding_type(model, overrides)

    log("comparing with MAE's MaskedAutoencoderViT")
    verify(reference, model, encoder_only=encoder_only, atol=atol, rtol=rtol, seed=seed)
    if output_dir is not None:
        save_pretrained(model, output_dir)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = ConversionParser(
        prog="macrl-convert mae",
        description="Convert a facebookresearch/mae MaskedAutoencoderViT checkpoint to a MACRLForPreTraining folder "
        "(or --encoder-only a MACRLModel), checking tokens, logits and loss against MAE's model.",
    )
    parser.add_argument("checkpoint", help="MAE checkpoint (.pth with a 'model' entry, or .safetensors)")
    parser.add_argument("output_dir", help="folder to write the MACRL model and image processor to")
    parser.add_argument("--encoder-only", action="store_true", help="convert only the encoder (ignores decoder keys)")
    parser.add_argument(
        "--num-attention-heads", type=int, help="encoder heads (default: from args.model or the width)"
    )
    parser.add_argument(
        "--decoder-num-attention-heads", type=int, help=f"decoder heads (default: {MAE_DECODER_HEADS}, MAE's)"
    )
    add_common_arguments(parser)
    return parser


def _run(args: argparse.Namespace) -> None:
    convert_mae_original(
        args.checkpoint,
        args.output_dir,
        encoder_only=args.encoder_only,
        num_attention_heads=args.num_attention_heads,
        decoder_num_attention_heads=args.decoder_num_attention_heads,
        **common_options(args),
    )
    push_if_asked(args, "Convert MAE to MACRL")

def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
