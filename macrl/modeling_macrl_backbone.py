"""`MACRLBackbone`: the MACRL encoder as a transformers backbone, for dense-prediction heads (UperNet, DPT, ...).

It is `MACRLModel` with `BackboneMixin` (as `Dinov2Backbone` is Dinov2 with it): the same modules under the same names,
so any pre-trained MACRL encoder folder (or pre-training folder) loads into it with no missing weights, and
`AutoBackbone.from_pretrained(folder, out_indices=[...])` builds it once `macrl` is imported.
"""

import torch
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput

from .configuration_macrl import MACRLConfig
from .modeling_macrl import MACRLModel


class MACRLBackbone(BackboneMixin, MACRLModel):
    """Feature maps of the stages `config.out_features` names (`"stem"`: the embeddings, `"stageK"`: block K's
    output), each through the encoder's final LayerNorm if `config.apply_layernorm`, and reshaped to
    `[batch, hidden_size, H / patch_size, W / patch_size]` if `config.reshape_hidden_states`."""

    def __init__(self, config: MACRLConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * len(config.stage_names)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = True,
        **kwargs,
    ) -> BackboneOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised pixels; height and width multiples of `config.patch_size`.
            output_hidden_states (`bool`, *optional*):
                Also return the embeddings and the output of every block, `(batch_size, 1 + num_patches, hidden_size)`
                each.
            output_attentions (`bool`, *optional*):
                Also return the attention weights of every block (computed eagerly for that call).
            interpolate_pos_encoding (`bool`, defaults to `True`):
                Resample the position embedding for images of another size than `config.image_size`, as dense heads
                feed them (Dinov2's backbone always does); `False` insists on `config.image_size`.

        Returns:
            `BackboneOutput` with `feature_maps`, one per `config.out_features` entry, in stage order.
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        _, _, _, blocks_output = self.forward_encoder(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=True,
            output_attentions=output_attentions,
        )
        hidden_states = blocks_output.hidden_states  # stem + one per block, each [N, 1 + L, D]
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
                patches = hidden_state[:, 1:]  # [N, L, D], CLS dropped
                hidden_state = patches.reshape(batch_size, height // patch_size, width // patch_size, -1)
                hidden_state = hidden_state.permute(0, 3, 1, 2).contiguous()  # [N, D, H/p, W/p]
            feature_maps += (hidden_state,)
        output = BackboneOutput(
            feature_maps=feature_maps,
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=blocks_output.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["MACRLBackbone"]
