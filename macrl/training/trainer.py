"""`Trainer` for MACRL pre-training: loss components in the logs, atomic checkpoints, MAE's weight-decay groups."""

import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from .callbacks import MomentumUpdateCallback

STAGING_DIR = ".staging"
# what the stock Trainer writes into a checkpoint of a MACRL run (plus rng_state.pth or rng_state_<rank>.pth)
CHECKPOINT_JSON_FILES = ("trainer_state.json", "config.json")
CHECKPOINT_TORCH_FILES = ("optimizer.pt", "scheduler.pt")


class IncompleteCheckpointError(ValueError):
    """A checkpoint folder to resume from is missing a file or holds a truncated one; the message says which."""


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be resumed from exactly (e.g. "no trainer_state.json"), or None if it is complete.

    `MACRLPretrainer` renames a checkpoint into place only once it is complete, so this catches folders damaged or
    put together elsewhere: an interrupted copy, a truncated file, a hand-made `checkpoint-N`. Reads only headers.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    for name in CHECKPOINT_JSON_FILES:
        if not (folder / name).is_file():
            return f"no {name}"
        try:
            if not isinstance(json.loads((folder / name).read_text(encoding="utf-8")), dict):
                return f"{name} is not a JSON object"
        except (ValueError, UnicodeDecodeError):
            return f"{name} is truncated or not JSON"
    if not (folder / "model.safetensors").is_file():
        return "no model.safetensors"
    try:  # the header lists every tensor's byte range: a truncated file fails here
        with safe_open(folder / "model.safetensors", framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        return f"model.safetensors is truncated or unreadable ({error})"
    rng_files = sorted(path.name for path in folder.glob("rng_state*.pth"))
    if not rng_files:
        return "no rng_state.pth"
    for name in (*CHECKPOINT_TORCH_FILES, *rng_files):
        if not (folder / name).is_file():
            return f"no {name}"  # the stock Trainer would silently start a fresh optimizer or schedule
        if not zipfile.is_zipfile(folder / name):  # torch.save writes a zip; truncation loses its directory
            return f"{name} is truncated or not a torch.save file"
    return None


class MACRLPretrainer(Trainer):
    """`transformers.Trainer` with what MACRL pre-training adds to it.

    - the logs carry the loss of the global batch (averaged over processes), its reconstruction and contrastive
      parts, the EMA momentum and images/s;
    - a checkpoint is written to `checkpoints/.staging/` and renamed into place once complete (its files fsynced
      first), and old checkpoints are renamed into staging before they are deleted, so a kill at any moment never
      leaves a partial `checkpoint-N` folder that `--resume` would take;
    - resuming from a checkpoint with a missing or truncated file raises `IncompleteCheckpointError`;
    - tokens and fixed positions get no weight decay (MAE's `no_weight_decay`).
    """

    def __init__(self, *args, global_batch_size: int, **kwargs):
        super().__init__(*args, **kwargs)
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
                raise IncompleteCheckpointError(f"{resume_from_checkpoint} is not a complete checkpoint ({problem})")
        if self.args.should_save:  # whatever a killed run left in staging is never needed: start clean
            shutil.rmtree(os.path.join(self.args.output_dir, STAGING_DIR), ignore_errors=True)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
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
            momentum = next(
                (cb.momentum for cb in self.callback_handler.callbacks if isinstance(cb, MomentumUpdateCallback)), None
            )
            if momentum is not None:
                logs["momentum"] = round(momentum, 6)
            now, step = time.monotonic(), self.state.global_step
            last_time, last_step = self._last_log
            if step > last_step:
                logs["images_per_second"] = round((step - last_step) * self.global_batch_size / (now - last_time), 1)
            self._last_log = (now, step)
        super().log(logs, start_time)

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        return [name for name in names if not name.endswith(("cls_token", "mask_token", "pos_embed"))]

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_DIR)
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging, folder), ignore_errors=True)  # left over from a killed run
        # the stock implementation writes model, optimizer, scheduler, RNG and trainer state into the staging folder
        self._get_output_dir = lambda trial: staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            final = os.path.join(run_dir, folder)
            replaced = os.path.join(staging, f"{folder}.replaced")
            # kill -9 keeps the page cache, a power cut does not: the files must be on disk before the rename makes
            # the checkpoint visible, or `checkpoint-N` could come back holding empty or truncated files
            _fsync_tree(os.path.join(staging, folder))
            if os.path.exists(final):  # saving the same step again: move the old one aside, never delete first
                os.replace(final, replaced)
            os.replace(os.path.join(staging, folder), final)
            _fsync_directory(run_dir)
            shutil.rmtree(replaced, ignore_errors=True)
            _rotate_checkpoints(run_dir, staging, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


def _rotate_checkpoints(run_dir: str, staging: str, save_total_limit: int | None) -> None:
    """transformers' `rotate_checkpoints` (keep the newest `save_total_limit`), but each old checkpoint is renamed
    into staging before it is deleted: a kill during the deletion never leaves a half-deleted `checkpoint-N`."""
    if not save_total_limit or save_total_limit <= 0:
        return
    checkpoints = sort_checkpoints(run_dir, PREFIX_CHECKPOINT_DIR, use_mtime=False)
    for old in checkpoints[: max(len(checkpoints) - save_total_limit, 0)]:
        doomed = os.path.join(staging, f"{os.path.basename(old)}.deleted")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _fsync_tree(path: str) -> None:
    """fsync every file under `path`, then the folders that hold them."""
    for directory, _, filenames in os.walk(path):
        for filename in filenames:
            descriptor = os.open(os.path.join(directory, filename), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _fsync_directory(directory)


def _fsync_directory(path: str) -> None:
    """Make a rename durable: fsync the directory that holds the renamed entry."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
