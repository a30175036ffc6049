"""`macrl-pretrain --online-probe` (macrl/training/online_probe.py): a linear classifier trained beside the encoder on
its detached features, which never changes the encoder's training, is logged, tracked and plotted with the kNN
monitor, resumes with the run, and stays out of the released encoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from macrl.data import AugmentationConfig, FashionMNISTSource, SubsetSource, load_fashion_mnist
from macrl.data.batched_two_view_dataset import BatchedTwoViewDataset, TwoViewCollator
from macrl.pretrain import main
from macrl.training.online_probe import ONLINE_PROBE_FILE
from macrl.training.pictures import curve_panels

# the tiny preset on a few hundred Fashion-MNIST images, every step logged (its grad_norm is the encoder's)
TINY = ["--config", "tiny", "--batch-size", "32", "--num-workers", "0", "--limit-images", "256", "--logging-steps", "1",
        "--no-knn", "--knn-monitor-images", "50", "--eval-images", "100"]  # fmt: skip


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "logs" / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6-step run without and with the probe (and the kNN monitor, every 3 steps), checkpoints at 3 and 6,
    TensorBoard on."""
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("online-probe")
    args = [*TINY, "--max-steps", "6", "--save-steps", "3", "--knn-every", "3", "--report-to", "tensorboard"]
    assert main([*args, "--output-dir", str(root / "plain")]) == 0
    assert main([*args, "--output-dir", str(root / "probe"), "--online-probe"]) == 0
    return root / "plain", root / "probe", args


def test_the_training_batches_carry_labels_only_when_asked():
    source = SubsetSource(FashionMNISTSource("train"), range(8), "fmnist")
    collate = TwoViewCollator(AugmentationConfig(image_size=28, num_channels=1))
    plain = collate([BatchedTwoViewDataset(source, num_patches=49)[i] for i in range(4)])
    labelled = collate([BatchedTwoViewDataset(source, num_patches=49, labels=True)[i] for i in range(4)])
    assert "labels" not in plain and labelled["labels"].tolist() == source.labels[:4]
    for key in plain:  # the same views and masks: the labels are all that is added
        assert torch.equal(plain[key], labelled[key]), key


def test_the_probe_never_changes_the_encoders_training(runs):
    plain, probe, _ = runs
    a, b = load_file(plain / "model.safetensors"), load_file(probe / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    encoder_keys = ("loss", "reconstruction_loss", "contrastive_loss", "grad_norm", "knn_monitor_accuracy")
    strip = lambda records: [{k: r[k] for k in encoder_keys if k in r} for r in records]
    assert strip(_log(plain)) == strip(_log(probe))  # the encoder's gradient norm at every step included


def test_the_probe_is_logged_tracked_measured_and_plotted_beside_the_monitor(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, probe, _ = runs
    records = _log(probe)
    evaluated = [(r["step"], r["online_probe_accuracy"]) for r in records if "online_probe_accuracy" in r]
    assert [step for step, _ in evaluated] == [3, 6]  # with the kNN monitor: every 3 steps and the last
    assert all(0.0 <= accuracy <= 100.0 for _, accuracy in evaluated)
    assert all("online_probe_loss" in r for r in records)  # its training loss since the last log, every log
    results = json.loads((probe / "results.json").read_text())
    assert results["online_probe_last"] == evaluated[-1][1] and results["online_probe_seconds"] > 0
    events = EventAccumulator(str(probe / "logs" / "tensorboard"))
    events.Reload()
    assert {"train/online_probe_accuracy", "train/online_probe_loss"} <= set(events.Tags()["scalars"])
    panels = curve_panels(records)
    assert panels[-1] == (["knn_monitor_accuracy", "online_probe_accuracy"], "held-out accuracy (%)")
    assert (probe / "pictures" / "loss_curves.png").is_file()


def test_the_probe_is_in_the_checkpoints_and_not_in_the_released_encoder(runs):
    plain, probe, _ = runs
    assert (probe / "checkpoints" / "checkpoint-6" / ONLINE_PROBE_FILE).is_file()
    assert not (plain / "checkpoints" / "checkpoint-6" / ONLINE_PROBE_FILE).exists()
    for released in ("model.safetensors", "encoder/model.safetensors"):  # the same weights as without the probe
        assert sorted(load_file(probe / released)) == sorted(load_file(plain / released))
    assert not [path for path in (probe / "encoder").rglob("*") if "probe" in path.name]
    saved = load_file(probe / "checkpoints" / "checkpoint-6" / ONLINE_PROBE_FILE)
    assert saved["classifier.weight"].shape == (10, 32) and saved["classifier.weight"].abs().sum() > 0


def test_a_resumed_run_continues_the_probe(runs, tmp_path):
    _, probe, args = runs
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(probe / "checkpoints" / "checkpoint-3", interrupted / "checkpoints" / "checkpoint-3")
    assert main([*args, "--output-dir", str(interrupted), "--online-probe", "--resume"]) == 0
    full = load_file(probe / "checkpoints" / "checkpoint-6" / ONLINE_PROBE_FILE)
    resumed = load_file(interrupted / "checkpoints" / "checkpoint-6" / ONLINE_PROBE_FILE)
    assert full.keys() == resumed.keys() and any(name.startswith("optimizer.") for name in full)
    for name in full:  # the classifier and its AdamW moments and step: as if never interrupted
        assert torch.equal(full[name], resumed[name]), name
    probe_keys = ("online_probe_accuracy", "online_probe_loss")
    logged = lambda folder: [{k: r.get(k) for k in probe_keys} for r in _log(folder) if r["step"] > 3]
    assert logged(interrupted) == logged(probe)


def test_without_training_labels_the_probe_is_off_with_a_warning(tmp_path, capsys):
    images, _ = load_fashion_mnist("train")
    flat = tmp_path / "flat"
    flat.mkdir()
    for index in range(48):  # no class subfolders: no labels
        Image.fromarray(images[index].numpy()).save(flat / f"{index:03d}.png")
    out = tmp_path / "run"
    assert main([*TINY, "--data", str(flat), "--max-steps", "2", "--online-probe", "--output-dir", str(out)]) == 0
    assert ("macrl-pretrain: warning: --online-probe: the training images have no labels (a stream, or a folder "
            "without class subfolders); the online probe is off") in capsys.readouterr().err
    assert not any("online_probe_accuracy" in record for record in _log(out))


@pytest.mark.slow  # a real run in a subprocess
def test_the_cost_benchmark_measures_the_probe_beside_the_monitor():
    """`benchmarks/knn_monitor_cost.py --online-probe` measures the probe as it measures the monitor: one real run."""
    import os
    import re
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "knn_monitor_cost.py"
    extra = ["--config", "tiny", "--batch-size", "32", "--num-workers", "0", "--limit-images", "512",
             "--knn-monitor-images", "100"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script), "--steps", "6", "--every", "3", "--online-probe", "--", *extra],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"online probe: [\d.]+ ms / step, [\d.]+ s / pass", done.stdout), done.stdout
    rows = re.findall(r"^\| \d+ \| ([\d.]+)% \| ([\d.]+)% \|$", done.stdout, re.M)
    assert len(rows) == 5 and all(float(probe) > 0 for _, probe in rows), done.stdout
