"""Tests of `macrl-eval` (macrl/evaluate.py) and Trainer fine-tuning (macrl/evaluation/finetune.py), on a tiny random
1-channel encoder and a few hundred real Fashion-MNIST images."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from macrl import MACRLConfig, MACRLForImageClassification, MACRLImageProcessor, MACRLModel
from macrl.data import FashionMNISTSource, SubsetSource, holdout_split, limit_source, load_fashion_mnist
from macrl.evaluate import main
from macrl.evaluation import evaluate_encoder, extract_pooled_features
from macrl.evaluation.finetune import (
    FinetuneDataset,
    build_finetune_trainer,
    finetune,
    layer_decay_parameter_groups,
    layer_id,
)
from macrl.model_card import render_model_card, write_model_card
from macrl.precision import cpu_runs_fp16_fast
from tests.image_folders import write_class_folders
from tests.saved_datasets import write_dataset_dict
from tests.tiny_models import TINY

NUM_TRAIN, NUM_TEST = 400, 200


@pytest.fixture(scope="module")
def encoder(tiny_encoder_folder):
    folder = tiny_encoder_folder
    return MACRLModel.from_pretrained(folder).eval(), MACRLImageProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def sources():
    train = limit_source(FashionMNISTSource("train"), NUM_TRAIN, seed=0)
    test = limit_source(FashionMNISTSource("test"), NUM_TEST, seed=0)
    return train, test


# --------------------------------------------------------------------------- frozen features


def test_evaluate_encoder_returns_both_pools_above_chance(encoder, sources):
    model, processor = encoder
    train, test = sources
    results = evaluate_encoder(model, processor, train, test, batch_size=128)

    assert results["pools"] == ["cls", "mean"]  # the model's own pooling first
    for pool in ("cls", "mean"):
        for metric in ("knn_accuracy", "linear_probe_accuracy"):
            assert 0.0 <= results[f"{metric}_{pool}"] <= 100.0
        # random-init ViT features separate Fashion-MNIST far better than chance (10%)
        assert results[f"knn_accuracy_{pool}"] > 25.0
        assert results[f"linear_probe_lr_{pool}"] > 0
    assert (results["train_images"], results["test_images"], results["num_classes"]) == (NUM_TRAIN, NUM_TEST, 10)
    assert results["feature_dim"] == TINY["hidden_size"]
    assert (results["knn_k"], results["knn_temperature"], results["skipped_images"]) == (20, 0.07, 0)
    for key in ("extract_seconds", "knn_seconds", "linear_probe_seconds", "total_seconds"):
        assert results[key] >= 0
    json.dumps(results)  # JSON-able as it is

    only_knn = evaluate_encoder(model, processor, train, test, linear_probe=False, pools="mean", batch_size=128)
    assert only_knn["knn_accuracy_mean"] == results["knn_accuracy_mean"]  # same features, same kNN
    assert not any(key.startswith("linear_probe") or key.endswith("_cls") for key in only_knn)


def test_pooled_features_come_from_one_pass_and_match_the_model(encoder, sources):
    model, processor = encoder
    train, _ = sources
    subset = SubsetSource(train, range(37), "first-37")
    calls = []
    hook = model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        features, labels, skipped = extract_pooled_features(model, processor, subset, ("cls", "mean"), batch_size=16)
    finally:
        hook.remove()
    assert len(calls) == math.ceil(37 / 16)  # one forward per batch for both poolings
    assert skipped == 0 and labels.tolist() == subset.labels

    pixels = processor(images=[subset.load_image(i) for i in range(37)], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        tokens = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(features["cls"], tokens[:, 0])
    torch.testing.assert_close(features["mean"], tokens[:, 1:].mean(dim=1))


def test_evaluate_encoder_rejects_unlabelled_or_empty_work(encoder, sources):
    model, processor = encoder
    train, test = sources
    unlabelled = SubsetSource(test, range(10), "unlabelled")
    unlabelled.labels = None
    with pytest.raises(ValueError, match="no labels"):
        evaluate_encoder(model, processor, train, unlabelled)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_encoder(model, processor, train, test, knn=False, linear_probe=False)
    with pytest.raises(ValueError, match="pools"):
        evaluate_encoder(model, processor, train, test, pools=("max",))


def test_holdout_split_and_limit_are_seeded_and_disjoint(sources):
    train, _ = sources
    rest, held_out = holdout_split(train, 0.25, seed=3)
    assert (len(rest), len(held_out)) == (300, 100)
    assert not set(rest.indices) & set(held_out.indices)
    assert held_out.indices == holdout_split(train, 0.25, seed=3)[1].indices
    assert held_out.indices != holdout_split(train, 0.25, seed=4)[1].indices
    limited = limit_source(train, 50, seed=1)
    assert len(limited) == 50 and limited.labels == [train.labels[i] for i in limited.indices]
    assert len(set(limited.labels)) > 3  # a random subset, not the first 50 images
    assert limit_source(train, 10_000, seed=1) is train


# --------------------------------------------------------------------------- fine-tuning


def test_layer_decay_parameter_groups_scale_lr_by_depth(tiny_config, sources):
    train, test = sources
    config = tiny_config(num_labels=10)
    model = MACRLForImageClassification(config)
    processor = MACRLImageProcessor.from_model_config(config)
    assert [layer_id(n, 2) for n in ("macrl.cls_token", "macrl.patch_embed.proj.weight", "macrl.blocks.0.attn.qkv.weight",
                                       "macrl.blocks.1.norm1.bias", "macrl.norm.weight", "classifier.bias")] == [0, 0, 1, 2, 3, 3]

    trainer = build_finetune_trainer(
        model, processor, train, test, output_dir="unused", lr=1e-3, layer_decay=0.5, weight_decay=0.05,
    )
    optimizer = trainer.create_optimizer()
    seen = {}
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            depth = layer_id(name, 2)
            assert group["lr"] == pytest.approx(1e-3 * 0.5 ** (3 - depth)), name
            seen[name] = group["weight_decay"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert set(seen) == trainable  # every trainable parameter once; the fixed pos_embed not at all
    assert seen["macrl.blocks.0.attn.qkv.weight"] == 0.05 and seen["classifier.weight"] == 0.05
    assert seen["macrl.blocks.0.attn.qkv.bias"] == 0.0 and seen["macrl.norm.weight"] == 0.0
    assert seen["macrl.cls_token"] == 0.0
    lrs = {group["layer_id"]: group["lr"] for group in optimizer.param_groups}
    assert lrs == pytest.approx({0: 1.25e-4, 1: 2.5e-4, 2: 5e-4, 3: 1e-3})

    flat = layer_decay_parameter_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=None)
    assert {group["lr"] for group in flat} == {1e-3}
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_parameter_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=1.5)


def test_finetune_dataset_augments_training_images_only(encoder, sources):
    _, processor = encoder
    train, _ = sources
    torch.manual_seed(0)
    augmented = FinetuneDataset(train, processor, train=True)
    plain = FinetuneDataset(train, processor, train=False)
    item = plain[0]
    assert item["pixel_values"].shape == (1, 28, 28) and item["labels"] == train.labels[0]
    expected = processor(images=train.load_image(0), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(item["pixel_values"], expected)
    views = [augmented[0]["pixel_values"] for _ in range(4)]
    assert any(not torch.equal(view, expected) for view in views)


def test_trainer_finetuning_reduces_loss_and_reloads_identically(tiny_config, tiny_encoder_folder, sources, tmp_path):
    train, test = sources
    model = MACRLForImageClassification.from_pretrained(tiny_encoder_folder, num_labels=10)
    processor = MACRLImageProcessor.from_pretrained(tiny_encoder_folder)
    trainer = build_finetune_trainer(
        model, processor, train, test, output_dir=tmp_path / "run", batch_size=32, lr=2e-3, max_steps=24,
        logging_steps=4, layer_decay=0.75, seed=0,
    )
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(losses) == 6 and losses[-1] < losses[0]

    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "model.safetensors").is_file()
    reloaded = MACRLForImageClassification.from_pretrained(tmp_path / "saved").eval()
    pixels = processor(images=[test.load_image(i) for i in range(8)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert torch.equal(trainer.model.eval()(pixel_values=pixels).logits, reloaded(pixel_values=pixels).logits)


def test_finetune_reports_accuracy_and_saves_a_loadable_model(tiny_encoder_folder, sources, tmp_path):
    train, test = sources
    results = finetune(
        tiny_encoder_folder, train, test, output_dir=tmp_path / "tuned", epochs=1, batch_size=50, lr=2e-3,
        layer_decay=0.75, seed=0, max_steps=8, logging_steps=2,
    )
    assert 0.0 <= results["finetune_accuracy"] <= 100.0
    assert results["finetune_steps"] == 8 and len(results["finetune_losses"]) == 4
    assert results["finetune_losses"][-1] < results["finetune_losses"][0]

    folder = Path(results["finetune_output_dir"])
    assert (folder / "model.safetensors").is_file() and (folder / "preprocessor_config.json").is_file()
    model = MACRLForImageClassification.from_pretrained(folder).eval()
    assert model.config.id2label[0] == "T-shirt/top" and model.config.num_labels == 10
    processor = MACRLImageProcessor.from_pretrained(folder)
    pixels = processor(images=[test.load_image(i) for i in range(len(test))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predictions = model(pixel_values=pixels).logits.argmax(dim=-1)
    accuracy = 100.0 * (predictions == torch.tensor(test.labels)).float().mean().item()
    assert accuracy == pytest.approx(results["finetune_accuracy"], abs=1e-3)  # the saved model is the evaluated one


# --------------------------------------------------------------------------- CLI


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "macrl.evaluate", *args], capture_output=True, text=True, timeout=900,
    )


def test_cli_writes_json_table_and_updates_the_card(tiny_encoder_folder, tmp_path):
    folder = tmp_path / "encoder"
    shutil.copytree(tiny_encoder_folder, folder)
    config = MACRLConfig.from_pretrained(folder)
    # a card as macrl-pretrain writes it: its repo id and training facts must survive the update
    card = render_model_card(config, repo_id="someone/macrl-tiny", training={"dataset": "fashion_mnist", "steps": 1234})
    write_model_card(folder, card)
    output = tmp_path / "out" / "results.json"

    completed = _run_cli(
        "--model", str(folder), "--limit-train", "300", "--limit-test", "100", "--batch-size", "100",
        "--device", "cpu", "--output", str(output), "--update-card", "--no-progress",
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(output.read_text())
    assert results["train_images"] == 300 and results["test_images"] == 100
    assert results["dataset"] == "Fashion-MNIST" and results["model"] == str(folder.resolve())
    for key in ("knn_accuracy_cls", "knn_accuracy_mean", "linear_probe_accuracy_cls", "linear_probe_accuracy_mean"):
        assert 0 <= results[key] <= 100
    assert "kNN accuracy (k=20) %" in completed.stdout and "linear probe accuracy %" in completed.stdout
    table_row = next(line for line in completed.stdout.splitlines() if line.startswith("kNN accuracy"))
    assert f"{results['knn_accuracy_cls']:.2f}" in table_row

    card = ModelCard.load(folder / "README.md")
    by_name = {result.metric_name: result for result in card.data.eval_results}
    assert by_name["kNN accuracy"].metric_value == pytest.approx(results["knn_accuracy_cls"] / 100, abs=1e-4)
    assert by_name["kNN accuracy"].dataset_type == "fashion_mnist" and by_name["kNN accuracy"].dataset_split == "test"
    assert "Linear-probe accuracy" in by_name
    assert 'from_pretrained("someone/macrl-tiny")' in card.text
    assert "| Optimizer steps | 1,234 |" in card.text and "| Dataset | fashion_mnist |" in card.text


def test_cli_fp16_evaluates_and_fine_tunes_in_half_precision(tiny_encoder_folder, tmp_path, capsys):
    """`--dtype fp16`: kNN features with fp16 weights where the CPU has the kernels (else fp16 autocast, with the
    warning), and fp16 mixed precision with loss scaling for fine-tuning."""
    common = ["--model", str(tiny_encoder_folder), "--limit-train", "300", "--limit-test", "100", "--batch-size", "100",
              "--device", "cpu", "--no-linear-probe", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "fp32.json")]) == 0
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "fp16.json"), "--dtype", "fp16", "--finetune-max-steps", "2",
                 "--finetune-batch-size", "50", "--finetune-output", str(tmp_path / "tuned")]) == 0
    err = capsys.readouterr().err
    assert ("macrl-eval: warning: --dtype fp16: this CPU" in err) == (not cpu_runs_fp16_fast()), err
    results = json.loads((tmp_path / "fp16.json").read_text())
    reference = json.loads((tmp_path / "fp32.json").read_text())
    assert results["dtype"] == "fp16" and results["finetune_steps"] == 2
    assert all(math.isfinite(loss) for loss in results["finetune_losses"])
    for key in ("knn_accuracy_cls", "knn_accuracy_mean"):  # 100 queries: one changed prediction is 1 point
        assert abs(results[key] - reference[key]) <= 2.0, (key, results[key], reference[key])
    tuned = MACRLForImageClassification.from_pretrained(tmp_path / "tuned")
    assert {parameter.dtype for parameter in tuned.parameters()} == {torch.float32}  # mixed precision: fp32 master


@pytest.mark.slow  # torch.compile: tens of seconds
def test_evaluate_encoder_compiled_compiles_once_for_train_and_test(tiny_encoder_folder, sources):
    from torch._dynamo.utils import counters

    train, test = sources
    model = MACRLModel.from_pretrained(tiny_encoder_folder)
    processor = MACRLImageProcessor.from_pretrained(tiny_encoder_folder)
    torch._dynamo.reset()
    counters.clear()
    results = evaluate_encoder(  # 400 and 200 images in batches of 150: both sources end in a smaller batch
        model, processor, train, test, linear_probe=False, batch_size=150, compile=True, progress=False
    )
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    reference = evaluate_encoder(
        MACRLModel.from_pretrained(tiny_encoder_folder), processor, train, test, linear_probe=False, batch_size=150,
        progress=False,
    )
    assert results["knn_accuracy_cls"] == pytest.approx(reference["knn_accuracy_cls"], abs=0.51)


@pytest.mark.slow  # torch.compile in a real process
def test_cli_compile_compiles_once_for_train_and_test(tiny_encoder_folder, tmp_path):
    output = tmp_path / "results.json"
    plain = tmp_path / "plain.json"
    common = ("--model", str(tiny_encoder_folder), "--limit-train", "230", "--limit-test", "70", "--batch-size", "100",
              "--device", "cpu", "--no-linear-probe", "--no-progress")
    completed = _run_cli(*common, "--output", str(output), "--dtype", "bf16", "--compile")
    assert completed.returncode == 0, completed.stderr
    # ragged last batches (30 train images, 70 test images) and two sources: one compile, printed
    assert completed.stderr.count("torch.compile: compiled for batches of 100 in") == 1, completed.stderr
    assert _run_cli(*common, "--output", str(plain)).returncode == 0
    results, reference = json.loads(output.read_text()), json.loads(plain.read_text())
    assert results["compile"] is True and results["dtype"] == "bf16"
    for key in ("knn_accuracy_cls", "knn_accuracy_mean"):  # 70 queries: one changed prediction is 1.4 points
        assert abs(results[key] - reference[key]) <= 3.0, (key, results[key], reference[key])


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("macrl-eval: error: ")
    return lines[0]


def test_cli_unlabelled_folder_exits_2_with_one_line(tiny_encoder_folder, tmp_path):
    data = write_class_folders(tmp_path / "flat", 5, labelled=False)  # images directly in the folder: no classes
    completed = _run_cli("--model", str(tiny_encoder_folder), "--data", str(data), "--device", "cpu")
    assert completed.returncode == 2
    assert "no labels" in _one_error_line(completed.stderr)
    assert completed.stdout == ""


@pytest.mark.parametrize(
    "test_labels, message",
    [([-1] * 10, "[test]) have no labels"), ([3, -1, 4, 1, 5, 9, 2, 6, 5, 3], "have label -1 (an unlabelled row)")],
)
def test_cli_unlabelled_test_split_is_one_line_and_test_split_names_another(
    tiny_encoder_folder, tmp_path, capsys, test_labels, message
):
    """A test split labelled -1 (wholly or in part) was evaluated and crashed in the kNN; now it is named before any
    feature is extracted, and `--test-split` evaluates on a labelled one."""
    data = write_dataset_dict(tmp_path / "saved", {"train": 20, "validation": 10, "test": test_labels})
    capsys.readouterr()  # the saving's progress bars
    assert main(["--model", str(tiny_encoder_folder), "--data", str(data), "--device", "cpu", "--no-linear-probe"]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    output = tmp_path / "results.json"
    assert main(["--model", str(tiny_encoder_folder), "--data", str(data), "--device", "cpu", "--no-linear-probe",
                 "--test-split", "validation", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert (results["split"], results["test_images"]) == ("validation", 10)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}/missing"], "model folder not found"),
        (["--model", "someone/model", "--update-card"], "not a local model folder"),
        (["--model", "{model}", "--no-knn", "--no-linear-probe"], "nothing to do"),
        (["--model", "{model}", "--layer-decay", "2", "--finetune-epochs", "1"], "--layer-decay"),
        (["--model", "{model}", "--pool", "max"], "invalid choice"),
        (["--model", "{model}", "--data", "{tmp}/no/such/folder"], "folder not found"),
        (["--model", "{tmp}"], "not a model folder"),
    ],
)
def test_cli_bad_inputs_exit_2_with_one_line(tiny_encoder_folder, tmp_path, capsys, args, message):
    argv = [arg.format(tmp=tmp_path, model=tiny_encoder_folder) for arg in args]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in _one_error_line(captured.err)


def test_raw_pixel_floor_is_the_probes_on_the_pixels(tmp_path):
    from macrl.evaluation import EvaluationDataError, evaluate_features, evaluate_raw_pixels

    train = SubsetSource(FashionMNISTSource("train"), range(300), "train300")
    test = SubsetSource(FashionMNISTSource("test"), range(100), "test100")
    floor = evaluate_raw_pixels(train, test, seed=0)
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    by_hand = evaluate_features(
        {"pixels": images[:300].flatten(1).float() / 255}, labels[:300],
        {"pixels": test_images[:100].flatten(1).float() / 255}, test_labels[:100], num_classes=10, seed=0,
    )
    assert floor["knn_accuracy_pixels"] == by_hand["knn_accuracy_pixels"] > 50
    assert floor["linear_probe_accuracy_pixels"] == by_hand["linear_probe_accuracy_pixels"] > 50

    big = tmp_path / "big"
    for index in range(4):
        (big / f"class_{index % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (100, 100), (index * 40, 0, 0)).save(big / f"class_{index % 2}" / f"{index}.png")
    from macrl.data import open_source

    source = open_source(str(big), "RGB")
    with pytest.raises(EvaluationDataError, match="raw-pixel floor: the train images of .* at most 12288 values"):
        evaluate_raw_pixels(source, source)
