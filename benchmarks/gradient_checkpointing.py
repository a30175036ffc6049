"""What `--gradient-checkpointing` saves and costs: the memory and time of a training step with and without it.

    python benchmarks/gradient_checkpointing.py                            # ViT-S/16 @ 224 px, batch 32, CPU
    python benchmarks/gradient_checkpointing.py --preset tiny --batch 8    # seconds: the test suite's smoke run

Two tasks, each with and without gradient checkpointing turned on as the commands turn it on
(`macrl.evaluation.finetune.enable_checkpointing`, `use_reentrant=False`):

* pre-training: a `MACRLForPreTraining` step (`macrl-pretrain --gradient-checkpointing`): the main encoder on the
  visible quarter of the patches, with grad; the decoder; the momentum encoder without grad (nothing to recompute);
* fine-tuning: a `MACRLForImageClassification` step (`macrl-eval --finetune-epochs N --gradient-checkpointing`): the
  encoder on every patch, with grad.

Each step is forward, backward, AdamW step, on random images. Peak memory is `speed.peak_mb` (on CPU the peak RSS of
a fresh process that builds the case and runs two steps, above its RSS after the imports; on a GPU
`torch.cuda.max_memory_allocated` of two steps); the time is the median of `--repeats` steps after one warm-up, the
two variants of a task taking turns so that outside load slows both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from speed import machine_lines, peak_mb  # this folder is the script's sys.path[0]

TASKS = ("pre-training", "fine-tuning")
MEMORY_STEPS = 2  # the first step also allocates the gradients and AdamW's state


def build_step(task: str, preset: str, batch: int, checkpointing: bool, device: torch.device) -> Callable[[], None]:
    """One training step of `task` on the `preset` model (its model, optimiser and random inputs built here)."""
    from macrl import MACRLForImageClassification, MACRLForPreTraining
    from macrl.evaluation.finetune import enable_checkpointing
    from macrl.presets import load_config

    torch.manual_seed(0)
    config = load_config(preset)
    shape = (batch, config.num_channels, config.image_size, config.image_size)
    images, views = torch.randn(shape, device=device), torch.randn(shape, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    if task == "pre-training":
        model = MACRLForPreTraining(config)
        inputs = {"pixel_values": images, "momentum_pixel_values": views}
    else:
        config.num_labels = 10
        model = MACRLForImageClassification(config)
        inputs = {"pixel_values": images, "labels": labels}
    model = model.to(device).train()
    if checkpointing:
        enable_checkpointing(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_memory(task: str, preset: str, batch: int, checkpointing: bool, device: torch.device) -> float:
    """Peak MiB of building the case and `MEMORY_STEPS` steps: on CPU in a fresh process (this script as a worker)."""
    if device.type == "cuda":
        step = build_step(task, preset, batch, checkpointing, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(MEMORY_STEPS):
            step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", task, preset, str(batch),
               str(int(checkpointing))]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"the memory worker failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def memory_worker(task: str, preset: str, batch: int, checkpointing: bool) -> None:
    import macrl.modeling_macrl  # noqa: F401 - the imports are the baseline, not part of the case

    def work() -> None:
        step = build_step(task, preset, batch, checkpointing, torch.device("cpu"))
        for _ in range(MEMORY_STEPS):
            step()

    print(json.dumps({"peak_mb": peak_mb(work)}))


def measure_time(task: str, preset: str, batch: int, repeats: int, device: torch.device) -> dict[bool, float]:
    """Median seconds of a step, without and with checkpointing, the two taking turns."""
    steps = {checkpointing: build_step(task, preset, batch, checkpointing, device) for checkpointing in (False, True)}
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(repeats + 1):
        for checkpointing, step in steps.items():
            started = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:  # the first is the warm-up
                seconds[checkpointing].append(time.perf_counter() - started)
    return {checkpointing: statistics.median(values) for checkpointing, values in seconds.items()}


def table(preset: str, batch: int, repeats: int, device: torch.device) -> str:
    lines = [
        *machine_lines(device),
        f"model: the {preset} preset, batch {batch}; {MEMORY_STEPS} steps for the memory, the median of {repeats} "
        "for the time",
        "",
        "| task | gradient checkpointing | peak memory MiB | saved | s / step | slower |",
        "|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        memory = {checkpointing: measure_memory(task, preset, batch, checkpointing, device) for checkpointing in (False, True)}
        seconds = measure_time(task, preset, batch, repeats, device)
        for checkpointing in (False, True):
            saved = f"{100 * (1 - memory[True] / memory[False]):.0f}%" if checkpointing else ""
            slower = f"{seconds[True] / seconds[False]:.2f}x" if checkpointing else ""
            lines.append(
                f"| {task} | {'on' if checkpointing else 'off'} | {memory[checkpointing]:.0f} | {saved} | "
                f"{seconds[checkpointing]:.3f} | {slower} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if argv is None and sys.argv[1:2] == ["--memory-worker"]:
        task, preset, batch, checkpointing = sys.argv[2:6]
        memory_worker(task, preset, int(batch), checkpointing == "1")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit-small-patch16-224", help="a macrl.presets preset (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    args = parser.parse_args(argv)
    print(table(args.preset, args.batch, args.repeats, torch.device(args.device)))


if __name__ == "__main__":
    main()
