"""`macrl-pretrain`: pre-train a MACRL encoder, evaluate it with kNN, draw its pictures, export and push it.

    macrl-pretrain --max-minutes 10 --knn-every 400       # Fashion-MNIST (Debian's package), fitted to 10 minutes
    macrl-pretrain --data ~/images --config vit-small-patch16-224 --epochs 100 --push-to-hub me/macrl-vit-s
    torchrun --nproc_per_node 2 -m macrl.pretrain --max-steps 1000   # several processes (or accelerate launch)

On SIGTERM, SIGINT or SIGUSR1 (`--stop-signals`) a run writes the checkpoint of the step it is in and exits 75 with
the command that continues it.

Every flag is a field of `macrl.training.PretrainingArguments`; the run is `macrl.training.run_pretraining`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import HfArgumentParser

from .command_line import EXIT_STATUS_HELP, OneLineErrors, run_command
from .training.arguments import PretrainingArguments
from .training.run import run_pretraining

__all__ = ["build_parser", "main", "resume_command"]

PROG = "macrl-pretrain"


class _Parser(OneLineErrors, HfArgumentParser):
    pass


def build_parser() -> HfArgumentParser:
    """`HfArgumentParser` of `PretrainingArguments`, with one-line usage errors."""
    parser = _Parser(
        PretrainingArguments,
        prog=PROG,
        description="Pre-train a MACRL encoder (masked reconstruction + MoCo v3 contrast) and export it.",
        epilog=f"{EXIT_STATUS_HELP} 75: stopped by one of --stop-signals after writing the checkpoint of its step. "
        "The checkpoints written so far are kept: continue with --resume.",
    )
    # HfArgumentParser gives every list field nargs="+"; a field that asks for "*" (--label-fractions,
    # --stop-signals) takes no value for an empty list
    empty_allowed = {field.name for field in dataclasses.fields(PretrainingArguments)
                     if field.metadata.get("nargs") == "*"}
    for action in parser._actions:
        if action.dest in empty_allowed:
            action.nargs = "*"
    return parser


def _parse(parser: HfArgumentParser, argv: Sequence[str] | None) -> PretrainingArguments:
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


# the rows of the run's last report: (label, key in results.json without its `raw_pixels_` prefix)
_REPORT_ROWS = (
    ("kNN (k=20), all labels", "knn_accuracy"),
    ("linear probe, all labels", "linear_probe_accuracy"),
)


def report_rows(results: dict) -> list[tuple[str, float, float | None]]:
    """(probe, encoder accuracy, raw-pixel accuracy or None) for every probe in `results`, in the order of the
    report: all labels, each label fraction (`knn_accuracy_1pct`, ...), DINOv2's linear protocol (beside the pixels'
    plain linear probe: on pixels there are no blocks to take tokens from)."""
    rows = list(_REPORT_ROWS)
    for fraction in sorted({key.rsplit("_", 1)[1] for key in results if key.startswith("knn_accuracy_")},
                           key=lambda name: float(name[:-3])):
        share = f"{fraction[:-3]}% of the labels"
        rows += [(f"kNN (k=20), {share}", f"knn_accuracy_{fraction}"),
                 (f"linear probe, {share}", f"linear_probe_accuracy_{fraction}")]
    shown = [(label, results[key], results.get(f"raw_pixels_{key}")) for label, key in rows if key in results]
    if "linear_probe_accuracy_dinov2" in results:
        shown.append(("linear probe, DINOv2 protocol", results["linear_probe_accuracy_dinov2"],
                      results.get("raw_pixels_linear_probe_accuracy")))
    return shown


def format_report(results: dict) -> str:
    """The run's last lines about its encoder: a table of every probe beside the same probe on raw pixels."""
    images = f"{results['knn_test_images']} {results['eval_split']} images"  # "10000 test images"
    if "eval_data" in results:
        images += f" of {results['eval_data']}"
    if "knn_train_images" in results:  # the kNN memory and probe training set, and whether it was capped
        memory = f"{results['knn_train_images']} training images"
        if "knn_train_images_available" in results:
            memory = (f"a seeded {results['knn_train_images']} of {results['knn_train_images_available']} training "
                      "images (--eval-train-images)")
        images += f" (kNN memory and probe training set: {memory})"
    rows = report_rows(results)
    with_floor = any(pixels is not None for _, _, pixels in rows)
    lines = [f"the encoder on {images}" + (", beside the same probe on their raw pixels (the floor):" if with_floor
                                           else ":")]
    width = max(len(label) for label, _, _ in rows)
    lines.append(f"  {'probe':<{width}}  encoder" + ("  raw pixels" if with_floor else ""))
    for label, encoder, pixels in rows:
        floor = "" if pixels is None else f"  {pixels:>9.2f}%"
        lines.append(f"  {label:<{width}}  {encoder:>6.2f}%{floor}")
    return "\n".join(lines)


def run(args: PretrainingArguments) -> dict:
    """The command's work once the flags are parsed: the run, then where everything went."""
    import transformers

    # keep the terminal to the training bar and the logs: no bar per save_pretrained / from_pretrained
    transformers.utils.logging.disable_progress_bar()
    results = run_pretraining(args)
    if results:
        output_dir = Path(args.output_dir)
        if "knn_accuracy" in results:
            print(format_report(results))
        elif args.knn:
            print("no kNN evaluation: the data has no labelled held-out images (--eval-data names some)")
        print(f"encoder (MACRLModel + image processor + model card): {output_dir / 'encoder'}")
        print(f"pictures: {output_dir / 'pictures'}   log: {output_dir / 'logs' / 'train_log.jsonl'}")
        print(f"results: {output_dir / 'results.json'}   checkpoints: {output_dir / 'checkpoints'}")
        if "hub_commit" in results:
            print(f"pushed to the Hub: {results['hub_commit']}")
    return results


def resume_command(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> str:
    """The command line that continues a run started with `argv`: the same flags with `--resume` (the newest
    checkpoint) in place of any `--resume` given, under `torchrun` with as many processes where a launcher started
    several (`environ`: its WORLD_SIZE, LOCAL_WORLD_SIZE)."""
    kept, argv = [], list(argv)
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if token == "--resume":
            if index < len(argv) and not argv[index].startswith("-"):
                index += 1  # its checkpoint
            continue
        if not token.startswith("--resume="):
            kept.append(token)
    world, local = int(environ.get("WORLD_SIZE", "1")), int(environ.get("LOCAL_WORLD_SIZE", "1"))
    if world <= 1:
        launcher = PROG
    elif world == local:
        launcher = f"torchrun --standalone --nproc-per-node {local} -m macrl.pretrain"
    else:
        launcher = (f"torchrun --nnodes {world // max(local, 1)} --nproc-per-node {local} <your rendezvous flags> "
                    "-m macrl.pretrain")
    return " ".join([launcher, shlex.join([*kept, "--resume"])])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `macrl-pretrain`; the exit codes of `macrl.command_line`."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    return run_command(
        PROG, build_parser(), run, argv, parse=_parse,
        interrupted="interrupted; the checkpoints so far are kept (continue with --resume)",
        resume=resume_command(argv),
    )


if __name__ == "__main__":
    sys.exit(main())
