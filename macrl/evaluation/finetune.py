"""End-to-end fine-tuning of a MACRL encoder with a linear head, on `transformers.Trainer`.

The recipe is MAE's fine-tuning protocol, scaled down:

* ``MACRLForImageClassification`` (encoder + linear classifier on ``pooler_output``, MAE's small-init head),
  loaded from a pre-trained encoder folder or Hub id; the classifier is new.
* Light augmentation of the training images: ``RandomResizedCrop`` (scale ``(0.5, 1)``) and a horizontal flip
  (torchvision v2, on the PIL image), then the model's own image processor (resize, rescale, normalise). Test
  images only go through the processor, exactly as at inference.
* AdamW, cosine schedule with warm-up, weight decay on matrices only (not on biases, LayerNorms, the CLS token).
* Optional layer-wise learning-rate decay (BEiT / MAE): the parameters are grouped by depth, ``layer_id`` 0 for
  the patch embedding and the CLS token, ``i + 1`` for block ``i``, ``num_layers + 1`` for the final norm and the
  classifier, and group ``layer_id`` trains at ``lr * layer_decay ** (num_layers + 1 - layer_id)``: the head at the
  full rate, the early blocks (generic features) at much smaller ones.

With ``lora_rank``, only LoRA adapters of that rank and the classifier train (:mod:`macrl.evaluation.lora`, peft);
with ``gradient_checkpointing``, every block's activations are recomputed in the backward pass instead of kept
(less memory, a slower step; the same loss and gradients).

The fine-tuned model is saved (safetensors, with the image processor) to ``output_dir`` and loads back with
``MACRLForImageClassification.from_pretrained(output_dir)``; a LoRA run also saves its adapter in
``output_dir/adapter/``.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2
from transformers import EvalPrediction, Trainer, TrainingArguments

from ..data import ImageSource
from ..loading import load_image_processor
from .labels import EvaluationDataError, check_labelled
from .lora import add_lora, import_peft, save_lora, trainable_parameters

__all__ = [
    "FinetuneDataset",
    "LayerDecayTrainer",
    "activation_checkpointing_arguments",
    "build_finetune_trainer",
    "enable_checkpointing",
    "finetune",
    "is_checkpointing",
    "layer_decay_parameter_groups",
    "layer_id",
]

# RandomResizedCrop area range: "light" augmentation, so a short fine-tune on small images still sees most of
# the object (MAE's 0.08 is tuned for 100-epoch ImageNet runs).
TRAIN_CROP_SCALE = (0.5, 1.0)
# torch.utils.checkpoint's non-reentrant variant: gradients reach LoRA weights inside a block whose input needs none
# (a frozen embedding), and it is what transformers defaults to since 5.20
REENTRANT_FREE = {"use_reentrant": False}
# parameters without weight decay besides the 1-D ones (biases, LayerNorm weights)
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
logger = logging.getLogger(__name__)
_EMBEDDING = re.compile(r"(?:^|\.)(cls_token|pos_embed|patch_embed)(?:\.|$)")


# --------------------------------------------------------------------------- data


def _processor_size(processor: Any) -> tuple[int, int]:
    """(height, width) the image processor resizes to."""
    size = dict(getattr(processor, "size", None) or {})
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    edge = size.get("shortest_edge") or size.get("longest_edge")
    if edge:
        return int(edge), int(edge)
    raise ValueError(f"cannot tell the image size from the image processor's size {size!r}")


class FinetuneDataset(Dataset):
    """An ``ImageSource`` as ``{"pixel_values": [C, H, W] float, "labels": int}`` items for ``Trainer``.

    Args:
        source: labelled images.
        processor: the model's image processor (resize, rescale, normalise).
        train: apply the light augmentation (random resized crop + horizontal flip) before the processor.
    """

    def __init__(self, source: ImageSource, processor: Any, train: bool) -> None:
        if source.labels is None:
            raise EvaluationDataError(f"{source.name} has no labels; fine-tuning needs labelled images")
        self.source = source
        self.processor = processor
        self.train = train
        self.augment = None
        if train:
            self.augment = v2.Compose(
                [
                    v2.RandomResizedCrop(_processor_size(processor), scale=TRAIN_CROP_SCALE, antialias=True),
                    v2.RandomHorizontalFlip(),
                ]
            )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.source.load_image(index)
        if self.augment is not None:
            image = self.augment(image)  # PIL in, PIL out
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"][0]  # [C, H, W]
        return {"pixel_values": pixel_values, "labels": int(self.source.labels[index])}


# --------------------------------------------------------------------------- layer-wise lr decay


def layer_id(name: str, num_layers: int) -> int:
    """Depth of parameter ``name``: 0 for the embeddings, ``i + 1`` for block ``i``, ``num_layers + 1`` above."""
    block = _BLOCK.search(name)
    if block:
        return int(block.group(1)) + 1
    if _EMBEDDING.search(name):
        return 0
    return num_layers + 1  # final norm, classifier


def layer_decay_parameter_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float | None,
    num_layers: int | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups by (depth, decay / no decay), BEiT / MAE style.

    Every group carries ``lr = lr * lr_scale`` with ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)``
    (1 for every group when ``layer_decay`` is None), ``weight_decay`` (0 for 1-D parameters, the CLS token and the
    position embedding), and the keys ``layer_id`` and ``lr_scale`` for inspection. Frozen parameters are left out.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    if num_layers is None:
        num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        depth = layer_id(name, num_layers)
        decay = parameter.ndim > 1 and name.rsplit(".", 1)[-1] not in NO_WEIGHT_DECAY
        scale = 1.0 if layer_decay is None else layer_decay ** (num_layers + 1 - depth)
        group = groups.setdefault(
            (depth, decay),
            {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr": lr * scale,
                "lr_scale": scale,
                "layer_id": depth,
            },
        )
        group["params"].append(parameter)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


class LayerDecayTrainer(Trainer):
    """``Trainer`` whose optimizer uses :func:`layer_decay_parameter_groups` (``layer_decay=None``: one lr)."""

    def __init__(self, *args, layer_decay: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.layer_decay = layer_decay

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = layer_decay_parameter_groups(
                opt_model, self.args.learning_rate, self.args.weight_decay, self.layer_decay
            )
            # the group lr wins over the kwargs' default lr; the scheduler then scales every group's own lr
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


# --------------------------------------------------------------------------- training


def activation_checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """The `TrainingArguments` fields that turn gradient checkpointing on: ``activation_checkpointing`` since
    transformers 5.20 (``gradient_checkpointing``, its deprecated alias, before), which then has the Trainer call the
    model's ``activation_checkpointing_enable`` before training, with ``use_reentrant=False``."""
    name = "activation_checkpointing"
    if name not in TrainingArguments.__dataclass_fields__:
        name = "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": dict(REENTRANT_FREE)} if enabled else {name: False}


def enable_checkpointing(model: nn.Module) -> None:
    """Turn gradient checkpointing on in ``model`` as the Trainer does (``activation_checkpointing_enable``, or
    before transformers 5.20 ``gradient_checkpointing_enable``; both ``use_reentrant=False``)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(REENTRANT_FREE)
    else:
        model.gradient_checkpointing_enable(REENTRANT_FREE)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` recomputes activations in the backward pass: any of its blocks has gradient checkpointing
    on (transformers' ``is_activation_checkpointing``, which a peft wrapper and older transformers lack)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def _accuracy(prediction: EvalPrediction) -> dict[str, float]:
    predictions = np.asarray(prediction.predictions).reshape(-1)
    labels = np.asarray(prediction.label_ids).reshape(-1)
    return {"accuracy": 100.0 * float((predictions == labels).mean())}


def _argmax_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # keep only the predicted class: the Trainer then gathers [N] ints instead of [N, C] floats
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def _class_names(train_source: ImageSource, test_source: ImageSource) -> list[str]:
    if train_source.class_names:
        return list(train_source.class_names)
    labels = list(train_source.labels or []) + list(test_source.labels or [])
    return [str(i) for i in range(max(labels) + 1)] if labels else []


def build_finetune_trainer(
    model: nn.Module,
    processor: Any,
    train_source: ImageSource,
    test_source: ImageSource | None,
    *,
    output_dir: str | Path,
    epochs: float = 1.0,
    batch_size: int = 64,
    lr: float = 5e-4,
    layer_decay: float | None = None,
    weight_decay: float = 0.05,
    seed: int = 0,
    max_steps: int = -1,
    warmup_ratio: float = 0.1,
    logging_steps: int | None = None,
    device: str = "cpu",
    bf16: bool = False,
    fp16: bool = False,
    num_workers: int = 0,
    progress: bool = False,
    callbacks: Iterable | None = None,
    gradient_checkpointing: bool = False,
) -> LayerDecayTrainer:
    """A :class:`LayerDecayTrainer` that fine-tunes ``model`` (a ``MACRLForImageClassification``, or a peft
    ``PeftModel`` of one) on ``train_source``.

    ``logging_steps=None`` logs about 20 times per run. ``device``: ``cpu`` (even with a GPU present), ``cuda``,
    ``mps`` or ``auto`` (the Trainer's choice). ``bf16`` / ``fp16``: the Trainer's mixed precision (fp16 with loss
    scaling); at most one. ``gradient_checkpointing``: the Trainer turns it on in the model when training starts.
    Nothing is saved by the trainer itself (``save_strategy="no"``); :func:`finetune` saves the final model.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if max_steps <= 0 and epochs <= 0:
        raise ValueError(f"epochs must be > 0 (or max_steps > 0), got {epochs!r}")
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    train_dataset = FinetuneDataset(train_source, processor, train=True)
    eval_dataset = FinetuneDataset(test_source, processor, train=False) if test_source is not None else None
    steps = max_steps if max_steps > 0 else math.ceil(epochs * math.ceil(len(train_dataset) / batch_size))
    on_gpu = device in ("cuda", "auto") and torch.cuda.is_available()
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        seed=seed,
        data_seed=seed,
        logging_steps=logging_steps or max(1, steps // 20),
        eval_strategy="no",
        save_strategy="no",
        dataloader_num_workers=num_workers,
        dataloader_pin_memory=on_gpu,
        remove_unused_columns=False,
        report_to="none",
        use_cpu=device == "cpu",  # "auto": the Trainer's choice (cuda, else mps, else cpu)
        bf16=bf16,
        fp16=fp16,
        disable_tqdm=not progress,
        log_level="warning",
        **activation_checkpointing_arguments(gradient_checkpointing),
    )
    return LayerDecayTrainer(
        model=model,
        args=arguments,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=_accuracy,
        preprocess_logits_for_metrics=_argmax_logits,
        callbacks=list(callbacks or []),
        layer_decay=layer_decay,
    )


def finetune(
    model_name_or_path: str | Path,
    train_source: ImageSource,
    test_source: ImageSource,
    *,
    output_dir: str | Path,
    epochs: float = 1.0,
    batch_size: int = 64,
    lr: float = 5e-4,
    layer_decay: float | None = None,
    weight_decay: float = 0.05,
    seed: int = 0,
    max_steps: int = -1,
    revision: str | None = None,
    warmup_ratio: float = 0.1,
    logging_steps: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
    lora_rank: int | None = None,
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Fine-tune a MACRL encoder with a linear head, end to end or with LoRA; evaluate on ``test_source``; save to
    ``output_dir``.

    Args:
        model_name_or_path: a MACRL encoder folder or Hub id (a ``MACRLModel``, pre-training or classification
            folder: the encoder weights are taken, any head is replaced by a new ``num_classes``-way classifier).
        train_source, test_source: labelled images (labels in ``[0, num_classes)``, ``num_classes`` from the
            training source's ``class_names``, else the largest label + 1).
        output_dir: where the fine-tuned ``MACRLForImageClassification`` and its image processor are saved.
        epochs, batch_size, lr, weight_decay, seed, max_steps (> 0 overrides epochs), warmup_ratio: the usual.
        layer_decay: layer-wise lr decay factor in ``(0, 1]`` (MAE uses 0.65 - 0.75); None: one lr everywhere.
        dtype: ``fp32``, ``bf16`` or ``fp16`` (the Trainer's mixed precision: autocast, fp16 with loss scaling).
        lora_rank: train LoRA adapters of this rank and the classifier only (:mod:`macrl.evaluation.lora`; needs
            peft); the adapter is saved in ``output_dir/adapter/``, the merged model in ``output_dir``. None: every
            parameter trains.
        gradient_checkpointing: recompute every block's activations in the backward pass instead of keeping them.

    Returns:
        ``finetune_accuracy`` (percent, on ``test_source``), ``finetune_eval_loss``, ``finetune_train_loss`` (mean
        over the run), ``finetune_losses`` (the logged training losses, in order), ``finetune_steps``,
        ``finetune_epochs``, ``finetune_seconds``, ``finetune_output_dir``, ``finetune_trainable_parameters`` /
        ``finetune_parameters`` (what trained, of all), ``finetune_lora_rank`` and ``finetune_gradient_checkpointing``
        (whether the model ran with it).

    Raises:
        PeftMissingError: ``lora_rank`` and no peft installed (before any work).
    """
    from .. import MACRLForImageClassification

    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"dtype must be 'fp32', 'bf16' or 'fp16', got {dtype!r}")
    if lora_rank is not None:
        import_peft()  # a missing peft is said before the slow part
    started = time.monotonic()
    class_names = _class_names(train_source, test_source)
    num_classes = len(class_names)
    check_labelled(train_source, test_source, num_classes=num_classes)
    id2label = {i: name for i, name in enumerate(class_names)}
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    # the load report always lists the new classifier as missing: say it only when encoder weights are missing too
    transformers_logging.set_verbosity_error()
    try:
        model, loading_info = MACRLForImageClassification.from_pretrained(
            str(model_name_or_path),
            revision=revision,
            num_labels=num_classes,
            initializer_range=2e-5,  # MAE's fine-tuning head init; the classifier is the only new weight
            id2label=id2label,
            label2id={name: i for i, name in id2label.items()},
            dtype=torch.float32,
            ignore_mismatched_sizes=True,  # a classification folder with another number of classes
            output_loading_info=True,
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing = sorted(key for key in loading_info["missing_keys"] if not key.startswith("classifier."))
    if missing:
        logger.warning(
            "%s: %d encoder weights were not in the checkpoint and are randomly initialised, e.g. %s",
            model_name_or_path, len(missing), missing[0],
        )
    processor = load_image_processor(model_name_or_path, model.config, revision)
    if lora_rank is not None:
        model = add_lora(model, lora_rank)
    trained, parameters = trainable_parameters(model)

    trainer = build_finetune_trainer(
        model, processor, train_source, test_source,
        output_dir=output_dir, epochs=epochs, batch_size=batch_size, lr=lr, layer_decay=layer_decay,
        weight_decay=weight_decay, seed=seed, max_steps=max_steps, warmup_ratio=warmup_ratio,
        logging_steps=logging_steps, device=device, bf16=dtype == "bf16", fp16=dtype == "fp16", num_workers=num_workers,
        progress=progress, gradient_checkpointing=gradient_checkpointing,
    )
    train_output = trainer.train()
    checkpointed = is_checkpointing(trainer.model)  # what the model ran with, not what was asked
    metrics = trainer.evaluate()
    output_dir = Path(output_dir)
    if lora_rank is not None:
        save_lora(trainer.model, output_dir, processor)  # adapter/ and the merged model
    else:
        trainer.save_model(str(output_dir))  # model.safetensors + config.json (+ code)
        processor.save_pretrained(str(output_dir))
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    return {
        "finetune_accuracy": round(float(metrics["eval_accuracy"]), 4),
        "finetune_eval_loss": round(float(metrics["eval_loss"]), 6),
        "finetune_train_loss": round(float(train_output.training_loss), 6),
        "finetune_losses": [round(float(loss), 6) for loss in losses],
        "finetune_steps": int(trainer.state.global_step),
        "finetune_epochs": round(float(trainer.state.epoch or 0.0), 3),
        "finetune_layer_decay": layer_decay,
        "finetune_lr": lr,
        "finetune_seconds": round(time.monotonic() - started, 2),
        "finetune_output_dir": str(output_dir),
        "finetune_trainable_parameters": trained,
        "finetune_parameters": parameters,
        "finetune_lora_rank": lora_rank,
        "finetune_gradient_checkpointing": checkpointed,
    }
