"""The plan of a pre-training run: every decision it makes, each made once and in one place, before it trains.

`plan_run(args)` checks the flags against each other and decides what they fix (`RunPlan`): the model config, the
augmentations, the device, how many processes train together and how many data-loading workers each has, the
optimiser's learning rate, the trackers, the checkpoint a `--resume` continues (`ResumePoint`) and the signals that
stop the run with a checkpoint. `plan_steps`
then decides the run's length in steps and its precision (`StepPlan`), for which a time budget times real steps on
the opened data and the new model. `build_training_arguments` turns both into the stock `TrainingArguments`.

Below the run, nothing reads the flags: the data builders get `DataOptions`, the Trainer its `TrainingArguments` and
`RunCallbacks`, the rest plain values.
"""

from __future__ import annotations

import logging
import math
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

from ..configuration_macrl import MACRLConfig
from ..data import AugmentationConfig
from ..devices import default_num_workers, has_fused_adamw, has_tf32, resolve_device
from ..distributed import process_layout
from ..errors import InputError, first_line
from ..evaluation.finetune import activation_checkpointing_arguments
from ..precision import cpu_runs_bf16_fast, slow_precision_warning
from ..presets import base_learning_rate, load_config
from .arguments import PretrainingArguments
from .budget import STEP_HEADROOM, ClockState, TrainingClock, fit_steps_to_budget, probe_step_seconds
from .checkpoints import STAGING_DIR, resolve_checkpoint
from .data import DataOptions, PretrainingData, build_augmentation
from .stop_signals import parse_signals

__all__ = [
    "PretrainingError",
    "ResumePoint",
    "RunPlan",
    "StepPlan",
    "build_training_arguments",
    "plan_run",
    "plan_steps",
]

logger = logging.getLogger(__name__)


class PretrainingError(InputError):
    """A run's inputs cannot be used together (a batch not divisible by the processes, too few images, a bad
    config or augmentation); the message names the flag."""


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a `--resume` continues, and what the run that wrote it had reached and decided."""

    checkpoint: str
    step: int  # the optimiser steps done
    max_steps: int  # the run's length in steps (a budget run's fitted cap)
    clock: ClockState  # the training time spent, and the precision the run chose at its start

    @classmethod
    def read(cls, checkpoint: str) -> ResumePoint:
        state = TrainerState.load_from_json(str(Path(checkpoint, TRAINER_STATE_NAME)))
        return cls(checkpoint, state.global_step, state.max_steps, TrainingClock.saved_in(state) or ClockState())


@dataclass(frozen=True)
class RunPlan:
    """What the flags decide for a run (`plan_run`)."""

    output_dir: Path
    config: MACRLConfig
    augmentation: AugmentationConfig  # as asked; whether it runs per batch is the data's (`PretrainingData`)
    data: DataOptions
    device: torch.device
    processes: int  # that train together
    num_workers: int  # data-loading workers of each process
    learning_rate: float  # the optimiser's: the base learning rate x batch size / 256
    trackers: tuple[str, ...]  # the experiment trackers `--report-to` names
    resume: ResumePoint | None
    stop_signals: tuple[signal.Signals, ...] = ()  # the signals that stop the run after its step, with a checkpoint

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.output_dir / "logs" / "train_log.jsonl"


@dataclass(frozen=True)
class StepPlan:
    """The run's length and precision (`plan_steps`)."""

    max_steps: int  # the Trainer's; for a budget run a cap `STEP_HEADROOM` times the fitted steps
    bf16: bool  # bf16 autocast (`--fp16`: False, and fp16 is the precision)


def plan_run(args: PretrainingArguments, device: torch.device | None = None) -> RunPlan:
    """Check the flags and decide what they fix (module docstring); `device` (default: `--device` resolved) is for
    planning a run on another device than this machine has.

    Raises:
        PretrainingError: flags that cannot be used together, a config or augmentation that does not validate.
        DeviceError: `--device` names a device this machine does not have.
        CheckpointError: `--resume` names no complete checkpoint of this config, or a fresh run would write over
            another's checkpoints.
    """
    processes = process_layout().processes
    if args.batch_size % processes:
        raise PretrainingError(f"--batch-size {args.batch_size} is not divisible by the {processes} processes")
    if args.gradient_accumulation_steps < 1 or args.batch_size % (processes * args.gradient_accumulation_steps):
        raise PretrainingError(
            f"--batch-size {args.batch_size} is not divisible into {args.gradient_accumulation_steps} micro-batches "
            f"on each of the {processes} processes (--gradient-accumulation-steps)"
        )
    try:
        config = load_config(args.config, **args.config_changes())
    except (ValueError, StrictDataclassError) as error:  # JSONDecodeError is a ValueError
        raise PretrainingError(f"--config: {first_line(error)}") from error
    try:
        augmentation = build_augmentation(config, args.data, args.augmentation_changes())
    except (ValueError, TypeError) as error:  # TypeError: a field given a value of the wrong shape
        raise PretrainingError(f"--augmentation: {first_line(error)}") from error
    try:
        trackers = tuple(args.trackers())
    except ValueError as error:
        raise PretrainingError(f"--report-to: {error}") from error
    if args.fp16 and args.bf16:
        raise PretrainingError("--fp16 and --bf16 ask for two precisions; choose one")
    try:
        stop_signals = parse_signals(args.stop_signals)
    except ValueError as error:
        raise PretrainingError(f"--stop-signals: {error}") from error
    if args.eval_train_images < 0:
        raise PretrainingError(f"--eval-train-images must be >= 0 (0: all), got {args.eval_train_images}")
    if args.eval_data is not None and not args.knn and args.knn_every <= 0:
        raise PretrainingError(
            "--eval-data with --no-knn and no --knn-every: nothing would be evaluated on it; drop one of them"
        )
    if args.eval_split is not None and args.eval_data is None:
        raise PretrainingError("--eval-split names a split of --eval-data, and there is no --eval-data")
    device = resolve_device(args.device) if device is None else device
    for flag in ("bf16", "fp16"):
        if getattr(args, flag) and (warning := slow_precision_warning(device, f"--{flag}", flag)):
            logger.warning(warning)
    # unset, the device's default for each of the processes on this machine: the same for the probe and the run
    workers = args.num_workers
    if workers is None:
        workers = default_num_workers(device, process_layout().local_processes)
    output_dir = Path(args.output_dir)
    checkpoint = resolve_checkpoint(args.resume, output_dir / "checkpoints", config)
    resume = None if checkpoint is None else ResumePoint.read(checkpoint)
    if resume is not None:
        spent = resume.clock.spent_seconds
        budget = f", {spent / 60:.1f} of {args.max_minutes:g} minutes spent" if spent and args.max_minutes else ""
        logger.info("resuming %s at step %d of %d%s", checkpoint, resume.step, resume.max_steps, budget)
    base_lr = args.lr if args.lr is not None else base_learning_rate(args.config)
    return RunPlan(
        output_dir=output_dir,
        config=config,
        augmentation=augmentation,
        data=DataOptions(
            data=args.data, eval_data=args.eval_data, eval_split=args.eval_split, eval_images=args.eval_images,
            hold_out=args.knn, seed=args.seed, streaming=args.streaming, shuffle_buffer=args.shuffle_buffer,
            image_column=args.image_column, label_column=args.label_column, limit_images=args.limit_images,
            skip_unreadable=args.skip_unreadable, num_workers=workers, train_labels=args.online_probe,
        ),
        device=device,
        processes=processes,
        num_workers=workers,
        learning_rate=base_lr * args.batch_size / 256,
        trackers=trackers,
        resume=resume,
        stop_signals=stop_signals,
    )


def plan_steps(args: PretrainingArguments, plan: RunPlan, data: PretrainingData, model) -> StepPlan:
    """The run's length in steps and its precision, each decided here:

    - length: `--max-steps`; else a stream's `--epochs` of its known length; else, for `--max-minutes`, the cap the
      run fitted at its start (resumed) or the steps a timing of real steps of `model` on `data` fits to the budget
      (with `STEP_HEADROOM`: the clock then ends the schedules), else the Trainer's `--epochs`;
    - precision: `--fp16` or `--bf16` as given; else the one a resumed run chose at its start; else, for a budget
      run on a device where both may pay, the faster in that timing; else bf16 on a GPU that has it, fp32 elsewhere
      (a CPU's result stays fp32's).

    Raises:
        PretrainingError: a stream of unknown length without `--max-steps` or `--max-minutes`.
    """
    bf16 = False if args.fp16 else args.bf16  # --fp16 is the precision: bf16 stays off (the Trainer takes one)
    if bf16 is None and plan.resume is not None:
        bf16 = plan.resume.clock.bf16
    max_steps = args.max_steps
    if max_steps <= 0 and args.max_minutes is None and data.streamed:
        if data.num_images is None:
            raise PretrainingError(
                f"--data {args.data} is a stream of unknown length: set the run's length with --max-steps or "
                "--max-minutes"
            )
        max_steps = math.ceil(args.epochs * (data.num_images // args.batch_size))
    elif max_steps <= 0 and args.max_minutes is not None:
        if plan.resume is not None:
            max_steps = plan.resume.max_steps
        else:
            max_steps, bf16 = _fit_to_budget(args, plan, data, model, bf16)
    if bf16 is None:
        bf16 = plan.device.type == "cuda" and torch.cuda.is_bf16_supported()
    return StepPlan(max_steps=max_steps, bf16=bool(bf16))


def _fit_to_budget(args: PretrainingArguments, plan: RunPlan, data: PretrainingData, model, bf16: bool | None):
    """(max_steps, bf16) of a fresh budget run: real steps of each precision in question timed, the faster one
    taken, and the steps of it that fit `--max-minutes`, with headroom."""
    micro_batches = args.gradient_accumulation_steps  # a step is this many timed micro-batch steps
    micro_seconds = probe_step_seconds(
        model, data.train, data.probe_collator(), batch_size=args.batch_size // (plan.processes * micro_batches),
        num_workers=plan.num_workers, precisions=_precisions_to_time(bf16, plan.device), fp16=args.fp16,
        device=plan.device,
    )
    timed = {choice: micro_batches * seconds for choice, seconds in micro_seconds.items()}
    bf16 = min(timed, key=timed.get)
    if len(timed) > 1:
        logger.info("a step takes %.3f s in bf16, %.3f s in fp32: training in %s", timed[True], timed[False],
                    "bf16" if bf16 else "fp32")
    fitted = fit_steps_to_budget(args.max_minutes, timed[bf16])
    max_steps = math.ceil(fitted * STEP_HEADROOM)
    logger.info(
        "--max-minutes %g: %d steps of %d images fit the budget; the schedules follow the clock (at most %d steps)",
        args.max_minutes, fitted, args.batch_size, max_steps,
    )
    return max_steps, bf16


def _precisions_to_time(bf16: bool | None, device: torch.device) -> tuple[bool, ...]:
    """The precisions a budget run times before it starts: the one asked for; unset, bf16 on a GPU that has it,
    fp32 and bf16 on a CPU with bf16 kernels, fp32 elsewhere (a bf16 probe on such a CPU would cost minutes)."""
    if bf16 is not None:
        return (bf16,)
    if device.type == "cuda":
        return (torch.cuda.is_bf16_supported(),)
    return (False, True) if device.type == "cpu" and cpu_runs_bf16_fast() else (False,)


def build_training_arguments(
    args: PretrainingArguments, plan: RunPlan, steps: StepPlan, streamed: bool = False
) -> TrainingArguments:
    """The stock `TrainingArguments` of a run: MAE's optimiser settings, the plan's learning rate, checkpoints staged
    under the plan's checkpoint folder (`AtomicCheckpoints` keeps `--save-total-limit` of them), and what the device
    offers: on CUDA pinned host memory with non-blocking copies, TF32 matmuls (Ampere and newer), the fused AdamW,
    data-loading workers for the GPU; `--gradient-checkpointing` as the Trainer turns it on. A `streamed` run resumes its data from the checkpoint's data position, not by
    the stock Trainer's skipping (`ignore_data_skip`)."""
    device = plan.device
    accelerated = device.type != "cpu"
    cuda = device.type == "cuda"
    # a zero-weight head gets no gradient, which DDP must be told about
    unused_parameters = plan.config.reconstruction_weight == 0 or plan.config.contrastive_weight == 0
    return TrainingArguments(
        output_dir=str(plan.checkpoint_dir / STAGING_DIR),
        per_device_train_batch_size=args.batch_size // (plan.processes * args.gradient_accumulation_steps),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.epochs,
        max_steps=steps.max_steps,
        learning_rate=plan.learning_rate,
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
        dataloader_num_workers=plan.num_workers,
        # page-locked batches, copied while the GPU still runs the previous step
        dataloader_pin_memory=cuda,
        accelerator_config={"non_blocking": cuda},
        dataloader_drop_last=True,  # BatchNorm and InfoNCE want full, equal batches on every process
        dataloader_persistent_workers=plan.num_workers > 0,
        remove_unused_columns=False,
        report_to=[tracker for tracker in plan.trackers if tracker != "tensorboard"] or "none",
        # without use_cpu, accelerate treats several CPU processes as one and DDP never syncs them; with it False,
        # accelerate takes the accelerator there is (cuda, else mps)
        use_cpu=not accelerated,
        bf16=steps.bf16,
        fp16=args.fp16,
        # fp32 matmuls (and what autocast leaves in fp32) on TF32 tensor cores; None leaves torch's setting alone,
        # where True would raise on a device without them
        tf32=True if has_tf32(device) else None,
        torch_compile=args.compile,
        ddp_find_unused_parameters=unused_parameters,
        ddp_backend="gloo" if plan.processes > 1 and not accelerated else None,
        disable_tqdm=False,
        log_level="warning",
        ignore_data_skip=streamed,
        **activation_checkpointing_arguments(args.gradient_checkpointing),
    )
