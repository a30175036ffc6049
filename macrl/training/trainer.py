"""`Trainer` for MACRL pre-training, and the `TrainingArguments` a run gives it.

What MACRL adds to the stock `transformers.Trainer`, through its public hooks only:
- a `TrainingClock` (owned by the trainer) that the schedules follow: steps for a step-based run (the stock
  cosine schedule, unchanged), the time budget for a `--max-minutes` run (a warm-up + cosine schedule of the
  clock's progress, so it ends when the budget does);
- the EMA update of the momentum branch after every optimiser step (`MomentumUpdateCallback`, owned by the
  trainer, whose current coefficient goes into the logs);
- the logs carry the loss of the global batch (averaged over processes), its reconstruction and contrastive parts,
  the EMA momentum, images/s and the kNN monitor (`KnnMonitor`, when given), and the last step is always logged;
- checkpoints are staged and renamed into place whole (`AtomicCheckpoints`, owned by the trainer: the
  `TrainingArguments.output_dir` is the staging folder `<checkpoint_dir>/.staging`);
- resuming from a checkpoint with a missing or truncated file raises `CheckpointError`;
- tokens get no weight decay (MAE's `no_weight_decay`);
- a streamed dataset (`StreamingTwoViewDataset`: shards, a streaming `datasets` dataset) gets a plain DataLoader of
  its own (it splits itself across processes and workers; accelerate's wrappers would make every process read
  everything), the position of every reader after the batches trained on goes into each checkpoint
  (`DataPositionCallback`), and a resumed run starts the readers there instead of re-reading the data it skips;
  the readers' skipped unreadable samples are summed over the processes (`skipped_unreadable`);
- the loss is divided by the gradient accumulation steps whatever a batch holds (it is a mean, not a sum to be
  normalised by `num_items_in_batch`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from ..devices import default_num_workers, has_fused_adamw, has_tf32
from ..data.streaming_two_view_dataset import StreamingTwoViewDataset, StreamPositions

from ..presets import base_learning_rate
from .arguments import PretrainingArguments
from .budget import TrainingClock, warmup_cosine
from .callbacks import DataPositionCallback, LogLastStepCallback, MomentumUpdateCallback
from .checkpoints import STAGING_DIR, AtomicCheckpoints, CheckpointError, checkpoint_problem
from .knn_monitor import KnnMonitor

__all__ = ["MACRLPretrainer", "build_training_arguments", "world_size"]


def world_size() -> int:
    """Processes that train together (torchrun / accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def num_workers(args: PretrainingArguments, device: torch.device) -> int:
    """`--num-workers`, or unset the device's default for each of the processes on this machine."""
    if args.num_workers is not None:
        return args.num_workers
    return default_num_workers(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def build_training_arguments(
    args: PretrainingArguments, checkpoint_dir: Path, max_steps: int, config, device: torch.device,
    streamed: bool = False,
) -> TrainingArguments:
    """The stock `TrainingArguments` of a run: MAE's optimiser settings, the lr rule `lr x batch / 256`, checkpoints
    staged under `checkpoint_dir` (`AtomicCheckpoints` keeps `--save-total-limit` of them), and what the device
    offers: on CUDA pinned host memory with non-blocking copies, TF32 matmuls (Ampere and newer), the fused AdamW,
    data-loading workers for the GPU. A `streamed` run resumes its data from the checkpoint's data position, not by
    the stock Trainer's skipping (`ignore_data_skip`)."""
    per_device = args.batch_size // (world_size() * args.gradient_accumulation_steps)
    accelerated = device.type != "cpu"
    cuda = device.type == "cuda"
    workers = num_workers(args, device)
    # a zero-weight head gets no gradient, which DDP must be told about
    unused_parameters = config.reconstruction_weight == 0 or config.contrastive_weight == 0
    return TrainingArguments(
        output_dir=str(checkpoint_dir / STAGING_DIR),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.epochs,
        max_steps=max_steps,
        learning_rate=(args.lr if args.lr is not None else base_learning_rate(args.config)) * args.batch_size / 256,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=args.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        # one kernel for all parameters instead of a dozen per tensor (transformers' default only from torch 2.8)
        optim="adamw_torch_fused" if has_fused_adamw(device) else "adamw_torch",
        max_grad_norm=args.max_grad_norm,  # 0 disables clipping
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=args.logging_steps,
        # the stock filter reads every step's loss on the host (`isnan(loss)`), a device sync per step; a NaN loss
        # then shows as NaN in the log instead of being papered over with the mean of the previous ones
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=None,  # AtomicCheckpoints rotates the checkpoints it moved into place
        dataloader_num_workers=workers,
        # page-locked batches, copied while the GPU still runs the previous step
        dataloader_pin_memory=cuda,
        accelerator_config={"non_blocking": cuda},
        dataloader_drop_last=True,  # BatchNorm and InfoNCE want full, equal batches on every process
        dataloader_persistent_workers=workers > 0,
        remove_unused_columns=False,
        report_to=[tracker for tracker in args.trackers() if tracker != "tensorboard"] or "none",
        # without use_cpu, accelerate treats several CPU processes as one and DDP never syncs them; with it False,
        # accelerate takes the accelerator there is (cuda, else mps)
        use_cpu=not accelerated,
        bf16=args.bf16,
        fp16=args.fp16,
        # fp32 matmuls (and what autocast leaves in fp32) on TF32 tensor cores; None leaves torch's setting alone,
        # where True would raise on a device without them
        tf32=True if has_tf32(device) else None,
        torch_compile=args.compile,
        ddp_find_unused_parameters=unused_parameters,
        ddp_backend="gloo" if world_size() > 1 and not accelerated else None,
        disable_tqdm=False,
        log_level="warning",
        ignore_data_skip=streamed,
    )


class MACRLPretrainer(Trainer):
    """`transformers.Trainer` with what MACRL pre-training adds to it (module docstring)."""

    def __init__(self, model, args: TrainingArguments, *, global_batch_size: int, save_total_limit: int | None,
                 max_minutes: float | None = None, bf16: bool = False, monitor: KnnMonitor | None = None,
                 callbacks=None, **kwargs):
        self.clock = TrainingClock(max_minutes, bf16)
        self.momentum_update = MomentumUpdateCallback(self.clock)
        self.monitor = monitor
        checkpoints = AtomicCheckpoints(Path(args.output_dir).parent, save_total_limit)
        # the clock first (it decides the stop), the monitor and the last-step log after it
        self.stream_positions: StreamPositions | None = None
        position = []
        if isinstance(kwargs.get("train_dataset"), StreamingTwoViewDataset):
            self.stream_positions = StreamPositions()
            position = [DataPositionCallback(  # before AtomicCheckpoints: written before the move
                self.stream_positions, args.process_index, kwargs["train_dataset"].images_per_epoch, global_batch_size
            )]
        own = [self.clock, self.momentum_update, *position, checkpoints, *([monitor] if monitor else []),
               LogLastStepCallback()]
        super().__init__(model, args, callbacks=[*own, *(callbacks or [])], **kwargs)
        # The model's loss is a mean over its micro-batch, never normalised by `num_items_in_batch`; the Trainer, which
        # takes a forward with **kwargs for one that is, would then skip dividing it by the gradient accumulation
        # steps as soon as a batch held "labels" (a gradient that many times too large).
        self.model_accepts_loss_kwargs = False
        self.global_batch_size = global_batch_size
        self._loss_parts: dict[str, torch.Tensor] = {}
        self._loss_parts_count = 0
        self._last_log = (time.monotonic(), 0)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # The stock Trainer resumes silently from a checkpoint without optimizer.pt or rng_state.pth (a fresh
        # optimizer: a different run) and fails with a bare torch/safetensors traceback on a truncated file.
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise CheckpointError(f"{resume_from_checkpoint} is not a complete checkpoint ({problem})")
            if self.stream_positions is not None:
                self._resume_stream(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _resume_stream(self, checkpoint) -> None:
        path = DataPositionCallback.path(checkpoint, self.args.process_index)
        try:
            self.stream_positions.load_state_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{checkpoint} holds no data position of process {self.args.process_index} ({path.name}: "
                f"{type(error).__name__}); a streamed run resumes only from its own checkpoints"
            ) from error
        self.train_dataset.resume_from(self.stream_positions, self.args.dataloader_num_workers)

    def skipped_unreadable(self) -> int | None:
        """The unreadable samples and truncated shard ends that the readers of every process skipped (None: not a
        stream). A collective: every process must call it."""
        if self.stream_positions is None:
            return None
        skipped = torch.tensor(self.stream_positions.skipped, device=self.args.device)
        return int(self.accelerator.reduce(skipped, reduction="sum").item())

    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        if self.stream_positions is None:
            return values
        # An endless stream is one Trainer epoch of max_steps steps (the stream counts its own epochs): with the
        # stock sys.maxsize epochs, a run resumed from a checkpoint at its last step trains one step more.
        return (1, *values[1:])

    def get_train_dataloader(self) -> DataLoader:
        if self.stream_positions is None:
            return super().get_train_dataloader()
        workers = self.args.dataloader_num_workers
        return DataLoader(
            self.train_dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers else None,
        )

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.clock.budget_seconds is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps) / max(num_training_steps, 1)
        self.lr_scheduler = LambdaLR(
            optimizer if optimizer is not None else self.optimizer,
            lambda _: warmup_cosine(self.clock.progress, warmup),
        )
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        position = inputs.pop("data_position", None)
        outputs = model(**inputs)
        if position is not None and self.stream_positions is not None:
            self.stream_positions.record(position)
        for name in ("loss", "reconstruction_loss", "contrastive_loss"):
            value = getattr(outputs, name).detach().float()
            self._loss_parts[name] = self._loss_parts.get(name, 0.0) + value
        self._loss_parts_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_parts_count:
            # means over every process (the stock "loss" is this process's alone)
            for name, total in self._loss_parts.items():
                mean = self.accelerator.reduce(total / self._loss_parts_count, reduction="mean")
                logs[name] = round(mean.item(), 4)
            self._loss_parts, self._loss_parts_count = {}, 0
            if self.momentum_update.momentum is not None:
                logs["momentum"] = round(self.momentum_update.momentum, 6)
            if self.monitor is not None:
                logs.update(self.monitor.pop())
            now, step = time.monotonic(), self.state.global_step
            last_time, last_step = self._last_log
            if step > last_step:
                logs["images_per_second"] = round((step - last_step) * self.global_batch_size / (now - last_time), 1)
            self._last_log = (now, step)
        super().log(logs, start_time)

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        return [name for name in names if not name.endswith(("cls_token", "mask_token", "pos_embed"))]
