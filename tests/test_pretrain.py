"""`macrl-pretrain` end to end on real images: outputs, resume, bad input, several processes and the Hub push."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel

from macrl.pretrain import build_parser, format_report, main
from macrl.training.plan import StepPlan, build_training_arguments, plan_run
from macrl.visualization import grid_figure_size
from tests.image_folders import write_class_folders
from tests.saved_datasets import write_dataset_dict

# a few seconds per run: the tiny preset on a few dozen Fashion-MNIST images
FAST = ["--config", "tiny", "--batch-size", "16", "--num-workers", "0", "--logging-steps", "1", "--eval-images", "40"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """64 Fashion-MNIST test images as PNG files in class subfolders, like a user's own data."""
    return write_class_folders(tmp_path_factory.mktemp("fashion_png"), 64)


def _run(*argv) -> int:
    return main([str(arg) for arg in argv])


def test_smoke_default_data_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(*FAST, "--output-dir", out, "--max-steps", "4", "--limit-images", "64", "--save-steps", "2") == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and 0 <= results["knn_accuracy"] <= 100
    assert results["eval_split"] == "test" and "eval_data" not in results  # Fashion-MNIST's own test split
    assert 0 <= results["linear_probe_accuracy"] <= 100
    assert format_report(results) in printed
    assert ("the encoder on 40 test images (kNN memory and probe training set: 64 training images), beside the same "
            "probe on their raw pixels (the floor):") in printed
    assert results["knn_train_images"] == 64 and results["eval_train_images"] == 60000
    all_labels = printed.split("kNN (k=20), all labels")[1].split()[:2]
    assert all_labels == [f"{results['knn_accuracy']:.2f}%", f"{results['raw_pixels_knn_accuracy']:.2f}%"]
    assert str(out / "encoder") in printed
    records = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "reconstruction_loss", "contrastive_loss", "learning_rate", "momentum"):
        assert all(key in r for r in records), key
    assert all("images_per_second" in r for r in records[1:])
    assert records[-1]["momentum"] == pytest.approx(1.0)  # the cosine schedule ends at 1

    for picture in ("loss_curves.png", "reconstructions.png"):
        with Image.open(out / "pictures" / picture) as image:
            assert image.format == "PNG" and image.width > 100
    with Image.open(out / "pictures" / "reconstructions.png") as grid:
        assert grid.size == grid_figure_size(3, 8)  # 8 held-out images x (original, masked, reconstructed)

    # the encoder folder is what users download: it loads with the Auto classes and has a card
    encoder = AutoModel.from_pretrained(out / "encoder")
    processor = AutoImageProcessor.from_pretrained(out / "encoder")
    assert type(encoder).__name__ == "MACRLModel" and processor.num_channels == 1
    assert processor.image_mean == pytest.approx([0.2860]) and processor.image_std == pytest.approx([0.3530])
    card = (out / "encoder" / "README.md").read_text()
    assert "pipeline_tag: image-feature-extraction" in card and "fashion_mnist" in card
    # the full pre-training model (both branches) sits at the top of the output folder, checkpoints are rotated
    full = load_file(out / "model.safetensors")
    assert any(k.startswith("momentum_encoder.") for k in full) and any(k.startswith("decoder.") for k in full)
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_image_folder_data_and_held_out_classes(tmp_path, image_folder):
    out = tmp_path / "run"
    assert _run(*FAST, "--data", image_folder, "--output-dir", out, "--max-steps", "2", "--eval-images", "6") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["knn_test_images"] == 6 and results["knn_train_images"] == 58


def test_eval_train_images_caps_the_knn_memory(tmp_path, capsys):
    """`--eval-train-images N`: the evaluation at the end takes a seeded N of the training images as its kNN memory
    and probe training set (as `macrl-eval --limit-train N` does), and says so in results.json and its report."""
    out = tmp_path / "run"
    assert _run(*FAST, "--output-dir", out, "--max-steps", "2", "--limit-images", "48", "--eval-train-images", "20",
                "--label-fractions", "--no-raw-pixel-floor") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["knn_train_images"] == 20 and results["knn_train_images_available"] == 48
    assert results["eval_train_images"] == 20
    assert ("the encoder on 40 test images (kNN memory and probe training set: a seeded 20 of 48 training images "
            "(--eval-train-images)):") in capsys.readouterr().out


def test_the_default_knn_memory_is_all_of_fashion_mnist():
    """The default cap (60,000) takes every training image of the main job: its kNN memory, and so its figures, are
    the ones before the cap."""
    from macrl.data import limit_source
    from macrl.training import PretrainingArguments
    from macrl.training.data import build_pretraining_data

    args = PretrainingArguments()
    plan = plan_run(args)
    memory, _ = build_pretraining_data(plan.data, plan.config, plan.augmentation).labelled_evaluation()
    assert len(memory) == 60000 and limit_source(memory, args.eval_train_images, args.seed) is memory


def test_augmentation_flag_changes_the_views(tmp_path):
    """--augmentation reaches the transforms (recorded in results.json) and a different crop gives different losses."""
    args = [*FAST, "--max-steps", "2", "--limit-images", "32", "--no-knn"]
    assert _run(*args, "--output-dir", tmp_path / "default") == 0
    changed = '{"strong_crop_scale": [0.9, 1.0], "blur_prob": 0}'
    assert _run(*args, "--output-dir", tmp_path / "changed", "--augmentation", changed) == 0
    default = json.loads((tmp_path / "default" / "results.json").read_text())["augmentation"]
    recorded = json.loads((tmp_path / "changed" / "results.json").read_text())["augmentation"]
    assert recorded["strong_crop_scale"] == [0.9, 1.0] and recorded["blur_prob"] == 0
    assert default["strong_crop_scale"] != [0.9, 1.0] and recorded["mean"] == default["mean"]
    assert default["batched"] is True  # Fashion-MNIST's images share one size: augmented per batch
    losses = lambda run: [json.loads(line)["loss"] for line in (tmp_path / run / "logs" / "train_log.jsonl").open()]
    assert losses("default") != losses("changed")


def test_resume_continues_exactly(tmp_path):
    args = [*FAST, "--max-steps", "6", "--save-steps", "3", "--limit-images", "48", "--no-knn"]
    assert _run(*args, "--output-dir", tmp_path / "full") == 0
    # an interrupted run: only the step-3 checkpoint survived
    interrupted = tmp_path / "interrupted" / "checkpoints"
    interrupted.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "checkpoint-3", interrupted / "checkpoint-3")
    assert _run(*args, "--output-dir", tmp_path / "interrupted", "--resume") == 0
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    log = lambda run: [json.loads(line) for line in (tmp_path / run / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log("interrupted")] == [r["loss"] for r in log("full")][3:]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "no-such-preset"], "unknown config 'no-such-preset'"),
        (["--config", '{"hidden_size": 30, "num_attention_heads": 4}'], "MACRLConfig.hidden_size=30"),
        (["--resume"], "no checkpoint to resume from"),
        (["--augmentation", '{"blur_probability": 0}'], "--augmentation: unknown fields ['blur_probability']"),
        (["--augmentation", '{"blur_prob": 2}'], "--augmentation: blur_prob must be in [0, 1], got 2"),
        (["--augmentation", "[0.5, 1]"], "--augmentation: must be a JSON object"),
        (["--fp16", "--bf16"], "--fp16 and --bf16 ask for two precisions"),
        (["--stop-signals", "SIGTERM", "SIGNOPE"], "--stop-signals: 'SIGNOPE' is not a signal"),
        (["--stop-signals", "KILL"], "--stop-signals: SIGKILL cannot be caught"),
        (["--eval-train-images", "-1"], "--eval-train-images must be >= 0 (0: all), got -1"),
        (["--batch-size", "15"], None),  # fine on one process: a negative control
    ],
)
def test_bad_arguments_give_one_clear_line(tmp_path, capsys, extra, message):
    code = _run(*FAST, "--output-dir", tmp_path / "run", "--max-steps", "1", "--limit-images", "32", *extra)
    err = capsys.readouterr().err
    if message is None:
        assert code == 0
    else:
        assert code == 2 and message in err and "Traceback" not in err


def test_empty_folder_and_corrupt_images(tmp_path, capsys, image_folder):
    (tmp_path / "empty").mkdir()
    assert _run(*FAST, "--data", tmp_path / "empty", "--output-dir", tmp_path / "a", "--max-steps", "1") == 2
    assert "No image files found under" in capsys.readouterr().err

    broken = tmp_path / "broken"
    shutil.copytree(image_folder, broken)
    bad = broken / "class_0" / "zz_truncated.png"
    bad.write_bytes((broken / "class_0" / "00019.png").read_bytes()[:40])
    args = [*FAST, "--data", broken, "--max-steps", "4", "--no-knn", "--limit-images", "64"]
    assert _run(*args, "--output-dir", tmp_path / "b") == 1  # a failure while working, as in macrl-extract
    err = capsys.readouterr().err
    assert str(bad) in err and "--skip-unreadable" in err
    # decoded in a DataLoader worker, the error is still one line, not the worker's traceback
    assert _run(*args, "--num-workers", "1", "--output-dir", tmp_path / "w") == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("macrl-pretrain:")]
    assert len(lines) == 1 and lines[0].startswith(f"macrl-pretrain: error: Cannot read image {bad}"), err
    assert "Traceback" not in err
    assert _run(*args, "--output-dir", tmp_path / "c", "--skip-unreadable") == 0
    assert "skipping 1 unreadable images" in capsys.readouterr().err


def test_refuses_to_overwrite_or_mix_runs(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", out, "--max-steps", "2", "--limit-images", "32", "--no-knn"]
    assert _run(*args) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert _run(*args) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert _run(*args, "--resume", "--mask-ratio", "0.5") == 2
    assert "different model config (mask_ratio: 0.75 -> 0.5)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing was touched


def test_push_to_loopback_hub(tmp_path, hub_server):
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", out, "--max-steps", "4", "--limit-images", "32", "--push-to-hub", "tester/macrl-tiny"]
    assert _run(*args, "--save-steps", "2", "--push-checkpoints") == 0
    titles = [commit.title for commit in hub_server.repos["tester/macrl-tiny"].commits.values()]
    assert "Encoder at step 2" in titles and "Encoder at step 4" in titles and titles[-1] == "Upload MACRL encoder"
    from huggingface_hub import snapshot_download

    local = Path(snapshot_download("tester/macrl-tiny"))
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "modeling_macrl.py"):
        assert (local / name).read_bytes() == (out / "encoder" / name).read_bytes(), name


def _loss_log(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process(tmp_path):
    """torchrun with 2 gloo processes (8 images each) logs the losses of 1 process with the same 16-image batch."""
    common = [
        "-m", "macrl.pretrain", *FAST, "--max-steps", "3", "--limit-images", "48", "--no-knn",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, *common, "--output-dir", tmp_path / "one"], env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = subprocess.run(
        [*torchrun, *common, "--output-dir", tmp_path / "two"], env=env, capture_output=True, text=True, timeout=600
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = _loss_log(tmp_path / "one"), _loss_log(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-4)
    weights_one = load_file(tmp_path / "one" / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "model.safetensors")
    for name in ("macrl.blocks.0.attn.qkv.weight", "projector.0.weight", "momentum_encoder.norm.weight"):
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-5)


def test_push_keeps_a_card_the_repo_already_had(tmp_path, hub_server):
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi()
    api.create_repo("tester/has-card")
    api.upload_file(path_or_fileobj=b"# my own card\n", path_in_repo="README.md", repo_id="tester/has-card")
    args = [*FAST, "--output-dir", tmp_path / "run", "--max-steps", "2", "--limit-images", "32"]
    assert _run(*args, "--push-to-hub", "tester/has-card", "--no-knn") == 0
    assert Path(hf_hub_download("tester/has-card", "README.md")).read_text() == "# my own card\n"
    assert Path(hf_hub_download("tester/has-card", "model.safetensors")).read_bytes() == (
        tmp_path / "run" / "encoder" / "model.safetensors"
    ).read_bytes()


def test_datasets_dataset_as_data(tmp_path, capsys):
    data = write_dataset_dict(tmp_path / "fmnist_ds", {"train": 40, "test": 40})
    out = tmp_path / "run"
    assert _run(*FAST, "--data", data, "--output-dir", out, "--max-steps", "2") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["knn_train_images"] == 40 and results["knn_test_images"] == 40

    # a test split labelled -1 (`datasets`' missing label, ImageNet's test split) is no labelled test set: the run
    # trains and says there is no kNN evaluation (it crashed in the kNN at the end)
    data = write_dataset_dict(tmp_path / "unlabelled_ds", {"train": 40, "test": [-1] * 40})
    capsys.readouterr()
    out = tmp_path / "unlabelled-run"
    assert _run(*FAST, "--data", data, "--output-dir", out, "--max-steps", "1") == 0
    assert "knn_accuracy" not in json.loads((out / "results.json").read_text())
    assert "no kNN evaluation: the data has no labelled held-out images" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, learning_rate",
    [
        ([], 1.5e-3),  # the embedded default's tuned rate
        (["--config", "tiny"], 3e-4),  # presets without a tuned rate
        (["--lr", "1e-3", "--batch-size", "512"], 2e-3),  # --lr wins, scaled by batch / 256
    ],
)
def test_learning_rate_default_follows_the_preset(tmp_path, flags, learning_rate):
    (args,) = build_parser().parse_args_into_dataclasses([*flags, "--output-dir", str(tmp_path)])
    training_args = build_training_arguments(args, plan_run(args), StepPlan(max_steps=10, bf16=False))
    assert training_args.learning_rate == pytest.approx(learning_rate)


def test_max_minutes_on_fewer_batches_than_the_probe_times(tmp_path):
    # 48 images are 3 batches of 16: the step-time probe reuses them instead of running out of data
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", out, "--max-minutes", "0.05", "--limit-images", "48", "--no-knn"]
    assert _run(*args) == 0
    state = json.loads(next(out.glob("checkpoints/checkpoint-*/trainer_state.json")).read_text())
    assert state["max_steps"] >= 1
    assert state["global_step"] <= state["max_steps"]


def test_raw_pixel_floor_is_computed_once_and_reused(tmp_path, capsys):
    """The floor is a deterministic figure of the images: the first run computes and keeps it, the next reads it."""
    from macrl.evaluation.raw_pixel_floor import raw_pixel_floor_cache

    flags = [*FAST, "--max-steps", "2", "--limit-images", "64", "--eval-images", "64", "--no-linear-probe"]
    assert _run(*flags, "--output-dir", tmp_path / "first") == 0
    first = json.loads((tmp_path / "first" / "results.json").read_text())
    assert "linear_probe_accuracy" not in first and "raw_pixels_linear_probe_accuracy" not in first
    (kept,) = [path for path in raw_pixel_floor_cache().glob("*.json")
               if json.loads(path.read_text())["knn_accuracy_pixels"] == first["raw_pixels_knn_accuracy"]]
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "knn_accuracy_pixels": 12.5}))
    assert _run(*flags, "--output-dir", tmp_path / "second") == 0
    assert json.loads((tmp_path / "second" / "results.json").read_text())["raw_pixels_knn_accuracy"] == 12.5
    assert capsys.readouterr().out.split("kNN (k=20), all labels")[-1].split()[1] == "12.50%"  # the second run's


@pytest.mark.slow  # torch.compile of a training step: a minute on 2 cores
@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_compile_trains_like_eager(tmp_path, precision):
    """`--compile` (the Trainer's torch.compile of the whole model, backward included), in fp32 and under bf16
    autocast: the same losses as eager within float noise (bf16's rounding falls differently in fused kernels), and
    the EMA still moves the momentum branch (it runs outside the compiled forward)."""
    common = [*FAST, "--max-steps", "3", "--limit-images", "48", "--no-knn", "--seed", "3", *precision]
    assert _run(*common, "--output-dir", tmp_path / "eager") == 0
    assert _run(*common, "--output-dir", tmp_path / "compiled", "--compile") == 0
    eager, compiled = _loss_log(tmp_path / "eager"), _loss_log(tmp_path / "compiled")
    assert len(compiled) == 3 and compiled == pytest.approx(eager, rel=1e-2 if precision else 1e-3)
    assert json.loads((tmp_path / "compiled" / "results.json").read_text())["steps"] == 3
    weights = load_file(tmp_path / "compiled" / "model.safetensors")
    name = "blocks.0.attn.qkv.weight"
    assert not torch.equal(weights[f"momentum_encoder.{name}"], weights[f"macrl.{name}"])  # EMA: behind, not equal
    torch.testing.assert_close(
        weights[f"momentum_encoder.{name}"], load_file(tmp_path / "eager" / "model.safetensors")[f"momentum_encoder.{name}"],
        rtol=1e-2 if precision else 1e-3, atol=1e-3 if precision else 1e-5,
    )
