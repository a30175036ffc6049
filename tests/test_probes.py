"""The probes self-supervised users read besides the full-label ones: label efficiency (1% and 10% of the labels) and
DINOv2's linear protocol, in the library, `macrl-eval`, the main job's report and the model card, each beside the
same probe on raw pixels; `macrl-eval` reproduces every number the main job prints.

Real Fashion-MNIST images (PNG class folders written by `image_folders.write_class_folders`), real runs of the tiny
preset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from macrl import MACRLModel
from macrl.evaluate import main as eval_main
from macrl.evaluation import evaluate_features, knn_accuracy
from macrl.evaluation.frozen_features import DINOV2, dinov2_linear_features
from macrl.evaluation.label_subsets import fraction_name, labelled_subset
from macrl.evaluation.linear_probe import validation_rows
from macrl.model_card import accuracy_metrics
from macrl.pretrain import format_report
from macrl.pretrain import main as pretrain_main
from tests.image_folders import write_class_folders

FAST = ["--config", "tiny", "--batch-size", "16", "--num-workers", "0", "--logging-steps", "1"]


def test_a_label_subset_is_the_same_share_of_every_class_and_seeded():
    labels = torch.arange(10).repeat_interleave(torch.tensor([100, 90, 80, 70, 60, 50, 40, 30, 20, 3]))
    ten = labelled_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[ten]).tolist() == [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]  # at least one of each class
    assert torch.equal(ten, labelled_subset(labels, 0.1, seed=0))
    assert not torch.equal(ten, labelled_subset(labels, 0.1, seed=1))
    # a class's draw depends on its own images only, so the smaller subset of a seed lies inside the larger one
    assert set(labelled_subset(labels, 0.05, seed=0).tolist()) <= set(ten.tolist())
    assert [fraction_name(f) for f in (0.01, 0.1, 0.005, 0.25)] == ["1pct", "10pct", "0.5pct", "25pct"]
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        labelled_subset(labels, 1.0, seed=0)


def test_dinov2_features_are_the_normed_cls_of_the_last_4_blocks_and_the_mean_patch_token(tiny_config):
    model = MACRLModel(tiny_config(num_hidden_layers=5)).eval()
    pixels = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        output = model(pixels, output_hidden_states=True)
        features = dinov2_linear_features(model, output.hidden_states)
        blocks = [model.norm(hidden) for hidden in output.hidden_states[-4:]]
    hidden = model.config.hidden_size
    assert features.shape == (3, 5 * hidden)
    assert torch.allclose(features[:, 3 * hidden : 4 * hidden], output.last_hidden_state[:, 0])  # the last block's CLS
    assert torch.allclose(features[:, : 4 * hidden], torch.cat([tokens[:, 0] for tokens in blocks], dim=1))
    assert torch.allclose(features[:, 4 * hidden :], output.last_hidden_state[:, 1:].mean(dim=1))
    # an encoder of 2 blocks gives both of its blocks' CLS tokens
    shallow = MACRLModel(tiny_config(num_hidden_layers=2)).eval()
    with torch.no_grad():
        assert dinov2_linear_features(shallow, shallow(pixels, output_hidden_states=True).hidden_states).shape == (
            3, 3 * hidden,
        )


def test_label_fraction_probes_use_the_subset_as_memory_and_training_set():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(40)  # 200 rows, 40 a class
    features = torch.randn(200, 8, generator=generator) + 3 * torch.nn.functional.one_hot(labels, 8)
    test_labels = torch.arange(5).repeat(10)
    test = torch.randn(50, 8, generator=generator) + 3 * torch.nn.functional.one_hot(test_labels, 8)
    results = evaluate_features(
        {"cls": features, DINOV2: features}, labels, {"cls": test, DINOV2: test}, test_labels, 5,
        label_fractions=(0.1,), seed=3,
    )
    rows = labelled_subset(labels, 0.1, seed=3)
    assert len(rows) == 20
    subset_knn = knn_accuracy(features[rows], labels[rows], test, test_labels, 5)
    assert results["knn_accuracy_cls_10pct"] == round(subset_knn, 4)
    assert {"knn_accuracy_cls", "linear_probe_accuracy_cls", "linear_probe_accuracy_cls_10pct"} <= set(results)
    # DINOv2's protocol is a full-label linear probe
    assert "linear_probe_accuracy_dinov2" in results
    assert not any(key.startswith("knn_accuracy_dinov2") or key.endswith("dinov2_10pct") for key in results)


def test_a_labelled_subset_too_small_for_the_probes_validation_split_gets_the_knn_only(caplog):
    # 4 classes of 24 training images (the GPU check's tiny folder): 1% of the labels is one image a class
    labels = torch.arange(4).repeat(24)
    features = torch.randn(96, 8, generator=torch.Generator().manual_seed(0)) + 3 * torch.nn.functional.one_hot(labels, 8)
    with caplog.at_level("WARNING", logger="macrl.evaluation.frozen_features"):
        results = evaluate_features({"cls": features}, labels, {"cls": features}, labels, 4, label_fractions=(0.01, 0.25))
    assert "knn_accuracy_cls_1pct" in results and "linear_probe_accuracy_cls_1pct" not in results
    assert "linear_probe_accuracy_cls_25pct" in results  # 24 images: 2 held out for the search
    assert "no 1pct linear probe: 1% of the labels is 4 images" in caplog.text
    # the rule is the probe's own: a tenth of the rows, rounded, held out, and at least one row on each side
    assert [validation_rows(rows) for rows in (1, 4, 5, 6, 24)] == [None, None, None, 1, 2]
    assert validation_rows(2, val_fraction=0.5) == 1 and validation_rows(10, val_fraction=0.99) is None


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory) -> Path:
    """300 labelled Fashion-MNIST test images in class subfolders: a seeded tenth is held out as the queries."""
    return write_class_folders(tmp_path_factory.mktemp("probes") / "fmnist-probes", 300)


def test_the_main_job_reports_every_probe_and_macrl_eval_reproduces_them(eval_folder, tmp_path, capsys):
    data = write_class_folders(tmp_path / "train", 64, split="train")
    out = tmp_path / "run"
    assert pretrain_main([str(arg) for arg in (
        *FAST, "--data", data, "--eval-data", eval_folder, "--max-steps", "2", "--output-dir", out,
    )]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    probes = [f"{probe}{suffix}" for suffix in ("", "_1pct", "_10pct")
              for probe in ("knn_accuracy", "linear_probe_accuracy")]
    for key in probes:
        assert 0 <= results[key] <= 100 and 0 <= results[f"raw_pixels_{key}"] <= 100, key
    assert 0 <= results["linear_probe_accuracy_dinov2"] <= 100
    assert format_report(results) in printed
    assert "kNN (k=20), 1% of the labels" in printed and "linear probe, DINOv2 protocol" in printed

    # the card's model-index carries every probe of the encoder (not the pixels')
    card = (out / "encoder" / "README.md").read_text()
    model_index = card.split("model-index:")[1].split("---")[0]
    for name in ("kNN accuracy (1% of the labels)", "Linear-probe accuracy (10% of the labels)",
                 "Linear-probe accuracy (DINOv2 protocol)"):
        assert f"name: {name}" in model_index
    assert model_index.count("type: accuracy") == len(accuracy_metrics(results)) == 7

    # macrl-eval on the released encoder and the same images, with the run's seed, gives the same numbers
    evaluated = tmp_path / "eval.json"
    assert eval_main(["--model", str(out / "encoder"), "--data", str(eval_folder), "--pool", "cls",
                      "--output", str(evaluated)]) == 0
    again = json.loads(evaluated.read_text())
    for key in probes:
        pool_key = key.replace("accuracy", "accuracy_cls", 1)
        assert again[pool_key] == pytest.approx(results[key], abs=0.005), key
        assert again[key.replace("accuracy", "accuracy_pixels", 1)] == pytest.approx(
            results[f"raw_pixels_{key}"], abs=0.005), key
    assert again["linear_probe_accuracy_dinov2"] == pytest.approx(results["linear_probe_accuracy_dinov2"], abs=0.005)
    table = capsys.readouterr().out
    assert "1% of labels" in table and "pixels" in table and "DINOv2 protocol" in table


def test_macrl_eval_without_label_fractions_or_dinov2(eval_folder, tiny_encoder_folder, tmp_path, capsys):
    encoder = tiny_encoder_folder
    output = tmp_path / "eval.json"
    assert eval_main(["--model", str(encoder), "--data", str(eval_folder), "--label-fractions", "--no-dinov2-linear",
                      "--no-raw-pixel-floor", "--no-linear-probe", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert not any(key.endswith(("pct", "dinov2")) or "pixels" in key for key in results)
    assert eval_main(["--model", str(encoder), "--data", str(eval_folder), "--label-fractions", "1.5"]) == 2
    assert "--label-fractions: a label fraction must lie in (0, 1), got 1.5" in capsys.readouterr().err
