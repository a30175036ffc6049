"""The settings of a pre-training run: one dataclass, which `macrl-pretrain` parses with transformers'
`HfArgumentParser` (every field a flag, in hyphens or underscores) and `run_pretraining` takes."""

import json
from dataclasses import dataclass, field

from ..data.augmentations import AugmentationConfig
from ..devices import DEVICE_CHOICES
from .stop_signals import DEFAULT_STOP_SIGNALS


def _flag(default, help: str, **kwargs):
    """A dataclass field whose help `--help` prints."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class PretrainingArguments:
    data: str | None = _flag(
        None,
        "Training images: a folder (recursive; class subfolders, if any, are used for the kNN evaluation), a saved "
        "`datasets` dataset or dataset name, or WebDataset tar shards ('shards/train-{000000..000999}.tar', a "
        "pipe: command, URLs), read as a stream. Default: Fashion-MNIST from Debian's dataset-fashion-mnist package.",
    )
    eval_data: str | None = _flag(
        None,
        "Labelled images to evaluate on instead of --data's own test split or held-out part, opened as macrl-eval "
        "--data opens them: a folder of class subfolders (a seeded held-out part is the test set) or a `datasets` "
        "save_to_disk folder / dataset name with train and test splits (--image-column / --label-column apply). Its "
        "training images are the kNN memory and probe training set, its test images the queries, for --knn-every, "
        "the evaluation at the end and the reconstruction pictures; all of --data is trained on. What brings them to "
        "shards and streams; unset, --data's own are used.",
    )
    eval_split: str | None = _flag(
        None,
        "The split of a `datasets` --eval-data to evaluate on, e.g. validation where the test split has no labels "
        "(ImageNet's). Default: test, else a seeded held-out part of train.",
    )
    streaming: bool = _flag(
        False, "Stream the `datasets` dataset --data names (an IterableDataset) instead of reading it whole."
    )
    shuffle_buffer: int = _flag(
        1000, "Shards and streams: the shuffle buffer of every reader (process x worker), in images."
    )
    output_dir: str = _flag("outputs/macrl-fmnist", "Where the model, encoder/, logs, pictures and checkpoints go.")
    config: str = _flag("fmnist", "Model config: a preset name (fmnist, tiny, vit-small-patch16-224, "
                        "vit-base-patch16-224), a JSON file, a folder with config.json, or a JSON object.")
    batch_size: int = _flag(256, "Global batch size (split evenly over the processes).")
    gradient_accumulation_steps: int = _flag(
        1,
        "Accumulate gradients over this many micro-batches per optimiser step: each process takes "
        "batch_size / (processes x this) images at a time (the contrastive negatives are a micro-batch's).",
    )
    epochs: float = _flag(100.0, "Passes over the data; ignored when --max-steps or --max-minutes sets the length.")
    max_steps: int = _flag(-1, "Optimiser steps to train; -1 to use --epochs or --max-minutes.")
    max_minutes: float | None = _flag(
        None,
        "Training-time budget. Without --max-steps, the step count (and so the learning-rate and momentum "
        "schedules) is fitted to it from a short timing of real steps; training always stops when it is spent.",
    )
    lr: float | None = _flag(
        None,
        "Base learning rate; the optimiser uses lr x batch_size / 256 (MAE's rule). Default: the preset's tuned "
        "value (fmnist: 1.5e-3), else 3e-4 (twice MAE's 1.5e-4: CPU budgets are a few epochs, not hundreds).",
    )
    warmup_ratio: float = _flag(0.05, "Fraction of the steps spent warming the learning rate up linearly.")
    weight_decay: float = _flag(0.05, "AdamW weight decay (not on biases, norms, tokens and positions).")
    max_grad_norm: float = _flag(0.0, "Clip gradients to this norm; 0 disables clipping.")
    seed: int = _flag(0, "Seed of the model initialisation, the data order, the augmentations and the masks.")
    resume: str | None = _flag(
        None,
        "Continue from a checkpoint: a checkpoint folder, or `latest` (the default when the flag has no value) "
        "for the newest one under OUTPUT_DIR/checkpoints.",
        nargs="?",
        const="latest",
    )
    save_steps: int = _flag(500, "Write a checkpoint every this many steps (and always at the end).")
    save_total_limit: int = _flag(2, "Keep only the newest this many checkpoints.")
    stop_signals: list[str] = field(
        default_factory=lambda: list(DEFAULT_STOP_SIGNALS),
        metadata={"help": "On any of these signals (a cluster's preemption or time limit, kill, Ctrl-C) the run "
                  "finishes the step it is in, writes its checkpoint and log line, says how to resume and exits with "
                  "status 75; a second signal stops it at once. With several processes they all stop after the same "
                  "step. --stop-signals with no value: none (each signal does what it does by default).",
                  "nargs": "*"},
    )
    logging_steps: int = _flag(20, "Log (terminal, JSONL) every this many steps.")
    push_to_hub: str | None = _flag(None, "Hub repo id (org/name) to upload encoder/ to at the end.")
    private: bool = _flag(False, "Create the Hub repo as private.", aliases=["--hub-private", "--hub_private"])
    push_checkpoints: bool = _flag(False, "With --push-to-hub, also upload encoder/ at every checkpoint.")
    num_workers: int | None = _flag(
        None,
        "Data-loading worker processes per training process. Default: 1 on a CPU (the model needs the cores); on a "
        "GPU this process's share of the machine's cores, at most 8.",
    )
    device: str = _flag("auto", "auto (cuda, else mps, else cpu), cpu, cuda or mps.", choices=DEVICE_CHOICES)
    bf16: bool | None = _flag(
        None,
        "Train under bfloat16 autocast: --bf16 / --bf16 false; unset, the faster one is chosen: bf16 on GPUs that have "
        "it, and for a --max-minutes run on a CPU with bf16 kernels (AVX512, AMX) whichever a timed probe of both "
        "finds faster; fp32 otherwise (on AVX2-only CPUs bf16 is many times slower).",
        nargs="?",
        const=True,
    )
    fp16: bool = _flag(False, "Train under float16 autocast with loss scaling (GPUs).")
    compile: bool = _flag(False, "Compile the model with torch.compile.")
    gradient_checkpointing: bool = _flag(
        False,
        "Recompute every block's activations in the backward pass instead of keeping them: less memory for a larger "
        "batch or model, a slower step (benchmarks/gradient_checkpointing.py measures both).",
    )
    mask_ratio: float | None = _flag(None, "Override the config's mask_ratio.")
    reconstruction_weight: float | None = _flag(None, "Override the config's reconstruction_weight (0: MoCo v3).")
    contrastive_weight: float | None = _flag(None, "Override the config's contrastive_weight (0: MAE).")
    config_overrides: str | None = _flag(
        None, 'Further config fields as a JSON object, e.g. \'{"symmetric_loss": true, "temperature": 0.1}\'.'
    )
    augmentation: str | None = _flag(
        None,
        'Augmentation fields (see macrl.data.AugmentationConfig) as a JSON object, e.g. '
        '\'{"strong_crop_scale": [0.5, 1.0], "blur_prob": 0}\'.',
    )
    image_column: str | None = _flag(None, "Image column of a `datasets` dataset (default: detected).")
    label_column: str | None = _flag(None, "Label column of a `datasets` dataset (default: detected).")
    limit_images: int | None = _flag(None, "Train on the first N images only (smoke tests, quick looks).")
    skip_unreadable: bool = _flag(False, "Skip unreadable image files (listed at the start) instead of stopping.")
    knn: bool = _flag(
        True,
        "Evaluate the encoder with a weighted kNN classifier at the end (needs labels); --no-knn to skip it.",
        aliases=["--knn-eval", "--knn_eval"],
    )
    linear_probe: bool = _flag(
        True, "With the kNN evaluation at the end, the linear probe of macrl-eval too; --no-linear-probe to skip it."
    )
    label_fractions: list[float] = field(
        default_factory=lambda: [0.01, 0.1],
        metadata={"help": "With the evaluation at the end, the kNN and linear probe also with these fractions of the "
                  "training labels (seeded, the same share of every class: the label-efficiency probes of SimCLR / "
                  "BYOL); --label-fractions with no value for none.", "nargs": "*"},
    )
    dinov2_linear: bool = _flag(
        True,
        "With the linear probe at the end, also DINOv2's linear protocol: the CLS tokens of the last 4 blocks and "
        "the mean patch token; --no-dinov2-linear to skip it.",
    )
    raw_pixel_floor: bool = _flag(
        True,
        "With the evaluation at the end, the same kNN / linear probe on the images' raw pixels, the floor an encoder "
        "has to beat (small images only; computed once per data set, kept in ~/.cache/macrl).",
    )
    eval_images: int = _flag(
        10000, "At most this many held-out (or --eval-data test) images for the kNN evaluation and pictures."
    )
    eval_train_images: int = _flag(
        60000,
        "At most this many training images (a seeded random subset, as macrl-eval --limit-train takes them) are the "
        "kNN memory and probe training set of the evaluation at the end, read on the first process; 0 for all. The "
        "default takes all of Fashion-MNIST's 60,000 and bounds an ImageNet-sized set (1.28M decodes).",
    )
    knn_every: int = _flag(
        0,
        "Every this many steps (and at the last), the kNN accuracy of the encoder on a fixed subset of the held-out "
        "images, in the log, the tracker and the loss plot: a live quality signal (needs labels; 0: off).",
    )
    knn_monitor_images: int = _flag(
        1000, "Held-out images the --knn-every monitor classifies, against 5 times as many training images."
    )
    online_probe: bool = _flag(
        False,
        "Train a linear classifier on the detached pooled features of every training batch (needs labelled training "
        "images), with its own optimiser; its accuracy on the monitor's held-out images goes into the log, the "
        "tracker and the loss plot with the kNN monitor's (every --knn-every steps, else every --logging-steps). It "
        "never changes the encoder's training, is kept in the checkpoints and is not part of encoder/.",
    )
    report_to: str = _flag(
        "none",
        "Experiment tracking, as transformers' Trainer does it: none, or one or more (comma-separated) of "
        "tensorboard, trackio, wandb, mlflow, ... whose package is installed. TensorBoard writes to "
        "OUTPUT_DIR/logs/tensorboard.",
    )

    def config_changes(self) -> dict:
        """Config fields that the command line sets: --config-overrides, then the single-field flags."""
        changes = json.loads(self.config_overrides) if self.config_overrides else {}
        if not isinstance(changes, dict):
            raise ValueError(f"--config-overrides must be a JSON object, got {self.config_overrides!r}")
        names = ("mask_ratio", "reconstruction_weight", "contrastive_weight")
        return {**changes, **{name: getattr(self, name) for name in names if getattr(self, name) is not None}}

    def trackers(self) -> list[str]:
        """The experiment trackers `--report-to` names, each checked to be one transformers supports and installed.

        Raises `ValueError` naming an unknown tracker, or the package to install for a missing one.
        """
        from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

        names = [name.strip() for name in self.report_to.split(",") if name.strip()]
        if names in ([], ["none"]):
            return []
        installed = get_available_reporting_integrations()
        for name in names:
            if name not in INTEGRATION_TO_CALLBACK:
                raise ValueError(f"unknown tracker {name!r}; choose none or from {', '.join(INTEGRATION_TO_CALLBACK)}")
            if name not in installed:
                raise ValueError(f"{name} is not installed: pip install {name.replace('_', '-')}")
        return names

    def augmentation_changes(self) -> dict:
        """AugmentationConfig fields that --augmentation sets (unknown names are an error)."""
        changes = json.loads(self.augmentation) if self.augmentation else {}
        if not isinstance(changes, dict):
            raise ValueError(f"must be a JSON object, got {self.augmentation!r}")
        unknown = sorted(set(changes) - set(AugmentationConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        return changes
