"""What a recipe change costs a training step, relative to the preset: the step time that turns a quality screen's
budget into its fixed step count (`benchmarks/quality.py --step-seconds macrl=BASE_SECONDS*RATIO`).

Every variant (the preset with config overrides) trains round-robin with the others, one step each in turn, in one
process, on the same random batch (bf16 autocast where the CPU has bf16 kernels, AdamW, the EMA update): other load
on the machine slows every variant alike, so the ratios hold where the seconds do not.

    python benchmarks/step_cost.py --variant symmetric='{"symmetric_loss": true}'
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from macrl import MACRLForPreTraining
from macrl.precision import cpu_runs_bf16_fast
from macrl.presets import load_config


def _variant(text: str) -> tuple[str, dict]:
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    return name, json.loads(overrides)


def step_costs(config: str, variants: list[tuple[str, dict]], batch_size: int, rounds: int, warmup: int,
               bf16: bool) -> list[tuple[str, float]]:
    """Median seconds of a training step of each variant, measured round-robin."""
    models, optimizers = [], []
    for _, overrides in variants:
        torch.manual_seed(0)
        model = MACRLForPreTraining(load_config(config, **overrides)).train()
        models.append(model)
        optimizers.append(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    size, channels = models[0].config.image_size, models[0].config.num_channels
    strong, weak = torch.randn(batch_size, channels, size, size), torch.randn(batch_size, channels, size, size)

    def step(index: int) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = models[index](strong, weak).loss
        loss.backward()
        optimizers[index].step()
        optimizers[index].zero_grad(set_to_none=True)
        models[index].update_momentum_branch(0.5)
        return time.perf_counter() - started

    times: list[list[float]] = [[] for _ in variants]
    for round_ in range(warmup + rounds):
        for index in range(len(variants)):
            seconds = step(index)
            if round_ >= warmup:
                times[index].append(seconds)
    return [(name, statistics.median(seconds)) for (name, _), seconds in zip(variants, times)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="fmnist", help="the preset every variant starts from (default: fmnist)")
    parser.add_argument("--variant", type=_variant, action="append", default=[], metavar="NAME=JSON",
                        help="a variant: config overrides as JSON (repeatable); the preset itself always comes first")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per variant (default: 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default: 3)")
    args = parser.parse_args()
    bf16 = cpu_runs_bf16_fast()
    costs = step_costs(args.config, [("preset", {}), *args.variant], args.batch_size, args.rounds, args.warmup, bf16)
    print(f"{args.config}, batch {args.batch_size}, {'bf16 autocast' if bf16 else 'fp32'}, median of {args.rounds}")
    print("| variant | s / step | vs preset |")
    print("|---|---|---|")
    base = costs[0][1]
    for name, seconds in costs:
        print(f"| {name} | {seconds:.4f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
