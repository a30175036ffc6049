"""PyTorch MACRL model: a ViT encoder trained by masked reconstruction (MAE) and MoCo v3 contrast at once.

Layout of the pre-training model (`MACRLForPreTraining`):

    strong view ─► mask ─► macrl (encoder) ─► decoder ─► pixels of every patch     (L1 on the masked ones)
                                 └─► pool ─► projector ─► predictor ─► q
    weak view ──► momentum_encoder ─► pool ─► momentum_projector ─► k       (EMA of the above, no gradient)
    loss = reconstruction_weight * L1 + contrastive_weight * InfoNCE(q, k)

`MACRLModel` (the encoder users download) keeps timm's `VisionTransformer` parameter names (`patch_embed`,
`cls_token`, `pos_embed`, `blocks`, `norm`), so its `model.safetensors` loads into timm unchanged; that is why it
has no `embeddings.` / `encoder.layer.` prefixes like transformers' ViT.
"""

import math
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, get_act_layer, resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding
from transformers.utils import ModelOutput

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
}


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
            The embeddings and the output of every block, each `(batch_size, 1 + num_patches, hidden_size)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


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
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    ids_restore: torch.LongTensor | None = None
    pooler_output: torch.FloatTensor | None = None


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


class MACRLBlock(Block, GradientCheckpointingLayer):
    """timm's pre-norm ViT block (SDPA attention), with transformers' gradient checkpointing switch."""

    def __init__(self, config: MACRLConfig, dim: int, num_heads: int, mlp_dim: int, drop_path: float = 0.0):
        super().__init__(
            dim=dim,
            num_heads=num_heads,
            mlp_ratio=mlp_dim / dim,
            qkv_bias=config.qkv_bias,
            proj_drop=config.hidden_dropout_prob,
            attn_drop=config.attention_probs_dropout_prob,
            drop_path=drop_path,
            act_layer=get_act_layer(config.hidden_act),
            norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        )


class MACRLPatchEmbeddings(PatchEmbed):
    """timm's convolutional patch embedding: `[B, C, H, W]` -> `[B, H/p * W/p, D]`."""

    def __init__(self, config: MACRLConfig):
        # the size check lives in MACRLModel, which knows about `interpolate_pos_encoding`
        super().__init__(
            img_size=config.image_size,
            patch_size=config.patch_size,
            in_chans=config.num_channels,
            embed_dim=config.hidden_size,
            strict_img_size=False,
        )


class MACRLEncoder(nn.Sequential):
    """The stack of encoder blocks (named `blocks`, as in timm)."""

    def __init__(self, config: MACRLConfig):
        drop_path_rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        super().__init__(
            *[
                MACRLBlock(config, config.hidden_size, config.num_attention_heads, config.intermediate_size, rate)
                for rate in drop_path_rates
            ]
        )

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for block in self:
            hidden_states = block(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return hidden_states, all_hidden_states


class MACRLDecoder(nn.Module):
    """MAE's shallow decoder: mask tokens fill the hidden patches, blocks mix them, a linear layer predicts pixels.

    Parameter names follow facebookresearch/mae (`decoder_embed`, `mask_token`, `decoder_pos_embed`,
    `decoder_blocks`, `decoder_norm`, `decoder_pred`).
    """

    def __init__(self, config: MACRLConfig):
        super().__init__()
        dim = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(config.hidden_size, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, dim), requires_grad=False)
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
        x = self.decoder_embed(latent)  # [B, 1 + L_vis, Dd]
        batch_size, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.expand(batch_size, num_patches + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, L, Dd], visible first
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # image order
        x = torch.cat([x[:, :1], patches], dim=1)  # [B, 1 + L, Dd]
        x = x + self._position_embedding(num_patches)
        for block in self.decoder_blocks:
            x = block(x)
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


class MACRLPreTrainedModel(PreTrainedModel):
    config: MACRLConfig
    config_class = MACRLConfig
    base_model_prefix = "macrl"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MACRLBlock"]
    _supports_sdpa = True
    # a MACRLModel or classifier loaded from a pre-training folder leaves the pre-training heads behind, silently
    _keys_to_ignore_on_load_unexpected = [
        r"^(decoder|projector|predictor|momentum_encoder|momentum_decoder|momentum_projector)\.",
        r"^queue",
    ]

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`. A folder that carries the code maps every MACRL Auto class in the
        `auto_map` of its config.json, the image processor's included, so `trust_remote_code=True` loads any of them."""
        if self._auto_class is not None:
            self.config.auto_map = dict(_AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if self._auto_class is not None:
            shutil.copy(Path(__file__).with_name("image_processing_macrl.py"), save_directory)

    def _init_weights(self, module: nn.Module) -> None:
        """MAE's initialisation: xavier-uniform linear layers, fixed sin-cos positions, N(0, 0.02) tokens."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MACRLPatchEmbeddings):
            # initialise the patch projection like a linear layer, as MAE does
            init.xavier_uniform_(module.proj.weight.view(module.proj.weight.shape[0], -1))
            init.zeros_(module.proj.bias)
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


class MACRLModel(MACRLPreTrainedModel):
    """The MACRL encoder: a ViT that maps images to tokens and a pooled feature, with no masking."""

    def __init__(self, config: MACRLConfig):
        super().__init__(config)
        self.patch_embed = MACRLPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        # fixed (not learned) 2D sin-cos positions, as in MAE
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size), requires_grad=False)
        self.blocks = MACRLEncoder(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> None:
        """Raise a `ValueError` that names the expected shape or dtype when `pixel_values` cannot be encoded."""
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
        # Performance: a float32 sum is non-finite whenever an element is (NaN and inf propagate) and is ~25x faster
        # than `isfinite().all()` on a CPU batch (22 ms -> 0.8 ms for 32 images of 224 px); only a sum that overflows
        # is checked element by element, so the outcome is the same.
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
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
        """Encode the visible patches. Returns tokens `[N, 1 + L_keep, D]`, mask, ids_restore and hidden states."""
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        x = self.patch_embed(pixel_values)  # [N, L, D]
        pos_embed = self._position_embedding(pixel_values.shape[2:], interpolate_pos_encoding)
        x = x + pos_embed[:, 1:]
        mask = ids_restore = None
        if mask_ratio > 0:
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, L_keep, D]
        cls_tokens = (self.cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tokens, x], dim=1)  # [N, 1 + L_keep, D]
        x, hidden_states = self.blocks(x, output_hidden_states)
        return self.norm(x), mask, ids_restore, hidden_states

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[N, 1 + L, D]` -> `[N, D]` with the config's pooling (`pool_tokens`)."""
        return pool_tokens(tokens, self.config.pooling)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
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
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        tokens, _, _, hidden_states = self.forward_encoder(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, output_hidden_states=output_hidden_states
        )
        output = MACRLModelOutput(last_hidden_state=tokens, pooler_output=self.pool(tokens), hidden_states=hidden_states)
        return output if return_dict else output.to_tuple()

    def _position_embedding(self, image_hw: torch.Size, interpolate: bool) -> torch.Tensor:
        grid = [size // self.config.patch_size for size in image_hw]
        if not interpolate or grid[0] * grid[1] + 1 == self.pos_embed.shape[1] and grid[0] == grid[1]:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, grid, num_prefix_tokens=1)


class MACRLForPreTraining(MACRLPreTrainedModel):
    """MACRL pre-training model: main branch (encoder, decoder, projector, predictor) and its momentum twin."""

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
        # the momentum branch is an encoder-decoder too (the paper's asymmetric siamese network)
        self.momentum_encoder = MACRLModel(config)
        self.momentum_decoder = MACRLDecoder(config)
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
        return [
            (self.macrl, self.momentum_encoder),
            (self.decoder, self.momentum_decoder),
            (self.projector, self.momentum_projector),
        ]

    def get_input_embeddings(self) -> nn.Module:
        return self.macrl.patch_embed

    @torch.no_grad()
    def init_momentum_branch(self) -> None:
        """Copy the main branch into the momentum branch and freeze it (MoCo's start)."""
        for main, momentum in self._branch_pairs():
            for param_main, param_momentum in zip(main.parameters(), momentum.parameters()):
                param_momentum.copy_(param_main)
                param_momentum.requires_grad = False

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
            for param_main, param_momentum in zip(main.parameters(), momentum.parameters()):
                if param_main.requires_grad:  # frozen ones (fixed positions) are equal already
                    main_params.append(param_main)
                    momentum_params.append(param_momentum)
        # Performance: one lerp pass (momentum += (1 - m) * (main - momentum)) instead of a mul_ and an add_ pass:
        # the same EMA up to rounding, ~2x faster. (The lists are rebuilt every step on purpose: that costs ~1 ms and
        # stays right when parameters are replaced or frozen after construction.)
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
        self, pixel_values: torch.Tensor, noise: torch.Tensor | None, interpolate_pos_encoding: bool
    ) -> dict[str, torch.Tensor | None]:
        """Main branch on one view: masked encoder, then decoder and/or projector+predictor as the weights ask."""
        tokens, mask, ids_restore, _ = self.macrl.forward_encoder(
            pixel_values, self.config.mask_ratio, noise, interpolate_pos_encoding
        )
        out: dict[str, torch.Tensor | None] = {"mask": mask, "ids_restore": ids_restore, "logits": None, "query": None}
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
        """Momentum branch on one view: encoder and projector give the contrastive key `[N, P]`.

        Its decoder is kept in step by the EMA but not run: no loss uses its output.
        """
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
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        config = self.config
        if momentum_pixel_values is None:
            momentum_pixel_values = pixel_values
        elif momentum_pixel_values.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"momentum_pixel_values holds {momentum_pixel_values.shape[0]} images but pixel_values holds "
                f"{pixel_values.shape[0]}: the two views must come from the same images"
            )

        main = self.forward_main(pixel_values, noise, interpolate_pos_encoding)
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
        super()._init_weights(module)
        if module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            # MAE's fine-tuning head: small weights so the pre-trained features dominate at the start
            init.trunc_normal_(module.weight, std=2e-5)
            init.zeros_(module.bias)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
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
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)  # [N, num_labels]
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


__all__ = [
    "MACRLPreTrainedModel",
    "MACRLModel",
    "MACRLForPreTraining",
    "MACRLForImageClassification",
]
