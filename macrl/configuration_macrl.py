"""MACRL model configuration."""

import math
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

RECONSTRUCTION_LOSSES = ("l1", "l2")
POOLINGS = ("cls", "mean")
POSITION_EMBEDDING_TYPES = ("sincos", "learned")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu")


@strict
class MACRLConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a MACRL model (Masked Contrastive Representation Learning, arXiv 2211.06012): a ViT encoder
    trained with a masked-image-modelling decoder (MAE) and a MoCo v3 contrastive head against a momentum branch.

    The defaults describe a ViT-B/16 at 224 px with MAE's 8-layer decoder and MoCo v3's heads. The training presets in
    `macrl.presets` hold smaller, tested configurations.

    Encoder (a timm `VisionTransformer` with fixed 2D sin-cos positions):
        image_size (`int`, defaults to 224): height and width of the input images (with
            `interpolate_pos_encoding=True` the models take any multiple of `patch_size`, non-square too).
        patch_size (`int`, defaults to 16): height and width of a patch; must divide `image_size`.
        num_channels (`int`, defaults to 3): input channels (1 for grayscale data such as Fashion-MNIST).
        hidden_size (`int`, defaults to 768): width of the encoder.
        num_hidden_layers (`int`, defaults to 12): number of encoder blocks.
        num_attention_heads (`int`, defaults to 12): heads per encoder block; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 3072): hidden width of the encoder MLPs.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation, one of `gelu`, `gelu_tanh`, `quick_gelu`, `relu`,
            `silu`.
        qkv_bias (`bool`, defaults to `True`): bias on the query, key and value projections.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of every LayerNorm (timm's and MAE's value).
        hidden_dropout_prob (`float`, defaults to 0.0): dropout after the attention and MLP projections.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on the attention weights.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth rate, growing linearly over the blocks.
        initializer_range (`float`, defaults to 0.02): standard deviation of the CLS and mask token init and of the
            classifier weights of `MACRLForImageClassification`.
        pooling (`str`, defaults to `"cls"`): how `pooler_output` is made from the encoder tokens: `"cls"` (the CLS
            token) or `"mean"` (mean of the patch tokens, registers left out). Contrastive features and the
            classifier use it too.
        num_register_tokens (`int`, defaults to 0): learned register tokens (Darcet et al. 2023, "Vision Transformers
            Need Registers"; timm's `reg_tokens`) the encoder carries beside the CLS token. The token order is timm's:
            CLS, the registers, then the patches in row-major order; `num_prefix_tokens` (1 + registers) counts the
            tokens before the patches. Masking never hides them; pooling and the backbone's feature maps leave them
            out; the decoder carries them and drops them with the CLS token. Like the CLS token's, their positions
            are zero rows of `pos_embed`, which has one row per prefix token as timm's has (`no_embed_class=False`).
            0 keeps the layout of earlier checkpoints.
        position_embedding_type (`str`, defaults to `"sincos"`): what the stored position tables (`pos_embed`, the
            decoder's `decoder_pos_embed`) are. `"sincos"`: MAE's fixed 2D sin-cos, a function of each patch's row
            and column, so at another image size (`interpolate_pos_encoding=True`) the models compute them for the
            actual grid, exactly: a model run at twice its `image_size` equals one built at that size; the stored
            tables are the `image_size` ones (what timm loads). `"learned"`: tables from elsewhere (converted from a
            checkpoint whose positions are not that sin-cos, e.g. a timm ViT's learned ones), used as stored at
            `image_size` and resampled bicubically (timm's `resample_abs_pos_embed`) at other sizes. The converters
            set it; a folder that says `"sincos"` but stores other positions loads as `"learned"`, with a warning.

    Decoder (MAE's shallow transformer that predicts the pixels of every patch):
        decoder_hidden_size (`int`, defaults to 512): width of the decoder.
        decoder_num_hidden_layers (`int`, defaults to 8): number of decoder blocks.
        decoder_num_attention_heads (`int`, defaults to 16): heads per decoder block; must divide the width.
        decoder_intermediate_size (`int`, defaults to 2048): hidden width of the decoder MLPs.
        mask_ratio (`float`, defaults to 0.75): fraction of patches the main branch hides, in [0, 1).
        norm_pix_loss (`bool`, defaults to `False`): reconstruct per-patch normalised pixels (MAE's option).
        reconstruction_loss (`str`, defaults to `"l1"`): `"l1"` (the paper's choice) or `"l2"` (MAE's).

    Contrastive head (MoCo v3):
        projection_dim (`int`, defaults to 256): output width of projector and predictor.
        projector_hidden_size (`int`, defaults to 4096): hidden width of the projector MLP.
        projector_num_layers (`int`, defaults to 3): linear layers in the projector (BatchNorm between them).
        predictor_hidden_size (`int`, defaults to 4096): hidden width of the predictor MLP.
        predictor_num_layers (`int`, defaults to 2): linear layers in the predictor.
        temperature (`float`, defaults to 0.2): InfoNCE temperature (MoCo v3's value for ViTs); must be positive.
        momentum (`float`, defaults to 0.99): EMA coefficient of the momentum branch at the start of training; a
            cosine schedule raises it to 1 by the end. In [0, 1].
        momentum_mask_ratio (`float`, defaults to 0.0): fraction of patches the momentum branch hides, in [0, 1).
        symmetric_loss (`bool`, defaults to `False`): also pass the weak view through the main branch and the strong
            view through the momentum branch, and add both contrastive terms (MoCo v3's symmetrised loss).
        queue_size (`int`, defaults to 0): length of a MoCo v2 queue of extra negative keys; 0 disables it.

    Objective:
        reconstruction_weight (`float`, defaults to 1.0): weight of the reconstruction loss (0 gives MoCo v3).
        contrastive_weight (`float`, defaults to 1.0): weight of the contrastive loss (0 gives MAE).

    Backbone (`MACRLBackbone`, the encoder as the backbone of a dense-prediction model such as UperNet or DPT; its
    stages are `"stem"`, the embeddings, and `"stage1"` ... `"stageN"`, the output of each of the N encoder blocks):
        out_features (`list[str]`, *optional*): names of the stages whose feature maps the backbone returns.
        out_indices (`list[int]`, *optional*): indices of those stages in `stage_names` (0 is `"stem"`); give either
            this or `out_features`, or both in agreement. Neither: the last stage.
        apply_layernorm (`bool`, defaults to `True`): pass every feature map through the encoder's final LayerNorm.
        reshape_hidden_states (`bool`, defaults to `True`): return feature maps as `[batch, hidden_size, H/p, W/p]`
            (patch tokens only); `False` keeps the tokens, `[batch, num_prefix_tokens + num_patches, hidden_size]`,
            CLS and registers first.

    Every field is validated on construction: a value out of range raises a `ValueError` that names the field, a
    value of the wrong type a `huggingface_hub.errors.StrictDataclassFieldValidationError`.

    Example:

    ```python
    >>> from macrl import MACRLConfig, MACRLForPreTraining
    >>> config = MACRLConfig(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=6, num_attention_heads=3)
    >>> model = MACRLForPreTraining(config)
    ```"""

    model_type = "macrl"

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    initializer_range: float = 0.02
    pooling: Literal["cls", "mean"] | str = "cls"
    num_register_tokens: int = 0
    position_embedding_type: Literal["sincos", "learned"] | str = "sincos"

    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 2048
    mask_ratio: float | int = 0.75
    norm_pix_loss: bool = False
    reconstruction_loss: Literal["l1", "l2"] | str = "l1"

    projection_dim: int = 256
    projector_hidden_size: int = 4096
    projector_num_layers: int = 3
    predictor_hidden_size: int = 4096
    predictor_num_layers: int = 2
    temperature: float | int = 0.2
    momentum: float | int = 0.99
    momentum_mask_ratio: float | int = 0.0
    symmetric_loss: bool = False
    queue_size: int = 0

    reconstruction_weight: float | int = 1.0
    contrastive_weight: float | int = 1.0

    # set through the `out_features` / `out_indices` properties of BackboneConfigMixin, as in transformers' Dinov2Config
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True

    def __post_init__(self, **kwargs):
        # Validate before the base class runs, so a bad value fails as a plain ValueError naming the field.
        self._check_fields()
        kwargs.pop("stage_names", None)  # a property here (Dinov2Config and others save it)
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        try:
            self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        except ValueError as error:
            given = {"out_features": out_features, "out_indices": out_indices}
            names = ", ".join(f"MACRLConfig.{name}={value!r}" for name, value in given.items() if value is not None)
            raise ValueError(f"{names}: {error}") from None
        super().__post_init__(**kwargs)

    def _check_fields(self) -> None:
        def fail(field: str, problem: str) -> None:
            raise ValueError(f"MACRLConfig.{field}={getattr(self, field)!r}: {problem}")

        # NaN passes every range check below (comparisons with NaN are False) and inf the one-sided ones: a NaN loss
        # weight or an infinite temperature or init std would only show up later, as NaN losses
        # (an int too large for a float overflows the float arithmetic of the checks and of the model the same way)
        for field in self.macrl_fields():
            value = getattr(self, field)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_finite(value):
                fail(field, "must be a finite number")
        for field in (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "decoder_hidden_size",
            "decoder_num_attention_heads",
            "decoder_intermediate_size",
            "projection_dim",
            "projector_hidden_size",
            "predictor_hidden_size",
        ):
            if getattr(self, field) < 1:
                fail(field, "must be a positive integer")
        for field in ("decoder_num_hidden_layers", "queue_size", "num_register_tokens"):
            if getattr(self, field) < 0:
                fail(field, "must be zero or a positive integer")
        for field in ("projector_num_layers", "predictor_num_layers"):
            if getattr(self, field) < 1:
                fail(field, "needs at least one linear layer")
        if self.image_size % self.patch_size:
            fail("image_size", f"must be divisible by patch_size={self.patch_size}")
        for field in ("hidden_size", "decoder_hidden_size"):
            if getattr(self, field) % 4:
                fail(field, "must be divisible by 4 (the 2D sin-cos position embedding splits it in four)")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            fail(
                "decoder_hidden_size",
                f"must be divisible by decoder_num_attention_heads={self.decoder_num_attention_heads}",
            )
        for field in ("mask_ratio", "momentum_mask_ratio"):
            if not 0.0 <= getattr(self, field) < 1.0:
                fail(field, "must be in [0, 1): at least one patch has to stay visible")
        # (from 2**53 patches on, any mask_ratio < 1 keeps a patch; the cap keeps the product a finite float)
        if self.mask_ratio > 0 and int(min(self.num_patches, 2**53) * (1 - self.mask_ratio)) < 1:
            fail("mask_ratio", f"leaves no visible patch out of {self.num_patches}")
        for field in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not 0.0 <= getattr(self, field) < 1.0:
                fail(field, "must be in [0, 1)")
        if not 0.0 <= self.momentum <= 1.0:
            fail("momentum", "must be in [0, 1]")
        if not self.temperature > 0:
            fail("temperature", "must be positive")
        if not self.initializer_range > 0:
            fail("initializer_range", "must be positive")
        if not self.layer_norm_eps > 0:
            fail("layer_norm_eps", "must be positive")
        for field in ("reconstruction_weight", "contrastive_weight"):
            if getattr(self, field) < 0:
                fail(field, "must be zero or positive")
        if self.reconstruction_weight == 0 and self.contrastive_weight == 0:
            fail("contrastive_weight", "and reconstruction_weight are both 0: nothing would be trained")
        if self.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            fail("reconstruction_loss", f"must be one of {RECONSTRUCTION_LOSSES}")
        if self.pooling not in POOLINGS:
            fail("pooling", f"must be one of {POOLINGS}")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            fail("position_embedding_type", f"must be one of {POSITION_EMBEDDING_TYPES}")
        if self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"must be one of {ACTIVATIONS}")

    @classmethod
    def macrl_fields(cls) -> list[str]:
        """The fields MACRL adds to `PreTrainedConfig` (what defines the model and its training objective), in
        declaration order; the generic ones (`output_hidden_states`, `id2label`...) are not among them."""
        inherited = set(PreTrainedConfig.__dataclass_fields__)
        return [name for name in cls.__dataclass_fields__ if name not in inherited]

    @property
    def stage_names(self) -> list[str]:
        """`MACRLBackbone`'s stages: `"stem"` (the embeddings), then `"stage1"` ... `"stageN"`, one per block."""
        return ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in every token sequence of the encoder: the CLS token and the registers
        (timm's `num_prefix_tokens`). Patch `i` (row-major) is token `num_prefix_tokens + i`."""
        return 1 + self.num_register_tokens

    @property
    def num_patches(self) -> int:
        """Number of patches of an `image_size` x `image_size` image."""
        return (self.image_size // self.patch_size) ** 2


def _is_finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


__all__ = ["MACRLConfig"]
