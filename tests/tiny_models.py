"""The tiny model every test builds: the `tiny` preset (a few thousand parameters, a step in milliseconds), and a
saved tiny encoder, laid out as a released one (`encoder/`: weights, config, image processor)."""

from __future__ import annotations

from pathlib import Path

import torch

from macrl import MACRLConfig, MACRLImageProcessor, MACRLModel
from macrl.model_card import render_model_card, write_model_card
from macrl.presets import PRESETS

# the "tiny" preset's fields: a 28-px, 1-channel ViT 32 wide and 2 blocks deep
TINY = PRESETS["tiny"]


def save_tiny_encoder(
    folder: Path, config: MACRLConfig | None = None, *, card_repo_id: str | None = None
) -> MACRLModel:
    """A random encoder (seed 0; the tiny preset unless `config`) saved into `folder` with its image processor, and
    with `card_repo_id` a model card naming that Hub repo; returns the encoder, in eval mode."""
    config = config if config is not None else MACRLConfig(**TINY)
    torch.manual_seed(0)
    encoder = MACRLModel(config).eval()
    encoder.save_pretrained(folder)
    MACRLImageProcessor.from_model_config(config).save_pretrained(folder)
    if card_repo_id is not None:
        write_model_card(folder, render_model_card(config, repo_id=card_repo_id))
    return encoder
