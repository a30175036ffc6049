"""The paper's claim at CPU scale: MACRL vs MAE-only vs MoCo-v3-only on Fashion-MNIST, at an equal wall-clock budget.

    python benchmarks/quality.py --minutes 8 --seeds 0 1            # the side-by-side comparison (about 1 hour)
    python benchmarks/quality.py --minutes 30 --seeds 0 --methods macrl   # the long MACRL run on its own

Each run is the real `macrl-pretrain` (same encoder, data, augmentations and budget; `--max-minutes` fits the step
count to the budget from a timing of real steps), then the encoder's CLS feature is evaluated on the Fashion-MNIST
test split with every probe the main job reports: the weighted kNN (k=20, T=0.07) and the linear probe with all the
training labels, with 1% and with 10% of them (seeded, class-balanced), and DINOv2's linear protocol (the CLS tokens
of the last 4 blocks and the mean patch token). Two floors sit beside them: the same encoder at random
initialisation, and raw pixels (whose "DINOv2" column is the plain linear probe: pixels have no blocks).
Finished runs are cached in `--output-dir/<run>/quality.json`, so the benchmark can be run in parts and only missing
runs are redone; a run cut short continues from its last checkpoint.
One table is printed (and written as markdown and JSON): a method's value is the mean over seeds, with the spread
(max - min) beside it; a gap smaller than the spread is a tie.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from macrl import MACRLImageProcessor, MACRLModel
from macrl.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNISTSource
from macrl.evaluation import evaluate_encoder
from macrl.evaluation import evaluate_raw_pixels as raw_pixels
from macrl.evaluation.label_subsets import DEFAULT_LABEL_FRACTIONS
from macrl.precision import cpu_runs_bf16_fast
from macrl.presets import load_config

# the three objectives on the same encoder: only the loss weights (and MoCo v3's symmetric, unmasked views) differ
METHODS = {
    "macrl": [],
    "mae": ["--contrastive-weight", "0"],
    "mocov3": ["--reconstruction-weight", "0", "--mask-ratio", "0", "--config-overrides", '{"symmetric_loss": true}'],
}

# a checkpoint (a fraction of a second for these models) every few minutes of training
CHECKPOINT_STEPS = 300


def run_pretraining(
    method: str, seed: int, minutes: float, run_dir: Path, extra: list[str], step_seconds: float | None
) -> dict:
    """`macrl-pretrain` in a subprocess; returns its results.json.

    A run cut short (a closed laptop, a session limit) continues from its newest checkpoint the next time, with the
    same step count, so a long run costs its budget once.
    """
    if not (run_dir / "results.json").exists():
        # a fixed step count (budget / quiet-machine step time) keeps the result independent of other load
        length = ["--max-minutes", str(minutes)] if step_seconds is None else [
            "--max-steps", str(max(1, round(minutes * 60 / step_seconds)))
        ]
        resume = ["--resume"] if any((run_dir / "checkpoints").glob("checkpoint-*")) else []
        command = [
            sys.executable, "-m", "macrl.pretrain",
            "--output-dir", str(run_dir), *length, "--seed", str(seed), "--no-knn",
            "--save-steps", str(CHECKPOINT_STEPS), "--save-total-limit", "1", *resume, *METHODS[method], *extra,
        ]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return json.loads((run_dir / "results.json").read_text())


# the table's columns: (key, title, the library's result key with {pool} for the pooling)
METRICS = (
    ("knn_cls", "kNN", "knn_accuracy_{pool}"),
    ("linear_cls", "linear", "linear_probe_accuracy_{pool}"),
    ("knn_1pct", "kNN 1%", "knn_accuracy_{pool}_1pct"),
    ("linear_1pct", "linear 1%", "linear_probe_accuracy_{pool}_1pct"),
    ("knn_10pct", "kNN 10%", "knn_accuracy_{pool}_10pct"),
    ("linear_10pct", "linear 10%", "linear_probe_accuracy_{pool}_10pct"),
    ("linear_dinov2", "linear DINOv2", "linear_probe_accuracy_dinov2"),
)


def _scores(results: dict, pool: str) -> dict:
    """The library's evaluation results as this table's percentages (`knn_cls`, `linear_1pct`, ...); the raw
    pixels' DINOv2 column is their plain linear probe."""
    scores = {}
    for key, _, source in METRICS:
        name = source.format(pool=pool)
        if pool == "pixels" and key == "linear_dinov2":
            name = "linear_probe_accuracy_pixels"
        if name in results:
            scores[key] = round(results[name], 2)
    return scores


def evaluate_fashion_encoder(encoder_dir: Path | None, config_name: str, seed: int, dtype: str) -> dict:
    """Every probe of the CLS feature on Fashion-MNIST's test split (`macrl-eval`'s protocol,
    `macrl.evaluation.evaluate_encoder`); a random-init encoder when `encoder_dir` is None."""
    if encoder_dir is None:
        torch.manual_seed(seed)
        model = MACRLModel(load_config(config_name))
        processor = MACRLImageProcessor(
            size={"height": 28, "width": 28}, num_channels=1, image_mean=list(FASHION_MNIST_MEAN),
            image_std=list(FASHION_MNIST_STD),
        )
    else:
        model = MACRLModel.from_pretrained(encoder_dir)
        processor = MACRLImageProcessor.from_pretrained(encoder_dir)
    results = evaluate_encoder(
        model, processor, FashionMNISTSource("train"), FashionMNISTSource("test"),
        pools=("cls",), batch_size=512, dtype=dtype, seed=seed, progress=False,
        label_fractions=DEFAULT_LABEL_FRACTIONS, dinov2_linear=True,
    )
    return _scores(results, "cls")


def evaluate_raw_pixels(seed: int) -> dict:
    results = raw_pixels(
        FashionMNISTSource("train"), FashionMNISTSource("test"), seed=seed, label_fractions=DEFAULT_LABEL_FRACTIONS
    )
    return _scores(results, "pixels")


def cached(path: Path, compute) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    started = time.monotonic()
    result = compute()
    result["eval_minutes"] = round((time.monotonic() - started) / 60, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def summarise(rows: dict[str, list[dict]], minutes: float, precision: str) -> str:
    header = "| method | " + " | ".join(title for _, title, _ in METRICS) + " | pretraining min | img/s | seeds |"
    lines = [header, "|" + "---|" * (len(METRICS) + 4)]
    for name, results in rows.items():
        cells = []
        for metric, _, _ in METRICS:
            values = [r[metric] for r in results if metric in r]
            if not values:
                cells.append("–")
                continue
            spread = max(values) - min(values)
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}" if len(values) > 1 else f"{values[0]:.2f}")
        train_minutes = [r["training_minutes"] for r in results if "training_minutes" in r]
        speed = [r["images_per_second"] for r in results if "images_per_second" in r]
        cells.append(f"{statistics.mean(train_minutes):.1f}" if train_minutes else "–")
        cells.append(f"{statistics.mean(speed):.0f}" if speed else "–")
        cells.append(str(len(results)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Budget: {minutes} min of pretraining per run, {precision}; ± is the spread (max - min) over seeds. CLS "
        "features; 1% / 10%: the probes with that share of the training labels; DINOv2: the CLS tokens of the last "
        "4 blocks and the mean patch token (for raw pixels, the plain linear probe)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="Pretraining budget per run (default: 8).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Seeds per method (default: 0 1).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--config", default="fmnist", help="Model preset shared by every method (default: fmnist).")
    parser.add_argument("--no-floors", action="store_true", help="Skip the random-init and raw-pixel floors.")
    parser.add_argument("--output-dir", default="benchmarks/results/quality", help="Where runs and tables go.")
    parser.add_argument(
        "--step-seconds",
        nargs="*",
        default=[],
        metavar="METHOD=SECONDS",
        help="Turn the budget into a fixed step count from each method's step time on a quiet machine (e.g. "
        "macrl=1.03 mae=0.68 mocov3=2.89, bf16, batch 256, measured with benchmarks/speed.py), so that other load "
        "on the machine slows a run down but does not change its result. Default: fit to the clock.",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="Pretraining and extraction precision; auto: bf16 where the CPU has bf16 kernels (AVX512, AMX), else "
        "fp32 (bf16 is ~17x slower than fp32 on AVX2). The README's tables say which they used.",
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="Further macrl-pretrain flags.")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    root = Path(args.output_dir)
    precision = args.precision if args.precision != "auto" else "bf16" if cpu_runs_bf16_fast() else "fp32"
    print(f"precision: {precision}", flush=True)
    extra = ["--config", args.config, *(["--bf16"] if precision == "bf16" else []), *args.extra]
    step_seconds = {name: float(value) for name, value in (item.split("=") for item in args.step_seconds)}
    rows: dict[str, list[dict]] = {}
    # seeds outermost: a benchmark cut short still has every method once
    for seed in args.seeds:
        for method in args.methods:
            run_dir = root / f"{method}-{args.minutes:g}min-seed{seed}"
            train = run_pretraining(method, seed, args.minutes, run_dir, extra, step_seconds.get(method))
            scores = cached(
                run_dir / "quality.json", lambda: evaluate_fashion_encoder(run_dir / "encoder", args.config, seed, precision)
            )
            rows.setdefault(method, []).append(
                {**scores, "training_minutes": train["training_minutes"], "images_per_second": train["images_per_second"]}
            )
            print(summarise(rows, args.minutes, precision), flush=True)
    if not args.no_floors:
        for seed in args.seeds:
            rows.setdefault("random-init encoder", []).append(
                cached(
                    root / f"random-init-seed{seed}.json", lambda: evaluate_fashion_encoder(None, args.config, seed, precision)
                )
            )
        rows["raw pixels"] = [cached(root / "raw-pixels.json", lambda: evaluate_raw_pixels(0))]
    table = summarise(rows, args.minutes, precision)
    print(table)
    (root / f"table-{args.minutes:g}min.md").write_text(table + "\n")
    (root / f"table-{args.minutes:g}min.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
