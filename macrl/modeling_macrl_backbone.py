"""`MACRLBackbone`: the MACRL encoder as a transformers backbone, for dense-prediction heads (UperNet, DPT, ...).

It is `MACRLModel` with `BackboneMixin` (as `Dinov2Backbone` is Dinov2 with it): the same modules under the same names,
so any pre-trained MACRL encoder folder (or pre-training folder) loads into it with no missing weights, and
`AutoBackbone.from_pretrained(folder, out_indices=[...])` builds it once `macrl` is imported.
"""

import torch
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_outputs import BackboneOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_macrl import MACRLConfig
from .modeling_macrl import MACRLModel


class MACRLBackbone(BackboneMixin, MACRLModel):
    """Feature maps of the stages `config.out_features` names (`"stem"`: the embeddings, `"stageK"`: block K's
    output), each through the encoder's final LayerNorm if `config.apply_layernorm`, and reshaped to
    `[batch, hidden_size, H / patch_size, W / patch_size]` if `config.reshape_hidden_states`."""

    def __init__(self, config: MACRLConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * len(config.stage_names)

    @can_return_tuple
    @filter_output_hidden_states  # the feature maps need every hidden state; they are returned only when asked for
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BackboneOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised pixels; height and width multiples of `config.patch_size`.
            interpolate_pos_encoding (`bool`, defaults to `True`):
                Resample the position embedding for images of another size than `config.image_size`, as dense heads
                feed them (Dinov2's backbone always does); `False` insists on `config.image_size`.
            output_hidden_states (`bool`, *optional*):
                Also return the embeddings and the output of every block,
                `(batch_size, num_prefix_tokens + num_patches, hidden_size)` each (CLS, registers, patches).
            output_attentions (`bool`, *optional*):
                Also return the attention weights of every block (computed eagerly for that call).

        Returns:
            `BackboneOutput` with `feature_maps`, one per `config.out_features` entry, in stage order.
        """
        encoded = MACRLModel.forward(
            self, pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        hidden_states = encoded.hidden_states  # stem + one per block, each [N, P + L, D]
        batch_size, _, height, width = pixel_values.shape
        patch_size = self.config.patch_size
        feature_maps = ()
        for stage, hidden_state in zip(self.stage_names, hidden_states):
            if stage not in self.out_features:
                continue
            if self.config.apply_layernorm:
                # the model's own dtype for a dense head, though the final norm computes in float32
                hidden_state = self.norm(hidden_state.to(self.norm.weight.dtype)).to(hidden_state.dtype)
            if self.config.reshape_hidden_states:
                patches = hidden_state[:, self.config.num_prefix_tokens :]  # [N, L, D], CLS and registers dropped
                hidden_state = patches.reshape(batch_size, height // patch_size, width // patch_size, -1)
                hidden_state = hidden_state.permute(0, 3, 1, 2).contiguous()  # [N, D, H/p, W/p]
            feature_maps += (hidden_state,)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=encoded.attentions)


__all__ = ["MACRLBackbone"]
