"""How a `MACRLConfig` maps onto timm's `VisionTransformer`, the one copy of that fact.

`MACRLModel` keeps timm's parameter names, so its weights load into the ViT these arguments build. The model card's
`timm.create_model` call, the timm export and the converters' reference models all come from here.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

from .configuration_macrl import MACRLConfig

__all__ = ["POOLING_TO_TIMM", "TIMM_LAYER_NORM_EPS", "default_num_heads", "timm_vit_defaults", "timm_vit_kwargs"]

POOLING_TO_TIMM = {"cls": "token", "mean": "avg"}
# timm builds its ViT LayerNorms with this eps; another one needs a `norm_layer` (which a timm config.json cannot hold)
TIMM_LAYER_NORM_EPS = 1e-6
# attention heads of the released ViTs of each width (timm's ViT-Ti/S/B/L/H, MAE's); other widths get width / 64
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def default_num_heads(width: int) -> int:
    """The attention heads of the released ViT of this width (192: 3, 384: 6, 768: 12, 1024 and 1280: 16), else
    one per 64 channels: what a checkpoint that does not store its head count most likely used."""
    return _HEADS_BY_WIDTH.get(width, max(1, width // 64))


def timm_vit_kwargs(config: MACRLConfig) -> dict[str, Any]:
    """JSON-serialisable `VisionTransformer` / `timm.create_model` keyword arguments that rebuild
    `MACRLModel(config)` without a head: `num_classes=0`, so the model returns the pooled feature. Register tokens are
    timm's `reg_tokens`, with the default `no_embed_class=False`: timm's token order (CLS, registers, patches) and
    position layout (a row per token) are MACRL's.

    MACRL's `pooling="mean"` (final LayerNorm on every token, then the mean of the patch tokens) is timm's
    `global_pool="avg"` with `fc_norm=False`. A `layer_norm_eps` other than `TIMM_LAYER_NORM_EPS` is not among them:
    it needs `norm_layer=partial(nn.LayerNorm, eps=...)`, which the caller adds where it can.
    """
    kwargs: dict[str, Any] = dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        # timm's MLP width is int(dim * mlp_ratio): this float gives back intermediate_size exactly
        mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=config.qkv_bias,
        class_token=True,
        global_pool=POOLING_TO_TIMM[config.pooling],
        num_classes=0,
    )
    if config.pooling == "mean":  # timm's average pooling would add a LayerNorm of its own
        kwargs["fc_norm"] = False
    if config.num_register_tokens:
        # timm's own register models use no_embed_class=True (positions for the patches only); MACRL's pos_embed has
        # a (zero) row for each prefix token, which is timm's default layout: the weights load unchanged
        kwargs["reg_tokens"] = config.num_register_tokens
    if config.hidden_act != "gelu":  # MACRL's activation names are timm's
        kwargs["act_layer"] = config.hidden_act
    return kwargs


@lru_cache(maxsize=1)
def timm_vit_defaults() -> dict[str, Any]:
    """The defaults of timm's `VisionTransformer` constructor, read from its signature (so that a model card can
    leave out the arguments that equal them)."""
    from timm.models.vision_transformer import VisionTransformer

    parameters = inspect.signature(VisionTransformer.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
