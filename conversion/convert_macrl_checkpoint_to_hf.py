"""Turn a `macrl-pretrain` training checkpoint into a Hugging Face folder: the encoder (default) or the full model.

    macrl-convert checkpoint OUTPUT_DIR/checkpoints/checkpoint-500 ./encoder
    macrl-convert checkpoint OUTPUT_DIR ./encoder            # newest checkpoint of a run
    macrl-convert checkpoint CHECKPOINT ./full --full       # MACRLForPreTraining
    macrl-convert checkpoint CHECKPOINT ./encoder --push-to-hub me/macrl-vit-s

A checkpoint folder holds the `MACRLForPreTraining` config.json and model.safetensors (plus optimizer, scheduler and
trainer state, which are left behind). The encoder export keeps the `macrl.*` weights (`--momentum-encoder`: the
`momentum_encoder.*` EMA weights) under MACRLModel's timm names; `--full` keeps every weight. The output folder gets
`save_pretrained`'s config, weights and code, the image processor (the checkpoint's, else the run's `encoder/` one,
else `--image-processor`, else the default for the config) and, for the encoder, a model card.

Check: the source checkpoint loaded as MACRLForPreTraining and the exported model give the same encoder tokens and
pooled features (with `--full`: the same loss, reconstruction logits and mask for a fixed masking noise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a file from a checkout, `python conversion/convert_macrl_checkpoint_to_hf.py` (as_file.py)
    import as_file

    __package__ = as_file.PACKAGE

from .common import (
    ConversionParser,
    common_options,
    push_if_asked,
    read_macrl_config,
    add_common_arguments,
    check_keys,
    compare_outputs,
    load_processor,
    load_state_dict,
    log,
    random_noise,
    random_pixels,
    rename_keys,
    run_cli,
    save_pretrained,
)

HINT = "expected a checkpoint of macrl-pretrain (the keys of MACRLForPreTraining for the config.json beside it)"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest `checkpoints/checkpoint-N` (or `checkpoint-N`) of a run folder."""
    from transformers.trainer_utils import get_last_checkpoint

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder")
    has_weights = any(path.glob("model*.safetensors")) or (path / "pytorch_model.bin").is_file()
    if (path / "config.json").is_file() and has_weights:
        return path
    for folder in (path / "checkpoints", path):
        if folder.is_dir() and (last := get_last_checkpoint(str(folder))):
            return Path(last)
    raise FileNotFoundError(f"{path} is neither a checkpoint folder (config.json + model.safetensors) nor a run folder")


def find_processor_folder(checkpoint: Path, explicit: str | Path | None) -> Path | None:
    candidates = [Path(explicit)] if explicit else []
    candidates += [checkpoint, checkpoint.parent.parent / "encoder", checkpoint.parent / "encoder"]
    return next((c for c in candidates if (c / "preprocessor_config.json").is_file()), None)


def convert_macrl_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path | None = None,
    *,
    full: bool = False,
    momentum_encoder: bool = False,
    image_processor: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    seed: int = 0,
):
    """Convert, check and (with `output_dir`) save; returns the exported model."""
    import torch

    from macrl import MACRLForPreTraining, MACRLModel
    from macrl.model_card import render_model_card, write_model_card

    checkpoint = resolve_checkpoint(checkpoint)
    log(f"loading {checkpoint}")
    config = read_macrl_config(checkpoint, overrides)
    state_dict = load_state_dict(checkpoint)

    source = MACRLForPreTraining(config)
    check_keys(state_dict, source.state_dict(), source=f"checkpoint {checkpoint}", hint=HINT)
    source.load_state_dict(state_dict, strict=True)
    source.eval()

    torch.manual_seed(seed)
    if full:
        model = MACRLForPreTraining(config)
        renamed = dict(state_dict)
    else:
        model = MACRLModel(config)
        prefix = "momentum_encoder" if momentum_encoder else "macrl"
        renamed = rename_keys(state_dict, [(rf"{prefix}\.(.+)", r"\1"), (r".+", None)], source=str(checkpoint))
    check_keys(renamed, model.state_dict(), source=f"exported weights of {checkpoint}", hint=HINT)
    model.load_state_dict(renamed, strict=True)
    model.eval()

    log("comparing with the checkpoint")
    pixels = random_pixels(config, seed=seed)
    with torch.no_grad():
        if full:
            noise = random_noise(config, seed=seed + 1)
            ours, theirs = model(pixels, noise=noise), source(pixels, noise=noise)
            for name in ("loss", "logits", "mask", "pooler_output"):
                compare_outputs(getattr(ours, name), getattr(theirs, name), atol, rtol, name)
        else:
            encoder = source.momentum_encoder if momentum_encoder else source.macrl
            ours, theirs = model(pixels), encoder(pixels)
            compare_outputs(ours.last_hidden_state, theirs.last_hidden_state, atol, rtol, "last_hidden_state")
            compare_outputs(ours.pooler_output, theirs.pooler_output, atol, rtol, "pooler_output")

    if output_dir is not None:
        processor_folder = find_processor_folder(checkpoint, image_processor)
        if processor_folder is not None:
            log(f"  image processor from {processor_folder}")
        save_pretrained(model, output_dir, load_processor(processor_folder, config))
        if not full:
            write_model_card(output_dir, render_model_card(config), overwrite=True)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = ConversionParser(
        prog="macrl-convert checkpoint",
        description="Export a macrl-pretrain training checkpoint (checkpoints/checkpoint-N, or a run folder for its "
        "newest one) as a Hugging Face folder: the MACRLModel encoder with its image processor, or --full the "
        "MACRLForPreTraining model, checking that the outputs match the checkpoint's.",
    )
    parser.add_argument("checkpoint", help="checkpoint-N folder, or the run's OUTPUT_DIR (uses its newest checkpoint)")
    parser.add_argument("output_dir", help="folder to write the model and image processor to")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--full", action="store_true", help="export the whole MACRLForPreTraining, not only the encoder")
    what.add_argument(
        "--momentum-encoder", action="store_true", help="export the momentum (EMA) encoder instead of the main one"
    )
    parser.add_argument("--image-processor", help="folder with a preprocessor_config.json to use")
    add_common_arguments(parser)
    return parser


def _run(args: argparse.Namespace) -> None:
    convert_macrl_checkpoint(
        args.checkpoint,
        args.output_dir,
        full=args.full,
        momentum_encoder=args.momentum_encoder,
        image_processor=args.image_processor,
        **common_options(args),
    )
    push_if_asked(args, "Upload MACRL checkpoint")

def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
