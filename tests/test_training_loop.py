"""The pre-training run as its user lives it: a time budget that finishes its schedules under outside load and keeps
its budget across a resume, a log line and plot for every run, the kNN monitor, experiment tracking."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from macrl.precision import cpu_runs_bf16_fast
from macrl.pretrain import main

# the tiny preset on a few hundred Fashion-MNIST images: a step takes a few tens of milliseconds
TINY = ["--config", "tiny", "--batch-size", "32", "--num-workers", "0", "--limit-images", "512", "--logging-steps", "5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
BUSY = "import time\nend = time.time() + 120\nwhile time.time() < end: pass\n"


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "logs" / "train_log.jsonl").read_text().splitlines()]


def test_budget_run_under_outside_load_still_ends_its_schedules(tmp_path):
    """Load that starts after the step-time probe slows the run down: the budget ends it early in steps, and yet the
    learning rate has decayed to (almost) 0 and the momentum reached 1, because the schedules follow the clock."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "macrl.pretrain", *TINY, "--max-minutes", "0.4", "--no-knn", "--output-dir", out]
    run = subprocess.Popen([str(c) for c in command], env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    busy, lines = [], []
    try:
        for line in run.stderr:  # the probe has fitted the steps: from now on the machine is busy
            lines.append(line)
            if "fit the budget" in line:
                busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(max(2, os.cpu_count() or 2))]
                break
        lines += run.stderr.readlines()
        assert run.wait(timeout=300) == 0, "".join(lines)
    finally:
        for process in busy:
            process.kill()
    text = "".join(lines)
    fitted = int(re.search(r"(\d+) steps of 32 images fit the budget", text).group(1))
    results = json.loads((out / "results.json").read_text())
    assert results["stopped_by_time_budget"] and "budget ended the run" in text
    assert results["steps"] < fitted  # the load cost steps...
    peak = 3e-4 * 32 / 256
    assert results["final_learning_rate"] < 0.05 * peak, results  # ...but not the end of the schedules
    assert results["final_momentum"] > 0.999, results
    assert _log(out)[-1]["step"] == results["steps"]  # the last step is logged
    # precision unset: both timed where the CPU has bf16 kernels (the faster one trains), fp32 alone where it has none
    assert ("s in bf16," in text) == cpu_runs_bf16_fast(), text
    assert results["bf16"] is False or cpu_runs_bf16_fast()


def test_resumed_budget_run_keeps_its_budget(tmp_path):
    """A budget run killed after a checkpoint and resumed counts the time it had already spent."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "macrl.pretrain", *TINY, "--max-minutes", "0.4", "--no-knn", "--save-steps", "10",
            "--output-dir", str(out)]  # fmt: skip
    first = subprocess.Popen([str(c) for c in base], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not any((out / "checkpoints").glob("checkpoint-*")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    first.send_signal(signal.SIGKILL)
    first.wait()
    checkpoints = sorted(out.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "no checkpoint before the kill"
    spent_before = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["stateful_callbacks"][
        "TrainingClock"]["attributes"]["spent_seconds"]  # fmt: skip
    assert spent_before > 0
    resumed = subprocess.run([*base, "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    step = int(checkpoints[-1].name.split("-")[1])
    assert re.search(rf"resuming \S+ at step {step} of \d+, {spent_before / 60:.1f} of 0.4 minutes spent", resumed.stderr)
    results = json.loads((out / "results.json").read_text())
    assert results["stopped_by_time_budget"] and results["final_learning_rate"] < 0.05 * 3e-4 * 32 / 256
    # the resumed process trains only what is left of the 24 seconds (plus a step or two)
    assert results["training_minutes"] * 60 < 24 - spent_before + 6, (results, spent_before)


def test_every_run_logs_its_last_step_and_draws_its_curves(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--max-steps", "3", "--logging-steps", "20", "--no-knn", "--output-dir", str(out)]) == 0
    assert "the run ended at its last step, 3" in capsys.readouterr().err
    (record,) = _log(out)
    assert record["step"] == 3 and {"loss", "reconstruction_loss", "contrastive_loss", "momentum", "learning_rate"} <= set(record)
    picture = out / "pictures" / "loss_curves.png"
    from PIL import Image

    with Image.open(picture) as image:
        assert image.size[0] >= 600 and image.size[1] >= 600  # matplotlib panels, not the 900x520 sketch


def test_knn_monitor_and_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = [*TINY, "--max-steps", "12", "--knn-every", "5", "--knn-monitor-images", "100", "--eval-images", "200",
            "--report-to", "tensorboard", "--output-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    monitored = [(r["step"], r["knn_monitor_accuracy"]) for r in _log(out) if "knn_monitor_accuracy" in r]
    assert [step for step, _ in monitored] == [5, 10, 12]  # every 5 steps and the last
    assert all(10.0 <= accuracy <= 100.0 for _, accuracy in monitored)  # ten classes: above chance-ish, a percentage
    results = json.loads((out / "results.json").read_text())
    assert results["knn_monitor_last"] == monitored[-1][1] and results["knn_monitor_seconds"] > 0
    events = EventAccumulator(str(out / "logs" / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for name in ("loss", "reconstruction_loss", "contrastive_loss", "momentum", "images_per_second",
                 "knn_monitor_accuracy", "learning_rate"):  # fmt: skip
        assert f"train/{name}" in scalars, scalars
    losses = [event.value for event in events.Scalars("train/loss")]
    assert len(losses) == len([r for r in _log(out) if "loss" in r]) and all(math.isfinite(v) for v in losses)


def test_report_to_a_tracker_that_is_not_installed_names_the_package(tmp_path, capsys):
    from transformers.integrations import get_available_reporting_integrations

    missing = next(name for name in ("wandb", "mlflow", "trackio") if name not in get_available_reporting_integrations())
    assert main([*TINY, "--max-steps", "1", "--report-to", missing, "--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"macrl-pretrain: error: --report-to: {missing} is not installed: pip install {missing}"
    assert main([*TINY, "--max-steps", "1", "--report-to", "tensorboardx", "--output-dir", str(tmp_path / "b")]) == 2
    assert "unknown tracker 'tensorboardx'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_knn_monitor_cost_benchmark_prints_its_table():
    """`benchmarks/knn_monitor_cost.py` measures the monitor and the steps in one real run and prints its share."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "knn_monitor_cost.py"
    extra = [*TINY[:-2], "--knn-monitor-images", "100"]  # its own --logging-steps
    done = subprocess.run(
        [sys.executable, str(script), "--steps", "6", "--every", "3", "--", *extra],
        capture_output=True, text=True, env=ENV, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = re.search(r"measured: 6 steps, 2 monitor passes: ([\d.]+) s / step, ([\d.]+) s / pass", done.stdout)
    assert measured and float(measured[1]) > 0 and float(measured[2]) > 0, done.stdout
    shares = [float(share) for share in re.findall(r"^\| \d+ \| ([\d.]+)% \|$", done.stdout, re.M)]
    assert len(shares) == 5 and shares == sorted(shares, reverse=True), done.stdout
    assert "machine: " in done.stdout and "smallest cadence under 5%" in done.stdout
