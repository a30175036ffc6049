"""The main job's share of a CPU that other work shares: OpenMP's waiting and the thread count, quiet and under load.

    python benchmarks/fair_share.py                      # 7 settings x (quiet, 2 busy processes), 2 rounds
    python benchmarks/fair_share.py --settings "macrl's commands" passive   # against libgomp default only
    python benchmarks/fair_share.py --steps 40 --rounds 1

Each cell is a real `python -m macrl.pretrain --max-steps STEPS --no-knn --bf16` (the main job's model and data) in a
fresh process, its images/s read from results.json (the Trainer's count over the whole training loop). The settings:

* `macrl's commands`: no setting, so the command chooses (`macrl.openmp_waiting`): a short spin where nothing else
  runs when it starts, passive waiting beside other work;
* `libgomp default`: OpenMP threads spin for a while at every barrier before they sleep (`GOMP_SPINCOUNT=300000`,
  libgomp's value when `OMP_WAIT_POLICY` is unset; setting it keeps macrl's command default away);
* `spin 10,000` and `spin 1,000`: `GOMP_SPINCOUNT`, a shorter spin before sleeping (10,000: macrl's quiet choice);
* `passive`: `OMP_WAIT_POLICY=PASSIVE`, threads sleep at once (macrl's choice beside other work);
* `1 thread`, default and passive: `OMP_NUM_THREADS=1`.

The load is `--load` busy processes (pure Python loops, one core each), started before the run and stopped after.
Settings are taken in turns within each round, so a change of machine load hits all of them alike; the table
gives the median over rounds and, per load, each setting's speed relative to `libgomp default`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "macrl's commands": {},
    "libgomp default": {"GOMP_SPINCOUNT": "300000"},
    "spin 10,000": {"GOMP_SPINCOUNT": "10000"},
    "spin 1,000": {"GOMP_SPINCOUNT": "1000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread, default": {"GOMP_SPINCOUNT": "300000", "OMP_NUM_THREADS": "1"},
    "1 thread, passive": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
}
BUSY_LOOP = "while True: pass"


def cpu_name() -> str:
    """The CPU's model name and its bf16 instructions, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = [flag for flag in ("amx_bf16", "avx512_bf16") if f" {flag}" in text]
    return f"{name} ({', '.join(flags) or 'no AMX / AVX512-BF16'}), {os.cpu_count()} CPUs"


def images_per_second(setting: dict[str, str], steps: int, workers: int) -> float:
    """One `macrl-pretrain` run of `steps` steps in a fresh process with `setting`'s environment."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as output:
        subprocess.run(
            [sys.executable, "-m", "macrl.pretrain", "--max-steps", str(steps), "--no-knn", "--bf16",
             "--num-workers", str(workers), "--save-steps", str(10 * steps), "--output-dir", output],
            env={**environment, **setting}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        return json.loads(Path(output, "results.json").read_text())["images_per_second"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per run (default: 60)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per cell, in turns (default: 2)")
    parser.add_argument("--load", type=int, default=2, help="busy processes for the loaded column (default: 2)")
    parser.add_argument("--num-workers", type=int, default=1, help="data workers, as the main job (default: 1)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), metavar="SETTING",
                        help=f"the settings to measure (default: all of {', '.join(SETTINGS)})")
    args = parser.parse_args(argv)
    settings = {name: SETTINGS[name] for name in dict.fromkeys(["libgomp default", *args.settings])}
    print(f"CPU: {cpu_name()}; {args.steps} steps of `macrl-pretrain --bf16`, {args.num_workers} data worker(s)",
          flush=True)
    speeds: dict[tuple[int, str], list[float]] = {}
    for load in (0, args.load):
        busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(load)]
        try:
            for _ in range(args.rounds):
                for name, setting in settings.items():
                    speed = images_per_second(setting, args.steps, args.num_workers)
                    speeds.setdefault((load, name), []).append(speed)
                    print(f"  load {load}, {name}: {speed:.0f} img/s", file=sys.stderr, flush=True)
        finally:
            for process in busy:
                process.kill()
                process.wait()
    print("| setting | quiet img/s | vs default | " + f"{args.load} busy processes img/s | vs default |")
    print("|---|---|---|---|---|")
    for name in settings:
        cells = []
        for load in (0, args.load):
            median = statistics.median(speeds[(load, name)])
            cells += [f"{median:.0f}", f"{median / statistics.median(speeds[(load, 'libgomp default')]):.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
