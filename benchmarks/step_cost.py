"""What a recipe change costs a training step, relative to the preset: the step time that turns a quality screen's
budget into its fixed step count (`benchmarks/quality.py --step-seconds macrl=BASE_SECONDS*RATIO`).

Every variant (the preset with config overrides) trains round-robin with the others, one step each in turn, in one
process (`speed.py`'s pre-training step and round-robin), on a random batch (bf16 autocast where the CPU has bf16 kernels, AdamW, the EMA update): other load
on the machine slows every variant alike, so the ratios hold where the seconds do not.

    python benchmarks/step_cost.py --variant symmetric='{"symmetric_loss": true}'
"""

from __future__ import annotations

import argparse
import json

import torch
from speed import Result, machine_lines, pretraining_step, time_round_robin  # this folder is the script's sys.path[0]

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
    """Median seconds of a training step of each variant, timed round-robin (`speed.py`'s pre-training step)."""
    cpu = torch.device("cpu")
    steps, results = {}, {}
    for name, overrides in variants:
        torch.manual_seed(0)
        model = MACRLForPreTraining(load_config(config, **overrides)).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        size, channels = model.config.image_size, model.config.num_channels
        strong, weak = torch.randn(batch_size, channels, size, size), torch.randn(batch_size, channels, size, size)
        steps[name] = pretraining_step(model, model, optimizer, strong, weak, amp=bf16, is_macrl=True, device=cpu)
        results[name] = Result(config, name, batch_size)
    time_round_robin(steps, warmup, rounds, cpu, results)
    for result in results.values():
        if result.error is not None:
            raise RuntimeError(f"variant {result.case}: {result.error}")
    return [(name, results[name].seconds) for name, _ in variants]


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
    print("\n".join(machine_lines(torch.device("cpu"))))
    print(f"{args.config}, batch {args.batch_size}, {'bf16 autocast' if bf16 else 'fp32'}, median of {args.rounds}")
    print("| variant | s / step | vs preset |")
    print("|---|---|---|")
    base = costs[0][1]
    for name, seconds in costs:
        print(f"| {name} | {seconds:.4f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
