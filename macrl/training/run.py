"""A whole pre-training run, as `macrl-pretrain` does it: data, model, `Trainer`, kNN, pictures, release, push.

`run_pretraining(PretrainingArguments(...))` is the library face of the command; it raises typed errors
(`PretrainingError` and the data, checkpoint and device errors it meets, all `InputError`s; `UnreadableImageError`,
`HubPushError`) and logs what it does to the `macrl` logger; it never prints.

OUTPUT_DIR receives: the full pre-training model (`save_pretrained`: main and momentum branches), `encoder/` (the
`MACRLModel` users download, with its image processor and model card), `checkpoints/`, `logs/train_log.jsonl`,
`pictures/` (loss curves, reconstructions, attention maps, feature PCA) and `results.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import set_seed

from ..data import UnreadableImageError, build_eval_transform
from ..data.shards import UnreadableShardError
from ..devices import resolve_device
from ..errors import InputError, first_line
from ..image_processing_macrl import MACRLImageProcessor
from ..modeling_macrl import MACRLForPreTraining
from ..openmp_waiting import openmp_wait_policy
from ..precision import cpu_runs_bf16_fast, slow_precision_warning
from ..presets import load_config
from ..visualization import encoder_pictures
from .arguments import PretrainingArguments
from .budget import STEP_HEADROOM, fit_steps_to_budget, probe_step_seconds
from .callbacks import DataEpochCallback, FirstStepTimer, JsonlLogCallback, PushCheckpointCallback
from .checkpoints import resolve_checkpoint
from .data import build_augmentation, build_pretraining_data
from .final_evaluation import final_evaluation
from .knn_monitor import KnnMonitor
from .pictures import plot_loss_curves, reconstruction_grid
from .release import EncoderRelease
from .trainer import MACRLPretrainer, build_training_arguments, num_workers, world_size

__all__ = ["PretrainingError", "run_pretraining"]

logger = logging.getLogger(__name__)


class PretrainingError(InputError):
    """A run's inputs cannot be used together (a batch not divisible by the processes, too few images, a bad
    config or augmentation); the message names the flag."""


def _precisions_to_time(bf16: bool | None, device: torch.device) -> tuple[bool, ...]:
    """The precisions a budget run times before it starts: the one asked for; unset, bf16 on a GPU that has it,
    fp32 and bf16 on a CPU with bf16 kernels, fp32 elsewhere (a bf16 probe on such a CPU would cost minutes)."""
    if bf16 is not None:
        return (bf16,)
    if device.type == "cuda":
        return (torch.cuda.is_bf16_supported(),)
    return (False, True) if device.type == "cpu" and cpu_runs_bf16_fast() else (False,)


def _last_logged(trainer: MACRLPretrainer, key: str) -> float | None:
    return next((record[key] for record in reversed(trainer.state.log_history) if key in record), None)


def run_pretraining(args: PretrainingArguments) -> dict:
    """The whole job; returns the results written to OUTPUT_DIR/results.json ({} on processes other than rank 0)."""
    started = time.monotonic()
    output_dir = Path(args.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    if args.batch_size % world_size():
        raise PretrainingError(f"--batch-size {args.batch_size} is not divisible by the {world_size()} processes")
    if args.gradient_accumulation_steps < 1 or args.batch_size % (world_size() * args.gradient_accumulation_steps):
        raise PretrainingError(
            f"--batch-size {args.batch_size} is not divisible into {args.gradient_accumulation_steps} micro-batches "
            f"on each of the {world_size()} processes (--gradient-accumulation-steps)"
        )
    try:
        config = load_config(args.config, **args.config_changes())
    except (ValueError, StrictDataclassError) as error:  # JSONDecodeError is a ValueError
        raise PretrainingError(f"--config: {first_line(error)}") from error
    try:
        augmentation = build_augmentation(args, config)
    except (ValueError, TypeError) as error:  # TypeError: a field given a value of the wrong shape
        raise PretrainingError(f"--augmentation: {first_line(error)}") from error
    try:
        trackers = args.trackers()
    except ValueError as error:
        raise PretrainingError(f"--report-to: {error}") from error
    if args.fp16 and args.bf16:
        raise PretrainingError("--fp16 and --bf16 ask for two precisions; choose one")
    if args.eval_data is not None and not args.knn and args.knn_every <= 0:
        raise PretrainingError(
            "--eval-data with --no-knn and no --knn-every: nothing would be evaluated on it; drop one of them"
        )
    if args.eval_split is not None and args.eval_data is None:
        raise PretrainingError("--eval-split names a split of --eval-data, and there is no --eval-data")
    device = resolve_device(args.device)
    # unset, the data-loading workers are the device's default (`--num-workers`), the same for the probe and the run
    args = dataclasses.replace(args, num_workers=num_workers(args, device))
    resume_from = resolve_checkpoint(args.resume, checkpoint_dir, config)
    data = build_pretraining_data(args, config, augmentation)
    if data.num_images is not None and data.num_images < args.batch_size:
        raise PretrainingError(f"--data has {data.num_images} images, fewer than one batch of {args.batch_size}")
    if data.skipped:
        logger.info("skipping %d unreadable images, e.g. %s: %s", len(data.skipped), *data.skipped[0])

    set_seed(args.seed)
    model = MACRLForPreTraining(config)
    for flag in ("bf16", "fp16"):
        if getattr(args, flag) and (warning := slow_precision_warning(device, f"--{flag}", flag)):
            logger.warning(warning)
    # --fp16 is the precision: bf16 stays off (the Trainer takes one of the two)
    max_steps, bf16 = args.max_steps, False if args.fp16 else args.bf16
    if data.streamed and max_steps <= 0 and args.max_minutes is None:
        if data.num_images is None:
            raise PretrainingError(
                f"--data {args.data} is a stream of unknown length: set the run's length with --max-steps or "
                "--max-minutes"
            )
        max_steps = math.ceil(args.epochs * (data.num_images // args.batch_size))
    if resume_from is not None:
        saved = json.loads(Path(resume_from, "trainer_state.json").read_text())
        clock = saved.get("stateful_callbacks", {}).get("TrainingClock", {}).get("attributes", {})
        if max_steps <= 0 and args.max_minutes is not None:
            max_steps = saved["max_steps"]
        if bf16 is None:  # the precision the run chose at its start
            bf16 = clock.get("bf16")
        spent = clock.get("spent_seconds")
        budget = f", {spent / 60:.1f} of {args.max_minutes:g} minutes spent" if spent and args.max_minutes else ""
        logger.info("resuming %s at step %d of %d%s", resume_from, saved["global_step"], saved["max_steps"], budget)
    elif max_steps <= 0 and args.max_minutes is not None:
        micro_batches = args.gradient_accumulation_steps  # a step is this many timed micro-batch steps
        micro_seconds = probe_step_seconds(
            model, data.train, data.probe_collator(), batch_size=args.batch_size // (world_size() * micro_batches),
            num_workers=args.num_workers, precisions=_precisions_to_time(bf16, device), fp16=args.fp16,
            device=device,
        )
        timed = {choice: micro_batches * seconds for choice, seconds in micro_seconds.items()}
        bf16 = min(timed, key=timed.get)
        if len(timed) > 1:
            logger.info("a step takes %.3f s in bf16, %.3f s in fp32: training in %s", timed[True], timed[False],
                        "bf16" if bf16 else "fp32")
        fitted = fit_steps_to_budget(args.max_minutes, timed[bf16])
        max_steps = math.ceil(fitted * STEP_HEADROOM)
        logger.info(
            "--max-minutes %g: %d steps of %d images fit the budget; the schedules follow the clock (at most %d "
            "steps)", args.max_minutes, fitted, args.batch_size, max_steps,
        )
    if bf16 is None:  # a step-based run: bf16 where the accelerator has it, the CPU's result stays fp32's
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    args = dataclasses.replace(args, bf16=bool(bf16))

    training_args = build_training_arguments(args, checkpoint_dir, max_steps, config, device, streamed=data.streamed)
    release = EncoderRelease(
        folder=output_dir / "encoder",
        processor=MACRLImageProcessor(
            size={"height": config.image_size, "width": config.image_size},
            num_channels=config.num_channels,
            image_mean=list(data.augmentation.mean),
            image_std=list(data.augmentation.std),
        ),
        dataset_name=data.dataset_name,
        evaluation_split=data.eval_split,
        evaluation_dataset=data.eval_dataset_name,
        facts={
            "dataset": data.dataset_name,
            "num_images": data.num_images,
            "batch_size": args.batch_size,
            "learning_rate": training_args.learning_rate,
            "hardware": f"{world_size()} x {device.type}",
        },
        repo_id=args.push_to_hub,
        private=args.private,
    )
    first_step = FirstStepTimer(started)
    callbacks = [JsonlLogCallback(output_dir / "logs" / "train_log.jsonl"), first_step]
    if not data.streamed:  # a stream counts its own epochs
        callbacks.insert(0, DataEpochCallback(data.train))
    if "tensorboard" in trackers:  # its own folder: the Trainer's output_dir is the checkpoints' staging folder
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(output_dir / "logs" / "tensorboard"))))
    monitor = None
    if args.knn_every > 0:
        if (sources := data.labelled_evaluation()) is None:
            logger.warning("--knn-every: the data has no labelled held-out images (see --eval-data); the kNN monitor "
                           "is off")
        else:
            monitor = KnnMonitor(
                release.processor, *sources,
                every=args.knn_every, images=args.knn_monitor_images, seed=args.seed, device=device,
                skip_unreadable=args.skip_unreadable,
            )
    if args.push_to_hub and args.push_checkpoints:

        def export_and_push(model: MACRLForPreTraining, step: int) -> str:
            release.export(model, {"steps": step})
            return release.push(f"Encoder at step {step}")

        callbacks.append(PushCheckpointCallback(export_and_push))
    trainer = MACRLPretrainer(
        model,
        training_args,
        train_dataset=data.train,
        data_collator=data.collator,
        callbacks=callbacks,
        global_batch_size=args.batch_size,
        save_total_limit=args.save_total_limit,
        max_minutes=args.max_minutes,
        bf16=args.bf16,
        monitor=monitor,
    )
    cpu_started = time.process_time()
    try:
        train_output = trainer.train(resume_from_checkpoint=resume_from)
    except (UnreadableImageError, UnreadableShardError) as error:
        raise type(error)(f"{first_line(error)}; the checkpoints so far are kept in {checkpoint_dir}") from error
    cpu_seconds = time.process_time() - cpu_started  # every thread of this process: the work, and any spinning
    skipped = trainer.skipped_unreadable()  # before rank 0 goes its own way: every process takes part
    if not trainer.is_world_process_zero():
        return {}
    step, last = trainer.state.global_step, trainer.state.max_steps
    if trainer.clock.stopped_by_budget:
        logger.info("the %g-minute budget ended the run at step %d (of at most %d)", args.max_minutes, step, last)
    else:
        logger.info("the run ended at its last step, %d", step)

    model = trainer.model.eval()
    model.save_pretrained(output_dir)  # the full pre-training model, both branches
    epochs = trainer.state.epoch or 0.0
    if data.streamed:  # the Trainer cannot count a stream's epochs
        epochs = step * args.batch_size / data.num_images if data.num_images else None
    results: dict = {
        "steps": trainer.state.global_step,
        "epochs": round(epochs, 3) if epochs is not None else None,
        "train_loss": round(train_output.training_loss, 4),
        "training_minutes": round(train_output.metrics.get("train_runtime", 0.0) / 60, 2),
        "training_seconds": round(train_output.metrics.get("train_runtime", 0.0), 2),
        "images_per_second": round(train_output.metrics.get("train_samples_per_second", 0.0), 1),
        "training_cpu_seconds": round(cpu_seconds, 2),
        "stopped_by_time_budget": trainer.clock.stopped_by_budget,
        "bf16": args.bf16,
        "fp16": args.fp16,
        "num_workers": args.num_workers,
        "omp_wait_policy": openmp_wait_policy(),
        "seconds_to_first_step": None if first_step.seconds is None else round(first_step.seconds, 2),
        "final_learning_rate": _last_logged(trainer, "learning_rate"),
        "final_momentum": trainer.momentum_update.momentum,
        "augmentation": dataclasses.asdict(data.augmentation),
    }
    if skipped is not None:
        results["skipped_unreadable"] = skipped
        if skipped:
            logger.info("skipped %d unreadable images or truncated shard ends", skipped)
    if monitor is not None:
        results["knn_monitor_seconds"] = round(monitor.seconds, 2)
        results["knn_monitor_last"] = monitor.last
    evaluation, evaluation_error = None, None
    if args.knn:
        try:
            evaluation = final_evaluation(
                model.macrl, release.processor, data, device,
                linear_probe=args.linear_probe, floor=args.raw_pixel_floor, seed=args.seed,
                num_workers=args.num_workers, skip_unreadable=args.skip_unreadable,
                label_fractions=tuple(args.label_fractions), dinov2_linear=args.dinov2_linear,
            )
        except UnreadableImageError as error:  # after the training: write the encoder and results first, then say it
            evaluation_error = error
    if evaluation:  # and what it is measured on: a split of --data, or of --eval-data
        results.update(evaluation, eval_split=data.eval_split)
        if data.eval_data is not None:
            results["eval_data"] = data.eval_data

    pictures = output_dir / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / "logs" / "train_log.jsonl"
    if log_path.exists():
        plot_loss_curves(log_path, pictures / "loss_curves.png")
    # fixed evaluation images, so the pictures of two runs are comparable
    transform = build_eval_transform(data.augmentation)
    if images := data.picture_images(8):  # none: every one of them unreadable
        samples = torch.stack([transform(image) for image in images])
        mean, std = list(data.augmentation.mean), list(data.augmentation.std)
        reconstruction_grid(model.cpu(), samples, mean, std, pictures / "reconstructions.png", seed=args.seed)
        encoder_pictures(model, samples, mean, std, pictures)  # attention maps, feature PCA

    progress = {"steps": results["steps"], "epochs": results["epochs"], "minutes": results["training_minutes"]}
    release.export(model, progress, evaluation)
    results["total_minutes"] = round((time.monotonic() - started) / 60, 2)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.push_to_hub:
        results["hub_commit"] = release.push("Upload MACRL encoder")
    if evaluation_error is not None:
        raise UnreadableImageError(
            f"the evaluation at the end: {first_line(evaluation_error)}; the encoder, pictures and results.json are "
            f"written in {output_dir} without it"
        ) from evaluation_error
    return results
