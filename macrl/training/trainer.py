"""`Trainer` for MACRL pre-training.

What MACRL adds to the stock `transformers.Trainer`, through its public hooks only (its callbacks are the run's
`RunCallbacks`, in their one order):
- a `TrainingClock` that the schedules follow: steps for a step-based run (the stock cosine schedule, unchanged),
  the time budget for a `--max-minutes` run (a warm-up + cosine schedule of the clock's progress, so it ends when the
  budget does), whose progress bar then shows the budget instead of the step cap;
- the EMA update of the momentum branch after every optimiser step (`MomentumUpdateCallback`, whose current
  coefficient goes into the logs);
- the logs carry the loss of the global batch (averaged over processes), its reconstruction and contrastive parts,
  the EMA momentum, images/s, the kNN monitor (`KnnMonitor`) and the online probe (`OnlineProbe`), when given, and
  the last step is always logged;
- an online probe trains on the detached pooled features of every batch's main-process share, with the batch's
  labels (which never reach the model), and resumes from the checkpoint a run resumes from;
- checkpoints are staged and renamed into place whole (`AtomicCheckpoints`: the `TrainingArguments.output_dir` is
  the staging folder `<checkpoint_dir>/.staging`);
- resuming from a checkpoint with a missing or truncated file raises `CheckpointError`, and resuming from one at the
  run's last step trains no more steps (the stock Trainer trains one past it when that step is mid-epoch);
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

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ProgressCallback

from ..data.streaming_two_view_dataset import StreamingTwoViewDataset
from .budget import warmup_cosine
from .callbacks import DataPositionCallback, RunCallbacks
from .checkpoints import CheckpointError, checkpoint_problem

__all__ = ["MACRLPretrainer"]


class MACRLPretrainer(Trainer):
    """`transformers.Trainer` with what MACRL pre-training adds to it (module docstring)."""

    def __init__(self, model, args: TrainingArguments, *, run_callbacks: RunCallbacks, global_batch_size: int,
                 **kwargs):
        self.run_callbacks = run_callbacks
        self.clock = run_callbacks.clock
        self.momentum_update = run_callbacks.momentum_update
        self.monitor = run_callbacks.monitor
        self.online_probe = run_callbacks.online_probe
        self.stream_positions = run_callbacks.stream_positions
        if isinstance(kwargs.get("train_dataset"), StreamingTwoViewDataset) and self.stream_positions is None:
            raise ValueError("a streamed dataset keeps its data position in every checkpoint: give RunCallbacks a "
                             "data_position")
        super().__init__(model, args, callbacks=run_callbacks.in_order(), **kwargs)
        if run_callbacks.progress_bar is not None and self.pop_callback(ProgressCallback) is not None:
            self.add_callback(run_callbacks.progress_bar)  # a budget run's bar, in place of the stock one
        # The model's loss is a mean over its micro-batch, never normalised by `num_items_in_batch`; the Trainer, which
        # takes a forward with **kwargs for one that is, would then skip dividing it by the gradient accumulation
        # steps as soon as a batch held "labels" (a gradient that many times too large).
        self.model_accepts_loss_kwargs = False
        self.global_batch_size = global_batch_size
        self._loss_parts: dict[str, torch.Tensor] = {}
        self._loss_parts_count = 0
        self._last_log = (time.monotonic(), 0)
        self._resumed_step: int | None = None  # the step of the checkpoint `train` resumes from

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        # The stock Trainer resumes silently from a checkpoint without optimizer.pt or rng_state.pth (a fresh
        # optimizer: a different run) and fails with a bare torch/safetensors traceback on a truncated file.
        self._resumed_step = None
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise CheckpointError(f"{resume_from_checkpoint} is not a complete checkpoint ({problem})")
            if self.stream_positions is not None:
                self._resume_stream(resume_from_checkpoint)
            self._resumed_step = TrainerState.load_from_json(
                os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)).global_step
            if self.online_probe is not None and self.is_world_process_zero():
                self.online_probe.load(resume_from_checkpoint)
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
        epochs, steps_per_epoch, *rest = super().set_initial_training_values(args, dataloader)
        if self.stream_positions is not None:
            # An endless stream is one Trainer epoch of max_steps steps (the stream counts its own epochs): with the
            # stock sys.maxsize epochs, a run resumed from a checkpoint at its last step trains one step more.
            epochs = 1
        max_steps = rest[-1]
        if self._resumed_step is not None and self._resumed_step >= max_steps:
            # Resumed at its last step (a stop, a failed write or a kill after the last checkpoint): no epoch left to
            # start, where the stock Trainer would train one step past max_steps in the middle of an epoch (it
            # checks max_steps only after a step).
            epochs = min(epochs, self._resumed_step // steps_per_epoch)
        return (epochs, steps_per_epoch, *rest)

    def get_train_dataloader(self) -> DataLoader:
        if self.stream_positions is None:
            loader = super().get_train_dataloader()
        else:
            workers = self.args.dataloader_num_workers
            loader = DataLoader(
                self.train_dataset,
                batch_size=self._train_batch_size,
                collate_fn=self.data_collator,
                num_workers=workers,
                pin_memory=self.args.dataloader_pin_memory,
                persistent_workers=self.args.dataloader_persistent_workers,
                prefetch_factor=self.args.dataloader_prefetch_factor if workers else None,
            )
        # accelerate's loaders iterate a DataLoader of their own (`base_dataloader`): its workers are the ones to set
        workers = getattr(loader, "base_dataloader", loader)
        if self.run_callbacks.stop_signals is not None and workers.num_workers > 0:
            # a stop signal sent to every process (Ctrl-C, SLURM, kill -- -PGID) is this process's to act on: the
            # workers that feed it must outlive it until the step's end
            workers.worker_init_fn = self.run_callbacks.stop_signals.worker_init_fn(workers.worker_init_fn)
        return loader

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
        labels = inputs.pop("labels", None)  # an online probe's, not the model's
        outputs = model(**inputs)
        if position is not None and self.stream_positions is not None:
            self.stream_positions.record(position)
        if labels is not None and self.online_probe is not None and self.is_world_process_zero():
            self.online_probe.train_step(outputs.pooler_output, labels)
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
            if self.online_probe is not None:
                logs.update(self.online_probe.pop())
            now, step = time.monotonic(), self.state.global_step
            last_time, last_step = self._last_log
            if step > last_step:
                logs["images_per_second"] = round((step - last_step) * self.global_batch_size / (now - last_time), 1)
            self._last_log = (now, step)
        super().log(logs, start_time)

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        return [name for name in names if not name.endswith(("cls_token", "mask_token", "pos_embed"))]
