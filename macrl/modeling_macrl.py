"""PyTorch MACRL model: a ViT encoder trained by masked reconstruction (MAE) and MoCo v3 contrast at once.

Layout of the pre-training model (`MACRLForPreTraining`):

    strong view ─► mask ─► macrl (encoder) ─► decoder ─► pixels of every patch     (L1 on the masked ones)
                                 └─► pool ─► projector ─► predictor ─► q
    weak view ──► momentum_encoder ─► pool ─► momentum_projector ─► k       (EMA of the above, no gradient)
    loss = reconstruction_weight * L1 + contrastive_weight * InfoNCE(q, k)

`MACRLModel` (the encoder users download) keeps timm's `VisionTransformer` state-dict names (`patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), so its
`model.safetensors` loads into timm unchanged; that is why it has no `embeddings.` / `encoder.layer.` prefixes like
transformers' ViT. The blocks are MACRL's own, so attention runs through transformers' attention interface
(`config._attn_implementation`: eager, sdpa, flex, flash).
"""

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import DropPath, get_act_layer, resample_abs_pos_embed
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit_mae.modeling_vit_mae import (
    build_2d_sinusoidal_position_embedding,
    eager_attention_forward,
)
from transformers.utils import ModelOutput, is_torchdynamo_compiling

from .configuration_macrl import MACRLConfig
from .contrastive_loss import info_nce_loss
from .distributed import GlobalBatchNorm1d, concat_all_gather

# what a saved folder's code can build, whichever class saved it (transformers only lists the saving class)
_AUTO_MAP = {
    "AutoConfig": "configuration_macrl.MACRLConfig",
    "AutoModel": "modeling_macrl.MACRLModel",
    "AutoModelForPreTraining": "modeling_macrl.MACRLForPreTraining",
    "AutoModelForImageClassification": "modeling_macrl.MACRLForImageClassification",
    "AutoImageProcessor": "image_processing_macrl.MACRLImageProcessor",
    "AutoBackbone": "modeling_macrl_backbone.MACRLBackbone",
}
# the code files a folder carries besides the saving class's own module and what it imports
_EXTRA_CODE_FILES = ("image_processing_macrl.py", "modeling_macrl_backbone.py")


@dataclass
class MACRLModelOutput(ModelOutput):
    r"""
    Output of `MACRLModel`.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + num_patches, hidden_size)`):
            Normalised tokens of the last encoder block, CLS token first.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The image feature: the CLS token or the mean of the patch tokens, as `config.pooling` says.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            The embeddings and the output of every block (before the final LayerNorm), `num_hidden_layers + 1`
            tensors of shape `(batch_size, 1 + num_patches, hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            The softmax attention weights of every block, `num_hidden_layers` tensors of shape
            `(batch_size, num_attention_heads, 1 + num_patches, 1 + num_patches)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MACRLForPreTrainingOutput(ModelOutput):
    r"""
    Output of `MACRLForPreTraining`.

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            `reconstruction_weight * reconstruction_loss + contrastive_weight * contrastive_loss`.
        reconstruction_loss (`torch.FloatTensor` of shape `()`):
            L1 (or L2) error of the predicted pixels on the masked patches; 0 when `reconstruction_weight` is 0.
        contrastive_loss (`torch.FloatTensor` of shape `()`):
            MoCo v3 InfoNCE loss between main and momentum branch; 0 when `contrastive_weight` is 0.
        logits (`torch.FloatTensor` of shape `(batch_size, num_patches, patch_size**2 * num_channels)`):
            Reconstructed pixels of every patch of the strong view (in the normalised target space if
            `norm_pix_loss`); `None` when `reconstruction_weight` is 0.
        mask (`torch.FloatTensor` of shape `(batch_size, num_patches)`):
            1 where the patch was hidden from the encoder, 0 where it was visible.
        ids_restore (`torch.LongTensor` of shape `(batch_size, num_patches)`):
            Permutation that puts the shuffled patch tokens back in image order.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Pooled encoder feature of the (masked) strong view.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            The main encoder's embeddings and block outputs on the strong view's visible patches, as ViTMAE returns
            them: `num_hidden_layers + 1` tensors of shape `(batch_size, 1 + num_visible_patches, hidden_size)`, with
            `num_visible_patches = int(num_patches * (1 - mask_ratio))`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            The main encoder's attention weights on the same tokens, `num_hidden_layers` tensors of shape
            `(batch_size, num_attention_heads, 1 + num_visible_patches, 1 + num_visible_patches)`.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def sincos_position_embedding(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos positions with a zero row for the CLS token: `[1, 1 + grid_size**2, dim]`."""
    pos_embed = build_2d_sinusoidal_position_embedding(grid_size, grid_size, embed_dim=dim, cls_token=True)
    # MAE's reference code (and every released MAE/ViTMAE checkpoint) lays the halves out as [w | h]; follow it so
    # converted and freshly initialised models agree.
    half = dim // 2
    return torch.cat([pos_embed[..., half:], pos_embed[..., :half]], dim=-1).unsqueeze(0)


def pool_tokens(tokens: torch.Tensor, pooling: str) -> torch.Tensor:
    """`[N, 1 + L, D]` -> `[N, D]`: `cls` the CLS token, `mean` the mean of the patch tokens, CLS excluded (timm's
    `global_pool='avg'`)."""
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")


def mlp_width(dim: int, mlp_dim: int) -> int:
    """The hidden width of a block's MLP: timm's `int(dim * mlp_ratio)` for `mlp_ratio = mlp_dim / dim`.

    That is `mlp_dim` for every usual size and one less for some odd ones (dim 28, mlp_dim 61 gives 60): the width the
    timm-built blocks of earlier MACRL versions had, and what `timm.create_model(..., mlp_ratio=mlp_dim / dim)` builds.
    """
    return int(dim * (mlp_dim / dim))


class MACRLPatchEmbeddings(nn.Module):
    """Convolutional patch embedding, timm's `PatchEmbed` without its options: `[B, C, H, W]` -> `[B, H/p * W/p, D]`.

    The size check lives in `MACRLModel`, which knows about `interpolate_pos_encoding`.
    """

    def __init__(self, config: MACRLConfig):
        super().__init__()
        size = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=size, stride=size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)  # [B, D, H/p, W/p] -> [B, L, D]


def sdpa_backward_is_slow(query: torch.Tensor) -> bool:
    """Whether PyTorch's sdpa would run this attention through its CPU flash kernel in half precision with a
    backward pass to follow: that backward runs 1.3x (197 tokens) to 10x (17 tokens) slower than the eager
    computation on ViT sizes, while its forward alone is as fast or faster (benchmarks/results/attention-cpu.md)."""
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and query.requires_grad
        and torch.is_grad_enabled()
    )


class MACRLAttention(nn.Module):
    """Multi-head self-attention with timm's fused `qkv` and `proj` layers, computed by the attention function
    `config._attn_implementation` names (eager, sdpa, flex_attention, flash_attention_*).

    sdpa, flex and flash never materialise the attention weights: a call with `output_attentions=True` is computed
    eagerly, so it returns them whatever the implementation. So is an sdpa call on a CPU in bf16 / fp16 that will be
    backpropagated (`sdpa_backward_is_slow`: training and fine-tuning on a CPU): the same maths, much faster there.
    """

    def __init__(self, config: MACRLConfig, dim: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_tokens, dim = hidden_states.shape  # [N, T, D]
        qkv = self.qkv(hidden_states).reshape(batch_size, num_tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, T, D / heads]
        implementation = self.config._attn_implementation
        if output_attentions or (implementation == "sdpa" and sdpa_backward_is_slow(query)):
            implementation = "eager"
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        attn_output = attn_output.reshape(batch_size, num_tokens, dim)  # [N, T, heads, D / heads] -> [N, T, D]
        return self.proj_drop(self.proj(attn_output)), attn_weights


class MACRLMLP(nn.Module):
    """The block's MLP, `fc1` - activation - `fc2`, with dropout after the activation and after `fc2` (timm's `Mlp`)."""

    def __init__(self, config: MACRLConfig, dim: int, mlp_dim: int):
        super().__init__()
        width = mlp_width(dim, mlp_dim)
        self.fc1 = nn.Linear(dim, width)
        self.act = get_act_layer(config.hidden_act)()
        self.fc2 = nn.Linear(width, dim)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.drop(self.act(self.fc1(hidden_states)))  # [N, T, width]
        return self.drop(self.fc2(hidden_states))  # [N, T, D]


class MACRLBlock(GradientCheckpointingLayer):
    """Pre-norm ViT block with timm's module names (`norm1`, `attn`, `norm2`, `mlp`) and stochastic depth."""

    def __init__(self, config: MACRLConfig, dim: int, num_heads: int, mlp_dim: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = MACRLAttention(config, dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = MACRLMLP(config, dim, mlp_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention, attn_weights = self.attn(self.norm1(hidden_states), output_attentions)
        hidden_states = hidden_states + self.drop_path(attention)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states, attn_weights


class MACRLEncoder(nn.ModuleList):
    """The stack of encoder blocks (named `blocks`, as in timm)."""

    def __init__(self, config: MACRLConfig):
        # stochastic depth grows linearly from 0 to drop_path_rate (timm's linspace, in Python: no tensor is made, so
        # the model also builds on the meta device)
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * index / max(depth - 1, 1) for index in range(depth)]
        dim, heads, mlp_dim = config.hidden_size, config.num_attention_heads, config.intermediate_size
        super().__init__([MACRLBlock(config, dim, heads, mlp_dim, rate) for rate in rates])

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BaseModelOutput:
        """`[N, T, D]` through every block. `hidden_states` holds the input and every block's output."""
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for block in self:
            hidden_states, attn_weights = block(hidden_states, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


class MACRLDecoder(nn.Module):
    """MAE's shallow decoder: mask tokens fill the hidden patches, blocks mix them, a linear layer predicts pixels.

    Parameter names follow facebookresearch/mae (`decoder_embed`, `mask_token`, `decoder_pos_embed`,
    `decoder_blocks`, `decoder_norm`, `decoder_pred`); the fixed positions are a buffer saved with the weights.
    """

    def __init__(self, config: MACRLConfig):
        super().__init__()
        dim = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(config.hidden_size, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", torch.zeros(1, config.num_patches + 1, dim))
        self.decoder_blocks = nn.ModuleList(
            [
                MACRLBlock(config, dim, config.decoder_num_attention_heads, config.decoder_intermediate_size)
                for _ in range(config.decoder_num_hidden_layers)
            ]
        )
        self.decoder_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(dim, config.patch_size**2 * config.num_channels)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """`latent` `[B, 1 + L_visible, D]`, `ids_restore` `[B, L]` -> predicted pixels `[B, L, p*p*C]`."""
        x = self.decoder_embed(latent.to(self.decoder_embed.weight.dtype))  # [B, 1 + L_vis, Dd]
        batch_size, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.expand(batch_size, num_patches + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, L, Dd], visible first
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # image order
        x = torch.cat([x[:, :1], patches], dim=1)  # [B, 1 + L, Dd]
        x = x + self._position_embedding(num_patches)
        for block in self.decoder_blocks:
            x, _ = block(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:]  # [B, L, p*p*C], CLS dropped

    def _position_embedding(self, num_patches: int) -> torch.Tensor:
        if num_patches + 1 == self.decoder_pos_embed.shape[1]:
            return self.decoder_pos_embed
        grid = math.isqrt(num_patches)
        return resample_abs_pos_embed(self.decoder_pos_embed, [grid, grid], num_prefix_tokens=1)


class MACRLProjectionHead(nn.Sequential):
    """MoCo v3's MLP (`_build_mlp`): Linear-BN-ReLU blocks, a last Linear, and an affine-free BN on projectors.

    The BatchNorms normalise over the global batch when several processes train (see `GlobalBatchNorm1d`).
    """

    def __init__(self, num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_batch_norm: bool):
        layers: list[nn.Module] = []
        for index in range(num_layers):
            in_dim = input_dim if index == 0 else hidden_dim
            if index < num_layers - 1:
                layers += [nn.Linear(in_dim, hidden_dim, bias=False), GlobalBatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            else:
                layers.append(nn.Linear(in_dim, output_dim, bias=False))
                if last_batch_norm:
                    # MoCo v3 follows SimCLR: no learnable affine on the projector's output
                    layers.append(GlobalBatchNorm1d(output_dim, affine=False))
        super().__init__(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # the encoder's pooled feature is float32 in a half-precision model (its final norm stays float32)
        return super().forward(features.to(self[0].weight.dtype))


class MACRLPreTrainedModel(PreTrainedModel):
    config: MACRLConfig
    config_class = MACRLConfig
    base_model_prefix = "macrl"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MACRLBlock"]
    # MACRLAttention goes through ALL_ATTENTION_FUNCTIONS without a mask, so every registered implementation applies
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # The encoder's final LayerNorm (`norm`, not the blocks' norm1 / norm2) stays float32 when a model is loaded in
    # bf16 / fp16, and so do the features it gives: bf16 rounding of the features alone moved a kNN evaluation by 0.2
    # points (benchmarks/results/extraction-speed.md), for a norm that costs nothing beside the blocks. The heads cast
    # its output to their own dtype. (`prepare_for_inference` keeps these modules float32 the same way.)
    _keep_in_fp32_modules_strict = [r"(?:^|\.)norm\."]
    # a MACRLModel or classifier loaded from a pre-training folder leaves the pre-training heads behind, silently
    _keys_to_ignore_on_load_unexpected = [
        r"^(decoder|projector|predictor|momentum_encoder|momentum_decoder|momentum_projector)\.",
        r"^queue",
    ]

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`. A folder that carries the code maps every MACRL Auto class in the
        `auto_map` of its config.json, the image processor's and the backbone's included, so `trust_remote_code=True`
        loads any of them; the image processor then leaves its class to that map (see
        `MACRLImageProcessor.to_json_file`)."""
        if self._auto_class is not None:
            self.config.auto_map = dict(_AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is not None:
            for name in _EXTRA_CODE_FILES:
                shutil.copy(Path(__file__).with_name(name), save_directory)
            from .image_processing_macrl import leave_class_to_auto_map

            leave_class_to_auto_map(Path(save_directory) / "preprocessor_config.json")  # saved before the model

    def _output_flags(
        self, output_hidden_states: bool | None, output_attentions: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        """The call's `output_hidden_states`, `output_attentions` and `return_dict`, the config's where not given."""
        config = self.config
        return (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states,
            output_attentions if output_attentions is not None else config.output_attentions,
            return_dict if return_dict is not None else config.return_dict,
        )

    def _init_weights(self, module: nn.Module) -> None:
        """MAE's initialisation, leaf by leaf (transformers initialises each module that owns tensors, and a checkpoint
        without some of them only those): xavier-uniform linear layers and patch projection, fixed sin-cos positions,
        N(0, initializer_range) tokens, a fresh random MoCo queue."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # the patch projection, initialised like a linear layer as MAE does; the flattening view would not carry
            # the flag that marks a loaded weight, so it is checked here
            if not getattr(module.weight, "_is_hf_initialized", False):
                init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, MACRLModel):
            grid = self.config.image_size // self.config.patch_size
            init.copy_(module.pos_embed, sincos_position_embedding(grid, self.config.hidden_size))
            init.normal_(module.cls_token, std=std)
        elif isinstance(module, MACRLDecoder):
            grid = self.config.image_size // self.config.patch_size
            init.copy_(module.decoder_pos_embed, sincos_position_embedding(grid, self.config.decoder_hidden_size))
            init.normal_(module.mask_token, std=std)
        elif isinstance(module, MACRLForPreTraining) and self.config.queue_size > 0:
            init.copy_(module.queue, F.normalize(torch.randn_like(module.queue), dim=1))
            init.zeros_(module.queue_ptr)


class MACRLModel(MACRLPreTrainedModel):
    """The MACRL encoder: a ViT that maps images to tokens and a pooled feature, with no masking."""

    def __init__(self, config: MACRLConfig):
        super().__init__(config)
        self.patch_embed = MACRLPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        # fixed (not learned) 2D sin-cos positions, as in MAE
        self.register_buffer("pos_embed", torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.blocks = MACRLEncoder(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> None:
        """Raise a `ValueError` that names the expected shape or dtype when `pixel_values` cannot be encoded.

        Type, shape and dtype are checked on every call. NaN and infinite values are checked only in eager mode on the
        CPU: the check depends on the values, so it would break a `torch.compile(fullgraph=True)` graph or a
        `torch.export` program, and on an accelerator it would wait for the device at every step.
        """
        config = self.config
        expected = f"(batch_size, {config.num_channels}, {config.image_size}, {config.image_size})"
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor of shape {expected}, got {type(pixel_values)}")
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating-point tensor (normalised pixels, e.g. from the image processor), "
                f"got {pixel_values.dtype}"
            )
        channels, height, width = pixel_values.shape[1:]
        if channels != config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels but the model expects {config.num_channels}: "
                f"shape {tuple(pixel_values.shape)}, expected {expected}"
            )
        if interpolate_pos_encoding:
            if height % config.patch_size or width % config.patch_size:
                raise ValueError(
                    f"image size {height}x{width} must be a multiple of patch_size={config.patch_size}"
                )
        elif (height, width) != (config.image_size, config.image_size):
            raise ValueError(
                f"image size {height}x{width} does not match the model's {config.image_size}x{config.image_size}: "
                f"expected {expected}; resize the images or pass interpolate_pos_encoding=True"
            )
        if is_torchdynamo_compiling() or pixel_values.device.type != "cpu":
            return
        # Performance: a float32 sum is non-finite whenever an element is (NaN and inf propagate) and is much faster
        # than `isfinite().all()` on a CPU batch (benchmarks/results/figures-behind-the-code.md); only a sum that
        # overflows is checked element by element, so the outcome is the same.
        if not torch.isfinite(pixel_values.sum(dtype=torch.float32)) and not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contains NaN or infinite values")

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by argsort of noise (MAE). Returns visible tokens, mask and ids_restore."""
        batch_size, num_patches, dim = x.shape  # [N, L, D]
        num_keep = int(num_patches * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(batch_size, num_patches, device=x.device)
        elif noise.shape != (batch_size, num_patches):
            raise ValueError(f"noise must have shape ({batch_size}, {num_patches}), got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :num_keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [N, L_keep, D]
        mask = torch.ones(batch_size, num_patches, device=x.device)
        mask[:, :num_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # [N, L], 1 = hidden, in image order
        return x_visible, mask, ids_restore

    def forward_encoder(
        self,
        pixel_values: torch.Tensor,
        mask_ratio: float = 0.0,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, BaseModelOutput]:
        """Encode the visible patches. Returns the normalised tokens `[N, 1 + L_keep, D]`, mask and ids_restore
        (`None` without masking) and the blocks' output (`hidden_states` / `attentions` when asked for)."""
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        x = self.patch_embed(pixel_values)  # [N, L, D]
        pos_embed = self._position_embedding(pixel_values.shape[2:], interpolate_pos_encoding)
        x = x + pos_embed[:, 1:]
        mask = ids_restore = None
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, L_keep, D]
        cls_tokens = (self.cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tokens, x], dim=1)  # [N, 1 + L_keep, D]
        blocks_output = self.blocks(x, output_hidden_states, output_attentions)
        # in the norm's dtype: float32 in a half-precision model (`_keep_in_fp32_modules_strict`)
        tokens = self.norm(blocks_output.last_hidden_state.to(self.norm.weight.dtype))  # [N, 1 + L_keep, D]
        return tokens, mask, ids_restore, blocks_output

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[N, 1 + L, D]` -> `[N, D]` with the config's pooling (`pool_tokens`)."""
        return pool_tokens(tokens, self.config.pooling)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MACRLModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
                Normalised pixels, e.g. from `MACRLImageProcessor`.
            interpolate_pos_encoding (`bool`, defaults to `False`):
                Resample the position embedding to accept images of another size (a multiple of the patch size).
            output_hidden_states (`bool`, *optional*):
                Also return the embeddings and the output of every block.
            output_attentions (`bool`, *optional*):
                Also return the attention weights of every block (computed eagerly for that call).
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        flags = self._output_flags(output_hidden_states, output_attentions, return_dict)
        output_hidden_states, output_attentions, return_dict = flags
        tokens, _, _, blocks_output = self.forward_encoder(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        output = MACRLModelOutput(
            last_hidden_state=tokens,
            pooler_output=self.pool(tokens),
            hidden_states=blocks_output.hidden_states,
            attentions=blocks_output.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _position_embedding(self, image_hw: torch.Size, interpolate: bool) -> torch.Tensor:
        grid = [size // self.config.patch_size for size in image_hw]
        if not interpolate or grid[0] * grid[1] + 1 == self.pos_embed.shape[1] and grid[0] == grid[1]:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, grid, num_prefix_tokens=1)


class MACRLForPreTraining(MACRLPreTrainedModel):
    """MACRL pre-training model: main branch (encoder, decoder, projector, predictor) and its momentum twin.

    The momentum branch is frozen and equal to the main branch at the start, whether built from a config or loaded
    (`from_pretrained` copies the momentum weights a checkpoint lacks from the main branch); the EMA
    (`update_momentum_branch`) then moves it. It is the encoder and projector only: the keys come from the pooled
    encoder feature, and no loss reads a momentum decoder's output, so none is built (checkpoints that hold one
    still load, its weights left behind).
    """

    _keys_to_ignore_on_load_unexpected = [r"^momentum_decoder\."]

    # (main, momentum) attribute names; the predictor has no twin
    _momentum_pairs = (("macrl", "momentum_encoder"), ("projector", "momentum_projector"))

    def __init__(self, config: MACRLConfig):
        super().__init__(config)
        self.macrl = MACRLModel(config)
        self.decoder = MACRLDecoder(config)
        self.projector = self._build_projector(config)
        self.predictor = MACRLProjectionHead(
            config.predictor_num_layers,
            config.projection_dim,
            config.predictor_hidden_size,
            config.projection_dim,
            last_batch_norm=False,
        )
        self.momentum_encoder = MACRLModel(config)
        self.momentum_projector = self._build_projector(config)
        if config.queue_size > 0:
            self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, config.projection_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.post_init()
        self.init_momentum_branch()

    @staticmethod
    def _build_projector(config: MACRLConfig) -> MACRLProjectionHead:
        return MACRLProjectionHead(
            config.projector_num_layers,
            config.hidden_size,
            config.projector_hidden_size,
            config.projection_dim,
            last_batch_norm=True,
        )

    def _branch_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, main), getattr(self, momentum)) for main, momentum in self._momentum_pairs]

    def get_input_embeddings(self) -> nn.Module:
        return self.macrl.patch_embed

    @torch.no_grad()
    def init_momentum_branch(self, missing_keys: set[str] | list[str] | None = None) -> None:
        """Copy the main branch into the momentum branch and freeze it (MoCo's start).

        With `missing_keys` (a load report's), only the momentum weights and buffers named there are copied, and the
        loaded ones are kept; the whole momentum branch is frozen either way.
        """
        for main_name, momentum_name in self._momentum_pairs:
            main, momentum = getattr(self, main_name), getattr(self, momentum_name)
            main_state = main.state_dict()
            for name, tensor in momentum.state_dict(keep_vars=True).items():
                if missing_keys is None or f"{momentum_name}.{name}" in missing_keys:
                    tensor.copy_(main_state[name])
            momentum.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then `init_momentum_branch(missing_keys)`: an encoder-only folder (the
        warm start from a released encoder) gets a momentum branch equal to its main branch, and the momentum branch
        is frozen again (the loader makes every parameter it creates trainable)."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model.init_momentum_branch(set(loading_info["missing_keys"]))
        return (model, loading_info) if output_loading_info else model

    def momentum_at(self, progress: float) -> float:
        """Cosine schedule of the EMA coefficient: `config.momentum` at progress 0, 1 at progress 1 (MoCo v3/BYOL)."""
        progress = min(max(progress, 0.0), 1.0)
        return 1.0 - (1.0 - self.config.momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0

    @torch.no_grad()
    def update_momentum_branch(self, progress: float) -> float:
        """EMA step `momentum = m * momentum + (1 - m) * main`, with `m = momentum_at(progress)`. Returns `m`."""
        m = self.momentum_at(progress)
        momentum_params, main_params = [], []
        for main, momentum in self._branch_pairs():
            # every parameter, frozen main ones included (a frozen patch projection, as in MoCo v3, stays equal); the
            # buffers are not averaged: the fixed positions are equal, and BatchNorm statistics are each branch's own
            for param_main, param_momentum in zip(main.parameters(), momentum.parameters()):
                main_params.append(param_main)
                momentum_params.append(param_momentum)
        # Performance: one lerp pass (momentum += (1 - m) * (main - momentum)) instead of a mul_ and an add_ pass:
        # the same EMA up to rounding, and faster. (The lists are rebuilt every step on purpose: that is cheap and
        # stays right when parameters are replaced after construction, as from_pretrained does.)
        torch._foreach_lerp_(momentum_params, main_params, 1.0 - m)
        return m

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[N, C, H, W]` -> `[N, L, p*p*C]` in MAE's order (row of patches, then pixel row, column, channel)."""
        p = self.config.patch_size
        n, c, h, w = pixel_values.shape
        x = pixel_values.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, patches: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """`[N, L, p*p*C]` -> `[N, C, H, W]`, the inverse of `patchify` (square images unless `image_size`)."""
        p, c = self.config.patch_size, self.config.num_channels
        n, num_patches, _ = patches.shape
        h, w = image_size if image_size is not None else (math.isqrt(num_patches) * p,) * 2
        x = patches.reshape(n, h // p, w // p, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, h, w)

    def forward_loss(self, pixel_values: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Reconstruction loss on the hidden patches (on every patch when nothing is hidden)."""
        target = self.patchify(pixel_values)  # [N, L, p*p*C]
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        error = pred.float() - target.float()
        error = error.abs() if self.config.reconstruction_loss == "l1" else error.pow(2)
        error = error.mean(dim=-1)  # [N, L], mean over pixels of a patch
        if mask is None:
            return error.mean()
        return (error * mask).sum() / mask.sum()

    def forward_main(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None,
        interpolate_pos_encoding: bool,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> dict[str, torch.Tensor | None]:
        """Main branch on one view: masked encoder, then decoder and/or projector+predictor as the weights ask."""
        tokens, mask, ids_restore, blocks_output = self.macrl.forward_encoder(
            pixel_values,
            self.config.mask_ratio,
            noise,
            interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        out: dict[str, torch.Tensor | None] = {"mask": mask, "ids_restore": ids_restore, "logits": None, "query": None}
        out["hidden_states"], out["attentions"] = blocks_output.hidden_states, blocks_output.attentions
        out["pooled"] = self.macrl.pool(tokens)  # [N, D]
        if self.config.reconstruction_weight > 0:
            if ids_restore is None:  # nothing hidden: the decoder sees every token in image order
                num_patches = tokens.shape[1] - 1
                ids_restore = torch.arange(num_patches, device=tokens.device).expand(tokens.shape[0], -1)
            out["logits"] = self.decoder(tokens, ids_restore)  # [N, L, p*p*C]
            out["reconstruction_loss"] = self.forward_loss(pixel_values, out["logits"], mask)
        if self.config.contrastive_weight > 0:
            out["query"] = self.predictor(self.projector(out["pooled"]))  # [N, P]
        return out

    @torch.no_grad()
    def forward_momentum(
        self, pixel_values: torch.Tensor, noise: torch.Tensor | None, interpolate_pos_encoding: bool
    ) -> torch.Tensor:
        """Momentum branch on one view: encoder and projector give the contrastive key `[N, P]`."""
        tokens, _, _, _ = self.momentum_encoder.forward_encoder(
            pixel_values, self.config.momentum_mask_ratio, noise, interpolate_pos_encoding
        )
        return self.momentum_projector(self.momentum_encoder.pool(tokens))

    def forward_contrastive_loss(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        queue = self.queue.clone() if self.config.queue_size > 0 else None
        return info_nce_loss(query, key, self.config.temperature, queue)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        keys = concat_all_gather(F.normalize(keys, dim=1))  # [W*N, P]
        size = self.queue.shape[0]
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[index[-size:]] = keys[-size:]
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        momentum_pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MACRLForPreTrainingOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
                The strongly augmented view, for the main branch.
            momentum_pixel_values (`torch.FloatTensor` of the same shape, *optional*):
                The weakly augmented view of the same images, for the momentum branch; defaults to `pixel_values`.
            noise (`torch.FloatTensor` of shape `(batch_size, num_patches)`, *optional*):
                Masking noise: the patches with the smallest noise stay visible. Fixes the mask for reproducibility.
                With `symmetric_loss`, the weak view's mask in the main branch uses `1 - noise`.
            interpolate_pos_encoding (`bool`, defaults to `False`):
                Accept images whose size differs from `config.image_size`.
            output_hidden_states (`bool`, *optional*):
                Also return the main encoder's hidden states on the strong view (its visible patches).
            output_attentions (`bool`, *optional*):
                Also return the main encoder's attention weights on the strong view (computed eagerly for that call).
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        config = self.config
        if momentum_pixel_values is None:
            momentum_pixel_values = pixel_values
        elif momentum_pixel_values.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"momentum_pixel_values holds {momentum_pixel_values.shape[0]} images but pixel_values holds "
                f"{pixel_values.shape[0]}: the two views must come from the same images"
            )

        main = self.forward_main(
            pixel_values, noise, interpolate_pos_encoding, output_hidden_states, output_attentions
        )
        reconstruction_loss = main.get("reconstruction_loss", pixel_values.new_zeros(()))
        contrastive_loss = pixel_values.new_zeros(())
        if config.contrastive_weight > 0:
            key = self.forward_momentum(momentum_pixel_values, noise, interpolate_pos_encoding)  # [N, P]
            contrastive_loss = self.forward_contrastive_loss(main["query"], key)
            if config.symmetric_loss:
                # MoCo v3: each view is a query for the other view's key
                second_noise = 1 - noise if noise is not None else None
                main_weak = self.forward_main(momentum_pixel_values, second_noise, interpolate_pos_encoding)
                key_strong = self.forward_momentum(pixel_values, noise, interpolate_pos_encoding)
                contrastive_loss = contrastive_loss + self.forward_contrastive_loss(main_weak["query"], key_strong)
                if config.reconstruction_weight > 0:
                    reconstruction_loss = (reconstruction_loss + main_weak["reconstruction_loss"]) / 2
            if config.queue_size > 0 and self.training:
                self._enqueue(key)

        loss = config.reconstruction_weight * reconstruction_loss + config.contrastive_weight * contrastive_loss
        output = MACRLForPreTrainingOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss.detach(),
            contrastive_loss=contrastive_loss.detach(),
            logits=main["logits"],
            mask=main["mask"],
            ids_restore=main["ids_restore"],
            pooler_output=main["pooled"],
            hidden_states=main["hidden_states"],
            attentions=main["attentions"],
        )
        return output if return_dict else output.to_tuple()


class MACRLForImageClassification(MACRLPreTrainedModel):
    """MACRL encoder with a linear classifier on the pooled feature, for fine-tuning (e.g. with `Trainer`)."""

    def __init__(self, config: MACRLConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.macrl = MACRLModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            # timm's and transformers' ViT head init; MAE fine-tunes with a very small one (std 2e-5), which is
            # `initializer_range=2e-5` here (only the classifier is new when fine-tuning a pre-trained encoder)
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, image_size, image_size)`):
                Normalised pixels.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices in `[0, num_labels)`; with them the output holds the cross-entropy loss (MSE if
                `num_labels == 1`, BCE for multi-label `problem_type`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.macrl(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output.to(self.classifier.weight.dtype))  # [N, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "MACRLPreTrainedModel",
    "MACRLModel",
    "MACRLForPreTraining",
    "MACRLForImageClassification",
]
