"""`macrl-eval`: kNN, linear-probe and fine-tuning accuracy of a MACRL encoder.

    macrl-eval --model ./run/encoder --limit-train 10000 --output results.json --update-card

Evaluates on Debian's Fashion-MNIST train / test split by default, or on a folder of images in class subfolders (the
seeded held-out split of `macrl.data.splits`, the one `macrl-pretrain --seed S` holds out), or on a `datasets`
dataset with train / test splits. Prints a table, writes the results as JSON (`--output`) and can rewrite a local
model folder's model card with them (`--update-card`). The work is the library's: `macrl.evaluation`
(`evaluate_encoder`, `finetune`, LoRA in `macrl.evaluation.lora`), `macrl.evaluation.labels.open_labelled`,
`macrl.loading`, `macrl.model_card`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .atomic_files import atomic_path
from .command_line import (
    EXIT_STATUS_HELP,
    OneLineErrorParser,
    add_encoder_flags,
    UsageError,
    about,
    int_at_least,
    positive_float,
    progress_bars,
    run_command,
)
from .data import limit_source
from .devices import resolve_device
from .evaluation.frozen_features import check_labelled, evaluate_encoder
from .evaluation.label_subsets import DEFAULT_LABEL_FRACTIONS, check_fractions, fraction_name
from .evaluation.labels import EvaluationDataError, open_labelled
from .evaluation.lora import import_peft
from .evaluation.raw_pixel_floor import floor_applies, raw_pixel_floor
from .loading import load_encoder_and_processor
from .model_card import card_evaluation, update_model_card
from .precision import slow_precision_warning

__all__ = ["build_parser", "format_table", "main", "run"]

POOL_CHOICES: tuple[str, ...] = ("cls", "mean", "both")
EVAL_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")
PROG = "macrl-eval"
logger = logging.getLogger(__name__)


def format_table(results: Mapping[str, Any]) -> str:
    """A small text table: one row per metric (all the labels, then each label fraction), one column per pooling and
    one for the raw-pixel floor, DINOv2's linear protocol, then counts and timings."""
    pools = list(results.get("pools") or [])
    if any(key.startswith(("knn_accuracy_pixels", "linear_probe_accuracy_pixels")) for key in results):
        pools.append("pixels")
    suffixes = [""] + [f"_{fraction_name(fraction)}" for fraction in results.get("label_fractions") or []]
    rows = []
    for suffix in suffixes:
        share = f", {suffix[1:-3]}% of labels" if suffix else ""
        for label, key in ((f"kNN accuracy (k={results.get('knn_k', 20)}){share} %", "knn_accuracy"),
                           (f"linear probe accuracy{share} %", "linear_probe_accuracy")):
            if any(f"{key}_{pool}{suffix}" in results for pool in pools):
                rows.append((label, key, suffix))
    label_width = max([len(label) for label, _, _ in rows] + [len("fine-tuning accuracy %")])
    lines = []
    if rows:
        lines.append(f"{'metric':<{label_width}}" + "".join(f"{pool:>10}" for pool in pools))
        for label, key, suffix in rows:
            values = [results.get(f"{key}_{pool}{suffix}") for pool in pools]
            lines.append(f"{label:<{label_width}}" + "".join(f"{'-' if v is None else f'{v:.2f}':>10}" for v in values))
    if "linear_probe_accuracy_dinov2" in results:
        floor = results.get("linear_probe_accuracy_pixels")
        lines.append(
            f"{'linear probe, DINOv2 protocol %':<{label_width}}{results['linear_probe_accuracy_dinov2']:>10.2f}"
            "   (CLS of the last 4 blocks + mean patch token"
            + (f"; raw pixels' linear probe {floor:.2f})" if floor is not None else ")")
        )
    if "finetune_accuracy" in results:
        lora = ""
        if results.get("finetune_lora_rank"):
            share = 100 * results["finetune_trainable_parameters"] / results["finetune_parameters"]
            lora = f", LoRA rank {results['finetune_lora_rank']}: {share:.2f}% of the parameters trained"
        lines.append(
            f"{'fine-tuning accuracy %':<{label_width}}{results['finetune_accuracy']:>10.2f}"
            f"   ({results.get('finetune_steps')} steps, pooling {results.get('model_pooling', '?')}{lora})"
        )
    counts = [f"{results[key]} {text}" for key, text in (
        ("train_images", "train"), ("test_images", "test"), ("num_classes", "classes"),
    ) if key in results]
    if counts:
        lines.append("images: " + ", ".join(counts))
    timings = [f"{text} {results[key]:.1f} s" for key, text in (
        ("extract_seconds", "extract"), ("knn_seconds", "kNN"), ("linear_probe_seconds", "linear probe"),
        ("finetune_seconds", "fine-tuning"),
    ) if key in results]
    if timings:
        lines.append("time: " + ", ".join(timings))
    return "\n".join(lines)


def _write_json_atomically(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp_path:
        temp_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    """The ``macrl-eval`` flags; ``--help`` states every default."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="kNN, linear-probe and fine-tuning accuracy of a MACRL encoder.",
        epilog=EXIT_STATUS_HELP,
    )
    add = parser.add_argument
    add_encoder_flags(parser)
    add(
        "--data", default=None,
        help="default: Fashion-MNIST train/test (Debian's dataset-fashion-mnist); or a folder of images in class "
        "subfolders (a seeded held-out split is the test set); or a `datasets` save_to_disk folder / dataset name "
        "with train and test splits",
    )
    add("--train-split", default="train", help="training split, for datasets only (default: %(default)s)")
    add(
        "--test-split", default=None,
        help="test split, for datasets only (default: test, or a held-out part of the training split if there is none)",
    )
    add("--image-column", default=None, help="image column, for datasets only (default: auto-detected)")
    add("--label-column", default=None, help="label column, for datasets only (default: auto-detected)")
    add(
        "--test-fraction", type=float, default=0.1,
        help="fraction held out as the test set when the data has no test split (default: %(default)s)",
    )
    add("--limit-train", type=int_at_least(1), default=None, help="use a seeded random N training images (default: all)")
    add("--limit-test", type=int_at_least(1), default=None, help="use a seeded random N test images (default: all)")
    add("--knn", action=argparse.BooleanOptionalAction, default=True, help="weighted kNN (default: on)")
    add("--knn-k", type=int_at_least(1), default=20, help="kNN neighbours (default: %(default)s)")
    add("--knn-temperature", type=positive_float, default=0.07, help="kNN temperature (default: %(default)s)")
    add("--linear-probe", action=argparse.BooleanOptionalAction, default=True, help="linear probe (default: on)")
    add(
        "--label-fractions", type=float, nargs="*", default=list(DEFAULT_LABEL_FRACTIONS), metavar="FRACTION",
        help="also run the kNN and linear probe with these fractions of the training labels (seeded, the same share "
        "of every class: SimCLR / BYOL's label-efficiency probes); no value for none (default: 0.01 0.1)",
    )
    add(
        "--dinov2-linear", action=argparse.BooleanOptionalAction, default=True,
        help="with the linear probe, also DINOv2's linear protocol: the CLS tokens of the last 4 blocks and the mean "
        "patch token (default: on)",
    )
    add(
        "--raw-pixel-floor", action=argparse.BooleanOptionalAction, default=True,
        help="the same probes on the images' raw pixels, the floor an encoder has to beat (images of one size of at "
        "most 64x64x3 values; computed once per data set, kept in ~/.cache/macrl) (default: on)",
    )
    add(
        "--pool", choices=POOL_CHOICES, default="both",
        help="feature(s) for kNN / linear probe: CLS token, mean of patch tokens, or both from one pass "
        "(default: %(default)s)",
    )
    add("--finetune-epochs", type=float, default=0, help="end-to-end fine-tuning epochs; 0 = off (default: 0)")
    add("--finetune-max-steps", type=int_at_least(1), default=None, help="stop fine-tuning after N steps")
    add("--finetune-lr", type=positive_float, default=5e-4, help="fine-tuning peak learning rate (default: %(default)s)")
    add("--finetune-batch-size", type=int_at_least(1), default=64, help="fine-tuning batch size (default: %(default)s)")
    add(
        "--layer-decay", type=float, default=None,
        help="layer-wise lr decay for fine-tuning, in (0, 1], e.g. 0.75 (default: off)",
    )
    add("--weight-decay", type=float, default=0.05, help="fine-tuning weight decay (default: %(default)s)")
    add(
        "--lora-rank", type=int_at_least(1), default=None, metavar="R",
        help="fine-tune LoRA adapters of rank R on the attention's qkv and proj, and the classifier, instead of every "
        "weight (needs peft: pip install 'macrl[peft]'); saves the adapter in <finetune output>/adapter and the "
        "merged model, which loads without peft (default: off)",
    )
    add(
        "--gradient-checkpointing", action="store_true",
        help="fine-tuning recomputes every block's activations in the backward pass instead of keeping them: less "
        "memory, a slower step (default: off)",
    )
    add(
        "--finetune-output", default=None,
        help="folder for the fine-tuned model (default: <output stem>-finetuned next to --output, "
        "else ./macrl-finetuned)",
    )
    add("--batch-size", type=int_at_least(1), default=256, help="images per forward pass (default: %(default)s)")
    add(
        "--dtype", choices=EVAL_DTYPES, default="fp32",
        help="bf16 / fp16: weights in that dtype for kNN / linear-probe features where the device has kernels for it "
        "(else autocast: on a CPU without them many times slower, a warning says so), mixed precision for "
        "fine-tuning (default: fp32)",
    )
    add(
        "--compile", action="store_true",
        help="torch.compile the encoder for the kNN / linear-probe features (compile time printed, paid once for "
        "train and test) (default: off)",
    )
    add("--num-workers", type=int_at_least(0), default=0, help="DataLoader worker processes (default: 0)")
    add("--seed", type=int, default=0, help="held-out split, --limit-* subsets, probe and fine-tuning (default: 0)")
    add("--skip-unreadable", action="store_true", help="skip images that cannot be decoded instead of stopping")
    add("--output", default=None, help="write the results as JSON to this file (atomically)")
    add(
        "--update-card", action="store_true",
        help="rewrite the model folder's README.md with the results in its model-index (local folders only)",
    )
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the slow part."""
    if not (args.knn or args.linear_probe or args.finetune_epochs > 0 or args.finetune_max_steps):
        raise UsageError("nothing to do: --no-knn, --no-linear-probe and no --finetune-epochs")
    if args.finetune_epochs < 0:
        raise UsageError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    if args.layer_decay is not None and not 0.0 < args.layer_decay <= 1.0:
        raise UsageError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    finetuning = args.finetune_epochs > 0 or args.finetune_max_steps
    for flag, value in (("--lora-rank", args.lora_rank), ("--gradient-checkpointing", args.gradient_checkpointing)):
        if value and not finetuning:
            raise UsageError(f"{flag} is for fine-tuning: add --finetune-epochs N (or --finetune-max-steps N)")
    if args.lora_rank is not None:
        import_peft()  # PeftMissingError names the extra to install
    try:
        check_fractions(args.label_fractions)
    except ValueError as error:
        raise UsageError(f"--label-fractions: {error}") from error
    if not 0.0 < args.test_fraction < 1.0:
        raise UsageError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.update_card:
        if not Path(args.model).expanduser().is_dir():
            raise UsageError(
                f"--update-card: {args.model} is not a local model folder; --update-card rewrites a local "
                "folder's README.md (download the model, or push the card yourself)"
            )
        if args.revision is not None:
            raise UsageError("--update-card cannot be combined with --revision (it rewrites a local folder)")
    if args.output is not None and Path(args.output).expanduser().is_dir():
        raise UsageError(f"--output {args.output}: is a folder")


def _finetune_output(args: argparse.Namespace) -> Path:
    if args.finetune_output:
        return Path(args.finetune_output).expanduser()
    if args.output:
        output = Path(args.output).expanduser()
        return output.with_name(f"{output.stem}-finetuned")
    return Path("macrl-finetuned")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The command's work once the flags are parsed."""
    total_started = time.perf_counter()
    _check_args(args)
    with about("--device"):
        device = resolve_device(args.device)
    if warning := slow_precision_warning(device, f"--dtype {args.dtype}", args.dtype):
        logger.warning(warning)
    show_progress = not args.no_progress and sys.stderr.isatty()
    with progress_bars(show_progress), about("--model"):
        model, processor = load_encoder_and_processor(args.model, args.revision)
    mode = "L" if model.config.num_channels == 1 else "RGB"
    with about("--data" if args.data is not None else None):
        splits = open_labelled(
            args.data, mode, train_split=args.train_split, test_split=args.test_split,
            holdout_fraction=args.test_fraction, seed=args.seed,
            image_column=args.image_column, label_column=args.label_column, skip_unreadable=args.skip_unreadable,
        )
        train = limit_source(splits.train, args.limit_train, args.seed)
        test = limit_source(splits.test, args.limit_test, args.seed)
        check_labelled(train, test)
    dataset = {"dataset_name": splits.dataset_name, "dataset_type": splits.dataset_type, "split": splits.test_split}

    model_path = Path(args.model).expanduser()
    results: dict[str, Any] = {
        "model": str(model_path.resolve()) if model_path.exists() else args.model,
        "revision": args.revision,
        "data": args.data if args.data is None or not Path(args.data).exists() else str(Path(args.data).resolve()),
        "dataset": dataset["dataset_name"],
        "split": dataset["split"],
        "model_pooling": model.config.pooling,
        "device": device.type,
        "dtype": args.dtype,
        "compile": args.compile,
        "seed": args.seed,
        "macrl_version": __version__,
    }
    if args.knn or args.linear_probe:
        pools = None if args.pool == "both" else (args.pool,)
        results.update(
            evaluate_encoder(
                model, processor, train, test,
                knn=args.knn, linear_probe=args.linear_probe, pools=pools,
                batch_size=args.batch_size, device=device, dtype=args.dtype,
                knn_k=args.knn_k, knn_temperature=args.knn_temperature, seed=args.seed,
                num_workers=args.num_workers, skip_unreadable=args.skip_unreadable, progress=show_progress,
                compile=args.compile, label_fractions=args.label_fractions, dinov2_linear=args.dinov2_linear,
            )
        )
        channels = 1 if mode == "L" else 3
        if args.raw_pixel_floor and not results["skipped_images"] and floor_applies(train, test, channels):
            try:
                floor = raw_pixel_floor(
                    train, test, linear_probe=args.linear_probe, seed=args.seed,
                    label_fractions=tuple(args.label_fractions),
                )
            except EvaluationDataError as error:  # images of several sizes: no pixel vectors to compare
                logger.info("no raw-pixel floor: %s", error)
            else:
                results.update({key: value for key, value in floor.items() if "_pixels" in key})
    if args.finetune_epochs > 0 or args.finetune_max_steps:
        from .evaluation.finetune import finetune

        with progress_bars(show_progress), about("fine-tuning:"):
            tuned = finetune(
                args.model, train, test,
                output_dir=_finetune_output(args), epochs=args.finetune_epochs or 1.0,
                batch_size=args.finetune_batch_size, lr=args.finetune_lr, layer_decay=args.layer_decay,
                weight_decay=args.weight_decay, seed=args.seed, max_steps=args.finetune_max_steps or -1,
                revision=args.revision, device=device.type, dtype=args.dtype,
                num_workers=args.num_workers, progress=show_progress,
                lora_rank=args.lora_rank, gradient_checkpointing=args.gradient_checkpointing,
            )
        results.update(tuned)
        results.setdefault("train_images", len(train))
        results.setdefault("test_images", len(test))
    results["total_seconds"] = round(time.perf_counter() - total_started, 3)

    print(f"{PROG}: {results['model']} on {dataset['dataset_name']} ({dataset['split']} split)")
    print(format_table(results))
    if args.output:
        output = Path(args.output).expanduser()
        _write_json_atomically(output, results)
        print(f"results: {output}")
    if args.update_card:
        evaluation = card_evaluation(results, dataset, model.config.pooling)
        if evaluation is None:
            raise UsageError("--update-card: no accuracy to write")
        readme = update_model_card(model_path, model.config, evaluation)
        print(f"model card: {readme}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `macrl-eval`; the exit codes of `macrl.command_line`."""
    return run_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
