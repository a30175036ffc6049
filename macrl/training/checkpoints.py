"""Checkpoints of a pre-training run: written whole or not at all, checked before a resume, never mixed across runs.

The stock `Trainer` writes every checkpoint into `checkpoints/.staging/` (its `output_dir`); `AtomicCheckpoints`
(a callback, run right after each save) fsyncs it and renames it into `checkpoints/`, then retires old ones by
renaming them back into staging before deleting them. So a kill at any moment leaves only complete `checkpoint-N`
folders where `--resume` looks, and whatever a killed run left in staging is cleared when the next run starts.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, sort_checkpoints

from ..configuration_macrl import MACRLConfig
from ..errors import InputError

__all__ = [
    "STAGING_DIR",
    "AtomicCheckpoints",
    "CheckpointError",
    "checkpoint_problem",
    "last_complete_checkpoint",
    "resolve_checkpoint",
]

STAGING_DIR = ".staging"
# what the stock Trainer writes into a checkpoint of a MACRL run (plus rng_state.pth or rng_state_<rank>.pth)
CHECKPOINT_JSON_FILES = ("trainer_state.json", "config.json")
CHECKPOINT_TORCH_FILES = ("optimizer.pt", "scheduler.pt")


class CheckpointError(InputError):
    """A checkpoint cannot be resumed from, or a new run would write over an earlier one's; the message says which
    and why."""


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be resumed from exactly (e.g. "no trainer_state.json"), or None if it is complete.

    Checkpoints are renamed into place only once complete, so this catches folders damaged or put together
    elsewhere: an interrupted copy, a truncated file, a hand-made `checkpoint-N`. Reads only headers.
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


def last_complete_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `checkpoint_dir` that `checkpoint_problem` finds complete (None: there is none): what
    a failed write or a stop leaves to continue from."""
    if not Path(checkpoint_dir).is_dir():
        return None
    for folder in reversed(sort_checkpoints(str(checkpoint_dir), PREFIX_CHECKPOINT_DIR, use_mtime=False)):
        if checkpoint_problem(folder) is None:
            return Path(folder)
    return None


def resolve_checkpoint(resume: str | None, checkpoint_dir: Path, config: MACRLConfig) -> str | None:
    """The checkpoint to resume from (None for a fresh run).

    `resume` is None (a fresh run: refused where `checkpoint_dir` already holds an earlier run's checkpoints),
    `"latest"` (the newest checkpoint in `checkpoint_dir`) or a checkpoint folder, which must be complete and
    trained with the same model config.

    Raises:
        CheckpointError: why the run cannot start from there.
    """
    existing = get_last_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
    if resume is None:
        if existing is not None:
            raise CheckpointError(
                f"{checkpoint_dir} already holds checkpoints of an earlier run (newest: {Path(existing).name}); "
                "pass --resume to continue it, or choose another --output-dir"
            )
        return None
    checkpoint = existing if resume == "latest" else resume
    if checkpoint is None:
        raise CheckpointError(f"--resume: no checkpoint to resume from in {checkpoint_dir}")
    problem = checkpoint_problem(checkpoint)
    if problem is not None:  # refused, not skipped: resuming from an older step silently would be another run
        raise CheckpointError(f"--resume: {checkpoint} is not a complete checkpoint ({problem})")
    saved = MACRLConfig.from_pretrained(checkpoint)
    changed = sorted(key for key in MACRLConfig.macrl_fields() if getattr(saved, key) != getattr(config, key))
    if changed:
        details = ", ".join(f"{key}: {getattr(saved, key)!r} -> {getattr(config, key)!r}" for key in changed)
        raise CheckpointError(f"--resume: {checkpoint} was trained with a different model config ({details})")
    return checkpoint


class AtomicCheckpoints(TrainerCallback):
    """Moves each checkpoint the stock `Trainer` wrote into its staging `output_dir` to `checkpoint_dir`, whole,
    and keeps the newest `save_total_limit` there (module docstring)."""

    def __init__(self, checkpoint_dir: str | os.PathLike, save_total_limit: int | None):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.save_total_limit = save_total_limit

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # whatever a killed run left in staging is never needed: start clean
            shutil.rmtree(args.output_dir, ignore_errors=True)
        _barrier()

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its RNG state
        if state.is_world_process_zero:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            staged = Path(args.output_dir) / folder
            final = self.checkpoint_dir / folder
            replaced = Path(args.output_dir) / f"{folder}.replaced"
            # kill -9 keeps the page cache, a power cut does not: the files must be on disk before the rename makes
            # the checkpoint visible, or `checkpoint-N` could come back holding empty or truncated files
            _fsync_tree(staged)
            if final.exists():  # saving the same step again: move the old one aside, never delete first
                os.replace(final, replaced)
            os.replace(staged, final)
            _fsync_directory(self.checkpoint_dir)
            shutil.rmtree(replaced, ignore_errors=True)
            self._rotate(Path(args.output_dir))
        _barrier()

    def _rotate(self, staging: Path) -> None:
        """transformers' `rotate_checkpoints` (keep the newest `save_total_limit`), but each old checkpoint is renamed
        into staging before it is deleted: a kill during the deletion never leaves a half-deleted `checkpoint-N`."""
        if not self.save_total_limit or self.save_total_limit <= 0:
            return
        checkpoints = sort_checkpoints(str(self.checkpoint_dir), PREFIX_CHECKPOINT_DIR, use_mtime=False)
        for old in checkpoints[: max(len(checkpoints) - self.save_total_limit, 0)]:
            doomed = staging / f"{Path(old).name}.deleted"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then the folders that hold them."""
    for directory, _, filenames in os.walk(path):
        for filename in filenames:
            descriptor = os.open(os.path.join(directory, filename), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _fsync_directory(Path(directory))


def _fsync_directory(path: Path) -> None:
    """Make a rename durable: fsync the directory that holds the renamed entry."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
