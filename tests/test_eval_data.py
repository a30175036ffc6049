"""`macrl-pretrain --eval-data`: labelled images to evaluate on that are not `--data`'s, for the kNN monitor, the final
kNN / linear probe / raw-pixel floor and the reconstruction pictures; what brings them to tar shards.

Real Fashion-MNIST images throughout: tar shards (`shard_files.write_shards`) and PNG class folders
(`image_folders.write_class_folders`); real runs of the tiny preset for a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from macrl.pretrain import main
from macrl.training.arguments import PretrainingArguments
from macrl.training.data import build_pretraining_data
from macrl.training.plan import plan_run
from macrl.visualization import grid_figure_size
from tests.image_folders import write_class_folders
from tests.saved_datasets import write_dataset_dict
from tests.shard_files import write_shards

FAST = ["--config", "tiny", "--batch-size", "16", "--num-workers", "0", "--logging-steps", "1"]
EVAL_IMAGES = 300  # a seeded tenth (30) held out as the queries, the rest (270) the kNN memory


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), 192, 4)


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory) -> Path:
    """300 Fashion-MNIST test images at 32 px (the training data's are 28), in 10 class subfolders."""
    return write_class_folders(tmp_path_factory.mktemp("eval") / "fmnist-eval", EVAL_IMAGES, size=32)


def _run(*argv) -> int:
    return main([str(arg) for arg in argv])


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_shards_with_eval_data_get_the_monitor_the_evaluation_the_floor_and_the_pictures(shards, eval_folder, tmp_path):
    out = tmp_path / "run"
    assert _run(
        *FAST, "--data", shards, "--eval-data", eval_folder, "--max-steps", "4", "--knn-every", "2",
        "--knn-monitor-images", "20", "--output-dir", out,
    ) == 0
    results = _results(out)
    assert 0 <= results["knn_accuracy"] <= 100 and 0 <= results["linear_probe_accuracy"] <= 100
    # the floor compares pixel vectors of the eval images (32 px), not of the training images (28 px)
    assert 0 <= results["raw_pixels_knn_accuracy"] <= 100 and 0 <= results["raw_pixels_linear_probe_accuracy"] <= 100
    assert (results["knn_train_images"], results["knn_test_images"]) == (270, 30)
    assert results["eval_data"] == str(eval_folder.resolve()) and results["eval_split"] == "held-out"
    records = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "knn_monitor_accuracy" in r] == [2, 4]
    assert results["knn_monitor_last"] == records[-1]["knn_monitor_accuracy"]
    with Image.open(out / "pictures" / "reconstructions.png") as grid:
        assert grid.size == grid_figure_size(3, 8)  # 8 eval images, resized to the model's 28 px
    # the card's accuracy is on the eval folder, the training facts name the shards
    card = (out / "encoder" / "README.md").read_text()
    model_index = card.split("model-index:")[1].split("---")[0]
    assert "type: fmnist-eval" in model_index and "split: held-out" in model_index
    assert "train-{000000..000003}.tar" in card


def _data(tmp_path: Path, **flags):
    """`build_pretraining_data` as a run of the tiny preset with these flags plans it."""
    plan = plan_run(PretrainingArguments(output_dir=str(tmp_path / "unused"), config="tiny", **flags))
    return build_pretraining_data(plan.data, plan.config, plan.augmentation)


def test_random_access_data_is_trained_on_whole_and_evaluated_on_eval_data(eval_folder, tmp_path):
    data_folder = write_class_folders(tmp_path / "train", 64, split="train")
    rgb_eval = write_class_folders(tmp_path / "rgb-eval", 100, start=500, mode="RGB")
    data = _data(tmp_path, data=str(data_folder), eval_data=str(rgb_eval), eval_images=8)
    assert data.num_images == len(data.train_source) == 64  # nothing of --data held out
    memory, queries = data.labelled_evaluation()
    assert (len(memory), len(queries)) == (92, 8)  # the held-out tenth (10), capped by --eval-images
    assert {memory.load_image(0).mode, queries.load_image(0).mode} == {"L"}  # converted to the model's mode
    assert data.picture_images(3)[0].tobytes() == queries.load_image(0).tobytes()
    # the pictures spread over the eval images, whose folder lists them class by class: not all of one class
    pictured = data.picture_images(4)
    assert len(pictured) == 4 and pictured[1].tobytes() == queries.load_image(2).tobytes()
    assert len({queries.labels[i] for i in (0, 2, 4, 6)}) > 1

    # the default Fashion-MNIST as --data: all 60,000 training images are trained on, none is the kNN memory
    data = _data(tmp_path, eval_data=str(eval_folder))
    assert len(data.train_source) == 60000 and data.knn_train_source.name.startswith("imagefolder:")

    out = tmp_path / "run"
    assert _run(*FAST, "--data", data_folder, "--eval-data", rgb_eval, "--eval-images", "8", "--max-steps", "2",
                "--no-linear-probe", "--output-dir", out) == 0
    results = _results(out)
    assert (results["knn_train_images"], results["knn_test_images"]) == (92, 8)
    assert "linear_probe_accuracy" not in results and results["eval_data"] == str(rgb_eval.resolve())
    card = (out / "encoder" / "README.md").read_text()
    assert "type: rgb-eval" in card.split("model-index:")[1] and "| Training images | 64 |" in card


@pytest.mark.parametrize("problem", ["missing", "unlabelled", "shards", "no-knn", "folder-split"])
def test_bad_eval_data_is_one_line_before_training(problem, shards, eval_folder, tmp_path, capsys):
    eval_data, extra = {
        "missing": (tmp_path / "no-such-folder", []),
        "unlabelled": (write_class_folders(tmp_path / "flat", 20, labelled=False), []),
        "shards": (shards, []),
        "no-knn": (eval_folder, ["--no-knn"]),
        "folder-split": (eval_folder, ["--eval-split", "validation"]),
    }[problem]
    out = tmp_path / "run"
    assert _run(*FAST, "--data", shards, "--eval-data", eval_data, "--max-steps", "2", *extra,
                "--output-dir", out) == 2
    err = capsys.readouterr().err.strip()
    flag = "--eval-split" if problem == "folder-split" else "--eval-data"
    assert "\n" not in err and err.startswith(f"macrl-pretrain: error: {flag}"), err
    expected = {"missing": "folder not found", "unlabelled": "have no labels", "shards": "without the random access",
                "no-knn": "with --no-knn and no --knn-every", "folder-split": "is a folder, which has no splits"}[problem]
    assert expected in err
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


def test_resume_reopens_the_eval_data(shards, eval_folder, tmp_path):
    """A streamed run resumed from its last checkpoint evaluates on the --eval-data it is given again."""
    args = [*FAST, "--data", shards, "--eval-data", eval_folder, "--eval-images", "10", "--no-linear-probe",
            "--max-steps", "3", "--save-steps", "3", "--output-dir", tmp_path / "run"]
    assert _run(*args) == 0
    first = _results(tmp_path / "run")
    assert _run(*args, "--resume") == 0
    resumed = _results(tmp_path / "run")
    assert resumed["steps"] == 3 and resumed["knn_test_images"] == 10
    assert resumed["knn_accuracy"] == first["knn_accuracy"]  # the same weights on the same images


def test_eval_split_names_the_labelled_split_of_a_dataset(shards, tmp_path, capsys):
    """A `datasets` --eval-data whose test split is unlabelled (ImageNet's: label -1) is evaluated on the split
    --eval-split names; without it the unlabelled test split is refused in one line."""
    saved = write_dataset_dict(tmp_path / "fmnist-dict", {"train": 60, "validation": 20, "test": [-1] * 20})
    capsys.readouterr()  # the saving's progress bars
    common = [*FAST, "--data", shards, "--eval-data", saved, "--max-steps", "1", "--no-linear-probe"]
    assert _run(*common, "--output-dir", tmp_path / "refused") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("macrl-pretrain: error: --eval-data"), err
    assert "[test]) have no labels" in err  # all -1: `datasets`' missing label
    assert not (tmp_path / "refused" / "checkpoints").exists()

    assert _run(*common, "--eval-split", "validation", "--output-dir", tmp_path / "run") == 0
    results = _results(tmp_path / "run")
    assert (results["knn_train_images"], results["knn_test_images"]) == (60, 20)
    assert results["eval_split"] == "validation" and results["eval_data"] == str(saved.resolve())

    assert _run(*FAST, "--data", shards, "--eval-split", "validation", "--max-steps", "1",
                "--output-dir", tmp_path / "alone") == 2
    assert "--eval-split names a split of --eval-data" in capsys.readouterr().err


def test_an_unreadable_eval_image_loses_nothing_of_the_run(shards, eval_folder, tmp_path, capsys):
    """Undecodable images among the --eval-data, met by the kNN monitor during the training and by the evaluation at
    the end: the monitor turns itself off with a warning naming one and the training goes on; the encoder, the
    pictures and results.json are still written, then one line names the image; with --skip-unreadable they are left
    out of the evaluation."""
    import shutil

    broken = tmp_path / "broken-eval"
    shutil.copytree(eval_folder, broken)
    victims = sorted((broken / "class_3").iterdir())  # a whole class: among the monitor's memory and queries too
    for victim in victims:
        victim.write_bytes(b"not a png")
    common = [*FAST, "--data", shards, "--eval-data", broken, "--max-steps", "3", "--no-linear-probe"]
    capsys.readouterr()
    assert _run(*common, "--knn-every", "1", "--output-dir", tmp_path / "run") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert any("the kNN monitor is off: Cannot read image" in line for line in err), err
    assert err[-1].startswith("macrl-pretrain: error: the evaluation at the end: Cannot read image")
    assert any(victim.name in err[-1] for victim in victims)
    out = tmp_path / "run"
    assert (out / "encoder" / "model.safetensors").is_file() and (out / "pictures" / "reconstructions.png").is_file()
    results = _results(out)
    assert results["steps"] == 3 and "knn_accuracy" not in results and results["knn_monitor_last"] is None

    assert _run(*common, "--skip-unreadable", "--knn-every", "1", "--output-dir", tmp_path / "skipping") == 0
    results = _results(tmp_path / "skipping")
    assert results["knn_train_images"] + results["knn_test_images"] == EVAL_IMAGES - len(victims)
    assert "knn_accuracy" in results and results["knn_monitor_last"] is not None
