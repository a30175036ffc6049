"""`macrl-pretrain`: pre-train a MACRL encoder, evaluate it with kNN, draw its pictures, export and push it.

    macrl-pretrain --max-minutes 10                       # Fashion-MNIST (Debian's package), fitted to 10 minutes
    macrl-pretrain --data ~/images --config vit-small-patch16-224 --epochs 100 --push-to-hub me/macrl-vit-s
    accelerate launch --num_processes 2 -m macrl.pretrain --max-steps 1000   # several processes (or torchrun)

OUTPUT_DIR receives: the full pre-training model (`save_pretrained`: main and momentum branches), `encoder/` (the
`MACRLModel` users download, with its image processor and model card), `checkpoints/`, `logs/train_log.jsonl`,
`pictures/` (loss curves, reconstructions) and `results.json`.
"""

import copy
import dataclasses
import itertools
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .configuration_macrl import MACRLConfig
from .data import FashionMNISTNotFoundError, UnreadableImageError, build_eval_transform
from .evaluation.knn import knn_accuracy
from .extract import extract_features
from .hub import HubPushError, push_encoder_to_hub, repo_has_readme
from .image_processing_macrl import MACRLImageProcessor
from .model_card import render_model_card, write_model_card
from .modeling_macrl import MACRLForPreTraining
from .precision import slow_bf16_warning
from .presets import base_learning_rate, load_config
from .training.arguments import PretrainingArguments, build_parser
from .training.callbacks import (
    DataEpochCallback,
    JsonlLogCallback,
    MomentumUpdateCallback,
    PushCheckpointCallback,
    TimeBudgetCallback,
)
from .training.data import PretrainingData, build_augmentation, build_pretraining_data
from .training.pictures import plot_loss_curves, reconstruction_grid
from .training.trainer import MACRLPretrainer, checkpoint_problem

logger = logging.getLogger("macrl.pretrain")


class PretrainingError(Exception):
    """A problem with the run's inputs (data, config, output folder, checkpoint): one clear line, exit code 2."""


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_checkpoint(args: PretrainingArguments, checkpoint_dir: Path, config: MACRLConfig) -> str | None:
    """The checkpoint to resume from (None for a fresh run); refuses to overwrite an earlier run's checkpoints."""
    existing = get_last_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
    if args.resume is None:
        if existing is not None:
            raise PretrainingError(
                f"{checkpoint_dir} already holds checkpoints of an earlier run (newest: {Path(existing).name}); "
                "pass --resume to continue it, or choose another --output-dir"
            )
        return None
    checkpoint = existing if args.resume == "latest" else args.resume
    if checkpoint is None:
        raise PretrainingError(f"--resume: no checkpoint to resume from in {checkpoint_dir}")
    problem = checkpoint_problem(checkpoint)
    if problem is not None:  # refused, not skipped: resuming from an older step silently would be another run
        raise PretrainingError(f"--resume: {checkpoint} is not a complete checkpoint ({problem})")
    saved = MACRLConfig.from_pretrained(checkpoint)
    # the model's own fields; the generic PreTrainedConfig ones (output_hidden_states...) do not change the run
    own_fields = set(MACRLConfig.__dataclass_fields__) - set(PreTrainedConfig.__dataclass_fields__)
    changed = sorted(key for key in own_fields if getattr(saved, key) != getattr(config, key))
    if changed:
        details = ", ".join(f"{key}: {getattr(saved, key)!r} -> {getattr(config, key)!r}" for key in changed)
        raise PretrainingError(f"--resume: {checkpoint} was trained with a different model config ({details})")
    return checkpoint


# The first steps of a fresh model run slower (allocator and oneDNN kernel caches warming up): on a 2-core AVX2 machine
# steps 1-3 took 1.2-1.8x the steady time, so the probe times 10 steps and keeps the median of the last half.
_PROBE_STEPS = 10


def steady_step_seconds(durations: list[float]) -> float:
    """The steady time of a step from the times of consecutive first steps: the median of the second half."""
    if not durations:
        raise ValueError("no step was timed")
    return statistics.median_low(durations[len(durations) // 2 :])


def fit_steps_to_budget(
    model: MACRLForPreTraining, data: PretrainingData, args: PretrainingArguments, device: torch.device
) -> int:
    """Optimiser steps that fit in `--max-minutes`, from the time of a few real steps on a throwaway copy."""
    probe = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=1e-6)
    per_process = args.batch_size // _world_size()
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=per_process, shuffle=True, num_workers=args.num_workers, collate_fn=data.collator
    )
    batches = itertools.cycle(loader)  # a small data set may hold fewer batches than the probe takes
    durations = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    for _ in range(_PROBE_STEPS):
        start = time.perf_counter()
        batch = {key: value.to(device) for key, value in next(batches).items()}
        with autocast:
            loss = probe(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        probe.update_momentum_branch(0.0)
        durations.append(time.perf_counter() - start)
    seconds = torch.tensor(steady_step_seconds(durations))
    if _world_size() > 1:
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    # logging, checkpoints and the epoch ends cost a few percent on top of the steps
    steps = int(args.max_minutes * 60 * 0.95 / seconds.item())
    return max(steps, 1)


def build_training_arguments(args: PretrainingArguments, checkpoint_dir: Path, max_steps: int, config) -> TrainingArguments:
    per_device = args.batch_size // _world_size()
    device_is_gpu = args.device != "cpu" and torch.cuda.is_available()
    # without use_cpu, accelerate treats several CPU processes as one and DDP never syncs them
    unused_parameters = config.reconstruction_weight == 0 or config.contrastive_weight == 0
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=per_device,
        num_train_epochs=args.epochs,
        max_steps=max_steps,
        learning_rate=(args.lr if args.lr is not None else base_learning_rate(args.config)) * args.batch_size / 256,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=args.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=args.max_grad_norm,  # 0 disables clipping
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        dataloader_num_workers=args.num_workers,
        dataloader_pin_memory=device_is_gpu,
        dataloader_drop_last=True,  # BatchNorm and InfoNCE want full, equal batches on every process
        dataloader_persistent_workers=args.num_workers > 0,
        remove_unused_columns=False,
        report_to="none",
        use_cpu=not device_is_gpu,
        bf16=args.bf16,
        fp16=args.fp16,
        torch_compile=args.compile,
        ddp_find_unused_parameters=unused_parameters,  # a zero-weight head gets no gradient
        ddp_backend="gloo" if _world_size() > 1 and not device_is_gpu else None,
        disable_tqdm=False,
        log_level="warning",
    )


@torch.no_grad()
def evaluate_knn(encoder, processor, data: PretrainingData, batch_size: int, device) -> dict | None:
    """Weighted kNN (k=20, T=0.07) of the pooled features: train images as memory, held-out images as queries."""
    if data.eval_source is None or data.train_source.labels is None or data.eval_source.labels is None:
        return None
    common = dict(pool=encoder.config.pooling, batch_size=batch_size, device=device)
    train = extract_features(encoder, processor, data.train_source, **common)
    test = extract_features(encoder, processor, data.eval_source, **common)
    num_classes = len(data.train_source.class_names or []) or int(train.labels.max()) + 1
    accuracy = knn_accuracy(train.features, train.labels, test.features, test.labels, num_classes)
    return {"knn_accuracy": round(accuracy, 2), "knn_train_images": len(train.ids), "knn_test_images": len(test.ids)}


@dataclass
class EncoderRelease:
    """How a run's encoder becomes `encoder/` (weights, config, code, image processor, model card) and a Hub repo."""

    folder: Path
    processor: MACRLImageProcessor
    args: PretrainingArguments
    dataset_name: str
    facts: dict  # what the model card says about the training run
    owns_card: bool | None = None  # set by the first push

    def export(self, model: MACRLForPreTraining, progress: dict, evaluation: dict | None = None) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        model.macrl.save_pretrained(self.folder)
        self.processor.save_pretrained(self.folder)
        card_evaluation = None
        if evaluation:
            card_evaluation = {
                "dataset_type": self.dataset_name,
                "split": "test" if self.args.data is None else "held-out",
                "metrics": {"knn_accuracy": evaluation["knn_accuracy"] / 100},
            }
        card = render_model_card(
            model.config,
            repo_id=self.args.push_to_hub,
            training={**self.facts, **progress},
            evaluation=card_evaluation,
            datasets=[self.dataset_name] if self.dataset_name == "fashion_mnist" else None,
        )
        write_model_card(self.folder, card, overwrite=True)  # this folder is regenerated by every export
        return self.folder

    def push(self, commit_message: str) -> str:
        if self.owns_card is None:
            # a card that was on the Hub before this run is the user's and stays; one this run wrote is updated
            self.owns_card = not repo_has_readme(self.args.push_to_hub)
        return push_encoder_to_hub(
            self.folder,
            self.args.push_to_hub,
            private=self.args.hub_private,
            commit_message=commit_message,
            overwrite_readme=self.owns_card,
        )


def run_pretraining(args: PretrainingArguments) -> dict:
    """The whole job; returns the results written to OUTPUT_DIR/results.json."""
    started = time.monotonic()
    output_dir = Path(args.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    if args.batch_size % _world_size():
        raise PretrainingError(f"--batch-size {args.batch_size} is not divisible by the {_world_size()} processes")
    try:
        config = load_config(args.config, **args.config_changes())
    except (ValueError, StrictDataclassError) as error:  # JSONDecodeError is a ValueError
        raise PretrainingError(f"--config: {error}") from error
    try:
        augmentation = build_augmentation(args, config)
    except (ValueError, TypeError) as error:  # TypeError: a field given a value of the wrong shape
        raise PretrainingError(f"--augmentation: {error}") from error
    resume_from = resolve_checkpoint(args, checkpoint_dir, config)
    try:
        data = build_pretraining_data(args, config, augmentation)
    except (FashionMNISTNotFoundError, FileNotFoundError, NotADirectoryError, UnreadableImageError, ImportError) as error:
        raise PretrainingError(str(error)) from error
    except ValueError as error:
        raise PretrainingError(f"--data: {error}") from error
    if len(data.train) < args.batch_size:
        raise PretrainingError(f"--data has {len(data.train)} images, fewer than one batch of {args.batch_size}")
    if data.skipped:
        print(f"skipping {len(data.skipped)} unreadable images, e.g. {data.skipped[0][0]}: {data.skipped[0][1]}")

    set_seed(args.seed)
    model = MACRLForPreTraining(config)
    device = torch.device("cpu" if args.device == "cpu" or not torch.cuda.is_available() else "cuda")
    if args.bf16 and (warning := slow_bf16_warning(device, "--bf16")):
        print(f"macrl-pretrain: warning: {warning}", file=sys.stderr)
    max_steps = args.max_steps
    if max_steps <= 0 and args.max_minutes is not None:
        if resume_from is not None:
            max_steps = json.loads(Path(resume_from, "trainer_state.json").read_text())["max_steps"]
        else:
            max_steps = fit_steps_to_budget(model, data, args, device)
            print(f"--max-minutes {args.max_minutes}: training for {max_steps} steps of {args.batch_size} images")

    training_args = build_training_arguments(args, checkpoint_dir, max_steps, config)
    release = EncoderRelease(
        folder=output_dir / "encoder",
        processor=MACRLImageProcessor(
            size={"height": config.image_size, "width": config.image_size},
            num_channels=config.num_channels,
            image_mean=list(data.augmentation.mean),
            image_std=list(data.augmentation.std),
        ),
        args=args,
        dataset_name=data.dataset_name,
        facts={
            "dataset": data.dataset_name,
            "num_images": len(data.train),
            "batch_size": args.batch_size,
            "learning_rate": training_args.learning_rate,
            "hardware": f"{_world_size()} x {device.type}",
        },
    )
    callbacks = [
        MomentumUpdateCallback(),
        DataEpochCallback(data.train),
        JsonlLogCallback(output_dir / "logs" / "train_log.jsonl"),
    ]
    budget = TimeBudgetCallback(args.max_minutes) if args.max_minutes is not None else None
    if budget is not None:
        callbacks.append(budget)
    if args.push_to_hub and args.push_checkpoints:

        def export_and_push(model: MACRLForPreTraining, step: int) -> str:
            release.export(model, {"steps": step})
            return release.push(f"Encoder at step {step}")

        callbacks.append(PushCheckpointCallback(export_and_push))
    trainer = MACRLPretrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        data_collator=data.collator,
        callbacks=callbacks,
        global_batch_size=args.batch_size,
    )
    try:
        train_output = trainer.train(resume_from_checkpoint=resume_from)
    except UnreadableImageError as error:
        raise PretrainingError(
            f"{error}; pass --skip-unreadable to leave such files out (checkpoints so far are kept in {checkpoint_dir})"
        ) from error
    if not trainer.is_world_process_zero():
        return {}

    model = trainer.model.eval()
    model.save_pretrained(output_dir)  # the full pre-training model, both branches
    results: dict = {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "train_loss": round(train_output.training_loss, 4),
        "training_minutes": round(train_output.metrics.get("train_runtime", 0.0) / 60, 2),
        "images_per_second": round(train_output.metrics.get("train_samples_per_second", 0.0), 1),
        "stopped_by_time_budget": bool(budget and budget.stopped_early),
        "augmentation": dataclasses.asdict(data.augmentation),
    }
    evaluation = evaluate_knn(model.macrl, release.processor, data, batch_size=256, device=device) if args.knn_eval else None
    if evaluation:
        results.update(evaluation)

    pictures = output_dir / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / "logs" / "train_log.jsonl"
    if log_path.exists():
        plot_loss_curves(log_path, pictures / "loss_curves.png")
    # fixed held-out images, so the pictures of two runs are comparable
    shown = data.eval_source or data.train_source
    transform = build_eval_transform(data.augmentation)
    samples = torch.stack([transform(shown.load_image(i)) for i in range(min(8, len(shown)))])
    mean, std = list(data.augmentation.mean), list(data.augmentation.std)
    reconstruction_grid(model.cpu(), samples, mean, std, pictures / "reconstructions.png", seed=args.seed)

    progress = {"steps": results["steps"], "epochs": results["epochs"], "minutes": results["training_minutes"]}
    release.export(model, progress, evaluation)
    results["total_minutes"] = round((time.monotonic() - started) / 60, 2)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.push_to_hub:
        results["hub_commit"] = release.push("Upload MACRL encoder")
    return results


def main(argv: list[str] | None = None) -> int:
    (args,) = build_parser().parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    # keep the terminal to the training bar and the logs: no bar per save_pretrained / from_pretrained
    transformers.utils.logging.disable_progress_bar()
    try:
        results = run_pretraining(args)
    except (PretrainingError, HubPushError) as error:
        print(f"macrl-pretrain: error: {error}", file=sys.stderr)
        return 2
    if results:
        output_dir = Path(args.output_dir)
        if "knn_accuracy" in results:
            print(f"kNN accuracy (k=20) of the encoder on {results['knn_test_images']} held-out images: "
                  f"{results['knn_accuracy']:.2f}%")
        print(f"encoder (MACRLModel + image processor + model card): {output_dir / 'encoder'}")
        print(f"pictures: {output_dir / 'pictures'}   log: {output_dir / 'logs' / 'train_log.jsonl'}")
        print(f"results: {output_dir / 'results.json'}   checkpoints: {output_dir / 'checkpoints'}")
        if "hub_commit" in results:
            print(f"pushed to the Hub: {results['hub_commit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
