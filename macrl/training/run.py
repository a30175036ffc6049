"""A whole pre-training run, as `macrl-pretrain` does it: plan, build, train, finish.

`run_pretraining(PretrainingArguments(...))` is the library face of the command; it raises typed errors
(`PretrainingError` and the data, checkpoint and device errors it meets, all `InputError`s; `UnreadableImageError`,
`HubPushError`; `OutputWriteError` for a failed write, a full disk, naming what is safe; `RunStopped` after a stop
signal, naming the checkpoint it wrote) and logs what it does to the `macrl` logger; it never prints.

OUTPUT_DIR receives: the full pre-training model (`save_pretrained`: main and momentum branches), `encoder/` (the
`MACRLModel` users download, with its image processor and model card), `checkpoints/`, `logs/train_log.jsonl`,
`pictures/` (loss curves, reconstructions, attention maps, feature PCA) and `results.json`. An `--online-probe`
classifier lives in the checkpoints only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..atomic_files import atomic_path
from ..data import UnreadableImageError, build_eval_transform
from ..data.shards import UnreadableShardError
from ..data.streaming_two_view_dataset import StreamPositions
from ..distributed import leave_process_group
from ..errors import OutputWriteError, RunStopped, first_line
from ..evaluation.finetune import enable_checkpointing, is_checkpointing
from ..evaluation.labels import num_classes_of
from ..image_processing_macrl import MACRLImageProcessor
from ..modeling_macrl import MACRLForPreTraining
from ..openmp_waiting import openmp_waiting
from ..visualization import encoder_pictures
from ..write_failures import write_failure, writing
from .arguments import PretrainingArguments
from .budget import TrainingClock
from .callbacks import (
    DataEpochCallback,
    DataPositionCallback,
    FirstStepTimer,
    JsonlLogCallback,
    PushCheckpointCallback,
    RunCallbacks,
)
from .checkpoints import STAGING_DIR, AtomicCheckpoints, last_complete_checkpoint
from .data import PretrainingData, build_pretraining_data
from .final_evaluation import final_evaluation
from .knn_monitor import KnnMonitor
from .online_probe import OnlineProbe
from .pictures import plot_loss_curves, reconstruction_grid
from .plan import (
    PretrainingError,
    RunPlan,
    StepPlan,
    build_training_arguments,
    plan_run,
    plan_steps,
)
from .release import EncoderRelease
from .stop_signals import StopSignals
from .trainer import MACRLPretrainer

__all__ = ["PretrainingError", "run_pretraining"]

logger = logging.getLogger(__name__)


def run_pretraining(args: PretrainingArguments) -> dict:
    """The whole job; returns the results written to OUTPUT_DIR/results.json ({} on processes other than rank 0)."""
    started = time.monotonic()
    # plan: the flags checked and decided on, the data opened, the model built, its length and precision decided
    plan = plan_run(args)
    data = build_pretraining_data(plan.data, plan.config, plan.augmentation)
    if data.num_images is not None and data.num_images < args.batch_size:
        raise PretrainingError(f"--data has {data.num_images} images, fewer than one batch of {args.batch_size}")
    if data.skipped:
        logger.info("skipping %d unreadable images, e.g. %s: %s", len(data.skipped), *data.skipped[0])
    set_seed(args.seed)
    model = MACRLForPreTraining(plan.config)
    if args.gradient_checkpointing:  # before a budget's timing of real steps, so that it times the run's steps
        enable_checkpointing(model)
    steps = plan_steps(args, plan, data, model)

    # build: the Trainer's arguments, the release of the encoder, the callbacks, the Trainer
    training_args = build_training_arguments(args, plan, steps, streamed=data.streamed)
    release = _encoder_release(args, plan, data)
    callbacks = _callbacks(args, plan, steps, data, release, training_args, started)
    trainer = MACRLPretrainer(
        model, training_args, train_dataset=data.train, data_collator=data.collator, run_callbacks=callbacks,
        global_batch_size=args.batch_size,
    )

    # train
    checkpoint = None if plan.resume is None else plan.resume.checkpoint
    cpu_started = time.process_time()
    try:
        with callbacks.stop_signals.installed():
            train_output = trainer.train(resume_from_checkpoint=checkpoint)
    except (UnreadableImageError, UnreadableShardError) as error:
        raise type(error)(f"{first_line(error)}; the checkpoints so far are kept in {plan.checkpoint_dir}") from error
    except Exception as error:
        if (failed := _failed_write_in_training(plan, error)) is None:
            raise
        raise failed from error
    cpu_seconds = time.process_time() - cpu_started  # every thread of this process: the work, and any spinning
    stopped_by = callbacks.stop_signals.stopped_by  # every process agreed on it
    skipped = None if stopped_by is not None else trainer.skipped_unreadable()  # a collective: every process
    leave_process_group()  # the last collective is behind: rank 0 goes its own way, the others end
    if stopped_by is not None:
        step = callbacks.stop_signals.stopped_at
        written = plan.checkpoint_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        written = written if written.is_dir() else last_complete_checkpoint(plan.checkpoint_dir)
        raise RunStopped(f"stopped by {stopped_by.name} after step {step}; its checkpoint: {written}",
                         resume_from=written)
    if not trainer.is_world_process_zero():
        return {}

    # finish: save, evaluate, draw, export, write the results, push
    step = trainer.state.global_step
    if trainer.clock.stopped_by_budget:
        logger.info("the %g-minute budget ended the run at step %d (of at most %d)", args.max_minutes, step,
                    trainer.state.max_steps)
    else:
        logger.info("the run ended at its last step, %d", step)
    # a failed write from here on leaves the last checkpoint, which a --resume finishes from (training no more steps)
    last = last_complete_checkpoint(plan.checkpoint_dir)
    safe = (f"the training's last checkpoint, {last}, is complete and untouched (--resume from it trains no more "
            "steps and writes the outputs)" if last is not None else "")

    def writing_output(what: str, where: Path):
        return writing(what, where, safe=safe, resume_from=last)

    model = trainer.model.eval()
    with writing_output("the pre-training model", plan.output_dir):
        model.save_pretrained(plan.output_dir)  # the full pre-training model, both branches
    results = _training_results(args, plan, steps, data, trainer, train_output, callbacks, skipped, cpu_seconds)
    evaluation, evaluation_error = None, None
    if args.knn:
        try:
            evaluation = final_evaluation(
                model.macrl, release.processor, data, plan.device,
                linear_probe=args.linear_probe, floor=args.raw_pixel_floor, seed=args.seed,
                num_workers=plan.num_workers, skip_unreadable=args.skip_unreadable,
                label_fractions=tuple(args.label_fractions), dinov2_linear=args.dinov2_linear,
                memory_images=args.eval_train_images or None,
            )
        except UnreadableImageError as error:  # after the training: write the encoder and results first, then say it
            evaluation_error = error
    if evaluation:  # and what it is measured on: a split of --data, or of --eval-data
        results.update(evaluation, eval_split=data.eval_split)
        if data.eval_data is not None:
            results["eval_data"] = data.eval_data
    with writing_output("the pictures", plan.output_dir / "pictures"):
        _draw_pictures(plan, data, model, seed=args.seed)
    progress = {"steps": results["steps"], "epochs": results["epochs"], "minutes": results["training_minutes"]}
    with writing_output("the encoder", release.folder):
        release.export(model, progress, evaluation)
    results["total_minutes"] = round((time.monotonic() - started) / 60, 2)
    with writing_output("results.json", plan.output_dir / "results.json"), \
            atomic_path(plan.output_dir / "results.json") as written:  # a failed write leaves no half of a file
        written.write_text(json.dumps(results, indent=2) + "\n")
    if args.push_to_hub:
        results["hub_commit"] = release.push("Upload MACRL encoder")
    if evaluation_error is not None:
        raise UnreadableImageError(
            f"the evaluation at the end: {first_line(evaluation_error)}; the encoder, pictures and results.json are "
            f"written in {plan.output_dir} without it"
        ) from evaluation_error
    return results


def _failed_write_in_training(plan: RunPlan, error: Exception) -> OutputWriteError | None:
    """`error`, raised while training, as the failed write it may be, with what is safe: the training log
    (`JsonlLogCallback` names it), or the checkpoint being written in staging, which is removed (it never became a
    checkpoint); None for any other error."""
    staging = plan.checkpoint_dir / STAGING_DIR
    staged = [folder for folder in staging.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.name.split("-", 1)[1].isdigit()]
    if isinstance(error, OutputWriteError):
        message = first_line(error)
    elif staged and (failure := write_failure(error, staged[0])) is not None:
        message = f"could not write {staged[0].name} to {staged[0]}: {failure}; the partial checkpoint is removed"
        shutil.rmtree(staged[0], ignore_errors=True)  # after write_failure, which may read the free space left
    else:
        return None
    last = last_complete_checkpoint(plan.checkpoint_dir)
    safe = f"{last} is complete and untouched" if last is not None else "no checkpoint was written before it"
    return OutputWriteError(f"{message}; {safe}", resume_from=last)


def _encoder_release(args: PretrainingArguments, plan: RunPlan, data: PretrainingData) -> EncoderRelease:
    """How the run's encoder becomes `encoder/` (and a Hub repo), with what its model card says of the run."""
    return EncoderRelease(
        folder=plan.output_dir / "encoder",
        processor=MACRLImageProcessor(
            size={"height": plan.config.image_size, "width": plan.config.image_size},
            num_channels=plan.config.num_channels,
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
            "learning_rate": plan.learning_rate,
            "hardware": f"{plan.processes} x {plan.device.type}",
        },
        repo_id=args.push_to_hub,
        private=args.private,
    )


def _callbacks(
    args: PretrainingArguments, plan: RunPlan, steps: StepPlan, data: PretrainingData, release: EncoderRelease,
    training_args: TrainingArguments, started: float,
) -> RunCallbacks:
    """Every callback of the run (`RunCallbacks` keeps their order)."""
    data_position = None
    if data.streamed:  # a stream counts its own epochs, and keeps its readers' positions in each checkpoint
        data_position = DataPositionCallback(
            StreamPositions(), training_args.process_index, data.train.images_per_epoch, args.batch_size
        )
    tensorboard = None
    if "tensorboard" in plan.trackers:  # its own folder: the Trainer's output_dir is the checkpoints' staging folder
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback(SummaryWriter(log_dir=str(plan.output_dir / "logs" / "tensorboard")))
    push = None
    if args.push_to_hub and args.push_checkpoints:

        def export_and_push(model: MACRLForPreTraining, step: int) -> str:
            release.export(model, {"steps": step})
            return release.push(f"Encoder at step {step}")

        push = PushCheckpointCallback(export_and_push)
    return RunCallbacks(
        clock=TrainingClock(args.max_minutes, steps.bf16),
        checkpoints=AtomicCheckpoints(plan.checkpoint_dir, args.save_total_limit),
        stop_signals=StopSignals(plan.stop_signals),
        log=JsonlLogCallback(plan.log_path),
        data_epoch=None if data.streamed else DataEpochCallback(data.train),
        data_position=data_position,
        monitor=_knn_monitor(args, plan, data, release.processor),
        online_probe=_online_probe(args, plan, data, release.processor),
        first_step=FirstStepTimer(started),
        tensorboard=tensorboard,
        push=push,
    )


def _knn_monitor(
    args: PretrainingArguments, plan: RunPlan, data: PretrainingData, processor: MACRLImageProcessor
) -> KnnMonitor | None:
    """The `--knn-every` monitor, where the data has labelled evaluation images."""
    if args.knn_every <= 0:
        return None
    if (sources := data.labelled_evaluation()) is None:
        logger.warning("--knn-every: the data has no labelled held-out images (see --eval-data); the kNN monitor "
                       "is off")
        return None
    return KnnMonitor(
        processor, *sources, every=args.knn_every, images=args.knn_monitor_images, seed=args.seed,
        device=plan.device, skip_unreadable=args.skip_unreadable,
    )


def _online_probe(
    args: PretrainingArguments, plan: RunPlan, data: PretrainingData, processor: MACRLImageProcessor
) -> OnlineProbe | None:
    """The `--online-probe` classifier, where the training batches carry labels of the held-out images' classes."""
    if not args.online_probe:
        return None
    train, evaluation = data.train_source, data.labelled_evaluation()
    problem = None
    if train is None or train.labels is None:
        problem = "the training images have no labels (a stream, or a folder without class subfolders)"
    elif evaluation is None:
        problem = "the data has no labelled held-out images (see --eval-data)"
    elif train.class_names and evaluation[1].class_names and train.class_names != evaluation[1].class_names:
        problem = "the held-out images (--eval-data) have other classes than the training images"
    if problem is not None:
        logger.warning("--online-probe: %s; the online probe is off", problem)
        return None
    return OnlineProbe(
        processor, evaluation[1], hidden_size=plan.config.hidden_size, num_classes=num_classes_of(train, evaluation[1]),
        every=args.knn_every if args.knn_every > 0 else args.logging_steps, images=args.knn_monitor_images,
        device=plan.device, skip_unreadable=args.skip_unreadable,
    )


def _training_results(
    args: PretrainingArguments, plan: RunPlan, steps: StepPlan, data: PretrainingData, trainer: MACRLPretrainer,
    train_output, callbacks: RunCallbacks, skipped: int | None, cpu_seconds: float,
) -> dict:
    """What results.json says of the training itself."""
    epochs = trainer.state.epoch or 0.0
    if data.streamed:  # the Trainer cannot count a stream's epochs
        epochs = trainer.state.global_step * args.batch_size / data.num_images if data.num_images else None
    seconds = train_output.metrics.get("train_runtime", 0.0)
    first_step = callbacks.first_step.seconds
    learning_rates = [record["learning_rate"] for record in trainer.state.log_history if "learning_rate" in record]
    results: dict = {
        "steps": trainer.state.global_step,
        "epochs": round(epochs, 3) if epochs is not None else None,
        "train_loss": round(train_output.training_loss, 4),
        "training_minutes": round(seconds / 60, 2),
        "training_seconds": round(seconds, 2),
        "images_per_second": round(train_output.metrics.get("train_samples_per_second", 0.0), 1),
        "training_cpu_seconds": round(cpu_seconds, 2),
        "stopped_by_time_budget": trainer.clock.stopped_by_budget,
        "bf16": steps.bf16,
        "fp16": args.fp16,
        "num_workers": plan.num_workers,
        "openmp_waiting": openmp_waiting(),
        "seconds_to_first_step": None if first_step is None else round(first_step, 2),
        "final_learning_rate": learning_rates[-1] if learning_rates else None,
        "final_momentum": trainer.momentum_update.momentum,
        "augmentation": dataclasses.asdict(data.augmentation),
        "eval_train_images": args.eval_train_images,  # the cap on the evaluation's kNN memory (0: none)
    }
    if skipped is not None:
        results["skipped_unreadable"] = skipped
        if skipped:
            logger.info("skipped %d unreadable images or truncated shard ends", skipped)
    if callbacks.monitor is not None:
        results["knn_monitor_seconds"] = round(callbacks.monitor.seconds, 2)
        results["knn_monitor_last"] = callbacks.monitor.last
    if callbacks.online_probe is not None:
        results["online_probe_seconds"] = round(callbacks.online_probe.seconds, 2)
        results["online_probe_eval_seconds"] = round(callbacks.online_probe.eval_seconds, 2)
        results["online_probe_last"] = callbacks.online_probe.last
    results["gradient_checkpointing"] = is_checkpointing(trainer.model)  # what the model trained with
    return results


def _draw_pictures(plan: RunPlan, data: PretrainingData, model: MACRLForPreTraining, seed: int) -> None:
    """The loss curves from the log; the reconstructions, attention maps and feature PCA of fixed evaluation images
    (so that the pictures of two runs are comparable)."""
    pictures = plan.output_dir / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    if plan.log_path.exists():
        plot_loss_curves(plan.log_path, pictures / "loss_curves.png")
    transform = build_eval_transform(data.augmentation)
    if images := data.picture_images(8):  # none: every one of them unreadable
        samples = torch.stack([transform(image) for image in images])
        mean, std = list(data.augmentation.mean), list(data.augmentation.std)
        reconstruction_grid(model.cpu(), samples, mean, std, pictures / "reconstructions.png", seed=seed)
        encoder_pictures(model, samples, mean, std, pictures)  # attention maps, feature PCA
