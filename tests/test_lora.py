"""LoRA fine-tuning (macrl/evaluation/lora.py, `macrl-eval --lora-rank`), on the tiny encoder and real Fashion-MNIST
images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from macrl import MACRLConfig, MACRLForImageClassification, MACRLImageProcessor, MACRLModel
from macrl.data import FashionMNISTSource, limit_source
from macrl.evaluate import main
from macrl.evaluation.finetune import finetune
from macrl.evaluation.lora import ADAPTER_FOLDER, add_lora, trainable_parameters
from macrl.presets import PRESETS

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def sources():
    """400 labelled training images and 200 test images of Fashion-MNIST, seeded."""
    return limit_source(FashionMNISTSource("train"), 400, seed=0), limit_source(FashionMNISTSource("test"), 200, seed=0)


def _pixels(processor, source, count):
    return processor(images=[source.load_image(i) for i in range(count)], return_tensors="pt")["pixel_values"]


def _accuracy(model, processor, source) -> float:
    with torch.no_grad():
        predictions = model.eval()(pixel_values=_pixels(processor, source, len(source))).logits.argmax(-1)
    return 100.0 * (predictions == torch.tensor(source.labels)).float().mean().item()


@pytest.mark.parametrize("preset, trained, total", [("tiny", 3786, 21844), ("fmnist", 40722, 1832284)])
def test_rank_8_trains_the_adapters_and_the_classifier_only(preset, trained, total):
    """The share the docs state: 17.3% of the tiny preset, 2.2% of fmnist (the LoRA matrices of the attention's qkv
    and proj and of the patch embedding's proj, and the classifier's trained copy)."""
    model = add_lora(MACRLForImageClassification(MACRLConfig(**PRESETS[preset], num_labels=10)), rank=8)
    assert trainable_parameters(model) == (trained, total)
    assert trainable_parameters(model) == model.get_nb_trainable_parameters()  # peft's own count
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert names and all(".lora_" in name or ".classifier.modules_to_save." in name for name in names), names
    assert any(".attn.qkv.lora_A." in name for name in names) and any(".attn.proj.lora_B." in name for name in names)


def test_the_merged_folder_loads_without_peft_and_equals_the_adapted_model(
    tiny_encoder_folder, sources, tmp_path, monkeypatch
):
    train, test = sources
    results = finetune(
        tiny_encoder_folder, train, test, output_dir=tmp_path / "tuned", batch_size=50, lr=5e-3, max_steps=6,
        logging_steps=2, lora_rank=4,
    )
    folder = Path(results["finetune_output_dir"])
    assert results["finetune_lora_rank"] == 4
    assert results["finetune_trainable_parameters"] == 2058 and results["finetune_parameters"] == 20116
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in (folder / ADAPTER_FOLDER).iterdir()}
    assert not (folder / "adapter_config.json").exists()  # the merged folder is a plain model folder
    processor = MACRLImageProcessor.from_pretrained(folder)
    pixels = _pixels(processor, test, 16)

    base = MACRLForImageClassification.from_pretrained(tiny_encoder_folder, num_labels=10)
    adapted = peft.PeftModel.from_pretrained(base, folder / ADAPTER_FOLDER).eval()
    with torch.no_grad():
        expected = adapted(pixel_values=pixels).logits
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails: the merged folder needs none
    merged = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(merged) is MACRLForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, expected, rtol=1e-5, atol=1e-5)
    # the adapters changed the encoder's attention (merged into its weights), and nothing else of it
    original = MACRLModel.from_pretrained(tiny_encoder_folder).state_dict()
    weights = load_file(folder / "model.safetensors")
    changed = {name for name, value in original.items() if not torch.equal(weights[f"macrl.{name}"], value)}
    assert changed and all(name.endswith(("attn.qkv.weight", "attn.proj.weight", "patch_embed.proj.weight"))
                           for name in changed), changed
    assert results["finetune_accuracy"] == pytest.approx(_accuracy(merged, processor, test), abs=1e-3)


def test_lora_fine_tuning_beats_the_untrained_classifier(tiny_encoder_folder, sources, tmp_path):
    train, test = sources
    processor = MACRLImageProcessor.from_pretrained(tiny_encoder_folder)
    untrained = MACRLForImageClassification.from_pretrained(tiny_encoder_folder, num_labels=10)
    before = _accuracy(untrained, processor, test)
    results = finetune(
        tiny_encoder_folder, train, test, output_dir=tmp_path / "tuned", epochs=3, batch_size=50, lr=2e-2,
        lora_rank=8,
    )
    assert results["finetune_steps"] == 24
    # 32.5% after 24 steps against 10% (chance) for the untrained classifier of this random tiny encoder
    assert results["finetune_accuracy"] >= before + 15, (before, results["finetune_accuracy"])


def test_cli_lora_with_gradient_checkpointing_reports_and_saves(tiny_encoder_folder, tmp_path, capsys):
    output = tmp_path / "results.json"
    code = main([
        "--model", str(tiny_encoder_folder), "--limit-train", "100", "--limit-test", "50", "--no-knn",
        "--no-linear-probe", "--finetune-max-steps", "2", "--finetune-batch-size", "25", "--lora-rank", "4",
        "--gradient-checkpointing", "--output", str(output), "--no-progress",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads(output.read_text())
    assert results["finetune_gradient_checkpointing"] is True and results["finetune_lora_rank"] == 4
    assert "LoRA rank 4: 10.23% of the parameters trained" in capsys.readouterr().out
    folder = tmp_path / "results-finetuned"
    assert (folder / ADAPTER_FOLDER / "adapter_model.safetensors").is_file() and (folder / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--finetune-max-steps", "1", "--lora-rank", "4"],
         "LoRA fine-tuning needs peft, which is not installed: pip install 'macrl[peft]'"),
        (["--lora-rank", "4"], "--lora-rank is for fine-tuning: add --finetune-epochs N (or --finetune-max-steps N)"),
        (["--gradient-checkpointing"], "--gradient-checkpointing is for fine-tuning: add --finetune-epochs N"),
    ],
)
def test_cli_lora_without_peft_or_fine_tuning_is_one_line(tiny_encoder_folder, tmp_path, capsys, monkeypatch,
                                                           extra, message):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    output = tmp_path / "results.json"
    code = main(["--model", str(tiny_encoder_folder), "--no-knn", "--output", str(output), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"macrl-eval: error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not output.exists() and not (tmp_path / "results-finetuned").exists()
