"""LoRA fine-tuning of a MACRL classifier with plain `peft` (an optional extra: ``pip install 'macrl[peft]'``).

The adapter is peft's LoRA on the attention's ``qkv`` and ``proj`` linears, with the new ``classifier`` trained in
full (``modules_to_save``). ``"proj"`` also names the patch embedding's convolution (``patch_embed.proj``), which
peft adapts as well: with these names, plain peft and this module adapt the same layers. On the ``fmnist`` preset at
rank 8 that is 2.2% of the parameters.

After training, :func:`save_lora` writes the adapter alone (``adapter/``: ``adapter_model.safetensors`` and
``adapter_config.json``, for peft) and the merged model (the LoRA products added into the base weights, the
classifier's trained copy in place), which loads with ``MACRLForImageClassification.from_pretrained`` or
``AutoModelForImageClassification`` and no peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InputError

__all__ = [
    "ADAPTER_FOLDER",
    "LORA_MODULES_TO_SAVE",
    "LORA_TARGET_MODULES",
    "PeftMissingError",
    "add_lora",
    "import_peft",
    "save_lora",
    "trainable_parameters",
]

# the module names peft's `target_modules` matches (by their last part): the attention's two linears
LORA_TARGET_MODULES = ["qkv", "proj"]
# trained in full: the classifier is new, there is no pre-trained weight for an adapter to adapt
LORA_MODULES_TO_SAVE = ["classifier"]
# where the adapter goes in the output folder, beside the merged model
ADAPTER_FOLDER = "adapter"


class PeftMissingError(InputError):
    """LoRA was asked for and peft is not installed."""


def import_peft():
    """The `peft` module.

    Raises:
        PeftMissingError: peft is not installed; the message names the extra that installs it.
    """
    try:
        import peft
    except ImportError as error:
        raise PeftMissingError("LoRA fine-tuning needs peft, which is not installed: pip install 'macrl[peft]'") from error
    return peft


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0) -> nn.Module:
    """``model`` (a ``MACRLForImageClassification``) wrapped in a peft ``PeftModel`` whose only trainable parameters
    are the LoRA matrices of rank ``rank`` on :data:`LORA_TARGET_MODULES` and the classifier.

    ``alpha`` (default: ``rank``) scales the LoRA product by ``alpha / rank``: 1 by default, whatever the rank.

    Raises:
        PeftMissingError: peft is not installed.
        ValueError: ``rank < 1``.
    """
    if rank < 1:
        raise ValueError(f"the LoRA rank must be >= 1, got {rank}")
    peft = import_peft()
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=list(LORA_TARGET_MODULES),
        modules_to_save=list(LORA_MODULES_TO_SAVE),
    )
    return peft.get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts of ``model``, as peft's ``print_trainable_parameters`` counts them (a
    ``PeftModel``'s all include its adapters and the classifier's trained copy)."""
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return trainable, sum(parameter.numel() for parameter in model.parameters())


def save_lora(model: nn.Module, output_dir: str | Path, processor: Any | None = None) -> nn.Module:
    """Save a trained LoRA ``PeftModel``: its adapter in ``output_dir/adapter/`` and the merged model (with
    ``processor``) in ``output_dir``. Returns the merged ``MACRLForImageClassification``; ``model``'s adapter is
    merged into its base model's weights and removed, so use it no more."""
    output_dir = Path(output_dir)
    model.save_pretrained(str(output_dir / ADAPTER_FOLDER))  # adapter_model.safetensors + adapter_config.json
    merged = model.merge_and_unload()  # the plain MACRLForImageClassification, LoRA products added into its weights
    merged.save_pretrained(str(output_dir))
    if processor is not None:
        processor.save_pretrained(str(output_dir))
    return merged
