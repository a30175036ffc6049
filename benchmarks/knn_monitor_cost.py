"""The kNN monitor's share of a pre-training run (`macrl-pretrain --knn-every N`), and the online probe's
(`--online-probe`).

    python benchmarks/knn_monitor_cost.py                       # 240 steps of the main job, monitor every 80 steps
    python benchmarks/knn_monitor_cost.py --online-probe        # the same with the online linear probe
    python benchmarks/knn_monitor_cost.py --steps 40 --every 20 # a smoke run (the test suite's)

One real `macrl-pretrain` run of the README's main job (the embedded Fashion-MNIST, the default preset) with the
monitor on, in a subprocess; its results.json gives the training time and the seconds the monitor took, so the two
are measured side by side in one run under the same load. From the time of one monitor pass and of one step, the
table gives the monitor's share of a run at each cadence N: one pass every N steps costs `pass / (N x step + pass)`.
With `--online-probe` the probe's share is measured the same way: its training step at every step and its pass
(evaluated with the monitor) every N steps, `(N x probe step + probe pass) / (N x (step + probe step) + both
passes)`, the monitor's share then counting the probe's time in the run too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from speed import machine_lines  # this folder is the script's sys.path[0]

# the cadences the table shows; the README's main job uses the smallest one under TARGET_SHARE
CADENCES = (25, 50, 100, 200, 400)
TARGET_SHARE = 0.05


def run(steps: int, every: int, extra: list[str]) -> dict:
    """One `macrl-pretrain` run with the monitor on; its results.json."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "macrl.pretrain", "--output-dir", tmp, "--max-steps", str(steps),
            "--knn-every", str(every), "--no-knn", "--logging-steps", str(every), "--save-steps", str(10 * steps),
            *extra,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"macrl-pretrain failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        return json.loads((Path(tmp) / "results.json").read_text())


def table(results: dict, steps: int, every: int) -> str:
    passes = steps // every + (steps % every != 0)  # every N steps, and at the last one
    pass_seconds = results["knn_monitor_seconds"] / passes
    probe = "online_probe_seconds" in results
    probe_pass = results.get("online_probe_eval_seconds", 0.0) / passes
    probe_step = (results.get("online_probe_seconds", 0.0) - probe_pass * passes) / steps
    others = results["knn_monitor_seconds"] + results.get("online_probe_seconds", 0.0)  # the steps' share left
    step_seconds = (results["training_seconds"] - others) / steps
    lines = [
        *machine_lines(torch.device("cpu")),
        f"measured: {steps} steps, {passes} monitor passes: {step_seconds:.3f} s / step, {pass_seconds:.2f} s / pass "
        f"({results['knn_monitor_seconds']:.1f} s of {results['training_seconds']:.0f} s of training, "
        f"last monitor kNN {results['knn_monitor_last']}%)",
    ]
    if probe:
        lines.append(
            f"online probe: {1000 * probe_step:.2f} ms / step, {probe_pass:.2f} s / pass "
            f"({results['online_probe_seconds']:.1f} s in all, last accuracy {results['online_probe_last']}%)"
        )
    lines += ["", "| --knn-every | monitor share of the run |" + (" online probe share |" if probe else ""),
              "|---|---|" + ("---|" if probe else "")]
    for cadence in CADENCES:
        total = cadence * (step_seconds + probe_step) + pass_seconds + probe_pass
        share = pass_seconds / total
        probe_share = f" {100 * (cadence * probe_step + probe_pass) / total:.1f}% |" if probe else ""
        lines.append(f"| {cadence} | {100 * share:.1f}% |{probe_share}")
    fitting = [c for c in CADENCES if pass_seconds / (c * step_seconds + pass_seconds) < TARGET_SHARE]
    lines += ["", f"smallest cadence under {100 * TARGET_SHARE:.0f}%: {fitting[0] if fitting else 'none shown'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--every", type=int, default=80)
    parser.add_argument("--online-probe", action="store_true", help="also the online probe's share")
    parser.add_argument("extra", nargs="*", help="more macrl-pretrain flags (after --)")
    args = parser.parse_args(argv)
    extra = [*args.extra, "--online-probe"] if args.online_probe else args.extra
    print(table(run(args.steps, args.every, extra), args.steps, args.every))


if __name__ == "__main__":
    main()
