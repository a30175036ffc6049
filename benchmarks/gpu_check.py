"""The first GPU check: one command that measures macrl's CUDA path and prints one table.

    python benchmarks/gpu_check.py                          # on the GPU: all of it in about 8 minutes
    python benchmarks/gpu_check.py --device cpu --quick     # a smoke test of the whole script (the test suite runs it)

What it measures, in this order, each part within its share of `--minutes` (a part that runs over its share skips
what is left of it, and the table says so):

* the pre-training step (forward, backward, fused AdamW step; for MACRL also the momentum EMA) in images/s, for
  ViT-S/16 and ViT-B/16 at 224 px: MACRL vs transformers' ViTMAE (same encoder and decoder, mask 0.75) vs MACRL's
  MoCo-v3 mode, in fp32 (TF32 matmuls), bf16 autocast and bf16 autocast + torch.compile, through SDPA and, where the
  flash-attn package is installed, FlashAttention 2; the peak memory of each (`torch.cuda.max_memory_allocated`);
* feature extraction in images/s: `MACRLModel` vs timm's `VisionTransformer`, fp32 and bf16;
* host syncs: counted (`torch.cuda.set_sync_debug_mode`) during bare MACRL steps and during steps of the real
  `MACRLPretrainer` loop (data loading, pinned non-blocking copies, the Trainer's step, the EMA callback);
* a 2-minute end-to-end `macrl-pretrain` on a folder of synthetic class images this script writes (no download, no
  `datasets`): images/s, steps, the time to the first step and the kNN accuracy of the encoder.

No GPU at hand, `--device cpu --quick` runs every part on tiny models in a few tens of seconds; its numbers say
nothing about a GPU. On a CPU the host syncs are counted with a dispatch mode (the operations that would wait for a
GPU: `.item()`, `bool(tensor)`, `nonzero`, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if __package__ in (None, ""):  # run as a script: the repository root holds the benchmarks package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.speed import (  # noqa: E402
    SIZES,
    Size,
    macrl_config,
    pretraining_step,
    timm_model,
    vitmae_model,
)

# ----------------------------------------------------------------------------------------------------- what runs

GPU_SIZES = {
    "ViT-S/16": Size("vit-small-patch16-224", {}, batch=256, label="ViT-S/16 @ 224 px, decoder 512 x 8"),
    "ViT-B/16": Size("vit-base-patch16-224", {}, batch=128, label="ViT-B/16 @ 224 px, decoder 512 x 8"),
}
QUICK_SIZES = {"tiny": SIZES["quick"]}
STEP_MODELS = ("MACRL", "ViTMAE", "MACRL MoCo-v3 mode")
PRECISIONS = ("fp32", "bf16", "bf16+compile")
# the shares of --minutes; what is left over is slack for imports, start-up and the table
SHARES = {"steps": 0.38, "extract": 0.06, "syncs": 0.04, "end-to-end": 0.48}
# host syncs are what make the host wait for the device inside a step: these operations do, on a GPU
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "_unique2", "unique_dim", "unique_consecutive"}
# what reads values on the host only when the tensors are on the CPU (MACRLModel's NaN check of its input), so it is
# no sync on a GPU: counted apart
CPU_ONLY_CHECKS = {"check_pixel_values"}


@dataclass
class Row:
    part: str
    case: str
    values: dict[str, str] = field(default_factory=dict)


class Part:
    """A part's time share: `over()` once it is spent, and the reason a skipped measurement gives."""

    def __init__(self, name: str, seconds: float):
        self.name, self.seconds, self.started = name, seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def over(self) -> bool:
        return self.left() <= 0

    def reason(self) -> str:
        return f"skipped: {self.name} over its {self.seconds:.0f} s share"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------- host syncs


class _SyncOpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.cpu_only = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_name not in CPU_ONLY_CHECKS:
                frame = frame.f_back
            if frame is None:
                self.ops[f"{name} in {_caller()}"] += 1
            else:
                self.cpu_only += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The innermost frame outside torch: where an operation was called from."""
    frame = sys._getframe(2)
    while frame is not None and "/torch/" in frame.f_code.co_filename:
        frame = frame.f_back
    return "?" if frame is None else f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


class HostSyncCounter:
    """Counts host syncs between `start()` and `stop()`: on CUDA the synchronising calls that
    `torch.cuda.set_sync_debug_mode("warn")` reports, elsewhere the operations that would synchronise on a GPU
    (`SYNC_OPS`, seen by a dispatch mode; `cpu_only` counts those of `CPU_ONLY_CHECKS` apart). `ops` names what was
    counted and where."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ops: Counter = Counter()
        self.cpu_only = 0
        self._active = None

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)  # the work before the window must not be counted in it
            self._active = warnings.catch_warnings(record=True)
            self._records = self._active.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._active = _SyncOpCounter()
            self._active.__enter__()

    def stop(self) -> None:
        if self._active is None:
            return
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            self._active.__exit__(None, None, None)
            for record in self._records:
                if "synchroniz" in str(record.message):
                    self.ops[str(record.message).split("\n")[0][:60]] += 1
        else:
            self._active.__exit__(None, None, None)
            self.ops.update(self._active.ops)
            self.cpu_only += self._active.cpu_only
        self._active = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def sync_note(counter: HostSyncCounter) -> str:
    """What the syncs were, and the CPU-only checks left out of the count."""
    parts = [f"{name} x{count}" for name, count in counter.ops.most_common(3)]
    if counter.cpu_only:
        parts.append(f"not counted: {counter.cpu_only} CPU-only input checks")
    return ", ".join(parts)[:110]


def sync_counting_callback(counter: HostSyncCounter, first: int, last: int):
    """A `TrainerCallback` that counts the host syncs of Trainer steps `first`..`last` (1-based), whole: from the end of
    step `first - 1` (its EMA and logging done) to the end of step `last` (before its logging)."""
    from transformers import TrainerCallback

    class SyncCounting(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == first - 1:
                counter.start()
            elif state.global_step == last:
                counter.stop()

        def on_train_end(self, args, state, control, **kwargs):
            counter.stop()

    return SyncCounting()


class RandomViews(torch.utils.data.Dataset):
    """Pre-training samples of random pixels, already augmented: the Trainer's data path without image decoding."""

    def __init__(self, config, length: int):
        self.config, self.length = config, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        c, s = self.config.num_channels, self.config.image_size
        return {
            "pixel_values": torch.randn(c, s, s, generator=generator),
            "momentum_pixel_values": torch.randn(c, s, s, generator=generator),
            "noise": torch.rand(self.config.num_patches, generator=generator),
        }


def trainer_step_syncs(config, batch: int, device: torch.device, output_dir: Path, bf16: bool,
                       steps: int = 6) -> HostSyncCounter:
    """Host syncs of steps 3..`steps` of the real `MACRLPretrainer` loop (as `macrl-pretrain` builds it), logging only
    at the last step."""
    from macrl import MACRLForPreTraining
    from macrl.training.arguments import PretrainingArguments
    from macrl.training.budget import TrainingClock
    from macrl.training.callbacks import RunCallbacks
    from macrl.training.checkpoints import AtomicCheckpoints
    from macrl.training.plan import StepPlan, build_training_arguments, plan_run
    from macrl.training.trainer import MACRLPretrainer

    args = PretrainingArguments(
        output_dir=str(output_dir), batch_size=batch, max_steps=steps, logging_steps=10**6, save_steps=10**6,
        bf16=bf16, device=device.type, num_workers=0 if device.type == "cpu" else None,
    )
    plan = plan_run(args, device=device)
    training_args = build_training_arguments(args, plan, StepPlan(max_steps=steps, bf16=bf16))
    counter = HostSyncCounter(device)
    callbacks = RunCallbacks(
        clock=TrainingClock(bf16=bf16), checkpoints=AtomicCheckpoints(plan.checkpoint_dir, 1),
        extra=[sync_counting_callback(counter, 3, steps)],
    )
    trainer = MACRLPretrainer(
        MACRLForPreTraining(config), training_args, train_dataset=RandomViews(config, batch * steps),
        run_callbacks=callbacks, global_batch_size=batch,
    )
    trainer.train()
    return counter


# ------------------------------------------------------------------------------------------------------ the steps


def build_step(size: Size, model_name: str, precision: str, attention: str, device: torch.device):
    """One pre-training case: returns its step function."""
    from macrl import MACRLForPreTraining
    from macrl.devices import has_fused_adamw

    overrides = dict(reconstruction_weight=0.0, mask_ratio=0.0, symmetric_loss=True) if "MoCo" in model_name else {}
    config = macrl_config(size, **overrides)
    torch.manual_seed(0)
    model = vitmae_model(config) if model_name == "ViTMAE" else MACRLForPreTraining(config)
    if attention != "sdpa":
        model.set_attn_implementation(attention)
    model = model.to(device).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1.5e-4, weight_decay=0.05, fused=has_fused_adamw(device) or None)
    generator = torch.Generator().manual_seed(0)
    shape = (size.batch, config.num_channels, config.image_size, config.image_size)
    x, x2 = (torch.randn(shape, generator=generator).to(device) for _ in range(2))
    forward = torch.compile(model) if precision.endswith("compile") else model
    amp = precision.startswith("bf16")
    is_macrl = model_name != "ViTMAE"
    return pretraining_step(model, forward, optimizer, x, x2, amp=amp, is_macrl=is_macrl, device=device)


def time_steps(step: Callable[[], None], batch: int, device: torch.device, warmup: int, repeats: int) -> dict:
    """images/s over `repeats` steps after `warmup`, and the peak memory of all of them."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    result = {"img/s": f"{batch * repeats / seconds:.1f}"}
    if device.type == "cuda":
        result["peak MiB"] = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"
    return result


def attentions(device: torch.device) -> list[str]:
    from transformers.utils import is_flash_attn_2_available

    return ["sdpa"] + (["flash_attention_2"] if device.type == "cuda" and is_flash_attn_2_available() else [])


def run_steps(sizes: dict[str, Size], device: torch.device, part: Part, quick: bool, rows: list[Row],
              notes: list[str]) -> None:
    """Every case's row in table order, measured in two rounds: the eager cases of every size first, then the
    compiled ones (their compiling takes most of the share, so a share that runs out skips those)."""
    warmup, repeats = (1, 1) if quick else (3, 10)
    if "flash_attention_2" not in attentions(device):
        notes.append("flash_attention_2: skipped, the flash-attn package is not installed (or no CUDA device)")
    cases = []
    for size_name, size in sizes.items():
        for attention in attentions(device):
            for model_name in STEP_MODELS:
                for precision in PRECISIONS:
                    row = Row("pretrain step", f"{size_name} {model_name} {attention} {precision}",
                              {"batch": str(size.batch)})
                    rows.append(row)
                    cases.append((row, size, model_name, precision, attention))
    for compiled in (False, True):
        for row, size, model_name, precision, attention in cases:
            if precision.endswith("compile") != compiled:
                continue
            if compiled and device.type != "cuda":
                row.values["note"] = "skipped: compile is timed on a GPU only"
                continue
            if attention != "sdpa" and precision == "fp32":
                row.values["note"] = "skipped: FlashAttention runs in bf16/fp16 only"
                continue
            if part.over():
                row.values["note"] = part.reason()
                continue
            step = None
            try:
                step = build_step(size, model_name, precision, attention, device)
                row.values.update(time_steps(step, size.batch, device, warmup, repeats))
                if model_name == "MACRL" and precision == "bf16" and attention == "sdpa":
                    with HostSyncCounter(device) as counter:
                        for _ in range(2):
                            step()
                    row.values["host syncs/step"] = f"{counter.count / 2:g}"
                    row.values["note"] = sync_note(counter)
            except Exception as error:  # one failing case is a row, the others go on
                row.values["note"] = f"error: {type(error).__name__}: {error}"[:90]
            finally:
                del step
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def run_extract(sizes: dict[str, Size], device: torch.device, part: Part, quick: bool, rows: list[Row]) -> None:
    from macrl import MACRLModel

    warmup, repeats = (1, 2) if quick else (3, 20)
    for size_name, size in sizes.items():
        config = macrl_config(size)
        config._attn_implementation = "sdpa"
        x = torch.randn(size.batch, config.num_channels, config.image_size, config.image_size).to(device)
        for name in ("MACRLModel", "timm ViT"):
            model = (MACRLModel(config) if name == "MACRLModel" else timm_model(config)).to(device).eval()
            for precision in ("fp32", "bf16"):
                row = Row("extract", f"{size_name} {name} {precision}", {"batch": str(size.batch)})
                rows.append(row)
                if part.over():
                    row.values["note"] = part.reason()
                    continue

                def step(model=model, amp=precision == "bf16"):
                    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        model(x)

                try:
                    row.values.update(time_steps(step, size.batch, device, warmup, repeats))
                except Exception as error:
                    row.values["note"] = f"error: {type(error).__name__}: {error}"[:90]
            del model


def run_syncs(sizes: dict[str, Size], device: torch.device, part: Part, quick: bool, rows: list[Row]) -> None:
    size_name, size = next(iter(sizes.items()))
    batch = size.batch if quick else 64
    row = Row("host syncs", f"{size_name} MACRLPretrainer steps 3-6 (bf16)", {"batch": str(batch)})
    rows.append(row)
    if part.over():
        row.values["note"] = part.reason()
        return
    try:
        # the Trainer prints its log lines: not in the middle of this script's output
        with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
            counter = trainer_step_syncs(macrl_config(size), batch, device, Path(folder), bf16=True)
        row.values["host syncs/step"] = f"{counter.count / 4:g}"
        row.values["note"] = sync_note(counter)
    except Exception as error:
        row.values["note"] = f"error: {type(error).__name__}: {error}"[:90]


# ----------------------------------------------------------------------------------------------------- end to end


def write_class_images(folder: Path, classes: int, per_class: int, size: int, seed: int = 0) -> None:
    """`classes` subfolders of JPEG images: each class a grating of its own orientation and colour, at a random phase
    and frequency, with noise, so a kNN on a few minutes' features tells the classes apart (or does not)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for label in range(classes):
        target = folder / f"class_{label}"
        target.mkdir(parents=True, exist_ok=True)
        angle = np.pi * label / classes
        colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 173) % 256]) / 255
        for index in range(per_class):
            frequency = rng.uniform(3, 6)
            wave = np.sin(2 * np.pi * frequency * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6.3))
            pixels = 0.5 + 0.35 * wave[..., None] * (2 * colour - 1) + rng.normal(0, 0.08, (size, size, 3))
            # JPEG: a noisy PNG costs many times more CPU to write, and the workers decode every image every epoch
            # (benchmarks/results/gpu-check.md)
            Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8)).save(target / f"{index:04d}.jpg", quality=90)


def _checkout_env() -> dict[str, str]:
    """The environment with this checkout first on the import path: the macrl the table measures, installed or not."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def run_end_to_end(device: torch.device, part: Part, quick: bool, rows: list[Row]) -> None:
    row = Row("end to end", "macrl-pretrain " + ("tiny, 4 steps" if quick else "ViT-S/16, --max-minutes 2"))
    rows.append(row)
    with tempfile.TemporaryDirectory() as folder:
        data, output = Path(folder) / "images", Path(folder) / "run"
        started = time.monotonic()
        if quick:
            write_class_images(data, classes=4, per_class=24, size=32)
            size = QUICK_SIZES["tiny"]
            flags = ["--config", size.preset, "--config-overrides", json.dumps(size.overrides),
                     "--batch-size", "16", "--max-steps", "4", "--num-workers", "0"]
        else:
            write_class_images(data, classes=10, per_class=150, size=224)
            flags = ["--config", "vit-small-patch16-224", "--batch-size", "256", "--max-minutes", "2"]
        row.values["images written s"] = f"{time.monotonic() - started:.1f}"
        command = [sys.executable, "-m", "macrl.pretrain", "--data", str(data), "--output-dir", str(output),
                   "--device", device.type, "--logging-steps", "20", "--eval-images", "400", *flags]
        timeout = max(part.left(), 30.0)
        started = time.monotonic()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_checkout_env())
        except subprocess.TimeoutExpired:
            row.values["note"] = f"skipped: still running after its {timeout:.0f} s share"
            return
        row.values["wall s"] = f"{time.monotonic() - started:.1f}"
        if result.returncode != 0:
            row.values["note"] = "error: " + ((result.stderr.strip().splitlines() or ["?"])[-1])[:90]
            return
        results = json.loads((output / "results.json").read_text())
    row.values.update({
        "img/s": f"{results['images_per_second']:.1f}",
        "steps": str(results["steps"]),
        "first step s": str(results.get("seconds_to_first_step")),
        "kNN %": str(results.get("knn_accuracy", "-")),
        "note": f"bf16 {results['bf16']}, {results['num_workers']} workers, {results['total_minutes']} min in all",
    })


# ------------------------------------------------------------------------------------------------------ the table

COLUMNS = ("part", "case", "batch", "img/s", "peak MiB", "host syncs/step", "steps", "first step s", "kNN %",
           "images written s", "wall s", "note")


def format_table(rows: list[Row]) -> str:
    columns = [column for column in COLUMNS if column in ("part", "case") or any(column in row.values for row in rows)]
    cells = [list(columns)] + [
        [row.part, row.case] + [row.values.get(column, "") for column in columns[2:]] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def environment_lines(device: torch.device) -> list[str]:
    import timm
    import transformers

    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        name = (f"{torch.cuda.get_device_name(device)} ({properties.total_memory / 2**30:.0f} GiB, "
                f"compute capability {properties.major}.{properties.minor})")
    else:
        name = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"
    return [
        f"device: {name}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
        f"transformers {transformers.__version__}, timm {timm.__version__}, python {platform.python_version()}",
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke test of every part")
    parser.add_argument("--minutes", type=float, default=None, help="time for all parts (default 7.75, 3 with --quick)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    minutes = args.minutes if args.minutes is not None else (3.0 if args.quick else 7.75)
    from macrl.devices import has_tf32

    if has_tf32(device):
        # what the Trainer's tf32=True calls (torch refuses a mix of its old and new TF32 switches): the fp32 rows
        # run TF32 matmuls, as a run trains
        from transformers.utils.import_utils import enable_tf32

        enable_tf32(True)
    sizes = QUICK_SIZES if args.quick else GPU_SIZES
    started = time.monotonic()
    rows: list[Row] = []
    notes: list[str] = []
    parts = {name: Part(name, share * minutes * 60) for name, share in SHARES.items()}
    runs = {
        "steps": lambda part: run_steps(sizes, device, part, args.quick, rows, notes),
        "extract": lambda part: run_extract(sizes, device, part, args.quick, rows),
        "syncs": lambda part: run_syncs(sizes, device, part, args.quick, rows),
        "end-to-end": lambda part: run_end_to_end(device, part, args.quick, rows),
    }
    spent = {}
    for name, run in runs.items():
        part = parts[name]
        part.started = time.monotonic()  # each share starts when its part does
        run(part)
        spent[name] = time.monotonic() - part.started

    for line in environment_lines(device):
        print(line)
    print("sizes: " + "; ".join(f"{name}: {size.label}" for name, size in sizes.items()))
    print(f"took {time.monotonic() - started:.0f} s of the {minutes * 60:.0f} s allowed"
          + (" (--quick: tiny models, the numbers say nothing about a GPU)" if args.quick else ""))
    print("parts: " + ", ".join(f"{name} {spent[name]:.0f} of {parts[name].seconds:.0f} s" for name in runs))
    print()
    print(format_table(rows))
    print()
    print("img/s counts images (MACRL's two views of an image count once); a step is forward, backward, fused AdamW "
          "(+ momentum EMA for MACRL);\nfp32 rows use TF32 matmuls where the GPU has them; host syncs/step: 0 means "
          "the step never waits for the device.")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
